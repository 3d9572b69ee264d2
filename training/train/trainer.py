"""The training loop, top to bottom.

    TrainData (records + DatasetConfig + class records) + TrainConfig + Backend
        -> Trainer.run() -> TrainResult(LoraWeights, losses)

The loop never knows which host it runs in: it calls the backend for latents, conditioning and
predictions, reports through ``TrainCallbacks``, and averages gradients through ``Dist``. What it
leaves on disk (step saves, pruning, resumable states) is a ``Checkpoints`` object its events drive,
the way minGPT's ``trigger_callbacks`` does.
Every random draw is a pure function of (seed, position) or comes from one saved generator, so a
resumed run continues exactly the curve an uninterrupted one would have drawn.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from . import losses as L
from ..lora import network
from ..model.backend import Backend
from ..config import ConfigError, DatasetError, TrainConfig
from ..data.buckets import assign_buckets
from ..data.dataset import ImageDataset, dataset_fingerprint
from .batches import Batches
from .checkpoints import Checkpoints
from .ema import LoraEma
from .interface import RunOptions, TrainCallbacks, TrainData, TrainingError, TrainResult
from ..interrupt import signals_held
from ..lora.files import LoraWeights
from .optim import make_optimizer
from .preview import preview_on_step, preview_prompt
from .validation import Validator, split_validation, validate_on_step
from .schedules import (FLOW_SAMPLINGS, add_noise, flow_add_noise, flow_target, make_lr_scheduler,
                        sample_flow_sigmas, target_for)
from .state import ResumeError, TrainingState, check_compatible, load_state

if TYPE_CHECKING:
    from .memory import MemoryEstimate

log = logging.getLogger(__name__)


class Trainer:
    """One LoRA training run of ``cfg`` on ``data`` with ``backend``'s model; ``run()`` trains it.

    ``callbacks`` (the host's) hear progress and saves and may stop the run; ``options`` say where
    it writes and what it resumes (default: nothing written, a fresh single-process run). Fails at
    once (``DatasetError``) when prior preservation lacks class images or their prompt.
    """

    def __init__(self, backend: Backend, data: TrainData, cfg: TrainConfig, callbacks: TrainCallbacks | None = None,
                 options: RunOptions | None = None):
        options = options or RunOptions()
        train_records, held_out = split_validation(data.records, cfg.validation_split, cfg.seed)
        self.dataset = ImageDataset(train_records, data.config)  # assigns buckets where missing
        self.records = self.dataset.records
        self.backend, self.dcfg, self.cfg = backend, data.config, cfg
        self.cb = callbacks or TrainCallbacks()
        self.dist = options.dist
        self.class_records = list(data.class_records or [])
        self.class_prompt = data.class_prompt
        self.resume_from = Path(options.resume_from) if options.resume_from else None
        if cfg.num_class_images and len(self.class_records) < cfg.num_class_images:
            missing = cfg.num_class_images - len(self.class_records)
            raise DatasetError(
                f"prior preservation needs {cfg.num_class_images} class images but {len(self.class_records)} "
                f"were given: {missing} missing. Generate them with the base model (CLI: --class-prompt "
                f"'...' --num-class-images {cfg.num_class_images} --class-dir DIR) or lower num_class_images."
            )
        if self.class_records and not self.class_prompt and not all(r.caption for r in self.class_records):
            raise DatasetError("class images need a class prompt (e.g. 'a photo of a dog'): pass class_prompt "
                               "or give every class image a caption file")
        self.batches = Batches(backend, self.dataset, self.dcfg, self.class_records, self.class_prompt, cfg,
                               self.dist, self.cb)
        validation = [*held_out, *(data.validation_records or [])]
        if validation:
            validation = assign_buckets(validation, self.dcfg)
        self.validation_records = validation
        self.validator: Validator | None = None  # made by run() once the prediction type is known
        self.validation: list[tuple] = []  # (step, loss[, EMA loss]) per validation
        self.stop_requested = False  # set by an event (validation_patience) to end the run after this step
        self.targets: list[network.LoraTarget] = []
        self._estimate: tuple | None = None  # (memory estimate,) once computed
        self.prompts_precached = False  # set by run(): the captions and preview prompts were encoded up front
        self._fingerprints: tuple[str, str | None, str | None] | None = None
        self._extracted: tuple[int, LoraWeights] | None = None  # (step, LoRA read out at that step)
        self.started_at: float | None = None
        # Names this run's files (``lw_run_id``): a resume may replace its own files, never another run's.
        self.run_id = uuid.uuid4().hex
        # The loop's state, which the event callbacks read (minGPT style).
        self.step, self.losses, self.loss, self.lr = 0, [], math.nan, 0.0
        self.optimizer = self.scheduler = self.scaler = None
        self.ema: LoraEma | None = None  # the EMA of the LoRA weights (ema_decay), made with the optimizer
        self.gen_at_step: torch.Tensor | None = None  # the noise generator as of the last finished step
        output_dir = Path(options.output_dir) if options.output_dir else None
        self.checkpoints = Checkpoints(cfg, output_dir, Path(options.state_dir) if options.state_dir else None,
                                       options.overwrite, self.dist, self.cb)
        self.events: dict[str, list[Callable[[Trainer], None]]] = defaultdict(list)
        # After each step: files first, then the host hears of the step, then the preview (whose
        # image a host shows with that step's progress).
        # The validation first: a step save and state then carry that step's validation loss.
        self.add_callback("on_step_end", validate_on_step)
        self.add_callback("on_step_end", self.checkpoints.on_step_end)
        self.add_callback("on_step_end", Trainer._report_step)
        self.add_callback("on_step_end", preview_on_step)
        self.add_callback("on_train_start", preview_on_step)  # the baseline: the previews before step 1
        self.add_callback("on_stop", self.checkpoints.on_stop)
        self.add_callback("on_crash", self.checkpoints.on_crash)

    def add_callback(self, event: str, callback: Callable[[Trainer], None]) -> None:
        """Call ``callback(trainer)`` on ``event``: "on_step_end", "on_stop" or "on_crash"."""
        self.events[event].append(callback)

    def trigger_callbacks(self, event: str) -> None:
        """Call every callback added for ``event`` with this trainer, in the order added."""
        for callback in self.events.get(event, []):
            callback(self)

    def _noise(self, gen: torch.Generator, shape: tuple, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise, then timesteps (DDPM: integers; flow: sigmas in [0, 1]) for a whole global batch, drawn on
        the CPU in that fixed order from the one generator, so a resumed run draws what an unbroken one would."""
        cfg = self.cfg
        noise = torch.randn(shape, generator=gen)
        if cfg.noise_offset:
            noise = L.apply_noise_offset(noise, cfg.noise_offset, gen)
        if cfg.pyramid_noise_iterations:
            noise = L.pyramid_noise_like(noise, gen, cfg.pyramid_noise_iterations, cfg.pyramid_noise_discount)
        n, sampling = shape[0], self.timestep_sampling()
        if self.prediction() == "flow":
            patch = self.backend.patch_size
            t = sample_flow_sigmas(gen, n, sampling, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                                   shift=self.flow_shift(), image_tokens=(shape[-2] // patch) * (shape[-1] // patch))
        elif sampling == "logit_normal":
            # A logit-normal u in (0, 1) as a DDPM timestep: floor(u * T).
            u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=gen))
            t = (u * self._n_train_t).long().clamp(max=self._n_train_t - 1)
        else:  # uniform: exactly the draw of runs made before the other samplings existed
            t = torch.randint(0, self._n_train_t, (n,), generator=gen)
        return noise.to(dev), t.to(dev)

    # ---- the run -------------------------------------------------------------------------------
    def run(self, keep_injected: bool = False) -> TrainResult:
        """Train to ``cfg.steps`` (from the state in ``options.resume_from`` if given) and return the LoRA.

        Raises ``TrainingError`` when the loss stops being finite, ``ResumeError`` when the state does
        not fit this run. The LoRA layers are removed again unless ``keep_injected`` (tests that look
        at the trained model, or a host whose own context removes them).
        """
        cfg, be = self.cfg, self.backend
        self.started_at = time.time()
        roots = be.roots()
        if not self.lora_targets():
            raise TrainingError(f"preset {cfg.preset!r} found no layers to train in this model")
        self.check_objective()
        self.check_network()
        if self.validation_records:
            self.validator = Validator(self, self.validation_records)
        release = self._plan_text_encoder_release()
        self.prompts_precached = release is not None  # previews then read the cache (the encoders may be gone)
        estimate = self.memory_estimate()
        if estimate is not None:
            log.info("expected peak memory on %s: %s", be.device, estimate.summary())
            self.cb.on_memory_estimate(estimate)
        state = None
        if self.resume_from is not None:
            state = load_state(self.resume_from)
            self.run_id = state.run_id or self.run_id
            check_compatible(state, cfg, *self.fingerprints(), self.resume_from)
        if self.validator is not None:
            self.validator.prepare()  # with the VAE, before training: fixed latents and noise
        if cfg.cache_latents:
            # Encode every image before LoRA layers wrap the model: the VAE runs once, and a host that
            # offloads models (ComfyUI lowvram) does not shuffle the wrapped UNet around mid-training.
            self.batches.precache_latents()
        if release is not None:
            # Every prompt the run needs, encoded now; then the host may take the text encoders off the GPU.
            self.batches.precache_conds(release)
            if be.release_text_encoders():
                log.info("text encoders released after encoding %d prompts", len(release))
        # The one place LoRA weights are put on the devices the model computes on.
        params = network.inject(roots, self.targets, cfg.rank, cfg.alpha,
                                conv_rank=cfg.effective_conv_rank, conv_alpha=cfg.effective_conv_alpha,
                                dropout=cfg.dropout, use_dora=cfg.use_dora, seed=cfg.seed,
                                devices=be.compute_devices(), network=cfg.network)
        try:
            if state is not None:
                network.load_into(roots, self.targets, be.split_lora(state.lora))
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
        te_params = self._make_optimizer(roots, params)
        self.ema = LoraEma(params, cfg.ema_decay, cfg.ema_start_step, cfg.ema_every) if cfg.ema_decay else None
        use_amp = cfg.mixed_precision != "no"
        amp_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16
        self.scaler = self._grad_scaler()
        prediction = self.prediction()
        flow = prediction == "flow"
        # Flow models have no DDPM table: sigma in [0, 1] is their timestep.
        alphas = None if flow else be.alphas_cumprod()
        self._n_train_t = 0 if flow else alphas.shape[0]
        # One generator for noise and timesteps, on the CPU: the same seed gives the same run on any device.
        gen = torch.Generator().manual_seed(cfg.seed)
        batches = self.batches.micro_batches()
        self.step, self.losses, inst_losses, prior_losses = 0, [], [], []
        if state is not None:
            self._restore(state, gen, batches)
        self.gen_at_step = gen.get_state()  # as of the last finished step, for a state saved on a crash
        self._te_frozen = False
        n_trainable = sum(p.numel() for p in params)
        if self.step:
            self.cb.on_resume(self.step)
        self.cb.on_start(cfg.steps, n_trainable)
        if self.step == 0:
            self.trigger_callbacks("on_train_start")
        log.info("training %d steps: %d LoRA modules, %d trainable parameters, %d images%s, device %s%s",
                 cfg.steps, len(self.targets), n_trainable, len(self.records),
                 f" + {len(self.class_records)} class images" if self.class_records else "", dev,
                 f", {dist.world} processes" if dist.world > 1 else "")
        stopped = False
        has_prior = bool(self.class_records)
        try:
            while self.step < cfg.steps:
                if self.cb.should_stop() or self.stop_requested:
                    stopped = True
                    break
                te_trains = self._text_encoder_trains(te_params)
                step_loss = torch.zeros((), device=dev)
                step_inst = torch.zeros((), device=dev)
                step_prior = torch.zeros((), device=dev)
                for _ in range(cfg.grad_accum):
                    mb = next(batches)
                    pos = self.batches.rank_slice(len(mb.idx))
                    with torch.no_grad():
                        x0 = self.batches.latents(mb, pos)
                    # Noise for the whole global batch (instance then class), then this rank's slice.
                    g_n = len(mb.idx) * (2 if has_prior else 1)
                    noise, t = self._noise(gen, (g_n, *x0.shape[1:]), dev)
                    sl = pos + ([len(mb.idx) + p for p in pos] if has_prior else [])
                    noise, t = noise[sl], t[sl]
                    if flow:
                        x_t, target = flow_add_noise(x0, noise, t), flow_target(x0, noise)
                    else:
                        x_t = add_noise(x0, noise, alphas, t)
                        target = target_for(prediction, x0, noise, alphas, t)
                    with torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                        cache = cfg.cache_text_embeddings and not te_trains
                        cond = self.batches.cond(self.batches.captions(mb, pos), use_cache=cache)
                        cond = be.add_size_conditioning(cond, self.batches.sizes(mb, pos))
                        pred = be.predict(x_t, t, cond)
                    # The loss in fp32 whatever the autocast dtype.
                    huber_c = None
                    if cfg.loss_type in ("huber", "smooth_l1") and flow:
                        huber_c = L.huber_c_for_flow(t, cfg.huber_c, cfg.huber_schedule)
                    elif cfg.loss_type in ("huber", "smooth_l1"):
                        huber_c = L.huber_c_for(t, self._n_train_t, cfg.huber_c, cfg.huber_schedule, alphas)
                    mask = self.batches.masks(mb, pos, tuple(x0.shape[-2:]))
                    per = L.per_sample_loss(pred, target, cfg.loss_type, huber_c, mask)
                    if cfg.min_snr_gamma:  # DDPM only (check_objective)
                        per = per * L.min_snr_weights(alphas, t, cfg.min_snr_gamma, prediction)
                    if has_prior:
                        is_prior = torch.arange(per.shape[0], device=per.device) >= len(pos)
                        loss, inst, prior = L.prior_preservation_loss(per, is_prior, cfg.prior_loss_weight)
                        step_inst += inst.detach() / cfg.grad_accum
                        step_prior += prior.detach() / cfg.grad_accum
                    else:
                        loss = per.mean()
                    # Divided so the accumulated gradients average over micro-batches.
                    self.scaler.scale(loss / cfg.grad_accum).backward()
                    step_loss += loss.detach() / cfg.grad_accum
                grads = [p.grad for p in params if p.grad is not None]
                dist.mean_(grads + [step_loss, step_inst, step_prior])
                loss_value = float(step_loss)  # the one host sync per step
                if not math.isfinite(loss_value):
                    self.optimizer.zero_grad(set_to_none=True)
                    saved = self.checkpoints.saved
                    last = f"the last good save is {saved[-1]}" if saved else "no LoRA was saved yet"
                    raise TrainingError(
                        f"the loss became {loss_value} at step {self.step + 1}; {last}. Lower the learning rate "
                        f"(now {cfg.lr:g}), use bf16 instead of fp16, or enable gradient clipping (max_grad_norm)."
                    )
                # A stop signal during forward/backward abandons the step (the weights are still those of
                # the last finished one); from here to the step count it waits, so a saved state never
                # holds half an update.
                with signals_held():
                    if cfg.max_grad_norm > 0:
                        self.scaler.unscale_(self.optimizer)
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.lr = self.scheduler.get_last_lr()[0]
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    if self.ema is not None:
                        self.ema.update(self.step)
                    self.gen_at_step = gen.get_state()
                    self.loss = loss_value
                    self.losses.append(loss_value)
                    if has_prior:
                        inst_losses.append(float(step_inst))
                        prior_losses.append(float(step_prior))
                log.debug("step %d/%d loss %.5f lr %.3g", self.step, cfg.steps, loss_value, self.lr)
                self.trigger_callbacks("on_step_end")  # step saves and states, progress, previews
        except BaseException as e:
            # Cancelled (KeyboardInterrupt, the host's interrupt) or crashed between steps: the weights
            # and optimizer are those of the last finished step, so keep them resumable.
            if not isinstance(e, TrainingError):
                self.trigger_callbacks("on_crash")
            raise
        if stopped:
            self.trigger_callbacks("on_stop")
        lora = self.extract(self.step)
        ema_lora = self.extract_ema(self.step) if self.ema is not None else None
        secs = time.time() - self.started_at
        log.info("trained %d/%d steps in %.1f s; loss %s", self.step, cfg.steps, secs,
                 f"{self.losses[0]:.4f} -> {self.losses[-1]:.4f}" if self.losses else "n/a")
        return TrainResult(lora=lora, losses=self.losses, steps_done=self.step, stopped_early=stopped,
                           saved=self.checkpoints.saved, state_dir=self.checkpoints.state_dir, seconds=secs,
                           instance_losses=inst_losses, prior_losses=prior_losses, ema_lora=ema_lora,
                           validation=list(self.validation), best_step=self.best_validation()[0])

    # ---- the loop's set-up ---------------------------------------------------------------------
    @property
    def te_lr(self) -> float:
        """The text encoder's learning rate: ``text_encoder_lr``, or ``lr`` when that is None."""
        return self.cfg.lr if self.cfg.text_encoder_lr is None else self.cfg.text_encoder_lr

    def _make_optimizer(self, roots, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        """The optimizer (UNet and text-encoder LoRA in their own lr groups) and its lr schedule;
        returns the text-encoder LoRA parameters, frozen at once when their lr is 0."""
        cfg = self.cfg
        te_ids = {id(p) for c, r in roots.items() if c != "unet" for p in r.parameters() if p.requires_grad}
        te_params = [p for p in params if id(p) in te_ids]
        groups = [{"params": [p for p in params if id(p) not in te_ids], "lr": cfg.lr}]
        if te_params:
            groups.append({"params": te_params, "lr": self.te_lr})
            if self.te_lr == 0:
                for p in te_params:
                    p.requires_grad_(False)
        self.optimizer = make_optimizer(cfg.optimizer, groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                        betas=cfg.adam_betas, eps=cfg.adam_eps, **cfg.optimizer_args)
        self.scheduler = make_lr_scheduler(self.optimizer, cfg)
        return te_params

    def _grad_scaler(self) -> torch.amp.GradScaler:
        # fp16 activations (autocast fp16, or a base stored in fp16 as ComfyUI loads SD on GPUs) can
        # underflow small gradients: scale the loss there.
        be, dev = self.backend, self.backend.device
        base_dtype = getattr(be, "dtype", None) or getattr(be, "weight_dtype", None)
        fp16 = self.cfg.mixed_precision == "fp16" or base_dtype == torch.float16
        return torch.amp.GradScaler(dev.type, enabled=fp16 and dev.type == "cuda")

    def _restore(self, state: TrainingState, gen: torch.Generator, batches) -> None:
        """Continue where ``state`` stopped: optimizer, schedule, scaler, noise generator, data order."""
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.scaler.load_state_dict(state.scaler)
        gen.set_state(state.generator)
        self.validation = [tuple(v) for v in state.validation]
        if self.ema is not None:
            if state.ema is None:
                raise ResumeError(f"{self.resume_from} holds no EMA of the weights, but ema_decay is "
                                  f"{self.cfg.ema_decay}; resume with ema_decay 0 or start a new run")
            self.ema.load_state_dict(state.ema)
        self.step, self.losses = state.step, list(state.losses)
        for _ in range(self.step * self.cfg.grad_accum):
            next(batches)  # the data order is a pure function of position: skip what was done
        log.info("resumed from %s at step %d/%d", self.resume_from, self.step, self.cfg.steps)

    def _text_encoder_trains(self, te_params: list[torch.nn.Parameter]) -> bool:
        """Whether the text-encoder LoRA trains this step; frozen for good at ``text_encoder_train_steps``."""
        cfg = self.cfg
        if te_params and cfg.text_encoder_train_steps and self.step >= cfg.text_encoder_train_steps \
                and not self._te_frozen:
            for p in te_params:
                p.requires_grad_(False)
                p.grad = None
            self._te_frozen = True
            log.info("text-encoder LoRA frozen after %d steps", self.step)
        return bool(te_params) and not self._te_frozen and self.te_lr > 0

    # ---- after each step -----------------------------------------------------------------------
    def _report_step(self) -> None:
        self.cb.on_step(self.step, self.cfg.steps, self.loss, self.lr)

    # ---- facts about the run -------------------------------------------------------------------
    def lora_targets(self) -> list[network.LoraTarget]:
        """The layers this run trains (asked of the backend once)."""
        if not self.targets:
            self.targets = self.backend.lora_targets(self.cfg.preset, self.cfg.train_text_encoder)
        return self.targets

    def prediction(self) -> str:
        """What the model predicts in this run: ``cfg.prediction_type``, else the backend's
        ("epsilon", "v_prediction" or "flow")."""
        return self.cfg.prediction_type or self.backend.prediction_type

    def timestep_sampling(self) -> str:
        """The timestep sampling this run uses: ``cfg.timestep_sampling``, with "default" resolved to the
        backend's ``timestep_sampling_default`` (uniform for SD; Flux dev and Chroma flux_shift)."""
        sampling = self.cfg.timestep_sampling
        return self.backend.timestep_sampling_default if sampling == "default" else sampling

    def flow_shift(self) -> float:
        """The shift of timestep sampling "shift": ``cfg.flow_shift``, else the model's own (``backend.flow_shift``)."""
        return self.cfg.flow_shift if self.cfg.flow_shift is not None else self.backend.flow_shift

    def check_objective(self) -> None:
        """Raise ``ConfigError`` when an option does not fit the model's objective (checked at run start,
        before anything loads): a flow objective for a DDPM model or the reverse, Min-SNR with a flow model, a
        flow sampling with a DDPM model and the reverse."""
        cfg, prediction, sampling = self.cfg, self.prediction(), self.timestep_sampling()
        if (prediction == "flow") != (self.backend.prediction_type == "flow"):
            raise ConfigError(f"prediction_type={cfg.prediction_type!r} does not fit this model, which is trained as "
                              f"{self.backend.prediction_type!r}; leave prediction_type unset (None)")
        if prediction == "flow":
            if cfg.min_snr_gamma:
                raise ConfigError(f"min_snr_gamma={cfg.min_snr_gamma!r} does not apply to this flow-matching model "
                                  "(Min-SNR weighting needs a DDPM noise schedule); set min_snr_gamma to None")
            if sampling not in FLOW_SAMPLINGS:
                raise ConfigError(f"the model's default timestep sampling {sampling!r} is not a flow sampling; "
                                  f"set timestep_sampling to one of {', '.join(FLOW_SAMPLINGS)}")
        elif sampling not in ("uniform", "logit_normal"):
            raise ConfigError(f"timestep_sampling={sampling!r} is for flow-matching models, and this model predicts "
                              f"{prediction!r} with a DDPM schedule; use default, uniform or logit_normal")

    def check_network(self) -> None:
        """Raise ``ConfigError`` when this backend cannot save a LoHa / LoKr exactly (checked at run start, before
        anything trains): one that trains a fused layer's parts apart and joins them afterwards (the CLI's
        diffusers Flux, SD3, Z-Image, FLUX.2 backends: a joined Hadamard or Kronecker product is no LoHa / LoKr),
        or whose files are in diffusers' format (no LyCORIS keys)."""
        from ..lora.files import key_format

        network, be = self.cfg.network, self.backend
        if network == "lora":
            return
        if be.joins_split_layers():
            raise ConfigError(f"network={network!r} cannot be trained on this {be.arch} model from diffusers' "
                              "files: it trains the parts of fused layers (q / k / v) apart and joins them for the "
                              f"file, and a {network} of parts joins into no {network} of the fused layer. Use "
                              f"network='lora', or train the {network} in ComfyUI (Train LoRA), which trains the "
                              "fused layers themselves")
        if key_format(be.arch) == "diffusers":
            raise ConfigError(f"network={network!r}: {be.arch} LoRAs are saved in diffusers' format, which has no "
                              "LyCORIS keys; use network='lora' for this model")

    def _plan_text_encoder_release(self) -> list[str] | None:
        """The prompts to encode before the text encoders can leave (the captions and the preview's), or None
        when they must stay: the backend cannot release them, a text encoder trains, embeddings are not cached,
        or shuffled tags make the captions unbounded. A planned release takes them out of the estimate."""
        cfg, be = self.cfg, self.backend
        if not be.releases_text_encoders or cfg.train_text_encoder or not cfg.cache_text_embeddings:
            return None
        prompts = self.batches.fixed_captions()
        if prompts is None:
            log.info("text encoders stay loaded: shuffled tags make every step's caption new")
            return None
        if self.validator is not None:
            prompts += self.validator.captions
        if cfg.preview_every:
            prompts.append(preview_prompt(self))
            if be.prediction_type != "flow" or be.preview_guidance != 1:
                prompts.append("")  # the preview's negative prompt
        be.text_encoders_resident = False
        return list(dict.fromkeys(prompts))

    def memory_estimate(self) -> MemoryEstimate | None:
        """This run's expected peak memory (``memory.MemoryEstimate``), None if the backend cannot tell.

        Computed once: a host may ask before ``run()`` (to reserve memory), which then reports the same.
        """
        from .memory import estimate_for_run

        if self._estimate is None:
            self._estimate = (estimate_for_run(self.backend, self.cfg, self.lora_targets(),
                                               [r.bucket for r in self.records], bool(self.class_records)),)
        return self._estimate[0]

    def fingerprints(self) -> tuple[str, str | None, str | None]:
        """The instance, class and validation data fingerprints a state records and a resume checks."""
        if self._fingerprints is None:
            self._fingerprints = (dataset_fingerprint(self.records),
                                  dataset_fingerprint(self.class_records) if self.class_records else None,
                                  dataset_fingerprint(self.validation_records) if self.validation_records else None)
        return self._fingerprints

    # ---- output --------------------------------------------------------------------------------
    def metadata(self, steps_done: int) -> dict[str, str]:
        """The LoRA file's training metadata (kohya ``ss_*`` keys and ours) as of ``steps_done``."""
        from ..lora.metadata import training_metadata

        be = self.backend
        # The sampling actually used (lw_config holds cfg's "default"), and for flow models the shift.
        facts = {"timestep_sampling": self.timestep_sampling()}
        done = [v for v in self.validation if v[0] <= steps_done]
        if done:  # the validation curve so far and its best step (a step save carries the curve up to it)
            facts["validation_loss"] = [list(v) for v in done]
            facts["best_step"] = min(done, key=lambda v: v[1])[0]
        flow = self.prediction() == "flow"
        if flow:
            facts["flow_shift"] = self.flow_shift()
        return training_metadata(self.cfg, self.dcfg, self.records, arch=be.arch, steps_done=steps_done,
                                 model_name=be.model_name, model_prediction=be.prediction_type,
                                 class_records=self.class_records, class_prompt=self.class_prompt,
                                 started_at=self.started_at, run_id=self.run_id, extra=facts,
                                 variant=getattr(be, "variant", None), guidance_scale=getattr(be, "train_guidance", None),
                                 timestep_sampling=facts["timestep_sampling"] if flow else None)

    def lora_weights(self, step: int) -> LoraWeights:
        """The LoRA as trained at ``step``, without metadata; read out of the model once per step."""
        if self._extracted is None or self._extracted[0] != step:
            lora = network.extract(self.backend.roots(), self.targets, arch=self.backend.arch)
            self._extracted = (step, self.backend.finalize_lora(lora))
        return self._extracted[1]

    def best_validation(self) -> tuple[int | None, float]:
        """(step, loss) of the lowest validation loss so far; (None, nan) before the first validation."""
        if not self.validation:
            return None, math.nan
        step, loss, *_ = min(self.validation, key=lambda v: v[1])
        return step, loss

    def extract(self, steps_done: int) -> LoraWeights:
        """The LoRA as trained at ``steps_done``, with its file metadata."""
        return dataclasses.replace(self.lora_weights(steps_done), metadata=self.metadata(steps_done))

    def extract_ema(self, steps_done: int) -> LoraWeights:
        """The EMA of the LoRA weights as of ``steps_done`` (``ema_decay`` on), with its file metadata
        (``lw_ema``: the decay, start step and interval it was averaged with)."""
        with self.ema.swapped_in():
            lora = self.backend.finalize_lora(network.extract(self.backend.roots(), self.targets,
                                                              arch=self.backend.arch))
        metadata = self.metadata(steps_done)
        metadata["lw_ema"] = json.dumps({"decay": self.cfg.ema_decay, "start_step": self.cfg.ema_start_step,
                                         "every": self.cfg.ema_every})
        return dataclasses.replace(lora, metadata=metadata)
