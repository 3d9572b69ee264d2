"""Shared builders for the engine tests: tiny models and small generated image sets."""

from __future__ import annotations

import random
from pathlib import Path

from lora_workbench.training.backend import DiffusersBackend
from lora_workbench.training.dataset import DatasetConfig
from lora_workbench.training.tiny import build_tiny_components


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
