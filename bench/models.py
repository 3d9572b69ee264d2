"""The benchmark's models, built on the fly with random weights (nothing is downloaded).

Sizes (``SIZES``), each one model family at one resolution:

- ``tiny``: the host tests' SD1.5-detected checkpoint (one UNet level, 19M UNet parameters) at 64x64 px:
  overhead-bound, like a small GPU job whose time goes to Python and kernel launches.
- ``real``: the full SD1.5 UNet (320/640/1280/1280 channels, 2 res blocks per level, the real
  transformer depths, 860M parameters) at 256x256 px: compute-bound, the closest a CPU gets to
  what a GPU user runs.
- ``flux``: a Flux.1-dev-shaped DiT, one double and one single block at hidden 3072 (the real
  width, ~0.5G parameters), with CLIP-L, a full-size fp8 T5-XXL and the Flux "ae" VAE, at 128x128 px
  (the CPU stand-in for the real 512 px; ComfyUI pads T5 to 256 tokens, so the text stream is most
  of the work at this size).
- GPU sizes (``bench/gpu.sh``): ``real512`` (the SD1.5 UNet at 512 px), ``sdxl`` (the full SDXL
  UNet, 2.6G parameters, at 1024 px) and ``flux512`` (the Flux-shaped DiT at 512 px).

SD1.5 and SDXL carry full text encoders and a TAESD VAE. For ComfyUI they are state dicts keyed like
a real .safetensors checkpoint (``ComfyUI`` classes, see tests/host/tiny_sd15.py / tiny_sdxl.py); for
the standalone engine and diffusers' script the SD1.5 shapes are rebuilt in diffusers classes. The
Flux set is written as files, once per machine, by ``bench/flux.py`` (tests/fixtures/tiny_flux.py).
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
    family: str = "sd15"  # sd15 | sdxl | flux
    model: str = ""  # the model, in words, for the table's heading


SIZES = {
    "tiny": Size("tiny", 64, 4, warmup=3, measured=12, model="SD1.5 tiny UNet (19M)"),
    "real": Size("real", 256, 2, warmup=1, measured=2, model="SD1.5 UNet (860M)"),
    "flux": Size("flux", 128, 2, warmup=1, measured=2, family="flux",
                 model="Flux.1-dev-shaped DiT, 1 double + 1 single block at hidden 3072"),
    # GPU sizes (bench/gpu.sh): the resolutions users train at.
    "real512": Size("real512", 512, 2, warmup=2, measured=6, model="SD1.5 UNet (860M)"),
    "sdxl": Size("sdxl", 1024, 2, warmup=2, measured=6, family="sdxl", model="SDXL UNet (2.6G)"),
    "flux512": Size("flux512", 512, 2, warmup=2, measured=6, family="flux",
                    model="Flux.1-dev-shaped DiT, 1 double + 1 single block at hidden 3072"),
}

# The real SDXL UNet (ComfyUI's model_detection SDXL entry, 2.6G parameters), the tiny fixture's
# pinned values with SDXL's own widths and depths.
REAL_SDXL_UNET_CHANGES = {"channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
                          "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
                          "transformer_depth_middle": 10}


def comfy_unet_config(size: str) -> dict:
    sys.path.insert(0, str(REPO / "tests" / "host"))
    import tiny_sd15

    return tiny_sd15.UNET_CONFIG if size == "tiny" else tiny_sd15.REAL_SD15_UNET_CONFIG


def comfy_state_dict(size: str, seed: int = 0):
    """State dict of the ComfyUI checkpoint (fp32: the benchmark trains fp32 base weights)."""
    import torch

    sys.path.insert(0, str(REPO / "tests" / "host"))
    if SIZES[size].family == "sdxl":
        return sdxl_state_dict(seed)
    import tiny_sd15

    return tiny_sd15.build_state_dict(seed, comfy_unet_config(size), dtype=torch.float32)


def sdxl_unet(device: str = "meta"):
    """ComfyUI's UNetModel with SDXL's real shape (on ``meta``: the shapes alone, for detection checks)."""
    sys.path.insert(0, str(REPO / "tests" / "host"))
    import comfy.ops
    import tiny_sdxl
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**{**tiny_sdxl.UNET_CONFIG, **REAL_SDXL_UNET_CHANGES}, device=device,
                     operations=comfy.ops.disable_weight_init)


def sdxl_state_dict(seed: int = 0) -> dict:
    """The full SDXL checkpoint (UNet, CLIP-L, CLIP-G, TAESD) with random weights, fp32, keyed like a real
    SDXL .safetensors: tests/host/tiny_sdxl.py's checkpoint (its text encoders and TAESD have the fixed
    real shapes) with its UNet replaced by SDXL's real one."""
    import torch

    sys.path.insert(0, str(REPO / "tests" / "host"))
    import tiny_sdxl

    prefix = "model.diffusion_model."
    sd = {k: v.float() for k, v in tiny_sdxl.build_state_dict(seed).items() if not k.startswith(prefix)}
    generator = torch.Generator().manual_seed(seed)
    for k, v in sdxl_unet("meta").state_dict().items():
        sd[prefix + k] = tiny_sdxl._random_fill(prefix + k, v, generator).float()
    return sd


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
