"""The validation loss: held-out images (validation_split, never a concept's only image) or a separate set, fixed
noise and timesteps, so two runs with one seed give the same curve and a resumed run continues it; keep_best writes
the LoRA of the lowest point, validation_patience stops the run, and the files carry the curve."""

from __future__ import annotations

import json

import pytest
import safetensors
import torch

from lora_workbench.training.config import ConfigError, DatasetError, TrainConfig
from lora_workbench.training.data.dataset import scan_folder
from lora_workbench.training.lora.formats import load_lora
from lora_workbench.training.train.trainer import RunOptions, TrainCallbacks, TrainData, Trainer
from lora_workbench.training.train.validation import split_validation

from helpers import StopAt, make_images, tiny_backend, tiny_dataset_cfg

BASE = dict(rank=4, alpha=4, preset="attn_ff", lr=5e-3, seed=4, output_name="v", weight_decay=0.0)


class Seen(TrainCallbacks):
    def __init__(self):
        self.validations = []

    def on_validation(self, step, loss, best_step):
        self.validations.append((step, loss, best_step))


def run(dcfg, records, cfg, callbacks=None, validation_records=None, **options):
    data = TrainData(records, dcfg, validation_records=validation_records)
    return Trainer(tiny_backend(), data, cfg, callbacks=callbacks, options=RunOptions(**options)).run()


def test_split_holds_out_a_share_but_never_a_concepts_only_image(tmp_path):
    root = tmp_path / "data"
    make_images(root / "5_dog", n=4)
    make_images(root / "3_cat", n=1, seed=2)
    records = scan_folder(tiny_dataset_cfg(root))
    train, held = split_validation(records, 0.4, seed=0)
    assert len(held) == 2 and all(r.concept == "5_dog" for r in held)  # the cat's single image stays in training
    assert {r.path for r in train} | {r.path for r in held} == {r.path for r in records}
    assert split_validation(records, 0.4, seed=0)[1] == held  # the seed decides
    only = scan_folder(tiny_dataset_cfg(make_images(tmp_path / "one", n=1)))
    with pytest.raises(DatasetError, match="holds out no image"):
        split_validation(only, 0.2, seed=0)
    with pytest.raises(ConfigError, match="validation_split"):
        TrainConfig(validation_split=1.0)


def test_same_seed_same_curve_and_a_resume_continues_it(tmp_path):
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=4))
    records = scan_folder(dcfg)
    cfg = TrainConfig(**BASE, steps=6, validation_split=0.25, validation_every=2, save_every=3)
    seen = Seen()
    a = run(dcfg, records, cfg, seen)
    b = run(dcfg, records, cfg)
    assert [s for s, *_ in a.validation] == [2, 3, 4, 6]  # every 2 steps, at the save (3) and at the end
    assert a.validation == b.validation and len(a.validation) == len(seen.validations)
    assert len({round(v[1], 6) for v in a.validation}) > 1  # it moves with the weights
    out = tmp_path / "run"
    first = run(dcfg, records, cfg, StopAt(3), output_dir=out)
    assert first.stopped_early and first.validation == a.validation[:2]
    resumed = run(dcfg, records, cfg, output_dir=out, resume_from=out / "v-state")
    assert resumed.validation == a.validation
    with safetensors.safe_open(out / "v-step000003.safetensors", "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["lw_validation_loss"]) == [list(v) for v in a.validation[:2]]
    assert int(meta["lw_best_step"]) == min(a.validation[:2], key=lambda v: v[1])[0]


def test_keep_best_writes_the_lowest_point_and_patience_stops_the_run(tmp_path):
    """Trained long on one photo and validated on others, the curve stops falling somewhere: with patience 1 the
    run stops at the first validation that is no new best, and -best holds the LoRA of the step before."""
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=1, seed=1))
    val = scan_folder(tiny_dataset_cfg(make_images(tmp_path / "val", n=2, seed=7)))
    out = tmp_path / "out"
    cfg = TrainConfig(**{**BASE, "lr": 1e-2, "rank": 8, "alpha": 8, "preset": "all"}, steps=200, validation_every=5,
                      save_every=5, keep_best=True, validation_patience=1)
    result = run(dcfg, scan_folder(dcfg), cfg, validation_records=val, output_dir=out)
    assert result.stopped_early and result.steps_done < 200, result.validation
    losses = [v[1] for v in result.validation]
    assert losses[-1] >= min(losses) and result.best_step == result.steps_done - 5
    best = load_lora(out / "v-best.safetensors")
    at_best = load_lora(out / f"v-step{result.best_step:06d}.safetensors")
    assert best.metadata["lw_best_step"] == str(result.best_step)
    for k, m in at_best.modules.items():
        torch.testing.assert_close(best.modules[k].up, m.up)
        torch.testing.assert_close(best.modules[k].down, m.down)


SUBJECTS = ("red fox in snow", "blue car on a road", "green tree at night", "yellow boat on a lake")


