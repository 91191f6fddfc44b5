"""The log-SNR noise schedule: the forward process and the conversions between predictions."""

import math

import pytest
import torch
import torch.nn.functional as F

from mdm_lite.schedule import (
    LOGSNR_MAX,
    LOGSNR_MIN,
    add_noise,
    alpha_sigma,
    cosine_logsnr,
    discrete_timesteps,
    eps_from_x0,
    predict_x0_eps,
    shifted_cosine_logsnr,
    velocity,
)

torch.set_num_threads(1)

# A spread of log-SNRs from very noisy to nearly clean, beyond the schedule's own range.
LOGSNRS = torch.tensor([-20.0, -15.0, -5.0, -1.0, 0.0, 0.5, 3.0, 10.0, 15.0, 20.0])


def test_alpha_squared_plus_sigma_squared_is_one():
    alpha, sigma = alpha_sigma(LOGSNRS.double())
    torch.testing.assert_close(alpha ** 2 + sigma ** 2, torch.ones_like(alpha), rtol=0, atol=1e-12)
    assert (alpha > 0).all() and (sigma > 0).all()


def test_alpha_sigma_have_the_requested_logsnr():
    alpha, sigma = alpha_sigma(LOGSNRS.double())
    torch.testing.assert_close(torch.log(alpha ** 2 / sigma ** 2), LOGSNRS.double(), rtol=0, atol=1e-9)


