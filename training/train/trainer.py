"""The training loop, top to bottom.

    records (+ class records) + DatasetConfig + TrainConfig + Backend
        -> Trainer.run() -> TrainResult(LoraWeights, losses)

The loop never knows which host it runs in: it calls the backend for latents, conditioning and
predictions, reports through ``TrainCallbacks``, and averages gradients through ``Dist``.
Every random draw is a pure function of (seed, position) or comes from one saved generator, so a
resumed run continues exactly the curve an uninterrupted one would have drawn.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import losses as L
from ..lora import network
from ..model.backend import Backend
from ..config import DatasetConfig, DatasetError, TrainConfig
from ..data.buckets import BucketBatchSampler, load_pixels, size_conditioning
from ..data.dataset import ImageDataset, dataset_fingerprint
from ..data.images import ImageRecord
from ..data.captions import build_caption
from .distributed import Dist
from ..interrupt import signals_held
from ..lora.files import LoraWeights, save_lora, written_by
from .optim import make_optimizer
from .schedules import add_noise, make_lr_scheduler, target_for
from .state import TrainingState, check_compatible, load_state, save_state, state_dir_for

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss became NaN); the message says what to change."""


class TrainCallbacks:
    """Hooks the host overrides: progress, stop requests, saved files."""

    def on_start(self, total_steps: int, trainable_params: int) -> None: ...

    def on_resume(self, step: int) -> None:
        """The run continues a saved state at ``step``: called before ``on_start``."""

    def on_step(self, step: int, total: int, loss: float, lr: float) -> None: ...

    def on_progress(self, task: str, done: int, total: int) -> None:
        """Progress of a long preparation ("class images", "caching latents"), before the first step."""

    def should_stop(self) -> bool:
        return False

    def on_save(self, path: Path, step: int) -> None: ...

    def on_state_saved(self, path: Path, step: int) -> None: ...

    def on_preview(self, step: int, images: torch.Tensor, prompt: str) -> None:
        """images: [B, H, W, 3] in 0..1, rendered by the model as trained so far."""

    def on_memory_estimate(self, estimate) -> None:
        """The run's expected peak memory (``memory.MemoryEstimate``), before any LoRA layer exists."""


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


@dataclass
class MicroBatch:
    idx: list[int]  # record indices (instance)
    flips: list[bool]
    captions: list[str]
    bucket: tuple[int, int]
    class_idx: list[int] = field(default_factory=list)


