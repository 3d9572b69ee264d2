"""Loss options: Min-SNR weights, noise offset, pyramid noise, robust losses, DreamBooth prior loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from lora_workbench.training.train.losses import (
    apply_noise_offset,
    huber_c_for,
    min_snr_weights,
    per_sample_loss,
    prior_preservation_loss,
    pyramid_noise_like,
    snr,
)


def sd_alphas_cumprod(n: int = 1000) -> torch.Tensor:
    """Stable Diffusion's scaled-linear schedule (beta 0.00085 -> 0.012)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- SNR and Min-SNR-gamma ----------------------------------------------------------------------------
def test_snr_is_a_over_one_minus_a():
    ac = sd_alphas_cumprod()
    t = torch.tensor([0, 10, 500, 999])
    a = ac.double()[t]
    assert torch.allclose(snr(ac, t).double(), a / (1 - a), rtol=1e-5)
    assert snr(ac, t).dtype == torch.float32


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_equal_the_formula(prediction):
    ac, gamma = sd_alphas_cumprod(), 5.0
    t = torch.tensor([0, 50, 100, 200, 300, 400, 600, 999])
    s = ac.double()[t] / (1 - ac.double()[t])
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    expected = clipped / s if prediction == "epsilon" else clipped / (s + 1)
    w = min_snr_weights(ac, t, gamma, prediction)
    assert w.shape == (8,) and w.dtype == torch.float32
    assert torch.allclose(w.double(), expected, rtol=1e-5)


def test_min_snr_clips_exactly_where_snr_exceeds_gamma():
    ac, gamma = sd_alphas_cumprod(), 5.0
    t = torch.arange(1000)
    s = snr(ac, t)
    high, low = s > gamma, s < gamma
    assert high.any() and low.any()  # the schedule crosses gamma, so both cases are checked
    w = min_snr_weights(ac, t, gamma, "epsilon")
    assert torch.equal(w[low], torch.ones(int(low.sum())))  # exactly 1: not down-weighted at all
    assert torch.allclose(w[high], gamma / s[high], rtol=1e-6)
    assert (w[high] < 1).all()
    v = min_snr_weights(ac, t, gamma, "v_prediction")
    assert torch.allclose(v[low], s[low] / (s[low] + 1), rtol=1e-6)
    assert torch.allclose(v[high], gamma / (s[high] + 1), rtol=1e-6)


@pytest.mark.parametrize("gamma", [None, 0, 0.0])
def test_min_snr_off_gives_ones(gamma):
    w = min_snr_weights(sd_alphas_cumprod(), torch.tensor([0, 999]), gamma, "epsilon")
    assert torch.equal(w, torch.ones(2))


def test_min_snr_stays_finite_with_zero_terminal_snr():
    ac = sd_alphas_cumprod().clone()
    ac[-1] = 0.0  # zero terminal SNR (Lin et al. 2023): snr is 0 at the last timestep
    t = torch.tensor([999, 0])
    assert torch.isfinite(min_snr_weights(ac, t, 5.0, "epsilon")).all()
    assert min_snr_weights(ac, t, 5.0, "epsilon")[0] == 1.0
    assert min_snr_weights(ac, t, 5.0, "v_prediction")[0] == 0.0


def test_min_snr_bad_values_are_named():
    ac, t = sd_alphas_cumprod(), torch.tensor([1])
    with pytest.raises(ValueError, match="sample"):
        min_snr_weights(ac, t, 5.0, "sample")
    with pytest.raises(ValueError, match="min_snr_gamma=-1"):
        min_snr_weights(ac, t, -1.0, "epsilon")


# ---- noise offset ------------------------------------------------------------------------------------------
def test_noise_offset_zero_is_identity_and_draws_nothing():
    noise = torch.randn(2, 4, 8, 8)
    g = gen(3)
    assert apply_noise_offset(noise, 0.0, g) is noise
    assert torch.equal(torch.randn(5, generator=g), torch.randn(5, generator=gen(3)))


def test_noise_offset_shifts_each_channel_by_offset_times_normal():
    offset = 0.1
    noise = torch.randn(2000, 4, 8, 8, generator=gen(1))
    out = apply_noise_offset(noise, offset, gen(2))
    shift = out - noise
    # one constant per (sample, channel) ...
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)
    # ... distributed as offset * N(0, 1): 8000 draws give std within a few percent
    s = shift[:, :, 0, 0].flatten()
    assert abs(float(s.std()) / offset - 1) < 0.05
    assert abs(float(s.mean())) < 4 * offset / math.sqrt(s.numel())
    # so the per-channel means of the noise spread by that much more than white noise's
    spread = out.mean(dim=(2, 3)).var() - noise.mean(dim=(2, 3)).var()
    assert abs(float(spread) / offset**2 - 1) < 0.1


