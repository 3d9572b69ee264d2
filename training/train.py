"""The training loop, top to bottom.

    records + DatasetConfig + TrainConfig + Backend  ->  Trainer.run()  ->  TrainResult(LoraWeights, losses)

The loop never knows which host it runs in: it calls the backend for latents, conditioning and
predictions, and reports through ``TrainCallbacks``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import network
from .backend import Backend
from .config import TrainConfig
from .dataset import BucketBatchSampler, DatasetConfig, ImageDataset, ImageRecord, build_caption, load_pixels
from .lora_io import LoraWeights, save_lora
from .schedules import add_noise, make_lr_scheduler, target_for

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss became NaN); the message says what to change."""


class TrainCallbacks:
    """Hooks the host overrides: progress, stop requests, saved files."""

    def on_start(self, total_steps: int, trainable_params: int) -> None: ...

    def on_step(self, step: int, total: int, loss: float, lr: float) -> None: ...

    def should_stop(self) -> bool:
        return False

    def on_save(self, path: Path, step: int) -> None: ...


@dataclass
class TrainResult:
    lora: LoraWeights
    losses: list[float]  # one mean loss per optimizer step
    steps_done: int
    stopped_early: bool = False
    saved: list[Path] = field(default_factory=list)
    seconds: float = 0.0


