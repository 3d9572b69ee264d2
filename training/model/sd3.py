"""SD3 / SD3.5 in diffusers classes, for the CLI: a rectified-flow MMDiT.

The model is diffusers' ``SD3Transformer2DModel`` with CLIP-L and CLIP-G (``CLIPTextModelWithProjection``),
an optional T5-XXL and a 16-channel ``AutoencoderKL``, used as ``StableDiffusion3Pipeline`` uses them: the
prompt through the pipeline's own ``encode_prompt`` (CLIP hidden states joined and padded to T5's width, T5's
tokens after them, or zeros without a T5; pooled CLIP-L + CLIP-G), ``timestep = sigma * 1000``, VAE latents
shifted and scaled, the scheduler's shift (3.0) for previews.

The LoRA is trained on diffusers' split layers (``attn.to_q`` / ``to_k`` / ``to_v`` ...), each a peft LoRA,
and :meth:`DiffusersSD3Backend.finalize_lora` joins them into the family's module names (MMDiT's fused
``joint_blocks.N.x_block.attn.qkv`` ...) exactly, as the Flux backend does; the file is written in diffusers'
SD3 key format again (``lora.diffusers_format``), each part at its trained rank. The last block's pre-only
``norm1_context.linear`` holds (scale, shift) where MMDiT holds (shift, scale): its rows are swapped on the
way in and out.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..lora.files import LoraModule, LoraWeights
from ..lora.fuse import fuse_modules
from ..lora.network import LoraTarget
from .backend import Backend, ModelLoadError
from .dit_keys import is_pre_only_modulation, parse_kohya_dit_name
from .flux import FP8, decode_shifted, encode_shifted, split_fused, split_targets

log = logging.getLogger(__name__)

PIPELINE = "StableDiffusion3Pipeline"
ARCH = "sd3"


@dataclass
class SD3Cond:
    """A batch's conditioning: the joined text states [B, L, 4096] and the pooled CLIP-L + CLIP-G [B, 2048]."""

    context: torch.Tensor
    pooled: torch.Tensor

    def _map(self, fn) -> "SD3Cond":
        return SD3Cond(fn(self.context), fn(self.pooled))

    def __getitem__(self, index) -> "SD3Cond":
        return self._map(lambda t: t[index])

    def __len__(self) -> int:
        return int(self.context.shape[0])

    def detach(self) -> "SD3Cond":
        return self._map(torch.Tensor.detach)

    def to(self, *args: Any, **kwargs: Any) -> "SD3Cond":
        return self._map(lambda t: t.to(*args, **kwargs))


def _swap_halves(m: LoraModule) -> LoraModule:
    return LoraModule(m.down, torch.cat(m.up.chunk(2, dim=0)[::-1]), m.alpha)


