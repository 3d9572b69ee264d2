"""The training loop on a tiny SD1-shaped model: it learns, repeats, and leaves the base alone."""

import math

import pytest
import torch

from lora_workbench.training.lora import network
from lora_workbench.training.model.backend import DiffusersBackend
from lora_workbench.training.config import ConfigError, TrainConfig
from lora_workbench.training.data.dataset import scan_folder
from lora_workbench.training.train.schedules import add_noise, target_for
from lora_workbench.training.train.preview import sample_preview
from lora_workbench.training.train.trainer import RunOptions, TrainCallbacks, TrainData, Trainer, TrainingError

from helpers import fixed_eval_loss, make_images, tiny_backend, tiny_dataset_cfg


def test_loss_falls_by_at_least_half(tmp_path):
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=4))
    records = scan_folder(dcfg)
    be = tiny_backend()
    before = fixed_eval_loss(be, records, dcfg)
    cfg = TrainConfig(rank=8, alpha=8, preset="all", steps=150, lr=3e-3, batch_size=2, seed=0)
    result = Trainer(be, TrainData(records, dcfg), cfg).run(keep_injected=True)
    after = fixed_eval_loss(be, records, dcfg)
    assert after <= 0.5 * before, f"fixed-set loss {before:.4f} -> {after:.4f}"
    k = 20
    assert sum(result.losses[-k:]) / k < sum(result.losses[:k]) / k
    assert result.steps_done == 150 and len(result.losses) == 150


def _lora_tensors(lora):
    return {k: (m.down, m.up, m.alpha) for k, m in lora.modules.items()}


def test_same_seed_repeats_exactly_and_other_seed_differs(tmp_path):
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=3), shuffle_tags=True)
    records = scan_folder(dcfg)
    cfg = TrainConfig(rank=4, alpha=4, steps=6, lr=1e-3, seed=7, train_text_encoder=True)
    a = Trainer(tiny_backend(), TrainData(records, dcfg), cfg).run()
    b = Trainer(tiny_backend(), TrainData(records, dcfg), cfg).run()
    c = Trainer(tiny_backend(), TrainData(records, dcfg), TrainConfig(**{**cfg.to_dict(), "seed": 8})).run()
    ta, tb, tc = _lora_tensors(a.lora), _lora_tensors(b.lora), _lora_tensors(c.lora)
    assert ta.keys() == tb.keys() and any(k.startswith("lora_te_") for k in ta)
    for k in ta:
        assert torch.equal(ta[k][0], tb[k][0]) and torch.equal(ta[k][1], tb[k][1]), k
    assert a.losses == b.losses
    assert any(not torch.equal(ta[k][1], tc[k][1]) for k in ta)


def test_run_leaves_the_base_model_untouched(tmp_path):
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=2))
    be = tiny_backend()
    before = {k: v.clone() for k, v in be.unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in be.text_encoder.state_dict().items()}
    types_before = [type(m) for m in be.unet.modules()]
    Trainer(be, TrainData(scan_folder(dcfg), dcfg), TrainConfig(steps=3, preset="all", train_text_encoder=True,
                                                              lr=1e-2)).run()
    after = be.unet.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(te_before[k], v) for k, v in be.text_encoder.state_dict().items())
    assert [type(m) for m in be.unet.modules()] == types_before
    assert not any(p.requires_grad for p in be.unet.parameters())


def test_presets_pick_the_documented_layers():
    be = tiny_backend()
    attn = be.lora_targets("attn", text_encoder=False)
    ff = be.lora_targets("attn_ff", text_encoder=False)
    allp = be.lora_targets("all", text_encoder=True)
    assert attn and all(t.path.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for t in attn)
    assert {t.path.split(".")[-1] for t in attn} == {"to_q", "to_k", "to_v", "0"}
    assert len(ff) > len(attn) and any("ff.net" in t.path for t in ff)
    assert any(t.is_conv for t in allp) and any(t.component == "te" for t in allp)
    assert all(t.kohya_name.startswith(("lora_unet_", "lora_te_")) for t in allp)
    assert not any(t.path.startswith(("conv_in", "conv_out", "time_embedding")) for t in allp)


class _Record(TrainCallbacks):
    def __init__(self, stop_at=None):
        self.steps, self.saves, self.stop_at, self.started = [], [], stop_at, None

    def on_start(self, total_steps, trainable_params):
        self.started = (total_steps, trainable_params)

    def on_step(self, step, total, loss, lr):
        self.steps.append((step, total, loss, lr))

    def should_stop(self):
        return self.stop_at is not None and len(self.steps) >= self.stop_at

    def on_save(self, path, step):
        self.saves.append((path, step))


def test_callbacks_schedule_and_periodic_saves(tmp_path):
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=2))
    cb = _Record()
    cfg = TrainConfig(steps=6, lr=1e-3, lr_scheduler="linear", warmup_steps=2, save_every=2, output_name="t")
    res = Trainer(tiny_backend(), TrainData(scan_folder(dcfg), dcfg), cfg, callbacks=cb,
                  options=RunOptions(output_dir=tmp_path / "out")).run()
    assert [s[0] for s in cb.steps] == [1, 2, 3, 4, 5, 6]
    lrs = [s[3] for s in cb.steps]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(5e-4) and lrs[2] == pytest.approx(1e-3)
    assert lrs[3] > lrs[4] > lrs[5]  # linear decay after warm-up
    assert [s for _, s in cb.saves] == [2, 4]
    assert [p.name for p in res.saved] == ["t-step000002.safetensors", "t-step000004.safetensors"]
    assert all(p.exists() for p in res.saved)
    assert cb.started[1] > 0


