"""One error boundary: a full disk, damaged files and files that are not LoRAs get one or two lines."""

import argparse
import errno
import hashlib

import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from lora_workbench.app.cli import main
from lora_workbench.training.lora.formats import load_lora
from lora_workbench.training.train.state import load_state
from lora_workbench.training.model.tiny import save_tiny_pipeline

from helpers import make_images

SMALL = ["--resolution", "32", "--bucket-step", "16", "--min-bucket-side", "16", "--max-bucket-side", "64",
         "--rank", "4", "--alpha", "4", "--trigger", "sks"]
# What safetensors raises when the disk fills up mid-write.
ENOSPC_TEXT = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def our_lines(err, command="train"):
    return [line for line in err.splitlines() if line.startswith(f"lora-workbench {command}:")]


def test_disk_full_mid_run_two_lines_and_earlier_files_intact(tmp_path, monkeypatch, capsys):
    imgs = make_images(tmp_path / "img", n=2)
    model = save_tiny_pipeline(tmp_path / "model")
    out = tmp_path / "out"
    real, calls = safetensors.torch.save_file, []

    def filling_disk(tensors, filename, metadata=None):
        """The first two writes fit (step 2's LoRA and state); then the disk is full, half-way into a write."""
        calls.append(filename)
        if len(calls) <= 2:
            return real(tensors, filename, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise SafetensorError(ENOSPC_TEXT)

    monkeypatch.setattr(safetensors.torch, "save_file", filling_disk)
    code = main(["train", str(imgs), "--model", str(model), "--out", str(out), "--steps", "6",
                 "--save-every", "2", "--output-name", "r", *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = our_lines(err)
    assert len(lines) == 2, err
    assert f"disk full: could not write to {out} (" in lines[0] and "MiB free" in lines[0]
    assert f"the last good state is {out / 'r-state'} (step 2)" in lines[1] and "--resume" in lines[1]
    # Nothing half-written: no temp files, and what was saved before reads back.
    assert sorted(p.name for p in out.iterdir()) == ["r-state", "r-step000002.safetensors"]
    assert load_state(out / "r-state").step == 2
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert load_lora(out / "r-step000002.safetensors").modules


def test_enospc_from_any_write_names_the_folder_and_the_free_space(tmp_path, capsys, monkeypatch):
    from lora_workbench.app import cli

    def full(ns):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.safetensors"))

    monkeypatch.setitem(cli.__dict__, "cmd_inspect", full)
    assert main(["inspect", "whatever.safetensors"]) == 2
    line, = our_lines(capsys.readouterr().err, "inspect")
    assert line.startswith(f"lora-workbench inspect: error: disk full: could not write to {tmp_path} (")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="not a readable"):
        main(["--debug", "inspect", str(_random(tmp_path / "r.safetensors"))])


def _random(path, n=4096):
    path.write_bytes(hashlib.sha256(b"x").digest() * (n // 32))
    return path


def _pickle(path):
    torch.save({"x": argparse.Namespace(a=1)}, path)
    return path


def _full_checkpoint(path):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    return path


@pytest.mark.parametrize("make, expected", [
    (lambda p: _random(p / "damaged.safetensors"), "is not a readable .safetensors file"),
    (lambda p: _random(p / "random.ckpt"), "is not a readable .ckpt file"),
    (lambda p: _pickle(p / "objects.ckpt"), "holds Python objects"),
    (lambda p: _full_checkpoint(p / "sd15.safetensors"), "is not a LoRA: it is a full model checkpoint"),
])
def test_inspect_refuses_what_is_not_a_readable_lora(tmp_path, capsys, make, expected):
    path = make(tmp_path)
    assert main(["inspect", str(path)]) != 0
    err = capsys.readouterr().err
    line, = err.strip().splitlines()
    assert expected in line and str(path) in line, err
    assert "weights_only=False" not in line and "weights_only` set to `False" not in line


def test_a_random_ckpt_model_is_damaged_not_python_objects(tmp_path, capsys):
    imgs = make_images(tmp_path / "img", n=1)
    model = _random(tmp_path / "model.ckpt")
    tok = save_tiny_pipeline(tmp_path / "tiny") / "tokenizer"
    assert main(["train", str(imgs), "--model", str(model), "--tokenizer", str(tok), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "cannot read model file" in err and "Python objects" not in err and "weights_only" not in err, err


def test_inspect_reads_the_architecture_from_metadata(tmp_path, capsys):
    main(["demo", "--out", str(tmp_path / "demo"), "--steps", "1"])
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "demo" / "loras" / "demo_sks_ball.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "architecture:     sd1\n" in out
