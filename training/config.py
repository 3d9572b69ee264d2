"""The configuration of a run: ``TrainConfig`` (how to train) and ``DatasetConfig`` (which images and
how they become training pairs). Frozen dataclasses, the single source of defaults.

Both validate the same way (:class:`Checks`): every field is checked, then one error lists every bad
value with its fix, so a form is corrected in one go rather than one field per attempt.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any
from .errors import LoraWorkbenchError

PRESETS = ("attn", "attn_ff", "all")
NETWORKS = ("lora", "loha", "lokr")  # plain LoRA (kohya), LyCORIS LoHa (Hadamard) and LoKr (Kronecker), via peft
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
PRECISIONS = ("no", "bf16", "fp16")
SAVE_DTYPES = ("fp16", "bf16", "fp32")
LOSSES = ("mse", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "snr", "exponential")
OPTIMIZER_NAMES = ("adamw", "adamw8bit", "prodigy", "sgd")
PREDICTIONS = (None, "epsilon", "v_prediction", "flow")
# How training timesteps are drawn. "default" is the model's own practice (Backend.timestep_sampling_default:
# uniform for SD, flux_shift for Flux dev and Chroma, logit_normal for schnell); DDPM models (epsilon,
# v_prediction) take default/uniform/logit_normal, flow models every one (see schedules.sample_flow_sigmas).
TIMESTEP_SAMPLINGS = ("default", "uniform", "logit_normal", "shift", "flux_shift", "qwen_shift")
DDPM_TIMESTEP_SAMPLINGS = ("default", "uniform", "logit_normal")
CAPTION_EXTENSIONS = (".txt", ".caption")  # caption sidecars the dataset reads, in this order
# The allowed values of each option that has a fixed set: validation below and the CLI's choices.
CHOICES = {"network": NETWORKS, "preset": PRESETS, "lr_scheduler": SCHEDULERS, "mixed_precision": PRECISIONS,
           "save_dtype": SAVE_DTYPES,
           "loss_type": LOSSES, "huber_schedule": HUBER_SCHEDULES, "optimizer": OPTIMIZER_NAMES,
           "prediction_type": PREDICTIONS, "timestep_sampling": TIMESTEP_SAMPLINGS}


class ConfigError(LoraWorkbenchError, ValueError):
    """A training option has a value the engine cannot use; the message names it and the fix."""


class DatasetError(LoraWorkbenchError, ValueError):
    """A bad dataset or dataset setting; the message names the problem, the files and the fix."""


def listing(names: list[str], limit: int = 10) -> str:
    """``a, b, c`` - at most ``limit`` names, then ``and N more``: file lists in error messages."""
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


def is_int(value: Any) -> bool:
    """An int that is not a bool (Python counts ``True`` as 1; a user does not mean a count by it)."""
    return isinstance(value, int) and not isinstance(value, bool)


class Checks:
    """The validation of one config: every problem collected, then one error that lists them all.

    ``need(ok, name, value, fix)`` notes ``name=value (fix)`` unless ``ok`` and returns ``ok``, so a check
    that needs a valid field can be skipped; ``raise_if_any()`` raises ``error("invalid <what>: ...")``.
    """

    def __init__(self, what: str, error: type[ValueError]) -> None:
        self.what, self.error, self.problems = what, error, []

    def need(self, ok: bool, name: str, value: Any, fix: str) -> bool:
        """Record ``name=value (fix)`` as a problem unless ``ok``; returns ``ok`` (skip checks that need it)."""
        if not ok:
            self.problems.append(f"{name}={value!r} ({fix})")
        return ok

    def raise_if_any(self) -> None:
        """Raise ``error`` listing every recorded problem; does nothing when there are none."""
        if self.problems:
            raise self.error(f"invalid {self.what}: " + "; ".join(self.problems))


# Options that older versions wrote into saved states and that are read and dropped: extra (always {}).
_RETIRED = ("extra",)


@dataclass(frozen=True)
class TrainConfig:
    """How to train: every option with its default; ``CHOICES`` holds the allowed values of the fixed sets."""

    # --- the LoRA network -------------------------------------------------------------------
    rank: int = 16  # LoRA rank (dim), >= 1; 4-64 is typical
    alpha: float = 16.0  # scale = alpha / rank, as in kohya and peft
    preset: str = "attn"  # attn: q,k,v,out | attn_ff: + feed-forward | all: every Linear and Conv (LoCon)
    conv_rank: int | None = None  # rank of conv layers with preset "all" (None: same as rank)
    conv_alpha: float | None = None  # alpha of conv layers with preset "all" (None: alpha scaled to conv_rank)
    dropout: float = 0.0  # LoRA dropout probability, in [0, 1)
    train_text_encoder: bool = False  # also train a LoRA on the CLIP text encoder(s)
    text_encoder_train_steps: int = 0  # freeze the text-encoder LoRA after N steps (0: train it throughout)
    use_dora: bool = False  # DoRA (weight-decomposed LoRA, peft use_dora)
    network: str = "lora"  # lora, or LyCORIS loha (Hadamard product) / lokr (Kronecker product), in LyCORIS keys

    # --- optimisation -------------------------------------------------------------------------
    steps: int = 500  # optimizer steps
    batch_size: int = 1  # images per step (per process)
    grad_accum: int = 1  # micro-batches accumulated into one optimizer step
    lr: float = 1e-4  # learning rate (the UNet LoRA's), > 0
    text_encoder_lr: float | None = None  # None: same as lr
    lr_scheduler: str = "constant"  # learning-rate schedule
    warmup_steps: int = 0  # steps of linear warm-up, 0..steps
    weight_decay: float = 1e-2  # AdamW weight decay
    adam_betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas (two numbers)
    adam_eps: float = 1e-8  # AdamW epsilon
    max_grad_norm: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.0  # EMA of the LoRA weights, saved beside each LoRA as <name>-ema (0: off; 0.999 typical)
    ema_start_step: int = 0  # the EMA follows the weights until this step, then averages
    ema_every: int = 1  # fold the weights into the EMA every N steps
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes) | prodigy (prodigyopt) | sgd
    optimizer_args: dict[str, Any] = field(default_factory=dict)  # e.g. {"d_coef": 1.0} for prodigy

    # --- diffusion ----------------------------------------------------------------------------
    prediction_type: str | None = None  # None: what the base model says
    loss_type: str = "mse"  # mse | l1 | huber | smooth_l1
    huber_c: float = 0.1  # Huber threshold (huber / smooth_l1 losses), > 0
    huber_schedule: str = "snr"  # constant | snr | exponential (kohya's schedules for the Huber threshold)
    min_snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (5 is the paper's value; DDPM models only)
    timestep_sampling: str = "default"  # default (the model's practice) | uniform | logit_normal | shift | flux_shift
    logit_mean: float = 0.0  # mean of the logit-normal draw (logit_normal, shift, flux_shift)
    logit_std: float = 1.0  # std of the logit-normal draw, > 0
    flow_shift: float | None = None  # shift of timestep_sampling "shift" (None: the model's own, e.g. 3.0 for SD3)
    noise_offset: float = 0.0  # per-channel offset noise: lets the model learn very dark/bright images
    pyramid_noise_iterations: int = 0  # multi-resolution noise, off by default
    pyramid_noise_discount: float = 0.4  # weight of each coarser noise level, in (0, 1)

    # --- DreamBooth prior preservation -------------------------------------------------------------
    prior_loss_weight: float = 1.0  # weight of the class-image loss when class images are given
    num_class_images: int = 0  # how many class images the run needs (0: use what is given)

    # --- precision and memory -----------------------------------------------------------------
    mixed_precision: str = "no"  # autocast dtype for the frozen model; LoRA weights stay fp32
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower steps
    cache_latents: bool = True  # encode every image once before training (needs no VAE during steps)
    cache_text_embeddings: bool = True  # ignored when the text encoder is trained

    # --- reproducibility and output -------------------------------------------------------------
    seed: int = 0  # seeds the data order, noise and timesteps: same seed, same run
    save_every: int = 0  # save a LoRA every N steps (0: only at the end)
    keep_last: int = 0  # keep only the K most recent step saves (0: keep all); the final LoRA is always kept
    save_state_every: int = 0  # save a resumable state every N steps (0: with each save_every, and on stop)
    save_dtype: str = "fp16"  # dtype of the saved LoRA files (states are always fp32)
    output_name: str = "lora"  # file name of the LoRA (<out>/<name>.safetensors), no path separators

    # --- validation ------------------------------------------------------------------------------
    validation_split: float = 0.0  # share of the images held out for the validation loss (0: none)
    validation_every: int = 0  # validation loss every N steps (and at every save and the last step; 0: only then)
    validation_timesteps: tuple[float, ...] = ()  # noise levels in (0, 1) it is measured at (): 0.1 .. 0.9
    keep_best: bool = False  # write <name>-best.safetensors at each new lowest validation loss
    validation_patience: int = 0  # stop after N validations in a row without a new best (0: never)

    # --- previews during training ----------------------------------------------------------------
    preview_every: int = 0  # render a preview image every N steps (0: never)
    preview_prompt: str = ""  # default: the first training caption
    preview_steps: int = 20  # sampling steps of a preview image, >= 1
    preview_seed: int = 0  # seed of the preview image (the same each time, to compare)

    def __post_init__(self) -> None:
        check = Checks("training option", ConfigError)
        for name, allowed in CHOICES.items():
            check.need(getattr(self, name) in allowed, name, getattr(self, name),
                       f"choose one of {', '.join(str(a) for a in allowed)}")
        check.need(isinstance(self.rank, int) and self.rank >= 1, "rank", self.rank,
                   "use a whole number >= 1; 4-64 is typical")
        check.need(self.conv_rank is None or self.conv_rank >= 1, "conv_rank", self.conv_rank,
                   "use a whole number >= 1, or None to follow rank")
        check.need(self.alpha > 0, "alpha", self.alpha, "use a positive number; alpha = rank gives scale 1")
        check.need(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "use a probability in [0, 1)")
        lycoris = self.network in NETWORKS and self.network != "lora"
        check.need(not (lycoris and self.use_dora), "use_dora", self.use_dora,
                   f"DoRA is a LoRA variant; network={self.network!r} cannot use it: turn use_dora off or use "
                   "network='lora'")
        check.need(not (lycoris and self.dropout), "dropout", self.dropout,
                   f"LoRA dropout acts on LoRA's down projection, which network={self.network!r} has not: set "
                   "dropout to 0 or use network='lora'")
        steps_ok = check.need(isinstance(self.steps, int) and self.steps >= 1, "steps", self.steps,
                              "train for at least 1 step")
        check.need(self.batch_size >= 1, "batch_size", self.batch_size, "use 1 or more")
        check.need(self.grad_accum >= 1, "grad_accum", self.grad_accum, "use 1 or more")
        check.need(self.lr > 0, "lr", self.lr, "use a positive learning rate such as 1e-4")
        check.need(self.text_encoder_lr is None or self.text_encoder_lr >= 0, "text_encoder_lr",
                   self.text_encoder_lr, "use a learning rate >= 0, or None to follow lr")
        check.need(self.warmup_steps >= 0 and (not steps_ok or self.warmup_steps <= self.steps), "warmup_steps",
                   self.warmup_steps, f"use 0..steps ({self.steps})")
        check.need(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm,
                   "use 0 (off) or a positive norm such as 1.0")
        check.need(0.0 <= self.ema_decay < 1.0, "ema_decay", self.ema_decay,
                   "use 0 (off) or a decay in (0, 1) such as 0.999")
        check.need(isinstance(self.ema_start_step, int) and self.ema_start_step >= 0, "ema_start_step",
                   self.ema_start_step, "use a step number >= 0")
        check.need(isinstance(self.ema_every, int) and self.ema_every >= 1, "ema_every", self.ema_every,
                   "use 1 or more")
        check.need(0.0 <= self.validation_split < 1.0, "validation_split", self.validation_split,
                   "use a share in [0, 1) such as 0.1 (0: no validation images)")
        check.need(isinstance(self.validation_every, int) and self.validation_every >= 0, "validation_every",
                   self.validation_every, "use 0 or a number of steps")
        check.need(all(0.0 < float(v) < 1.0 for v in self.validation_timesteps), "validation_timesteps",
                   self.validation_timesteps, "use noise levels strictly between 0 and 1, e.g. 0.25 0.5 0.75")
        check.need(isinstance(self.validation_patience, int) and self.validation_patience >= 0, "validation_patience",
                   self.validation_patience, "use 0 (never stop early) or a number of validations")
        check.need(self.huber_c > 0, "huber_c", self.huber_c, "use a positive threshold such as 0.1")
        check.need(self.min_snr_gamma is None or self.min_snr_gamma >= 0, "min_snr_gamma", self.min_snr_gamma,
                   "use None (off) or a positive gamma such as 5")
        flow = self.prediction_type == "flow"
        ddpm = self.prediction_type in ("epsilon", "v_prediction")
        check.need(not (flow and self.min_snr_gamma), "min_snr_gamma", self.min_snr_gamma,
                   "Min-SNR weighting needs a DDPM noise schedule; flow models have none: use None")
        check.need(not (ddpm and self.timestep_sampling not in DDPM_TIMESTEP_SAMPLINGS), "timestep_sampling",
                   self.timestep_sampling, f"{self.prediction_type} models take one of "
                   f"{', '.join(DDPM_TIMESTEP_SAMPLINGS)}; shift, flux_shift and qwen_shift are for flow models")
        check.need(isinstance(self.logit_mean, (int, float)) and math.isfinite(self.logit_mean), "logit_mean",
                   self.logit_mean, "use a finite number; 0.0 centres the draws on sigma 0.5")
        check.need(isinstance(self.logit_std, (int, float)) and math.isfinite(self.logit_std) and self.logit_std > 0,
                   "logit_std", self.logit_std, "use a positive number; 1.0 is SD3's")
        check.need(self.flow_shift is None or (isinstance(self.flow_shift, (int, float))
                                               and math.isfinite(self.flow_shift) and self.flow_shift > 0),
                   "flow_shift", self.flow_shift, "use None (the model's own shift) or a positive number such "
                   "as 3.0; 1.0 is no shift")
        check.need(self.noise_offset >= 0, "noise_offset", self.noise_offset,
                   "use 0 (off) or a small value such as 0.05")
        check.need(self.pyramid_noise_iterations >= 0 and 0 < self.pyramid_noise_discount < 1, "pyramid_noise",
                   (self.pyramid_noise_iterations, self.pyramid_noise_discount),
                   "use iterations >= 0 and a discount in (0, 1), e.g. 6 and 0.4")
        check.need(self.prior_loss_weight >= 0, "prior_loss_weight", self.prior_loss_weight,
                   "use a weight >= 0; 1.0 is DreamBooth's")
        check.need(self.num_class_images >= 0, "num_class_images", self.num_class_images,
                   "use 0 or a count of class images")
        check.need(self.text_encoder_train_steps >= 0, "text_encoder_train_steps", self.text_encoder_train_steps,
                   "use 0 (all steps) or a step count")
        check.need(self.keep_last >= 0 and self.save_state_every >= 0, "keep_last/save_state_every",
                   (self.keep_last, self.save_state_every), "use 0 or more")
        check.need(self.preview_every >= 0 and self.preview_steps >= 1, "preview_every/preview_steps",
                   (self.preview_every, self.preview_steps), "use preview_every >= 0 (0: off) and preview_steps >= 1")
        check.need(self.save_every >= 0, "save_every", self.save_every, "use 0 (only the final save) or a step count")
        check.need(bool(self.output_name) and not any(c in self.output_name for c in '/\\:*?"<>|'), "output_name",
                   self.output_name, "use a plain file name without path separators")
        check.raise_if_any()

    @property
    def effective_conv_rank(self) -> int:
        """The rank of conv modules: ``conv_rank``, or ``rank`` when that is None (or 0)."""
        return self.conv_rank or self.rank

    @property
    def effective_conv_alpha(self) -> float:
        """``conv_alpha``, or when unset the alpha that keeps conv modules at the same ``alpha / rank`` scale."""
        return self.conv_alpha if self.conv_alpha is not None else self.alpha * self.effective_conv_rank / self.rank

    def to_dict(self) -> dict[str, Any]:
        """Every field as a plain dict (a deep copy); :meth:`from_dict` reads it back."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON with sorted keys, so equal configs give equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """A config from ``to_dict()`` output (a saved state's or metadata's); an unknown key is an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - set(_RETIRED))
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; known options: {sorted(names)}")
        d = {k: v for k, v in d.items() if k not in _RETIRED}
        if "adam_betas" in d:
            d["adam_betas"] = tuple(d["adam_betas"])
        return cls(**d)



