"""LoHa and LoKr (LyCORIS) through peft: they start at the base model, learn, and their files (LyCORIS keys,
kohya-LyCORIS metadata) give back exactly the trained delta; resume, resize, SVD merge and block weights handle
them; backends that join split layers refuse them."""

import json

import pytest
import torch
import torch.nn.functional as F

from lora_workbench.training.config import ConfigError, TrainConfig
from lora_workbench.training.data.dataset import scan_folder
from lora_workbench.training.lora import network
from lora_workbench.training.lora.block_weights import apply_block_weights
from lora_workbench.training.lora.describe import describe_lora
from lora_workbench.training.lora.files import LoraModule, LoraWeights, LycorisModule, read_lora_file, save_lora
from lora_workbench.training.lora.formats import load_lora
from lora_workbench.training.lora.merge import MergeError, concat_merge, resize_lora, svd_merge
from lora_workbench.training.train.state import load_state
from lora_workbench.training.train.trainer import RunOptions, TrainData, Trainer

from helpers import StopAt, fixed_eval_loss, make_images, tiny_backend, tiny_dataset_cfg

ALGOS = ["loha", "lokr"]


def _randomize(roots, seed=0, std=0.1):
    """Every LoHa / LoKr factor random (a trained-looking module; peft's init has a zero factor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for root in roots.values():
            for name, p in root.named_parameters():
                if name.endswith(f".{network.ADAPTER}"):
                    p.copy_(torch.randn(p.shape, generator=g) * std)


def _layers(roots, targets):
    by_path = {(t.component, t.path): t for t in targets}
    for comp, root in roots.items():
        for path, layer in network._lycoris_layers(root):
            yield by_path[comp, path], layer


@pytest.mark.parametrize("algo", ALGOS)
def test_delta_is_zero_at_init_and_extract_gives_peft_delta_exactly(algo):
    be = tiny_backend()
    roots, targets = be.roots(), be.lora_targets("all", True)
    # rank 8 with alpha 2: LoKr gets layers with two full factors (scale 1) and with a low-rank one (alpha / r)
    network.inject(roots, targets, rank=8, alpha=2.0, seed=0, network=algo)
    lora = network.extract(roots, targets)
    assert lora.modules.keys() == {t.kohya_name for t in targets}
    assert all(isinstance(m, LycorisModule) and m.algo == algo for m in lora.modules.values())
    for t, layer in _layers(roots, targets):
        assert layer.get_delta_weight(network.ADAPTER).abs().max() == 0, t.kohya_name
        assert lora.modules[t.kohya_name].delta().abs().max() == 0
    _randomize(roots)
    lora = network.extract(roots, targets)
    kinds = set()
    for t, layer in _layers(roots, targets):
        m = lora.modules[t.kohya_name]
        kinds.add(m.rank)
        assert torch.equal(m.delta(), layer.get_delta_weight(network.ADAPTER)), t.kohya_name
    assert kinds == ({8} if algo == "loha" else {0, 8})
    assert network.remove(roots) == len(targets)


@pytest.mark.parametrize("algo", ALGOS)
def test_save_load_round_trip_is_exact_and_fused_weights_give_the_layers_output(tmp_path, algo):
    be = tiny_backend()
    roots, targets = be.roots(), be.lora_targets("all", True)
    network.inject(roots, targets, rank=8, alpha=2.0, seed=0, network=algo)
    _randomize(roots)
    lora = network.extract(roots, targets, arch="unknown")
    path = save_lora(tmp_path / "l.safetensors", lora, dtype="fp32")
    back = load_lora(path)
    assert back.modules.keys() == lora.modules.keys()
    for name, m in lora.modules.items():
        b = back.modules[name]
        assert b.algo == algo and b.weights.keys() == m.weights.keys() and b.scale == m.scale
        assert all(torch.equal(b.weights[k], m.weights[k]) for k in m.weights)
        assert torch.equal(b.delta(shape=m.shape), m.delta())
    # base weight + delta, run as a plain layer, is what the injected layer computes (a merge into the model)
    g = torch.Generator().manual_seed(1)
    for t, layer in _layers(roots, targets):
        base = layer.get_base_layer()
        fused = base.weight.detach() + back.modules[t.kohya_name].delta(shape=tuple(base.weight.shape))
        if isinstance(base, torch.nn.Conv2d):
            x = torch.randn(2, base.in_channels, 6, 6, generator=g)
            want = F.conv2d(x, fused, base.bias, base.stride, base.padding, base.dilation, base.groups)
        else:
            x = torch.randn(3, base.in_features, generator=g)
            want = F.linear(x, fused, base.bias)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5, msg=t.kohya_name)
    # and load_into puts it back into fresh layers exactly
    network.remove(roots)
    network.inject(roots, targets, rank=8, alpha=2.0, seed=5, network=algo)
    network.load_into(roots, targets, back)
    again = network.extract(roots, targets)
    assert all(torch.equal(again.modules[n].delta(), m.delta()) for n, m in lora.modules.items())
    network.remove(roots)


@pytest.fixture
def data(tmp_path):
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=4))
    return dcfg, scan_folder(dcfg)


@pytest.mark.parametrize("algo", ALGOS)
def test_training_lowers_the_loss_and_writes_lycoris_keys_and_metadata(tmp_path, data, algo):
    dcfg, records = data
    be = tiny_backend()
    before = fixed_eval_loss(be, records, dcfg)
    cfg = TrainConfig(network=algo, rank=4, alpha=4, preset="all", steps=60, lr=1e-2, batch_size=2, seed=0,
                      output_name=algo, save_dtype="fp32")
    trainer = Trainer(be, TrainData(records, dcfg), cfg)
    result = trainer.run(keep_injected=True)
    after = fixed_eval_loss(be, records, dcfg)
    assert after <= 0.7 * before, f"fixed-set loss {before:.4f} -> {after:.4f}"

    path = save_lora(tmp_path / f"{algo}.safetensors", trainer.extract(cfg.steps), dtype="fp32")
    sd, meta = read_lora_file(path)
    suffixes = {k.rsplit(".", 1)[1] for k in sd}
    assert suffixes <= {"alpha", *(network.ALGOS[algo])} and len(suffixes) > 2, suffixes
    assert {k.rsplit(".", 1)[0] for k in sd} == set(result.lora.modules)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"])["algo"] == algo
    assert json.loads(meta["lw_config"])["network"] == algo
    text = describe_lora(path)
    assert f"network:          {algo[:2].capitalize()}{algo[2:].capitalize()} (LyCORIS), lycoris.kohya" in text


def test_lokr_resume_continues_the_same_curve(tmp_path, data):
    """rank 8, alpha 2: layers of two full Kronecker factors (scale 1) and low-rank ones (alpha / r) resume alike."""
    dcfg, records = data
    cfg = TrainConfig(network="lokr", rank=8, alpha=2, preset="all", steps=6, lr=5e-3, batch_size=2, seed=3,
                      output_name="r")
    full = Trainer(tiny_backend(), TrainData(records, dcfg), cfg).run()
    out = tmp_path / "run"
    first = Trainer(tiny_backend(), TrainData(records, dcfg), cfg, callbacks=StopAt(3),
                    options=RunOptions(output_dir=out)).run()
    assert first.steps_done == 3 and load_state(out / "r-state").step == 3
    second = Trainer(tiny_backend(), TrainData(records, dcfg), cfg,
                     options=RunOptions(output_dir=out, resume_from=out / "r-state")).run()
    assert second.losses[:3] == first.losses
    assert second.losses == full.losses
    for name, m in full.lora.modules.items():
        assert all(torch.equal(second.lora.modules[name].weights[k], t) for k, t in m.weights.items()), name
    with pytest.raises(ValueError, match="network: saved 'lokr', now 'loha'"):
        Trainer(tiny_backend(), TrainData(records, dcfg), TrainConfig(**{**cfg.to_dict(), "network": "loha"}),
                options=RunOptions(resume_from=out / "r-state")).run()


def _trained(algo, rank=2, alpha=1.0):
    be = tiny_backend()
    roots, targets = be.roots(), be.lora_targets("all", False)
    network.inject(roots, targets, rank=rank, alpha=alpha, seed=0, network=algo)
    _randomize(roots, seed=2)
    lora = network.extract(roots, targets, metadata={"ss_network_module": "lycoris.kohya",
                                                     "ss_network_args": json.dumps({"algo": algo})})
    network.remove(roots)
    return lora


@pytest.mark.parametrize("algo", ALGOS)
def test_resize_gives_a_plain_lora_of_the_exact_delta(algo):
    lora = _trained(algo)
    # LoHa rank 2 has delta rank <= 4; LoKr's low-rank factor 2 and full w1 [a, c] give delta rank <= 2 * min(a, c)
    resized, report = resize_lora(lora, rank=64)
    for name, m in lora.modules.items():
        r = resized.modules[name]
        assert isinstance(r, LoraModule) and r.rank <= 64
        want = m.delta()
        torch.testing.assert_close(r.delta().reshape(want.shape), want, atol=1e-5, rtol=1e-4, msg=name)
    assert report.kept_energy == pytest.approx(1.0)
    assert resized.metadata["ss_network_module"] == "networks.lora"
    assert "algo" not in json.loads(resized.metadata["ss_network_args"])
    assert json.loads(resized.metadata["lw_resize"])["from_network"] == algo
    small, rep = resize_lora(lora, rank=1)
    assert all(m.rank == 1 for m in small.modules.values()) and rep.kept_energy < 1.0
    conv = [n for n, m in lora.modules.items() if m.is_conv]
    assert conv and all(small.modules[n].down.dim() == 4 and small.modules[n].is_conv for n in conv)


def test_svd_merge_sums_the_exact_deltas_and_concat_refuses_lycoris():
    loha, lokr = _trained("loha"), _trained("lokr")
    g = torch.Generator().manual_seed(0)
    plain = LoraWeights({n: LoraModule(torch.randn(2, *m.shape[1:], generator=g),
                                       torch.randn(m.shape[0], 2, *((1, 1) if len(m.shape) == 4 else ()), generator=g),
                                       2.0) for n, m in loha.modules.items()})
    merged, _ = svd_merge([(loha, 1.0), (lokr, -0.5), (plain, 0.25)], rank=10_000)
    assert merged.modules.keys() == loha.modules.keys()
    for name, m in merged.modules.items():
        want = loha.modules[name].delta() - 0.5 * lokr.modules[name].delta() + 0.25 * plain.modules[name].delta()
        assert (m.delta().reshape(want.shape) - want).abs().max() <= 1e-4 * want.abs().max(), name
    assert merged.metadata["ss_network_module"] == "networks.lora"
    with pytest.raises(MergeError, match="is a loha .*use the SVD merge"):
        concat_merge([(plain, 1.0), (loha, 1.0)])


@pytest.mark.parametrize("algo", ALGOS)
def test_block_weights_scale_each_lycoris_delta_linearly(algo):
    lora = _trained(algo)
    lora.arch = "sd1"
    lora.modules = {"lora_unet_input_blocks_1_1_proj_in": next(iter(lora.modules.values())),
                    "lora_unet_output_blocks_8_1_proj_in": list(lora.modules.values())[1]}
    out = apply_block_weights(lora, "1," + ",".join(["0.5"] * 11 + ["-2"] * 5))  # 17 values: BASE, IN, MID, OUT
    weights = {"lora_unet_input_blocks_1_1_proj_in": 0.5, "lora_unet_output_blocks_8_1_proj_in": -2.0}
    for name, w in weights.items():
        m = out.modules[name]
        assert isinstance(m, LycorisModule)
        torch.testing.assert_close(m.delta(), w * lora.modules[name].delta(), atol=1e-6, rtol=1e-5)


def test_lycoris_options_are_checked_before_training(tmp_path, data):
    with pytest.raises(ConfigError, match="network='lohx'.*choose one of lora, loha, lokr"):
        TrainConfig(network="lohx")
    with pytest.raises(ConfigError, match="use_dora=True.*network='loha' cannot use it"):
        TrainConfig(network="loha", use_dora=True)
    with pytest.raises(ConfigError, match="dropout=0.1.*network='lokr'"):
        TrainConfig(network="lokr", dropout=0.1)


@pytest.mark.parametrize("algo", ALGOS)
def test_backends_that_join_split_qkv_refuse_lycoris_before_training(tmp_path, data, algo):
    from test_flux_cli import tiny_flux_backend

    dcfg, records = data
    be = tiny_flux_backend()
    cfg = TrainConfig(network=algo, rank=4, alpha=4, steps=2, seed=0)
    with pytest.raises(ConfigError, match=f"network='{algo}' cannot be trained on this flux model.*"
                                          "network='lora', or train the .* in ComfyUI"):
        Trainer(be, TrainData(records, dcfg), cfg).run()
    assert not any(isinstance(m, torch.nn.Module) and hasattr(m, "base_layer") for m in be.transformer.modules())


def test_cli_trains_a_lokr_and_inspect_names_it(tmp_path, capsys):
    from lora_workbench.app.cli import main
    from lora_workbench.training.model.tiny import save_tiny_pipeline

    from test_cli import SMALL

    imgs = make_images(tmp_path / "img", n=2)
    model = save_tiny_pipeline(tmp_path / "model")
    out = tmp_path / "out"
    assert main(["train", str(imgs), "--model", str(model), "--out", str(out), "--steps", "2", "--network", "lokr",
                 "--rank", "4", "--alpha", "2", "--trigger", "sks", *SMALL]) == 0
    lora = load_lora(out / "lora.safetensors")
    assert {m.algo for m in lora.modules.values()} == {"lokr"}
    capsys.readouterr()
    assert main(["inspect", str(out / "lora.safetensors")]) == 0
    assert "LoKr (LyCORIS), lycoris.kohya" in capsys.readouterr().out


@pytest.mark.parametrize("algo", ALGOS)
def test_a_lycoris_file_with_dora_is_refused_by_name_with_where_it_still_works(tmp_path, algo):
    from lora_workbench.training.lora.formats import LoraFormatError

    path = save_lora(tmp_path / "dora.safetensors", _trained(algo), dtype="fp32")
    sd, metadata = read_lora_file(path)
    name = next(k.rsplit(".", 1)[0] for k in sd if k.endswith(".alpha"))
    sd[f"{name}.dora_scale"] = torch.ones(4, 1)  # LyCORIS's wd_on_output magnitude
    with pytest.raises(LoraFormatError, match=rf"module {name} is a {algo} with DoRA.*LoraLoader .* apply the file"):
        load_lora(sd, metadata)
