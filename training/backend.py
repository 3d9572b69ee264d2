"""The engine's view of a model: a small interface any host implements.

The training loop only ever calls these methods, so the ComfyUI backend (built on ComfyUI's own
MODEL/CLIP/VAE objects) and the diffusers backend here plug into the same loop.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .network import LoraTarget, kohya_name_fn, select_text_encoder_targets, select_unet_targets

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A base model could not be loaded; the message says which file is wrong and what to pass."""


class Backend(ABC):
    """What the training loop needs from a model."""

    arch: str = "sd1"  # "sd1", "sd2", "sdxl": decides file naming and metadata
    prediction_type: str = "epsilon"
    device: torch.device = torch.device("cpu")
    model_name: str = ""  # shown in the LoRA's metadata (ss_sd_model_name)
    latent_factor: int = 8  # pixels per latent pixel
    latent_channels: int = 4

    @abstractmethod
    def roots(self) -> dict[str, nn.Module]:
        """The trainable component roots by name: {"unet": ..., "te": ...}."""

    @abstractmethod
    def lora_targets(self, preset: str, text_encoder: bool) -> list[LoraTarget]:
        """The modules a preset trains, with their kohya names."""

    @abstractmethod
    def alphas_cumprod(self) -> torch.Tensor:
        """The training noise schedule, shape [num_train_timesteps], float32 on ``device``."""

    @abstractmethod
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1,1] -> scaled latents [B,C,h,w] (no grad)."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Any:
        """Captions -> conditioning the denoiser takes (grad flows when the text encoder trains)."""

    @abstractmethod
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The denoiser's output for noisy latents at integer timesteps ``t``."""

    def compute_devices(self) -> dict[str, torch.device]:
        """Where each root computes: LoRA weights are put there."""
        return {name: self.device for name in self.roots()}

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images [B, H, W, 3] in 0..1 (for previews)."""
        raise NotImplementedError(f"{type(self).__name__} cannot decode previews")

    def enable_gradient_checkpointing(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no gradient checkpointing")

    def cond_to(self, cond: Any, device: torch.device) -> Any:
        return cond.to(device) if isinstance(cond, torch.Tensor) else cond

    def cat_cond(self, conds: list[Any]) -> Any:
        return torch.cat(conds)


class DiffusersBackend(Backend):
    """SD1.x/SD2.x in diffusers classes: UNet2DConditionModel + CLIPTextModel + AutoencoderKL/Tiny."""

    def __init__(self, unet, text_encoder, tokenizer, vae, scheduler, device: str | torch.device = "cpu",
                 weight_dtype: torch.dtype = torch.float32, model_name: str = ""):
        self.unet, self.text_encoder, self.tokenizer, self.vae = unet, text_encoder, tokenizer, vae
        self.device = torch.device(device)
        self.weight_dtype = weight_dtype
        self.model_name = model_name
        self.prediction_type = scheduler.config.prediction_type
        self._alphas = scheduler.alphas_cumprod.detach().clone().float()
        blocks = getattr(vae.config, "block_out_channels", None)
        self.latent_factor = 2 ** (len(blocks) - 1) if blocks and hasattr(vae, "quant_conv") else 8
        self.latent_channels = unet.config.in_channels
        cross = unet.config.cross_attention_dim
        self.arch = "sd2" if cross == 1024 else "sd1"
        for m in (unet, text_encoder, vae):
            m.requires_grad_(False)
            m.eval()
            m.to(self.device)
            if any(p.dtype != weight_dtype for p in m.parameters()):
                m.to(dtype=weight_dtype)
        # The VAE runs in fp32 where it can: fp16 SD VAEs overflow to NaN on large images.
        if weight_dtype == torch.float16 and self.device.type != "cpu":
            vae.to(dtype=torch.float32)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device="cpu", weight_dtype=torch.float32) -> "DiffusersBackend":
        """A diffusers folder (model_index.json + unet/ text_encoder/ tokenizer/ vae/ scheduler/), offline."""
        from diffusers import AutoencoderKL, AutoencoderTiny, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        path = Path(path)
        missing = [d for d in ("unet", "text_encoder", "tokenizer", "vae", "scheduler") if not (path / d).is_dir()]
        if not (path / "model_index.json").is_file() or missing:
            raise ModelLoadError(
                f"{path} is not a diffusers model folder (needs model_index.json and sub-folders "
                f"unet/ text_encoder/ tokenizer/ vae/ scheduler/; missing: {missing or ['model_index.json']}). "
                "Pass a diffusers folder or a single-file .safetensors checkpoint."
            )
        kw = dict(local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        vae_cfg = (path / "vae" / "config.json").read_text()
        vae_cls = AutoencoderTiny if '"AutoencoderTiny"' in vae_cfg else AutoencoderKL
        vae = vae_cls.from_pretrained(path, subfolder="vae", **kw)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
        return cls(unet, text_encoder, tokenizer, vae, scheduler, device=device, weight_dtype=weight_dtype,
                   model_name=path.name)

    # ---- Backend -----------------------------------------------------------------------------
    def roots(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "te": self.text_encoder}

    def lora_targets(self, preset: str, text_encoder: bool) -> list[LoraTarget]:
        unet_name = kohya_name_fn("lora_unet_")
        out = [LoraTarget("unet", p, unet_name(p), conv)
               for p, conv in select_unet_targets(self.unet.named_modules(), preset)]
        if text_encoder:
            te_name = kohya_name_fn("lora_te_")
            out += [LoraTarget("te", p, te_name(p), False)
                    for p in select_text_encoder_targets(self.text_encoder.named_modules())]
        return out

    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas.to(self.device)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(self.vae.parameters()).dtype
        x = pixels.to(self.device, dtype=vae_dtype)
        out = self.vae.encode(x)
        if hasattr(out, "latent_dist"):
            # The mode, not a sample: cached latents then equal uncached ones exactly.
            lat = out.latent_dist.mode()
        else:  # AutoencoderTiny returns latents directly
            lat = out.latents
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((lat - shift) * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(self.vae.parameters()).dtype
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z = latents.to(self.device, dtype=vae_dtype) / self.vae.config.scaling_factor + shift
        img = self.vae.decode(z).sample.float()
        return ((img + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        ids = tok.input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t.to(self.weight_dtype), t, encoder_hidden_states=cond.to(self.weight_dtype)).sample

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()
        if hasattr(self.text_encoder, "gradient_checkpointing_enable"):
            self.text_encoder.gradient_checkpointing_enable()
