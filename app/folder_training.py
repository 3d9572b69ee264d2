"""One call from a folder to a saved LoRA: validate early, load the model, train, save.

Shared by the CLI and the demo; everything that can be checked before a model loads is checked first.
"""

from __future__ import annotations

import dataclasses

import logging
import shutil
from pathlib import Path
from typing import Callable

from ..training.model.archs import distilled_notice
from ..training.model.backend import Backend
from ..training.config import DatasetConfig, TrainConfig, listing
from ..training.data.dataset import class_config, scan_folder
from ..training.train.checkpoints import ema_name, step_files
from ..training.train.distributed import Dist
from ..training.train.state import read_state_info, state_dir_for
from ..training.train.trainer import RunOptions, TrainCallbacks, TrainData, Trainer, TrainResult

log = logging.getLogger(__name__)


class TqdmCallbacks(TrainCallbacks):
    """Progress bars for terminals (training with its loss, and each long preparation), remembering
    the last state and LoRA saved so an interrupted or failed run can say where they are."""

    def __init__(self):
        self.bar = None
        self.task, self.task_bar = None, None
        self.initial = 0
        self.step, self.total = 0, 0
        self.last_state: tuple[Path, int] | None = None
        self.last_lora: tuple[Path, int] | None = None
        self.preview_dir: Path | None = None  # where previews go as stepNNNNNN.png (step 0: the baseline)
        self.validation: dict = {}  # the last validation loss and best step, for the progress bar

    def on_progress(self, task, done, total):
        from tqdm.auto import tqdm

        if task != self.task or self.task_bar is None:
            self._close_task()
            self.task, self.task_bar = task, tqdm(total=total, desc=task)
        self.task_bar.update(done - self.task_bar.n)
        if done >= total:
            self._close_task()
            self.task = None  # finished; an unfinished one stays named for the message of an interrupt

    def _close_task(self):
        if self.task_bar is not None:
            self.task_bar.close()
        self.task_bar = None

    def on_resume(self, step):
        self.initial = self.step = step

    def on_start(self, total_steps, trainable_params):
        from tqdm.auto import tqdm

        self._close_task()
        self.task = None
        self.total = total_steps
        # A resumed run starts at its step, and its rate and ETA count only the steps it trains.
        self.bar = tqdm(total=total_steps, initial=self.initial, desc="training", unit="step")

    def on_step(self, step, total, loss, lr):
        self.step = step
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2g}", **self.validation)
        self.bar.update(step - self.bar.n)

    def on_validation(self, step, loss, best_step):
        self.validation = {"val": f"{loss:.4f}", "best": best_step}  # shown with every later step's loss

    def on_preview(self, step, images, prompt):
        if self.preview_dir is None:
            return
        import numpy as np
        from PIL import Image

        from ..training.fsutil import atomic_write

        image = Image.fromarray((images[0].clamp(0, 1).float().cpu().numpy() * 255).round().astype(np.uint8))
        path = atomic_write(self.preview_dir / f"step{step:06d}.png", lambda tmp: image.save(tmp, format="PNG"),
                            overwrite=True)  # the run's own folder (check_output refused another run's)
        log.info("preview %s%s", path, " (before training: the baseline)" if step == 0 else "")

    def on_save(self, path, step):
        self.last_lora = (Path(path), step)
        log.info("saved %s (step %d)", path, step)

    def on_state_saved(self, path, step):
        self.last_state = (Path(path), step)

    def close(self):
        self._close_task()
        if self.bar is not None:
            self.bar.close()


def previews_dir(out_dir: Path, name: str) -> Path:
    """Where the CLI writes a run's preview images: ``<out>/<name>-previews/stepNNNNNN.png``."""
    return Path(out_dir) / f"{name}-previews"


def check_output(out_dir: Path, name: str, overwrite: bool, need_bytes: int = 512 * 2**20,
                 resume: dict | None = None) -> Path:
    """The final LoRA path, after refusing (unless ``overwrite``) to touch any file another run wrote.

    A new run refuses an existing final file, step files and ``-state/`` of the same name. A resume
    (``resume``: :func:`state.read_state_info`) continues its own files only: it must keep the state's
    output name, and may replace only files carrying its run id. Also refuses a nearly full disk.
    Everything here reads file headers only, so it runs before any model loads.
    """
    from ..training.lora.files import written_by

    out_dir = Path(out_dir)
    path = out_dir / f"{name}.safetensors"
    run_id = resume.get("run_id") if resume else None
    if not overwrite:
        if resume and resume.get("output_name") and resume["output_name"] != name:
            raise FileExistsError(
                f"the state {resume['folder']} belongs to the run named {resume['output_name']!r}; a resume "
                f"continues its own files: leave out --output-name (or pass --output-name "
                f"{resume['output_name']}), or pass --overwrite to write its files as {name!r}")
        ema = out_dir / f"{ema_name(name)}.safetensors"  # an EMA run's files: refused whether or not this run keeps one
        theirs = [p for p in (path, ema) if p.exists() and not written_by(p, run_id)]
        theirs += [p for p in step_files(out_dir, name) + step_files(out_dir, ema_name(name))
                   if not written_by(p, run_id)]
        state = state_dir_for(out_dir, name)
        if state.exists() and not (resume and state.resolve() == Path(resume["folder"]).resolve()):
            theirs.append(state)
        previews = previews_dir(out_dir, name)
        if previews.is_dir() and any(previews.iterdir()) and not resume:  # a resume continues its own previews
            theirs.append(previews)
        if theirs:
            hint = f"; to continue that run use --resume {state}" if state in theirs else ""
            raise FileExistsError(
                f"{listing([str(p) for p in theirs], limit=5)} already exist{'s' if len(theirs) == 1 else ''} and "
                f"{'was' if len(theirs) == 1 else 'were'} not written by this run; pass another --output-name, "
                f"or --overwrite to replace {'it' if len(theirs) == 1 else 'them'}{hint}")
    out_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir).free
    if free < need_bytes:
        raise RuntimeError(f"only {free / 2**20:.0f} MiB free in {out_dir}; free at least "
                           f"{need_bytes / 2**20:.0f} MiB or choose another --out folder")
    return path


