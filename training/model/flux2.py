"""FLUX.2 klein (BFL's 4B / 9B, Base and distilled) in diffusers classes, for the CLI: a rectified-flow DiT.

The model is diffusers' ``Flux2Transformer2DModel`` with a Qwen3 text encoder and ``AutoencoderKLFlux2``, used as
``Flux2KleinPipeline`` uses them: the prompt through the pipeline's own ``encode_prompt`` (the chat template, padded
to 512 tokens, Qwen3's hidden states 9, 18 and 27 side by side: one [L, 3 x width] tensor per prompt, padding
included, since the transformer takes no mask), latents as the pipeline makes them (the VAE's mode cut into 2 x 2
patches, 4 x the VAE's channels at 1/16 of the image, then normalised by the VAE's batch-norm statistics) and one
token per latent pixel (patch size 1, 4-d position ids), ``timestep = sigma`` (the transformer multiplies by 1000) and
the velocity ``noise - x0`` as it is (no sign flip), no guidance embedding; previews on the pipeline's schedule
(``linspace(1, 1/steps)`` through the scheduler's exponential shift with the pipeline's empirical mu) and its
classifier-free guidance (uncond + g x (cond - uncond), ComfyUI's cfg; none for a distilled model).

The LoRA is trained on diffusers' split layers (``attn.to_q`` / ``to_k`` / ``to_v`` ...), each a peft LoRA, and
:meth:`DiffusersFlux2Backend.finalize_lora` joins them into BFL's fused ``double_blocks.N.img_attn.qkv`` exactly, as
the Flux backend does (the single blocks' ``attn.to_qkv_mlp_proj`` is BFL's ``linear1`` already). The file is kohya's
key format (``lora_unet_double_blocks_0_img_attn_qkv`` ...), which ``Flux2KleinPipeline.load_lora_weights`` and
ComfyUI both read.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from .archs import FLUX2
from .flux import FluxCond
from .pipeline_dit import DiffusersPipelineDiT, names_pipeline

log = logging.getLogger(__name__)

PIPELINE = "Flux2KleinPipeline"
ARCH = "flux2"
TEXT_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers
VARIANTS = {2560: "klein-4b", 4096: "klein-9b"}  # Qwen3-4B / Qwen3-8B's width -> the klein size


def patchify(lat: torch.Tensor) -> torch.Tensor:
    """[B, C, 2h, 2w] -> [B, 4C, h, w]: Flux2KleinPipeline._patchify_latents (channel c's 2 x 2 patch at 4c .. 4c+3)."""
    b, c, h, w = lat.shape
    return lat.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(lat: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`patchify`: Flux2KleinPipeline._unpatchify_latents."""
    b, c, h, w = lat.shape
    return lat.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def _bn_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's batch-norm mean and std over the patchified channels, shaped [1, C, 1, 1] like ``like``."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)


@torch.no_grad()
def encode_flux2(vae, pixels: torch.Tensor, device) -> torch.Tensor:
    """Latents [B, 4C, H/16, W/16] as Flux2KleinPipeline._encode_vae_image makes them: the VAE's mode, patchified,
    normalised by its batch-norm statistics; float32."""
    vae_dtype = next(vae.parameters()).dtype
    lat = patchify(vae.encode(pixels.to(device, dtype=vae_dtype)).latent_dist.mode())
    mean, std = _bn_stats(vae, lat)
    return ((lat - mean) / std).float()


@torch.no_grad()
def decode_flux2(vae, latents: torch.Tensor, device) -> torch.Tensor:
    """The inverse of :func:`encode_flux2`, decoded: images [B, H, W, 3] in 0..1, float32 on the CPU."""
    vae_dtype = next(vae.parameters()).dtype
    lat = latents.to(device, dtype=vae_dtype)
    mean, std = _bn_stats(vae, lat)
    img = vae.decode(unpatchify(lat * std + mean)).sample.float()
    return ((img + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).cpu()


class DiffusersFlux2Backend(DiffusersPipelineDiT):
    """FLUX.2 klein (``Flux2Transformer2DModel`` + Qwen3 + ``AutoencoderKLFlux2`` +
    ``FlowMatchEulerDiscreteScheduler``); prediction type "flow". ``weight_dtype`` fp8 stores the transformer in fp8
    with bf16 compute, as the Flux backend does. The text encoder is released once the run's prompts are encoded; a
    later encode reloads it from the model folder."""

    ARCH, LABEL, PIPELINE = ARCH, "FLUX.2 klein", PIPELINE
    patch_size = 1  # one token per (patchified) latent pixel
    timestep_sampling_default = FLUX2.timestep_sampling_for()  # flux_shift over those tokens

    def __init__(self, pipe, device: str | torch.device = "cpu", weight_dtype: torch.dtype = torch.float32,
                 model_name: str = "", max_sequence_length: int = 512, source: str | os.PathLike | None = None):
        super().__init__(pipe, device, weight_dtype, model_name, max_sequence_length, source)
        # klein 4B / 9B by their text encoder (Qwen3-4B / -8B); Base and distilled share the name
        self.variant = VARIANTS.get(self._te_config.hidden_size)
        self.latent_channels = self.transformer.config.in_channels  # the VAE's channels x 4 (2 x 2 patches)
        self.latent_factor = 2 * pipe.vae_scale_factor  # the VAE's 8 x the patches' 2
        # a distilled klein samples without the negative pass (the pipeline ignores guidance_scale for it)
        self.preview_guidance = 1.0 if pipe.config.get("is_distilled", False) else FLUX2.sample_cfg

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents [B, 4C, h, w] as Flux2KleinPipeline makes them (:func:`encode_flux2`)."""
        return encode_flux2(self.vae, pixels, self.device)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_flux2(self.vae, latents, self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> FluxCond:
        """``Flux2KleinPipeline.encode_prompt`` for ``prompts``: [B, L, 3 x width]; reloads a released encoder."""
        self._text_encoder_ready()
        embeds, _ = self.pipe.encode_prompt(list(prompts), device=self.device,
                                            max_sequence_length=self.max_sequence_length,
                                            text_encoder_out_layers=TEXT_LAYERS)
        return FluxCond(embeds)

    def predict(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: FluxCond) -> torch.Tensor:
        """The velocity ``noise - x0`` for latents ``x_t`` [B, C, h, w] at ``sigma`` [B] in [0, 1]: the transformer on
        one token per latent pixel at ``timestep = sigma``, as Flux2KleinPipeline calls it."""
        b, c, h, w = x_t.shape
        dt, dev = self.weight_dtype, x_t.device
        context = cond.context.to(dev, dt)
        tokens = x_t.to(dt).reshape(b, c, h * w).permute(0, 2, 1)  # Flux2KleinPipeline._pack_latents
        out = self.transformer(hidden_states=tokens, encoder_hidden_states=context, timestep=sigma.to(dev, dt),
                               img_ids=self.pipe._prepare_latent_ids(x_t).to(dev),
                               txt_ids=self.pipe._prepare_text_ids(context).to(dev), guidance=None,
                               return_dict=False)[0]
        return out.permute(0, 2, 1).reshape(b, c, h, w)  # the ids are row-major: _unpack_latents_with_ids

    def cat_cond(self, conds: list[FluxCond]) -> FluxCond:
        return FluxCond.cat(conds)

    def flow_sigmas(self, steps: int, latent_shape) -> torch.Tensor:
        """Flux2KleinPipeline's schedule: ``linspace(1, 1/steps)`` through the scheduler's shift at the pipeline's
        ``compute_empirical_mu`` (of the image's tokens and the step count), then 0; float32 [steps + 1]."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        h, w = latent_shape[-2:]
        mu = compute_empirical_mu(image_seq_len=h * w, num_steps=steps)
        if sched.config.get("use_flow_sigmas"):
            sched.set_timesteps(steps, mu=mu)
        else:
            sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        return sched.sigmas.float().cpu()

    def memory_shape(self):
        """The transformer, Qwen3 and the VAE as a DiT ``memory.ModelShape``, counted as ``memory.FLUX2_KLEIN_4B``:
        the VAE's latents at 1/8 in 2 x 2 patches (the same tokens as the patchified ones)."""
        from ..train import memory

        cfg = self.transformer.config
        hidden = cfg.num_attention_heads * cfg.attention_head_dim
        ff = self.transformer.transformer_blocks[0].ff.linear_in if cfg.num_layers else None
        # SwiGLU's three matrices counted as a plain MLP of the same parameters (0.75 x linear_in's rows: gate and
        # value at 3 x hidden each -> 4.5); the blocks take their modulation from three shared Linears
        ratio = 0.75 * ff.out_features / hidden if ff is not None else 1.5 * cfg.mlp_ratio
        lat = self.vae.config.latent_channels
        dit = memory.DiTShape(hidden, cfg.num_layers, cfg.num_single_layers, cfg.num_attention_heads, ratio,
                              context_tokens=self.max_sequence_length, context_dim=cfg.joint_attention_dim,
                              patch_size=2, latent_channels=lat, modulation=False)
        c = self._te_config
        te = memory.TextEncoderShape(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
                                     self.max_sequence_length)

        def count(m):
            return sum(p.numel() for p in m.parameters())

        return memory.ModelShape(self.model_name or "FLUX.2 klein", dit, (te,), unet_params=count(self.transformer),
                                 te_params=(self._te_params,), vae_params=count(self.vae),
                                 latent_factor=self.pipe.vae_scale_factor, latent_channels=lat)


def is_flux2_pipeline(folder: str | os.PathLike) -> bool:
    """Whether a diffusers folder's model_index.json names Flux2KleinPipeline."""
    return names_pipeline(folder, PIPELINE)
