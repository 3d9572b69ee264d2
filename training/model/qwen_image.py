"""Qwen-Image (Alibaba's 20B MMDiT) in diffusers classes, for the CLI: a rectified-flow DiT.

The model is diffusers' ``QwenImageTransformer2DModel`` with a Qwen2.5-VL-7B text encoder and ``AutoencoderKLQwenImage``
(the Wan 2.1 video VAE), used as ``QwenImagePipeline`` uses them: the prompt through the pipeline's own
``encode_prompt`` (its describe-the-image chat template, the last hidden states with the template's first 34 tokens
dropped, each prompt's own tokens: one tensor of its own length per prompt, zero-padded with a mask only when a batch
mixes lengths), latents as the pipeline makes and decodes them (the VAE's five-dimensional latents of one frame,
normalised by its ``latents_mean`` / ``latents_std``), packed into 2 x 2 patches with ``img_shapes`` giving the
RoPE grid, ``timestep = sigma`` (the pipeline passes ``t / 1000``) and the velocity ``noise - x0`` as it is;
previews on the pipeline's schedule (``linspace(1, 1/steps)`` through the scheduler's exponential shift at the
pipeline's mu from the image's tokens, Qwen-Image's 0.5 .. 0.9 line, and its terminal 0.02).

The LoRA is trained on diffusers' layers, which are already the family's module names (ComfyUI loads diffusers'
weights as they are: separate ``attn.to_q`` / ``to_k`` / ``to_v`` and ``add_q_proj`` ...), so nothing is joined. The
file is ai-toolkit's Qwen-Image key format (``lora.diffusers_format``: ``diffusion_model.`` + diffusers names), which
``QwenImagePipeline.load_lora_weights`` and ComfyUI both read.

Previews use ComfyUI's classifier-free guidance (uncond + g x (cond - uncond)); the pipeline's ``true_cfg_scale``
also rescales the guided velocity to the conditional one's norm, so the two agree only without guidance.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from .archs import QWEN_IMAGE
from .flux import pack_latents, unpack_latents
from .pipeline_dit import DiffusersPipelineDiT, names_pipeline
from .zimage import ZImageCond

log = logging.getLogger(__name__)

PIPELINE = "QwenImagePipeline"
ARCH = "qwen_image"


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel latents mean and std, shaped [1, C, 1, 1, 1] like ``like``."""
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape)
    std = torch.tensor(vae.config.latents_std).view(shape)
    return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)


@torch.no_grad()
def encode_qwen_image(vae, pixels: torch.Tensor, device) -> torch.Tensor:
    """Latents [B, C, h, w] as the Qwen-Image pipelines encode images (``QwenImageEditPipeline._encode_vae_image``):
    the VAE's mode of the image as one frame, ``(z - latents_mean) / latents_std``; float32."""
    vae_dtype = next(vae.parameters()).dtype
    lat = vae.encode(pixels.to(device, dtype=vae_dtype).unsqueeze(2)).latent_dist.mode()  # [B, C, 1, h, w]
    mean, std = _latent_stats(vae, lat)
    return ((lat - mean) / std).squeeze(2).float()


