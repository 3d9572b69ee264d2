"""LoRA files: kohya save/load, the other formats normalised to kohya names, hashes, metadata."""

import json
import os
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_workbench.training.model import keys as uk
from lora_workbench.training.lora.describe import describe_lora
from lora_workbench.training.lora.files import LoraFormatError, LoraModule, LoraWeights, legacy_hash, lora_state_dict, model_hash, save_lora
from lora_workbench.training.lora.formats import detect_arch, load_lora
from lora_workbench.training.lora.metadata import kohya_metadata

from helpers import unet_diffusers_to_ldm

# (component, module path, in, out, kernel). Only the in-dims of attn2.to_k and q_proj are the real
# ones (the architecture is detected from them); the rest are small to keep the tests fast.
SD1_MODULES = [
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 64, 64, None),
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 768, 64, None),
    ("unet", "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0", 64, 64, None),
    ("unet", "mid_block.attentions.0.proj_in", 128, 128, 1),            # SD1 proj_in is a 1x1 conv
    ("unet", "down_blocks.1.resnets.0.conv1", 32, 64, 3),               # conv_dim (LoCon) layer
    ("unet", "up_blocks.0.upsamplers.0.conv", 64, 64, 3),
    ("te", "text_model.encoder.layers.0.self_attn.q_proj", 768, 64, None),
    ("te", "text_model.encoder.layers.11.mlp.fc2", 128, 64, None),
]
SDXL_MODULES = [
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q", 64, 64, None),
    ("unet", "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k", 2048, 64, None),
    ("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.2", 128, 64, None),
    ("unet", "up_blocks.1.attentions.2.proj_out", 64, 64, None),
    ("unet", "down_blocks.0.resnets.1.conv2", 32, 32, 3),
    ("unet", "down_blocks.0.downsamplers.0.conv", 32, 32, 3),
    ("unet", "up_blocks.0.upsamplers.0.conv", 64, 64, 3),
    ("te1", "text_model.encoder.layers.0.self_attn.q_proj", 768, 64, None),
    ("te2", "text_model.encoder.layers.31.self_attn.v_proj", 1280, 64, None),
    ("te2", "text_model.encoder.layers.3.mlp.fc1", 64, 128, None),
]
# A 1280x1280 layer at rank 64 in fp32 is 1.3 MB: past the 1 MiB the legacy hash starts reading at.
BIG_MODULE = ("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_v", 1280, 1280, None)


