"""Loss options for diffusion training, as pure functions on tensors.

    noise  ->  apply_noise_offset / pyramid_noise_like  ->  (the model)  ->  per_sample_loss
           ->  * min_snr_weights  ->  prior_preservation_loss  ->  the scalar to backpropagate

Each function works on whatever device its tensors live on and computes in fp32, whatever the
autocast dtype of the prediction. Randomness comes only from an explicit CPU ``torch.Generator``
(drawn on the CPU, then moved), so the same seed gives the same run on any device. With its
option off (offset 0, 0 iterations) a noise function returns its input and draws nothing, so
runs that do not use the option repeat the runs made before it existed.

The formulas follow kohya-ss/sd-scripts (``library/custom_train_functions.py`` and
``library/train_util.py``) and diffusers' training examples, so a setting means the same here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("mse", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "snr", "exponential")
PREDICTION_TYPES = ("epsilon", "v_prediction")


# ---- signal-to-noise ratio and Min-SNR weighting ---------------------------------------------------
def _alphas_at(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """alphas_cumprod[t] in fp32 on t's device, wherever the table lives."""
    t = torch.as_tensor(t)
    return alphas_cumprod.float()[t.to(alphas_cumprod.device).long()].to(t.device)


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio a_t / (1 - a_t) at timesteps ``t`` (fp32, on t's device)."""
    a = _alphas_at(alphas_cumprod, t)
    return a / (1.0 - a)


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float | None,
                    prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023, arXiv:2303.09556).

    As kohya's ``apply_snr_weight`` and diffusers' ``snr_gamma`` compute them:
    epsilon: min(snr, gamma) / snr; v_prediction: min(snr, gamma) / (snr + 1).
    ``gamma`` None or 0 turns the weighting off (all ones). 5 is the paper's recommended value.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} has no Min-SNR weighting; "
                         f"use one of {', '.join(PREDICTION_TYPES)}")
    t = torch.as_tensor(t)
    if not gamma:
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    if not gamma > 0:
        raise ValueError(f"min_snr_gamma={gamma!r} is not allowed: use a positive number such as 5, "
                         f"or None/0 to turn Min-SNR weighting off")
    s = snr(alphas_cumprod, t)
    if prediction_type == "epsilon":
        # gamma / max(snr, gamma) == min(snr, gamma) / snr, but stays finite (1) where snr is 0
        # (the last timestep of a zero-terminal-SNR schedule), where the kohya form gives 0/0.
        return gamma / s.clamp(min=gamma)
    return s.clamp(max=gamma) / (s + 1.0)


# ---- noise -------------------------------------------------------------------------------------------
def _check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"generator={generator!r} is not allowed: pass a CPU torch.Generator "
                         f"(torch.Generator().manual_seed(seed)) so runs repeat on any device")


def apply_noise_offset(noise: torch.Tensor, offset: float, generator: torch.Generator) -> torch.Tensor:
    """noise + offset * N(0, 1) per (sample, channel): the Crosslabs noise offset.

    It lets the model learn to change an image's mean brightness (very dark or bright pictures);
    0.05-0.1 is typical. Same as kohya's ``apply_noise_offset`` without ``adaptive_noise_scale``.
    ``offset`` 0 returns ``noise`` itself and draws nothing.
    """
    if not offset:
        return noise
    if not math.isfinite(offset) or offset < 0:
        raise ValueError(f"noise_offset={offset!r} is not allowed: use 0 (off) or a small positive "
                         f"number such as 0.05")
    if noise.dim() < 3:
        raise ValueError(f"noise of shape {tuple(noise.shape)} has no channel and spatial dims; "
                         f"expected (batch, channels, height, width)")
    _check_generator(generator)
    shape = tuple(noise.shape[:2]) + (1,) * (noise.dim() - 2)
    shift = torch.randn(shape, generator=generator).to(noise.device)
    return (noise.float() + offset * shift).to(noise.dtype)


def pyramid_noise_like(noise: torch.Tensor, generator: torch.Generator, iterations: int = 6,
                       discount: float = 0.4) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise, as kohya's ``pyramid_noise_like``.

    Adds, for i in 0..iterations-1, white noise drawn at the size divided by r**i (r random in
    [2, 4) each time) and upsampled bilinearly, scaled by discount**i; stops after the 1-pixel level;
    then divides by the std so the result has unit variance again. The extra low-frequency energy
    helps the model learn large-scale structure and contrast. kohya draws r from Python's global
    ``random``; here it comes from ``generator`` like every other draw. ``iterations`` 0 returns
    ``noise`` itself and draws nothing.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"pyramid_noise_iterations={iterations!r} is not allowed: use 0 (off) or a "
                         f"whole number such as 6-10")
    if iterations == 0:
        return noise
    if not math.isfinite(discount) or discount <= 0:
        raise ValueError(f"pyramid_noise_discount={discount!r} is not allowed: use a number in (0, 1) "
                         f"such as 0.3-0.4")
    if noise.dim() != 4:
        raise ValueError(f"pyramid noise needs (batch, channels, height, width) noise; got shape "
                         f"{tuple(noise.shape)}")
    _check_generator(generator)
    b, c, h, w = noise.shape
    out = noise.float()
    for i in range(iterations):
        r = 2.0 + 2.0 * float(torch.rand((), generator=generator))
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        low = torch.randn((b, c, hn, wn), generator=generator).to(noise.device)
        out = out + F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False) * discount**i
        if hn == 1 or wn == 1:
            break  # the coarsest level is one pixel
    return (out / out.std()).to(noise.dtype)


