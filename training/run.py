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


def train_folder(dcfg: DatasetConfig, tcfg: TrainConfig, load_backend: Callable[[], Backend], out_dir: Path,
                 overwrite: bool = False, callbacks: TrainCallbacks | None = None) -> tuple[TrainResult, Path]:
    records = scan_folder(dcfg)  # bad images fail here, before any model loads
    final = check_output(out_dir, tcfg.output_name, overwrite)
    backend = load_backend()
    cb = callbacks or TqdmCallbacks()
    try:
        trainer = Trainer(backend, records, dcfg, tcfg, output_dir=out_dir, callbacks=cb, overwrite=overwrite)
        result = trainer.run()
    finally:
        if isinstance(cb, TqdmCallbacks):
            cb.close()
    from .lora_io import save_lora

    path = save_lora(final, result.lora, dtype=tcfg.save_dtype, overwrite=overwrite)
    return result, path
