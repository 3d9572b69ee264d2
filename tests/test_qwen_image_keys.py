"""Qwen-Image LoRA names and files: the family entry (60 two-stream blocks whose modules carry diffusers' names),
ai-toolkit's key format written and read back exactly, what diffusers' QwenImagePipeline converts, musubi's and
diffusers' files read, detection, block weights, and qwen_shift. No model: diffusers' QwenImageTransformer2DModel at a
tiny width checks the names."""

from __future__ import annotations

import math

import pytest
import safetensors
import torch
from torch import nn

from lora_workbench.training.lora.block_weights import BlockWeightError, block_of, parse_block_weights
from lora_workbench.training.lora.files import LoraModule, LoraWeights, save_lora
from lora_workbench.training.lora.formats import detect_arch, load_lora
from lora_workbench.training.lora.metadata import kohya_metadata
from lora_workbench.training.model import dit_keys as dk
from lora_workbench.training.model.archs import arch_from_metadata, get_arch
from lora_workbench.training.train.schedules import sample_flow_sigmas

H = 16  # tiny hidden width (MLP 4 H, modulation 6 H)
ROWS = {"img_mlp.net.0.proj": 4, "txt_mlp.net.0.proj": 4, "img_mod.1": 6, "txt_mod.1": 6}
INS = {"img_mlp.net.2": 4, "txt_mlp.net.2": 4}


def qwen_lora(seed: int = 0, blocks=(0, 1), rank: int = 4, alpha: float = 2.0) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for i in blocks:
        for child in get_arch("qwen_image").dit.double_modules:
            o, n = ROWS.get(child, 1) * H, INS.get(child, 1) * H
            modules[dk.kohya_dit_name(f"transformer_blocks.{i}.{child}")] = LoraModule(
                torch.randn(rank, n, generator=g), torch.randn(o, rank, generator=g), alpha)
    return LoraWeights(modules, {}, "qwen_image")


def test_entry_names_qwen_image_as_musubi_and_comfyui_do():
    a = get_arch("qwen_image")
    assert a.file_format == "diffusers" and a.dit.diffusers_head == "diffusion_model." and a.comfy_models == ("QwenImage",)
    for spec in ("Qwen-Image/lora", "Qwen-Image-Edit-2511"):
        assert arch_from_metadata({"modelspec.architecture": spec}) == "qwen_image"
    md = kohya_metadata(arch="qwen_image", network_dim=8, network_alpha=8, timestep_sampling="qwen_shift")
    assert md["modelspec.architecture"] == "Qwen-Image/lora" and md["ss_base_model_version"] == "qwen_image"
    assert md["ss_network_module"] == "networks.lora_qwen_image"
    paths = a.dit.module_paths()
    assert len([p for p in paths if p.startswith("transformer_blocks.59.")]) == 14
    assert dk.matches_preset("transformer_blocks.3.attn.add_v_proj", "attn", "qwen_image")
    assert not dk.matches_preset("transformer_blocks.3.img_mlp.net.2", "attn", "qwen_image")
    assert dk.matches_preset("transformer_blocks.3.img_mod.1", "all", "qwen_image")
    assert a.dit.timestep_sampling_for() == "qwen_shift"


def test_module_names_are_linears_of_diffusers_qwen_image_with_those_rows():
    import diffusers

    model = diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                                  axes_dims_rope=(2, 2, 4))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    parts = dk.diffusers_parts("qwen_image", depth=2, hidden=H)
    assert set(parts) == {p for p in get_arch("qwen_image").dit.module_paths()
                          if not p.startswith("transformer_blocks.") or int(p.split(".")[1]) < 2}
    assert set(parts) == {n for n in linears}  # every Linear of the model, outer layers included
    for path, ((diff, rows),) in parts.items():
        assert diff == path and rows in (-1, linears[diff].out_features), (path, rows, linears[diff].out_features)


def test_file_is_ai_toolkit_keys_that_diffusers_converts_and_reads_back_exactly(tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers

    lora = qwen_lora()
    path = save_lora(tmp_path / "q.safetensors", lora, dtype="fp32")
    with safetensors.safe_open(path, "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    assert all(k.startswith("diffusion_model.transformer_blocks.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in sd)
    assert "diffusion_model.transformer_blocks.1.img_mlp.net.0.proj.lora_B.weight" in sd
    converted = _convert_non_diffusers_qwen_lora_to_diffusers(dict(sd))
    want = {f"transformer.{dk.parse_kohya_dit_name(n, 'qwen_image')}.lora_{x}.weight" for n in lora.modules for x in "AB"}
    assert set(converted) == want
    back = load_lora(path)
    assert back.arch == "qwen_image" and set(back.modules) == set(lora.modules)
    for name, m in lora.modules.items():
        torch.testing.assert_close(back.modules[name].delta(), m.delta(), rtol=1e-5, atol=1e-5)


def test_musubi_and_diffusers_files_read_the_same():
    lora = qwen_lora(1, blocks=(0, 45))
    musubi, diff = {}, {}
    for name, m in lora.modules.items():
        path = dk.parse_kohya_dit_name(name, "qwen_image")
        musubi.update({f"{name}.lora_down.weight": m.down, f"{name}.lora_up.weight": m.up,
                       f"{name}.alpha": torch.tensor(m.alpha)})
        diff.update({f"transformer.{path}.lora_A.weight": m.down * (m.alpha / m.rank),
                     f"transformer.{path}.lora_B.weight": m.up})
    assert detect_arch(musubi) == detect_arch(diff) == "qwen_image"
    for sd in (musubi, diff):
        back = load_lora(sd)
        for name, m in lora.modules.items():
            torch.testing.assert_close(back.modules[name].delta(), m.delta(), rtol=1e-5, atol=1e-5)
    # diffusers' names of an attention-only LoRA are Flux's too: only metadata (or a deep block) tells
    attn = {k: v for k, v in diff.items() if ".attn." in k and ".45." not in k}
    assert detect_arch(attn) == "flux"
    assert detect_arch(attn, {"modelspec.architecture": "Qwen-Image/lora"}) == "qwen_image"


def test_block_weights_name_the_60_blocks():
    assert block_of("lora_unet_transformer_blocks_59_txt_mod_1", "qwen_image") == "B59"
    assert block_of("lora_unet_img_in", "qwen_image") == "BASE"
    assert parse_block_weights(",".join(["1"] * 61), "qwen_image").values["B59"] == 1.0
    with pytest.raises(BlockWeightError, match="2 values; qwen_image takes 61 values"):
        parse_block_weights("1,2", "qwen_image")


def test_qwen_shift_uses_qwen_images_mu_line():
    """musubi's / diffusers' Qwen-Image shift: mu 0.5 at 256 tokens and 0.9 at 8192, so a 1024 px image (4096
    tokens) is shifted by exp(0.6935); Flux's line would give exp(1.15)."""
    u = torch.sigmoid(torch.randn(64, generator=torch.Generator().manual_seed(3)))
    got = sample_flow_sigmas(torch.Generator().manual_seed(3), 64, "qwen_shift", image_tokens=4096)
    mu = 0.5 + 0.4 * (4096 - 256) / (8192 - 256)
    torch.testing.assert_close(got, math.exp(mu) / (math.exp(mu) + (1 / u - 1)))
    flux = sample_flow_sigmas(torch.Generator().manual_seed(3), 64, "flux_shift", image_tokens=4096)
    assert (flux > got).all()