def test_noise_offset_repeats_with_the_same_seed_and_keeps_dtype():
    noise = torch.randn(3, 4, 8, 8).half()
    a = apply_noise_offset(noise, 0.1, gen(7))
    b = apply_noise_offset(noise, 0.1, gen(7))
    c = apply_noise_offset(noise, 0.1, gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float16 and a.device == noise.device


def test_noise_offset_refuses_a_missing_generator_or_bad_offset():
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        apply_noise_offset(torch.randn(1, 4, 2, 2), 0.1, None)
    with pytest.raises(ValueError, match="noise_offset=-0.1"):
        apply_noise_offset(torch.randn(1, 4, 2, 2), -0.1, gen())


# ---- pyramid (multi-resolution) noise -----------------------------------------------------------------
def _pooled_var(x: torch.Tensor, k: int = 8) -> float:
    """Variance left after averaging k x k blocks: the energy at low spatial frequencies."""
    return float(F.avg_pool2d(x, k).var())


def test_pyramid_noise_has_unit_std_and_more_low_frequency_energy():
    white = torch.randn(8, 4, 64, 64, generator=gen(0))
    before = white.clone()
    pyr = pyramid_noise_like(white, gen(1), iterations=6, discount=0.4)
    assert torch.equal(white, before)  # the input is not modified (kohya's version adds in place)
    assert pyr.shape == white.shape
    assert abs(float(pyr.std()) - 1) < 1e-4
    # White noise averaged over 8x8 blocks keeps 1/64 of its variance; pyramid noise of the same
    # total variance keeps about twice that (1.56-2.4x over 20 seeds; white vs white is 1 +- 0.06).
    assert _pooled_var(white) == pytest.approx(1 / 64, rel=0.2)
    assert _pooled_var(pyr) > 1.3 * _pooled_var(white)


def test_pyramid_noise_off_is_identity_and_seeded():
    noise = torch.randn(2, 4, 32, 32)
    g = gen(5)
    assert pyramid_noise_like(noise, g, iterations=0) is noise
    assert torch.equal(torch.randn(3, generator=g), torch.randn(3, generator=gen(5)))  # nothing drawn
    a = pyramid_noise_like(noise, gen(9))
    assert torch.equal(a, pyramid_noise_like(noise, gen(9)))
    assert not torch.equal(a, pyramid_noise_like(noise, gen(10)))


def test_pyramid_noise_bad_values_are_named():
    with pytest.raises(ValueError, match="pyramid_noise_iterations=-1"):
        pyramid_noise_like(torch.randn(1, 4, 8, 8), gen(), iterations=-1)
    with pytest.raises(ValueError, match="pyramid_noise_discount=0"):
        pyramid_noise_like(torch.randn(1, 4, 8, 8), gen(), iterations=2, discount=0)


# ---- per-sample losses ------------------------------------------------------------------------------------
def _residuals():
    g = gen(4)
    pred = torch.randn(3, 4, 5, 5, generator=g) * 2
    target = torch.randn(3, 4, 5, 5, generator=g)
    return pred, target, (pred.double() - target.double())


@pytest.mark.parametrize("loss_type", ["mse", "l1", "huber", "smooth_l1"])
def test_each_loss_type_equals_its_formula(loss_type):
    pred, target, x = _residuals()
    c = 0.3
    expected = {
        "mse": x**2,
        "l1": x.abs(),
        "huber": 2 * c * (torch.sqrt(x**2 + c**2) - c),
        "smooth_l1": torch.where(x.abs() < c, 0.5 * x**2 / c, x.abs() - 0.5 * c),
    }[loss_type].mean(dim=(1, 2, 3))
    got = per_sample_loss(pred, target, loss_type, huber_c=c)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, rtol=1e-5)


def test_mse_l1_smooth_l1_match_torch():
    pred, target, _ = _residuals()
    for loss_type, fn in [("mse", F.mse_loss), ("l1", F.l1_loss),
                          ("smooth_l1", lambda a, b: F.smooth_l1_loss(a, b, beta=0.3))]:
        torch_mean = fn(pred, target)
        assert torch.allclose(per_sample_loss(pred, target, loss_type, huber_c=0.3).mean(), torch_mean, rtol=1e-5)