class Trainer:
    def __init__(self, backend: Backend, records: list[ImageRecord], dataset_cfg: DatasetConfig,
                 cfg: TrainConfig, output_dir: str | Path | None = None,
                 callbacks: TrainCallbacks | None = None, metadata: dict[str, str] | None = None,
                 overwrite: bool = False, class_records: list[ImageRecord] | None = None,
                 class_prompt: str = "", resume_from: str | Path | None = None, dist: Dist | None = None,
                 state_dir: str | Path | None = None):
        self.dataset = ImageDataset(records, dataset_cfg)  # assigns buckets where missing
        self.records = self.dataset.records
        self.backend, self.dcfg, self.cfg = backend, dataset_cfg, cfg
        self.output_dir = Path(output_dir) if output_dir else None
        # Resumable states go here (default: beside the LoRA files).
        self.state_root = Path(state_dir) if state_dir else self.output_dir
        self.cb = callbacks or TrainCallbacks()
        self.extra_metadata = dict(metadata or {})
        self.overwrite = overwrite
        self.dist = dist or Dist()
        self.class_records = list(class_records or [])
        self.class_prompt = class_prompt
        self.resume_from = Path(resume_from) if resume_from else None
        if cfg.num_class_images and len(self.class_records) < cfg.num_class_images:
            missing = cfg.num_class_images - len(self.class_records)
            raise DatasetError(
                f"prior preservation needs {cfg.num_class_images} class images but {len(self.class_records)} "
                f"were given: {missing} missing. Generate them with the base model (CLI: --class-prompt "
                f"'...' --num-class-images {cfg.num_class_images} --class-dir DIR) or lower num_class_images."
            )
        if self.class_records and not class_prompt and not all(r.caption for r in self.class_records):
            raise DatasetError("class images need a class prompt (e.g. 'a photo of a dog'): pass class_prompt "
                               "or give every class image a caption file")
        self.targets: list[network.LoraTarget] = []
        self._latents: dict[tuple, torch.Tensor] = {}
        self._embeds: dict[str, Any] = {}
        self.started_at: float | None = None
        # Names this run's files (``lw_run_id``): a resume may replace its own files, never another run's.
        self.run_id = uuid.uuid4().hex

    # ---- data ----------------------------------------------------------------------------------
    def _micro_batches(self):
        """Endless global micro-batches in a deterministic order.

        Flip and caption draws depend only on (seed, epoch, dataset index) and the class images on
        (seed, cycle), never on what ran before, so skipping k batches lands where a run that did
        them would be.
        """
        world = self.dist.world
        sampler = BucketBatchSampler(self.records, self.cfg.batch_size * world, seed=self.cfg.seed, shuffle=True)
        n_class, class_pos = len(self.class_records), 0
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            for batch in sampler:
                mb = MicroBatch([], [], [], self.records[self.dataset.record_index(batch[0])].bucket)
                for index in batch:
                    rng = random.Random(f"{self.cfg.seed}:{epoch}:{index}")
                    i = self.dataset.record_index(index)
                    mb.idx.append(i)
                    mb.flips.append(bool(self.dcfg.flip and rng.random() < 0.5))
                    mb.captions.append(build_caption(self.records[i].caption, self.dcfg, rng))
                for _ in batch if n_class else ():
                    cycle, k = divmod(class_pos, n_class)
                    order = list(range(n_class))
                    random.Random(f"{self.cfg.seed}:class:{cycle}").shuffle(order)
                    mb.class_idx.append(order[k])
                    class_pos += 1
                yield mb
            epoch += 1

    def _rank_slice(self, n: int) -> list[int]:
        """This rank's positions in a global batch of n (wrapping when n is not a multiple of world)."""
        b = self.cfg.batch_size
        if self.dist.world == 1:
            return list(range(n))
        return [(self.dist.rank * b + j) % n for j in range(b)]

    def _latent(self, key: tuple, record: ImageRecord, flip: bool) -> torch.Tensor:
        if self.cfg.cache_latents and key in self._latents:
            return self._latents[key]
        lat = self.backend.encode_images(load_pixels(record, self.dcfg, flip=flip)[0][None])[0]
        if self.cfg.cache_latents:
            self._latents[key] = lat
        return lat

    @torch.no_grad()
    def _precache_latents(self) -> None:
        flips = (False, True) if self.dcfg.flip else (False,)
        buckets = sorted({r.bucket for r in self.records}) if self.class_records else []
        total, done = len(self.records) * len(flips) + len(buckets) * len(self.class_records), 0
        for i, r in enumerate(self.records):
            for f in flips:
                self._latent(("i", i, f), r, f)
                done += 1
                self.cb.on_progress("caching latents", done, total)
        for bucket in buckets:
            for c, r in enumerate(self.class_records):
                self._latent(("c", c, bucket), dataclasses.replace(r, bucket=bucket), False)
                done += 1
                self.cb.on_progress("caching latents", done, total)

    def _batch_latents(self, mb: MicroBatch, pos: list[int]) -> torch.Tensor:
        lat = [self._latent(("i", mb.idx[p], mb.flips[p]), self.records[mb.idx[p]], mb.flips[p]) for p in pos]
        for p in pos if mb.class_idx else ():
            # Class images are fitted into the instance batch's bucket so both go through one forward.
            rec = dataclasses.replace(self.class_records[mb.class_idx[p]], bucket=mb.bucket)
            lat.append(self._latent(("c", mb.class_idx[p], mb.bucket), rec, False))
        return torch.stack(lat).to(self.backend.device)

    def _batch_sizes(self, mb: MicroBatch, pos: list[int]) -> list[dict]:
        """Each sample's size/crop conditioning (SDXL), in the order of ``_batch_latents``."""
        sizes = [size_conditioning(self.records[mb.idx[p]], mb.bucket) for p in pos]
        for p in pos if mb.class_idx else ():
            sizes.append(size_conditioning(self.class_records[mb.class_idx[p]], mb.bucket))
        return sizes

    def _cond_for(self, captions: list[str], use_cache: bool) -> Any:
        if not use_cache:
            return self.backend.encode_prompts(captions)
        missing = sorted({c for c in captions if c not in self._embeds})
        if missing:
            with torch.no_grad():
                enc = self.backend.encode_prompts(missing)
            for j, c in enumerate(missing):
                self._embeds[c] = enc[j : j + 1].detach()
        return self.backend.cat_cond([self._embeds[c] for c in captions])

    def _noise(self, gen: torch.Generator, shape: tuple, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and timesteps for a whole global batch, drawn on the CPU in a fixed order."""
        cfg = self.cfg
        noise = torch.randn(shape, generator=gen)
        if cfg.noise_offset:
            noise = L.apply_noise_offset(noise, cfg.noise_offset, gen)
        if cfg.pyramid_noise_iterations:
            noise = L.pyramid_noise_like(noise, gen, cfg.pyramid_noise_iterations, cfg.pyramid_noise_discount)
        t = torch.randint(0, self._n_train_t, (shape[0],), generator=gen)
        return noise.to(dev), t.to(dev)

    # ---- the run -------------------------------------------------------------------------------
    def run(self, keep_injected: bool = False) -> TrainResult:
        cfg, be = self.cfg, self.backend
        self.started_at = time.time()
        roots = be.roots()
        self.targets = be.lora_targets(cfg.preset, cfg.train_text_encoder)
        if not self.targets:
            raise TrainingError(f"preset {cfg.preset!r} found no layers to train in this model")
        estimate = self.memory_estimate()
        if estimate is not None:
            log.info("expected peak memory on %s: %s", be.device, estimate.summary())
            self.cb.on_memory_estimate(estimate)
        state = None
        if self.resume_from is not None:
            state = load_state(self.resume_from)
            self.run_id = state.run_id or self.run_id
            check_compatible(state, cfg, dataset_fingerprint(self.records),
                             dataset_fingerprint(self.class_records) if self.class_records else None,
                             self.resume_from)
        if cfg.cache_latents:
            # Encode every image before LoRA layers wrap the model: the VAE runs once, and a host that
            # offloads models (ComfyUI lowvram) does not shuffle the wrapped UNet around mid-training.
            self._precache_latents()
        params = network.inject(roots, self.targets, cfg.rank, cfg.alpha,
                                conv_rank=cfg.effective_conv_rank, conv_alpha=cfg.effective_conv_alpha,
                                dropout=cfg.dropout, use_dora=cfg.use_dora, seed=cfg.seed,
                                devices=be.compute_devices())
        try:
            if state is not None:
                network.load_into(roots, self.targets, state.lora)
            return self._loop(roots, params, state)
        finally:
            if not keep_injected:
                network.remove(roots)

    def _loop(self, roots, params, state: TrainingState | None) -> TrainResult:
        cfg, be, dist = self.cfg, self.backend, self.dist
        dev = be.device
        if cfg.dropout > 0:
            network.train_lora_dropout(roots)  # only LoRA dropout is active; the frozen base stays in eval
        if cfg.gradient_checkpointing:
            be.enable_gradient_checkpointing()

        te_ids = {id(p) for c, r in roots.items() if c != "unet" for p in r.parameters() if p.requires_grad}
        unet_params = [p for p in params if id(p) not in te_ids]
        te_params = [p for p in params if id(p) in te_ids]
        te_lr = cfg.lr if cfg.text_encoder_lr is None else cfg.text_encoder_lr
        groups = [{"params": unet_params, "lr": cfg.lr}]
        if te_params:
            groups.append({"params": te_params, "lr": te_lr})
            if te_lr == 0:
                for p in te_params:
                    p.requires_grad_(False)
        optimizer = make_optimizer(cfg.optimizer, groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   betas=cfg.adam_betas, eps=cfg.adam_eps, **cfg.optimizer_args)
        scheduler = make_lr_scheduler(optimizer, cfg)
        use_amp = cfg.mixed_precision != "no"
        amp_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16
        # fp16 activations (autocast fp16, or a base stored in fp16 as ComfyUI loads SD on GPUs) can
        # underflow small gradients: scale the loss there.
        base_dtype = getattr(be, "dtype", None) or getattr(be, "weight_dtype", None)
        fp16 = cfg.mixed_precision == "fp16" or base_dtype == torch.float16
        scaler = torch.amp.GradScaler(dev.type, enabled=fp16 and dev.type == "cuda")

        alphas = be.alphas_cumprod()
        prediction = cfg.prediction_type or be.prediction_type
        self._n_train_t = alphas.shape[0]
        # One generator for noise and timesteps, on the CPU: the same seed gives the same run on any device.
        gen = torch.Generator().manual_seed(cfg.seed)
        batches = self._micro_batches()

        step, losses, inst_losses, prior_losses = 0, [], [], []
        if state is not None:
            optimizer.load_state_dict(state.optimizer)
            scheduler.load_state_dict(state.scheduler)
            scaler.load_state_dict(state.scaler)
            gen.set_state(state.generator)
            step, losses = state.step, list(state.losses)
            for _ in range(step * cfg.grad_accum):
                next(batches)  # the data order is a pure function of position: skip what was done
            log.info("resumed from %s at step %d/%d", self.resume_from, step, cfg.steps)

        gen_at_step = gen.get_state()  # the generator as of the last finished step, for a state saved on a crash
        te_frozen = False

        def freeze_text_encoder():
            for p in te_params:
                p.requires_grad_(False)
                p.grad = None

        n_trainable = sum(p.numel() for p in params)
        if step:
            self.cb.on_resume(step)
        self.cb.on_start(cfg.steps, n_trainable)
        log.info("training %d steps: %d LoRA modules, %d trainable parameters, %d images%s, device %s%s",
                 cfg.steps, len(self.targets), n_trainable, len(self.records),
                 f" + {len(self.class_records)} class images" if self.class_records else "", dev,
                 f", {dist.world} processes" if dist.world > 1 else "")
        saved: list[Path] = []
        state_dir = None
        stopped = False
        has_prior = bool(self.class_records)
        try:
            while step < cfg.steps:
                if self.cb.should_stop():
                    stopped = True
                    break
                if te_params and cfg.text_encoder_train_steps and step >= cfg.text_encoder_train_steps \
                        and not te_frozen:
                    freeze_text_encoder()
                    te_frozen = True
                    log.info("text-encoder LoRA frozen after %d steps", step)
                te_trains = bool(te_params) and not te_frozen and te_lr > 0
                step_loss = torch.zeros((), device=dev)
                step_inst = torch.zeros((), device=dev)
                step_prior = torch.zeros((), device=dev)
                for _ in range(cfg.grad_accum):
                    mb = next(batches)
                    pos = self._rank_slice(len(mb.idx))
                    with torch.no_grad():
                        x0 = self._batch_latents(mb, pos)
                    n_inst = len(pos)
                    # Noise for the whole global batch (instance then class), then this rank's slice.
                    g_n = len(mb.idx) * (2 if has_prior else 1)
                    noise, t = self._noise(gen, (g_n, *x0.shape[1:]), dev)
                    sl = pos + ([len(mb.idx) + p for p in pos] if has_prior else [])
                    noise, t = noise[sl], t[sl]
                    x_t = add_noise(x0, noise, alphas, t)
                    target = target_for(prediction, x0, noise, alphas, t)
                    captions = [mb.captions[p] for p in pos]
                    if has_prior:
                        captions += [self.class_records[mb.class_idx[p]].caption or self.class_prompt for p in pos]
                    with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                        cache = cfg.cache_text_embeddings and not te_trains
                        cond = self._cond_for(captions, use_cache=cache)
                        cond = be.add_size_conditioning(cond, self._batch_sizes(mb, pos))
                        pred = be.predict(x_t, t, cond)
                    # The loss in fp32 whatever the autocast dtype.
                    huber_c = None
                    if cfg.loss_type in ("huber", "smooth_l1"):
                        huber_c = L.huber_c_for(t, self._n_train_t, cfg.huber_c, cfg.huber_schedule, alphas)
                    per = L.per_sample_loss(pred, target, cfg.loss_type, huber_c)
                    if cfg.min_snr_gamma:
                        per = per * L.min_snr_weights(alphas, t, cfg.min_snr_gamma, prediction)
                    if has_prior:
                        is_prior = torch.arange(per.shape[0], device=per.device) >= n_inst
                        loss, inst, prior = L.prior_preservation_loss(per, is_prior, cfg.prior_loss_weight)
                        step_inst += inst.detach() / cfg.grad_accum
                        step_prior += prior.detach() / cfg.grad_accum
                    else:
                        loss = per.mean()
                    # Divided so the accumulated gradients average over micro-batches.
                    scaler.scale(loss / cfg.grad_accum).backward()
                    step_loss += loss.detach() / cfg.grad_accum
                grads = [p.grad for p in params if p.grad is not None]
                dist.mean_(grads + [step_loss, step_inst, step_prior])
                loss_value = float(step_loss)  # the one host sync per step
                if not math.isfinite(loss_value):
                    optimizer.zero_grad(set_to_none=True)
                    last = f"the last good save is {saved[-1]}" if saved else "no LoRA was saved yet"
                    raise TrainingError(
                        f"the loss became {loss_value} at step {step + 1}; {last}. Lower the learning rate "
                        f"(now {cfg.lr:g}), use bf16 instead of fp16, or enable gradient clipping (max_grad_norm)."
                    )
                # A stop signal during forward/backward abandons the step (the weights are still those of
                # the last finished one); from here to the step count it waits, so a saved state never
                # holds half an update.
                with signals_held():
                    if cfg.max_grad_norm > 0:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    lr = scheduler.get_last_lr()[0]
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    gen_at_step = gen.get_state()
                    losses.append(loss_value)
                    if has_prior:
                        inst_losses.append(float(step_inst))
                        prior_losses.append(float(step_prior))
                log.debug("step %d/%d loss %.5f lr %.3g", step, cfg.steps, loss_value, lr)
                if self.output_dir and step < cfg.steps:
                    if cfg.save_every and step % cfg.save_every == 0:
                        saved.append(self._save_step(step))
                    every = cfg.save_state_every or cfg.save_every
                    if every and step % every == 0:
                        state_dir = self._save_state(step, losses, optimizer, scheduler, scaler, gen_at_step)
                self.cb.on_step(step, cfg.steps, loss_value, lr)
                if cfg.preview_every and (step % cfg.preview_every == 0 or step == cfg.steps) and dist.is_main:
                    self._preview(step)
        except BaseException as e:
            # Cancelled (KeyboardInterrupt, the host's interrupt) or crashed between steps: the weights
            # and optimizer are those of the last finished step, so keep them resumable.
            if not isinstance(e, TrainingError) and step > 0 and self.output_dir is not None:
                try:
                    self._save_state(step, losses, optimizer, scheduler, scaler, gen_at_step)
                    # The LoRA so far, usable at once (a step save already made is not repeated).
                    so_far = self.output_dir / f"{cfg.output_name}-step{step:06d}.safetensors"
                    if not so_far.exists():
                        self._save_step(step)
                except Exception as save_error:  # noqa: BLE001 - never mask the original error
                    # Not a second error report: the caller reports the original one and names the last
                    # state that was saved (on_state_saved).
                    log.debug("could not save a resumable state at step %d: %s", step, save_error, exc_info=True)
            raise
        if stopped and self.output_dir is not None and step > 0:
            state_dir = self._save_state(step, losses, optimizer, scheduler, scaler, gen_at_step)
        lora = self.extract(step)
        secs = time.time() - self.started_at
        log.info("trained %d/%d steps in %.1f s; loss %s", step, cfg.steps, secs,
                 f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "n/a")
        return TrainResult(lora=lora, losses=losses, steps_done=step, stopped_early=stopped, saved=saved,
                           state_dir=state_dir, seconds=secs, instance_losses=inst_losses,
                           prior_losses=prior_losses)

    def _preview(self, step: int) -> None:
        from .preview import sample_preview

        prompt = self.cfg.preview_prompt or build_caption(self.records[0].caption, self.dcfg, random.Random(0))
        bw, bh = self.records[0].bucket
        try:
            img = sample_preview(self.backend, prompt, seed=self.cfg.preview_seed, steps=self.cfg.preview_steps,
                                 width=bw, height=bh, latent_factor=self.backend.latent_factor,
                                 latent_channels=self.backend.latent_channels)
        except NotImplementedError:
            return
        self.cb.on_preview(step, img, prompt)

    def memory_estimate(self):
        """This run's expected peak memory (``memory.MemoryEstimate``), None if the backend cannot tell."""
        from .memory import estimate_for_run

        return estimate_for_run(self.backend, self.cfg, self.targets or self.backend.lora_targets(
            self.cfg.preset, self.cfg.train_text_encoder), [r.bucket for r in self.records], bool(self.class_records))

    # ---- output --------------------------------------------------------------------------------
    def metadata(self, steps_done: int) -> dict[str, str]:
        from ..lora.metadata import training_metadata

        return training_metadata(self, steps_done)

    def extract(self, steps_done: int) -> LoraWeights:
        return network.extract(self.backend.roots(), self.targets, metadata=self.metadata(steps_done),
                               arch=self.backend.arch)

    def _save_step(self, step: int) -> Path:
        path = self.output_dir / f"{self.cfg.output_name}-step{step:06d}.safetensors"
        if self.dist.is_main:
            save_lora(path, self.extract(step), dtype=self.cfg.save_dtype,
                      overwrite=self.overwrite or written_by(path, self.run_id))
            self.cb.on_save(path, step)
            self._prune_step_saves(step)
        self.dist.barrier()
        return path

    def _prune_step_saves(self, step: int) -> None:
        if not self.cfg.keep_last or not self.cfg.save_every:
            return
        every = self.cfg.save_every
        done = [s for s in range(every, step + 1, every)]
        for s in done[: -self.cfg.keep_last]:
            old = self.output_dir / f"{self.cfg.output_name}-step{s:06d}.safetensors"
            if old.exists() and written_by(old, self.run_id):  # never another run's file
                old.unlink()
                log.debug("removed %s (keep_last=%d)", old, self.cfg.keep_last)

    def _save_state(self, step, losses, optimizer, scheduler, scaler, gen_state: torch.Tensor) -> Path:
        folder = state_dir_for(self.state_root, self.cfg.output_name)
        if self.dist.is_main:
            st = TrainingState(
                step=step, config=self.cfg.to_dict(), dataset_fingerprint=dataset_fingerprint(self.records),
                class_fingerprint=dataset_fingerprint(self.class_records) if self.class_records else None,
                losses=list(losses), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict(), generator=gen_state,
                lora=network.extract(self.backend.roots(), self.targets, arch=self.backend.arch),
                run_id=self.run_id)
            save_state(folder, st)
            self.cb.on_state_saved(folder, step)
        self.dist.barrier()
        return folder
