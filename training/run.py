"""One call from a folder to a saved LoRA: validate early, load the model, train, save.

Shared by the CLI and the demo; everything that can be checked before a model loads is checked first.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

from .backend import Backend
from .config import TrainConfig
from .dataset import DatasetConfig, scan_folder
from .distributed import Dist
from .train import TrainCallbacks, Trainer, TrainResult

log = logging.getLogger(__name__)


class TqdmCallbacks(TrainCallbacks):
    """A progress bar with the current loss, for terminals."""

    def __init__(self):
        self.bar = None

    def on_start(self, total_steps, trainable_params):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, desc="training", unit="step")

    def on_step(self, step, total, loss, lr):
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2g}")
        self.bar.update(1)

    def on_save(self, path, step):
        log.info("saved %s (step %d)", path, step)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def check_output(out_dir: Path, name: str, overwrite: bool, need_bytes: int = 512 * 2**20) -> Path:
    """The final LoRA path, refused early if it exists (unless overwrite) or the disk is nearly full."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.safetensors"
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass another --output-name or --overwrite")
    free = shutil.disk_usage(out_dir).free
    if free < need_bytes:
        raise RuntimeError(f"only {free / 2**20:.0f} MiB free in {out_dir}; free at least "
                           f"{need_bytes / 2**20:.0f} MiB or choose another --out folder")
    return path


def _class_records(dcfg: DatasetConfig, class_dir: Path, class_prompt: str):
    """The class images as records: same bucketing as the instance set, captions default to the prompt."""
    import dataclasses

    ccfg = dataclasses.replace(dcfg, path=str(class_dir), trigger="", default_caption=class_prompt,
                               shuffle_tags=False, caption_dropout=0.0, repeats=1)
    return scan_folder(ccfg)


def train_folder(dcfg: DatasetConfig, tcfg: TrainConfig, load_backend: Callable[[], Backend], out_dir: Path,
                 overwrite: bool = False, callbacks: TrainCallbacks | None = None,
                 class_dir: Path | None = None, class_prompt: str = "", resume_from: Path | None = None,
                 dist: Dist | None = None) -> tuple[TrainResult, Path | None]:
    """Train on ``dcfg.path`` and save ``out_dir/<output_name>.safetensors``.

    With ``class_dir`` + ``class_prompt`` the run uses prior preservation; when fewer than
    ``tcfg.num_class_images`` class images are there, the missing ones are generated with the
    base model first (diffusers backends) and kept for the next run.
    """
    dist = dist or Dist()
    records = scan_folder(dcfg)  # bad images fail here, before any model loads
    final = check_output(out_dir, tcfg.output_name, overwrite or resume_from is not None)
    if class_dir is not None and not class_prompt:
        raise ValueError("--class-dir needs --class-prompt (e.g. 'a photo of a dog'): the caption of the class images")
    backend = load_backend()
    class_records = None
    if class_dir is not None:
        from .class_images import diffusers_renderer, existing_class_images, generate_class_images

        if len(existing_class_images(class_dir)) < tcfg.num_class_images:
            if not hasattr(backend, "vae"):
                raise ValueError(f"{class_dir} has fewer than {tcfg.num_class_images} class images and this "
                                 "backend cannot generate them; add images or lower num_class_images")
            if dist.is_main:
                generate_class_images(diffusers_renderer(backend, dcfg.resolution), class_prompt,
                                      tcfg.num_class_images, class_dir, seed=tcfg.seed)
            dist.barrier()
        class_records = _class_records(dcfg, class_dir, class_prompt)
    cb = callbacks or (TqdmCallbacks() if dist.is_main else TrainCallbacks())
    try:
        trainer = Trainer(backend, records, dcfg, tcfg, output_dir=out_dir, callbacks=cb,
                          overwrite=overwrite or resume_from is not None, class_records=class_records,
                          class_prompt=class_prompt, resume_from=resume_from, dist=dist)
        result = trainer.run()
    finally:
        if isinstance(cb, TqdmCallbacks):
            cb.close()
    from .lora_io import save_lora

    path = None
    if dist.is_main:
        path = save_lora(final, result.lora, dtype=tcfg.save_dtype, overwrite=overwrite or resume_from is not None)
    dist.barrier()
    return result, path
