"""Merging and resizing LoRAs: every result is checked against the deltas it stands for."""

import json

import pytest
import torch

from lora_workbench.training.lora.files import LoraModule, LoraWeights, save_lora
from lora_workbench.training.lora.formats import load_lora
from lora_workbench.training.lora.merge import MergeError, concat_merge, resize_lora, svd_merge

# Real SD1 kohya names (so a saved file loads back), tiny shapes.
LIN = "lora_unet_down_blocks_0_attentions_0_proj_in"
FF = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def module(gen, out, inp, rank, alpha, kernel=None, decay=False):
    shape = (rank, inp) if kernel is None else (rank, inp, kernel, kernel)
    down = torch.randn(*shape, generator=gen) * 0.2
    up = torch.randn(out, rank, generator=gen) * 0.2
    if decay:  # a spread of singular values, so dynamic ranks differ per module
        up = up * torch.logspace(0, -2, rank)[None, :]
    if kernel is not None:
        up = up[:, :, None, None]
    return LoraModule(down, up, alpha)


def lora(seed, specs, arch="sd1", title=None, decay=False):
    gen = torch.Generator().manual_seed(seed)
    mods = {name: module(gen, *spec, decay=decay) for name, spec in specs.items()}
    md = {"modelspec.title": title, "sshs_model_hash": f"hash{seed}"} if title else {}
    return LoraWeights(mods, md, arch)


def flat(delta):
    return delta.reshape(delta.shape[0], -1).double()


@pytest.fixture
def pair():
    a = lora(1, {LIN: (24, 16, 4, 2.0), CONV: (12, 6, 3, 1.0, 3), TE: (20, 20, 4, 4.0)}, title="A")
    b = lora(2, {LIN: (24, 16, 8, 8.0), CONV: (12, 6, 2, 0.5, 3), FF: (10, 30, 5, 1.0)}, title="B")
    return a, b


def summed(loras, name):
    return sum(w * lw.modules[name].delta() for lw, w in loras if name in lw.modules)


def test_concat_merge_reproduces_the_weighted_sum_of_deltas_exactly(pair):
    loras = [(pair[0], 0.7), (pair[1], -0.4)]
    merged = concat_merge(loras)
    assert set(merged.modules) == {LIN, CONV, TE, FF}  # modules of only one LoRA are kept
    for name, m in merged.modules.items():
        torch.testing.assert_close(m.delta(), summed(loras, name), atol=1e-6, rtol=1e-5)
        assert m.scale == 1.0
    assert merged.modules[LIN].rank == 12 and merged.modules[CONV].rank == 5 and merged.modules[TE].rank == 4
    assert merged.modules[CONV].down.shape == (5, 6, 3, 3) and merged.modules[CONV].up.shape == (12, 5, 1, 1)
    sources = json.loads(merged.metadata["lw_merged_from"])
    assert [(s["name"], s["hash"], s["weight"]) for s in sources] == [("A", "hash1", 0.7), ("B", "hash2", -0.4)]
    assert merged.metadata["ss_network_dim"] == "12"


def test_concat_merge_survives_a_save_and_load(pair, tmp_path):
    loras = [(pair[0], 0.5), (pair[1], 0.5)]
    path = save_lora(tmp_path / "merged.safetensors", concat_merge(loras), dtype="fp32")
    back = load_lora(path)  # (tiny widths: the loader cannot tell the arch, names are kept as written)
    assert set(back.modules) == {LIN, CONV, TE, FF}
    assert [s["weight"] for s in json.loads(back.metadata["lw_merged_from"])] == [0.5, 0.5]
    for name, m in back.modules.items():
        torch.testing.assert_close(m.delta(), summed(loras, name), atol=1e-6, rtol=1e-5)


def test_merging_conv_modules_with_different_kernels_names_the_module():
    a = lora(1, {CONV: (12, 6, 3, 1.0, 3)}, title="A")
    b = lora(2, {CONV: (12, 6, 3, 1.0, 1)}, title="B")
    with pytest.raises(MergeError, match=rf"module {CONV}: A has a 3x3 conv kernel but B has 1x1"):
        concat_merge([(a, 1.0), (b, 1.0)])
    with pytest.raises(MergeError, match="3x3 conv kernel"):
        svd_merge([(a, 1.0), (b, 1.0)], rank=4)


def test_merging_modules_of_different_widths_names_the_module():
    a = lora(1, {LIN: (24, 16, 4, 2.0)}, title="A")
    b = lora(2, {LIN: (24, 32, 4, 2.0)}, title="B")
    with pytest.raises(MergeError, match=rf"module {LIN}: A changes a \[24, 16\] weight but B a \[24, 32\] one"):
        svd_merge([(a, 1.0), (b, 1.0)], rank=4)


def test_merging_loras_of_different_architectures_names_both():
    a = lora(1, {TE: (20, 20, 4, 4.0)})
    b = lora(2, {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (20, 20, 4, 4.0)}, arch="sdxl")
    with pytest.raises(MergeError, match=r"cannot merge style\.safetensors \(sd1\) with xl\.safetensors \(sdxl\)"):
        concat_merge([(a, 1.0), (b, 1.0)], names=["style.safetensors", "xl.safetensors"])


def test_merging_dora_modules_is_refused():
    a = lora(1, {TE: (20, 20, 4, 4.0)})
    a.modules[TE].dora_scale = torch.ones(20, 1)
    with pytest.raises(MergeError, match=f"module {TE} is DoRA"):
        concat_merge([(a, 1.0)])