def make_overfit_images(folder, n, seed):
    """n pictures sharing one colour gradient (what a LoRA should learn), each with its own strong random 8 px
    blocks (what it can only memorise), captioned by subject: image i shows SUBJECTS[i % 4]."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:32, 0:32] / 31
    cast = 0.5 + np.stack([0.4 - 0.6 * x, 0.6 * y - 0.3, 0.5 * x * y - 0.2], -1)
    for i in range(n):
        blocks = rng.uniform(-0.75, 0.75, (4, 4, 3)).repeat(8, 0).repeat(8, 1)
        Image.fromarray((np.clip(cast + blocks, 0, 1) * 255).astype(np.uint8)).save(folder / f"img_{i:02d}.png")
        (folder / f"img_{i:02d}.txt").write_text(SUBJECTS[i % 4])
    return folder


def test_an_overfit_runs_validation_curve_turns_up_and_keep_best_saves_its_lowest_step(tmp_path):
    """Four captioned pictures trained 800 steps: the LoRA first learns their shared colour gradient, then ties
    each caption to its own picture's details. Held-out pictures of the same subjects with other details show it:
    their loss falls, bottoms out early and climbs back while the training loss keeps falling; keep_best's file
    is the step save at the bottom."""
    dcfg = tiny_dataset_cfg(make_overfit_images(tmp_path / "img", 4, seed=1))
    val = scan_folder(tiny_dataset_cfg(make_overfit_images(tmp_path / "val", 8, seed=7)))
    out = tmp_path / "out"
    # The tiny VAE's latents are ~0.05 in scale against unit noise, so a picture's details only move the loss
    # at the lowest noise levels: training is drawn towards them (logit-normal, mean -5: most t below 50) and
    # validated there. The cosine decay settles the weights, so the curve's late shape is not step-to-step jitter.
    cfg = TrainConfig(**{**BASE, "rank": 16, "alpha": 16, "preset": "all"}, steps=800, batch_size=4,
                      lr_scheduler="cosine", timestep_sampling="logit_normal", logit_mean=-5.0,
                      validation_timesteps=(0.001, 0.002, 0.004, 0.006, 0.01), validation_every=50, save_every=50,
                      keep_best=True)
    result = run(dcfg, scan_folder(dcfg), cfg, validation_records=val, output_dir=out)
    curve = [list(v) for v in result.validation]
    steps, losses = [v[0] for v in curve], [v[1] for v in curve]
    low = losses.index(min(losses))
    best_step = steps[low]
    assert losses[0] > 1.15 * losses[low], curve  # it falls first: the shared gradient is learnt
    assert best_step <= 400 and result.best_step == best_step, curve  # the bottom comes in the first half ...
    assert losses[-1] > 1.05 * losses[low] and min(losses[low + 2:]) > losses[low], curve  # ... and it climbs back
    trained = result.losses
    assert sum(trained[-100:]) < 0.8 * sum(trained[max(0, best_step - 100):best_step]), curve  # still fitting it
    best = load_lora(out / "v-best.safetensors")
    at_best = load_lora(out / f"v-step{best_step:06d}.safetensors")
    assert best.metadata["lw_best_step"] == str(best_step) and best.metadata["lw_steps_done"] == str(best_step)
    assert json.loads(best.metadata["lw_validation_loss"]) == curve[:low + 1]  # the curve down to its bottom
    assert best.modules.keys() == at_best.modules.keys()
    for k, m in at_best.modules.items():
        torch.testing.assert_close(best.modules[k].up, m.up)
        torch.testing.assert_close(best.modules[k].down, m.down)


def test_cli_validates_on_a_separate_folder_and_reports_the_best_step(tmp_path, capsys):
    from lora_workbench.app.cli import main
    from lora_workbench.training.model.tiny import save_tiny_pipeline

    imgs = make_images(tmp_path / "img", n=2)
    val = make_images(tmp_path / "val", n=1, seed=5)
    model = save_tiny_pipeline(tmp_path / "model")
    out = tmp_path / "out"
    assert main(["train", str(imgs), "--model", str(model), "--out", str(out), "--steps", "4", "--validation-dir",
                 str(val), "--validation-every", "2", "--keep-best", "--resolution", "32", "--bucket-step", "16",
                 "--min-bucket-side", "16", "--max-bucket-side", "64"]) == 0
    text = capsys.readouterr().out
    assert "validation loss by step: 2: " in text and "lowest validation loss" in text and "lora-best.safetensors" in text
    meta = load_lora(out / "lora.safetensors").metadata
    assert [v[0] for v in json.loads(meta["lw_validation_loss"])] == [2, 4]
    assert (out / "lora-best.safetensors").is_file()


def test_loss_graph_draws_the_validation_line_and_rings_its_best_step():
    import numpy as np

    from lora_workbench.training.train.plot import loss_plot

    losses = [1.0 - 0.01 * i for i in range(40)]
    plain = np.asarray(loss_plot(losses, 400, 200))
    drawn = np.asarray(loss_plot(losses, 400, 200, validation=[(10, 0.95), (20, 0.8), (30, 0.85), (40, 0.9)]))

    def green(a):
        return int(((a[..., 1] > 120) & (a[..., 0] < 60) & (a[..., 2] < 90)).sum())

    assert green(plain) == 0 and green(drawn) > 100


def test_the_best_step_save_is_marked_among_a_runs_saves(tmp_path):
    """What the LoRA Grid labels "(best)": of a run's step saves, the one at the lowest validation loss its longest
    curve shows; files of another run or without a curve are never marked."""
    from lora_workbench.training.lora.files import read_metadata
    from lora_workbench.training.train.validation import best_of_saves

    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=4))
    out = tmp_path / "out"
    cfg = TrainConfig(**BASE, steps=8, validation_split=0.25, save_every=2)
    result = run(dcfg, scan_folder(dcfg), cfg, output_dir=out)
    saves = sorted(out.glob("v-step*.safetensors"))
    metas = [read_metadata(p) for p in saves]
    marks = best_of_saves(metas + [{}])
    best_curve = min(result.validation[:-1], key=lambda v: v[1])[0]  # the saves' curves end at step 6
    assert marks[:-1] == [m["lw_steps_done"] == str(best_curve) for m in metas] and not marks[-1]
    assert sum(marks) == 1
