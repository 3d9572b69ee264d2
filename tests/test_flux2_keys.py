"""FLUX.2 klein LoRA names and files: the family entry (Flux.1's block names without per-block modulation, a
SwiGLU MLP, three shared modulation Linears), kohya's key format written and read back exactly, what diffusers'
Flux2KleinPipeline converts, the ai-toolkit / diffusers files read, detection without metadata, block weights and
the train-on-Base notice. No model: diffusers' Flux2Transformer2DModel at a tiny width checks the names."""

from __future__ import annotations

import pytest
import safetensors
import torch
from torch import nn

from lora_workbench.training.lora.block_weights import BlockWeightError, block_of, parse_block_weights
from lora_workbench.training.lora.files import LoraModule, LoraWeights, save_lora
from lora_workbench.training.lora.formats import detect_arch, load_lora
from lora_workbench.training.lora.metadata import kohya_metadata
from lora_workbench.training.model import dit_keys as dk
from lora_workbench.training.model.archs import arch_from_metadata, distilled_notice, get_arch, is_compatible

H = 16  # tiny hidden width; klein's MLP is SwiGLU at ratio 3: img_mlp.0 gives 6 H rows, linear1 9 H


def _rows(path: str) -> tuple[int, int]:
    """(out, in) of a FLUX.2 block Linear at width H."""
    child = path.split(".", 2)[2]
    return {"img_attn.qkv": (3 * H, H), "txt_attn.qkv": (3 * H, H), "img_attn.proj": (H, H), "txt_attn.proj": (H, H),
            "img_mlp.0": (6 * H, H), "txt_mlp.0": (6 * H, H), "img_mlp.2": (H, 3 * H), "txt_mlp.2": (H, 3 * H),
            "linear1": (9 * H, H), "linear2": (H, 4 * H)}[child]


def _paths(double: int = 2, single: int = 2) -> list[str]:
    spec = get_arch("flux2").dit
    return ([f"double_blocks.{i}.{m}" for i in range(double) for m in spec.double_modules]
            + [f"single_blocks.{i}.{m}" for i in range(single) for m in spec.single_modules])


def flux2_lora(seed: int = 0, rank: int = 4, alpha: float = 2.0) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for p in _paths():
        o, i = _rows(p)
        modules[dk.kohya_dit_name(p)] = LoraModule(torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g),
                                                   alpha)
    return LoraWeights(modules, {}, "flux2")


def test_entry_names_klein_as_musubi_and_diffusers_do():
    a = get_arch("flux2")
    assert a.variants == {"klein-4b": "Flux.2-klein-4b", "klein-9b": "Flux.2-klein-9b"}
    assert a.file_format == "kohya" and a.comfy_models == ("Flux2",)
    assert not is_compatible("flux", "flux2") and not is_compatible("flux2", "flux")
    for spec in ("Flux.2-klein-4b/lora", "Flux.2-klein-9b", "Flux.2-dev"):
        assert arch_from_metadata({"modelspec.architecture": spec}) == "flux2"
    assert arch_from_metadata({"modelspec.architecture": "flux-1-dev"}) == "flux"
    paths = a.dit.module_paths()
    assert "double_blocks.7.txt_mlp.2" in paths and "single_blocks.23.linear2" in paths
    assert not any("_mod.lin" in p or "modulation.lin" in p and p.startswith("single_blocks") for p in paths)
    assert "single_stream_modulation.lin" in paths
    assert dk.matches_preset("single_blocks.3.linear1", "attn", "flux2")
    assert not dk.matches_preset("double_blocks.0.img_mlp.0", "attn", "flux2")
    assert dk.matches_preset("double_blocks.0.img_mlp.0", "attn_ff", "flux2")


