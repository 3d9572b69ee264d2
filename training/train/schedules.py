"""Pure schedule functions: learning rate by step, and the diffusion training targets (DDPM and flow)."""

from __future__ import annotations

import math

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


# ---- flow matching (rectified flow: Flux, Chroma, SD3) -------------------------------------------
FLOW_SAMPLINGS = ("uniform", "logit_normal", "shift", "flux_shift", "qwen_shift")


def flux_mu(image_tokens: int, base_shift: float = 0.5, max_shift: float = 1.15, lo: int = 256,
            hi: int = 4096) -> float:
    """Flux's resolution-dependent shift mu: linear in the image's token count, ``base_shift`` at ``lo``
    tokens and ``max_shift`` at ``hi`` (BFL's ``get_lin_function``, diffusers ``FluxPipeline``'s
    ``calculate_shift`` with the scheduler's base/max_image_seq_len 256/4096). 1024 px -> 4096 tokens -> 1.15."""
    slope = (max_shift - base_shift) / (hi - lo)
    return image_tokens * slope + (base_shift - slope * lo)


def sample_flow_sigmas(gen: torch.Generator, n: int, method: str, *, logit_mean: float = 0.0,
                       logit_std: float = 1.0, shift: float = 1.0, image_tokens: int | None = None) -> torch.Tensor:
    """``n`` training sigmas in [0, 1] (float32, on the CPU), drawn from ``gen`` only.

    uniform:      u ~ U(0, 1).
    logit_normal: sigmoid(logit_mean + logit_std * N(0, 1)) - SD3's logit-normal sampling (Esser et al.
                  2024, arXiv:2403.03206, section 3.1; diffusers ``compute_density_for_timestep_sampling``,
                  kohya ``--timestep_sampling sigmoid``): more weight on the middle of the trajectory.
    shift:        logit-normal u, then ``shift * u / (1 + (shift - 1) * u)`` (kohya sd-scripts
                  ``--timestep_sampling shift --discrete_flow_shift``, ComfyUI ``time_snr_shift``);
                  shift > 1 moves sigmas towards noise, 1 changes nothing.
    flux_shift:   logit-normal u, then ``exp(mu) / (exp(mu) + (1 / u - 1))`` with mu = :func:`flux_mu`
                  (``image_tokens``) (kohya ``--timestep_sampling flux_shift``, ComfyUI ``flux_time_shift``,
                  the mu BFL's and diffusers' FluxPipeline sample with): larger images, noisier sigmas.
    qwen_shift:   as flux_shift with Qwen-Image's mu line (0.5 at 256 tokens, 0.9 at 8192: diffusers'
                  QwenImagePipeline scheduler config, musubi-tuner ``--timestep_sampling qwen_shift``).
    """
    if method not in FLOW_SAMPLINGS:
        raise ValueError(f"timestep_sampling={method!r} is not a flow sampling; use one of {', '.join(FLOW_SAMPLINGS)}")
    if method == "uniform":
        return torch.rand(n, generator=gen)
    u = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=gen))
    if method == "shift":
        return shift * u / (1 + (shift - 1) * u)
    if method in ("flux_shift", "qwen_shift"):
        if image_tokens is None:
            raise ValueError(f"timestep_sampling={method!r} needs image_tokens (the latent's token count)")
        mu = flux_mu(image_tokens) if method == "flux_shift" else flux_mu(image_tokens, 0.5, 0.9, 256, 8192)
        e = math.exp(mu)
        return e / (e + (1 / u - 1))
    return u


def flow_add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma noise: rectified flow's straight path (ComfyUI CONST,
    diffusers ``FlowMatchEulerDiscreteScheduler.scale_noise``); sigma [B] in [0, 1], computed in fp32."""
    s = sigma.float().view(-1, *([1] * (x0.dim() - 1))).to(x0.device)
    return (1 - s) * x0.float() + s * noise.float()


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity a flow model predicts: d x_t / d sigma = noise - x0 (fp32)."""
    return noise.float() - x0.float()
