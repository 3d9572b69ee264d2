"""Preview images during training: a small DDIM sampler over the backend's own denoiser.

It runs on the model as it is being trained (LoRA layers active), so a host sees what the LoRA
does at step N without loading anything twice.
"""

from __future__ import annotations

import torch

from ..model.backend import Backend


@torch.no_grad()
def sample_preview(backend: Backend, prompt: str, negative: str = "", seed: int = 0, steps: int = 20,
                   width: int = 512, height: int = 512, guidance: float = 7.0, latent_channels: int = 4,
                   latent_factor: int = 8) -> torch.Tensor:
    """One image [1, H, W, 3] in 0..1 for ``prompt`` (deterministic DDIM, eta 0, classifier-free guidance)."""
    alphas = backend.alphas_cumprod().float()
    T = alphas.shape[0]
    dev = backend.device
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, latent_channels, height // latent_factor, width // latent_factor), generator=g).to(dev)
    cond = backend.cat_cond([backend.encode_prompts([prompt]), backend.encode_prompts([negative])])
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
