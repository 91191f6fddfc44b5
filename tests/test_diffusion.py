"""The multi-resolution loss and the samplers, checked against closed forms."""

import math

import pytest
import torch
import torch.nn.functional as F

from mdm_lite import (DiffusionConfig, NestedUNet, NestedUNetConfig, UNetConfig, drop_captions, image_pyramid,
                      multires_loss)
from mdm_lite.config_check import ConfigError
from mdm_lite.samplers import ddim_step, ddpm_step, dpmpp_2m_step, sample
from mdm_lite.schedule import add_noise, alpha_sigma, cosine_logsnr

torch.set_num_threads(1)

# --- Sampling Gaussian data with its exact denoiser --------------------------------------------
#
# If every pixel of level k is x0 ~ N(MU, S_k^2) independently, then given z = alpha x0 + sigma eps
# the posterior mean is E[x0 | z] = MU + alpha S_k^2 / (alpha^2 S_k^2 + sigma^2) (z - alpha MU),
# and E[eps | z] = (z - alpha E[x0 | z]) / sigma: the best possible network, in closed form. With it
# as the model, a correct sampler must return samples with mean MU and std S_k, up to two known
# effects. Every sampler returns its last x0 estimate, E[x0 | z] at t = 1/N, whose std is below S_k
# even if every step before was exact: `denoised_std` (0.9995 S_k at N = 500, 0.78 S_k at N = 20).
# And the steps are discrete: from `exact_output_law` (float64), the std comes out below that by
# 1.2% of S_k for DDIM and 3.1% for DDPM at 500 steps (both first order), by 1.0% for
# DPM-Solver++(2M) at 20 steps (DDIM at 20 steps: 6.2%); the mean is right to 2e-4 S_k. The test
# allows that bias, rounded up, on top of the sampling error.
MU, STD = 0.3, 0.2  # clip_sample=False anyway, but [-1, 1] holds the data
RESOLUTIONS = [8, 4]
LEVEL_STDS = [STD / 2 ** k for k in range(len(RESOLUTIONS))]  # 2x average pooling halves the std
BASE = 4  # as the paper's 64/32 with base 32: the outer level is shifted to more noise
BATCH = 64  # 12288 pixels at 8x8, 3072 at 4x4
NUM_STEPS = {"ddim": 500, "ddpm": 500, "dpmpp": 20}
STD_BIAS = {"ddim": 0.014, "ddpm": 0.034, "dpmpp": 0.015}  # in units of S_k


def true_logsnr(t: torch.Tensor, resolution: int) -> torch.Tensor:
    """The shifted cosine schedule written out: lambda(t) + 2 log(base / r)."""
    return cosine_logsnr(t) + 2 * math.log(BASE / resolution)


def gaussian_denoiser(kind: str, logsnr=true_logsnr, gain: float = 1.0):
    """The exact v (or eps) prediction for the Gaussian data above, as a NestedUNet-like callable.

    logsnr(t, resolution) is the schedule the denoiser believes in; gain != 1 scales its posterior
    mean's slope (a deliberately wrong denoiser).
    """

    def model(zs, t, tokens, mask):
        preds = []
        for z, s in zip(zs, LEVEL_STDS):
            alpha, sigma = (c.reshape(-1, 1, 1, 1) for c in alpha_sigma(logsnr(t, z.shape[-1])))
            x0 = MU + gain * alpha * s ** 2 / (alpha ** 2 * s ** 2 + sigma ** 2) * (z - alpha * MU)
            eps = (z - alpha * x0) / sigma
            preds.append(alpha * eps - sigma * x0 if kind == "v" else eps)
        return preds

    return model


def gaussian_samples(model, kind: str, sampler: str, seed: int = 0) -> list[torch.Tensor]:
    config = DiffusionConfig(prediction=kind, base_resolution=BASE)
    return sample(model, RESOLUTIONS, config, batch_size=BATCH, num_steps=NUM_STEPS[sampler], sampler=sampler,
                  clip_sample=False, generator=torch.Generator().manual_seed(seed))


def _alpha_sigma(logsnr: float) -> tuple[float, float]:
    return math.sqrt(1 / (1 + math.exp(-logsnr))), math.sqrt(1 / (1 + math.exp(logsnr)))