def test_should_stop_ends_the_run_early(tmp_path):
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=2))
    cb = _Record(stop_at=3)
    res = Trainer(tiny_backend(), TrainData(scan_folder(dcfg), dcfg), TrainConfig(steps=10), callbacks=cb).run()
    assert res.stopped_early and res.steps_done == 3 and len(res.losses) == 3


class _NaNAfter(DiffusersBackend):
    calls = 0

    def predict(self, x_t, t, cond):
        type(self).calls += 1
        out = super().predict(x_t, t, cond)
        return out * float("nan") if type(self).calls > 4 else out


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_save(tmp_path):
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=2))
    be = tiny_backend()
    be.__class__ = _NaNAfter
    cfg = TrainConfig(steps=10, save_every=2, output_name="n", lr=1e-3)
    with pytest.raises(TrainingError, match=r"loss became nan at step 5.*n-step000004.safetensors.*learning rate"):
        Trainer(be, TrainData(scan_folder(dcfg), dcfg), cfg, options=RunOptions(output_dir=tmp_path / "out")).run()
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["n-step000002.safetensors",
                                                                               "n-step000004.safetensors"]


def test_gradient_checkpointing_and_accumulation_match_plain_run(tmp_path):
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=2))
    records = scan_folder(dcfg)
    base = dict(steps=3, lr=1e-3, seed=3, max_grad_norm=0.0)
    plain = Trainer(tiny_backend(), TrainData(records, dcfg), TrainConfig(**base)).run()
    ckpt = Trainer(tiny_backend(), TrainData(records, dcfg), TrainConfig(**base, gradient_checkpointing=True)).run()
    for k, m in plain.lora.modules.items():
        assert torch.allclose(m.up, ckpt.lora.modules[k].up, atol=1e-6), k
    # batch 2 == batch 1 x 2 accumulated micro-batches: same images, averaged gradients
    b2 = Trainer(tiny_backend(), TrainData(records, dcfg), TrainConfig(**base, batch_size=2)).run()
    acc = Trainer(tiny_backend(), TrainData(records, dcfg), TrainConfig(**base, grad_accum=2)).run()
    assert math.isfinite(b2.losses[-1]) and math.isfinite(acc.losses[-1])
    assert len(acc.losses) == 3


def test_bf16_autocast_keeps_lora_weights_fp32(tmp_path):
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=2))
    be = tiny_backend()
    res = Trainer(be, TrainData(scan_folder(dcfg), dcfg),
                  TrainConfig(steps=2, mixed_precision="bf16")).run(keep_injected=True)
    lora_params = [p for r in be.roots().values() for n, p in r.named_parameters() if ".lw." in n + "."]
    assert lora_params and all(p.dtype == torch.float32 for p in lora_params)
    assert all(math.isfinite(x) for x in res.losses)
    network.remove(be.roots())


def test_v_prediction_target_formula():
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    alphas = torch.linspace(0.99, 0.01, 1000)
    t = torch.tensor([10, 900])
    v = target_for("v_prediction", x0, noise, alphas, t)
    a = alphas[t].view(-1, 1, 1, 1)
    assert torch.allclose(v, a.sqrt() * noise - (1 - a).sqrt() * x0)
    # x0 is recoverable from x_t and v: the identity v-prediction samplers rely on
    x_t = add_noise(x0, noise, alphas, t)
    assert torch.allclose(a.sqrt() * x_t - (1 - a).sqrt() * v, x0, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (dict(rank=0), "rank=0"), (dict(steps=0), "steps=0"), (dict(preset="everything"), "preset"),
    (dict(lr=0), "lr=0"), (dict(mixed_precision="fp8"), "mixed_precision"),
    (dict(output_name="a/b"), "output_name"),
])
def test_bad_training_options_name_the_value(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**bad)


def test_previews_are_rendered_by_the_model_being_trained(tmp_path):
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=2))
    shots = []

    class Cb(TrainCallbacks):
        def on_preview(self, step, images, prompt):
            shots.append((step, images, prompt))

    cfg = TrainConfig(steps=4, lr=5e-2, preview_every=2, preview_steps=3, preset="all")
    backend = tiny_backend()
    Trainer(backend, TrainData(scan_folder(dcfg), dcfg), cfg, callbacks=Cb()).run()
    assert [s for s, _, _ in shots] == [0, 2, 4]  # step 0: the baseline, before training
    img0, img2, img4 = (shots[i][1] for i in range(3))
    assert img2.shape == (1, 32, 32, 3) and 0 <= img2.min() and img2.max() <= 1
    assert not torch.equal(img2, img4), "the preview did not change as the LoRA trained"
    assert not torch.equal(img0, img2)
    assert shots[0][2] == shots[1][2] and shots[0][2].startswith("sks")
    # the baseline is the base model's image: the same render with no LoRA at all (its up weights start at zero)
    bw, bh = scan_folder(dcfg)[0].bucket
    base = sample_preview(backend, shots[0][2], seed=cfg.preview_seed, steps=cfg.preview_steps, width=bw, height=bh,
                          latent_factor=backend.latent_factor, latent_channels=backend.latent_channels)
    torch.testing.assert_close(img0, base)
