"""Colored digits follow IRM's Colored MNIST recipe: the rates it promises are the rates drawn."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("sklearn")

from gradand.experiments.colored_digits import (
    ColoredDigits,
    ColoredDigitsSetting,
    color_flip_probabilities,
    make_colored_digits,
)

N_DIGITS = 1797


def colors(x: np.ndarray) -> np.ndarray:
    """The colour of each flattened input: the channel that holds the image."""
    channels = x.reshape(*x.shape[:-1], 2, 64)
    on = channels.any(axis=-1)
    assert np.all(on.sum(axis=-1) == 1), "a coloured image sits in exactly one channel"
    return on[..., 1].astype(np.float32)


def digits_below_5(x: np.ndarray) -> np.ndarray:
    """The clean label of each flattened input, found by looking its image up in the digits."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    lookup = {row.tobytes(): d for row, d in zip((bunch.data / 16.0).astype(np.float32), bunch.target)}
    images = x.reshape(-1, 2, 64).sum(axis=1)
    return np.array([lookup[row.tobytes()] < 5 for row in images], dtype=np.float32)


@pytest.fixture(scope="module")
def data() -> ColoredDigits:
    return make_colored_digits(seed=0)


def test_shapes_dtypes_and_pixel_range(data: ColoredDigits) -> None:
    assert data.train_x.shape == (8, 1000, 128) and data.train_x.dtype == np.float32
    assert data.train_y.shape == (8, 1000) and data.train_y.dtype == np.float32
    assert data.test_x.shape == (N_DIGITS - 1000, 128) and data.test_x.dtype == np.float32
    assert data.test_y.shape == (N_DIGITS - 1000,) and data.test_y.dtype == np.float32
    assert set(np.unique(data.train_y).tolist()) == {0.0, 1.0}
    assert data.train_x.min() == 0.0 and data.train_x.max() == 1.0
    np.testing.assert_allclose(data.color_flips, np.linspace(0.05, 0.25, 8))


def test_colour_agrees_with_the_label_one_minus_p_e_of_the_time() -> None:
    # Many environments' worth of draws at two p_e values each, so the rates are tight.
    setting = ColoredDigitsSetting(n_envs=2, n_train=1500, color_noise=(0.05, 0.25))
    agree = np.array([[np.mean(colors(x) == y) for x, y in zip(*setting.make(s)[:2])] for s in range(8)])
    rates = agree.mean(axis=0)
    se = np.sqrt(0.25 * 0.75 / (1500 * 8))
    np.testing.assert_allclose(rates, [0.95, 0.75], atol=4 * se)


def test_each_default_environment_near_its_own_rate(data: ColoredDigits) -> None:
    agree = np.array([np.mean(colors(x) == y) for x, y in zip(data.train_x, data.train_y)])
    se = np.sqrt(0.25 * 0.75 / 1000)
    np.testing.assert_allclose(agree, 1.0 - data.color_flips, atol=4 * se)
    assert np.corrcoef(agree, data.color_flips)[0, 1] < -0.8  # ordered as the p_e are


def test_label_noise_is_a_quarter(data: ColoredDigits) -> None:
    clean = digits_below_5(data.train_x[0])
    noise = np.mean(np.stack([digits_below_5(x) != y for x, y in zip(data.train_x, data.train_y)]))
    assert abs(noise - 0.25) < 4 * np.sqrt(0.25 * 0.75 / data.train_y.size)
    test_noise = np.mean(digits_below_5(data.test_x) != data.test_y)
    assert abs(test_noise - 0.25) < 4 * np.sqrt(0.25 * 0.75 / data.test_y.size)
    assert 0.4 < clean.mean() < 0.6  # digits 0-4 are about half


def test_noise_is_fresh_in_every_environment(data: ColoredDigits) -> None:
    # Same images, reused: each environment's labels are drawn again.
    for a in range(1, 8):
        order = {row.tobytes(): i for i, row in enumerate(data.train_x[0].reshape(-1, 2, 64).sum(axis=1))}
        images = data.train_x[a].reshape(-1, 2, 64).sum(axis=1)
        idx = np.array([order[row.tobytes()] for row in images])
        assert sorted(idx.tolist()) == list(range(1000))  # the same 1000 images
        disagree = np.mean(data.train_y[a] != data.train_y[0][idx])
        assert 0.3 < disagree < 0.45  # independent 25 % noise: 2 · 0.25 · 0.75 = 0.375


def test_test_colour_agrees_a_tenth_of_the_time(data: ColoredDigits) -> None:
    agree = np.mean(colors(data.test_x) == data.test_y)
    assert abs(agree - 0.1) < 4 * np.sqrt(0.09 / data.test_y.size)


