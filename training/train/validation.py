"""A deterministic validation loss, to see when a LoRA is learnt and when it starts to burn in.

Held-out images (``validation_split`` of the dataset, or a separate set) are denoised at fixed timesteps with fixed
noise, in eval mode, with the LoRA's current weights: every draw is made once, from its own generator, so the curve
depends on the weights only. Its U shape shows the best step (spacepxl's "demystifying SD fine-tuning"; kohya's
``docs/validation.md``; diffusion-pipe's timestep quantiles). It costs no draw of the training generator, so a resumed
run gives the same validation curve as an unbroken one.

Default timesteps: nine quantiles 0.1 .. 0.9 of the noise range (diffusion-pipe's): sigmas for flow models,
``round(q * (T - 1))`` for DDPM ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from typing import TYPE_CHECKING

import torch

from ..config import DatasetError, listing
from ..data.buckets import load_mask, load_pixels
from ..data.captions import trained_caption
from ..data.images import ImageRecord
from ..lora import network
from . import losses as L
from .schedules import add_noise, flow_add_noise, flow_target, target_for

if TYPE_CHECKING:
    from .trainer import Trainer

log = logging.getLogger(__name__)

DEFAULT_QUANTILES = tuple(round(0.1 * k, 1) for k in range(1, 10))


def split_validation(records: list[ImageRecord], share: float, seed: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(training, validation) records: ``share`` of the images held out (at least one), chosen by ``seed`` and never
    the only image of its concept folder, so every concept still trains. ``DatasetError`` when none can be held out."""
    if share <= 0:
        return list(records), []
    by_concept: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_concept[r.concept].append(i)
    candidates = [i for idx in by_concept.values() if len(idx) > 1 for i in idx]
    want = max(1, round(share * len(records)))

    def key(i: int) -> str:
        return hashlib.sha256(f"{seed}:{records[i].path or i}".encode()).hexdigest()

    held: set[int] = set()
    left = {c: len(idx) for c, idx in by_concept.items()}
    for i in sorted(candidates, key=key):
        if len(held) == want:
            break
        if left[records[i].concept] > 1:  # keep one image of each concept in training
            held.add(i)
            left[records[i].concept] -= 1
    if not held:
        raise DatasetError(f"validation_split={share} holds out no image: every concept folder has a single image "
                           f"({listing([r.name for r in records])}); add images, or give a separate validation set")
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