def test_huber_is_quadratic_for_small_residuals_and_linear_for_large():
    c = 0.1
    zero = torch.zeros(1, 1)
    small = per_sample_loss(torch.full((1, 1), 1e-3), zero, "huber", huber_c=c)
    assert float(small) == pytest.approx(1e-6, rel=1e-4)  # ~ x**2 (the mse value)
    large = per_sample_loss(torch.full((1, 1), 100.0), zero, "huber", huber_c=c)
    assert float(large) == pytest.approx(2 * c * (100.0 - c), rel=1e-5)  # ~ 2c(|x| - c): l1-like
    # so a 10x larger outlier costs ~10x more, not 100x as under mse
    larger = per_sample_loss(torch.full((1, 1), 1000.0), zero, "huber", huber_c=c)
    assert float(larger / large) == pytest.approx(10.0, rel=1e-3)
    s_small = per_sample_loss(torch.full((1, 1), 0.01), zero, "smooth_l1", huber_c=c)
    assert float(s_small) == pytest.approx(0.5 * 0.01**2 / c, rel=1e-5)
    s_large = per_sample_loss(torch.full((1, 1), 5.0), zero, "smooth_l1", huber_c=c)
    assert float(s_large) == pytest.approx(5.0 - c / 2, rel=1e-6)


def test_huber_keeps_tiny_residuals_exact_in_fp32():
    x = torch.full((1, 8), 1e-4)
    got = per_sample_loss(x, torch.zeros_like(x), "huber", huber_c=0.1)
    c = 0.1
    exact = 2 * c * (math.sqrt(1e-8 + c * c) - c)  # float64; the naive fp32 form is ~20% off here
    assert float(got) == pytest.approx(exact, rel=1e-5)


def test_per_sample_huber_c_applies_to_its_own_sample():
    pred = torch.full((2, 3), 2.0)
    target = torch.zeros_like(pred)
    c = torch.tensor([0.1, 1.0])
    got = per_sample_loss(pred, target, "huber", huber_c=c)
    each = [per_sample_loss(pred[i:i + 1], target[i:i + 1], "huber", huber_c=float(c[i])) for i in range(2)]
    assert torch.allclose(got, torch.cat(each))
    assert got[0] != got[1]


def test_loss_is_fp32_for_half_inputs_and_keeps_gradients():
    pred = torch.randn(2, 4, 4, 4).bfloat16().requires_grad_()
    loss = per_sample_loss(pred, torch.zeros(2, 4, 4, 4, dtype=torch.bfloat16), "huber", huber_c=0.1)
    assert loss.dtype == torch.float32
    loss.sum().backward()
    assert pred.grad is not None and torch.isfinite(pred.grad.float()).all()


def test_loss_errors_name_the_value_and_fix():
    p = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="loss_type='l3'.*mse, l1, huber, smooth_l1"):
        per_sample_loss(p, p, "l3")
    with pytest.raises(ValueError, match="needs huber_c"):
        per_sample_loss(p, p, "huber")
    with pytest.raises(ValueError, match="huber_c=0"):
        per_sample_loss(p, p, "smooth_l1", huber_c=0.0)
    with pytest.raises(ValueError, match="shape"):
        per_sample_loss(p, torch.zeros(2, 4))


# ---- Huber threshold schedules (kohya's get_huber_threshold_if_needed) -------------------------------
def test_huber_c_constant():
    t = torch.tensor([0, 500, 999])
    assert torch.allclose(huber_c_for(t, 1000, 0.1, "constant"), torch.full((3,), 0.1))
    assert torch.allclose(huber_c_for(t, 1000, 0.1, "constant", huber_scale=2.0), torch.full((3,), 0.2))


def test_huber_c_exponential_matches_kohya():
    t = torch.tensor([0, 250, 500, 1000])
    got = huber_c_for(t, 1000, 0.1, "exponential")
    alpha = -math.log(0.1) / 1000
    expected = torch.tensor([math.exp(-alpha * float(s)) for s in t])
    assert torch.allclose(got, expected, rtol=1e-6)
    # 1 at the clean end, huber_c at the noisy end, the geometric mean halfway
    assert got[0] == pytest.approx(1.0) and got[2] == pytest.approx(math.sqrt(0.1)) and got[3] == pytest.approx(0.1)
    assert torch.allclose(huber_c_for(t, 1000, 0.1, "exponential", huber_scale=3.0), 3 * expected, rtol=1e-6)