def make_lora(arch, modules, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (component, path, fan_in, fan_out, kernel) in enumerate(modules):
        if kernel is None:
            down, up = torch.randn(rank, fan_in, generator=g), torch.randn(fan_out, rank, generator=g)
        else:
            down = torch.randn(rank, fan_in, kernel, kernel, generator=g)
            up = torch.randn(fan_out, rank, 1, 1, generator=g)
        out[uk.kohya_name(component, path, arch)] = LoraModule(down, up, alpha=[1.0, 2.0, 0.3, 4.0][i % 4])
    return LoraWeights(out, {"ss_network_dim": "4", "modelspec.title": "t", "ss_output_name": "x"}, arch)


@pytest.fixture
def sd1():
    return make_lora("sd1", SD1_MODULES)


@pytest.fixture
def sdxl():
    return make_lora("sdxl", SDXL_MODULES)


def assert_same(a: LoraWeights, b: LoraWeights, atol=1e-6):
    assert sorted(a.modules) == sorted(b.modules)
    for name, m in a.modules.items():
        assert torch.allclose(m.delta(), b.modules[name].delta(), atol=atol), name


# ----------------------------------------------------------------------------- the module itself

def test_delta_is_up_down_times_alpha_over_rank():
    m = LoraModule(torch.randn(4, 10), torch.randn(6, 4), alpha=2.0)
    assert m.rank == 4 and m.scale == 0.5
    assert torch.allclose(m.delta(), m.up @ m.down * 0.5)
    assert m.delta().shape == (6, 10) and m.delta(torch.float64).dtype == torch.float64


def test_conv_delta_equals_running_down_then_up():
    m = LoraModule(torch.randn(3, 5, 3, 3), torch.randn(7, 3, 1, 1), alpha=6.0)
    x = torch.randn(2, 5, 9, 9)
    two_step = F.conv2d(F.conv2d(x, m.down, padding=1), m.up) * m.scale
    assert m.delta().shape == (7, 5, 3, 3)
    assert torch.allclose(F.conv2d(x, m.delta(), padding=1), two_step, atol=1e-4)
    assert m.is_conv and not LoraModule(torch.randn(3, 5, 1, 1), torch.randn(7, 3, 1, 1), 3).is_conv


def test_mismatched_shapes_are_refused():
    with pytest.raises(LoraFormatError, match=r"\(4, 10\).*\(6, 5\)"):
        LoraModule(torch.randn(4, 10), torch.randn(6, 5), alpha=1)


def test_weights_helpers(sd1):
    assert sd1.component_of("lora_te_text_model_encoder_layers_0_mlp_fc1") == "te"
    assert sd1.component_of("lora_te2_x") == "te2" and sd1.component_of("lora_unet_x") == "unet"
    assert set(sd1.ranks().values()) == {4}
    half = sd1.to("fp16")
    assert all(m.down.dtype == torch.float16 for m in half.modules.values())
    assert all(m.down.dtype == torch.float32 for m in sd1.modules.values())  # original untouched


# ----------------------------------------------------------------------------- save / load

def test_fp32_roundtrip_is_exact(tmp_path, sd1):
    path = save_lora(tmp_path / "a.safetensors", sd1, dtype="fp32")
    back = load_lora(path)
    assert back.arch == "sd1"
    assert sorted(back.modules) == sorted(sd1.modules)
    for name, m in sd1.modules.items():
        b = back.modules[name]
        assert torch.equal(b.down, m.down) and torch.equal(b.up, m.up) and b.alpha == m.alpha
    for k, v in sd1.metadata.items():
        assert back.metadata[k] == v


def test_fp16_roundtrip_within_rounding_and_alpha_exact(tmp_path, sd1):
    back = load_lora(save_lora(tmp_path / "a.safetensors", sd1))  # default fp16
    for name, m in sd1.modules.items():
        b = back.modules[name]
        assert b.down.dtype == torch.float16
        assert torch.equal(b.down.float(), m.down.half().float())
        assert torch.equal(b.up.float(), m.up.half().float())
        assert b.alpha == pytest.approx(m.alpha, abs=1e-7)  # 0.3 stays 0.3: alpha is kept in fp32


def test_file_is_plain_kohya_format(tmp_path, sdxl):
    path = save_lora(tmp_path / "x.safetensors", sdxl, dtype="bf16")
    sd = load_file(path)
    name = "lora_unet_input_blocks_5_1_transformer_blocks_1_attn1_to_q"
    assert name not in sd  # down_blocks.1.attentions.0 is input_blocks.4.1
    name = "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"
    assert sd[name + ".lora_down.weight"].dtype == torch.bfloat16
    assert sd[name + ".alpha"].dim() == 0
    assert f"lora_te2_text_model_encoder_layers_31_self_attn_v_proj.lora_up.weight" in sd
    conv = "lora_unet_input_blocks_3_0_op"
    assert sd[conv + ".lora_down.weight"].shape == (4, 32, 3, 3) and sd[conv + ".lora_up.weight"].shape == (32, 4, 1, 1)
    assert all(t.is_contiguous() for t in sd.values())


def test_conv_shapes_roundtrip(tmp_path, sd1):
    back = load_lora(save_lora(tmp_path / "c.safetensors", sd1, dtype="fp32"))
    m = back.modules["lora_unet_down_blocks_1_resnets_0_conv1"]
    assert m.down.shape == (4, 32, 3, 3) and m.up.shape == (64, 4, 1, 1) and m.delta().shape == (64, 32, 3, 3)
    assert back.modules["lora_unet_mid_block_attentions_0_proj_in"].delta().shape == (128, 128, 1, 1)


def test_dora_scale_roundtrips(tmp_path):
    m = LoraModule(torch.randn(2, 8), torch.randn(5, 2), 2.0, dora_scale=torch.rand(5, 1))
    lora = LoraWeights({"lora_te_text_model_encoder_layers_0_mlp_fc1": m}, {}, "unknown")
    back = load_lora(save_lora(tmp_path / "d.safetensors", lora, dtype="fp32"))
    assert torch.equal(back.modules["lora_te_text_model_encoder_layers_0_mlp_fc1"].dora_scale, m.dora_scale)


def test_missing_alpha_means_alpha_equals_rank():
    sd = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(3, 8),
          "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(8, 3)}
    m = load_lora(sd).modules["lora_te_text_model_encoder_layers_0_mlp_fc1"]
    assert m.alpha == 3.0 and m.scale == 1.0


# ----------------------------------------------------------------------------- other formats

def split(lora):
    """(component, path, module) for every module, via the kohya-name parser."""
    return [(*uk.parse_kohya_name(n, lora.arch), m) for n, m in lora.modules.items()]


def to_peft(lora, alphas_as="keys"):
    te_prefix = {"te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2", "unet": "unet"}
    sd = {}
    for component, path, m in split(lora):
        key = f"{te_prefix[component]}.{path}"
        sd[f"{key}.lora_A.weight"] = m.down
        sd[f"{key}.lora_B.weight"] = m.up
        if alphas_as == "keys":
            sd[f"{key}.alpha"] = torch.tensor(m.alpha)
    return sd


def to_old_diffusers(lora):
    sd = {}
    for component, path, m in split(lora):
        assert component == "unet" or component == "te"
        if component == "te":
            key = f"text_encoder.{path}.lora_linear_layer"
        elif ".attn" in path and ".to_" in path:
            key = path.replace(".to_out.0", ".processor.to_out_lora").replace(".to_q", ".processor.to_q_lora")
            key = "unet." + key.replace(".to_k", ".processor.to_k_lora")
            key = key[: -len("_lora")] + "_lora"  # processor style ends in ..._lora.down.weight
            sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = m.down, m.up
            sd[f"unet.{path}.alpha"] = torch.tensor(m.alpha)
            continue
        else:
            key = f"unet.{path}.lora"
        sd[f"{key}.down.weight"], sd[f"{key}.up.weight"] = m.down, m.up
        sd[key.rsplit(".lora", 1)[0] + ".alpha"] = torch.tensor(m.alpha)
    return sd


def to_comfy(lora):
    clip = {"te": "clip_l", "te1": "clip_l", "te2": "clip_g"}
    to_ldm = unet_diffusers_to_ldm(lora.arch)
    sd = {}
    for component, path, m in split(lora):
        key = f"diffusion_model.{to_ldm[path]}" if component == "unet" else f"text_encoders.{clip[component]}.transformer.{path}"
        sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = m.down, m.up
        sd[f"{key}.alpha"] = torch.tensor(m.alpha)
    return sd


def test_peft_dict_loads_to_the_same_kohya_lora(sd1, sdxl):
    for lora in (sd1, sdxl):
        back = load_lora(to_peft(lora))
        assert back.arch == lora.arch
        assert_same(lora, back)


def test_peft_alphas_from_diffusers_adapter_metadata(sdxl):
    sd = to_peft(sdxl, alphas_as=None)
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"ff.net.2": 2},
                                                 "text_encoder.lora_alpha": 4, "text_encoder_2.lora_alpha": 4,
                                                 "text_encoder_2.use_rslora": True})}
    back = load_lora(sd, metadata=meta)
    mods = back.modules
    assert mods["lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"].alpha == 8
    assert mods["lora_unet_middle_block_1_transformer_blocks_0_ff_net_2"].alpha == 2
    assert mods["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"].alpha == 4
    # rsLoRA: scale alpha/sqrt(r) = 2 is kohya alpha 8 at rank 4.
    assert mods["lora_te2_text_model_encoder_layers_3_mlp_fc1"].scale == pytest.approx(2.0)


