"""Flow matching: the timestep samplings, the options that choose them, and the trainer's flow path
on a tiny diffusers Flux transformer (tests/tiny_flow.py)."""

from __future__ import annotations

import math

import pytest
import torch

from lora_workbench.training.config import ConfigError, TrainConfig
from lora_workbench.training.data.dataset import scan_folder
from lora_workbench.training.train import losses as L
from lora_workbench.training.train.schedules import flow_add_noise, flow_target, flux_mu, sample_flow_sigmas
from lora_workbench.training.train.trainer import RunOptions, TrainData, Trainer

from helpers import make_images, tiny_dataset_cfg
from tiny_flow import TinyFlowBackend
from helpers import StopAt

N = 20000


def draw(method, seed=0, **kw):
    return sample_flow_sigmas(torch.Generator().manual_seed(seed), N, method, **kw)


# ---- the samplings -----------------------------------------------------------------------------------
def test_flux_mu_is_bfl_linear_shift():
    assert flux_mu(256) == pytest.approx(0.5)
    assert flux_mu(4096) == pytest.approx(1.15)  # 1024 px: 64 x 64 tokens
    assert flux_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)


def test_logit_normal_has_median_one_half_and_follows_its_mean():
    s = draw("logit_normal")
    assert s.median().item() == pytest.approx(0.5, abs=0.02)
    assert 0 < s.min() and s.max() < 1
    # logit_mean m puts the median at sigmoid(m); a larger std spreads the draws towards 0 and 1
    assert draw("logit_normal", logit_mean=1.0).median().item() == pytest.approx(1 / (1 + math.e ** -1), abs=0.02)
    assert draw("logit_normal", logit_std=2.0).std() > s.std()
    u = draw("uniform")
    assert u.mean().item() == pytest.approx(0.5, abs=0.01) and u.std().item() == pytest.approx(12 ** -0.5, abs=0.01)


def test_shift_one_is_identity_and_larger_shift_means_noisier():
    base = draw("logit_normal")
    assert torch.allclose(draw("shift", shift=1.0), base)
    assert draw("shift", shift=3.0).median() > base.median() + 0.2  # 3u/(1+2u) at u=0.5 is 0.75
    assert draw("shift", shift=3.0).median().item() == pytest.approx(0.75, abs=0.02)


def test_flux_shift_moves_up_with_more_image_tokens():
    small, large = draw("flux_shift", image_tokens=256), draw("flux_shift", image_tokens=4096)
    assert small.median() > draw("logit_normal").median()  # mu 0.5 > 0 already shifts up
    assert large.median() > small.median()
    # at the median u = 0.5: exp(mu) / (exp(mu) + 1) = sigmoid(mu)
    assert large.median().item() == pytest.approx(1 / (1 + math.exp(-1.15)), abs=0.02)
    with pytest.raises(ValueError, match="image_tokens"):
        draw("flux_shift")


def test_same_generator_state_gives_the_same_draws():
    for method in ("uniform", "logit_normal", "shift", "flux_shift"):
        kw = dict(shift=3.0, image_tokens=1024)
        assert torch.equal(draw(method, seed=5, **kw), draw(method, seed=5, **kw))
        assert not torch.equal(draw(method, seed=5, **kw), draw(method, seed=6, **kw))
    with pytest.raises(ValueError, match="'sigmoid' is not a flow sampling"):
        draw("sigmoid")


def test_flow_path_and_target():
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    s = torch.tensor([0.0, 1.0])
    x_t = flow_add_noise(x0, noise, s)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[1], noise[1])
    # the target is the velocity along the path: d x_t / d sigma
    s2 = torch.tensor([0.3, 0.3])
    assert torch.allclose((flow_add_noise(x0, noise, s2 + 1e-3) - flow_add_noise(x0, noise, s2)) / 1e-3,
                          flow_target(x0, noise), atol=1e-3)


def test_flow_huber_schedules_use_sigma():
    s = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(L.huber_c_for_flow(s, 0.1, "constant"), torch.full((3,), 0.1))
    assert torch.allclose(L.huber_c_for_flow(s, 0.1, "exponential"), torch.tensor([1.0, 0.1 ** 0.5, 0.1]))
    snr = L.huber_c_for_flow(s, 0.1, "snr")
    assert snr[0] == pytest.approx(1.0) and snr[-1] == pytest.approx(0.1) and snr[0] > snr[1] > snr[2]


# ---- the options -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(timestep_sampling="sigmoid"), r"timestep_sampling='sigmoid' \(choose one of default"),
    (dict(logit_std=0.0), r"logit_std=0.0 \(use a positive number"),
    (dict(logit_mean=float("nan")), r"logit_mean=nan"),
    (dict(flow_shift=-1.0), r"flow_shift=-1.0 \(use None"),
    (dict(prediction_type="flow", min_snr_gamma=5.0), r"min_snr_gamma=5.0 \(Min-SNR weighting needs a DDPM"),
    (dict(prediction_type="epsilon", timestep_sampling="flux_shift"), r"shift, flux_shift and qwen_shift are for flow models"),
])
def test_bad_sampling_options_name_the_value_and_the_fix(kw, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kw)


def test_config_round_trips_the_new_options():
    cfg = TrainConfig(prediction_type="flow", timestep_sampling="shift", flow_shift=3.0, logit_mean=-0.5)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    old = {k: v for k, v in TrainConfig().to_dict().items()
           if k not in ("timestep_sampling", "logit_mean", "logit_std", "flow_shift")}
    assert TrainConfig.from_dict(old) == TrainConfig()  # states saved before these options load


