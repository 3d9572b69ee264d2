"""The LDM <-> diffusers module maps and kohya names, checked against real diffusers UNets.

The SD1.5 and SDXL UNets are built on the meta device (no memory, no download) from the values of
their published ``unet/config.json``; a tiny config checks that layouts read from configs map too.
"""

import pytest
import torch
from diffusers import UNet2DConditionModel

from lora_workbench.training.model import keys as uk

from helpers import unet_diffusers_to_ldm

SD15_CONFIG = dict(  # runwayml/stable-diffusion-v1-5 unet/config.json
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280, 1280],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SDXL_CONFIG = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
TINY_CONFIG = dict(  # SDXL-shaped in miniature: no attention at level 0, depth 2 at level 1
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=[32, 64],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2], attention_head_dim=8, cross_attention_dim=32, norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
)
TINY_SD1_CONFIG = dict(  # SD1-shaped: attention at level 0, no mid block
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=[32, 32, 64],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=8, cross_attention_dim=32, norm_num_groups=32, mid_block_type=None,
)
CASES = {"sd1": SD15_CONFIG, "sdxl": SDXL_CONFIG, "tiny": TINY_CONFIG, "tiny_sd1": TINY_SD1_CONFIG}


def meta_unet(config):
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def layer_names(model, types=(torch.nn.Linear, torch.nn.Conv2d)):
    return {n for n, m in model.named_modules() if isinstance(m, types)}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    config = CASES[request.param]
    return request.param, config, meta_unet(config)


def test_map_covers_every_linear_and_conv(case):
    name, config, unet = case
    layout = uk.layout_from_diffusers_config(config)
    mapping = uk.unet_ldm_to_diffusers(layout)
    image = set(mapping.values())
    missing = layer_names(unet) - image
    assert not missing, f"{name}: diffusers layers without an LDM name: {sorted(missing)[:10]}"
    # ... and names nothing that is not there (norms included).
    all_modules = {n for n, _ in unet.named_modules()}
    assert image <= all_modules, sorted(image - all_modules)[:10]
    # With norms the map is exactly the set of weight-bearing leaf modules.
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    assert image == layer_names(unet, (torch.nn.Linear, torch.nn.Conv2d) + norms)


def test_presets_match_published_configs():
    assert uk.layout_from_diffusers_config(SD15_CONFIG) == uk.SD1
    assert uk.layout_from_diffusers_config(SDXL_CONFIG) == uk.SDXL
    assert uk.get_layout("sd2") == uk.SD1