def _state_of_run(folder: Path, run_id: str) -> bool:
    try:
        return read_state_info(folder)["run_id"] == run_id
    except ValueError:  # absent, or not a state
        return False


def train_folder(dcfg: DatasetConfig, tcfg: TrainConfig, load_backend: Callable[[], Backend], out_dir: Path,
                 overwrite: bool = False, callbacks: TrainCallbacks | None = None,
                 class_dir: Path | None = None, class_prompt: str = "", resume_from: Path | None = None,
                 dist: Dist | None = None, keep_state: bool = False,
                 validation_dir: Path | None = None) -> tuple[TrainResult, Path | None]:
    """Train on ``dcfg.path`` and save ``out_dir/<output_name>.safetensors``.

    With ``class_dir`` + ``class_prompt`` the run uses prior preservation; when fewer than
    ``tcfg.num_class_images`` class images are there, the missing ones are generated with the
    base model first (diffusers backends) and kept for the next run. A run that finishes removes
    its ``-state/`` folder unless ``keep_state``; a stopped or failed one keeps it to resume.
    """
    dist = dist or Dist()
    records = scan_folder(dcfg)  # bad images fail here, before any model loads
    validation = scan_folder(dataclasses.replace(dcfg, path=str(validation_dir))) if validation_dir else None
    resume = read_state_info(resume_from) if resume_from is not None else None
    final = check_output(out_dir, tcfg.output_name, overwrite, resume=resume)
    if class_dir is not None and not class_prompt:
        raise ValueError("--class-dir needs --class-prompt (e.g. 'a photo of a dog'): the caption of the class images")
    cb = callbacks or (TqdmCallbacks() if dist.is_main else TrainCallbacks())
    if isinstance(cb, TqdmCallbacks) and cb.preview_dir is None:
        cb.preview_dir = previews_dir(out_dir, tcfg.output_name)
    try:
        backend = load_backend()
        distilled = distilled_notice(getattr(backend, "model_name", ""))
        if distilled:
            log.warning(distilled)
        class_records = None
        if class_dir is not None:
            from ..training.train.class_images import diffusers_renderer, existing_class_images, generate_class_images

            if len(existing_class_images(class_dir)) < tcfg.num_class_images:
                if not hasattr(backend, "unet"):  # the SD/SDXL diffusers pipelines render them
                    raise ValueError(f"{class_dir} has fewer than {tcfg.num_class_images} class images and this "
                                     "backend cannot generate them; add images or lower num_class_images")
                if dist.is_main:
                    generate_class_images(diffusers_renderer(backend, dcfg.resolution), class_prompt,
                                          tcfg.num_class_images, class_dir, seed=tcfg.seed,
                                          progress=lambda done, total: cb.on_progress("class images", done, total))
                dist.barrier()
            class_records = scan_folder(class_config(dcfg, class_prompt, str(class_dir)))
        trainer = Trainer(backend, TrainData(records, dcfg, class_records, class_prompt, validation), tcfg, cb,
                          RunOptions(output_dir=out_dir, resume_from=resume_from, overwrite=overwrite, dist=dist))
        result = trainer.run()
    finally:
        if isinstance(cb, TqdmCallbacks):
            cb.close()
    from ..training.lora.files import save_lora, written_by

    path = None
    if dist.is_main:
        path = save_lora(final, result.lora, dtype=tcfg.save_dtype,
                         overwrite=overwrite or written_by(final, trainer.run_id))
        if result.ema_lora is not None:  # the EMA of the weights beside it
            ema = final.with_name(f"{ema_name(tcfg.output_name)}{final.suffix}")
            save_lora(ema, result.ema_lora, dtype=tcfg.save_dtype,
                      overwrite=overwrite or written_by(ema, trainer.run_id))
        state = state_dir_for(out_dir, tcfg.output_name)
        if not keep_state and not result.stopped_early and _state_of_run(state, trainer.run_id):
            shutil.rmtree(state)
            log.info("removed %s: the run finished (keep_state / --keep-state keeps it)", state)
    dist.barrier()
    return result, path
