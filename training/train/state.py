"""Resumable training state: everything a stopped run needs to continue the same curve.

A state is a folder ``<name>-state/`` holding ``lora.safetensors`` (the LoRA in fp32, kohya naming)
and ``trainer.pt`` (optimizer, scheduler, grad-scaler and noise-generator states, the step, the
losses so far, the config and the dataset fingerprint). It is written to a temp folder and renamed
into place, so a crash mid-save leaves the previous state intact.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..errors import LoraWorkbenchError
from ..fsutil import umask_mode
from ..lora.files import LoraWeights, save_lora
from ..lora.formats import load_lora

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Options that define the network or the data order: a resumed run must use the same values.
MUST_MATCH = ("network", "rank", "alpha", "preset", "conv_rank", "conv_alpha", "train_text_encoder", "use_dora",
              "batch_size", "grad_accum", "seed", "optimizer", "prior_loss_weight", "ema_decay", "ema_start_step",
              "ema_every", "validation_split")
# Options the schedule depends on: changing them would not continue the same curve.
SCHEDULE = ("steps", "lr", "text_encoder_lr", "lr_scheduler", "warmup_steps")


class ResumeError(LoraWorkbenchError, ValueError):
    """The saved state cannot continue this run; the message lists what differs and how to fix it."""


@dataclass
class TrainingState:
    step: int
    config: dict[str, Any]
    dataset_fingerprint: str
    class_fingerprint: str | None
    losses: list[float]
    optimizer: dict
    scheduler: dict
    scaler: dict
    generator: torch.Tensor
    lora: LoraWeights
    run_id: str | None = None  # the run that wrote it: its LoRA files carry the same ``lw_run_id``
    ema: list[torch.Tensor] | None = None  # the EMA of the LoRA's parameters (``ema.LoraEma``), when the run keeps one
    validation: list = field(default_factory=list)  # (step, loss[, EMA loss]) of each validation so far
    validation_fingerprint: str | None = None  # the validation images (held out and separate), None without any


def state_dir_for(output_dir: str | os.PathLike, name: str) -> Path:
    """The state folder of run ``name``: ``<output_dir>/<name>-state`` (nothing is created)."""
    return Path(output_dir) / f"{name}-state"


def save_state(folder: Path, state: TrainingState) -> Path:
    """Write the state atomically: temp folder, then rename over the old one."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    os.chmod(tmp, umask_mode(directory=True))  # mkdtemp's 0700 would hide the state from other users
    try:
        save_lora(tmp / "lora.safetensors", state.lora, dtype="fp32")
        torch.save({
            "version": STATE_VERSION, "step": state.step, "config": state.config,
            "dataset_fingerprint": state.dataset_fingerprint, "class_fingerprint": state.class_fingerprint,
            "losses": state.losses, "optimizer": state.optimizer, "scheduler": state.scheduler,
            "scaler": state.scaler, "generator": state.generator, "run_id": state.run_id, "ema": state.ema,
            "validation": state.validation, "validation_fingerprint": state.validation_fingerprint,
        }, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps(
            {"step": state.step, "steps": state.config.get("steps"), "output_name": state.config.get("output_name"),
             "dataset_fingerprint": state.dataset_fingerprint, "run_id": state.run_id}, indent=1))
        old = None
        if folder.exists():
            old = folder.with_name(folder.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("saved resumable state at step %d to %s", state.step, folder)
    return folder


def _state_folder(folder: str | os.PathLike) -> Path:
    """The folder holding a complete state, or a ResumeError naming what to pass instead."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    if not (folder / "trainer.pt").is_file() or not (folder / "lora.safetensors").is_file():
        old = folder.with_name(folder.name + ".old")
        if (old / "trainer.pt").is_file():
            return old  # a crash between the two renames of save_state
        what = "does not exist" if not folder.exists() else "is not a training state (needs trainer.pt and " \
                                                              "lora.safetensors)"
        raise ResumeError(f"--resume {folder} {what}; pass the '<name>-state' folder that a run wrote beside "
                          "its LoRA files")
    return folder


def read_state_info(folder: str | os.PathLike) -> dict[str, Any]:
    """The state's step, steps, output_name and run_id from its small ``state.json``, without loading
    tensors: enough to check a resume before any model loads."""
    folder = _state_folder(folder)
    try:
        info = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = {}
    return {"folder": folder, "step": info.get("step"), "steps": info.get("steps"),
            "output_name": info.get("output_name"), "run_id": info.get("run_id")}


def load_state(folder: str | os.PathLike) -> TrainingState:
    """Read a state folder (or a file in it) on the CPU; ``ResumeError`` if it is missing or another version's."""
    folder = _state_folder(folder)
    d = torch.load(folder / "trainer.pt", map_location="cpu", weights_only=True)
    if d.get("version") != STATE_VERSION:
        raise ResumeError(f"{folder} was written by another version of the trainer (state version "
                          f"{d.get('version')}, this one reads {STATE_VERSION}); start a new run")
    return TrainingState(step=d["step"], config=d["config"], dataset_fingerprint=d["dataset_fingerprint"],
                         class_fingerprint=d["class_fingerprint"], losses=list(d["losses"]),
                         optimizer=d["optimizer"], scheduler=d["scheduler"], scaler=d["scaler"],
                         generator=d["generator"], lora=load_lora(folder / "lora.safetensors"),
                         run_id=d.get("run_id"), ema=d.get("ema"), validation=d.get("validation") or [],
                         validation_fingerprint=d.get("validation_fingerprint"))


def check_compatible(state: TrainingState, cfg: TrainConfig, dataset_fp: str, class_fp: str | None,
                     validation_fp: str | None, where: Path) -> None:
    """Raise ResumeError listing every difference that would break the continued curve."""
    problems = []
    saved = state.config
    for k in MUST_MATCH + SCHEDULE:
        if k in saved and saved[k] != getattr(cfg, k) and not (k == "steps" and cfg.steps > saved[k]
                                                                and cfg.lr_scheduler == "constant"):
            problems.append(f"{k}: saved {saved[k]!r}, now {getattr(cfg, k)!r}")
    if state.dataset_fingerprint != dataset_fp:
        problems.append("the training images or captions changed since the state was saved")
    if (state.class_fingerprint or None) != (class_fp or None):
        problems.append("the class (prior-preservation) images changed since the state was saved")
    if (state.validation_fingerprint or None) != (validation_fp or None):
        problems.append("the validation images changed since the state was saved (give the run the same validation "
                        "folder or Train LoRA's validation_dataset, or none if it had none): the validation curve "
                        "would not continue")
    if state.step >= cfg.steps:
        problems.append(f"the state is already at step {state.step} of {cfg.steps}; raise steps to train further "
                        "(with a constant learning rate) or start a new run")
    if problems:
        raise ResumeError(f"cannot resume from {where}:\n- " + "\n- ".join(problems) +
                          "\nUse the same settings and images as the saved run, or start a new run without resume.")