def denoised_std(s: float, resolution: int, num_steps: int) -> float:
    """Std of E[x0 | z_t] at t = 1 / num_steps for N(MU, s^2) pixels: what an exact sampler returns.

    z_t = alpha x0 + sigma eps has variance alpha^2 s^2 + sigma^2, and the posterior mean is
    MU + gain (z_t - alpha MU) with gain = alpha s^2 / (alpha^2 s^2 + sigma^2).
    """
    alpha, sigma = _alpha_sigma(true_logsnr(torch.tensor(1 / num_steps, dtype=torch.float64), resolution).item())
    return s * math.sqrt(alpha ** 2 * s ** 2 / (alpha ** 2 * s ** 2 + sigma ** 2))


def moment_errors(samples: list[torch.Tensor], sampler: str) -> list[float]:
    """Per level, the larger of |mean - MU| and |std - S_k| in units of its tolerance (< 1 passes).

    The output pixels are independent draws from one Gaussian (each step maps every pixel by the
    same affine function plus independent noise), so over n pixels the sample mean has standard
    error S / sqrt(n) and the sample std S / sqrt(2 n). We allow 5 standard errors (a correct
    sampler fails with probability 6e-7 per check), plus the known discretisation bias of the std.
    """
    errors = []
    for x, s, resolution in zip(samples, LEVEL_STDS, RESOLUTIONS):
        n = x.numel()
        mean_tol = 5 * s / math.sqrt(n)
        std_tol = 5 * s / math.sqrt(2 * n) + STD_BIAS[sampler] * s
        std_error = x.std().item() - denoised_std(s, resolution, NUM_STEPS[sampler])
        errors.append(max(abs(x.mean().item() - MU) / mean_tol, abs(std_error) / std_tol))
    return errors


def exact_output_law(sampler: str, s: float, resolution: int, num_steps: int) -> tuple[float, float]:
    """Mean and std of what the N-step sampler returns for N(MU, s^2) pixels, without sampling.

    With the exact denoiser every step is affine in z (and, for DPM-Solver++(2M), in the previous
    x0 estimate) plus independent Gaussian noise, so the law of z stays Gaussian and its (mean,
    variance) follow a scalar recursion, here in float64.
    """
    times = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    mean, var = 0.0, 1.0  # z_1 ~ N(0, 1)
    previous = None  # DPM-Solver++(2M): (log-SNR, mean, std) of the last x0 estimate
    for i, (t, u) in enumerate(zip(times[:-1], times[1:])):
        logsnr_t, logsnr_s = true_logsnr(t, resolution).item(), true_logsnr(u, resolution).item()
        (a_t, s_t), (a_s, s_s) = _alpha_sigma(logsnr_t), _alpha_sigma(logsnr_s)
        gain = a_t * s ** 2 / (a_t ** 2 * s ** 2 + s_t ** 2)  # x0_hat = gain z + offset
        offset = MU - gain * a_t * MU
        x0_mean, x0_var = gain * mean + offset, gain ** 2 * var
        if sampler == "dpmpp":
            # Deterministic: z and every x0 estimate are increasing affine functions of z_1, so their
            # stds combine like their slopes. D = (1 + k) x0_hat - k x0_prev, k = 1 / (2 r).
            h = (logsnr_s - logsnr_t) / 2
            k = h / (logsnr_t - previous[0]) if previous is not None and i < num_steps - 1 else 0.0
            d_mean = (1 + k) * x0_mean - k * (previous[1] if k else 0.0)
            d_std = (1 + k) * math.sqrt(x0_var) - k * (previous[2] if k else 0.0)
            c = -a_s * math.expm1(-h)
            mean, var = s_s / s_t * mean + c * d_mean, (s_s / s_t * math.sqrt(var) + c * d_std) ** 2
            previous = (logsnr_t, x0_mean, math.sqrt(x0_var))
            continue
        if sampler == "ddim":  # z_s = a_s x0_hat + s_s (z - a_t x0_hat) / s_t
            slope, shift = a_s * gain + s_s / s_t * (1 - a_t * gain), (a_s - s_s * a_t / s_t) * offset
            noise_var = 0.0
        else:  # the mean of q(z_s | z_t, x0_hat) plus its noise (VDM Eq. 33)
            a_ts = a_t / a_s
            c_z, c_x = a_ts * s_s ** 2 / s_t ** 2, a_s * (s_t ** 2 - a_ts ** 2 * s_s ** 2) / s_t ** 2
            slope, shift = c_z + c_x * gain, c_x * offset
            noise_var = s_s ** 2 * -math.expm1(logsnr_t - logsnr_s)
        mean, var = slope * mean + shift, slope ** 2 * var + noise_var
    return x0_mean, math.sqrt(x0_var)  # the sampler returns its last x0 estimate


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp"])
def test_the_std_allowance_covers_the_discretisation_bias(sampler):
    for resolution, s in zip(RESOLUTIONS, LEVEL_STDS):
        mean, std = exact_output_law(sampler, s, resolution, NUM_STEPS[sampler])
        assert abs(mean - MU) < 1e-3 * s
        assert 0 < denoised_std(s, resolution, NUM_STEPS[sampler]) - std < STD_BIAS[sampler] * s