def test_bare_peft_unet_dict_without_alphas():
    down, up = torch.randn(2, 320), torch.randn(320, 2)
    sd = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.lora_A.weight": down,
          "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.lora_B.weight": up,
          "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.randn(2, 768),
          "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.randn(320, 2)}
    lora = load_lora(sd)
    m = lora.modules["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"]
    assert lora.arch == "sd1" and m.alpha == 2.0 and torch.equal(m.down, down)


def test_old_diffusers_formats_load_to_the_same_kohya_lora(sd1):
    sd = to_old_diffusers(sd1)
    assert any(k.endswith("attn1.processor.to_q_lora.down.weight") for k in sd)
    assert any(k.endswith("attn1.processor.to_out_lora.up.weight") for k in sd)
    assert any(".lora_linear_layer.down.weight" in k for k in sd)
    assert_same(sd1, load_lora(sd))


def test_comfy_ldm_dict_loads_to_the_same_kohya_lora(sd1, sdxl):
    for lora in (sd1, sdxl):
        sd = to_comfy(lora)
        assert any(k.startswith("diffusion_model.input_blocks.") for k in sd)
        back = load_lora(sd)
        assert back.arch == lora.arch
        assert_same(lora, back)


def test_sd1_ldm_kohya_names_are_remapped_to_diffusers_names(sd1):
    to_ldm = unet_diffusers_to_ldm("sd1")
    sd = {}
    for component, path, m in split(sd1):
        name = "lora_unet_" + to_ldm[path].replace(".", "_") if component == "unet" else uk.kohya_te_name(path)
        sd.update({f"{name}.lora_down.weight": m.down, f"{name}.lora_up.weight": m.up, f"{name}.alpha": torch.tensor(m.alpha)})
    assert "lora_unet_output_blocks_2_1_conv.lora_down.weight" in sd
    back = load_lora(sd)
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in back.modules
    assert_same(sd1, back)