@torch.no_grad()
def decode_qwen_image(vae, latents: torch.Tensor, device) -> torch.Tensor:
    """The inverse of :func:`encode_qwen_image`, decoded as QwenImagePipeline does: images [B, H, W, 3] in 0..1,
    float32 on the CPU."""
    vae_dtype = next(vae.parameters()).dtype
    lat = latents.to(device, dtype=vae_dtype).unsqueeze(2)
    mean, std = _latent_stats(vae, lat)
    img = vae.decode(lat * std + mean).sample[:, :, 0].float()
    return ((img + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()


def batch_prompts(feats: list[torch.Tensor], device, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-prompt hidden states as QwenImagePipeline batches them (``_get_qwen_prompt_embeds``): zero-padded to the
    longest, with a 0 / 1 mask, or no mask when none is padded (``encode_prompt`` drops an all-ones mask)."""
    n = max(f.shape[0] for f in feats)
    embeds = torch.stack([torch.cat([f, f.new_zeros(n - f.shape[0], f.shape[1])]) for f in feats]).to(device, dtype)
    mask = torch.stack([torch.arange(n) < f.shape[0] for f in feats]).long().to(device)
    return embeds, (None if bool(mask.all()) else mask)


class DiffusersQwenImageBackend(DiffusersPipelineDiT):
    """Qwen-Image (``QwenImageTransformer2DModel`` + Qwen2.5-VL + ``AutoencoderKLQwenImage`` +
    ``FlowMatchEulerDiscreteScheduler``); prediction type "flow". ``weight_dtype`` fp8 stores the transformer in fp8
    with bf16 compute, as the Flux backend does. The text encoder is released once the run's prompts are encoded; a
    later encode reloads it from the model folder."""

    ARCH, LABEL, PIPELINE = ARCH, "Qwen-Image", PIPELINE
    patch_size = 2
    timestep_sampling_default = QWEN_IMAGE.timestep_sampling_for()  # qwen_shift over the 2 x 2 patches
    preview_guidance = QWEN_IMAGE.sample_cfg  # ComfyUI's cfg, as the ComfyUI host

    def __init__(self, pipe, device: str | torch.device = "cpu", weight_dtype: torch.dtype = torch.float32,
                 model_name: str = "", max_sequence_length: int = 512, source: str | os.PathLike | None = None):
        super().__init__(pipe, device, weight_dtype, model_name, max_sequence_length, source)
        self.variant = None
        self.latent_channels = self.vae.config.z_dim
        self.latent_factor = pipe.vae_scale_factor  # 2 ** the VAE's downsamplings (8)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] as QwenImagePipeline makes them (:func:`encode_qwen_image`)."""
        return encode_qwen_image(self.vae, pixels, self.device)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_qwen_image(self.vae, latents, self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> ZImageCond:
        """``QwenImagePipeline.encode_prompt`` for ``prompts``, each prompt's own tokens ([L_i, D], Z-Image's
        per-prompt list); reloads a released encoder."""
        self._text_encoder_ready()
        embeds, mask = self.pipe.encode_prompt(list(prompts), device=self.device,
                                               max_sequence_length=self.max_sequence_length)
        if mask is None:
            return ZImageCond(list(embeds))
        return ZImageCond([e[m.bool()] for e, m in zip(embeds, mask)])

    def predict(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: ZImageCond) -> torch.Tensor:
        """The velocity ``noise - x0`` for latents ``x_t`` [B, C, h, w] at ``sigma`` [B] in [0, 1]: the transformer on
        2 x 2 patches at ``timestep = sigma`` with the pipeline's ``img_shapes`` and prompt mask."""
        b, _, h, w = x_t.shape
        dt, dev = self.weight_dtype, x_t.device
        embeds, mask = batch_prompts(cond.feats, dev, dt)
        out = self.transformer(hidden_states=pack_latents(x_t.to(dt)), timestep=sigma.to(dev, dt), guidance=None,
                               encoder_hidden_states_mask=mask, encoder_hidden_states=embeds,
                               img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return unpack_latents(out, h, w)

    def cat_cond(self, conds: list[ZImageCond]) -> ZImageCond:
        return ZImageCond([f for c in conds for f in c.feats])

    def flow_sigmas(self, steps: int, latent_shape) -> torch.Tensor:
        """QwenImagePipeline's schedule: ``linspace(1, 1/steps)`` through the scheduler's shift at the pipeline's
        ``calculate_shift`` of the image's tokens (the scheduler config's line), then 0; float32 [steps + 1]."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        h, w = latent_shape[-2:]
        sc = sched.config
        mu = calculate_shift((h // 2) * (w // 2), sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096),
                             sc.get("base_shift", 0.5), sc.get("max_shift", 1.15))
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return sched.sigmas.float().cpu()

    def memory_shape(self):
        """The transformer, Qwen2.5-VL's language model and the VAE as a DiT ``memory.ModelShape``, counted as
        ``memory.QWEN_IMAGE``."""
        from ..train import memory

        cfg = self.transformer.config
        hidden = cfg.num_attention_heads * cfg.attention_head_dim
        dit = memory.DiTShape(hidden, cfg.num_layers, 0, cfg.num_attention_heads, 4.0,
                              context_tokens=self.max_sequence_length, context_dim=cfg.joint_attention_dim,
                              patch_size=self.patch_size, latent_channels=self.latent_channels)
        c = self._te_config.get_text_config()
        te = memory.TextEncoderShape(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
                                     self.max_sequence_length)

        def count(m):
            return sum(p.numel() for p in m.parameters())

        return memory.ModelShape(self.model_name or "Qwen-Image", dit, (te,), unet_params=count(self.transformer),
                                 te_params=(self._te_params,), vae_params=count(self.vae),
                                 latent_factor=self.latent_factor, latent_channels=self.latent_channels)


def is_qwen_image_pipeline(folder: str | os.PathLike) -> bool:
    """Whether a diffusers folder's model_index.json names QwenImagePipeline."""
    return names_pipeline(folder, PIPELINE)