def test_dpmpp_at_20_steps_is_four_times_nearer_the_exact_sampler_than_ddim():
    # Second order against first: the std bias of DPM-Solver++(2M) at 20 steps is 1.0% of S_k,
    # DDIM's 6.2%, so a DPM-Solver++ that fell back to first order would fail the check above.
    for resolution, s in zip(RESOLUTIONS, LEVEL_STDS):
        exact = denoised_std(s, resolution, 20)
        dpmpp, ddim = (exact - exact_output_law(sampler, s, resolution, 20)[1] for sampler in ("dpmpp", "ddim"))
        assert 0 < 4 * dpmpp < ddim and ddim > STD_BIAS["dpmpp"] * s


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp"])
@pytest.mark.parametrize("kind", ["v", "eps"])
def test_sampling_with_the_exact_denoiser_recovers_gaussian_data(kind, sampler):
    samples = gaussian_samples(gaussian_denoiser(kind), kind, sampler)
    assert [x.shape for x in samples] == [(BATCH, 3, r, r) for r in RESOLUTIONS]
    assert max(moment_errors(samples, sampler)) < 1


WRONG_DENOISERS = {
    "shift forgotten": dict(logsnr=lambda t, r: cosine_logsnr(t)),
    "shift sign flipped": dict(logsnr=lambda t, r: cosine_logsnr(t) - 2 * math.log(BASE / r)),
    "posterior mean 5% too steep": dict(gain=1.05),
}


@pytest.mark.parametrize("mistake", list(WRONG_DENOISERS))
def test_a_wrong_denoiser_fails_the_gaussian_check(mistake):
    # The check above has teeth: each of these plausible mistakes moves the samples well outside it
    # (measured: 4 to 12 tolerances away on the 8x8 level).
    samples = gaussian_samples(gaussian_denoiser("v", **WRONG_DENOISERS[mistake]), "v", "ddim")
    assert max(moment_errors(samples, "ddim")) > 2


