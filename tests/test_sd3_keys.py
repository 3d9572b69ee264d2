"""SD3.x (MMDiT) LoRA names and files: the family's table entry, its diffusers key format (written and read
back exactly, alpha folded, q/k/v split and fused at the same rank, the pre-only modulation's halves swapped),
the other formats it reads, family detection and block weights. No model: shapes follow a hidden-128 MMDiT."""

from __future__ import annotations

import pytest
import torch

from lora_workbench.training.lora.block_weights import BlockWeightError, block_of, parse_block_weights
from lora_workbench.training.lora.files import LoraModule, LoraWeights, save_lora
from lora_workbench.training.lora.formats import detect_arch, load_lora
from lora_workbench.training.model import archs
from lora_workbench.training.model import dit_keys as dk

H = 128
# BFL (MMDiT) path -> (out, in) of a two-block SD3.5 medium-like model; block 1 is the last (pre-only context)
SHAPES = {
    "joint_blocks.0.x_block.attn.qkv": (3 * H, H), "joint_blocks.0.x_block.attn.proj": (H, H),
    "joint_blocks.0.x_block.attn2.qkv": (3 * H, H), "joint_blocks.0.x_block.attn2.proj": (H, H),
    "joint_blocks.0.x_block.mlp.fc1": (4 * H, H), "joint_blocks.0.x_block.mlp.fc2": (H, 4 * H),
    "joint_blocks.0.x_block.adaLN_modulation.1": (9 * H, H),
    "joint_blocks.0.context_block.attn.qkv": (3 * H, H), "joint_blocks.0.context_block.attn.proj": (H, H),
    "joint_blocks.0.context_block.mlp.fc2": (H, 4 * H),
    "joint_blocks.0.context_block.adaLN_modulation.1": (6 * H, H),
    "joint_blocks.1.context_block.attn.qkv": (3 * H, H),
    "joint_blocks.1.context_block.adaLN_modulation.1": (2 * H, H),  # pre-only: shift, scale
    "final_layer.adaLN_modulation.1": (2 * H, H), "final_layer.linear": (64, H),
}


def sd3_lora(rank: int = 4, alpha: float = 2.0, seed: int = 0) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    modules = {dk.kohya_dit_name(p): LoraModule(torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g),
                                                 alpha) for p, (o, i) in SHAPES.items()}
    return LoraWeights(modules, {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}, "sd3")


def test_table_entry_names_sd35_as_kohya_and_comfyui_do():
    a = archs.get_arch("sd3")
    assert a.kind == "dit" and a.file_format == "diffusers" and a.comfy_models == ("SD3",)
    assert archs.modelspec_architecture("sd3", "3.5-large") == "stable-diffusion-3-5-large"
    assert archs.modelspec_architecture("sd3", "3.5-medium") == "stable-diffusion-3-5-medium"
    assert archs.arch_from_metadata({"modelspec.architecture": "stable-diffusion-3-5-large/lora"}) == "sd3"
    assert archs.arch_from_metadata({"modelspec.architecture": "stable-diffusion-v3-medium"}) == "sd3"  # SwarmUI
    paths = archs.SD3.module_paths()
    assert "joint_blocks.23.context_block.mlp.fc1" not in paths and "joint_blocks.22.context_block.mlp.fc1" in paths
    assert dk.parse_kohya_dit_name("lora_unet_joint_blocks_7_x_block_attn2_qkv", "sd3") == \
        "joint_blocks.7.x_block.attn2.qkv"


def test_presets_select_attention_mlp_and_every_block_linear():
    paths = list(SHAPES)
    attn = [p for p in paths if dk.matches_preset(p, "attn", "sd3")]
    assert set(attn) == {p for p in paths if p.startswith("joint_blocks") and ".attn" in p}
    ff = {p for p in paths if dk.matches_preset(p, "attn_ff", "sd3")}
    assert ff == set(attn) | {p for p in paths if ".mlp." in p}
    everything = {p for p in paths if dk.matches_preset(p, "all", "sd3")}
    assert everything == {p for p in paths if p.startswith("joint_blocks")}


