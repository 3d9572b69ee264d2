"""A tiny SDXL-shaped model built from configs with random weights, for tests and bench.

Everything SDXL has that SD1 has not is here, only small: two text encoders (a CLIP-L-like
``CLIPTextModel`` and a CLIP-G-like ``CLIPTextModelWithProjection`` whose pooled projection feeds
the UNet), a UNet with ``addition_embed_type="text_time"`` (the pooled text + six size/crop numbers
through ``add_embedding``), cross-attention over both encoders' hidden states side by side, and
SDXL's block pattern (no attention on the first level, deeper transformers further down), so its
LDM module names are a subset of the real SDXL UNet's. The tokenizers are the byte-level one of
:mod:`.tiny`; the second pads with ``!`` as SDXL's ``tokenizer_2`` does.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .tiny import TINY_SCHEDULER, TINY_VAE, tiny_vocab_size, write_tiny_tokenizer

TE1_HIDDEN, TE2_HIDDEN, TE2_PROJECTION = 32, 64, 64
TIME_EMBED_DIM = 8  # per size/crop number (256 in SDXL)

TINY_SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),
    cross_attention_dim=TE1_HIDDEN + TE2_HIDDEN,
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=TE2_PROJECTION + 6 * TIME_EMBED_DIM,
    norm_num_groups=8,
)

_TEXT = dict(max_position_embeddings=77, num_hidden_layers=3, num_attention_heads=4)
TINY_TE1 = dict(hidden_size=TE1_HIDDEN, intermediate_size=64, projection_dim=TE1_HIDDEN, **_TEXT)
TINY_TE2 = dict(hidden_size=TE2_HIDDEN, intermediate_size=128, projection_dim=TE2_PROJECTION, **_TEXT)

TINY_SDXL_VAE = dict(TINY_VAE, scaling_factor=0.13025)  # SDXL's VAE scale


def _text_config(**kw):
    from transformers import CLIPTextConfig

    v = tiny_vocab_size()
    return CLIPTextConfig(vocab_size=v, bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=v - 1, **kw)


def build_tiny_sdxl_components(seed: int = 0, tokenizer_dir: str | os.PathLike | None = None) -> dict:
    """The keyword arguments of ``StableDiffusionXLPipeline`` for a tiny SDXL-shaped model."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_SDXL_UNET)
    text_encoder = CLIPTextModel(_text_config(**TINY_TE1))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(**TINY_TE2))
    vae = AutoencoderKL(**TINY_SDXL_VAE)
    if tokenizer_dir is None:
        import tempfile

        tokenizer_dir = tempfile.mkdtemp(prefix="lw_tiny_tok_")
    folder = str(write_tiny_tokenizer(tokenizer_dir))
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    tokenizer_2 = CLIPTokenizer.from_pretrained(folder, pad_token="!")
    scheduler = DDPMScheduler(**TINY_SCHEDULER)
    return dict(unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                tokenizer_2=tokenizer_2, vae=vae, scheduler=scheduler)


def tiny_sdxl_pipeline(seed: int = 0):
    """``StableDiffusionXLPipeline`` over the tiny components (no watermarker, nothing downloaded)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**build_tiny_sdxl_components(seed=seed), add_watermarker=False)


def save_tiny_sdxl_pipeline(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a complete SDXL diffusers folder (model_index.json + components) of the tiny model."""
    folder = Path(folder)
    tiny_sdxl_pipeline(seed=seed).save_pretrained(str(folder), safe_serialization=True)
    return folder
