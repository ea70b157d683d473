"""The reference preset's data is the reference experiment's data.

The construction checked here is that of the paper's public code
(gibipara92/learning-explanations-hard-to-vary at 55c49f5,
``and_mask/datasets/synthetic/synthetic_data_gen.py`` called by ``and_mask/run_synthetic.py``).
The golden values below were produced by the reference's own generator (run outside this
repository, default arguments, ``--seed 0``) and are equal, bit for bit, to this module's.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gradand.experiments.reference_spirals import (
    REFERENCE_INIT_SEED,
    REFERENCE_TEST_SEED,
    ReferenceSpiralsSetting,
    make_reference_spirals,
    train_reference_loop,
)
from gradand.experiments.spirals import SpiralsData


@pytest.fixture(scope="module")
def default() -> SpiralsData:
    return make_reference_spirals(seed=0)


def test_defaults_are_run_synthetic_defaults(default: SpiralsData) -> None:
    assert default.train_x.shape == (16, 1024, 10)
    assert default.train_y.shape == (16, 1024)
    assert default.test_x.shape == (2000, 10)
    assert default.test_y.shape == (2000,)
    assert default.shortcuts.shape == (16, 8)
    assert all(a.dtype == np.float32 for a in default)
    assert REFERENCE_INIT_SEED == 0
    assert REFERENCE_TEST_SEED == 2**32 - 1


def test_golden_values_of_the_reference_generator_seed_0(default: SpiralsData) -> None:
    counts = [527, 498, 520, 526, 489, 498, 493, 522, 535, 529, 508, 518, 503, 481, 523, 499]
    assert default.train_y.sum(axis=1).astype(int).tolist() == counts
    assert int(default.test_y.sum()) == 1010
    np.testing.assert_array_equal(
        default.train_x[0, 0],
        np.array(
            [-0.19058219, -1.7162158, 1.7640524, 0.4001572, 0.978738, 2.2408931, 1.867558,
             -0.9772779, 0.95008844, -0.1513572],
            dtype=np.float32,
        ),
    )  # fmt: skip
    np.testing.assert_array_equal(
        default.test_x[0],
        np.array(
            [0.17678104, -0.21967377, 1.5921562, 0.8488922, -0.30887902, -0.8978673, -0.19325818,
             -0.24752364, -0.094552085, -0.9101711],
            dtype=np.float32,
        ),
    )  # fmt: skip
    assert float(default.train_x.astype(np.float64).sum()) == pytest.approx(254.42981136402886, abs=1e-9)
    assert float(default.test_x.astype(np.float64).sum()) == pytest.approx(73.63267422907109, abs=1e-9)


def test_labels_are_iid_bernoulli_half_not_balanced() -> None:
    data = make_reference_spirals(n_envs=64, examples_per_env=1024, n_test=4000, shortcut_dims=2, seed=3)
    counts = data.train_y.sum(axis=1)
    assert set(np.unique(data.train_y).tolist()) == {0.0, 1.0}
    # Binomial(1024, 1/2): sd 16. Balanced labels would give 512 everywhere (sd 0).
    assert np.any(counts != 512)
    assert 8.0 < counts.std() < 32.0
    assert np.all(np.abs(counts - 512) < 6 * 16)
    pooled = data.train_y.mean()
    assert abs(pooled - 0.5) < 4 * 0.5 / np.sqrt(data.train_y.size)
    assert abs(data.test_y.mean() - 0.5) < 4 * 0.5 / np.sqrt(4000)


def test_each_environment_and_the_test_set_scaled_by_their_own_std(default: SpiralsData) -> None:
    spirals = default.train_x[:, :, :2].astype(np.float64)
    np.testing.assert_allclose(spirals.std(axis=1), 1.0, rtol=1e-6)  # per env, per dim, ddof=0
    np.testing.assert_allclose(default.test_x[:, :2].astype(np.float64).std(axis=0), 1.0, rtol=1e-6)
    # Only divided by the std, never centred: the means are small (the spirals are nearly
    # symmetric about the origin) but not removed.
    means = spirals.mean(axis=1)
    assert np.all(np.abs(means) < 0.15)
    assert np.all(np.abs(means) > 0)
    # Scaled per environment, not pooled: the same environment in a larger set keeps its scale
    # only if scales were per environment.
    alone = make_reference_spirals(n_envs=16, examples_per_env=1024, n_test=2000, seed=5).train_x[0]
    in_pool = make_reference_spirals(n_envs=16, examples_per_env=1024, n_test=2000, seed=0).train_x[5]
    np.testing.assert_array_equal(alone[:, :2], in_pool[:, :2])


def test_test_set_is_one_fixed_set_for_every_seed() -> None:
    sets = [make_reference_spirals(n_envs=4, examples_per_env=16, n_test=300, seed=s) for s in (0, 1, 17)]
    for other in sets[1:]:
        np.testing.assert_array_equal(sets[0].test_x, other.test_x)
        np.testing.assert_array_equal(sets[0].test_y, other.test_y)


def test_test_shortcut_features_are_random_per_example_and_carry_no_label() -> None:
    data = make_reference_spirals(n_envs=4, examples_per_env=16, n_test=20000, shortcut_dims=6, seed=0)
    short = data.test_x[:, 2:].astype(np.float64)
    np.testing.assert_allclose(short.mean(axis=0), 0.0, atol=4 / np.sqrt(20000))
    np.testing.assert_allclose(short.std(axis=0), 1.0, atol=0.03)
    signs = 2.0 * data.test_y - 1.0
    corr = (short * signs[:, None]).mean(axis=0)
    np.testing.assert_allclose(corr, 0.0, atol=4 / np.sqrt(20000))


def test_shortcut_features_are_the_environment_vector_times_the_signed_label(default: SpiralsData) -> None:
    signs = 2.0 * default.train_y - 1.0
    expected = signs[:, :, None] * default.shortcuts[:, None, :]
    np.testing.assert_array_equal(default.train_x[:, :, 2:], expected.astype(np.float32))
    # perfectly and linearly predictive inside each environment ...
    score = np.einsum("end,ed->en", default.train_x[:, :, 2:], default.shortcuts)
    assert np.all((score > 0) == (default.train_y == 1))
    # ... but every environment has its own direction
    cos = default.shortcuts @ default.shortcuts.T
    norms = np.linalg.norm(default.shortcuts, axis=1)
    cos = cos / np.outer(norms, norms)
    assert np.all(np.abs(cos[~np.eye(16, dtype=bool)]) < 0.999)


def test_environment_e_shortcut_is_row_e_of_its_own_generators_matrix() -> None:
    # RandomState(seed + e) draws the (n_envs, d) matrix first; env e takes row e.
    data = make_reference_spirals(n_envs=5, examples_per_env=8, n_test=4, shortcut_dims=3, seed=11)
    for e in range(5):
        matrix = np.random.RandomState(11 + e).randn(5, 3)
        np.testing.assert_array_equal(data.shortcuts[e], matrix[e].astype(np.float32))


def test_seed_only_shifts_the_environments_generators() -> None:
    # Seed s+1's env e is drawn from the generator of seed s's env e+1: same spirals and labels,
    # a different row of the (same) shortcut matrix.
    a = make_reference_spirals(n_envs=6, examples_per_env=32, n_test=4, seed=0)
    b = make_reference_spirals(n_envs=6, examples_per_env=32, n_test=4, seed=1)
    for e in range(5):
        np.testing.assert_array_equal(b.train_x[e, :, :2], a.train_x[e + 1, :, :2])
        np.testing.assert_array_equal(b.train_y[e], a.train_y[e + 1])
        assert not np.array_equal(b.shortcuts[e], a.shortcuts[e + 1])


def test_deterministic_per_seed_and_different_across_seeds() -> None:
    setting = ReferenceSpiralsSetting(n_envs=3, examples_per_env=50, n_test=10)
    one, again, other = setting.make(4), setting.make(4), setting.make(5)
    for x, y in zip(one, again):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(one.train_x, other.train_x)


def test_setting_make_matches_the_function() -> None:
    setting = ReferenceSpiralsSetting(n_envs=2, examples_per_env=10, n_test=6, shortcut_dims=3)
    direct = make_reference_spirals(**dataclasses.asdict(setting), seed=2)
    for x, y in zip(setting.make(2), direct):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setting.n_envs = 3  # type: ignore[misc]
    assert hash(setting) == hash(
        ReferenceSpiralsSetting(n_envs=2, examples_per_env=10, n_test=6, shortcut_dims=3)
    )


def test_shortcut_scale_multiplies_train_and_test_shortcuts_only() -> None:
    base = make_reference_spirals(n_envs=3, examples_per_env=20, n_test=10, seed=0)
    big = make_reference_spirals(n_envs=3, examples_per_env=20, n_test=10, shortcut_scale=3.0, seed=0)
    np.testing.assert_array_equal(big.train_x[..., :2], base.train_x[..., :2])
    np.testing.assert_allclose(big.train_x[..., 2:], 3.0 * base.train_x[..., 2:], rtol=1e-6)
    np.testing.assert_allclose(big.test_x[:, 2:], 3.0 * base.test_x[:, 2:], rtol=1e-6)
    np.testing.assert_allclose(big.shortcuts, 3.0 * base.shortcuts, rtol=1e-6)
    zero = make_reference_spirals(n_envs=3, examples_per_env=20, n_test=10, shortcut_scale=0, seed=0)
    assert not np.any(zero.train_x[..., 2:]) and not np.any(zero.test_x[:, 2:])


def test_no_shortcut_dims_leaves_the_spirals() -> None:
    data = make_reference_spirals(n_envs=2, examples_per_env=10, n_test=6, shortcut_dims=0, seed=0)
    assert data.train_x.shape == (2, 10, 2) and data.test_x.shape == (6, 2)
    assert data.shortcuts.shape == (2, 0)


def test_largest_seed_is_accepted() -> None:
    data = make_reference_spirals(n_envs=4, examples_per_env=4, n_test=4, seed=2**32 - 4)
    assert data.train_x.shape == (4, 4, 10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_envs": 0}, r"n_envs must be an integer >= 1; got 0"),
        ({"n_envs": 2.0}, r"n_envs must be an integer >= 1; got 2\.0"),
        ({"n_envs": True}, r"n_envs must be an integer >= 1; got True"),
        ({"examples_per_env": 1}, r"examples_per_env must be an integer >= 2; got 1"),
        ({"n_test": 1}, r"n_test must be an integer >= 2; got 1"),
        ({"n_test": "2000"}, r"n_test must be an integer >= 2; got '2000'"),
        ({"shortcut_dims": -1}, r"shortcut_dims must be an integer >= 0; got -1"),
        ({"shortcut_scale": -1.0}, r"shortcut_scale must be a finite number >= 0; got -1\.0"),
        ({"shortcut_scale": float("nan")}, r"shortcut_scale must be a finite number >= 0; got nan"),
        ({"revolutions": 0}, r"revolutions must be a finite number > 0; got 0"),
        ({"revolutions": float("inf")}, r"revolutions must be a finite number > 0; got inf"),
        ({"seed": -1}, r"seed must be an integer in \[0, 4294967280\]; got -1"),
        ({"seed": 2**32 - 15}, r"seed must be an integer in \[0, 4294967280\]; got 4294967281"),
        ({"seed": 1.5}, r"seed must be an integer in \[0, 4294967280\]; got 1\.5"),
    ],
)
def test_bad_arguments_name_the_argument_and_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_reference_spirals(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"n_envs": 0}, {"examples_per_env": 1}, {"n_test": 0}, {"shortcut_dims": -2},
     {"shortcut_scale": -0.5}, {"revolutions": -3}],
)  # fmt: skip
def test_setting_rejects_bad_values_on_construction(kwargs: dict) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        ReferenceSpiralsSetting(**kwargs)


# --------------------------------------------------------------------------- the reference loop


def _tiny(seed: int = 0) -> SpiralsData:
    return make_reference_spirals(n_envs=4, examples_per_env=32, n_test=40, seed=seed)


_TINY = {"epochs": 3, "batch_size": 16, "hidden_units": 8, "test_batch_size": 20}


@pytest.mark.parametrize(("method", "threshold"), [("and_mask", 0.5), ("geometric_mean", 0.5), ("mean", 1.0)])
def test_reference_loop_per_environment_gradients_from_one_backward_equal_one_autograd_grad_each(
    monkeypatch: pytest.MonkeyPatch, method: str, threshold: float
) -> None:
    pytest.importorskip("torch")
    from gradand.experiments import reference_spirals

    fast = train_reference_loop(_tiny(), method=method, threshold=threshold, **_TINY)
    monkeypatch.setattr(reference_spirals, "_FACTORED_GRADIENTS", False)  # the reference's way
    slow = train_reference_loop(_tiny(), method=method, threshold=threshold, **_TINY)
    assert fast["curve"] == slow["curve"] and fast["final"] == slow["final"]
    assert fast["at_end"] == slow["at_end"]
    assert fast["survivor_fraction"] == pytest.approx(slow["survivor_fraction"], rel=1e-6)
    if method == "mean":  # the reference's averaging: the AND-mask at τ = 0 keeps everything
        assert fast["survivor_fraction"] == 1.0


def test_reference_loop_evaluates_at_the_start_of_each_epoch_and_reports_the_last_logged() -> None:
    pytest.importorskip("torch")
    out = train_reference_loop(_tiny(), method="and_mask", threshold=0.5, **{**_TINY, "epochs": 4})
    assert out["curve"]["epoch"] == [0, 1, 2, 3]  # epochs completed when the test set was evaluated
    assert out["final"]["test"] == out["curve"]["test"][-1]  # after epochs - 1 epochs
    assert set(out["final"]) == set(out["at_end"]) == {"train", "test", "test_no_shortcuts"}
    assert out["steps"] == 4 * 2


def test_reference_loop_initialises_the_model_as_gradands_torch_backend_with_the_same_seed() -> None:
    torch = pytest.importorskip("torch")
    from gradand.experiments.training import MLPSpec, get_backend

    data = _tiny()
    untrained = train_reference_loop(data, method="mean", **{**_TINY, "epochs": 2, "test_batch_size": 40})
    model = get_backend("torch").build(
        MLPSpec(in_features=10, out_features=1, hidden_units=8, hidden_layers=3), seed=REFERENCE_INIT_SEED
    )
    with torch.no_grad():
        pred = (model(torch.tensor(data.test_x))[:, 0] >= 0).numpy()
    assert untrained["curve"]["test"][0] == float(np.mean(pred == (data.test_y == 1)))


def test_reference_loop_rejects_what_the_reference_cannot_run() -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        train_reference_loop(_tiny(), method="sand_mask")
    with pytest.raises(ValueError, match="batch_size must be at most the 32"):
        train_reference_loop(_tiny(), method="mean", batch_size=64)
    with pytest.raises(ValueError, match="test_batch_size must be at most the 40"):
        train_reference_loop(_tiny(), method="mean", batch_size=16, test_batch_size=1000)
