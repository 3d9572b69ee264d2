"""A tiny checkpoint that ComfyUI detects as Stable Diffusion 1.5.

ComfyUI's ``model_detection`` reads the UNet's shape from its keys and matches it against
``supported_models.SD15``, which pins only ``model_channels == 320`` and ``context_dim == 768``
(plus no linear proj_in, no ADM input, no temporal layers). So a UNet with a single level
(one res block + one transformer block, no middle block) still loads as SD15, with the real
SD1.5 key names, at 19M parameters instead of 860M. The text encoder is a full-size CLIP-L
(123M: its shapes are fixed by the tokenizer and by SD15's clip target) and the VAE is a TAESD
(2.4M), which ComfyUI's ``VAE`` recognises by its ``taesd_decoder.*`` keys. The file is ~290 MB
in fp16, builds in ~5 s and loads in ~2 s on a 2-core CPU.

Every module is built with ComfyUI's own classes on the ``meta`` device, so the key names and
shapes are exactly what ComfyUI expects, then filled with seeded random values and saved in
fp16. Nothing here is imported until ComfyUI is on ``sys.path``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# The config ComfyUI's detect_unet_config() derives from the keys of this UNet, plus SD15's
# unet_extra_config (num_heads 8, num_head_channels -1): building with it yields those keys.
UNET_CONFIG = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,  # pinned by SD15 detection
    "context_dim": 768,  # pinned by SD15 detection (CLIP-L width)
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": -2,  # -2: no middle block at all
    "num_heads": 8,
    "num_head_channels": -1,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": False,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}


def _random_fill(name: str, meta_tensor, generator):
    """A seeded value for one parameter: scaled normal for matrices, identity for norms."""
    import torch

    shape = meta_tensor.shape
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    if name.endswith("vae_scale"):
        return torch.ones(shape)
    if name.endswith(".weight"):  # 1-d weights are norm scales
        return torch.ones(shape)
    return torch.zeros(shape)  # biases, vae_shift


# The real SD1.5 UNet (ComfyUI's model_detection SD15 entry): 860M parameters. The benchmark
# builds it with random weights as its "real-shape" model.
REAL_SD15_UNET_CONFIG = {
    **UNET_CONFIG,
    "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1,
}


def build_state_dict(seed: int = 0, unet_config: dict | None = None, dtype=None) -> dict:
    """The tiny SD1.5 checkpoint's state dict (fp16), keyed like a real SD1.5 .safetensors.

    ``unet_config`` swaps in another SD1.5-detected UNet shape (e.g. ``REAL_SD15_UNET_CONFIG``).
    """
    import torch

    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ops = comfy.ops.disable_weight_init
    dtype = dtype or torch.float16
    unet = UNetModel(**(unet_config or UNET_CONFIG), device="meta", operations=ops)

    clip_config_path = Path(comfy.sd1_clip.__file__).with_name("sd1_clip_config.json")  # real CLIP-L shapes
    clip_config = json.loads(clip_config_path.read_text())
    clip = comfy.clip_model.CLIPTextModel(clip_config, dtype=torch.float16, device="meta", operations=ops)

    with torch.device("meta"):
        taesd = comfy.taesd.taesd.TAESD(latent_channels=4)

    parts = {
        "model.diffusion_model.": unet.state_dict(),
        # Real SD1.5 files carry only text_model.* (no text_projection): ComfyUI supplies it.
        "cond_stage_model.transformer.": {
            k: v for k, v in clip.state_dict().items() if k.startswith("text_model.")
        },
        "first_stage_model.": taesd.state_dict(),
    }
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for prefix, tensors in parts.items():
        for key, meta_tensor in tensors.items():
            name = prefix + key
            state_dict[name] = _random_fill(name, meta_tensor, generator).to(dtype)
    return state_dict


def write_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write the tiny checkpoint to ``path`` (a .safetensors file) and return the path."""
    import safetensors.torch

    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(build_state_dict(seed), str(path))
    return path
