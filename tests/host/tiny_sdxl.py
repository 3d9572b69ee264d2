"""A tiny checkpoint that ComfyUI detects as an SDXL-family model (its ``Segmind_Vega`` class).

ComfyUI's ``model_detection`` matches a UNet against each ``supported_models`` entry by a few
config values. The SDXL family pins ``model_channels == 320``, ``context_dim == 2048`` (CLIP-L 768
+ CLIP-G 1280), ``adm_in_channels == 2816`` (pooled 1280 + 6 x 256 size embeddings), linear
``proj_in`` and the per-ResBlock transformer depths of the way down. The smallest of those depth
lists is Segmind Vega's ``[0, 0, 1, 1, 2, 2]`` (3 levels x 2 ResBlocks); channel widths
(``channel_mult``), the way up and the middle block are not pinned, so this UNet keeps every level
at 320 channels and has no middle block: 78M parameters instead of SDXL's 2.6B, with the real
SDXL module names (``input_blocks.4.1.transformer_blocks.0...``). ComfyUI loads it as
``model_base.SDXL`` with the SDXL CLIP, latent format and ``encode_adm``.

The text encoders cannot shrink: ComfyUI builds SDXL's CLIP-L and CLIP-G from fixed configs, so the
file holds a full CLIP-G (694M parameters) and is ~1.7 GB in fp16. Tests build it once per session
(``tiny_sdxl_checkpoint`` in conftest.py) in a temporary folder. The VAE is a TAESD, as in
``tiny_sd15``. Text encoders are saved through ComfyUI's own ``SDXL.process_clip_state_dict_for_saving``,
so the keys are those of a real SDXL file (``conditioner.embedders.0.transformer.*`` for CLIP-L,
OpenCLIP names under ``conditioner.embedders.1.model.*`` for CLIP-G).
"""

from __future__ import annotations

import json
from pathlib import Path

from tiny_sd15 import _random_fill

UNET_CONFIG = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,  # pinned by SDXL detection
    "context_dim": 2048,  # pinned (CLIP-L + CLIP-G widths)
    "adm_in_channels": 2816,  # pinned (pooled CLIP-G + size/crop embeddings)
    "num_classes": "sequential",
    "num_res_blocks": [2, 2, 2],
    "channel_mult": [1, 1, 1],
    "transformer_depth": [0, 0, 1, 1, 2, 2],  # pinned: Segmind Vega's
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2],
    "transformer_depth_middle": -2,  # no middle block
    "num_heads": -1,
    "num_head_channels": 64,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": True,  # pinned
    "legacy": False,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
}


def build_state_dict(seed: int = 0) -> dict:
    """The tiny SDXL-family checkpoint's state dict (fp16), keyed like a real SDXL .safetensors."""
    import torch

    import comfy.clip_model
    import comfy.ops
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ops = comfy.ops.disable_weight_init
    generator = torch.Generator().manual_seed(seed)

    def filled(prefix: str, module) -> dict:
        return {prefix + k: _random_fill(prefix + k, v, generator).to(torch.float16)
                for k, v in module.state_dict().items()}

    unet = UNetModel(**UNET_CONFIG, device="meta", operations=ops)
    with torch.device("meta"):
        taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    comfy_dir = Path(comfy.sd1_clip.__file__).parent
    clip = {}
    for name, config in (("clip_l", "sd1_clip_config.json"), ("clip_g", "clip_config_bigg.json")):
        model = comfy.clip_model.CLIPTextModel(json.loads((comfy_dir / config).read_text()), dtype=torch.float16,
                                               device="meta", operations=ops)
        clip.update(filled(f"{name}.transformer.", model))
    state_dict = filled("model.diffusion_model.", unet)
    state_dict.update(filled("first_stage_model.", taesd))
    # CLIP-L as Hugging Face names, CLIP-G as OpenCLIP names: ComfyUI's own SDXL save conversion.
    state_dict.update(comfy.supported_models.SDXL(dict(UNET_CONFIG)).process_clip_state_dict_for_saving(clip))
    return state_dict


def write_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write the tiny SDXL checkpoint to ``path`` (a .safetensors file) and return the path."""
    import safetensors.torch

    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(build_state_dict(seed), str(path))
    return path
