"""Stop, crash and resume: a resumed run continues the same curve; wrong resumes get clear errors."""

import pytest
import torch

from lora_workbench.training.config import TrainConfig
from lora_workbench.training.data.dataset import scan_folder
from lora_workbench.training.train.state import ResumeError, load_state
from lora_workbench.training.train.trainer import RunOptions, TrainCallbacks, TrainData, Trainer

from helpers import make_images, tiny_backend, tiny_dataset_cfg
from helpers import StopAt

BASE = dict(rank=4, alpha=4, preset="attn_ff", steps=20, lr=2e-3, batch_size=2, seed=11,
            train_text_encoder=True, lr_scheduler="cosine", warmup_steps=3, output_name="r")



class CrashAt(TrainCallbacks):
    """Raises from inside the loop, like a host interrupt or an out-of-memory error would."""

    def __init__(self, step):
        self.step = step

    def on_step(self, step, total, loss, lr):
        if step == self.step:
            raise KeyboardInterrupt("user pressed Cancel")


def assert_same_lora(a, b, atol=1e-6):
    assert a.modules.keys() == b.modules.keys()
    for k in a.modules:
        torch.testing.assert_close(a.modules[k].up, b.modules[k].up, atol=atol, rtol=1e-5, msg=k)
        torch.testing.assert_close(a.modules[k].down, b.modules[k].down, atol=atol, rtol=1e-5, msg=k)


@pytest.fixture
def data(tmp_path):
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=4), shuffle_tags=True, flip=True)
    return dcfg, scan_folder(dcfg)


def test_stop_at_10_and_resume_equals_uninterrupted_20(tmp_path, data):
    dcfg, records = data
    cfg = TrainConfig(**BASE)
    full = Trainer(tiny_backend(), TrainData(records, dcfg), cfg).run()

    out = tmp_path / "run"
    first = Trainer(tiny_backend(), TrainData(records, dcfg), cfg, callbacks=StopAt(10),
                    options=RunOptions(output_dir=out)).run()
    assert first.stopped_early and first.steps_done == 10
    assert load_state(out / "r-state").step == 10
    second = Trainer(tiny_backend(), TrainData(records, dcfg), cfg,
                     options=RunOptions(output_dir=out, resume_from=out / "r-state")).run()
    assert second.steps_done == 20
    assert second.losses[:10] == first.losses
    torch.testing.assert_close(torch.tensor(second.losses), torch.tensor(full.losses), atol=1e-6, rtol=1e-5)
    assert_same_lora(second.lora, full.lora)


def test_cancel_mid_run_leaves_a_resumable_state(tmp_path, data):
    dcfg, records = data
    cfg = TrainConfig(**BASE)
    full = Trainer(tiny_backend(), TrainData(records, dcfg), cfg).run()
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_backend(), TrainData(records, dcfg), cfg, callbacks=CrashAt(7),
                options=RunOptions(output_dir=out)).run()
    assert load_state(out / "r-state").step == 7
    assert (out / "r-step000007.safetensors").exists(), "the LoRA so far was not saved on cancel"
    resumed = Trainer(tiny_backend(), TrainData(records, dcfg), cfg,
                      options=RunOptions(output_dir=out, resume_from=out / "r-state")).run()
    assert_same_lora(resumed.lora, full.lora)


def test_hard_crash_loses_at_most_the_steps_since_the_last_save(tmp_path, data):
    dcfg, records = data
    out = tmp_path / "run"
    seen = {}

    class Probe(TrainCallbacks):
        def on_step(self, step, total, loss, lr):
            # What a process killed right now would leave on disk.
            if (out / "r-state").exists():
                seen[step] = load_state(out / "r-state").step

    cfg = TrainConfig(**{**BASE, "save_state_every": 5})
    Trainer(tiny_backend(), TrainData(records, dcfg), cfg, callbacks=Probe(), options=RunOptions(output_dir=out)).run()
    # Killed after step s, the run would restart from the last multiple of 5: at most 4 steps lost.
    assert {s: seen[s] for s in range(5, 20)} == {s: s // 5 * 5 for s in range(5, 20)}


def test_resume_with_other_images_or_settings_is_refused_with_reasons(tmp_path, data):
    dcfg, records = data
    out = tmp_path / "run"
    Trainer(tiny_backend(), TrainData(records, dcfg), TrainConfig(**BASE), callbacks=StopAt(3),
            options=RunOptions(output_dir=out)).run()
    state = out / "r-state"
    with pytest.raises(ResumeError, match=r"rank: saved 4, now 8"):
        Trainer(tiny_backend(), TrainData(records, dcfg), TrainConfig(**{**BASE, "rank": 8}),
                options=RunOptions(resume_from=state)).run()
    (tmp_path / "img" / "img_00.txt").write_text("a different caption")
    changed = scan_folder(dcfg)
    with pytest.raises(ResumeError, match="training images or captions changed"):
        Trainer(tiny_backend(), TrainData(changed, dcfg), TrainConfig(**BASE),
                options=RunOptions(resume_from=state)).run()
    with pytest.raises(ResumeError, match="not a training state"):
        Trainer(tiny_backend(), TrainData(records, dcfg), TrainConfig(**BASE),
                options=RunOptions(resume_from=tmp_path / "img")).run()


def test_resume_without_the_runs_validation_images_is_refused(tmp_path, data):
    """A run that measured a validation loss on its own images resumes only with the same ones: without them (or
    with others) the validation curve and keep_best would silently change."""
    dcfg, records = data
    val_cfg = tiny_dataset_cfg(make_images(tmp_path / "val", n=2, seed=5))
    validation = scan_folder(val_cfg)
    out = tmp_path / "run"
    cfg = TrainConfig(**{**BASE, "validation_every": 2})
    Trainer(tiny_backend(), TrainData(records, dcfg, validation_records=validation), cfg, callbacks=StopAt(3),
            options=RunOptions(output_dir=out)).run()
    state = out / "r-state"
    for other in (None, validation[:1]):
        with pytest.raises(ResumeError, match="validation images changed"):
            Trainer(tiny_backend(), TrainData(records, dcfg, validation_records=other), cfg,
                    options=RunOptions(resume_from=state)).run()
    resumed = Trainer(tiny_backend(), TrainData(records, dcfg, validation_records=validation), cfg,
                      options=RunOptions(resume_from=state)).run()
    assert resumed.steps_done == BASE["steps"] and resumed.validation


def test_keep_last_keeps_the_k_most_recent_step_saves(tmp_path, data):
    dcfg, records = data
    out = tmp_path / "run"
    cfg = TrainConfig(**{**BASE, "steps": 10, "save_every": 2, "keep_last": 2})
    res = Trainer(tiny_backend(), TrainData(records, dcfg), cfg, options=RunOptions(output_dir=out)).run()
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["r-step000006.safetensors",
                                                                "r-step000008.safetensors"]
    assert len(res.saved) == 4  # every save was made; the older ones were pruned