def test_diffusers_own_kohya_converter_reads_our_sdxl_names(sdxl):
    """Another loader: diffusers' SDXL pipeline converts kohya/sgm names with these private helpers."""
    conv = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    sd = {k: v for k, v in lora_state_dict(sdxl).items()}
    sd = conv._maybe_map_sgm_blocks_to_diffusers(sd, SimpleNamespace(layers_per_block=2))
    converted, _ = conv._convert_non_diffusers_lora_to_diffusers(sd)
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.processor.to_q_lora.down.weight" in converted
    back = load_lora(converted)  # its alpha keys follow another scheme; compare names and weights
    assert sorted(back.modules) == sorted(sdxl.modules)
    for name, m in sdxl.modules.items():
        assert torch.equal(back.modules[name].down, m.down) and torch.equal(back.modules[name].up, m.up)


def test_unknown_keys_are_named():
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 4),
          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(4, 2),
          "model.diffusion_model.weird.weight": torch.randn(3)}
    with pytest.raises(LoraFormatError, match="model.diffusion_model.weird.weight"):
        load_lora(sd)
    oft = {"lora_unet_x.oft_blocks": torch.randn(2, 2, 2)}  # LyCORIS kinds other than LoHa / LoKr: named
    with pytest.raises(LoraFormatError, match="LyCORIS"):
        load_lora(oft)
    with pytest.raises(LoraFormatError, match=r"LyCORIS loha module .* missing \['hada_w1_b'"):
        load_lora({"lora_unet_x.hada_w1_a": torch.randn(2, 2)})
    with pytest.raises(LoraFormatError, match="needs both down and up"):
        load_lora({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 4)})