def test_diffusers_names_are_linears_of_flux2_transformer_with_those_rows():
    import diffusers

    model = diffusers.Flux2Transformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                              timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
                                              guidance_embeds=True)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    parts = dk.diffusers_parts("flux2", depth=2, depth_single=2, hidden=H)
    assert set(parts) == set(_paths()) | (set(get_arch("flux2").dit.outer_modules) - {"final_layer.adaLN_modulation.1"})
    for bfl, ps in parts.items():
        for diff, rows in ps:
            assert diff in linears, f"{bfl} -> {diff} is not a Linear of Flux2Transformer2DModel"
            assert rows in (-1, linears[diff].out_features), (bfl, diff, rows, linears[diff].out_features)
            assert dk.diffusers_to_bfl(diff, "flux2")[0] == bfl
    assert dk.diffusers_swapped("flux2") == {"final_layer.adaLN_modulation.1": "norm_out.linear"}
    assert "norm_out.linear" in linears


def test_file_is_kohya_keys_and_reads_back_exactly_without_metadata(tmp_path):
    lora = flux2_lora()
    path = save_lora(tmp_path / "k.safetensors", lora, dtype="fp32")
    with safetensors.safe_open(path, "pt") as f:
        keys = set(f.keys())
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys
    assert "lora_unet_single_blocks_1_linear1.alpha" in keys
    back = load_lora(path)
    assert back.arch == "flux2" and set(back.modules) == set(lora.modules)
    for name, m in lora.modules.items():
        torch.testing.assert_close(back.modules[name].delta(), m.delta())
    # no metadata: the SwiGLU rows tell it from Flux.1 (whose img_mlp.0 is 4 H, linear1 7 H)
    bare = {}
    for name, m in lora.modules.items():
        bare.update({f"{name}.lora_down.weight": m.down, f"{name}.lora_up.weight": m.up})
    assert detect_arch(bare) == "flux2"
    flux1 = {k: v for k, v in bare.items() if "attn" in k}
    assert detect_arch(flux1) == "flux"  # attention alone is the same on both: no metadata, no rows to tell


def test_metadata_names_the_klein_size():
    md = kohya_metadata(arch="flux2", variant="klein-9b", network_dim=8, network_alpha=8,
                        timestep_sampling="flux_shift")
    assert md["modelspec.architecture"] == "Flux.2-klein-9b/lora"
    assert md["ss_base_model_version"] == "flux2" and md["ss_network_module"] == "networks.lora_flux_2"
    assert kohya_metadata(arch="flux2")["modelspec.architecture"] == "Flux.2-klein-4b/lora"
    assert arch_from_metadata(md) == "flux2" and "ss_v2" not in md


