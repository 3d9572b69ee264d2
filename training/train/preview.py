"""Preview images during training: a small DDIM sampler (DDPM models) or Euler sampler (flow models)
over the backend's own denoiser.

It runs on the model as it is being trained (LoRA layers active), so a host sees what the LoRA
does at step N without loading anything twice.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch

from ..data.captions import build_caption
from ..model.backend import Backend

if TYPE_CHECKING:
    from .trainer import Trainer


def preview_on_step(trainer: Trainer) -> None:
    """The trainer's ``on_step_end`` event: every ``preview_every`` steps and at the last one, the main
    process renders the preview prompt (default: the first image's caption) at the first image's bucket
    and hands it to ``on_preview``. Also its ``on_train_start`` event: step 0, the baseline (the LoRA's up
    weights are still zero, so it is the base model's image with the same seed: ai-toolkit's baseline samples).
    Backends that cannot decode latents get no previews."""
    cfg, step, records = trainer.cfg, trainer.step, trainer.records
    every = cfg.preview_every
    if not (every and (step % every == 0 or step == cfg.steps) and trainer.dist.is_main):
        return
    be = trainer.backend
    prompt = preview_prompt(trainer)
    bw, bh = records[0].bucket
    try:
        img = sample_preview(be, prompt, seed=cfg.preview_seed, steps=cfg.preview_steps, width=bw, height=bh,
                             latent_factor=be.latent_factor, latent_channels=be.latent_channels,
                             encode=trainer.batches.encode_cached if trainer.prompts_precached else None)
    except NotImplementedError:
        return
    trainer.cb.on_preview(step, img, prompt)


def preview_prompt(trainer: Trainer) -> str:
    """The preview's prompt: the configured one, else the first image's caption as trained."""
    return trainer.cfg.preview_prompt or build_caption(trainer.records[0].caption, trainer.dcfg, random.Random(0))


@torch.no_grad()
def sample_preview(backend: Backend, prompt: str, negative: str = "", seed: int = 0, steps: int = 20,
                   width: int = 512, height: int = 512, guidance: float | None = None, latent_channels: int = 4,
                   latent_factor: int = 8, encode=None) -> torch.Tensor:
    """One image [1, H, W, 3] in 0..1 for ``prompt``: deterministic DDIM (eta 0) for DDPM models, Euler over
    ``backend.flow_sigmas`` for flow models. ``guidance``: the classifier-free guidance scale (None: the
    backend's ``preview_guidance``; 1 skips the negative pass). ``encode``: how prompts become conditioning
    (default ``backend.encode_prompts``; the trainer passes its cache, the text encoders may be gone)."""
    guidance = backend.preview_guidance if guidance is None else guidance
    encode = encode or backend.encode_prompts
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, latent_channels, height // latent_factor, width // latent_factor), generator=g)
    if backend.prediction_type == "flow":
        return backend.decode_latents(_flow_euler(backend, prompt, negative, noise, steps, guidance, encode))
    alphas = backend.alphas_cumprod().float()
    T = alphas.shape[0]
    dev = backend.device
    x = noise.to(dev)
    cond = backend.cat_cond([encode([prompt]), encode([negative])])
    ts = torch.linspace(T - 1, 0, steps).round().long().tolist()
    for i, t in enumerate(ts):
        a = alphas[t]
        a_prev = alphas[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0, device=alphas.device)
        tt = torch.full((2,), t, device=dev, dtype=torch.long)
        out = backend.predict(torch.cat([x, x]), tt, cond).float()
        if backend.prediction_type == "v_prediction":
            out = a.sqrt() * out + (1 - a).sqrt() * torch.cat([x, x])  # v -> eps
        eps_c, eps_u = out.chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return backend.decode_latents(x)


def _flow_euler(backend: Backend, prompt: str, negative: str, noise: torch.Tensor, steps: int,
                guidance: float, encode) -> torch.Tensor:
    """Euler over the family's sigmas (ComfyUI's "euler" sampler with its schedule): x += (s_next - s) v,
    starting from sigma_0 * noise (an empty latent noised as ComfyUI's CONST does)."""
    dev = backend.device
    sigmas = [float(s) for s in backend.flow_sigmas(steps, tuple(noise.shape))]
    use_cfg = guidance != 1
    cond = backend.sampling_cond(encode([prompt]))
    if use_cfg:
        cond = backend.cat_cond([cond, backend.sampling_cond(encode([negative]))])
    x = noise.to(dev) * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        n = 2 if use_cfg else 1
        v = backend.predict(torch.cat([x] * n), torch.full((n,), s, device=dev, dtype=torch.float32), cond).float()
        if use_cfg:
            v_c, v_u = v.chunk(2)
            v = v_u + guidance * (v_c - v_u)
        x = x + (s_next - s) * v
    return x
