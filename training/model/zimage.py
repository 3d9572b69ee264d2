"""Z-Image (Tongyi's Z-Image Base / Turbo) in diffusers classes, for the CLI: a single-stream rectified-flow DiT.

The model is diffusers' ``ZImageTransformer2DModel`` with a Qwen3 text encoder and a 16-channel ``AutoencoderKL``
(Flux's latent format: shifted and scaled), used as ``ZImagePipeline`` uses them: the prompt through the
pipeline's own ``encode_prompt`` (the chat template, Qwen3's second-to-last hidden states, only the prompt's own
tokens: one tensor of its own length per prompt), latents as a list of ``[C, 1, h, w]``, ``t = 1 - sigma`` (1 is
clean) and the output negated (the network predicts ``x0 - noise``; the engine's target is ``noise - x0``), the
scheduler's shift (3.0) for previews.

The LoRA is trained on diffusers' split layers (``attention.to_q`` / ``to_k`` / ``to_v`` ...), each a peft LoRA,
and :meth:`DiffusersZImageBackend.finalize_lora` joins them into the family's module names (NextDiT's fused
``layers.N.attention.qkv``) exactly, as the Flux backend does. The file is written in the family's key format
(``lora.diffusers_format``: ai-toolkit's ``diffusion_model.`` + diffusers names, each part at its trained rank),
which ``ZImagePipeline.load_lora_weights`` and ComfyUI both read.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from .archs import ZIMAGE
from .flux import DiffusersFluxBackend, decode_shifted, encode_shifted
from .pipeline_dit import DiffusersPipelineDiT, names_pipeline

log = logging.getLogger(__name__)

PIPELINE = "ZImagePipeline"
ARCH = "zimage"


@dataclass
class ZImageCond:
    """A batch's conditioning: one Qwen3 hidden-state tensor [L_i, D] per prompt, each only that prompt's own
    tokens (``ZImagePipeline._encode_prompt`` drops the padding; the transformer pads them itself)."""

    feats: list[torch.Tensor]

    def __getitem__(self, index) -> "ZImageCond":
        """The prompts at ``index`` (a slice, an index tensor, or an int: a batch of one)."""
        if isinstance(index, slice):
            return ZImageCond(self.feats[index])
        if isinstance(index, torch.Tensor):
            return ZImageCond([self.feats[i] for i in index.reshape(-1).tolist()])
        return ZImageCond([self.feats[index]])

    def __len__(self) -> int:
        return len(self.feats)

    def detach(self) -> "ZImageCond":
        return ZImageCond([f.detach() for f in self.feats])

    def to(self, *args: Any, **kwargs: Any) -> "ZImageCond":
        return ZImageCond([f.to(*args, **kwargs) for f in self.feats])


class DiffusersZImageBackend(DiffusersPipelineDiT):
    """Z-Image (``ZImageTransformer2DModel`` + Qwen3 + 16-channel VAE + ``FlowMatchEulerDiscreteScheduler``);
    prediction type "flow". ``weight_dtype`` fp8 stores the transformer in fp8 with bf16 compute, as the Flux
    backend does. The text encoder is released once the run's prompts are encoded; a later encode reloads it
    from the model folder."""

    ARCH, LABEL, PIPELINE = ARCH, "Z-Image", PIPELINE
    patch_size = 2
    timestep_sampling_default = ZIMAGE.timestep_sampling_for()  # logit-normal, as SD3
    preview_guidance = ZIMAGE.sample_cfg  # ComfyUI's cfg (uncond + g * (cond - uncond)), as the ComfyUI host

    def __init__(self, pipe, device: str | torch.device = "cpu", weight_dtype: torch.dtype = torch.float32,
                 model_name: str = "", max_sequence_length: int = 512, source: str | os.PathLike | None = None):
        super().__init__(pipe, device, weight_dtype, model_name, max_sequence_length, source)
        self.variant = None  # Base and Turbo share one LoRA family and modelspec name
        self.latent_channels = self.transformer.config.in_channels
        blocks = getattr(self.vae.config, "block_out_channels", None)
        self.latent_factor = 2 ** (len(blocks) - 1) if blocks else 8

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents [B, 16, h, w] as ZImagePipeline makes them (Flux's VAE shift and scale)."""
        return encode_shifted(self.vae, pixels, self.device)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return decode_shifted(self.vae, latents, self.device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> ZImageCond:
        """``ZImagePipeline.encode_prompt`` for ``prompts`` (no negative pass); reloads a released encoder."""
        self._text_encoder_ready()
        feats, _ = self.pipe.encode_prompt(list(prompts), device=self.device, do_classifier_free_guidance=False,
                                           max_sequence_length=self.max_sequence_length)
        return ZImageCond(list(feats))

    def predict(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: ZImageCond) -> torch.Tensor:
        """The velocity ``noise - x0`` for latents ``x_t`` [B, C, h, w] at ``sigma`` [B] in [0, 1]: the transformer
        at ``t = 1 - sigma`` on per-item lists, negated (as ZImagePipeline does)."""
        dt = self.weight_dtype
        x = x_t.to(dt).unsqueeze(2)  # [B, C, 1, h, w]: one frame
        t = (1.0 - sigma).to(x_t.device, dt)
        out = self.transformer(list(x.unbind(0)), t, [f.to(x_t.device, dt) for f in cond.feats], return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def cat_cond(self, conds: list[ZImageCond]) -> ZImageCond:
        return ZImageCond([f for c in conds for f in c.feats])

    # ZImagePipeline's schedule: linspace(1, 1/steps) through the scheduler's shift (mu by the image's tokens when
    # it shifts dynamically), then 0 - FluxPipeline's, which the Flux backend computes from the same attributes.
    flow_sigmas = DiffusersFluxBackend.flow_sigmas

    def memory_shape(self):
        """The transformer (main layers and refiners as single-stream blocks over the joined tokens), Qwen3 and the
        VAE as a DiT ``memory.ModelShape``."""
        from ..train import memory

        cfg = self.transformer.config
        ff = self.transformer.layers[0].feed_forward.w1
        # SwiGLU's three matrices counted as a plain MLP of the same parameters (1.5 x w1's width); NextDiT
        # modulates from a 256-wide vector, not with a token-wide Linear per block (as ``memory.ZIMAGE``)
        dit = memory.DiTShape(cfg.dim, 0, cfg.n_layers + 2 * cfg.n_refiner_layers, cfg.n_heads,
                              1.5 * ff.out_features / cfg.dim, context_tokens=self.max_sequence_length,
                              context_dim=cfg.cap_feat_dim, patch_size=self.patch_size, latent_channels=cfg.in_channels,
                              modulation=False)
        c = self._te_config
        te = memory.TextEncoderShape(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
                                     self.max_sequence_length)

        def count(m):
            return sum(p.numel() for p in m.parameters())

        return memory.ModelShape(self.model_name or "Z-Image", dit, (te,), unet_params=count(self.transformer),
                                 te_params=(self._te_params,), vae_params=count(self.vae),
                                 latent_factor=self.latent_factor, latent_channels=self.latent_channels)


def is_zimage_pipeline(folder: str | os.PathLike) -> bool:
    """Whether a diffusers folder's model_index.json names ZImagePipeline."""
    return names_pipeline(folder, PIPELINE)