@pytest.mark.parametrize("arch,ldm,diffusers", [
    ("sd1", "input_blocks.1.1.transformer_blocks.0.attn1.to_q", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("sd1", "input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1"),
    ("sd1", "input_blocks.4.0.skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
    ("sd1", "input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
    ("sd1", "input_blocks.11.0.out_layers.3", "down_blocks.3.resnets.1.conv2"),
    ("sd1", "middle_block.1.proj_in", "mid_block.attentions.0.proj_in"),
    ("sd1", "middle_block.2.emb_layers.1", "mid_block.resnets.1.time_emb_proj"),
    ("sd1", "output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"),
    ("sd1", "output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
    ("sd1", "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj", "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj"),
    ("sd1", "output_blocks.0.0.skip_connection", "up_blocks.0.resnets.0.conv_shortcut"),
    ("sd1", "time_embed.0", "time_embedding.linear_1"),
    ("sd1", "input_blocks.0.0", "conv_in"),
    ("sd1", "out.0", "conv_norm_out"),
    ("sd1", "out.2", "conv_out"),
    ("sdxl", "input_blocks.4.1.transformer_blocks.1.attn2.to_k", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),
    ("sdxl", "input_blocks.8.1.transformer_blocks.9.attn1.to_out.0", "down_blocks.2.attentions.1.transformer_blocks.9.attn1.to_out.0"),
    ("sdxl", "input_blocks.6.0.op", "down_blocks.1.downsamplers.0.conv"),
    ("sdxl", "middle_block.1.transformer_blocks.9.ff.net.2", "mid_block.attentions.0.transformer_blocks.9.ff.net.2"),
    ("sdxl", "output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"),
    ("sdxl", "output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
    ("sdxl", "output_blocks.8.0.skip_connection", "up_blocks.2.resnets.2.conv_shortcut"),
    ("sdxl", "label_emb.0.0", "add_embedding.linear_1"),
    ("sdxl", "label_emb.0.2", "add_embedding.linear_2"),
])
def test_known_pairs(arch, ldm, diffusers):
    assert uk.unet_ldm_to_diffusers(arch)[ldm] == diffusers
    assert unet_diffusers_to_ldm(arch)[diffusers] == ldm


def test_modules_that_do_not_exist_are_not_mapped():
    sd1 = uk.unet_ldm_to_diffusers("sd1")
    assert "input_blocks.1.0.skip_connection" not in sd1  # 320 -> 320: no shortcut conv
    assert "label_emb.0.0" not in sd1
    sdxl = uk.unet_ldm_to_diffusers("sdxl")
    assert "input_blocks.1.1.proj_in" not in sdxl  # no attention at SDXL's first level
    assert "input_blocks.4.1.transformer_blocks.2.attn1.to_q" not in sdxl  # depth 2 there


@pytest.mark.parametrize("arch", ["sd1", "sdxl", uk.layout_from_diffusers_config(TINY_CONFIG)])
def test_round_trip_is_a_bijection(arch):
    fwd, inv = uk.unet_ldm_to_diffusers(arch), unet_diffusers_to_ldm(arch)
    assert len(set(fwd.values())) == len(fwd)
    assert all(inv[d] == ldm for ldm, d in fwd.items())
    assert all(fwd[ldm] == d for d, ldm in inv.items())


def test_kohya_unet_names_follow_kohya_conventions():
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert uk.kohya_unet_name("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "sd1") == \
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert uk.kohya_unet_name(path, "sdxl") == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert uk.kohya_unet_name("mid_block.attentions.0.proj_out", "sdxl") == "lora_unet_middle_block_1_proj_out"
    assert uk.kohya_te_name("text_model.encoder.layers.0.self_attn.q_proj") == \
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert uk.kohya_te_name("text_model.encoder.layers.31.mlp.fc2", "te2") == \
        "lora_te2_text_model_encoder_layers_31_mlp_fc2"
    with pytest.raises(uk.ModuleNameError, match="down_blocks.0.attentions.0"):
        uk.kohya_unet_name("down_blocks.0.attentions.0.proj_in", "sdxl")  # SDXL has no attention there
    with pytest.raises(ValueError, match="sd3"):
        uk.kohya_unet_name(path, "sd3")


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_parse_kohya_name_inverts_every_unet_module(arch):
    paths = uk.unet_ldm_to_diffusers(arch).values()
    resolver = uk.KohyaNameResolver(arch)
    for path in paths:
        name = uk.kohya_unet_name(path, arch)
        assert resolver.parse(name) == ("unet", path)
    # Without the arch too (the presets do not contradict each other).
    for path in list(paths)[::7]:
        assert uk.parse_kohya_name(uk.kohya_unet_name(path, arch)) == ("unet", path)


def test_parse_accepts_ldm_style_names_for_sd1_and_diffusers_style_for_sdxl():
    assert uk.parse_kohya_name("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", "sd1") == \
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert uk.parse_kohya_name("lora_unet_output_blocks_2_1_conv", "sd1") == ("unet", "up_blocks.0.upsamplers.0.conv")
    assert uk.parse_kohya_name("lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_ff_net_2", "sdxl") == \
        ("unet", "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2")


def test_parse_kohya_name_text_encoders_against_real_clip_modules():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            projection_dim=16)
    with torch.device("meta"):
        te = CLIPTextModelWithProjection(config)
    names = layer_names(te, (torch.nn.Linear,))
    assert "text_model.encoder.layers.2.self_attn.out_proj" in names
    for component in ("te", "te1", "te2"):
        for path in names:
            assert uk.parse_kohya_name(uk.kohya_te_name(path, component)) == (component, path)
    # CLIP-G depth (32 layers) with no model at hand: matched per layer, not from a fixed list.
    assert uk.parse_kohya_name("lora_te2_text_model_encoder_layers_31_self_attn_out_proj") == \
        ("te2", "text_model.encoder.layers.31.self_attn.out_proj")


def test_parse_tiny_model_with_known_modules_and_layout():
    unet = meta_unet(TINY_CONFIG)
    layout = uk.layout_from_diffusers_config(TINY_CONFIG)
    names = sorted(layer_names(unet))
    resolver = uk.KohyaNameResolver(layout, known_modules=[n for n, _ in unet.named_modules()])
    for path in names:
        assert resolver.parse("lora_unet_" + path.replace(".", "_")) == ("unet", path)
        ldm_style = uk.kohya_unet_name(path, "sdxl", layout=layout)
        assert resolver.parse(ldm_style) == ("unet", path)


def test_parse_errors_name_the_problem():
    with pytest.raises(uk.ModuleNameError, match="lora_unet_down_blocks_9_nothing"):
        uk.parse_kohya_name("lora_unet_down_blocks_9_nothing")
    with pytest.raises(uk.ModuleNameError, match="kohya"):
        uk.parse_kohya_name("unet.down_blocks.0.attentions.0.proj_in")
    with pytest.raises(uk.ModuleNameError, match="CLIP"):
        uk.parse_kohya_name("lora_te_text_model_encoder_layers_0_self_attn_qkv")


def test_layout_validation_and_unsupported_configs():
    with pytest.raises(ValueError, match="one depth per level"):
        uk.UNetLayout(channel_mult=(1, 2), num_res_blocks=2, transformer_depth=(1,), attention_levels=(0,))
    with pytest.raises(ValueError, match="attention_levels"):
        uk.UNetLayout(channel_mult=(1, 2), num_res_blocks=2, transformer_depth=(1, 0), attention_levels=(1,))
    with pytest.raises(ValueError, match="mid_block_type"):
        uk.layout_from_diffusers_config({**TINY_CONFIG, "mid_block_type": "UNetMidBlock2DSimpleCrossAttn"})
    with pytest.raises(ValueError, match="unknown architecture"):
        uk.unet_ldm_to_diffusers("flux")
