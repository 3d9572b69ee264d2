"""The benchmark's models, built on the fly with random weights (nothing is downloaded).

Two sizes of one SD1.5-detected model:

- ``tiny``: the host tests' checkpoint (one UNet level, 19M UNet parameters) at 64x64 px:
  overhead-bound, like a small GPU job whose time goes to Python and kernel launches.
- ``real``: the full SD1.5 UNet (320/640/1280/1280 channels, 2 res blocks per level, the real
  transformer depths, 860M parameters) at 256x256 px: compute-bound, the closest a CPU gets to
  what a GPU user runs.

Both carry a full CLIP-L and a TAESD VAE. For ComfyUI they are state dicts keyed like a real
.safetensors checkpoint (``ComfyUI`` classes, see tests/host/tiny_sd15.py); for the standalone
engine and diffusers' script they are the same shapes in diffusers classes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Size:
    name: str
    pixels: int  # training resolution (square)
    images: int  # dataset size
    warmup: int  # steps excluded from timing at the start of each run
    measured: int  # steps timed per run


SIZES = {
    "tiny": Size("tiny", 64, 4, warmup=3, measured=12),
    "real": Size("real", 256, 2, warmup=1, measured=2),
}


def comfy_unet_config(size: str) -> dict:
    sys.path.insert(0, str(REPO / "tests" / "host"))
    import tiny_sd15

    return tiny_sd15.UNET_CONFIG if size == "tiny" else tiny_sd15.REAL_SD15_UNET_CONFIG


def comfy_state_dict(size: str, seed: int = 0):
    """State dict of the ComfyUI checkpoint (fp32: the benchmark trains in fp32 on the CPU)."""
    import torch

    sys.path.insert(0, str(REPO / "tests" / "host"))
    import tiny_sd15

    return tiny_sd15.build_state_dict(seed, comfy_unet_config(size), dtype=torch.float32)


def diffusers_unet_kwargs(size: str) -> dict:
    """UNet2DConditionModel arguments with the same layers as the ComfyUI UNet of ``size``."""
    if size == "tiny":
        return dict(sample_size=8, block_out_channels=(320,), down_block_types=("CrossAttnDownBlock2D",),
                    up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, mid_block_type=None,
                    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
    return dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                cross_attention_dim=768, attention_head_dim=8)


CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)

SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      prediction_type="epsilon", clip_sample=False, steps_offset=1)


def diffusers_components(size: str, tokenizer_dir: Path, seed: int = 0, kl_vae: bool = False) -> dict:
    """unet, text_encoder, tokenizer, vae, scheduler in diffusers/transformers classes."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from lora_workbench.training.model.tiny import tiny_vocab_size, write_tiny_tokenizer

    torch.manual_seed(seed)
    v = tiny_vocab_size()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=v, bos_token_id=v - 2, eos_token_id=v - 1,
                                                pad_token_id=v - 1, **CLIP_L))
    # diffusers' DreamBooth script loads an AutoencoderKL; a small one encodes the same latent shape.
    vae = (AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32,
                         sample_size=SIZES[size].pixels)
           if kl_vae else AutoencoderTiny())
    return dict(unet=UNet2DConditionModel(**diffusers_unet_kwargs(size)), text_encoder=text_encoder,
                tokenizer=CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(tokenizer_dir))),
                vae=vae, scheduler=DDPMScheduler(**SD15_SCHEDULER))


def write_diffusers_folder(size: str, folder: Path, seed: int = 0) -> Path:
    """A diffusers model folder of ``size`` (for diffusers' DreamBooth LoRA script)."""
    from diffusers import StableDiffusionPipeline

    if (folder / "model_index.json").is_file():
        return folder
    c = diffusers_components(size, folder / "tokenizer", seed=seed, kl_vae=True)
    pipe = StableDiffusionPipeline(**c, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


def write_images(folder: Path, n: int, pixels: int, caption: str = "a photo of sks ball") -> Path:
    """``n`` seeded pictures (a coloured disc on a gradient) with .txt captions."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:pixels, 0:pixels] / pixels
    for i in range(n):
        base = np.stack([xx, yy, 1 - xx], -1) * rng.uniform(0.3, 1.0, 3)
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
        base[disc] = rng.uniform(0, 1, 3)
        Image.fromarray((base * 255).astype(np.uint8)).save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(caption)
    return folder