# ---- per-sample losses ------------------------------------------------------------------------------
def _per_sample_c(huber_c: float | torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """huber_c as a tensor that broadcasts over ``ref`` (one value, or one per sample)."""
    c = torch.as_tensor(huber_c, dtype=torch.float32)
    # Values are checked where it costs no device sync: numbers, and tensors on the CPU.
    if c.device.type == "cpu" and not bool((c > 0).all()):
        raise ValueError(f"huber_c={huber_c!r} is not allowed: use positive values such as 0.1")
    if c.dim() == 1:
        if c.shape[0] != ref.shape[0]:
            raise ValueError(f"huber_c has {c.shape[0]} values for a batch of {ref.shape[0]}; pass one "
                             f"number or one per sample (huber_c_for)")
        c = c.view(-1, *([1] * (ref.dim() - 1)))
    elif c.dim() != 0:
        raise ValueError(f"huber_c of shape {tuple(c.shape)} is not allowed: pass a number or a "
                         f"1-D tensor with one value per sample")
    return c.to(ref.device)


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "mse",
                    huber_c: float | torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of each sample (mean over every non-batch dim), fp32, shape (batch,).

    ``mask`` [B, 1, h, w] in 0..1 (masked loss) weighs each latent pixel before the mean, as kohya's
    ``apply_masked_loss`` does: a 0 there contributes no loss and no gradient.

    mse: x**2; l1: |x|; huber: 2c (sqrt(x**2 + c**2) - c), the pseudo-Huber of kohya's
    ``conditional_loss`` (~x**2 for |x| << c, ~2c(|x| - c) for |x| >> c); smooth_l1: torch's
    smooth L1 with beta = c (0.5 x**2 / c below c, |x| - c/2 above), x = pred - target.
    ``huber_c`` (a number, or one value per sample from ``huber_c_for``) is needed by huber and
    smooth_l1 only.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not supported; use one of {', '.join(LOSS_TYPES)}")
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from target shape "
                         f"{tuple(target.shape)}")
    if pred.dim() < 1 or pred.shape[0] == 0:
        raise ValueError(f"per_sample_loss needs a non-empty batch; got shape {tuple(pred.shape)}")
    x = pred.float() - target.float()
    if loss_type == "mse":
        loss = x.square()
    elif loss_type == "l1":
        loss = x.abs()
    else:
        if huber_c is None:
            raise ValueError(f"loss_type={loss_type!r} needs huber_c (e.g. 0.1, or huber_c_for(...))")
        c = _per_sample_c(huber_c, x)
        if loss_type == "huber":
            # 2c(sqrt(x^2+c^2) - c) written as 2c x^2 / (sqrt(x^2+c^2) + c): the same value without
            # the cancellation that loses small residuals in fp32.
            loss = 2 * c * x.square() / (torch.sqrt(x.square() + c.square()) + c)
        else:
            ax = x.abs()
            # c > 0, so the quadratic branch never divides by zero (and its gradient stays finite).
            loss = torch.where(ax < c, 0.5 * x.square() / c, ax - 0.5 * c)
    if mask is not None:  # [B, 1, h, w] over the last two dims (a one-frame 5-D latent gets its time axis)
        mask = mask.reshape(mask.shape[0], *([1] * (loss.dim() - 3)), *mask.shape[-2:])
        loss = loss * mask.to(loss.device, loss.dtype)
    return loss.flatten(1).mean(dim=1) if loss.dim() > 1 else loss


