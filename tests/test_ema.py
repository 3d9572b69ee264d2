"""The EMA of the LoRA weights (ema_decay / ema_start_step / ema_every): what the trainer keeps equals an EMA
computed by hand from the weights after each step, it is saved beside every LoRA, and a resumed run continues the
same average."""

from __future__ import annotations

import json

import pytest
import safetensors
import torch

from lora_workbench.app.folder_training import check_output
from lora_workbench.training.config import ConfigError, TrainConfig
from lora_workbench.training.data.dataset import scan_folder
from lora_workbench.training.lora.formats import load_lora
from lora_workbench.training.train.state import ResumeError, load_state
from lora_workbench.training.train.trainer import RunOptions, TrainCallbacks, TrainData, Trainer

from helpers import StopAt, make_images, tiny_backend, tiny_dataset_cfg

BASE = dict(rank=4, alpha=4, preset="attn_ff", lr=5e-3, batch_size=2, seed=5, output_name="e")


class Recorder(TrainCallbacks):
    """The LoRA weights after each step (what the EMA averages)."""

    def __init__(self):
        self.trainer = None
        self.start: dict = {}
        self.after: list[dict] = []

    def on_start(self, total, n_trainable):
        self.start = {k: (m.down.clone(), m.up.clone()) for k, m in self.trainer.lora_weights(0).modules.items()}

    def on_step(self, step, total, loss, lr):
        self.after.append({k: (m.down.clone(), m.up.clone())
                           for k, m in self.trainer.lora_weights(step).modules.items()})


@pytest.fixture
def data(tmp_path):
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=4))
    return dcfg, scan_folder(dcfg)


def run(data, cfg, callbacks=None, **options):
    dcfg, records = data
    trainer = Trainer(tiny_backend(), TrainData(records, dcfg), cfg, callbacks=callbacks,
                      options=RunOptions(**options))
    if isinstance(callbacks, Recorder):
        callbacks.trainer = trainer
    return trainer.run()


@pytest.mark.parametrize("start, every", [(0, 1), (1, 2)])
def test_ema_equals_a_hand_computed_average_after_3_steps(data, start, every):
    decay = 0.8
    rec = Recorder()
    result = run(data, TrainConfig(**BASE, steps=3, ema_decay=decay, ema_start_step=start, ema_every=every), rec)
    # by hand: the weights before step 1 (down random, up zero), then per step a copy before start_step and
    # ema = decay * ema + (1 - decay) * weights every `every` steps from it
    ema = dict(rec.start)
    assert all(not u.any() for _, u in ema.values())  # up starts at zero
    for step, weights in enumerate(rec.after, start=1):
        for k, (d, u) in weights.items():
            if step < start:
                ema[k] = (d.clone(), u.clone())
            elif (step - start) % every == 0:
                ema[k] = (decay * ema[k][0] + (1 - decay) * d, decay * ema[k][1] + (1 - decay) * u)
    assert set(result.ema_lora.modules) == set(ema)
    for k, (d, u) in ema.items():
        torch.testing.assert_close(result.ema_lora.modules[k].down, d, atol=1e-6, rtol=1e-5, msg=k)
        torch.testing.assert_close(result.ema_lora.modules[k].up, u, atol=1e-6, rtol=1e-5, msg=k)
    assert not torch.equal(result.ema_lora.modules[k].up, result.lora.modules[k].up)  # an average, not the last
    assert json.loads(result.ema_lora.metadata["lw_ema"]) == {"decay": decay, "start_step": start, "every": every}


def test_ema_files_beside_each_save_and_a_resume_continues_the_average(tmp_path, data):
    cfg = TrainConfig(**BASE, steps=6, save_every=2, ema_decay=0.7)
    full = run(data, cfg)
    out = tmp_path / "run"
    first = run(data, cfg, StopAt(3), output_dir=out)
    assert first.stopped_early and load_state(out / "e-state").ema is not None
    assert (out / "e-step000002.safetensors").is_file() and (out / "e-ema-step000002.safetensors").is_file()
    with safetensors.safe_open(out / "e-ema-step000002.safetensors", "pt") as f:
        assert "lw_ema" in f.metadata()
    second = run(data, cfg, output_dir=out, resume_from=out / "e-state")
    for k, m in full.ema_lora.modules.items():
        torch.testing.assert_close(second.ema_lora.modules[k].up, m.up, atol=1e-6, rtol=1e-5, msg=k)
        torch.testing.assert_close(second.ema_lora.modules[k].down, m.down, atol=1e-6, rtol=1e-5, msg=k)
    assert load_lora(out / "e-ema-step000004.safetensors").modules.keys() == full.ema_lora.modules.keys()
    # a resume that asks for an EMA the state never kept is refused with the fix
    plain = TrainConfig(**BASE, steps=6, save_every=2)
    out2 = tmp_path / "plain"
    run(data, plain, StopAt(2), output_dir=out2)
    with pytest.raises(ResumeError, match="ema_decay"):
        run(data, cfg, output_dir=out2, resume_from=out2 / "e-state")


def test_bad_ema_options_and_another_runs_ema_file_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ConfigError, match="ema_every"):
        TrainConfig(ema_decay=0.9, ema_every=0)
    (tmp_path / "e-ema.safetensors").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="e-ema.safetensors"):
        check_output(tmp_path, "e", overwrite=False)