def test_train_and_test_images_are_disjoint(data: ColoredDigits) -> None:
    def image_set(x: np.ndarray) -> set[bytes]:
        return {row.tobytes() for row in x.reshape(-1, 2, 64).sum(axis=1)}

    train = set().union(*(image_set(x) for x in data.train_x))
    test = image_set(data.test_x)
    assert not train & test
    # Some digits images are exact duplicates of each other, so compare indices too: the
    # split is by image, and the two counts add up to the whole set.
    assert data.train_x.shape[1] + data.test_x.shape[0] == N_DIGITS


def test_grayscale_has_no_colour_and_the_same_labels() -> None:
    colored = make_colored_digits(n_envs=3, seed=4)
    gray = make_colored_digits(n_envs=3, grayscale=True, seed=4)
    for x in (*gray.train_x, gray.test_x):
        channels = x.reshape(-1, 2, 64)
        np.testing.assert_array_equal(channels[:, 0], channels[:, 1])
    np.testing.assert_array_equal(gray.train_y, colored.train_y)
    np.testing.assert_array_equal(gray.test_y, colored.test_y)
    np.testing.assert_array_equal(
        gray.train_x.reshape(3, -1, 2, 64)[:, :, 0], colored.train_x.reshape(3, -1, 2, 64).sum(axis=2)
    )


def test_reversed_environment_disagrees_and_the_others_are_unchanged() -> None:
    plain = make_colored_digits(n_envs=4, n_train=1500, seed=2)
    rev = make_colored_digits(n_envs=4, n_train=1500, reversed_envs=1, seed=2)
    np.testing.assert_allclose(rev.color_flips, [0.05, 0.05 + 0.2 / 3, 0.05 + 0.4 / 3, 0.75])
    for e in range(3):
        np.testing.assert_array_equal(rev.train_x[e], plain.train_x[e])
    np.testing.assert_array_equal(rev.train_y, plain.train_y)
    agree = np.mean(colors(rev.train_x[3]) == rev.train_y[3])
    assert abs(agree - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 1500)
    np.testing.assert_array_equal(rev.test_x, plain.test_x)


def test_flip_probabilities_spread_and_reverse() -> None:
    np.testing.assert_allclose(color_flip_probabilities(1), [0.15])
    np.testing.assert_allclose(color_flip_probabilities(3, (0.1, 0.3)), [0.1, 0.2, 0.3])
    np.testing.assert_allclose(color_flip_probabilities(3, (0.1, 0.3), reversed_envs=3), [0.9, 0.8, 0.7])


def test_deterministic_per_seed_and_different_across_seeds() -> None:
    setting = ColoredDigitsSetting(n_envs=2, n_train=300)
    a, b, c = setting.make(9), setting.make(9), setting.make(10)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.train_y, c.train_y)
    assert not np.array_equal(a.test_x, c.test_x)  # the split changes with the seed


