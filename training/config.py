"""The training configuration: one frozen dataclass, the single source of defaults."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

PRESETS = ("attn", "attn_ff", "all")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
PRECISIONS = ("no", "bf16", "fp16")
SAVE_DTYPES = ("fp16", "bf16", "fp32")
LOSSES = ("mse", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "snr", "exponential")
OPTIMIZER_NAMES = ("adamw", "adamw8bit", "prodigy", "sgd")
PREDICTIONS = (None, "epsilon", "v_prediction")
# The allowed values of each option that has a fixed set: validation below and the CLI's choices.
CHOICES = {"preset": PRESETS, "lr_scheduler": SCHEDULERS, "mixed_precision": PRECISIONS, "save_dtype": SAVE_DTYPES,
           "loss_type": LOSSES, "huber_schedule": HUBER_SCHEDULES, "optimizer": OPTIMIZER_NAMES,
           "prediction_type": PREDICTIONS}


class ConfigError(ValueError):
    """A training option has a value the engine cannot use; the message names it and the fix."""


@dataclass(frozen=True)
class TrainConfig:
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
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes) | prodigy (prodigyopt) | sgd
    optimizer_args: dict[str, Any] = field(default_factory=dict)  # e.g. {"d_coef": 1.0} for prodigy

    # --- diffusion ----------------------------------------------------------------------------
    prediction_type: str | None = None  # None: what the base model says
    loss_type: str = "mse"  # mse | l1 | huber | smooth_l1
    huber_c: float = 0.1  # Huber threshold (huber / smooth_l1 losses), > 0
    huber_schedule: str = "snr"  # constant | snr | exponential (kohya's schedules for the Huber threshold)
    min_snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (5 is the paper's value)
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

    # --- previews during training ----------------------------------------------------------------
    preview_every: int = 0  # render a preview image every N steps (0: never)
    preview_prompt: str = ""  # default: the first training caption
    preview_steps: int = 20  # sampling steps of a preview image, >= 1
    preview_seed: int = 0  # seed of the preview image (the same each time, to compare)

    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes carried into metadata

    def __post_init__(self) -> None:
        def bad(name: str, value: Any, fix: str) -> ConfigError:
            return ConfigError(f"{name}={value!r} is not allowed: {fix}")

        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise bad(name, getattr(self, name), f"choose one of {', '.join(str(a) for a in allowed)}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise bad("rank", self.rank, "use a whole number >= 1 (4-64 is typical)")
        if self.conv_rank is not None and self.conv_rank < 1:
            raise bad("conv_rank", self.conv_rank, "use a whole number >= 1, or None to follow rank")
        if self.alpha <= 0:
            raise bad("alpha", self.alpha, "use a positive number (alpha = rank gives scale 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", self.dropout, "use a probability in [0, 1)")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise bad("steps", self.steps, "train for at least 1 step")
        if self.batch_size < 1:
            raise bad("batch_size", self.batch_size, "use 1 or more")
        if self.grad_accum < 1:
            raise bad("grad_accum", self.grad_accum, "use 1 or more")
        if not self.lr > 0:
            raise bad("lr", self.lr, "use a positive learning rate such as 1e-4")
        if self.text_encoder_lr is not None and self.text_encoder_lr < 0:
            raise bad("text_encoder_lr", self.text_encoder_lr, "use a learning rate >= 0, or None to follow lr")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise bad("warmup_steps", self.warmup_steps, f"use 0..steps ({self.steps})")
        if self.max_grad_norm < 0:
            raise bad("max_grad_norm", self.max_grad_norm, "use 0 (off) or a positive norm such as 1.0")
        if not self.huber_c > 0:
            raise bad("huber_c", self.huber_c, "use a positive threshold such as 0.1")
        if self.min_snr_gamma is not None and self.min_snr_gamma < 0:
            raise bad("min_snr_gamma", self.min_snr_gamma, "use None (off) or a positive gamma such as 5")
        if self.noise_offset < 0:
            raise bad("noise_offset", self.noise_offset, "use 0 (off) or a small value such as 0.05")
        if self.pyramid_noise_iterations < 0 or not 0 < self.pyramid_noise_discount < 1:
            raise bad("pyramid_noise", (self.pyramid_noise_iterations, self.pyramid_noise_discount),
                      "use iterations >= 0 and a discount in (0, 1), e.g. 6 and 0.4")
        if self.prior_loss_weight < 0:
            raise bad("prior_loss_weight", self.prior_loss_weight, "use a weight >= 0 (1.0 is DreamBooth's)")
        if self.num_class_images < 0:
            raise bad("num_class_images", self.num_class_images, "use 0 or a count of class images")
        if self.text_encoder_train_steps < 0:
            raise bad("text_encoder_train_steps", self.text_encoder_train_steps, "use 0 (all steps) or a step count")
        if self.keep_last < 0 or self.save_state_every < 0:
            raise bad("keep_last/save_state_every", (self.keep_last, self.save_state_every), "use 0 or more")
        if self.preview_every < 0 or self.preview_steps < 1:
            raise bad("preview_every/preview_steps", (self.preview_every, self.preview_steps),
                      "use preview_every >= 0 (0: off) and preview_steps >= 1")
        if self.save_every < 0:
            raise bad("save_every", self.save_every, "use 0 (only the final save) or a step count")
        if not self.output_name or any(c in self.output_name for c in '/\\:*?"<>|'):
            raise bad("output_name", self.output_name, "use a plain file name without path separators")

    @property
    def effective_conv_rank(self) -> int:
        return self.conv_rank or self.rank

    @property
    def effective_conv_alpha(self) -> float:
        return self.conv_alpha if self.conv_alpha is not None else self.alpha * self.effective_conv_rank / self.rank

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; known options: {sorted(names)}")
        d = dict(d)
        if "adam_betas" in d:
            d["adam_betas"] = tuple(d["adam_betas"])
        return cls(**d)