def test_detect_arch():
    def kohya(name, fan_in):
        return {f"{name}.lora_down.weight": torch.zeros(2, fan_in), f"{name}.lora_up.weight": torch.zeros(4, 2)}

    attn2 = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    assert detect_arch(kohya(attn2, 768)) == "sd1"
    assert detect_arch(kohya(attn2, 1024)) == "sd2"
    assert detect_arch(kohya("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v", 2048)) == "sdxl"
    assert detect_arch(kohya("lora_te1_text_model_encoder_layers_0_mlp_fc1", 768)) == "sdxl"
    assert detect_arch({"unet.add_embedding.linear_1.lora_A.weight": torch.zeros(2, 2816)}) == "sdxl"
    assert detect_arch(kohya("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768)) == "sd1"
    assert detect_arch(kohya("lora_unet_input_blocks_1_1_proj_in", 320)) == "sd1"  # attention at level 0
    assert detect_arch(kohya(attn2, 32)) == "unknown"  # a tiny test model
    assert detect_arch(kohya("lora_unet_conv_in", 4)) == "unknown"


# ----------------------------------------------------------------------------- hashes and safety

def test_hashes_follow_kohya_semantics(tmp_path):
    big = make_lora("sd1", SD1_MODULES + [BIG_MODULE], rank=64)  # > 1 MiB: the legacy hash reads tensor data
    assert sum(t.numel() * 4 for t in lora_state_dict(big).values()) > 0x110000
    big.metadata["ss_seed"] = "1"
    p1 = save_lora(tmp_path / "a.safetensors", big, dtype="fp32")
    meta = safe_open(str(p1), "pt").metadata()
    assert meta["sshs_model_hash"] == model_hash(p1)
    assert meta["sshs_legacy_hash"] == legacy_hash(p1) and len(meta["sshs_legacy_hash"]) == 8
    assert meta["modelspec.hash_sha256"] == "0x" + model_hash(p1)

    retitled = LoraWeights(big.modules, {**big.metadata, "modelspec.title": "another title"}, "sd1")
    p2 = save_lora(tmp_path / "b.safetensors", retitled, dtype="fp32")
    assert safe_open(str(p2), "pt").metadata()["sshs_model_hash"] == meta["sshs_model_hash"]

    changed = dict(big.modules)
    name = next(iter(changed))
    changed[name] = LoraModule(changed[name].down + 1, changed[name].up, changed[name].alpha)
    p3 = save_lora(tmp_path / "c.safetensors", LoraWeights(changed, big.metadata, "sd1"), dtype="fp32")
    assert safe_open(str(p3), "pt").metadata()["sshs_model_hash"] != meta["sshs_model_hash"]
    assert model_hash(p3) != model_hash(p1)


def test_overwrite_is_refused_and_file_untouched(tmp_path, sd1, sdxl):
    path = save_lora(tmp_path / "keep.safetensors", sd1)
    before = path.read_bytes()
    with pytest.raises(FileExistsError) as err:
        save_lora(path, sdxl)
    assert str(path) in str(err.value) and "overwrite=True" in str(err.value)
    assert path.read_bytes() == before
    save_lora(path, sdxl, overwrite=True)
    assert load_lora(path).arch == "sdxl"
    assert os.listdir(tmp_path) == ["keep.safetensors"]  # atomic write: no temp files left


def test_failed_write_leaves_nothing(tmp_path, sd1, monkeypatch):
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_lora(tmp_path / "a.safetensors", sd1)
    assert os.listdir(tmp_path) == []


def test_save_refuses_bad_names_and_dtypes(tmp_path, sd1):
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_lora(tmp_path / "a.ckpt", sd1)
    with pytest.raises(ValueError, match="fp8"):
        save_lora(tmp_path / "a.safetensors", sd1, dtype="fp8")


# ----------------------------------------------------------------------------- metadata and describe

def test_kohya_metadata_keys_and_values():
    meta = kohya_metadata(
        arch="sdxl", network_dim=16, network_alpha=8, conv_dim=4, output_name="mychar",
        tag_frequency={"10_mychar": {"mychar": 12, "smile": 3}}, dataset_dirs={"10_mychar": {"n_repeats": 10, "img_count": 12}},
        resolution=1024, num_train_images=120, learning_rate=1e-4, max_train_steps=500, seed=42,
        training_started_at=1700000000.0, training_finished_at=1700000600.0, trigger_phrase="mychar",
        lw_config={"rank": 16}, lw_version="0.1.0",
    )
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "16"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": 4, "conv_alpha": 4}
    assert json.loads(meta["ss_tag_frequency"])["10_mychar"]["smile"] == 3
    assert meta["ss_resolution"] == "(1024, 1024)" and meta["modelspec.resolution"] == "1024x1024"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.title"] == "mychar" and meta["modelspec.date"].startswith("2023-11-14T22:")
    assert meta["ss_v2"] == "False" and meta["lw_config"] == '{"rank": 16}'
    assert "ss_unet_lr" not in meta and "modelspec.description" not in meta
    sd1 = kohya_metadata(arch="sd1", resolution=(512, 768))
    assert sd1["ss_base_model_version"] == "sd_v1" and sd1["modelspec.implementation"] == "diffusers"
    assert sd1["modelspec.architecture"] == "stable-diffusion-v1/lora" and sd1["ss_resolution"] == "(512, 768)"
    with pytest.raises(TypeError, match="learnig_rate"):
        kohya_metadata(arch="sd1", learnig_rate=1e-4)
    with pytest.raises(ValueError, match="sd4"):
        kohya_metadata(arch="sd4")


def test_describe_lora(tmp_path, sd1):
    sd1.metadata.update(kohya_metadata(arch="sd1", network_dim=4, network_alpha=1, trigger_phrase="zkz person",
                                       tag_frequency={"a": {"zkz": 5, "hat": 2}}, max_train_steps=100,
                                       num_train_images=7, resolution=512, lw_config={"x": "y" * 500}))
    path = save_lora(tmp_path / "d.safetensors", sd1)
    text = describe_lora(path)
    for pattern in (r"architecture:\s+sd1", r"te 2, unet 6", r"conv layers:\s+yes, 2", r"trigger phrase:\s+zkz person",
                    r"zkz \(5\), hat \(2\)", r"dtype:\s+float16", r"sshs_model_hash:\s+[0-9a-f]{64} \(ok\)",
                    r"sshs_legacy_hash:\s+[0-9a-f]{8} \(ok\)", r"ss_network_dim: 4", r"\(509 chars\)"):
        assert re.search(pattern, text), pattern
    # A file whose stored hash no longer matches its tensors.
    sd = load_file(path)
    meta = dict(safe_open(str(path), "pt").metadata())
    sd[next(iter(sd))] = sd[next(iter(sd))] * 2
    save_file(sd, tmp_path / "tampered.safetensors", meta)
    assert "MISMATCH" in describe_lora(tmp_path / "tampered.safetensors")


def test_real_peft_adapter_state_dict_gives_peft_deltas():
    """A LoRA trained with peft on a (tiny) diffusers UNet, read from peft's own state dict + config."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_out.0", "proj_in", "conv1"],
                        alpha_pattern={"conv1": 1})
    unet.add_adapter(config)
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora_B["default"].weight)
    meta = {"lora_adapter_metadata": json.dumps(config.to_dict(), default=list)}
    lora = load_lora(get_peft_model_state_dict(unet), metadata=meta)
    assert lora.arch == "unknown" and len(lora.modules) == len(layers)
    for path, layer in layers.items():
        m = lora.modules["lora_unet_" + path.replace(".", "_")]
        expected = layer.get_delta_weight("default")
        assert m.delta().shape == expected.shape, path
        assert torch.allclose(m.delta(), expected, atol=1e-5), path
    assert lora.modules["lora_unet_down_blocks_0_resnets_0_conv1"].alpha == 1.0