# ---- the trainer's flow path -------------------------------------------------------------------------

@pytest.fixture
def flow_data(tmp_path):
    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=2, size=64), resolution=64, bucket_step=64,
                            min_bucket_side=64, max_bucket_side=64)
    return TrainData(scan_folder(dcfg), dcfg)


@torch.no_grad()
def flow_eval_loss(be, data, n=8, seed=123):
    """Mean flow loss over fixed (noise, sigma) draws: comparable before and after training."""
    from lora_workbench.training.data.buckets import load_pixels

    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for r in data.records:
        x0 = be.encode_images(load_pixels(r, data.config)[0][None]).expand(n, -1, -1, -1)
        noise = torch.randn(x0.shape, generator=g)
        s = torch.rand(n, generator=g)
        pred = be.predict(flow_add_noise(x0, noise, s), s, be.encode_prompts([r.caption]).expand(n, -1, -1))
        total += float((pred - flow_target(x0, noise)).square().mean())
    return total / len(data.records)


def test_flow_training_lowers_the_loss(flow_data):
    be = TinyFlowBackend()
    before = flow_eval_loss(be, flow_data)
    result = Trainer(be, flow_data, TrainConfig(rank=4, alpha=4, steps=40, lr=5e-3)).run(keep_injected=True)
    after = flow_eval_loss(be, flow_data)
    assert after < 0.9 * before, (before, after)
    assert result.lora.metadata["lw_timestep_sampling"] == "flux_shift"  # the backend's default, resolved
    assert result.lora.metadata["lw_flow_shift"] == "1.0"


def test_flow_resume_continues_the_same_curve(flow_data, tmp_path):
    cfg = TrainConfig(rank=4, alpha=4, steps=6, lr=1e-3, timestep_sampling="shift", flow_shift=3.0,
                      loss_type="huber", noise_offset=0.05, output_name="f")
    full = Trainer(TinyFlowBackend(), flow_data, cfg).run()
    out = tmp_path / "run"
    first = Trainer(TinyFlowBackend(), flow_data, cfg, callbacks=StopAt(3), options=RunOptions(output_dir=out)).run()
    assert first.steps_done == 3
    resumed = Trainer(TinyFlowBackend(), flow_data, cfg,
                      options=RunOptions(output_dir=out, resume_from=out / "f-state")).run()
    assert resumed.losses[:3] == first.losses
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(full.losses), atol=1e-6, rtol=1e-5)


def test_min_snr_with_a_flow_model_fails_at_run_start(flow_data):
    trainer = Trainer(TinyFlowBackend(), flow_data, TrainConfig(steps=1, min_snr_gamma=5.0))
    with pytest.raises(ConfigError, match="min_snr_gamma=5.0 does not apply to this flow-matching model"):
        trainer.run()


def test_flow_preview_uses_the_family_sampler():
    from lora_workbench.training.train.preview import sample_preview

    calls = []

    class Counting(TinyFlowBackend):
        def predict(self, x_t, t, cond):
            calls.append((x_t.shape[0], float(t[0])))
            return super().predict(x_t, t, cond)

    img = sample_preview(Counting(), "a ball", steps=3, width=64, height=64, latent_channels=16)
    assert img.shape == (1, 64, 64, 3)
    assert calls == [(1, 1.0), (1, pytest.approx(2 / 3)), (1, pytest.approx(1 / 3))]  # no CFG pass at guidance 1
    calls.clear()
    sample_preview(Counting(), "a ball", steps=2, width=64, height=64, latent_channels=16, guidance=4.0)
    assert [c[0] for c in calls] == [2, 2]


# ---- DDPM models ---------------------------------------------------------------------------------------
def test_ddpm_logit_normal_maps_u_to_integer_timesteps(tmp_path):
    from helpers import tiny_backend

    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=2))
    data = TrainData(scan_folder(dcfg), dcfg)
    trainer = Trainer(tiny_backend(), data, TrainConfig(timestep_sampling="logit_normal", logit_std=0.5))
    trainer._n_train_t = 1000
    _, t = trainer._noise(torch.Generator().manual_seed(0), (4000, 4, 4, 4), torch.device("cpu"))
    assert t.dtype == torch.long and 0 <= t.min() and t.max() <= 999
    assert abs(t.float().median().item() - 500) < 15 and t.float().std() < 200  # uniform's std is 289
    assert trainer.timestep_sampling() == "logit_normal"
    assert Trainer(tiny_backend(), data, TrainConfig()).timestep_sampling() == "uniform"  # SD's default


def test_a_flow_sampling_with_a_ddpm_model_fails_at_run_start(tmp_path):
    from helpers import tiny_backend

    dcfg = tiny_dataset_cfg(make_images(tmp_path / "img", n=2))
    cfg = TrainConfig(steps=1, timestep_sampling="shift")
    trainer = Trainer(tiny_backend(), TrainData(scan_folder(dcfg), dcfg), cfg)
    with pytest.raises(ConfigError, match="timestep_sampling='shift' is for flow-matching models.*'epsilon'"):
        trainer.run()


def test_a_ddpm_objective_for_a_flow_model_fails_at_run_start(flow_data):
    trainer = Trainer(TinyFlowBackend(), flow_data, TrainConfig(steps=1, prediction_type="epsilon"))
    with pytest.raises(ConfigError, match="prediction_type='epsilon' does not fit this model, which is trained as"):
        trainer.run()
