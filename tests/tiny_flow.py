"""A tiny flow-matching backend for engine tests: diffusers' FluxTransformer2DModel built from a small
config, with a fixed linear "VAE" (8 x 8 average pool + 1x1 projection) and fixed text embeddings per
prompt. Enough to drive the trainer's flow path and the DiT memory estimate; it is no real model.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from lora_workbench.training.lora.network import LoraTarget, kohya_name_fn
from lora_workbench.training.model.backend import Backend
from lora_workbench.training.train import memory as M

# The BFL "attn" preset on diffusers' module names: joint attention q/k/v/out of both streams, and the
# single blocks' attention + MLP input (BFL linear1) and output (BFL linear2).
ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out", "proj_mlp", "proj_out")
FF = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


def tiny_flux(hidden_heads: int = 4, head_dim: int = 16, double: int = 1, single: int = 2, context_dim: int = 32,
              seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16 * 4, num_layers=double, num_single_layers=single,
                                  attention_head_dim=head_dim, num_attention_heads=hidden_heads,
                                  joint_attention_dim=context_dim, pooled_projection_dim=context_dim,
                                  guidance_embeds=False, axes_dims_rope=rope_axes(head_dim))


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Flux's RoPE split of a head (16, 56, 56 of 128) for a small head: three even parts."""
    first = 2 * (head_dim // 8)
    second = 2 * ((head_dim - first) // 4)
    return first, second, head_dim - first - second


class TinyFlowBackend(Backend):
    arch = "sd1"  # file naming only; the trainer's flow path does not read it
    prediction_type = "flow"
    latent_factor = 8
    latent_channels = 16
    patch_size = 2
    timestep_sampling_default = "flux_shift"
    preview_guidance = 1.0

    def __init__(self, transformer: nn.Module | None = None, text_tokens: int = 8, seed: int = 0):
        self.transformer = transformer if transformer is not None else tiny_flux(seed=seed)
        self.transformer.requires_grad_(False).eval()
        self.text_tokens = text_tokens
        self.context_dim = self.transformer.config.joint_attention_dim
        g = torch.Generator().manual_seed(seed + 1)
        self.proj = torch.randn(16, 3, generator=g) / 3  # the fixed "VAE": 3 colours -> 16 channels

    def roots(self) -> dict[str, nn.Module]:
        return {"unet": self.transformer}

    def lora_targets(self, preset: str, text_encoder: bool) -> list[LoraTarget]:
        names = ATTN + (FF if preset in ("attn_ff", "all") else ())
        name = kohya_name_fn("lora_unet_")
        return [LoraTarget("unet", p, name(p), False) for p, m in self.transformer.named_modules()
                if isinstance(m, nn.Linear) and p.startswith(("transformer_blocks.", "single_transformer_blocks."))
                and p.split(".", 2)[2] in names]

    def alphas_cumprod(self) -> torch.Tensor:
        raise NotImplementedError("a flow model has no DDPM schedule")

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(pixels.float(), self.latent_factor)
        return torch.einsum("oc,bchw->bohw", self.proj, x)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        x = torch.einsum("oc,bohw->bchw", self.proj, latents.float())
        x = F.interpolate(x, scale_factor=self.latent_factor)
        return ((x + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
            out.append(torch.randn(self.text_tokens, self.context_dim, generator=g))
        return torch.stack(out)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x_t.shape
        packed = x_t.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3)
        img_ids[..., 1] += torch.arange(h // 2)[:, None]
        img_ids[..., 2] += torch.arange(w // 2)[None, :]
        out = self.transformer(hidden_states=packed, encoder_hidden_states=cond, pooled_projections=cond.mean(1),
                               timestep=t.float(), img_ids=img_ids.reshape(-1, 3),
                               txt_ids=torch.zeros(cond.shape[1], 3)).sample
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def flow_sigmas(self, steps: int, latent_shape) -> torch.Tensor:
        return torch.cat([torch.linspace(1, 1 / steps, steps), torch.zeros(1)])

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    def memory_shape(self) -> M.ModelShape:
        return M.shape_from_diffusers_dit(self.transformer, context_tokens=self.text_tokens)
