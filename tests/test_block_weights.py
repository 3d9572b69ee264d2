"""Per-block LoRA strengths with LoRA Block Weight (LBW) semantics, on real SD1.5 and SDXL name sets."""

import pytest
import torch

from lora_workbench.training.model import keys as uk
from lora_workbench.training.lora.block_weights import (OTHER, SD1_BLOCKS, SD1_LORA_BLOCKS, SDXL_BLOCKS,
                                                        SDXL_LORA_BLOCKS, BlockWeightError, apply_block_weights,
                                                        block_of, parse_block_weights)
from lora_workbench.training.lora.files import LoraModule, LoraWeights
from lora_workbench.training.lora.prompt_syntax import parse_lora_tags

# LBW's DEF_WEIGHT_PRESET (scripts/lora_block_weight.py), as its users read it.
LBW_PRESETS = """\
NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
INS:1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0
IND:1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0
INALL:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0
MIDD:1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0
OUTD:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0
OUTS:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1
OUTALL:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
ALL0.5:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"""


def kohya_names(arch):
    """Every UNet module of the preset layout and every CLIP layer module, as kohya names."""
    unet = [uk.kohya_unet_name(diff, arch) for diff in uk.unet_ldm_to_diffusers(arch).values()]
    tes = {"sd1": [("te", 12)], "sdxl": [("te1", 12), ("te2", 32)]}[arch]
    te = [uk.kohya_te_name(f"text_model.encoder.layers.{i}.{part}", comp)
          for comp, layers in tes for i in range(layers) for part in uk.CLIP_LAYER]
    return unet, te


@pytest.mark.parametrize("arch, blocks, lora_blocks", [("sd1", SD1_BLOCKS, SD1_LORA_BLOCKS),
                                                       ("sdxl", SDXL_BLOCKS, SDXL_LORA_BLOCKS)])
def test_every_module_of_a_real_name_set_has_a_block(arch, blocks, lora_blocks):
    unet, te = kohya_names(arch)
    assert {block_of(n, arch) for n in te} == {"BASE"}
    placed = {n: block_of(n, arch) for n in unet}
    assert set(placed.values()) == (set(blocks) - {"BASE"}) | {OTHER}  # every UNet block is reached
    outside = sorted(n for n, b in placed.items() if b == OTHER)
    assert all(n.startswith(("lora_unet_time_emb", "lora_unet_add_emb", "lora_unet_label_emb",
                             "lora_unet_conv_norm_out", "lora_unet_conv_out", "lora_unet_out_")) for n in outside)
    # A plain LoRA trains the transformers: exactly the blocks of LBW's short list (17 / 12).
    attention = {b for n, b in placed.items() if "transformer_blocks" in n}
    assert attention == set(lora_blocks) - {"BASE"}


@pytest.mark.parametrize("name, arch, block", [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", "sd1", "IN01"),
    ("lora_unet_down_blocks_0_attentions_1_proj_in", "sd1", "IN02"),
    ("lora_unet_down_blocks_0_downsamplers_0_conv", "sd1", "IN03"),
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k", "sd1", "IN04"),
    ("lora_unet_down_blocks_3_resnets_1_conv2", "sd1", "IN11"),
    ("lora_unet_mid_block_attentions_0_proj_out", "sd1", "MID"),
    ("lora_unet_up_blocks_0_resnets_0_conv1", "sd1", "OUT00"),
    ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2", "sd1", "OUT03"),
    ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_out_0", "sd1", "OUT11"),
    ("lora_unet_conv_in", "sd1", "IN00"),
    ("lora_unet_time_embedding_linear_1", "sd1", OTHER),
    ("lora_te_text_model_encoder_layers_11_mlp_fc2", "sd1", "BASE"),
    ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "sdxl", "IN04"),
    ("lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2", "sdxl", "IN08"),
    ("lora_unet_middle_block_1_transformer_blocks_9_attn2_to_v", "sdxl", "MID"),
    ("lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q", "sdxl", "OUT00"),
    ("lora_unet_output_blocks_5_1_proj_out", "sdxl", "OUT05"),
    ("lora_unet_output_blocks_8_0_skip_connection", "sdxl", "OUT08"),
    ("lora_unet_label_emb_0_0", "sdxl", OTHER),
    ("lora_te2_text_model_encoder_layers_31_self_attn_q_proj", "sdxl", "BASE"),
])
def test_block_of_known_modules(name, arch, block):
    assert block_of(name, arch) == block


def test_block_of_an_unknown_module_names_it():
    with pytest.raises(BlockWeightError, match="cannot place 'lora_unet_down_blocks_9_foo' in a sd1 UNet block"):
        block_of("lora_unet_down_blocks_9_foo", "sd1")


@pytest.mark.parametrize("line", LBW_PRESETS.splitlines())
def test_sd1_presets_have_lbws_values(line):
    name, values = line.split(":")
    expected = [float(v) for v in values.split(",")]
    bw = parse_block_weights(name, "sd1")
    assert [bw.values[b] for b in SD1_LORA_BLOCKS] == expected
    assert parse_block_weights(name.lower(), "sd2").values == bw.values
    assert parse_block_weights(values, "sd1").values == bw.values  # the same as writing the numbers