def huber_c_for(t: torch.Tensor, num_timesteps: int, huber_c: float, schedule: str,
                alphas_cumprod: torch.Tensor | None = None, huber_scale: float = 1.0) -> torch.Tensor:
    """Per-sample Huber threshold c at timesteps ``t`` (fp32, on t's device).

    The formulas of kohya-ss/sd-scripts ``library/train_util.py::get_huber_threshold_if_needed``
    (commit 48d368f, 2026-02):
        constant:     huber_c * huber_scale
        exponential:  exp(-alpha * t) * huber_scale,  alpha = -ln(huber_c) / num_timesteps
                      (huber_scale at t=0, falling to huber_c * huber_scale at t=num_timesteps)
        snr:          (1 - huber_c) / (1 + sigma_t)**2 + huber_c,  sigma_t = sqrt((1 - a_t) / a_t)
                      (1 at clean timesteps, falling to huber_c at noisy ones; huber_scale unused)
    Large c makes the loss quadratic (like mse) where the target is nearly clean; small c makes it
    robust (like l1) where it is mostly noise. kohya's default is schedule "snr", huber_c 0.1.
    """
    if schedule not in HUBER_SCHEDULES:
        raise ValueError(f"huber_schedule={schedule!r} is not supported; use one of {', '.join(HUBER_SCHEDULES)}")
    if not (math.isfinite(huber_c) and huber_c > 0):
        raise ValueError(f"huber_c={huber_c!r} is not allowed: use a positive number such as 0.1")
    if not (math.isfinite(huber_scale) and huber_scale > 0):
        raise ValueError(f"huber_scale={huber_scale!r} is not allowed: use a positive number (1.0 is usual)")
    t = torch.as_tensor(t)
    if schedule == "constant":
        return torch.full(t.shape, huber_c * huber_scale, dtype=torch.float32, device=t.device)
    if schedule == "exponential":
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps={num_timesteps!r} is not allowed: pass the scheduler's "
                             f"number of training timesteps (e.g. 1000)")
        alpha = -math.log(huber_c) / num_timesteps
        return torch.exp(-alpha * t.float()) * huber_scale
    if alphas_cumprod is None:
        raise ValueError("huber_schedule='snr' needs alphas_cumprod (the noise scheduler's table); "
                         "pass it, or use huber_schedule 'constant' or 'exponential'")
    a = _alphas_at(alphas_cumprod, t)
    sigma = ((1.0 - a) / a).sqrt()
    return (1.0 - huber_c) / (1.0 + sigma) ** 2 + huber_c



def huber_c_for_flow(sigma: torch.Tensor, huber_c: float, schedule: str, huber_scale: float = 1.0) -> torch.Tensor:
    """Per-sample Huber threshold c for a flow model at sigmas ``sigma`` in [0, 1] (fp32, on sigma's device).

    :func:`huber_c_for` with sigma in place of t / T:
        constant:     huber_c * huber_scale
        exponential:  huber_c ** sigma * huber_scale  (kohya's formula with t = 1000 sigma, T = 1000, as
                      sd-scripts runs it for Flux)
        snr:          (1 - huber_c) / (1 + r)**2 + huber_c with r = sigma / (1 - sigma), the flow path's
                      noise-to-signal ratio (what sqrt((1 - a_t) / a_t) is for DDPM): (1 - huber_c)(1 - sigma)**2
                      + huber_c, 1 at clean sigmas falling to huber_c at pure noise. sd-scripts has no
                      "snr" for flow models; this is its direct analogue.
    """
    if schedule not in HUBER_SCHEDULES:
        raise ValueError(f"huber_schedule={schedule!r} is not supported; use one of {', '.join(HUBER_SCHEDULES)}")
    if not (math.isfinite(huber_c) and huber_c > 0):
        raise ValueError(f"huber_c={huber_c!r} is not allowed: use a positive number such as 0.1")
    s = torch.as_tensor(sigma).float()
    if schedule == "constant":
        return torch.full(s.shape, huber_c * huber_scale, dtype=torch.float32, device=s.device)
    if schedule == "exponential":
        return torch.exp(math.log(huber_c) * s) * huber_scale
    return (1.0 - huber_c) * (1.0 - s).square() + huber_c

# ---- DreamBooth prior preservation -----------------------------------------------------------------
def prior_preservation_loss(per_sample: torch.Tensor, is_prior: torch.Tensor, prior_weight: float
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DreamBooth loss of a mixed batch: mean over instance samples + prior_weight * mean over class samples.

    Returns (total, instance_mean, prior_mean). A kind with no sample in this batch contributes 0
    (its mean is returned as 0), so a batch of instance images alone gives the plain loss.
    """
    if per_sample.dim() != 1:
        raise ValueError(f"per_sample must hold one loss per sample (shape (batch,)); got shape "
                         f"{tuple(per_sample.shape)}: use per_sample_loss")
    is_prior = torch.as_tensor(is_prior, device=per_sample.device)
    if is_prior.dtype != torch.bool or is_prior.shape != per_sample.shape:
        raise ValueError(f"is_prior must be a bool tensor of shape {tuple(per_sample.shape)}; got "
                         f"{is_prior.dtype} of shape {tuple(is_prior.shape)}")
    if not (math.isfinite(prior_weight) and prior_weight >= 0):
        raise ValueError(f"prior_loss_weight={prior_weight!r} is not allowed: use a number >= 0 "
                         f"(1.0 is DreamBooth's default)")
    loss = per_sample.float()
    zero = loss.new_zeros(())

    def masked_mean(mask: torch.Tensor) -> torch.Tensor:
        # No data-dependent branch (no host sync): sum / max(count, 1) is 0 for an empty kind.
        n = mask.sum()
        return torch.where(mask, loss, zero).sum() / n.clamp(min=1)

    instance_mean = masked_mean(~is_prior)
    prior_mean = masked_mean(is_prior)
    return instance_mean + prior_weight * prior_mean, instance_mean, prior_mean