def test_diffusers_converts_every_block_key_we_write():
    """Flux2KleinPipeline.load_lora_weights reads kohya files through _convert_kohya_flux2_lora_to_diffusers: every
    block module becomes the transformer's (q/k/v split), with alpha / rank folded in."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux2_lora_to_diffusers

    lora = flux2_lora(1, rank=3, alpha=1.5)
    sd = {}
    for name, m in lora.modules.items():
        sd.update({f"{name}.lora_down.weight": m.down, f"{name}.lora_up.weight": m.up,
                   f"{name}.alpha": torch.tensor(m.alpha)})
    out = _convert_kohya_flux2_lora_to_diffusers(dict(sd))
    parts = dk.diffusers_parts("flux2", depth=2, depth_single=2, hidden=H)
    want = {f"transformer.{d}.lora_{x}.weight" for p in _paths() for d, _ in parts[p] for x in "AB"}
    assert set(out) == want
    for bfl in ("double_blocks.1.txt_attn.qkv", "single_blocks.0.linear1", "double_blocks.0.img_mlp.0"):
        fused, start = lora.modules[dk.kohya_dit_name(bfl)].delta(), 0
        for d, _ in parts[bfl]:
            got = out[f"transformer.{d}.lora_B.weight"] @ out[f"transformer.{d}.lora_A.weight"]
            torch.testing.assert_close(got, fused[start:start + got.shape[0]])
            start += got.shape[0]
        assert start == fused.shape[0]


def test_ai_toolkit_and_diffusers_files_read_as_ours():
    lora = flux2_lora(2)
    parts = dk.diffusers_parts("flux2", depth=2, depth_single=2, hidden=H)
    aitk, diff = {}, {}
    for name, m in lora.modules.items():
        bfl = dk.parse_kohya_dit_name(name, "flux2")
        scale = m.alpha / m.rank
        aitk.update({f"diffusion_model.{bfl}.lora_A.weight": m.down * scale,
                     f"diffusion_model.{bfl}.lora_B.weight": m.up})
        start = 0
        for d, rows in parts[bfl]:
            diff.update({f"transformer.{d}.lora_A.weight": m.down * scale,
                         f"transformer.{d}.lora_B.weight": m.up[start:start + rows]})
            start += rows
    assert detect_arch(aitk) == detect_arch(diff) == "flux2"
    for sd in (aitk, diff):
        back = load_lora(sd)
        assert set(back.modules) == set(lora.modules)
        for name, m in lora.modules.items():
            torch.testing.assert_close(back.modules[name].delta(), m.delta(), rtol=1e-5, atol=1e-5)


def test_block_weights_take_klein_9b_and_4b_lists():
    assert block_of("lora_unet_double_blocks_7_img_attn_qkv", "flux2") == "D07"
    assert block_of("lora_unet_single_blocks_23_linear2", "flux2") == "S23"
    assert block_of("lora_unet_single_stream_modulation_lin", "flux2") == "BASE"
    nine = parse_block_weights(",".join(["1"] * 33), "flux2")
    assert nine.values["S23"] == 1.0
    four = parse_block_weights(",".join(["0.5"] * 26), "flux2")
    assert four.values["D04"] == four.values["S19"] == 0.5 and four.values["D05"] == four.values["S20"] == 0.0
    assert parse_block_weights("double", "flux2").values["S00"] == 0.0
    with pytest.raises(BlockWeightError, match="flux2 takes 33 values .* or 26"):
        parse_block_weights("1,2,3", "flux2")


def test_klein_4b_block_weights_on_a_9b_lora_are_refused():
    """4B's 26 values on a LoRA with 9B's blocks would switch D05..D07 and S20..S23 off unseen: refused, naming
    the 33-value list; on a 4B LoRA they apply."""
    from lora_workbench.training.lora.block_weights import apply_block_weights
    from lora_workbench.training.lora.files import LoraModule, LoraWeights

    def lora(double: int, single: int) -> LoraWeights:
        names = [f"lora_unet_double_blocks_{i}_img_attn_qkv" for i in range(double)]
        names += [f"lora_unet_single_blocks_{i}_linear1" for i in range(single)]
        return LoraWeights({n: LoraModule(torch.ones(2, 4), torch.ones(6, 2), 2) for n in names}, {}, "flux2")

    four = parse_block_weights(",".join(["0.5"] * 26), "flux2")
    kept = apply_block_weights(lora(5, 20), four)
    assert all(torch.equal(m.up, torch.full((6, 2), 0.5)) for m in kept.modules.values())
    with pytest.raises(BlockWeightError, match=r"26 values.*block D05.*33 values \(BASE, D00..D07, S00..S23"):
        apply_block_weights(lora(8, 24), four)
    nine = apply_block_weights(lora(8, 24), ",".join(["1"] * 32 + ["0"]))
    assert not nine.modules["lora_unet_single_blocks_23_linear1"].up.any()


def test_distilled_klein_gets_the_train_on_base_notice():
    assert "klein Base" in distilled_notice("flux-2-klein-4b-fp8.safetensors")
    assert "klein Base" in distilled_notice("models/diffusion_models/FLUX.2-klein-9B.safetensors")
    assert distilled_notice("flux-2-klein-base-4b.safetensors") == ""
    assert distilled_notice("flux-2-klein-base-9b-fp8.safetensors") == ""