def test_huber_c_snr_matches_kohya():
    ac = sd_alphas_cumprod()
    t = torch.tensor([0, 100, 500, 999])
    got = huber_c_for(t, 1000, 0.1, "snr", alphas_cumprod=ac)
    a = ac.double()[t]
    sigma = ((1 - a) / a).sqrt()
    assert torch.allclose(got.double(), (1 - 0.1) / (1 + sigma) ** 2 + 0.1, rtol=1e-5)
    assert got[0] > 0.8 and got[-1] < 0.11  # near 1 when clean, near huber_c in pure noise
    assert (got[:-1] > got[1:]).all()


def test_huber_c_errors_name_the_fix():
    t = torch.tensor([1])
    with pytest.raises(ValueError, match="needs alphas_cumprod"):
        huber_c_for(t, 1000, 0.1, "snr")
    with pytest.raises(ValueError, match="huber_schedule='linear'"):
        huber_c_for(t, 1000, 0.1, "linear")
    with pytest.raises(ValueError, match="huber_c=0"):
        huber_c_for(t, 1000, 0.0, "exponential")


# ---- DreamBooth prior preservation --------------------------------------------------------------------
def test_prior_loss_weights_the_two_means():
    per_sample = torch.tensor([1.0, 2.0, 3.0, 5.0], requires_grad=True)
    is_prior = torch.tensor([False, True, False, True])
    total, inst, prior = prior_preservation_loss(per_sample, is_prior, 0.5)
    total, inst, prior = total, inst.detach(), prior.detach()
    assert float(inst) == pytest.approx(2.0)  # mean of 1, 3
    assert float(prior) == pytest.approx(3.5)  # mean of 2, 5
    assert float(total.detach()) == pytest.approx(2.0 + 0.5 * 3.5)
    total.backward()
    # each instance sample counts 1/n_instance, each class sample prior_weight/n_prior
    assert torch.allclose(per_sample.grad, torch.tensor([0.5, 0.25, 0.5, 0.25]))


def test_prior_loss_equals_separate_means_and_handles_one_kind_only():
    per_sample = torch.rand(6, generator=gen(0))
    is_prior = torch.tensor([True, False, False, True, False, False])
    total, inst, prior = prior_preservation_loss(per_sample, is_prior, 1.0)
    assert torch.allclose(inst, per_sample[~is_prior].mean()) and torch.allclose(prior, per_sample[is_prior].mean())
    no_prior = torch.zeros(6, dtype=torch.bool)
    total, inst, prior = prior_preservation_loss(per_sample, no_prior, 1.0)
    assert torch.allclose(total, per_sample.mean()) and float(prior) == 0.0
    only_prior = torch.ones(6, dtype=torch.bool)
    total, inst, prior = prior_preservation_loss(per_sample, only_prior, 2.0)
    assert torch.allclose(total, 2.0 * per_sample.mean()) and float(inst) == 0.0


def test_prior_loss_errors():
    with pytest.raises(ValueError, match="bool tensor of shape"):
        prior_preservation_loss(torch.zeros(3), torch.tensor([0, 1, 0]), 1.0)
    with pytest.raises(ValueError, match="prior_loss_weight=-1"):
        prior_preservation_loss(torch.zeros(3), torch.zeros(3, dtype=torch.bool), -1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_everything_stays_on_the_gpu():
    dev = torch.device("cuda")
    ac = sd_alphas_cumprod()  # the table may stay on the CPU
    t = torch.tensor([10, 900], device=dev)
    assert min_snr_weights(ac, t, 5.0, "epsilon").device.type == "cuda"
    assert huber_c_for(t, 1000, 0.1, "snr", alphas_cumprod=ac).device.type == "cuda"
    noise = torch.randn(2, 4, 16, 16, device=dev)
    assert apply_noise_offset(noise, 0.1, gen()).device.type == "cuda"
    assert pyramid_noise_like(noise, gen()).device.type == "cuda"
    c = huber_c_for(t, 1000, 0.1, "exponential")
    assert per_sample_loss(noise.half(), noise.half() * 0, "huber", huber_c=c).device.type == "cuda"
