"""Flux.1 / Chroma LoRAs: BFL module names, kohya names, target presets, every file format read into the
kohya form (diffusers' split q/k/v fused exactly), block weights, metadata, merge / resize / describe."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lora_workbench.training.config import DatasetConfig, TrainConfig
from lora_workbench.training.data.images import ImageRecord
from lora_workbench.training.lora.block_weights import (BlockWeightError, FLUX_BLOCKS, apply_block_weights, block_of,
                                                        parse_block_weights)
from lora_workbench.training.lora.describe import describe_lora
from lora_workbench.training.lora.files import LoraFormatError, LoraModule, LoraWeights, save_lora
from lora_workbench.training.lora.formats import detect_arch, load_lora
from lora_workbench.training.lora.fuse import fuse_modules, split_module
from lora_workbench.training.lora.merge import concat_merge, resize_lora, svd_merge
from lora_workbench.training.lora.metadata import kohya_metadata, training_metadata
from lora_workbench.training.model import dit_keys as dk
from lora_workbench.training.model.archs import ARCH_TABLE, arch_from_metadata, get_arch, is_compatible
from lora_workbench.training.model.keys import ModuleNameError

H = 16  # hidden width of the tiny models (mlp = 4 * H)


def _mod(out_f: int, in_f: int, rank: int = 2, alpha: float = 2.0, seed: int = 0) -> LoraModule:
    g = torch.Generator().manual_seed(seed)
    return LoraModule(torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g), alpha)


def _bfl_tree(paths, width=H) -> nn.Module:
    """A module tree with an nn.Linear at each BFL path (the layout ComfyUI's Flux model has)."""
    root = nn.Module()
    for path in paths:
        *parents, leaf = path.split(".")
        node = root
        for p in parents:
            if not hasattr(node, p):
                node.add_module(p, nn.Module())
            node = getattr(node, p)
        node.add_module(leaf, nn.Linear(width, width))
    return root


def _tiny_paths(arch: str, double: int = 2, single: int = 2) -> list[str]:
    spec = get_arch(arch).dit
    return ([f"double_blocks.{i}.{m}" for i in range(double) for m in spec.double_modules]
            + [f"single_blocks.{i}.{m}" for i in range(single) for m in spec.single_modules]
            + list(spec.outer_modules))


# ---- the table ---------------------------------------------------------------------------------------------------
def test_flux_and_chroma_entries_name_the_family_as_sd_scripts_does():
    flux, chroma = ARCH_TABLE["flux"], ARCH_TABLE["chroma"]
    assert (flux.kind, flux.dit.depth, flux.dit.depth_single, flux.dit.hidden) == ("dit", 19, 38, 3072)
    assert (flux.base_version, chroma.base_version) == ("flux1", "chroma")
    assert flux.variants == {"dev": "flux-1-dev", "schnell": "flux-1-schnell"} and chroma.modelspec == "chroma"
    # 19 x 10 + 38 x 3 block Linears + 10 outer ones; Chroma lacks every modulation layer and 7 outer ones
    assert len(flux.dit.module_paths()) == 19 * 10 + 38 * 3 + 10
    assert len(chroma.dit.module_paths()) == 19 * 8 + 38 * 2 + 3
    assert is_compatible("flux", "chroma") and is_compatible("chroma", "flux") and not is_compatible("flux", "sdxl")


@pytest.mark.parametrize("meta, arch", [
    ({"modelspec.architecture": "flux-1-dev/lora"}, "flux"),
    ({"modelspec.architecture": "flux-1-schnell/lora"}, "flux"),
    ({"modelspec.architecture": "flux-1/lora"}, "flux"),  # sd-scripts' ARCH_FLUX_1_UNKNOWN
    ({"modelspec.architecture": "chroma/lora"}, "chroma"),
    ({"ss_base_model_version": "flux1"}, "flux"),
    ({"ss_base_model_version": "chroma"}, "chroma"),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
])
def test_arch_from_metadata_knows_the_flux_names(meta, arch):
    assert arch_from_metadata(meta) == arch


# ---- names and presets -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["flux", "chroma"])
def test_every_module_path_round_trips_through_its_kohya_name(arch):
    paths = get_arch(arch).dit.module_paths()
    names = {dk.kohya_dit_name(p) for p in paths}
    assert len(names) == len(paths)  # no two modules share a name
    for p in paths:
        assert dk.parse_kohya_dit_name(dk.kohya_dit_name(p), arch) == p
    assert dk.kohya_dit_name("diffusion_model.double_blocks.0.img_attn.qkv") == "lora_unet_double_blocks_0_img_attn_qkv"


def test_unknown_kohya_names_are_refused_with_the_name():
    with pytest.raises(ModuleNameError, match="lora_unet_double_blocks_0_img_mod_lin"):
        dk.parse_kohya_dit_name("lora_unet_double_blocks_0_img_mod_lin", "chroma")  # Chroma has no img_mod
    with pytest.raises(ModuleNameError, match="prefix"):
        dk.parse_kohya_dit_name("lora_te1_text_model_encoder_layers_0_mlp_fc1", "flux")
    assert dk.parse_kohya_dit_name("lora_unet_my_layer", "flux", known_modules=["my.layer"]) == "my.layer"


@pytest.mark.parametrize("arch, per_preset", [
    ("flux", {"attn": (4, 2), "attn_ff": (8, 2), "all": (10, 3)}),
    ("chroma", {"attn": (4, 2), "attn_ff": (8, 2), "all": (8, 2)}),
])
def test_presets_select_the_block_linears_in_model_order(arch, per_preset):
    model = _bfl_tree([*_tiny_paths(arch), "distilled_guidance_layer.in_proj"])
    for preset, (per_double, per_single) in per_preset.items():
        got = dk.select_dit_targets(model.named_modules(), preset, arch)
        assert len(got) == 2 * per_double + 2 * per_single
        assert all(p.startswith(("double_blocks.", "single_blocks.")) for p in got)  # never img_in / final_layer
        assert got == sorted(got, key=[n for n, _ in model.named_modules()].index)
    attn = dk.select_dit_targets(model.named_modules(), "attn", arch)
    assert "double_blocks.1.txt_attn.qkv" in attn and "single_blocks.0.linear2" in attn
    assert "double_blocks.0.img_mlp.0" not in attn
    wrapped = nn.Module()
    wrapped.add_module("diffusion_model", model)  # ComfyUI's BaseModel holds the DiT as diffusion_model
    assert dk.select_dit_targets(wrapped.named_modules(), "attn", arch) == [f"diffusion_model.{p}" for p in attn]


def test_a_model_in_another_layout_gets_a_clear_error():
    model = _bfl_tree(["transformer_blocks.0.attn.to_q"])
    with pytest.raises(ValueError, match="BFL-layout"):
        dk.select_dit_targets(model.named_modules(), "attn", "flux")
    with pytest.raises(ValueError, match="preset 'convs' unknown"):
        dk.select_dit_targets(model.named_modules(), "convs", "flux")


@pytest.mark.parametrize("arch, cls", [("flux", "FluxTransformer2DModel"), ("chroma", "ChromaTransformer2DModel")])
def test_diffusers_parts_are_the_modules_of_the_diffusers_model(arch, cls):
    """Every diffusers name the map gives exists in diffusers' own model as a Linear with those rows."""
    import diffusers

    kwargs = dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[2, 2, 4])
    if arch == "flux":
        kwargs.update(pooled_projection_dim=32, guidance_embeds=True)
    else:
        kwargs.update(approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=1)
    model = getattr(diffusers, cls)(**kwargs)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    parts = dk.diffusers_parts(arch, depth=2, depth_single=2, hidden=H)
    assert set(parts) == {p for p in get_arch(arch).dit.module_paths()
                          if not p.startswith(("double_blocks.", "single_blocks."))
                          or int(p.split(".")[1]) < 2} - {"final_layer.adaLN_modulation.1"}
    for bfl, ps in parts.items():
        for diff, rows in ps:
            assert diff in linears, f"{bfl} -> {diff} is not a Linear of {cls}"
            assert rows in (-1, linears[diff].out_features)
            assert dk.diffusers_to_bfl(diff, arch)[0] == bfl