def test_cosine_logsnr_runs_from_logsnr_max_to_logsnr_min():
    ends = cosine_logsnr(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(ends, torch.tensor([LOGSNR_MAX, LOGSNR_MIN]), rtol=0, atol=1e-4)


def test_cosine_logsnr_is_strictly_decreasing_in_t():
    logsnr = cosine_logsnr(torch.linspace(0.0, 1.0, 10_001))
    assert torch.isfinite(logsnr).all()
    assert (logsnr.diff() < 0).all()


def test_cosine_logsnr_is_the_cosine_schedule_inside_its_range():
    # alpha_t = cos(pi t / 2), sigma_t = sin(pi t / 2), i.e. lambda = 2 log cot(pi t / 2). Squeezing t
    # to keep the ends finite moves the angle by at most atan(exp(-7.5)) = 5.5e-4, and on [0.05, 0.95]
    # |d lambda / d angle| = 4 / sin(2 angle) <= 26, so the two differ by at most 0.015.
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    expected = 2 * torch.log(torch.cos(math.pi * t / 2) / torch.sin(math.pi * t / 2))
    torch.testing.assert_close(cosine_logsnr(t), expected, rtol=0, atol=0.015)


@pytest.mark.parametrize("resolution, base", [(64, 32), (32, 32), (16, 32), (8, 64), (128, 16)])
def test_shifted_logsnr_adds_two_log_base_over_resolution(resolution, base):
    t = torch.linspace(0.0, 1.0, 101)
    shift = shifted_cosine_logsnr(t, resolution, base) - cosine_logsnr(t)
    torch.testing.assert_close(shift, torch.full_like(t, 2 * math.log(base / resolution)), rtol=0, atol=1e-5)


def test_shift_is_the_snr_gain_of_average_pooling():
    # Pooling a noisy 2R image 2x averages 4 independent noise values: the pooled image is
    # alpha x0 + noise of variance sigma^2 / 4, so it sits at log(alpha^2 / (sigma^2 / 4)) =
    # logsnr + log 4, the shift of level R. x0 is constant, so the pooled variance is the noise's.
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((1, 1, 512, 512), 0.5)
    logsnr = torch.tensor([1.0])
    pooled = F.avg_pool2d(add_noise(x0, torch.randn(x0.shape, generator=g), logsnr), 2)
    alpha, _ = alpha_sigma(logsnr)
    measured = torch.log(alpha ** 2 / pooled.var()).item()
    t = torch.tensor(0.3)
    shift = (shifted_cosine_logsnr(t, 256, 512) - cosine_logsnr(t)).item()
    # 65536 pooled pixels: their variance is known to a relative sqrt(2 / 65536) = 0.55%, so its
    # log to 0.0055; 5 standard errors is 0.028.
    assert abs(measured - (logsnr.item() + shift)) < 0.03


def test_noised_samples_have_mean_alpha_x0_and_std_sigma():
    g = torch.Generator().manual_seed(0)
    n = 40_000
    logsnr = torch.tensor([-6.0, -1.0, 0.0, 2.0, 6.0])
    x0 = torch.tensor([0.8, -0.5, 0.3, -1.0, 1.0]).reshape(5, 1, 1, 1).expand(5, 1, 1, n)
    z = add_noise(x0, torch.randn(x0.shape, generator=g), logsnr).reshape(5, n)
    alpha, sigma = alpha_sigma(logsnr)
    # Standard errors over n samples: sigma / sqrt(n) for the mean, sigma / sqrt(2 n) for the std.
    assert ((z.mean(1) - alpha * x0[:, 0, 0, 0]).abs() < 5 * sigma / math.sqrt(n)).all()
    assert ((z.std(1) - sigma).abs() < 5 * sigma / math.sqrt(2 * n)).all()


def _noised_batch(logsnr: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((len(logsnr), 3, 8, 8), generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return x0, eps, add_noise(x0, eps, logsnr)


def test_v_prediction_round_trips_to_x0_and_eps():
    logsnr = LOGSNRS.double()
    x0, eps, z = _noised_batch(logsnr)
    x0_hat, eps_hat = predict_x0_eps(z, velocity(x0, eps, logsnr), logsnr, "v")
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-10)


def test_eps_prediction_round_trips_to_x0_and_eps():
    # x0 = (z - sigma eps) / alpha divides by alpha: stay where alpha is not vanishingly small.
    logsnr = torch.tensor([-5.0, -1.0, 0.0, 3.0, 10.0, 15.0], dtype=torch.float64)
    x0, eps, z = _noised_batch(logsnr)
    x0_hat, eps_hat = predict_x0_eps(z, eps, logsnr, "eps")
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(eps_hat, eps)


def test_eps_from_x0_recovers_the_noise():
    logsnr = LOGSNRS.double()
    x0, eps, z = _noised_batch(logsnr)
    torch.testing.assert_close(eps_from_x0(z, x0, logsnr), eps, rtol=0, atol=1e-8)


def test_velocity_is_the_derivative_of_z_along_the_angle():
    # With alpha = cos(phi), sigma = sin(phi), z(phi) = cos(phi) x0 + sin(phi) eps and dz/dphi = v.
    x0, eps, _ = _noised_batch(torch.zeros(4, dtype=torch.float64))
    phi = torch.tensor([0.1, 0.5, 1.0, 1.4], dtype=torch.float64)
    h = 1e-6

    def z(angle):
        return add_noise(x0, eps, 2 * torch.log(torch.cos(angle) / torch.sin(angle)))

    dz = (z(phi + h) - z(phi - h)) / (2 * h)
    v = velocity(x0, eps, 2 * torch.log(torch.cos(phi) / torch.sin(phi)))
    torch.testing.assert_close(dz, v, rtol=0, atol=1e-6)


def test_unknown_prediction_kind_is_rejected():
    z = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="prediction kind"):
        predict_x0_eps(z, z, torch.zeros(1), "x0")


@pytest.mark.parametrize("num_steps", [1, 2, 50, 1000])
def test_discrete_timesteps_run_from_one_to_zero_in_equal_steps(num_steps):
    times = discrete_timesteps(num_steps)
    assert times.shape == (num_steps + 1,)
    assert times[0].item() == 1.0 and times[-1].item() == 0.0
    assert (times.diff() < 0).all()
    torch.testing.assert_close(times.diff(), torch.full((num_steps,), -1.0 / num_steps))


def test_discrete_timesteps_need_at_least_one_step():
    with pytest.raises(ValueError):
        discrete_timesteps(0)
