"""Metrics: the shipped Shapes judge, prompt accuracy, Wilson intervals, Fréchet distances, Inception FID."""

import json
import math
import sys

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from mdm_lite.data import ShapesDataset
from mdm_lite.judge import ATTRIBUTES, JUDGE_PATH, Judge, load_judge, perturb, save_judge
from mdm_lite.metrics import (
    FIDUnavailable,
    edge_ratio,
    evaluate_samples,
    frechet_distance,
    gaussian_frechet_distance,
    inception_fid,
    inception_weights,
    prompt_accuracy,
    wilson_interval,
)

N = 600  # images per set: enough for binomial bounds of a few points and a stable 96-d covariance


def _renders(n: int, seed: int, split: str = "train") -> tuple[torch.Tensor, list[dict]]:
    data = ShapesDataset(length=n, seed=seed, split=split)
    items = [data[i] for i in range(n)]
    return torch.stack([it["image"] for it in items]), [it["attributes"] for it in items]


@pytest.fixture(scope="module")
def judge():
    torch.set_num_threads(1)
    return load_judge()


@pytest.fixture(scope="module")
def real():
    """Fresh renders (a seed the judge never trained with), half with held-out shape-colour pairs."""
    a, attrs_a = _renders(N // 2, seed=101, split="train")
    b, attrs_b = _renders(N // 2, seed=101, split="heldout")
    return torch.cat([a, b]), attrs_a + attrs_b


def test_the_shipped_judge_is_small_safetensors_with_a_training_record():
    assert JUDGE_PATH.stat().st_size < 2_000_000
    assert JUDGE_PATH.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    record = json.loads(JUDGE_PATH.with_suffix(".json").read_text())
    assert {"command", "train_seconds", "eval"} <= set(record)


def test_the_judge_reads_every_attribute_of_fresh_renders(judge, real):
    images, attributes = real
    scores = prompt_accuracy(images, attributes, judge)
    assert scores["n"] == N
    for name in ATTRIBUTES:
        assert scores["per_attribute"][name] >= 0.99, name
    assert scores["accuracy"] >= 0.99


def test_the_judge_reads_slightly_imperfect_renders(judge, real):
    """Shifted, rescaled, rotated, blurred, tinted and noisy renders (fresh draws) are still read right."""
    images, attributes = real
    noisy = perturb(images, torch.Generator().manual_seed(7))
    assert prompt_accuracy(noisy, attributes, judge)["accuracy"] >= 0.99


def test_noise_scores_at_chance(judge, real):
    """On pure noise the judge's answers carry no information about the prompt, so attribute
    `name` is right with probability sum_c q(c) p(c), q the judge's answer frequencies and p the
    prompts' class frequencies. With uniform prompts this is 1/K whatever q is: 1/6 shape, 1/2 size,
    1/9 position, 1/3 background. Colour is not uniform here (held-out scenes use only 6 of the 8
    colours, the train split favours green and pink), so its chance depends on what the judge
    answers: between 1/16 and 0.146 on this mix. All five at once: about 1/2592.
    Bounds: 4.5 binomial standard deviations."""
    _, attributes = real
    noise = torch.rand(N, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scores = prompt_accuracy(noise, attributes, judge)
    predicted = scores["predicted"]
    for name, classes in ATTRIBUTES.items():  # scored over the prompts that state the attribute
        n = scores["per_attribute_n"][name]
        q = np.array([predicted[name].count(c) for c in classes]) / N
        p = np.array([[a[name] for a in attributes if name in a["stated"]].count(c) for c in classes]) / n
        chance = float(q @ p)
        if name != "colour":
            assert chance == pytest.approx(1 / len(classes), abs=0.05), name  # near-uniform prompts
        assert abs(scores["per_attribute"][name] - chance) < 4.5 * math.sqrt(chance * (1 - chance) / n), name
    assert scores["accuracy"] < 0.02
    low, high = scores["ci95"]
    assert low <= scores["accuracy"] <= high


def test_predict_returns_class_names_per_attribute(judge, real):
    images, attributes = real
    predicted = judge.predict(images[:5])
    assert set(predicted) == set(ATTRIBUTES)
    assert predicted["shape"] == [a["shape"] for a in attributes[:5]]
    assert judge.features(images[:5]).shape == (5, judge.config.feature_dim)


def test_prompt_accuracy_scores_only_the_attributes_a_prompt_states(judge, real):
    images, attributes = real
    scene = {k: v for k, v in attributes[0].items() if k != "stated"}
    other_background = next(b for b in ("black", "white", "gray") if b != scene["background"])
    wrong = {**scene, "background": other_background}
    assert prompt_accuracy(images[:1], [wrong], judge)["accuracy"] == 0.0  # all five stated
    unstated = {**wrong, "stated": ["shape", "colour", "size", "position"]}
    scores = prompt_accuracy(images[:1], [unstated], judge)
    assert scores["accuracy"] == 1.0
    assert scores["per_attribute_n"]["background"] == 0


def test_layout_accuracy_scores_background_colour_and_position_only(judge, real):
    images, attributes = real
    scene = {k: v for k, v in attributes[0].items() if k != "stated"}
    other_shape = next(s for s in ATTRIBUTES["shape"] if s != scene["shape"])
    other_size = next(s for s in ATTRIBUTES["size"] if s != scene["size"])
    scores = prompt_accuracy(images[:1], [{**scene, "shape": other_shape, "size": other_size}], judge)
    assert scores["accuracy"] == 0.0 and scores["layout"] == 1.0
    other_position = next(p for p in ATTRIBUTES["position"] if p != scene["position"])
    assert prompt_accuracy(images[:1], [{**scene, "position": other_position}], judge)["layout"] == 0.0
    unstated = {**scene, "position": other_position, "stated": ["shape", "colour", "size", "background"]}
    assert prompt_accuracy(images[:1], [unstated], judge)["layout"] == 1.0


def test_prompt_accuracy_rejects_two_object_scenes_and_mismatched_lengths(judge, real):
    images, attributes = real
    pair = ShapesDataset(length=40, difficulty="relations")
    two = next(pair[i]["attributes"] for i in range(40) if "objects" in pair[i]["attributes"])
    with pytest.raises(ValueError, match="one-object"):
        prompt_accuracy(images[:1], [two], judge)
    with pytest.raises(ValueError, match="attribute dicts"):
        prompt_accuracy(images[:2], attributes[:1], judge)


def test_wilson_interval_matches_scipy_and_hand_computed_values():
    # By hand: at 0/10, centre = half-width = (z^2 / 20) / (1 + z^2 / 10) = 0.13877.
    np.testing.assert_allclose(wilson_interval(0, 10), (0.0, 0.2775328), atol=1e-7)
    np.testing.assert_allclose(wilson_interval(5, 10), (0.2365931, 0.7634069), atol=1e-7)
    for k, n in [(81, 263), (1, 2592), (599, 600), (10, 10)]:
        expected = scipy.stats.binomtest(k, n).proportion_ci(method="wilson")
        np.testing.assert_allclose(wilson_interval(k, n), (expected.low, expected.high), rtol=1e-12, atol=1e-15)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_gaussian_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.normal(size=4), rng.normal(size=4)
    # Diagonal covariances commute: d^2 = |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    a, b = rng.uniform(0.1, 3, 4), rng.uniform(0.1, 3, 4)
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert gaussian_frechet_distance(mu_a, np.diag(a), mu_b, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # Any covariances: against the general matrix square root of sigma_a sigma_b.
    m, n = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    sa, sb = m @ m.T + 0.1 * np.eye(4), n @ n.T
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(sa + sb - 2 * scipy.linalg.sqrtm(sa @ sb).real)
    assert gaussian_frechet_distance(mu_a, sa, mu_b, sb) == pytest.approx(expected, rel=1e-8)
    # Identical Gaussians, even with a singular covariance: exactly 0, never negative.
    singular = np.outer(mu_a, mu_a)
    assert gaussian_frechet_distance(mu_a, singular, mu_a, singular) == pytest.approx(0, abs=1e-9)


def test_frechet_distance_is_small_between_real_sets_and_large_against_noise(judge, real):
    images, _ = real
    other = torch.cat([_renders(N // 2, seed=202, split=s)[0] for s in ("train", "heldout")])
    noise = torch.rand(images.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    real_vs_real = frechet_distance(images, other, judge)
    real_vs_noise = frechet_distance(images, noise, judge)
    assert real_vs_noise > 50 * real_vs_real


def test_evaluate_samples_gives_one_row(judge, real):
    images, attributes = real
    row = evaluate_samples(images[:200], attributes[:200], real_images=images[200:], judge=judge)
    assert {"n", "prompt_accuracy", "prompt_accuracy_ci95", "judge_fd"} <= set(row)
    assert {f"{name}_accuracy" for name in ATTRIBUTES} <= set(row)


def test_evaluate_pipeline_times_its_images_with_and_without_progress_bars(judge, capsys):
    from mdm_lite.metrics import evaluate_pipeline
    from mdm_lite.pipeline import MDMPipeline

    pipe = MDMPipeline.from_pretrained("shapes", device="cpu")
    for progress in (False, True):
        row = evaluate_pipeline(pipe, num_samples=3, num_inference_steps=2, batch_size=2, judge=judge,
                                progress=progress)
        assert row["n"] == 3 and row["sample_s_per_image"] > 0
        assert ("image" in capsys.readouterr().err) == progress  # tqdm draws on stderr


def test_save_and_load_judge_round_trip(tmp_path, judge, real):
    images, _ = real
    save_judge(judge, tmp_path / "judge.safetensors", {"note": "copy"})
    again = load_judge(tmp_path / "judge.safetensors")
    torch.testing.assert_close(again.features(images[:8]), judge.features(images[:8]))
    assert isinstance(again, Judge) and (tmp_path / "judge.json").exists()


def test_inception_fid_names_the_install_when_torch_fidelity_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(FIDUnavailable, match=r"pip install 'mdm-lite\[fid\]'"):
        inception_fid(torch.zeros(2, 3, 64, 64), torch.zeros(2, 3, 64, 64))


def test_inception_weights_are_never_downloaded_unasked(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FIDUnavailable, match=r"inception_weights\(download=True\)"):
        inception_weights()
    assert not any(tmp_path.iterdir())


def test_edge_ratio_is_low_on_renders_and_finds_a_noisy_border_row(real):
    images, _ = real
    assert edge_ratio(images)["max"] < 1.0  # flat backgrounds at every border
    speckled = images.clone()
    speckled[:, :, -1] += 0.3 * torch.randn(speckled[:, :, -1].shape, generator=torch.Generator().manual_seed(0))
    ratios = edge_ratio(speckled)
    assert ratios["bottom"] > 3.0 and ratios["max"] == ratios["bottom"]
    assert max(ratios["top"], ratios["left"], ratios["right"]) < 1.0