# ---- fusing ------------------------------------------------------------------------------------------------------
def test_fused_delta_is_exactly_the_stacked_part_deltas():
    q, k, v = _mod(H, H, 2, 2.0, 1), _mod(H, H, 3, 1.5, 2), _mod(H, H, 2, 8.0, 3)
    fused = fuse_modules([q, k, v])
    assert fused.rank == 7 and fused.scale == q.scale  # alpha = scale * rank of the first part
    assert torch.equal(fused.delta(torch.float64), torch.cat([m.delta(torch.float64) for m in (q, k, v)]))


def test_missing_parts_add_zero_rows_and_split_undoes_the_fuse():
    q, mlp = _mod(H, H, seed=1), _mod(4 * H, H, seed=2)
    fused = fuse_modules([q, None, None, mlp], rows=[H, H, H, 4 * H])
    delta = fused.delta(torch.float64)
    assert delta.shape == (7 * H, H)
    assert torch.equal(delta[:H], q.delta(torch.float64)) and not delta[H:3 * H].any()
    assert torch.equal(delta[3 * H:], mlp.delta(torch.float64))
    back = split_module(fused, [H, H, H, 4 * H])
    assert torch.equal(back[0].delta(torch.float64), q.delta(torch.float64))
    assert torch.equal(back[3].delta(torch.float64), mlp.delta(torch.float64))
    with pytest.raises(LoraFormatError, match="rows"):
        fuse_modules([q, None])
    with pytest.raises(LoraFormatError, match="input widths"):
        fuse_modules([q, _mod(H, 2 * H)])


