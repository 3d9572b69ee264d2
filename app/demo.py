"""``lora-workbench demo``: the whole job on a tiny random model and generated images, offline.

It writes a tiny SD1-shaped diffusers model, a small captioned image set (a red ball on varied
backgrounds, the "subject"), trains a LoRA for a few dozen steps, saves it, and reports how the
loss fell and where each file went.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

log = logging.getLogger(__name__)

BACKGROUNDS = [(30, 60, 160), (40, 140, 60), (200, 200, 40), (120, 40, 140), (20, 20, 20), (220, 220, 220),
               (150, 90, 40), (60, 160, 170)]
PLACES = ["a lake", "grass", "sand", "a purple wall", "the night", "snow", "a wooden floor", "the sea"]


def make_demo_images(folder: Path, n: int = 8, size: int = 64, seed: int = 0) -> Path:
    """n captioned pictures of the same subject (a red ball) in different places."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        bg = BACKGROUNDS[i % len(BACKGROUNDS)]
        img = Image.new("RGB", (size, size), bg)
        d = ImageDraw.Draw(img)
        r = rng.randint(size // 6, size // 4)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(210, 30, 30), outline=(120, 10, 10))
        d.ellipse([cx - r // 3 - 2, cy - r // 2 - 2, cx - r // 3 + 2, cy - r // 2 + 2], fill=(255, 200, 200))
        img.save(folder / f"ball_{i:02d}.png")
        (folder / f"ball_{i:02d}.txt").write_text(f"a photo of a ball on {PLACES[i % len(PLACES)]}")
    return folder


def run_demo(out: Path, steps: int = 100) -> Path:
    from ..training.model.backend import DiffusersBackend
    from ..training.config import DatasetConfig, TrainConfig
    from ..training.lora.describe import describe_lora
    from .folder_training import train_folder
    from ..training.model.tiny import save_tiny_pipeline

    out = Path(out).expanduser()
    log.info("LoRA Workbench demo: writing everything under %s", out)
    model_dir = out / "tiny-model"
    if not (model_dir / "model_index.json").exists():
        save_tiny_pipeline(model_dir, seed=0)
    images = make_demo_images(out / "images")
    dcfg = DatasetConfig(path=str(images), trigger="sks", resolution=64, bucket_step=16, min_bucket_side=32,
                         max_bucket_side=128)
    tcfg = TrainConfig(rank=8, alpha=8, preset="all", steps=steps, lr=2e-3, batch_size=2, seed=0,
                       save_every=max(1, steps // 3), output_name="demo_sks_ball", save_dtype="fp16")
    result, path = train_folder(dcfg, tcfg, lambda: DiffusersBackend.from_pretrained(model_dir), out / "loras",
                                overwrite=True)
    k = max(1, len(result.losses) // 10)
    first, last = sum(result.losses[:k]) / k, sum(result.losses[-k:]) / k
    print(f"\nLoRA Workbench demo: trained {result.steps_done} steps in {result.seconds:.1f} s")
    print(f"  loss (mean of first/last {k} steps): {first:.4f} -> {last:.4f} ({100 * (1 - last / first):.0f}% lower)")
    print(f"  base model:   {model_dir}")
    print(f"  images:       {images} ({len(list(images.glob('*.png')))} png + captions, trigger 'sks')")
    print(f"  LoRA:         {path}")
    for p in result.saved:
        print(f"  checkpoint:   {p}")
    print(f"  inspect it:   lora-workbench inspect {path}\n")
    print(describe_lora(path))
    return path