class Validator:
    """The fixed validation set of one run: latents, captions, noise and timesteps drawn once."""

    def __init__(self, trainer: Trainer, records: list[ImageRecord]):
        self.trainer, self.records = trainer, records
        cfg = trainer.cfg
        self.flow = trainer.prediction() == "flow"
        q = tuple(cfg.validation_timesteps) or DEFAULT_QUANTILES
        if self.flow:
            self.timesteps = torch.tensor(q, dtype=torch.float32)
        else:
            n = trainer.backend.alphas_cumprod().shape[0]
            self.timesteps = torch.tensor([round(v * (n - 1)) for v in q], dtype=torch.long)
        self.captions = [trained_caption(r.caption, trainer.dcfg) for r in records]
        self._latents: list[torch.Tensor] | None = None
        self._noise: list[torch.Tensor] = []
        self._masks: list[torch.Tensor | None] = []

    @torch.no_grad()
    def prepare(self) -> None:
        """Encode the images (unflipped) and draw their noise: once, before training, from a generator of its own."""
        be, dcfg = self.trainer.backend, self.trainer.dcfg
        gen = torch.Generator().manual_seed(self.trainer.cfg.seed + 0x5EED)
        self._latents = []
        for r in self.records:
            lat = be.encode_images(load_pixels(r, dcfg, flip=False)[0][None])[0]
            self._latents.append(lat)
            self._noise.append(torch.randn((len(self.timesteps), *lat.shape), generator=gen))
            self._masks.append(load_mask(r, dcfg, False, tuple(lat.shape[-2:])) if dcfg.masked_loss else None)

    @torch.no_grad()
    def loss(self) -> float:
        """The mean loss over every validation image and fixed timestep, with the LoRA as it is now (eval mode)."""
        if self._latents is None:
            self.prepare()
        tr = self.trainer
        be, cfg = tr.backend, tr.cfg
        roots = be.roots()
        network.eval_lora_dropout(roots)
        try:
            total, count = 0.0, 0
            alphas = None if self.flow else be.alphas_cumprod()
            for lat, noise, mask, caption in zip(self._latents, self._noise, self._masks, self.captions):
                k = len(self.timesteps)
                x0 = lat[None].expand(k, *lat.shape).to(be.device)
                n = noise.to(be.device)
                t = self.timesteps.to(be.device)
                if self.flow:
                    x_t, target = flow_add_noise(x0, n, t), flow_target(x0, n)
                else:
                    x_t = add_noise(x0, n, alphas, t)
                    target = target_for(tr.prediction(), x0, n, alphas, t)
                cond = tr.batches.cond([caption] * k, use_cache=cfg.cache_text_embeddings)
                use_amp = cfg.mixed_precision != "no"
                amp = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16
                with torch.autocast(be.device.type, dtype=amp, enabled=use_amp):
                    pred = be.predict(x_t, t, cond)
                m = None if mask is None else mask[None].expand(k, *mask.shape)
                total += float(L.per_sample_loss(pred, target, "mse", mask=m).sum())
                count += k
            return total / count
        finally:
            if cfg.dropout > 0:
                network.train_lora_dropout(roots)


def validate_on_step(trainer: Trainer) -> None:
    """The trainer's ``on_step_end`` event: every ``validation_every`` steps, at every step save and at the last
    step, the validation loss (and the EMA's, when the run keeps one) is recorded, reported, and the best step kept;
    ``validation_patience`` rises in a row stop the run."""
    v = trainer.validator
    if v is None:
        return
    cfg, step = trainer.cfg, trainer.step
    every = cfg.validation_every
    due = (every and step % every == 0) or (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps
    if not due:
        return
    loss = v.loss()
    ema_loss = None
    if trainer.ema is not None:
        with trainer.ema.swapped_in():
            ema_loss = v.loss()
    trainer.validation.append((step, loss) if ema_loss is None else (step, loss, ema_loss))
    best_step, best = trainer.best_validation()
    log.info("step %d: validation loss %.5f%s (best %.5f at step %d)", step, loss,
             f", EMA {ema_loss:.5f}" if ema_loss is not None else "", best, best_step)
    trainer.cb.on_validation(step, loss, best_step)
    if best_step == step and cfg.keep_best:
        trainer.checkpoints.save_best(trainer)
    patience = cfg.validation_patience
    if patience and len(trainer.validation) > patience:
        recent = [s for s, *_ in trainer.validation[-patience:]]
        if best_step not in recent:
            log.info("validation loss has not improved for %d validations (best %.5f at step %d): stopping",
                     patience, best, best_step)
            trainer.stop_requested = True


def best_of_saves(metadata: list[dict[str, str]]) -> list[bool]:
    """Which of these LoRA files (their metadata, e.g. a run's step saves on a LoRA Grid) is its run's best step:
    the step of the lowest validation loss of the longest curve a file of that run carries. Files without a
    validation curve are never marked."""
    curves: dict[str, list] = {}
    for md in metadata:
        try:
            curve = json.loads(md.get("lw_validation_loss") or "[]")
        except ValueError:
            continue
        run = md.get("lw_run_id", "")
        if curve and len(curve) > len(curves.get(run, [])):
            curves[run] = curve
    best = {run: min(curve, key=lambda v: v[1])[0] for run, curve in curves.items()}
    out = []
    for md in metadata:
        run = md.get("lw_run_id", "")
        out.append(run in best and md.get("lw_steps_done") == str(best[run]))
    return out