# ---- reading every format ----------------------------------------------------------------------------------------
def _peft(prefix, m: LoraModule):
    return {f"{prefix}.lora_A.weight": m.down, f"{prefix}.lora_B.weight": m.up}


def _kohya(name, m: LoraModule):
    return {f"{name}.lora_down.weight": m.down, f"{name}.lora_up.weight": m.up, f"{name}.alpha": torch.tensor(m.alpha)}


def test_a_diffusers_flux_lora_reads_as_the_kohya_file_with_fused_qkv():
    q, k, v = (_mod(H, H, 2, 2.0, s) for s in (1, 2, 3))
    sq, sk, sv, mlp = (_mod(r, H, 2, 2.0, s) for s, r in ((4, H), (5, H), (6, H), (7, 4 * H)))
    sd = {}
    for name, m in zip(("to_q", "to_k", "to_v"), (q, k, v)):
        sd.update(_peft(f"transformer.transformer_blocks.1.attn.{name}", m))
    for name, m in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (sq, sk, sv, mlp)):
        sd.update(_peft(f"transformer.single_transformer_blocks.0.{name}", m))
    extra = {"attn.add_q_proj": None, "attn.to_add_out": "txt_attn_proj", "ff.net.0.proj": "img_mlp_0",
             "ff_context.net.2": "txt_mlp_2", "norm1.linear": "img_mod_lin"}
    for i, diff in enumerate(extra):
        sd.update(_peft(f"transformer.transformer_blocks.0.{diff}", _mod(H, H, seed=10 + i)))
    sd.update(_peft("transformer.single_transformer_blocks.1.norm.linear", _mod(3 * H, H, seed=20)))
    sd.update(_peft("transformer.single_transformer_blocks.1.proj_out", _mod(H, 5 * H, seed=21)))
    sd.update(_peft("transformer.x_embedder", _mod(H, 4, seed=22)))
    sd.update(_peft("transformer.time_text_embed.guidance_embedder.linear_1", _mod(H, 256, seed=23)))
    assert detect_arch(sd) == "flux"
    lw = load_lora(sd)
    assert lw.arch == "flux"
    qkv = lw.modules["lora_unet_double_blocks_1_img_attn_qkv"]
    assert qkv.rank == 6
    assert torch.equal(qkv.delta(torch.float64), torch.cat([m.delta(torch.float64) for m in (q, k, v)]))
    lin1 = lw.modules["lora_unet_single_blocks_0_linear1"]
    assert torch.equal(lin1.delta(torch.float64), torch.cat([m.delta(torch.float64) for m in (sq, sk, sv, mlp)]))
    txt_qkv = lw.modules["lora_unet_double_blocks_0_txt_attn_qkv"].delta()  # only add_q_proj was trained
    assert txt_qkv.shape == (3 * H, H) and not txt_qkv[H:].any()
    assert {"lora_unet_double_blocks_0_txt_attn_proj", "lora_unet_double_blocks_0_img_mlp_0",
            "lora_unet_double_blocks_0_txt_mlp_2", "lora_unet_double_blocks_0_img_mod_lin",
            "lora_unet_single_blocks_1_modulation_lin", "lora_unet_single_blocks_1_linear2",
            "lora_unet_img_in", "lora_unet_guidance_in_in_layer"} <= set(lw.modules)