def test_sdxl_presets_follow_lbw_by_block_name():
    for line in LBW_PRESETS.splitlines():
        name = line.split(":")[0]
        sd1, xl = parse_block_weights(name, "sd1").values, parse_block_weights(name, "sdxl").values
        for block in SDXL_LORA_BLOCKS:
            # OUT00-OUT02 are not in LBW's 17 values; they follow OUT03 (LBW would zero them)
            assert xl[block] == sd1["OUT03" if block in ("OUT00", "OUT01", "OUT02") else block], (name, block)
    assert [parse_block_weights("ALL", "sdxl").values[b] for b in SDXL_LORA_BLOCKS] == [1.0] * 12
    assert [parse_block_weights("OUTD", "sdxl").values[b] for b in SDXL_LORA_BLOCKS] == [1] + [0] * 5 + [1] * 6


def test_short_lists_zero_the_blocks_they_do_not_name_as_lbw_does():
    bw = parse_block_weights(",".join(["1"] * 17), "sd1")
    assert [b for b, v in bw.values.items() if v == 0] == ["IN00", "IN03", "IN06", "IN09", "IN10", "IN11",
                                                           "OUT00", "OUT01", "OUT02"]
    full = parse_block_weights(",".join(str(i) for i in range(20)), "sdxl")
    assert list(full.values) == list(SDXL_BLOCKS) and full.values["MID"] == 10


def test_wrong_counts_name_the_expected_blocks():
    with pytest.raises(BlockWeightError) as e:
        parse_block_weights("1,1,1", "sd1")
    msg = str(e.value)
    assert msg.startswith("block weights '1,1,1' have 3 values; sd1 takes 17 values (BASE, IN01, IN02, IN04, "
                          "IN05, IN07, IN08, MID, OUT03, OUT04, OUT05, OUT06, OUT07, OUT08, OUT09, OUT10, OUT11) "
                          "or 26 values (BASE, IN00,")
    assert "or a preset: NONE, ALL, INS" in msg
    with pytest.raises(BlockWeightError, match=r"have 17 values; sdxl takes 12 values \(BASE, IN04, IN05, IN07"):
        parse_block_weights(",".join(["1"] * 17), "sdxl")
    with pytest.raises(BlockWeightError, match=r"'OUTX' is neither a number nor a preset"):
        parse_block_weights("OUTX", "sd1")
    with pytest.raises(BlockWeightError, match=r"got 'unknown'; use one of"):
        parse_block_weights("ALL", "unknown")


def _mod(out, inp, kernel=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(2, inp, generator=g) if kernel is None else torch.randn(2, inp, kernel, kernel, generator=g)
    up = torch.randn(out, 2, generator=g)
    return LoraModule(down, up if kernel is None else up[:, :, None, None], 1.0)


def test_apply_block_weights_scales_each_module_by_its_block():
    names = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ("BASE", _mod(8, 8)),
        "lora_unet_down_blocks_0_attentions_0_proj_in": ("IN01", _mod(8, 8)),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q": ("MID", _mod(8, 8)),
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2": ("OUT03", _mod(8, 8)),
        "lora_unet_down_blocks_0_downsamplers_0_conv": ("IN03", _mod(8, 8, kernel=3)),
        "lora_unet_time_embedding_linear_1": (OTHER, _mod(8, 8)),
    }
    lora = LoraWeights({n: m for n, (_, m) in names.items()}, {"modelspec.title": "t"}, "sd1")
    before = {n: m.delta().clone() for n, m in lora.modules.items()}
    spec = "0.5,0.25,1,1,1,1,1,-1,2,1,1,1,1,1,1,1,1"  # BASE .5, IN01 .25, MID -1, OUT03 2
    out = apply_block_weights(lora, spec)
    expect = {"BASE": 0.5, "IN01": 0.25, "MID": -1.0, "OUT03": 2.0, "IN03": 0.0, OTHER: 1.0}
    for n, (block, _) in names.items():
        torch.testing.assert_close(out.modules[n].delta(), before[n] * expect[block])
        torch.testing.assert_close(lora.modules[n].delta(), before[n])  # the source is untouched
    assert out is not lora and '"spec": "0.5,0.25' in out.metadata["lw_block_weights"]


def test_apply_refuses_weights_for_another_architecture():
    lora = LoraWeights({"lora_unet_input_blocks_4_1_proj_in": _mod(8, 8)}, {}, "sdxl")
    with pytest.raises(BlockWeightError, match="block weights are for sd1 but the LoRA is sdxl"):
        apply_block_weights(lora, parse_block_weights("ALL", "sd1"))
    assert block_of("lora_unet_input_blocks_4_1_proj_in", "sdxl") == "IN04"


def test_lbw_from_a_prompt_tag():
    _, (tag,) = parse_lora_tags("<lora:style:0.8:lbw=OUTALL>")
    bw = parse_block_weights(tag.block_weights, "sdxl")
    assert bw.values["IN04"] == 0 and bw.values["OUT05"] == 1