class Trainer:
    def __init__(self, backend: Backend, records: list[ImageRecord], dataset_cfg: DatasetConfig,
                 cfg: TrainConfig, output_dir: str | Path | None = None,
                 callbacks: TrainCallbacks | None = None, metadata: dict[str, str] | None = None,
                 overwrite: bool = False):
        if not records:
            raise ValueError("the dataset has no images; check the folder and its extensions")
        self.dataset = ImageDataset(records, dataset_cfg)  # assigns buckets where missing
        self.records = self.dataset.records
        self.backend, self.dcfg, self.cfg = backend, dataset_cfg, cfg
        self.output_dir = Path(output_dir) if output_dir else None
        self.cb = callbacks or TrainCallbacks()
        self.extra_metadata = dict(metadata or {})
        self.overwrite = overwrite
        self.targets: list[network.LoraTarget] = []
        self._latents: dict[tuple[int, bool], torch.Tensor] = {}
        self._embeds: dict[str, Any] = {}

    # ---- data ----------------------------------------------------------------------------------
    def _micro_batches(self, sampler: BucketBatchSampler):
        """Endless (record indices, flips, captions) in the sampler's deterministic order.

        Flip and caption randomness depend only on (seed, epoch, dataset index), never on what ran
        before, so a resumed run draws exactly what an uninterrupted one would.
        """
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            for batch in sampler:
                idx, flips, captions = [], [], []
                for index in batch:
                    rng = random.Random(f"{self.cfg.seed}:{epoch}:{index}")
                    i = self.dataset.record_index(index)
                    idx.append(i)
                    flips.append(bool(self.dcfg.flip and rng.random() < 0.5))
                    captions.append(build_caption(self.records[i].caption, self.dcfg, rng))
                yield idx, flips, captions
            epoch += 1

    def _latents_for(self, idx: list[int], flips: list[bool]) -> torch.Tensor:
        dev = self.backend.device
        if self.cfg.cache_latents:
            missing = [(i, f) for i, f in zip(idx, flips) if (i, f) not in self._latents]
            if missing:
                px = torch.stack([load_pixels(self.records[i], self.dcfg, flip=f)[0] for i, f in missing])
                lat = self.backend.encode_images(px)
                for k, l in zip(missing, lat):
                    self._latents[k] = l
            return torch.stack([self._latents[(i, f)] for i, f in zip(idx, flips)]).to(dev)
        px = torch.stack([load_pixels(self.records[i], self.dcfg, flip=f)[0] for i, f in zip(idx, flips)])
        return self.backend.encode_images(px).to(dev)

    def _cond_for(self, captions: list[str]) -> Any:
        if self.cfg.train_text_encoder or not self.cfg.cache_text_embeddings:
            return self.backend.encode_prompts(captions)
        missing = sorted({c for c in captions if c not in self._embeds})
        if missing:
            with torch.no_grad():
                enc = self.backend.encode_prompts(missing)
            for j, c in enumerate(missing):
                self._embeds[c] = enc[j : j + 1].detach()
        return self.backend.cat_cond([self._embeds[c] for c in captions])

    # ---- the run -------------------------------------------------------------------------------
    def run(self, keep_injected: bool = False) -> TrainResult:
        cfg, be = self.cfg, self.backend
        t_start = self.started_at = time.time()
        roots = be.roots()
        self.targets = be.lora_targets(cfg.preset, cfg.train_text_encoder)
        if not self.targets:
            raise TrainingError(f"preset {cfg.preset!r} found no layers to train in this model")
        params = network.inject(roots, self.targets, cfg.rank, cfg.alpha,
                                conv_rank=cfg.effective_conv_rank, conv_alpha=cfg.effective_conv_alpha,
                                dropout=cfg.dropout, seed=cfg.seed)
        try:
            return self._loop(roots, params, t_start)
        finally:
            if not keep_injected:
                network.remove(roots)

    def _loop(self, roots, params, t_start) -> TrainResult:
        cfg, be = self.cfg, self.backend
        dev = be.device
        if cfg.dropout > 0:
            network.train_lora_dropout(roots)  # only LoRA dropout is active; the frozen base stays in eval
        if cfg.gradient_checkpointing:
            be.enable_gradient_checkpointing()

        te_names = {id(p) for c, r in roots.items() if c != "unet" for p in r.parameters() if p.requires_grad}
        unet_params = [p for p in params if id(p) not in te_names]
        te_params = [p for p in params if id(p) in te_names]
        te_lr = cfg.lr if cfg.text_encoder_lr is None else cfg.text_encoder_lr
        groups = [{"params": unet_params, "lr": cfg.lr}]
        if te_params and te_lr > 0:
            groups.append({"params": te_params, "lr": te_lr})
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                      weight_decay=cfg.weight_decay)
        scheduler = make_lr_scheduler(optimizer, cfg)
        use_amp = cfg.mixed_precision != "no"
        amp_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16
        scaler = torch.amp.GradScaler(dev.type, enabled=cfg.mixed_precision == "fp16" and dev.type == "cuda")

        alphas = be.alphas_cumprod()
        prediction = cfg.prediction_type or be.prediction_type
        n_train_t = alphas.shape[0]
        # One generator for noise and timesteps, on the CPU: the same seed gives the same run on any device.
        gen = torch.Generator().manual_seed(cfg.seed)
        sampler = BucketBatchSampler(self.records, cfg.batch_size, seed=cfg.seed, shuffle=True)
        batches = self._micro_batches(sampler)

        n_trainable = sum(p.numel() for p in params)
        self.cb.on_start(cfg.steps, n_trainable)
        log.info("training %d steps: %d LoRA modules, %d trainable parameters, %d images, device %s",
                 cfg.steps, len(self.targets), n_trainable, len(self.records), dev)
        losses: list[float] = []
        saved: list[Path] = []
        step, stopped = 0, False
        while step < cfg.steps:
            if self.cb.should_stop():
                stopped = True
                break
            step_loss = torch.zeros((), device=dev)
            for _ in range(cfg.grad_accum):
                idx, flips, captions = next(batches)
                with torch.no_grad():
                    x0 = self._latents_for(idx, flips)
                noise = torch.randn(x0.shape, generator=gen).to(dev)
                t = torch.randint(0, n_train_t, (x0.shape[0],), generator=gen).to(dev)
                x_t = add_noise(x0, noise, alphas, t)
                target = target_for(prediction, x0, noise, alphas, t)
                with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                    cond = self._cond_for(captions)
                    pred = be.predict(x_t, t, cond)
                # The loss in fp32 whatever the autocast dtype; divided so accumulated grads average.
                loss = torch.nn.functional.mse_loss(pred.float(), target.float())
                scaler.scale(loss / cfg.grad_accum).backward()
                step_loss += loss.detach() / cfg.grad_accum
            loss_value = float(step_loss)  # the one host sync per step
            if not math.isfinite(loss_value):
                optimizer.zero_grad(set_to_none=True)
                last = f"the last good save is {saved[-1]}" if saved else "no LoRA was saved yet"
                raise TrainingError(
                    f"the loss became {loss_value} at step {step + 1}; {last}. Lower the learning rate "
                    f"(now {cfg.lr:g}), use bf16 instead of fp16, or enable gradient clipping (max_grad_norm)."
                )
            if cfg.max_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss_value)
            log.debug("step %d/%d loss %.5f lr %.3g", step, cfg.steps, loss_value, lr)
            self.cb.on_step(step, cfg.steps, loss_value, lr)
            if cfg.save_every and self.output_dir and step % cfg.save_every == 0 and step < cfg.steps:
                path = self.save(self.output_dir / f"{cfg.output_name}-step{step:06d}.safetensors", step)
                saved.append(path)
        lora = self.extract(step)
        secs = time.time() - t_start
        log.info("trained %d/%d steps in %.1f s; loss %s", step, cfg.steps, secs,
                 f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "n/a")
        return TrainResult(lora=lora, losses=losses, steps_done=step, stopped_early=stopped, saved=saved,
                           seconds=secs)

    # ---- output --------------------------------------------------------------------------------
    def metadata(self, steps_done: int) -> dict[str, str]:
        from .metadata import training_metadata

        return training_metadata(self, steps_done)

    def extract(self, steps_done: int) -> LoraWeights:
        return network.extract(self.backend.roots(), self.targets, metadata=self.metadata(steps_done),
                               arch=self.backend.arch)

    def save(self, path: Path, steps_done: int) -> Path:
        path = save_lora(path, self.extract(steps_done), dtype=self.cfg.save_dtype, overwrite=self.overwrite)
        self.cb.on_save(path, steps_done)
        return path
