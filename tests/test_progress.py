"""Progress as a user sees it: a resumed run starts at its step, long preparations get bars, and no
warning of our own making."""

import logging
import warnings

from lora_workbench.training.train import class_images
from lora_workbench.training.train.class_images import diffusers_renderer
from lora_workbench.app.cli import main
from lora_workbench.training.config import TrainConfig
from lora_workbench.training.data.dataset import scan_folder
from lora_workbench.app.folder_training import TqdmCallbacks, train_folder
from lora_workbench.training.train.trainer import RunOptions, TrainCallbacks, TrainData, Trainer

from helpers import make_images, tiny_backend, tiny_dataset_cfg


class Recorder(TrainCallbacks):
    def __init__(self, stop_at=None):
        self.events, self.stop_at, self.seen = [], stop_at, 0

    def on_resume(self, step):
        self.events.append(("resume", step))

    def on_start(self, total_steps, trainable_params):
        self.events.append(("start", total_steps))

    def on_step(self, step, total, loss, lr):
        self.seen = step
        self.events.append(("step", step))

    def on_progress(self, task, done, total):
        self.events.append((task, done, total))

    def should_stop(self):
        return self.stop_at is not None and self.seen >= self.stop_at


def test_a_resumed_run_reports_from_its_step(tmp_path):
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=2))
    records = scan_folder(dcfg)
    cfg = TrainConfig(rank=4, alpha=4, steps=6, output_name="r")
    Trainer(tiny_backend(), TrainData(records, dcfg), cfg, callbacks=Recorder(stop_at=4),
            options=RunOptions(output_dir=tmp_path / "out")).run()
    rec = Recorder()
    Trainer(tiny_backend(), TrainData(records, dcfg), cfg, callbacks=rec,
            options=RunOptions(output_dir=tmp_path / "out", resume_from=tmp_path / "out" / "r-state")).run()
    marks = [e for e in rec.events if e[0] in ("resume", "start", "step")]
    assert marks == [("resume", 4), ("start", 6), ("step", 5), ("step", 6)]


def test_the_terminal_bar_of_a_resumed_run_starts_at_its_step():
    cb = TqdmCallbacks()
    cb.on_resume(34)
    cb.on_start(60, 1000)
    assert (cb.bar.n, cb.bar.total, cb.bar.initial) == (34, 60, 34)
    cb.on_step(35, 60, 0.1, 1e-4)
    assert cb.bar.n == 35
    cb.close()


def test_class_images_and_latent_caching_report_progress(tmp_path, monkeypatch):
    from PIL import Image

    def renderer(backend, resolution, **kw):
        return lambda prompt, seed, index: Image.new("RGB", (32, 32), (index * 40, 0, 0))

    monkeypatch.setattr(class_images, "diffusers_renderer", renderer)
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=2))
    rec = Recorder()
    train_folder(dcfg, TrainConfig(rank=4, alpha=4, steps=1, num_class_images=2), tiny_backend, tmp_path / "out",
                 callbacks=rec, class_dir=tmp_path / "class", class_prompt="a photo of a ball")
    assert [e for e in rec.events if e[0] == "class images"] == [("class images", 0, 2), ("class images", 1, 2),
                                                                ("class images", 2, 2)]
    caching = [e for e in rec.events if e[0] == "caching latents"]
    assert caching[-1] == ("caching latents", 4, 4)  # 2 images + 2 class images in the one bucket


def test_class_image_rendering_raises_no_warning_of_our_own_making():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        render = diffusers_renderer(tiny_backend(), resolution=32, steps=1)
        render("a photo of a ball", 0, 0)
    ours = [w for w in caught if issubclass(w.category, FutureWarning)]
    assert not ours, [str(w.message)[:200] for w in ours]


def test_log_lines_are_written_above_the_bars(monkeypatch):
    from lora_workbench.app import cli

    seen = []

    def inspect(ns):
        seen.extend(type(h).__name__ for h in logging.getLogger().handlers)
        return 0

    monkeypatch.setitem(cli.__dict__, "cmd_inspect", inspect)
    assert main(["inspect", "x.safetensors"]) == 0
    assert "_TqdmLoggingHandler" in seen
