"""Pure schedule functions: learning rate by step, and the diffusion training targets."""

from __future__ import annotations

import torch

from ..config import TrainConfig


def make_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' schedules (constant, linear, cosine, ... with warm-up) over ``cfg.steps`` optimizer steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=cfg.steps)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise (DDPM forward process)."""
    a = alphas_cumprod[t].float().view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def target_for(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
               t: torch.Tensor) -> torch.Tensor:
    """What the denoiser should output: the noise (epsilon) or the velocity v = sqrt(a) eps - sqrt(1-a) x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = alphas_cumprod[t].float().view(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"prediction type {prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'")