def test_kohya_comfyui_bfl_and_onetrainer_flux_files_read_the_same():
    qkv, proj = _mod(3 * H, H, 4, 2.0, 1), _mod(H, H, 2, 1.0, 2)
    kohya = {**_kohya("lora_unet_double_blocks_0_img_attn_qkv", qkv), **_kohya("lora_unet_single_blocks_3_linear2", proj)}
    comfy = {**_kohya("diffusion_model.double_blocks.0.img_attn.qkv", qkv),
             **_kohya("diffusion_model.single_blocks.3.linear2", proj)}
    bare = {**_peft("double_blocks.0.img_attn.qkv", qkv), "double_blocks.0.img_attn.qkv.alpha": torch.tensor(2.0),
            **_peft("single_blocks.3.linear2", proj), "single_blocks.3.linear2.alpha": torch.tensor(1.0)}
    onetrainer = {**_kohya("lora_transformer_single_transformer_blocks_3_proj_out", proj)}
    ref = load_lora(kohya)
    for sd in (comfy, bare):
        lw = load_lora(sd)
        assert lw.arch == "flux" and set(lw.modules) == set(ref.modules)
        for n, m in lw.modules.items():
            assert torch.equal(m.delta(), ref.modules[n].delta())
    ot = load_lora(onetrainer)
    assert torch.equal(ot.modules["lora_unet_single_blocks_3_linear2"].delta(),
                       ref.modules["lora_unet_single_blocks_3_linear2"].delta())


def test_diffusers_norm_out_swaps_its_halves_back():
    m = _mod(2 * H, H, seed=3)
    lw = load_lora(_peft("transformer.norm_out.linear", m) | _peft("transformer.transformer_blocks.0.attn.to_q", m.__class__(
        m.down, torch.randn(H, m.rank), m.alpha)))
    got = lw.modules["lora_unet_final_layer_adaLN_modulation_1"].delta()
    assert torch.equal(got, torch.cat([m.delta()[H:], m.delta()[:H]]))


def test_flux_or_chroma_from_the_keys_else_from_the_metadata():
    shared = _kohya("lora_unet_double_blocks_0_img_attn_qkv", _mod(3 * H, H))
    assert detect_arch(shared) == "flux"
    assert detect_arch(shared, {"modelspec.architecture": "chroma/lora"}) == "chroma"
    assert detect_arch({**shared, **_kohya("lora_unet_single_blocks_0_modulation_lin", _mod(3 * H, H))},
                       {"ss_base_model_version": "chroma"}) == "flux"  # the keys win: Chroma has no modulation
    assert detect_arch({**shared, **_peft("distilled_guidance_layer.in_proj", _mod(H, H))}) == "chroma"
    assert load_lora(shared, {"ss_base_model_version": "chroma"}).arch == "chroma"
    # SD files are not mistaken for a DiT
    assert detect_arch(_kohya("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
                              _mod(320, 768))) == "sd1"


