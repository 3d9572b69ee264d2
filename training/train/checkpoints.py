"""What a run leaves on disk while it trains: step saves, their pruning, and resumable states.

One ``Checkpoints`` object per run, driven by the trainer's events (minGPT's ``trigger_callbacks``):

* ``on_step_end``: every ``save_every`` steps a LoRA ``<name>-step<NNNNNN>.safetensors`` (older ones
  pruned to ``keep_last``), every ``save_state_every`` (default ``save_every``) steps a state;
* ``on_stop``: a state to resume from;
* ``on_crash`` (cancelled or failed between steps): a state and the LoRA so far.

Every write is the main process's; all ranks wait for it. A file is replaced or pruned only when this
run wrote it (its ``lw_run_id``), or with ``overwrite``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import TrainConfig
from ..lora.files import save_lora, written_by
from .distributed import Dist
from .state import TrainingState, save_state, state_dir_for

from .interface import TrainCallbacks

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)


def step_file_name(output_name: str, step: int) -> str:
    """The file name of the LoRA saved at ``step`` (the only place it is formatted)."""
    return f"{output_name}-step{step:06d}.safetensors"


def ema_name(output_name: str) -> str:
    """The output name of a run's EMA LoRA files (``<name>-ema``, ``<name>-ema-stepNNNNNN``)."""
    return f"{output_name}-ema"


def step_files(folder: str | Path, output_name: str) -> list[Path]:
    """The step saves named ``output_name`` in ``folder`` (of any run), sorted; [] if there is no folder."""
    folder = Path(folder)
    pattern = re.compile(re.escape(output_name) + r"-step\d{6}\.safetensors")
    return sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name)) if folder.is_dir() else []


class Checkpoints:
    """Step saves, pruning and states of one run; the trainer calls its ``on_*`` methods with itself.

    ``output_dir`` None: nothing is written. ``state_root``: where ``<name>-state/`` goes (default:
    ``output_dir``).
    """

    def __init__(self, cfg: TrainConfig, output_dir: Path | None, state_root: Path | None, overwrite: bool,
                 dist: Dist, callbacks: TrainCallbacks):
        self.cfg, self.output_dir, self.overwrite, self.dist, self.cb = cfg, output_dir, overwrite, dist, callbacks
        self.state_folder = state_dir_for(state_root or output_dir, cfg.output_name) if output_dir else None
        self.saved: list[Path] = []  # the step saves of this run, in order
        self.state_dir: Path | None = None  # the last state saved

    # ---- events ------------------------------------------------------------------------------
    def on_step_end(self, trainer: Trainer) -> None:
        """Write the step save and/or state due at ``trainer.step``; none at the last step (the caller's)."""
        step, cfg = trainer.step, self.cfg
        if self.output_dir is None or step >= cfg.steps:  # the final LoRA is the caller's to save
            return
        if cfg.save_every and step % cfg.save_every == 0:
            self.saved.append(self.save_step(trainer))
        every = cfg.save_state_every or cfg.save_every
        if every and step % every == 0:
            self.save_state(trainer)

    def on_stop(self, trainer: Trainer) -> None:
        """Save a resumable state of a run stopped early (none if the run writes nothing or did no step)."""
        if self.output_dir is not None and trainer.step > 0:
            self.save_state(trainer)

    def on_crash(self, trainer: Trainer) -> None:
        """Keep a run that dies between steps resumable: its weights are those of the last finished step."""
        if self.output_dir is None or trainer.step == 0:
            return
        try:
            self.save_state(trainer)
            # The LoRA so far, usable at once (a step save already made is not repeated).
            if not self.step_path(trainer.step).exists():
                self.save_step(trainer)
        except Exception as save_error:  # noqa: BLE001 - never mask the original error
            # Not a second error report: the caller reports the original one and names the last
            # state that was saved (on_state_saved).
            log.debug("could not save a resumable state at step %d: %s", trainer.step, save_error, exc_info=True)

    # ---- files -------------------------------------------------------------------------------
    def step_path(self, step: int) -> Path:
        """Where the step save of ``step`` goes in ``output_dir`` (which must not be None)."""
        return self.output_dir / step_file_name(self.cfg.output_name, step)

    def ema_step_path(self, step: int) -> Path:
        """Where the EMA LoRA of ``step`` goes: ``<name>-ema-stepNNNNNN.safetensors``."""
        return self.output_dir / step_file_name(ema_name(self.cfg.output_name), step)

    def save_step(self, trainer: Trainer) -> Path:
        """The LoRA as of ``trainer.step`` beside the final file (and its EMA when the run keeps one); older step
        saves pruned to ``keep_last``."""
        step = trainer.step
        path = self.step_path(step)
        if self.dist.is_main:
            save_lora(path, trainer.extract(step), dtype=self.cfg.save_dtype,
                      overwrite=self.overwrite or written_by(path, trainer.run_id))
            if trainer.ema is not None:
                ema = self.ema_step_path(step)
                save_lora(ema, trainer.extract_ema(step), dtype=self.cfg.save_dtype,
                          overwrite=self.overwrite or written_by(ema, trainer.run_id))
            self.cb.on_save(path, step)
            self._prune(step, trainer.run_id)
        self.dist.barrier()
        return path

    def _prune(self, step: int, run_id: str) -> None:
        every, keep = self.cfg.save_every, self.cfg.keep_last
        if not keep or not every:
            return
        for s in list(range(every, step + 1, every))[:-keep]:
            for old in (self.step_path(s), self.ema_step_path(s)):
                if old.exists() and written_by(old, run_id):  # never another run's file
                    old.unlink()
                    log.debug("removed %s (keep_last=%d)", old, keep)

    def save_best(self, trainer: Trainer) -> Path | None:
        """``<name>-best.safetensors``: the LoRA at the lowest validation loss so far (``keep_best``), replaced as
        the run finds a lower one (never another run's file)."""
        if self.output_dir is None:
            return None
        path = self.output_dir / f"{self.cfg.output_name}-best.safetensors"
        if self.dist.is_main:
            save_lora(path, trainer.extract(trainer.step), dtype=self.cfg.save_dtype,
                      overwrite=self.overwrite or written_by(path, trainer.run_id))
            self.cb.on_save(path, trainer.step)
        self.dist.barrier()
        return path

    def save_state(self, trainer: Trainer) -> Path:
        """Everything the run needs to continue the same curve from ``trainer.step``: ``<name>-state/``."""
        if self.dist.is_main:
            fingerprint, class_fingerprint, validation_fingerprint = trainer.fingerprints()
            state = TrainingState(
                step=trainer.step, config=self.cfg.to_dict(), dataset_fingerprint=fingerprint,
                class_fingerprint=class_fingerprint, validation_fingerprint=validation_fingerprint,
                losses=list(trainer.losses),
                optimizer=trainer.optimizer.state_dict(), scheduler=trainer.scheduler.state_dict(),
                scaler=trainer.scaler.state_dict(), generator=trainer.gen_at_step,
                lora=trainer.lora_weights(trainer.step), run_id=trainer.run_id,
                ema=trainer.ema.state_dict() if trainer.ema is not None else None,
                validation=[list(v) for v in trainer.validation])
            save_state(self.state_folder, state)
            self.cb.on_state_saved(self.state_folder, trainer.step)
        self.dist.barrier()
        self.state_dir = self.state_folder
        return self.state_folder
