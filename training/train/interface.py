"""What a host gives a training run and gets back: data, options, callbacks, result, errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import DatasetConfig
from ..data.images import ImageRecord
from ..errors import LoraWorkbenchError
from ..lora.files import LoraWeights
from .distributed import Dist

if TYPE_CHECKING:
    from .memory import MemoryEstimate


class TrainingError(LoraWorkbenchError, RuntimeError):
    """The run cannot go on (e.g. the loss became NaN); the message says what to change."""


class TrainCallbacks:
    """Hooks the host overrides: progress, stop requests, saved files."""

    def on_start(self, total_steps: int, trainable_params: int) -> None:
        """The run is about to train: ``total_steps`` optimizer steps of ``trainable_params`` LoRA parameters."""

    def on_resume(self, step: int) -> None:
        """The run continues a saved state at ``step``: called before ``on_start``."""

    def on_step(self, step: int, total: int, loss: float, lr: float) -> None:
        """Optimizer step ``step`` of ``total`` finished, with its mean loss and learning rate."""

    def on_progress(self, task: str, done: int, total: int) -> None:
        """Progress of a long preparation ("class images", "caching latents"), before the first step."""

    def should_stop(self) -> bool:
        """Asked before each step; True ends the run early. This default never stops."""
        return False

    def on_save(self, path: Path, step: int) -> None:
        """A step save (a LoRA file) was written at ``path``, on the main process only."""

    def on_state_saved(self, path: Path, step: int) -> None:
        """A resumable state folder was written at ``path``, on the main process only."""

    def on_validation(self, step: int, loss: float, best_step: int) -> None:
        """The validation loss at ``step`` and the step of the lowest one so far."""

    def on_preview(self, step: int, images: torch.Tensor, prompt: str) -> None:
        """images: [B, H, W, 3] in 0..1, rendered by the model as trained so far."""

    def on_memory_estimate(self, estimate: MemoryEstimate) -> None:
        """The run's expected peak memory (``memory.MemoryEstimate``), before any LoRA layer exists."""


@dataclass
class TrainData:
    """What a run trains on: the images (``records``, bucketed by the trainer where not yet) and their
    ``DatasetConfig``; for prior preservation the class images and the prompt of those without a caption."""

    records: list[ImageRecord]
    config: DatasetConfig
    class_records: list[ImageRecord] | None = None
    class_prompt: str = ""
    validation_records: list[ImageRecord] | None = None  # a separate validation set (else validation_split's)


@dataclass
class RunOptions:
    """Where a run writes and what it continues. ``output_dir``: step saves (None: the run writes
    nothing); ``state_dir``: resumable states (default: ``output_dir``); ``resume_from``: a saved state
    folder; ``overwrite``: replace files another run wrote; ``dist``: the processes of the run."""

    output_dir: str | Path | None = None
    state_dir: str | Path | None = None
    resume_from: str | Path | None = None
    overwrite: bool = False
    dist: Dist = field(default_factory=Dist)


@dataclass
class TrainResult:
    lora: LoraWeights
    losses: list[float]  # one mean loss per optimizer step (instance + weighted prior)
    steps_done: int
    stopped_early: bool = False
    saved: list[Path] = field(default_factory=list)
    state_dir: Path | None = None
    seconds: float = 0.0
    instance_losses: list[float] = field(default_factory=list)
    prior_losses: list[float] = field(default_factory=list)
    ema_lora: LoraWeights | None = None  # the EMA of the LoRA weights (``ema_decay``), with its file metadata
    # (step, validation loss[, the EMA's]) per validation; the step of the lowest (None: no validation set)
    validation: list[tuple] = field(default_factory=list)
    best_step: int | None = None