def test_setting_is_frozen_hashable_and_matches_the_function() -> None:
    setting = ColoredDigitsSetting(n_envs=2, n_train=100, color_noise=[0.1, 0.2])  # type: ignore[arg-type]
    assert setting.color_noise == (0.1, 0.2)
    assert hash(setting) == hash(ColoredDigitsSetting(n_envs=2, n_train=100, color_noise=(0.1, 0.2)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        setting.grayscale = True  # type: ignore[misc]
    direct = make_colored_digits(**dataclasses.asdict(setting), seed=3)
    for x, y in zip(setting.make(3), direct):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_envs": 0}, r"n_envs must be an integer >= 1; got 0"),
        ({"n_envs": 2.5}, r"n_envs must be an integer >= 1; got 2\.5"),
        ({"n_train": 0}, r"n_train must be an integer in \[1, 1796\]; got 0"),
        ({"n_train": 1797}, r"n_train must be an integer in \[1, 1796\]; got 1797"),
        ({"label_noise": 1.5}, r"label_noise must be a probability in \[0, 1\]; got 1\.5"),
        ({"label_noise": float("nan")}, r"label_noise must be a probability in \[0, 1\]; got nan"),
        ({"test_color_noise": -0.1}, r"test_color_noise must be a probability in \[0, 1\]; got -0\.1"),
        (
            {"color_noise": (0.3, 0.1)},
            r"color_noise must be \(low, high\) with low <= high; got \(0\.3, 0\.1\)",
        ),
        ({"color_noise": 0.1}, r"color_noise must be a pair \(low, high\) of probabilities; got 0\.1"),
        ({"color_noise": "ab"}, r"color_noise must be a pair \(low, high\) of probabilities; got 'ab'"),
        ({"color_noise": (0.1, 2)}, r"color_noise\[1\] must be a probability in \[0, 1\]; got 2"),
        ({"grayscale": "yes"}, r"grayscale must be True or False; got 'yes'"),
        ({"reversed_envs": -1}, r"reversed_envs must be an integer in \[0, 8\]; got -1"),
        ({"reversed_envs": 9}, r"reversed_envs must be an integer in \[0, 8\]; got 9"),
        ({"seed": -3}, r"seed must be an integer >= 0; got -3"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_colored_digits(**kwargs)
    if "seed" not in kwargs:
        with pytest.raises(ValueError, match=match):
            ColoredDigitsSetting(**kwargs)


# --------------------------------------------------------------------------- the experiment


def test_the_controls_change_only_the_data_and_the_penalties_only_the_objective():
    from gradand.experiments.colored_digits import METHODS, TrainSetting

    methods = TrainSetting().methods()
    assert tuple(methods) == METHODS
    assert methods["grayscale"] == {**methods["mean"], "data": {"grayscale": True}}
    assert methods["reversed_mean"] == {**methods["mean"], "data": {"reversed_envs": 1}}
    assert methods["reversed_and_mask"] == {**methods["and_mask"], "data": {"reversed_envs": 1}}
    assert methods["irm"]["combiner"] == methods["vrex"]["combiner"] == ("mean", {})
    assert [methods[m]["penalty"][0] for m in ("irm", "vrex")] == ["irm", "vrex"]


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("epochs", 0, "epochs must be an integer >= 1; got 0"),
        ("threshold", 1.5, r"threshold must be a probability in \[0, 1\]; got 1.5"),
        ("irm_weight", float("inf"), "irm_weight must be a finite number >= 0; got inf"),
        ("hidden_units", 2.0, "hidden_units must be an integer >= 1; got 2.0"),
    ],
)
def test_bad_training_settings_name_the_field(field, value, match):
    from gradand.experiments.colored_digits import TrainSetting

    with pytest.raises(ValueError, match=match):
        TrainSetting(**{field: value})


def _per_method(**tests):
    from gradand.experiments._distribution import distribution

    return {
        m: {"test_acc": list(v), "test": distribution(v, threshold=0.5).to_json()} for m, v in tests.items()
    }


def test_a_claim_fails_when_the_numbers_say_so():
    from gradand.experiments.colored_digits import TrainSetting, _checks

    # an AND-mask clearly better than averaging on every seed: "no better" must not pass
    per = _per_method(
        mean=[0.1, 0.2, 0.15, 0.12], and_mask=[0.5, 0.6, 0.55, 0.52], irm=[0.1, 0.21, 0.14, 0.13]
    )
    checks = {c.claim.split(" ")[0]: c for c in _checks(per, TrainSetting())}
    assert checks["averaging"].passed
    assert not checks["AND-mask"].passed and "+0.400" in checks["AND-mask"].claim
    assert not checks["IRMv1"].passed  # no better than averaging here: the interval includes 0
    # and the other way round
    per = _per_method(
        mean=[0.6, 0.2, 0.15, 0.12], and_mask=[0.1, 0.2, 0.15, 0.12], irm=[0.7, 0.3, 0.25, 0.22]
    )
    checks = {c.claim.split(" ")[0]: c for c in _checks(per, TrainSetting())}
    assert not checks["averaging"].passed  # the upper end of the interval is above 0.5
    assert checks["AND-mask"].passed and checks["IRMv1"].passed


def test_run_pairs_methods_by_seed_and_reports_distributions():
    pytest.importorskip("torch")
    from gradand.experiments.colored_digits import ColoredDigitsSetting, TrainSetting, run

    report = run(
        ColoredDigitsSetting(n_envs=2, n_train=100),
        TrainSetting(hidden_units=4, epochs=3, batch_size=50, eval_every=1),
        methods=("mean", "vrex", "reversed_mean"),
        seeds=(3, 5),
        show_progress=False,
        threads=1,
    )
    m = report.results["methods"]
    assert m["vrex"]["label"] == "V-REx(λ=10000)" and m["reversed_mean"]["label"] == "mean, 1 reversed"
    assert m["mean"]["curves"][0]["epoch"] == [1, 2, 3]
    assert report.config["seeds"] == [3, 5] and report.config["anneal_steps"] == 1
    assert [c.claim.split(" ")[0] for c in report.checks] == ["averaging", "V-REx"]
    assert "test ≥ 0.5" in report.table