def test_clip_l_modules_of_a_flux_lora_keep_their_kohya_names():
    sd = {**_kohya("lora_unet_single_blocks_0_linear1", _mod(7 * H, H)),
          **_kohya("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", _mod(768, 768))}
    lw = load_lora(sd)
    assert set(lw.modules) == {"lora_unet_single_blocks_0_linear1", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"}


def test_a_module_the_family_lacks_is_named_in_the_error():
    sd = {**_kohya("lora_unet_double_blocks_0_img_attn_qkv", _mod(3 * H, H)),
          **_kohya("lora_unet_double_blocks_0_img_attn_norm", _mod(H, H))}
    with pytest.raises(LoraFormatError, match="img_attn_norm"):
        load_lora(sd)


def test_every_kohya_block_key_we_write_converts_in_diffusers():
    """diffusers' FluxPipeline.load_lora_weights path (_convert_kohya_flux_lora_to_diffusers) takes every
    block module the presets write, at Flux's real widths, and names each for the transformer."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    spec = get_arch("flux").dit
    parts = dk.diffusers_parts("flux")
    written = [f"double_blocks.{i}.{m}" for i in (0, 18) for m in spec.double_modules]
    written += [f"single_blocks.{i}.{m}" for i in (0, 37) for m in spec.single_modules]
    lora = {p: _mod(sum(r for _, r in parts[p]), 8, 1, 0.5, seed=n) for n, p in enumerate(written)}
    sd = {}
    for p, m in lora.items():
        sd.update(_kohya(dk.kohya_dit_name(p), m))
    out = _convert_kohya_flux_lora_to_diffusers(dict(sd))
    assert set(out) == {f"transformer.{d}.lora_{x}.weight" for p in written for d, _ in parts[p] for x in "AB"}
    # and each part's delta is its rows of ours (alpha / rank folded into the weights)
    fused, start = lora["single_blocks.37.linear1"].delta(), 0
    for d, rows in parts["single_blocks.37.linear1"]:
        got = out[f"transformer.{d}.lora_B.weight"] @ out[f"transformer.{d}.lora_A.weight"]
        torch.testing.assert_close(got, fused[start:start + rows])
        start += rows


# ---- block weights -----------------------------------------------------------------------------------------------
def test_flux_block_weights_follow_the_inspire_vector():
    assert len(FLUX_BLOCKS) == 58 and FLUX_BLOCKS[:2] == ("BASE", "D00") and FLUX_BLOCKS[-1] == "S37"
    assert block_of("lora_unet_double_blocks_18_txt_mlp_2", "flux") == "D18"
    assert block_of("lora_unet_single_blocks_7_modulation_lin", "flux") == "S07"
    assert block_of("lora_unet_img_in", "flux") == "BASE" and block_of("lora_unet_final_layer_linear", "chroma") == "BASE"
    assert block_of("lora_te1_text_model_encoder_layers_0_mlp_fc1", "flux") == "BASE"
    values = [0.5] + [float(i) for i in range(19)] + [float(100 + i) for i in range(38)]
    bw = parse_block_weights(",".join(map(str, values)), "chroma")
    assert bw.arch == "flux" and bw.values["D03"] == 3 and bw.values["S05"] == 105 and bw.values["BASE"] == 0.5
    single = parse_block_weights("flux-single-11to20", "flux").values
    assert single["S10"] == single["S19"] == 1 and single["S09"] == single["S20"] == single["D00"] == 0
    with pytest.raises(BlockWeightError, match="58 values"):
        parse_block_weights("1,1,1", "flux")


def test_block_weights_scale_a_flux_lora_per_block():
    lw = LoraWeights({"lora_unet_double_blocks_2_img_attn_qkv": _mod(3 * H, H, seed=1),
                      "lora_unet_single_blocks_0_linear1": _mod(7 * H, H, seed=2),
                      "lora_unet_img_in": _mod(H, 4, seed=3)}, arch="chroma")
    out = apply_block_weights(lw, "DOUBLE")
    assert torch.equal(out.modules["lora_unet_double_blocks_2_img_attn_qkv"].delta(),
                       lw.modules["lora_unet_double_blocks_2_img_attn_qkv"].delta())
    assert not out.modules["lora_unet_single_blocks_0_linear1"].delta().any()
    assert torch.equal(out.modules["lora_unet_img_in"].delta(), lw.modules["lora_unet_img_in"].delta())  # BASE = 1


# ---- metadata ----------------------------------------------------------------------------------------------------
def test_flux_metadata_names_the_variant_and_leaves_out_sd_only_keys():
    md = kohya_metadata(arch="flux", variant="schnell", network_dim=16, network_alpha=16,
                        timestep_sampling="logit_normal", logit_mean=0.0, logit_std=1.0, guidance_scale=1.0)
    assert md["modelspec.architecture"] == "flux-1-schnell/lora"
    assert md["ss_base_model_version"] == "flux1" and md["ss_network_module"] == "networks.lora_flux"
    assert md["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert md["ss_timestep_sampling"] == "logit_normal" and md["ss_guidance_scale"] == "1.0"
    assert "ss_v2" not in md and "modelspec.prediction_type" not in md and "ss_clip_skip" not in md
    assert kohya_metadata(arch="flux")["modelspec.architecture"] == "flux-1-dev/lora"
    chroma = kohya_metadata(arch="chroma")
    assert (chroma["modelspec.architecture"], chroma["ss_base_model_version"]) == ("chroma/lora", "chroma")
    assert chroma["modelspec.implementation"] == "https://huggingface.co/lodestones/Chroma"
    assert arch_from_metadata(md) == "flux" and arch_from_metadata(chroma) == "chroma"
    with pytest.raises(ValueError, match="no variant 'pro'"):
        kohya_metadata(arch="flux", variant="pro")
    with pytest.raises(ValueError, match="prediction_type 'v'"):
        kohya_metadata(arch="flux", prediction_type="v")


def test_training_metadata_of_a_flux_run_records_its_timestep_sampling():
    cfg = TrainConfig(rank=4, alpha=4, steps=10)
    cfg = replace(cfg, timestep_sampling="flux_shift") if hasattr(cfg, "timestep_sampling") else cfg
    records = [ImageRecord(None, "dog", 1, 32, 32, "c", image=torch.zeros(32, 32, 3).numpy())]
    md = training_metadata(cfg, DatasetConfig(path="/x", trigger="sks"), records, arch="flux", steps_done=10,
                           variant="dev", guidance_scale=1.0)
    assert md["modelspec.architecture"] == "flux-1-dev/lora" and "ss_v2" not in md
    assert md["modelspec.trigger_phrase"] == "sks" and md["ss_guidance_scale"] == "1.0"
    if hasattr(cfg, "timestep_sampling"):
        assert md["ss_timestep_sampling"] == "flux_shift"
    resolved = training_metadata(TrainConfig(rank=4, alpha=4, steps=10), DatasetConfig(path="/x"), records,
                                 arch="chroma", steps_done=10, timestep_sampling="logit_normal")
    assert resolved["ss_timestep_sampling"] == "logit_normal" and resolved["modelspec.architecture"] == "chroma/lora"
    sd = training_metadata(TrainConfig(rank=4, alpha=4, steps=10), DatasetConfig(path="/x"), records, arch="sd1",
                           steps_done=10)
    assert sd["ss_v2"] == "False" and sd["modelspec.prediction_type"] == "epsilon" and "ss_timestep_sampling" not in sd


# ---- merge, resize, describe -------------------------------------------------------------------------------------
def _flux_lora(seed: int) -> LoraWeights:
    return LoraWeights({"lora_unet_double_blocks_0_img_attn_qkv": _mod(3 * H, H, 4, 4.0, seed),
                        "lora_unet_single_blocks_1_linear1": _mod(7 * H, H, 4, 2.0, seed + 1)},
                       kohya_metadata(arch="flux", network_dim=4), "flux")


def test_merge_and_resize_work_on_flux_names():
    a, b = _flux_lora(1), _flux_lora(5)
    merged = concat_merge([(a, 1.0), (b, 0.5)])
    assert merged.arch == "flux" and merged.metadata["modelspec.architecture"] == "flux-1-dev/lora"
    assert merged.metadata["ss_network_module"] == "networks.lora_flux"
    for n in a.modules:
        want = a.modules[n].delta(torch.float64) + 0.5 * b.modules[n].delta(torch.float64)
        torch.testing.assert_close(merged.modules[n].delta(torch.float64), want, rtol=1e-5, atol=1e-5)
    svd, _ = svd_merge([(a, 1.0), (b, 1.0)], rank=8)
    assert set(svd.modules) == set(a.modules)
    small, report = resize_lora(a, rank=2)
    assert small.arch == "flux" and all(m.rank == 2 for m in small.modules.values()) and report.kept_energy < 1


def test_describe_names_a_flux_lora(tmp_path):
    path = tmp_path / "flux.safetensors"
    save_lora(path, _flux_lora(1))
    text = describe_lora(path)
    assert "architecture:     flux" in text and "base version:     flux1" in text and "unet 2" in text


def test_alpha_from_diffusers_adapter_metadata_reaches_the_fused_module():
    q, k, v = (_mod(H, H, 2, 2.0, s) for s in (1, 2, 3))
    sd = {}
    for name, m in zip(("to_q", "to_k", "to_v"), (q, k, v)):
        sd.update(_peft(f"transformer.transformer_blocks.0.attn.{name}", m))
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.lora_alpha": 1})}
    fused = load_lora(sd, meta).modules["lora_unet_double_blocks_0_img_attn_qkv"]
    assert fused.scale == 0.5  # alpha 1 / rank 2 of each part, not the file-less default alpha = rank
    want = torch.cat([replace(m, alpha=1.0).delta(torch.float64) for m in (q, k, v)])
    assert torch.equal(fused.delta(torch.float64), want)
