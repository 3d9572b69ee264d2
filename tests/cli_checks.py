"""What every diffusers DiT backend of the CLI is checked for, written once: the saved LoRA, loaded into a fresh
model, lowers a fixed set's flow loss; the family's diffusers pipeline, given the file, computes the trained
transformer's output; a stopped run resumed from its state continues the same curve.
"""

from __future__ import annotations

import torch

from helpers import StopAt, make_images, tiny_dataset_cfg
from lora_workbench.training.config import TrainConfig
from lora_workbench.training.data.buckets import load_pixels
from lora_workbench.training.data.dataset import scan_folder
from lora_workbench.training.lora import network
from lora_workbench.training.train.trainer import RunOptions, TrainData, Trainer


@torch.no_grad()
def fixed_flow_loss(backend, records, dcfg, sigmas=(0.2, 0.4, 0.6, 0.8), seed=123) -> float:
    """Mean rectified-flow loss over fixed (noise, sigma) draws: comparable before and after training."""
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    for r in records:
        x0 = backend.encode_images(load_pixels(r, dcfg)[0][None])
        cond = backend.encode_prompts([r.caption])
        for s in sigmas:
            noise = torch.randn(x0.shape, generator=g)
            x_t = (1 - s) * x0 + s * noise
            pred = backend.predict(x_t, torch.tensor([s]), cond).float()
            total += float(((pred - (noise - x0)) ** 2).mean())
            n += 1
    return total / n


def assert_file_lowers_the_fixed_loss(backend, lora, images, rank: int, alpha: float, preset: str = "all",
                                      factor: float = 0.85) -> None:
    """``lora`` (as loaded from its file) put into ``backend``'s untrained model lowers the fixed-set loss on the
    training ``images`` below ``factor`` x the base model's."""
    dcfg = tiny_dataset_cfg(images)
    records = scan_folder(dcfg)
    targets = backend.lora_targets(preset, False)
    before = fixed_flow_loss(backend, records, dcfg)
    network.inject(backend.roots(), targets, rank, alpha)
    network.load_into(backend.roots(), targets, backend.split_lora(lora))
    after = fixed_flow_loss(backend, records, dcfg)
    assert after < factor * before, f"fixed-set loss {before:.4f} -> {after:.4f}"


def assert_pipeline_reproduces(pipe, reference, trained, path, x, sigma, prompt: str) -> None:
    """``pipe.load_lora_weights(path)`` on a fresh pipeline (``reference``: a backend on its modules) computes what
    the ``trained`` backend computes for (x, sigma, prompt) to 1e-5, and training had changed that output."""
    with torch.no_grad():
        cond = trained.encode_prompts([prompt])
        base = reference.predict(x, sigma, cond)
        pipe.load_lora_weights(str(path))
        theirs = reference.predict(x, sigma, cond)
        ours = trained.predict(x, sigma, cond)
    assert (ours - base).abs().max() > 1e-3, "training did not change the output"
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def assert_resume_continues_the_same_curve(tmp_path, backend, steps: int = 6, stop_at: int = 3, **options) -> None:
    """A run stopped after ``stop_at`` steps and resumed from its state gives the uninterrupted run's losses and
    LoRA. ``backend()`` makes a fresh backend (each run starts from the same untrained model)."""
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=4))
    records = scan_folder(dcfg)
    cfg = TrainConfig(**{"rank": 4, "alpha": 4, "preset": "all", "steps": steps, "lr": 2e-3, "batch_size": 2,
                         "seed": 3, "output_name": "r", **options})
    full = Trainer(backend(), TrainData(records, dcfg), cfg).run()
    out = tmp_path / "run"
    first = Trainer(backend(), TrainData(records, dcfg), cfg, callbacks=StopAt(stop_at),
                    options=RunOptions(output_dir=out)).run()
    assert first.stopped_early and first.steps_done == stop_at
    second = Trainer(backend(), TrainData(records, dcfg), cfg,
                     options=RunOptions(output_dir=out, resume_from=out / "r-state")).run()
    assert second.losses[:stop_at] == first.losses
    torch.testing.assert_close(torch.tensor(second.losses), torch.tensor(full.losses), atol=1e-6, rtol=1e-5)
    assert second.lora.modules.keys() == full.lora.modules.keys()
    for k, m in full.lora.modules.items():
        torch.testing.assert_close(second.lora.modules[k].delta(), m.delta(), atol=1e-6, rtol=1e-5, msg=k)


def assert_text_encoder_leaves_and_comes_back(backend, images, prompt: str) -> None:
    """A short run releases ``backend``'s text encoder once the prompts are cached (``pipe.text_encoder`` is None),
    and a later encode reloads it from the model folder with the same result (``feats``: one tensor per prompt)."""
    dcfg = tiny_dataset_cfg(images)
    with torch.no_grad():
        before = backend.encode_prompts([prompt])
    cfg = TrainConfig(rank=4, alpha=4, preset="attn", steps=2, lr=1e-3, batch_size=2, seed=3, output_name="t")
    result = Trainer(backend, TrainData(scan_folder(dcfg), dcfg), cfg).run()
    assert result.steps_done == 2 and backend.pipe.text_encoder is None
    with torch.no_grad():
        again = backend.encode_prompts([prompt])  # reloaded from the folder
    torch.testing.assert_close(again.feats[0], before.feats[0])