def test_file_is_diffusers_keys_and_reads_back_exactly(tmp_path):
    lora = sd3_lora()
    path = save_lora(tmp_path / "sd3.safetensors", lora, dtype="fp32")
    import safetensors

    with safetensors.safe_open(path, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        split_a = [f.get_tensor(f"transformer.transformer_blocks.0.attn.to_{x}.lora_A.weight") for x in "qkv"]
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert not any(k.endswith(".alpha") for k in keys)
    for key in ("transformer_blocks.0.attn2.to_k", "transformer_blocks.0.attn.add_v_proj", "transformer_blocks.0.norm1.linear",
                "transformer_blocks.1.norm1_context.linear", "transformer_blocks.0.ff_context.net.2", "norm_out.linear",
                "proj_out"):
        assert f"transformer.{key}.lora_A.weight" in keys, key
    assert torch.equal(split_a[0], split_a[1])  # the parts of one qkv share lora_A
    assert meta["lw_key_format"] == "diffusers" and meta["ss_network_alpha"] == "4"
    back = load_lora(path)
    assert back.arch == "sd3" and set(back.modules) == set(lora.modules)
    for name, m in lora.modules.items():
        assert back.modules[name].rank == m.rank, name  # q/k/v fuse back at the trained rank
        torch.testing.assert_close(back.modules[name].delta(), m.delta(), rtol=1e-6, atol=1e-5)


def test_pre_only_and_final_modulations_swap_their_halves(tmp_path):
    lora = sd3_lora()
    path = save_lora(tmp_path / "sd3.safetensors", lora, dtype="fp32")
    import safetensors

    with safetensors.safe_open(path, "pt") as f:
        pre = f.get_tensor("transformer.transformer_blocks.1.norm1_context.linear.lora_B.weight")
        full = f.get_tensor("transformer.transformer_blocks.0.norm1_context.linear.lora_B.weight")
    m_pre = lora.modules["lora_unet_joint_blocks_1_context_block_adaLN_modulation_1"]
    m_full = lora.modules["lora_unet_joint_blocks_0_context_block_adaLN_modulation_1"]
    scale = m_pre.scale
    # diffusers' AdaLayerNormContinuous holds (scale, shift); MMDiT's pre-only block (shift, scale)
    torch.testing.assert_close(pre, torch.cat(m_pre.up.chunk(2)[::-1]) * scale)
    torch.testing.assert_close(full, m_full.up * scale)  # a full block's 6 chunks keep their order


def test_detect_and_read_the_other_sd3_formats():
    lora = sd3_lora()
    kohya = {}
    native = {}
    for name, m in lora.modules.items():
        path = dk.parse_kohya_dit_name(name, "sd3")
        kohya.update({f"{name}.lora_down.weight": m.down, f"{name}.lora_up.weight": m.up,
                      f"{name}.alpha": torch.tensor(m.alpha)})
        native.update({f"diffusion_model.{path}.lora_down.weight": m.down, f"diffusion_model.{path}.lora_up.weight": m.up,
                       f"diffusion_model.{path}.alpha": torch.tensor(m.alpha)})
    assert detect_arch(kohya) == detect_arch(native) == "sd3"
    for sd in (kohya, native):
        back = load_lora(sd)
        for name, m in lora.modules.items():
            torch.testing.assert_close(back.modules[name].delta(), m.delta())
    # a diffusers SD3 LoRA with no SD3-only module and no metadata: told from Flux by its width
    g = torch.Generator().manual_seed(1)
    plain = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 1536, generator=g),
             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(1536, 4, generator=g)}
    assert detect_arch(plain) == "sd3"
    assert detect_arch({k.replace("1536", "3072"): torch.randn(4, 3072) if "lora_A" in k else torch.randn(3072, 4)
                        for k in plain}) == "flux"


def test_block_weights_name_joint_blocks_for_both_sizes():
    assert block_of("lora_unet_joint_blocks_3_x_block_attn_qkv", "sd3") == "J03"
    assert block_of("lora_unet_final_layer_linear", "sd3") == "BASE"
    medium = parse_block_weights(",".join(["1"] * 25), "sd3")
    assert medium.values["J23"] == 1.0 and medium.values["J24"] == 0.0
    large = parse_block_weights(",".join(["0.5"] * 39), "sd3")
    assert large.values["J37"] == 0.5
    assert parse_block_weights("front", "sd3").values["J12"] == 1.0
    with pytest.raises(BlockWeightError, match="2 values; sd3 takes 39 values"):
        parse_block_weights("1,2", "sd3")
    # medium's 25 on a large LoRA (blocks J24..J37) would switch those blocks off unseen
    from lora_workbench.training.lora.block_weights import apply_block_weights
    from lora_workbench.training.lora.files import LoraModule, LoraWeights

    big = LoraWeights({f"lora_unet_joint_blocks_{i}_x_block_attn_qkv": LoraModule(torch.ones(2, 4), torch.ones(6, 2), 2)
                       for i in range(38)}, {}, "sd3")
    with pytest.raises(BlockWeightError, match="block J24"):
        apply_block_weights(big, medium)


def test_turbo_models_get_the_train_on_base_notice(tmp_path, caplog):
    """A step-distilled checkpoint is trained only with a warning that names the fix (train on Base, apply to
    Turbo); the CLI logs it before training."""
    from lora_workbench.app.folder_training import train_folder
    from lora_workbench.training.config import TrainConfig
    from helpers import make_images, tiny_dataset_cfg

    notice = archs.distilled_notice("models/checkpoints/sd3.5_large_turbo.safetensors")
    assert "'sd3.5_large_turbo.safetensors'" in notice and "Base" in notice and "apply it to Turbo" in notice
    assert archs.distilled_notice("z_image_turbo_bf16.safetensors")
    assert archs.distilled_notice("sd3.5_large.safetensors") == archs.distilled_notice("") == ""

    from fixtures.tiny_sd3_pipeline import tiny_sd3_pipeline
    from lora_workbench.training.model.sd3 import DiffusersSD3Backend

    imgs = make_images(tmp_path / "img", n=1)
    be = DiffusersSD3Backend(tiny_sd3_pipeline(with_t5=False), model_name="tiny-sd3.5-large-turbo")
    with caplog.at_level("WARNING"):
        train_folder(tiny_dataset_cfg(imgs), TrainConfig(rank=2, steps=1, preset="attn"), lambda: be, tmp_path / "out")
    assert "looks like a Turbo" in caplog.text