def test_svd_merge_at_full_rank_reproduces_the_summed_deltas(pair):
    loras = [(pair[0], 0.7), (pair[1], 0.3)]
    merged, report = svd_merge(loras, rank=64)
    for name, m in merged.modules.items():
        torch.testing.assert_close(m.delta(), summed(loras, name), atol=1e-5, rtol=1e-4)
        assert report.modules[name].kept_energy == pytest.approx(1.0, abs=1e-6)
    assert merged.modules[LIN].rank == 12  # never more than the summed delta's rank
    assert report.kept_energy == pytest.approx(1.0, abs=1e-6)


def test_svd_merge_at_lower_rank_keeps_exactly_the_reported_energy(pair):
    loras = [(pair[0], 0.7), (pair[1], 0.3)]
    merged, report = svd_merge(loras, rank=3, conv_rank=2)
    total = kept_total = 0.0
    for name, m in merged.modules.items():
        target = flat(summed(loras, name))
        s = torch.linalg.svdvals(target)
        r = 2 if name == CONV else 3
        assert m.rank == r and m.scale == 1.0
        expected = float((s[:r] ** 2).sum() / (s ** 2).sum())
        got = flat(m.delta())
        assert report.modules[name].kept_energy == pytest.approx(expected, rel=1e-5)
        assert float(got.pow(2).sum() / target.pow(2).sum()) == pytest.approx(expected, rel=1e-4)
        # and it is the best rank-r approximation: the error is the discarded singular values
        assert float((target - got).norm()) == pytest.approx(float(s[r:].norm()), rel=1e-3)
        total += float((s ** 2).sum())
        kept_total += float((s[:r] ** 2).sum())
    assert report.kept_energy == pytest.approx(kept_total / total, rel=1e-5)
    assert merged.modules[CONV].down.shape == (2, 6, 3, 3) and merged.modules[CONV].up.shape == (12, 2, 1, 1)
    assert report.modules[LIN].rank_before == 12 and report.modules[LIN].rank_after == 3


def test_resize_fixed_rank_is_the_svd_optimum_and_keeps_the_scale():
    src = lora(3, {LIN: (24, 16, 8, 4.0), CONV: (12, 6, 6, 3.0, 3), TE: (20, 20, 2, 2.0)}, title="src")
    src.modules[TE].dora_scale = torch.rand(20, 1) + 0.5
    out, report = resize_lora(src, rank=3)
    assert out.ranks() == {LIN: 3, CONV: 3, TE: 2}  # never raised
    for name, m in out.modules.items():
        target = flat(src.modules[name].delta())
        s = torch.linalg.svdvals(target)
        r = m.rank
        got = flat(m.delta())
        assert float((target - got).norm()) == pytest.approx(float(s[r:].norm()), rel=1e-3, abs=1e-6)
        kept = float(got.pow(2).sum() / target.pow(2).sum())
        assert report.modules[name].kept_energy == pytest.approx(kept, rel=1e-4)
        assert m.scale == pytest.approx(src.modules[name].scale)  # kohya keeps alpha/rank
    assert torch.equal(out.modules[TE].dora_scale, src.modules[TE].dora_scale)
    assert out.metadata["ss_network_dim"] == "3" and out.metadata["ss_network_alpha"] == "1.5"
    assert "sshs_model_hash" not in out.metadata  # recomputed when saved
    assert json.loads(out.metadata["lw_resized_from"])["hash"] == "hash3"


def test_resize_by_energy_picks_the_smallest_rank_reaching_the_target():
    src = lora(4, {LIN: (24, 16, 8, 8.0), FF: (10, 30, 8, 2.0), CONV: (12, 6, 8, 8.0, 3)}, decay=True)
    out, report = resize_lora(src, rank=8, method="energy", value=0.9)
    for name, m in out.modules.items():
        s2 = torch.linalg.svdvals(flat(src.modules[name].delta())) ** 2
        share = torch.cumsum(s2, 0) / s2.sum()
        r = m.rank
        assert float(share[r - 1]) >= 0.9 > (float(share[r - 2]) if r > 1 else 0.0)
        assert report.modules[name].kept_energy == pytest.approx(float(share[r - 1]), rel=1e-5)
        assert report.modules[name].kept_energy >= 0.9
    assert max(out.ranks().values()) < 8  # the target is met well below the source rank
    assert out.metadata["ss_network_dim"] == "Dynamic"


def test_resize_by_ratio_and_rank_cap():
    src = lora(5, {LIN: (24, 16, 8, 8.0)}, decay=True)
    s = torch.linalg.svdvals(flat(src.modules[LIN].delta()))
    out, report = resize_lora(src, rank=8, method="ratio", value=10.0)
    assert out.modules[LIN].rank == int((s >= s[0] / 10).sum())
    capped, _ = resize_lora(src, rank=2, method="energy", value=1.0)
    assert capped.modules[LIN].rank == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=4, method="energy", value=1.5), r"energy target 1.5 must be in \(0, 1\]"),
    (dict(rank=4, method="ratio", value=0.5), r"ratio 0.5 must be >= 1"),
    (dict(rank=4, method="svd"), r"method 'svd' unknown"),
    (dict(rank=0), r"rank 0 is not a positive whole number"),
    (dict(rank=4, value=0.9), r"'fixed' takes no value"),
])
def test_resize_rejects_bad_arguments_clearly(kwargs, message):
    with pytest.raises(MergeError, match=message):
        resize_lora(lora(6, {LIN: (8, 8, 2, 2.0)}), **kwargs)