class DiffusersSD3Backend(Backend):
    """SD3.x (``SD3Transformer2DModel`` + CLIP-L + CLIP-G [+ T5]) with a 16-channel VAE and
    ``FlowMatchEulerDiscreteScheduler``; prediction type "flow". ``weight_dtype`` fp8 stores the transformer
    (and T5) in fp8 with bf16 compute, as the Flux backend does."""

    prediction_type = "flow"
    patch_size = 2
    timestep_sampling_default = "logit_normal"  # SD3's paper and diffusers' train_dreambooth_lora_sd3
    preview_guidance = 4.5  # StableDiffusion3Pipeline's typical cfg for SD3.5

    def __init__(self, pipe, device: str | torch.device = "cpu", weight_dtype: torch.dtype = torch.float32,
                 model_name: str = "", max_sequence_length: int = 256):
        self.pipe = pipe
        self.transformer, self.vae, self.scheduler = pipe.transformer, pipe.vae, pipe.scheduler
        self.device = torch.device(device)
        self.model_name = model_name
        self.arch = ARCH
        cfg = self.transformer.config
        if cfg.get("dual_attention_layers"):
            self.variant = "3.5-medium"
        else:
            self.variant = "3.5-large" if cfg.get("qk_norm") else "3-medium"
        self.fp8 = weight_dtype == FP8
        self.weight_dtype = torch.bfloat16 if self.fp8 else weight_dtype
        self.dtype = weight_dtype
        self.latent_channels = cfg.in_channels
        blocks = getattr(self.vae.config, "block_out_channels", None)
        self.latent_factor = 2 ** (len(blocks) - 1) if blocks else 8
        self.max_sequence_length = max_sequence_length
        self.flow_shift = float(self.scheduler.config.get("shift", 1.0))
        self.encoders = [e for e in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if e is not None]
        for m in (self.transformer, self.vae, *self.encoders):
            m.requires_grad_(False)
            m.eval()
            m.to(self.device)
            if any(p.dtype != self.weight_dtype for p in m.parameters()):
                m.to(dtype=self.weight_dtype)
        if self.fp8:
            self.transformer.enable_layerwise_casting(storage_dtype=FP8, compute_dtype=torch.bfloat16)
        self._parts: dict[str, list[tuple[str, int]]] = {}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        weight_dtype: torch.dtype = torch.float32) -> "DiffusersSD3Backend":
        """A diffusers StableDiffusion3Pipeline folder, offline (``text_encoder_3`` / T5 may be absent)."""
        from diffusers import StableDiffusion3Pipeline

        path = Path(path)
        need = ["transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"]
        missing = [d for d in need if not (path / d).is_dir()]
        if missing:
            raise ModelLoadError(f"{path} (SD3) lacks the sub-folders {missing}; download the complete diffusers "
                                 "model folder")
        load_dtype = torch.bfloat16 if weight_dtype == FP8 else weight_dtype
        extra = {} if (path / "text_encoder_3").is_dir() else {"text_encoder_3": None, "tokenizer_3": None}
        pipe = StableDiffusion3Pipeline.from_pretrained(path, local_files_only=True, torch_dtype=load_dtype, **extra)
        return cls(pipe, device=device, weight_dtype=weight_dtype, model_name=path.name)

    # ---- Backend -----------------------------------------------------------------------------
    def roots(self) -> dict[str, nn.Module]:
        return {"unet": self.transformer}

    def lora_targets(self, preset: str, text_encoder: bool) -> list[LoraTarget]:
        """The preset's transformer Linears, each part of a fused MMDiT layer (q / k / v) its own target."""
        if text_encoder:
            raise ValueError("text-encoder training is not supported for SD3 (its LoRAs train the transformer "
                             "only); turn off train_text_encoder (--no-train-text-encoder)")
        out, self._parts = split_targets(self.transformer, ARCH, preset)
        return out

    def _pre_only(self, name: str, m: LoraModule) -> bool:
        return is_pre_only_modulation(parse_kohya_dit_name(name, ARCH), m.up.shape[0], m.down.shape[1], ARCH)

    def finalize_lora(self, lora: LoraWeights) -> LoraWeights:
        """The trained parts joined into the MMDiT's fused modules (exact); pre-only modulations in MMDiT's
        (shift, scale) order."""
        mods = dict(lora.modules)
        for name, parts in self._parts.items():
            if any(p in mods for p, _ in parts):
                mods[name] = fuse_modules([mods.pop(p) for p, _ in parts])
        mods = {k: _swap_halves(m) if "." not in k and self._pre_only(k, m) else m for k, m in mods.items()}
        return dataclasses.replace(lora, modules=mods)

    def joins_split_layers(self) -> bool:
        """True once the targets include parts of a fused MMDiT layer (q / k / v), which the file joins."""
        return bool(self._parts)

    def split_lora(self, lora: LoraWeights) -> LoraWeights:
        """The inverse of :meth:`finalize_lora`, for a resume."""
        mods = {k: _swap_halves(m) if self._pre_only(k, m) else m for k, m in lora.modules.items()}
        for name, parts in self._parts.items():
            if name in mods:
                mods.update(zip([p for p, _ in parts], split_fused(mods.pop(name), [d for _, d in parts], name)))
        return dataclasses.replace(lora, modules=mods)

    def alphas_cumprod(self) -> torch.Tensor:
        raise NotImplementedError("SD3 is a flow-matching model: it has no alphas_cumprod")

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents [B, 16, h, w] as StableDiffusion3Pipeline makes them (shift 0.0609, scale 1.5305 on SD3.5)."""
        return encode_shifted(self.vae, pixels, self.device)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_shifted(self.vae, latents, self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> SD3Cond:
        """``StableDiffusion3Pipeline.encode_prompt`` for ``prompts`` (no negative pass)."""
        context, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=self.device,
                                                        do_classifier_free_guidance=False,
                                                        max_sequence_length=self.max_sequence_length)
        return SD3Cond(context, pooled)

    def predict(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: SD3Cond) -> torch.Tensor:
        """The velocity ``noise - x0`` for latents ``x_t`` at ``sigma`` in [0, 1] (the pipeline's timestep is
        sigma * 1000)."""
        dt = self.weight_dtype
        return self.transformer(hidden_states=x_t.to(dt), timestep=(sigma * 1000).to(x_t.device, dt),
                                encoder_hidden_states=cond.context.to(dt), pooled_projections=cond.pooled.to(dt),
                                return_dict=False)[0]

    def cat_cond(self, conds: list[SD3Cond]) -> SD3Cond:
        return SD3Cond(torch.cat([c.context for c in conds]), torch.cat([c.pooled for c in conds]))

    def flow_sigmas(self, steps: int, latent_shape) -> torch.Tensor:
        """The pipeline's schedule: ``set_timesteps(steps)`` with the scheduler's shift, then 0."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(steps)
        return sched.sigmas.float().cpu()

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    def memory_shape(self):
        """The MMDiT, its text encoders and VAE as a DiT ``memory.ModelShape``."""
        from ..train import memory

        cfg = self.transformer.config
        hidden = cfg.num_attention_heads * cfg.attention_head_dim
        ff = self.transformer.transformer_blocks[0].ff.net[0].proj
        dit = memory.DiTShape(hidden, cfg.num_layers, 0, cfg.num_attention_heads, ff.out_features / hidden,
                              context_tokens=77 + (self.max_sequence_length if self.pipe.text_encoder_3 else 77),
                              context_dim=cfg.joint_attention_dim, patch_size=cfg.patch_size,
                              latent_channels=cfg.in_channels)
        tes = []
        for te in self.encoders:
            c = te.config
            tes.append(memory.TextEncoderShape(getattr(c, "hidden_size", None) or c.d_model,
                                               getattr(c, "num_hidden_layers", None) or c.num_layers,
                                               getattr(c, "num_attention_heads", None) or c.num_heads,
                                               getattr(c, "intermediate_size", None) or c.d_ff))

        def count(m):
            return sum(p.numel() for p in m.parameters())

        return memory.ModelShape(self.model_name or "SD3", dit, tuple(tes), unet_params=count(self.transformer),
                                 te_params=tuple(count(te) for te in self.encoders), vae_params=count(self.vae),
                                 latent_factor=self.latent_factor, latent_channels=self.latent_channels)


def is_sd3_pipeline(folder: str | os.PathLike) -> bool:
    """Whether a diffusers folder's model_index.json names StableDiffusion3Pipeline."""
    try:
        return json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8")).get("_class_name") == PIPELINE
    except (OSError, ValueError):
        return False
