"""Z-Image LoRA names and files: the family entry's three block lists, ai-toolkit's key format written and read
back exactly (q/k/v split and fused at the trained rank), musubi's and ComfyUI-native files read, detection and
block weights. No model: shapes follow a narrow NextDiT."""

from __future__ import annotations

import pytest
import safetensors
import torch

from lora_workbench.training.lora.block_weights import BlockWeightError, block_of, parse_block_weights
from lora_workbench.training.lora.files import LoraModule, LoraWeights, save_lora
from lora_workbench.training.lora.formats import detect_arch, load_lora
from lora_workbench.training.model import archs
from lora_workbench.training.model import dit_keys as dk

H, FFN = 64, 170
SHAPES = {"layers.0.attention.qkv": (3 * H, H), "layers.0.attention.out": (H, H), "layers.0.feed_forward.w1": (FFN, H),
          "layers.0.feed_forward.w2": (H, FFN), "layers.0.adaLN_modulation.0": (4 * H, 16),
          "noise_refiner.1.attention.qkv": (3 * H, H), "context_refiner.0.feed_forward.w3": (FFN, H)}


def zimage_lora(seed: int = 0) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    return LoraWeights({dk.kohya_dit_name(p): LoraModule(torch.randn(4, i, generator=g), torch.randn(o, 4, generator=g),
                                                          2.0) for p, (o, i) in SHAPES.items()}, {}, "zimage")


def test_entry_names_the_main_layers_and_both_refiners():
    spec = archs.ZIMAGE
    assert spec.block_prefixes == ("layers", "noise_refiner", "context_refiner")
    paths = spec.module_paths()
    assert "context_refiner.1.attention.qkv" in paths and "context_refiner.1.adaLN_modulation.0" not in paths
    assert "noise_refiner.1.adaLN_modulation.0" in paths and "layers.29.feed_forward.w3" in paths
    assert dk.diffusers_to_bfl("context_refiner.1.attention.to_k", "zimage") == ("context_refiner.1.attention.qkv", 1, 3)
    assert dk.matches_preset("noise_refiner.0.attention.out", "attn", "zimage")
    assert not dk.matches_preset("layers.0.feed_forward.w1", "attn", "zimage")


def test_file_is_ai_toolkit_keys_and_reads_back_exactly(tmp_path):
    lora = zimage_lora()
    path = save_lora(tmp_path / "z.safetensors", lora, dtype="fp32")
    with safetensors.safe_open(path, "pt") as f:
        keys = set(f.keys())
    assert all(k.startswith("diffusion_model.") for k in keys)
    assert {"diffusion_model.layers.0.attention.to_q.lora_A.weight",
            "diffusion_model.layers.0.attention.to_out.0.lora_B.weight",
            "diffusion_model.noise_refiner.1.attention.to_v.lora_A.weight"} <= keys
    back = load_lora(path)
    assert back.arch == "zimage" and set(back.modules) == set(lora.modules)
    for name, m in lora.modules.items():
        assert back.modules[name].rank == m.rank
        torch.testing.assert_close(back.modules[name].delta(), m.delta(), rtol=1e-6, atol=1e-5)


def test_musubi_and_comfyui_native_files_are_read():
    lora = zimage_lora(1)
    musubi, native = {}, {}
    for name, m in lora.modules.items():
        path = dk.parse_kohya_dit_name(name, "zimage")
        native.update({f"diffusion_model.{path}.lora_down.weight": m.down, f"diffusion_model.{path}.lora_up.weight": m.up,
                       f"diffusion_model.{path}.alpha": torch.tensor(m.alpha)})
        if path.endswith("attention.qkv"):  # musubi trains diffusers' split layers: q, k, v in kohya form
            rows = m.up.shape[0] // 3
            for i, part in enumerate(("to_q", "to_k", "to_v")):
                key = "lora_unet_" + path.replace("qkv", part).replace(".", "_")
                musubi.update({f"{key}.lora_down.weight": m.down, f"{key}.lora_up.weight": m.up[i * rows:(i + 1) * rows],
                               f"{key}.alpha": torch.tensor(m.alpha)})
    assert detect_arch(native) == detect_arch(musubi) == "zimage"
    for name, m in lora.modules.items():
        torch.testing.assert_close(load_lora(native).modules[name].delta(), m.delta())
    back = load_lora(musubi)
    qkv = "lora_unet_layers_0_attention_qkv"
    torch.testing.assert_close(back.modules[qkv].delta(), lora.modules[qkv].delta())


def test_block_weights_name_the_main_layers():
    assert block_of("lora_unet_layers_7_attention_qkv", "zimage") == "L07"
    assert block_of("lora_unet_noise_refiner_0_attention_qkv", "zimage") == "BASE"
    assert parse_block_weights(",".join(["1"] * 31), "zimage").values["L29"] == 1.0
    with pytest.raises(BlockWeightError, match="2 values; zimage takes 31 values"):
        parse_block_weights("1,2", "zimage")