def test_ddim_with_eta_one_is_the_ddpm_posterior_step():
    # Song et al. 2021, Eq. 12 with sigma = the posterior std gives back q(z_s | z_t, x0).
    g = torch.Generator().manual_seed(0)
    z, x0, noise = (torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    logsnr_t = torch.tensor([-3.0, 0.0, 4.0], dtype=torch.float64)
    logsnr_s = logsnr_t + torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    alpha_t, sigma_t = (c.reshape(-1, 1, 1, 1) for c in alpha_sigma(logsnr_t))
    eps = (z - alpha_t * x0) / sigma_t
    torch.testing.assert_close(ddim_step(z, x0, eps, logsnr_t, logsnr_s, noise, eta=1.0),
                               ddpm_step(z, x0, logsnr_t, logsnr_s, noise))


def test_deterministic_ddim_step_keeps_x0_and_eps():
    # With eta = 0, z_s = alpha_s x0 + sigma_s eps: the same clean image and noise, one step cleaner.
    g = torch.Generator().manual_seed(0)
    x0, eps, noise = (torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    logsnr_t = torch.tensor([-2.0, 1.0], dtype=torch.float64)
    logsnr_s = torch.tensor([0.0, 3.0], dtype=torch.float64)
    z_t = add_noise(x0, eps, logsnr_t)
    torch.testing.assert_close(ddim_step(z_t, x0, eps, logsnr_t, logsnr_s, noise), add_noise(x0, eps, logsnr_s))


def test_a_first_order_dpmpp_step_is_the_deterministic_ddim_step():
    # DPM-Solver++ without a previous estimate: (sigma_s / sigma_t) z + alpha_s (1 - e^-h) x0 is
    # DDIM's alpha_s x0 + sigma_s eps with eps = (z - alpha_t x0) / sigma_t: first-order DPM-Solver++ is DDIM.
    g = torch.Generator().manual_seed(0)
    z, x0 = (torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    logsnr_t = torch.tensor([-12.0, 0.0, 4.0], dtype=torch.float64)
    logsnr_s = logsnr_t + torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    alpha_t, sigma_t = (c.reshape(-1, 1, 1, 1) for c in alpha_sigma(logsnr_t))
    eps = (z - alpha_t * x0) / sigma_t
    torch.testing.assert_close(dpmpp_2m_step(z, x0, logsnr_t, logsnr_s),
                               ddim_step(z, x0, eps, logsnr_t, logsnr_s, torch.zeros_like(z)))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2's copy keyword, inside diffusers
@pytest.mark.parametrize("kind, prediction_type", [("v", "v_prediction"), ("eps", "epsilon")])
def test_dpmpp_follows_diffusers_dpm_solver_multistep_on_every_levels_schedule(kind, prediction_type):
    # diffusers' DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2), one per
    # level, given that level's discrete schedule as its sigmas (diffusers' sigma is our sigma / alpha
    # = exp(-logsnr / 2); it ends at 0, where its last, first-order step returns the x0 estimate),
    # fed the same model outputs: the same z after every step and the same images.
    from diffusers import DPMSolverMultistepScheduler  # the dev extra

    num_steps, batch = 12, 2
    config, model = DiffusionConfig(prediction=kind, base_resolution=BASE), gaussian_denoiser(kind, gain=0.8)
    images, trajectory = sample(model, RESOLUTIONS, config, batch_size=batch, num_steps=num_steps, sampler="dpmpp",
                                clip_sample=False, generator=torch.Generator().manual_seed(0), return_trajectory=True)
    g = torch.Generator().manual_seed(0)  # sample() draws the starting noise first, level by level
    zs = [torch.randn((batch, 3, r, r), generator=g) for r in RESOLUTIONS]
    times = torch.linspace(1.0, 0.0, num_steps + 1)
    schedulers = []
    for r in RESOLUTIONS:
        scheduler = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                                prediction_type=prediction_type)
        scheduler.set_timesteps(num_steps)
        scheduler.sigmas = torch.cat([torch.exp(-config.logsnr(times[:-1], r) / 2), torch.zeros(1)])
        schedulers.append(scheduler)
    for i in range(num_steps):
        preds = model(zs, times[i].expand(batch), None, None)
        zs = [sch.step(pred, sch.timesteps[i], z).prev_sample for sch, pred, z in zip(schedulers, preds, zs)]
        if i < num_steps - 1:  # our last step goes to logsnr_max instead of sigma = 0
            for ours, theirs in zip(trajectory[i]["z"], zs):
                torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    for ours, theirs in zip(images, zs):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


# --- The multi-resolution loss ---------------------------------------------------------------

def test_image_pyramid_average_pools():
    x0 = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    levels = image_pyramid(x0, 3)
    assert [x.shape[-1] for x in levels] == [8, 4, 2]
    assert levels[0] is x0
    torch.testing.assert_close(levels[1][:, :, 0, 0], x0[:, :, :2, :2].mean((2, 3)))
    torch.testing.assert_close(levels[2], F.avg_pool2d(x0, 4))


def oracle(x0: torch.Tensor, config: DiffusionConfig, num_levels: int):
    """A model that knows the clean pyramid: from z_t it recovers eps, hence the exact target."""
    xs = image_pyramid(x0, num_levels)

    def model(zs, t, tokens, mask):
        preds = []
        for z, x in zip(zs, xs):
            logsnr = cosine_logsnr(t) + 2 * math.log(config.base_resolution / x.shape[-1])
            alpha, sigma = (c.reshape(-1, 1, 1, 1) for c in alpha_sigma(logsnr))
            eps = (z - alpha * x) / sigma
            preds.append(alpha * eps - sigma * x if config.prediction == "v" else eps)
        return preds

    return model


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_multires_loss_is_zero_for_a_model_that_knows_x0(prediction):
    config = DiffusionConfig(prediction=prediction, base_resolution=16)
    x0 = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    total, losses = multires_loss(oracle(x0, config, 3), x0, None, None, config, 3,
                                  generator=torch.Generator().manual_seed(1))
    assert len(losses) == 3
    assert total.item() < 1e-12


def test_multires_loss_of_a_zero_eps_prediction_is_one_per_level():
    # Predicting eps = 0 costs E[eps^2] = 1 at every level, whatever t and x0.
    x0 = torch.rand(64, 3, 16, 16) * 2 - 1
    zero = lambda zs, t, tokens, mask: [torch.zeros_like(z) for z in zs]  # noqa: E731
    _, losses = multires_loss(zero, x0, None, None, DiffusionConfig(prediction="eps"), 2,
                              generator=torch.Generator().manual_seed(0))
    for loss, n in zip(losses, [64 * 3 * 16 * 16, 64 * 3 * 8 * 8]):
        # The mean of n squared normals has standard error sqrt(2 / n); allow 5 of them.
        assert abs(loss.item() - 1) < 5 * math.sqrt(2 / n)


def test_multires_loss_weights_the_levels():
    config = DiffusionConfig(prediction="eps", loss_weights=(2.0, 0.5))
    x0 = torch.zeros(4, 3, 8, 8)
    zero = lambda zs, t, tokens, mask: [torch.zeros_like(z) for z in zs]  # noqa: E731
    total, losses = multires_loss(zero, x0, None, None, config, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(total, 2.0 * losses[0] + 0.5 * losses[1])
    with pytest.raises(ValueError, match="loss_weights"):
        multires_loss(zero, x0, None, None, config, 3)


def test_multires_loss_is_reproducible_with_a_generator():
    config = DiffusionConfig()
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    zero = lambda zs, t, tokens, mask: [torch.zeros_like(z) for z in zs]  # noqa: E731
    first = multires_loss(zero, x0, None, None, config, 2, generator=torch.Generator().manual_seed(3))[0]
    again = multires_loss(zero, x0, None, None, config, 2, generator=torch.Generator().manual_seed(3))[0]
    other = multires_loss(zero, x0, None, None, config, 2, generator=torch.Generator().manual_seed(4))[0]
    assert first == again and first != other


def test_time_power_skews_training_times_towards_noise_and_one_leaves_them_alone():
    seen = {}

    def record(power):
        def model(zs, t, tokens, mask):
            seen[power] = t.clone()
            return [torch.zeros_like(z) for z in zs]
        return model

    x0 = torch.zeros(20_000, 1, 2, 2)
    for power in (1.0, 3.0):
        multires_loss(record(power), x0, None, None, DiffusionConfig(time_power=power), 1,
                      generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen[1.0], torch.rand(20_000, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(seen[3.0], 1 - (1 - seen[1.0]) ** 3)
    # P(t > 0.9) = P(1 - u < 0.1 ** (1 / 3)) = 0.464 with power 3, against 0.1 uniform.
    assert abs((seen[3.0] > 0.9).float().mean().item() - 0.1 ** (1 / 3)) < 0.02
    with pytest.raises(ValueError, match="time_power"):
        DiffusionConfig(time_power=0)


def test_time_range_maps_the_training_times_and_a_point_fixes_them():
    seen = []

    def model(zs, t, tokens, mask):
        seen.append(t.clone())
        return [torch.zeros_like(z) for z in zs]

    x0 = torch.zeros(1000, 1, 2, 2)
    for time_range in ((0.0, 1.0), (0.5, 0.9), (0.97, 0.97)):
        multires_loss(model, x0, None, None, DiffusionConfig(time_range=time_range), 1,
                      generator=torch.Generator().manual_seed(0))
    uniform, band, point = seen
    torch.testing.assert_close(band, 0.5 + 0.4 * uniform)
    assert torch.equal(point, torch.full_like(point, 0.97))
    for bad in ((0.9, 0.5), (-0.1, 1.0), (0.5,)):
        with pytest.raises(ValueError, match="time_range"):
            DiffusionConfig(time_range=bad)


def test_drop_captions_replaces_captions_with_the_empty_prompt():
    captions = [f"caption {i}" for i in range(2000)]
    assert drop_captions(captions, 0.0) == captions
    assert drop_captions(captions, 1.0) == [""] * 2000
    dropped = drop_captions(captions, 0.1, generator=torch.Generator().manual_seed(0))
    kept = [c for c in dropped if c]
    assert kept == [c for c in captions if c in set(kept)]  # survivors keep their text and order
    # Binomial(2000, 0.1): mean 200, std 13.4; 5 standard errors is 67.
    assert abs(len(captions) - len(kept) - 200) < 67


# --- Sampling with a network -----------------------------------------------------------------

TEXT_DIM = 16


def tiny_model(seed: int = 0) -> NestedUNet:
    config = NestedUNetConfig(image_size=16, num_levels=2, shell_channels=8,
                              inner=UNetConfig(channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                               attention_resolutions=(4,), head_dim=4, text_dim=TEXT_DIM))
    model = NestedUNet(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move the zero-initialised layers so that the model does something
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def prompts(batch: int, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, TEXT_DIM, generator=g), torch.ones(batch, length, dtype=torch.bool)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp"])
def test_same_seed_gives_the_same_samples(sampler):
    model, (tokens, mask) = tiny_model(), prompts(2, 5)

    def draw(seed):
        return sample(model, [16, 8], DiffusionConfig(), tokens, mask, num_steps=4, sampler=sampler,
                      generator=torch.Generator().manual_seed(seed))

    first, again, other = draw(0), draw(0), draw(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))


def test_clipped_samples_are_images_in_range():
    model, (tokens, mask) = tiny_model(), prompts(2, 5)
    images, trajectory = sample(model, [16, 8], DiffusionConfig(), tokens, mask, num_steps=3,
                                generator=torch.Generator().manual_seed(0), return_trajectory=True)
    assert [x.shape for x in images] == [(2, 3, 16, 16), (2, 3, 8, 8)]
    assert all(x.abs().max() <= 1 for x in images)
    assert [step["t"] for step in trajectory] == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert all(torch.equal(a, b) for a, b in zip(trajectory[-1]["x0"], images))


def test_guidance_without_the_empty_prompt_is_refused():
    model, (tokens, mask) = tiny_model(), prompts(2, 5)
    with pytest.raises(ValueError, match="null_tokens"):
        sample(model, [16, 8], DiffusionConfig(), tokens, mask, num_steps=2, guidance_scale=3.0)


def test_guidance_extrapolates_from_the_unconditional_prediction():
    # A model whose v prediction is the first feature of the first token: 1 for the prompt, -0.5 for
    # the empty prompt. Guided: -0.5 + w (1 - (-0.5)). One DDIM step from t = 1 lands on
    # x0 = alpha_1 z - sigma_1 v, with the level's own alpha_1, sigma_1.
    def model(zs, t, tokens, mask):
        return [tokens[:, 0, 0].reshape(-1, 1, 1, 1).expand_as(z) for z in zs]

    tokens, mask = torch.ones(2, 5, TEXT_DIM), torch.ones(2, 5, dtype=torch.bool)
    null_tokens, null_mask = torch.full((1, 3, TEXT_DIM), -0.5), torch.ones(1, 3, dtype=torch.bool)
    config, w = DiffusionConfig(base_resolution=16), 3.0
    g = torch.Generator().manual_seed(0)
    images = sample(model, [16, 8], config, tokens, mask, null_tokens=null_tokens, null_mask=null_mask,
                    num_steps=1, guidance_scale=w, clip_sample=False, generator=g)
    g = torch.Generator().manual_seed(0)  # sample() draws the starting noise first, level by level
    noise = [torch.randn((2, 3, r, r), generator=g) for r in [16, 8]]
    for x, z, r in zip(images, noise, [16, 8]):
        alpha, sigma = alpha_sigma(config.logsnr(torch.tensor(1.0), r))
        torch.testing.assert_close(x, alpha * z - sigma * (-0.5 + w * 1.5))


def test_guidance_runs_only_inside_its_interval():
    # A model that records the batch and time of each call and predicts the first feature of the
    # first token (1 for the prompt, -0.5 for the empty one). Four steps at t = 1, 3/4, 1/2, 1/4:
    # the interval [0.5, 1] guides the first three in one batch of 2B, the last runs the prompts alone.
    calls = []

    def model(zs, t, tokens, mask):
        calls.append((zs[0].shape[0], float(t[0])))
        return [tokens[:, 0, 0].reshape(-1, 1, 1, 1).expand_as(z) for z in zs]

    tokens, mask = torch.ones(2, 5, TEXT_DIM), torch.ones(2, 5, dtype=torch.bool)
    null_tokens, null_mask = torch.full((1, 3, TEXT_DIM), -0.5), torch.ones(1, 3, dtype=torch.bool)
    options = dict(null_tokens=null_tokens, null_mask=null_mask, num_steps=4, guidance_scale=3.0, clip_sample=False)
    _, trajectory = sample(model, [16, 8], DiffusionConfig(), tokens, mask, guidance_interval=(0.5, 1.0),
                           generator=torch.Generator().manual_seed(0), return_trajectory=True, **options)
    assert calls == [(4, 1.0), (4, 0.75), (4, 0.5), (2, 0.25)]
    assert [step["t"] for step in trajectory] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    calls.clear()  # the end points count to rounding: t = 0.4 of a 25-step grid is 0.39999998 in float32
    sample(model, [16, 8], DiffusionConfig(), tokens, mask, guidance_interval=(0.4, 1.0), **options | {"num_steps": 25})
    assert [batch for batch, _ in calls] == [4] * 16 + [2] * 9


@pytest.mark.parametrize("interval, same_as", [((0.0, 1.0), "every step guided"), ((0.9, 0.95), "guidance 1")])
def test_a_guidance_interval_over_all_steps_or_none_is_guidance_everywhere_or_nowhere(interval, same_as):
    """(0, 1) is classifier-free guidance at every step, bit for bit; an interval between the steps'
    times (1, 2/3, 1/3) guides none: the samples of guidance_scale 1."""
    model, (tokens, mask) = tiny_model(), prompts(2, 5)
    null_tokens, null_mask = torch.zeros(1, 2, TEXT_DIM), torch.ones(1, 2, dtype=torch.bool)

    def draw(scale, window):
        return sample(model, [16, 8], DiffusionConfig(), tokens, mask, null_tokens=null_tokens, null_mask=null_mask,
                      num_steps=3, guidance_scale=scale, guidance_interval=window,
                      generator=torch.Generator().manual_seed(0))

    expected = draw(3.0, (0.0, 1.0)) if same_as == "every step guided" else draw(1.0, (0.0, 1.0))
    got = draw(3.0, interval)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert not all(torch.equal(a, b) for a, b in zip(got, draw(3.0, (0.5, 1.0))))


@pytest.mark.parametrize("interval", [(0.5, 0.4), (-0.1, 1.0), (0.0, 1.5), (float("nan"), 1.0), (0.4,), "0.4 1"])
def test_a_guidance_interval_outside_zero_one_is_refused_with_the_fix(interval):
    model, (tokens, mask) = tiny_model(), prompts(2, 5)
    with pytest.raises(ConfigError, match=r"guidance_interval .* 0 <= low <= high <= 1: give e.g. 0.4 1"):
        sample(model, [16, 8], DiffusionConfig(), tokens, mask, null_tokens=torch.zeros(1, 2, TEXT_DIM),
               null_mask=torch.ones(1, 2, dtype=torch.bool), num_steps=2, guidance_scale=3.0,
               guidance_interval=interval)
