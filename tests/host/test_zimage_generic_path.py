"""Z-Image through the generic flow path before it has a family entry: ComfyUI's Z-Image MODEL (tiny set of
``fixtures/tiny_zimage.py``: the pinned 3840-wide NextDiT with one main layer, a full-size Qwen3-4B in fp8) trains
as an untested flow model, and ComfyUI's LoraLoader takes every module of the file.

This is what a user gets today on Z-Image; the family entry (presets, diffusers key format, block weights) is
issue 17's next step. Its tokenizer turns ComfyUI's prompt weighting off itself, which the backend must allow.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from fixtures import tiny_zimage

HOST_LIMIT = ("host limit: this ComfyUI has no Z-Image (comfy.supported_models.ZImage, added after 0.3.64); "
              "the Z-Image tests run on 0.33+")


def test_zimage_trains_untested_and_loraloader_takes_every_key(comfy_host, tmp_path_factory, caplog):
    import comfy.supported_models
    import nodes

    from comfy_harness import release_models
    from lora_workbench.nodes.comfy.backend import comfy_backend
    from lora_workbench.training.config import TrainConfig
    from lora_workbench.training.lora.files import save_lora
    from lora_workbench.training.train.trainer import TrainData, Trainer
    from test_flux_nodes import make_dataset

    if not hasattr(comfy.supported_models, "ZImage"):
        pytest.skip(HOST_LIMIT)
    paths = tiny_zimage.build_zimage_set(tmp_path_factory.mktemp("tiny_zimage"))
    names = tiny_zimage.link_zimage_set(paths, comfy_host.base_directory / "models")
    model, clip, vae = tiny_zimage.load_tiny_zimage(names)
    try:
        be = comfy_backend(model, clip, vae, model_name=names["dit"])
        assert be.untested and be.arch == "other_flow" and be.flow_shift == pytest.approx(3.0)
        records, dcfg = make_dataset(tmp_path_factory.mktemp("zimage_photos"))
        cfg = TrainConfig(rank=4, alpha=4, preset="attn", steps=3, lr=1e-3, seed=0, output_name="zimage")
        trainer = Trainer(be, TrainData(records, dcfg), cfg)
        with torch.inference_mode(), be.training_context():
            lora = trainer.run(keep_injected=True).lora
        assert all(math.isfinite(v) for v in trainer.losses)
        # attention of the main layer and of the four refiner blocks: qkv + out each
        assert len(lora.modules) == 10 and "lora_unet_layers_0_attention_qkv" in lora.modules
        save_lora(comfy_host.base_directory / "models" / "loras" / "lw_zimage.safetensors", lora, dtype="fp32")
        with caplog.at_level(logging.WARNING), torch.inference_mode():
            m, _ = nodes.LoraLoader().load_lora(model, clip, "lw_zimage.safetensors", 1.0, 1.0)
        assert "lora key not loaded" not in caplog.text and len(m.patches) == len(lora.modules)
    finally:
        del model, clip, vae
        release_models()