def default_min_bucket_side(resolution: Any, step: Any) -> Any:
    """Half the resolution on the bucket grid, at most 256 (256 at 512 px and above, as kohya)."""
    if not all(is_int(v) and v > 0 for v in (resolution, step)):
        return resolution  # reported as an invalid setting by DatasetConfig
    return max(step, min(256, resolution // 2) // step * step)


@dataclass(frozen=True)
class DatasetConfig:
    """Where the images are and how they become (pixels, caption) training pairs."""

    path: str
    trigger: str = ""  # trigger word: replaces [trigger] in captions, else put first unless already there
    caption_extensions: tuple = CAPTION_EXTENSIONS  # caption sidecar extensions, the first found is read
    default_caption: str = ""  # used when an image has no caption sidecar
    repeats: int = 1  # for images not inside an ``N_concept`` sub-folder
    shuffle_tags: bool = False  # shuffle the caption's comma-separated tags each time an image is seen
    keep_tokens: int = 0  # first K caption tags never shuffled (a prefixed trigger is kept on top)
    caption_dropout: float = 0.0  # probability that the whole caption (trigger too) becomes ""
    tag_separator: str = ","  # what separates tags in a caption
    resolution: int = 512  # bucket area is resolution**2
    bucket_step: int = 64  # bucket sides are multiples of this (64 for SD; resolution and sides too)
    # The smallest bucket side, also the smallest image side accepted (buckets on or off). None: half
    # the resolution, at most 256 (kohya's default), so small resolutions keep aspect-ratio buckets.
    min_bucket_side: int | None = None  # smallest bucket side and image side (default: resolution/2, at most 256)
    max_bucket_side: int = 1024  # largest bucket side
    enable_buckets: bool = True  # off: every image becomes a resolution x resolution square
    flip: bool = False  # random horizontal flip augmentation
    # Images with neither a mask file nor transparency count everywhere.
    masked_loss: bool = False  # weigh the loss by <name>_mask.png (white = learn, black = ignore) or the alpha channel

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", os.fspath(self.path))
        object.__setattr__(self, "caption_extensions", tuple(self.caption_extensions))
        if self.min_bucket_side is None:
            object.__setattr__(self, "min_bucket_side", default_min_bucket_side(self.resolution, self.bucket_step))
        check = Checks("dataset setting", DatasetError)

        def need(ok: bool, name: str, allowed: str) -> bool:
            return check.need(ok, name, getattr(self, name), f"allowed: {allowed}")

        need(is_int(self.repeats) and self.repeats >= 1, "repeats", "an integer >= 1")
        need(is_int(self.keep_tokens) and self.keep_tokens >= 0, "keep_tokens", "an integer >= 0")
        need(isinstance(self.caption_dropout, (int, float)) and 0.0 <= self.caption_dropout <= 1.0,
             "caption_dropout", "a number from 0 to 1")
        need(isinstance(self.tag_separator, str) and self.tag_separator.strip() != "",
             "tag_separator", "a non-blank string such as ','")
        exts = self.caption_extensions
        exts_ok = all(isinstance(e, str) and len(e) > 1 and e.startswith(".") for e in exts)
        need(exts_ok and len(exts) > 0, "caption_extensions", "extensions like ('.txt', '.caption')")
        if need(is_int(self.bucket_step) and self.bucket_step > 0, "bucket_step", "an integer > 0, usually 64"):
            multiple = f"a positive multiple of bucket_step={self.bucket_step}"
            for name in ("resolution", "min_bucket_side", "max_bucket_side"):
                v = getattr(self, name)
                need(is_int(v) and v > 0 and v % self.bucket_step == 0, name, multiple)
            if not check.problems:
                need(self.min_bucket_side <= self.max_bucket_side, "min_bucket_side",
                     f"<= max_bucket_side={self.max_bucket_side}")
                if self.enable_buckets:  # the square bucket must exist
                    need(self.min_bucket_side <= self.resolution <= self.max_bucket_side, "resolution",
                         f"from min_bucket_side={self.min_bucket_side} to max_bucket_side={self.max_bucket_side}")
        check.raise_if_any()
