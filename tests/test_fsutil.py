"""Atomic writes give files the umask's mode, so another user (a ComfyUI in a container) can read them."""

import os
import stat

import pytest

from lora_workbench.training.fsutil import atomic_write, current_umask


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_gives_the_umask_mode(tmp_path, umask):
    assert current_umask() == umask
    path = atomic_write(tmp_path / "a.bin", lambda tmp: open(tmp, "wb").write(b"x"))
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"x")
    assert mode(path) == mode(plain) == 0o666 & ~umask


def test_loras_and_states_get_the_umask_mode(tmp_path, umask):
    import torch

    from lora_workbench.training.config import TrainConfig
    from lora_workbench.training.data.dataset import scan_folder
    from lora_workbench.training.train.trainer import RunOptions, TrainData, Trainer

    from helpers import make_images, tiny_backend, tiny_dataset_cfg

    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=1))
    cfg = TrainConfig(rank=2, alpha=2, steps=2, save_every=1, output_name="m")
    Trainer(tiny_backend(), TrainData(scan_folder(dcfg), dcfg), cfg,
            options=RunOptions(output_dir=tmp_path / "out")).run()
    out = tmp_path / "out"
    assert mode(out / "m-step000001.safetensors") == 0o666 & ~umask
    assert mode(out / "m-state") == 0o777 & ~umask
    assert {mode(p) for p in (out / "m-state").iterdir()} == {0o666 & ~umask}
    del torch
