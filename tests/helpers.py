"""Shared builders for the engine tests: tiny models and small generated image sets."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from lora_workbench.training.model.backend import DiffusersBackend
from lora_workbench.training.config import DatasetConfig
from lora_workbench.training.model.tiny import build_tiny_components
from lora_workbench.training.train.interface import TrainCallbacks


def make_images(folder: Path, n: int = 4, size: int = 32, seed: int = 0, captions: bool = True) -> Path:
    """n small pictures: a red disc at varying places on varying backgrounds, with captions."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (size, size), tuple(rng.randint(0, 255) for _ in range(3)))
        r = size // 4
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=(220, 20, 20))
        img.save(folder / f"img_{i:02d}.png")
        if captions:
            (folder / f"img_{i:02d}.txt").write_text(f"a photo of a ball, tag{i % 2}, outdoors")
    return folder


def tiny_dataset_cfg(folder: Path, **kw) -> DatasetConfig:
    base = dict(path=str(folder), trigger="sks", resolution=32, bucket_step=16, min_bucket_side=16,
                max_bucket_side=64)
    base.update(kw)
    return DatasetConfig(**base)


def tiny_backend(seed: int = 0) -> DiffusersBackend:
    c = build_tiny_components(seed=seed)
    return DiffusersBackend(c["unet"], c["text_encoder"], c["tokenizer"], c["vae"], c["scheduler"])


@torch.no_grad()
def fixed_eval_loss(backend, records, dcfg, n_noise=4, seed=123):
    """Mean denoising loss over fixed (noise, timestep) draws: comparable before and after training.

    Each image gets its own size conditioning (SDXL; a no-op for SD1)."""
    from lora_workbench.training.data.buckets import load_pixels
    from lora_workbench.training.train.schedules import add_noise, target_for

    g = torch.Generator().manual_seed(seed)
    alphas = backend.alphas_cumprod()
    total, n = 0.0, 0
    for r in records:
        pixels, meta = load_pixels(r, dcfg)
        x0 = backend.encode_images(pixels[None])
        cond = backend.add_size_conditioning(backend.encode_prompts([r.caption]), [meta])
        for _ in range(n_noise):
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, alphas.shape[0], (1,), generator=g)
            pred = backend.predict(add_noise(x0, noise, alphas, t), t, cond)
            total += torch.nn.functional.mse_loss(pred, target_for("epsilon", x0, noise, alphas, t)).item()
            n += 1
    return total / n


def unet_diffusers_to_ldm(arch) -> dict[str, str]:
    """diffusers UNet module path -> LDM path: the inverse of ``keys.unet_ldm_to_diffusers`` (tests only)."""
    from lora_workbench.training.model.keys import unet_ldm_to_diffusers

    return {v: k for k, v in unet_ldm_to_diffusers(arch).items()}


class StopAt(TrainCallbacks):
    """Stops a run once it has finished ``step`` steps (a cancel at a known step)."""

    def __init__(self, step):
        self.step, self.seen = step, 0

    def on_step(self, step, total, loss, lr):
        self.seen = step

    def should_stop(self):
        return self.seen >= self.step
