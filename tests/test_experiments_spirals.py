"""The spirals generator (paper §3, App. B): invariant spirals, per-environment shortcuts, random at test."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradand.experiments._distribution import distribution
from gradand.experiments.reference_spirals import (
    REFERENCE_INIT_SEED,
    ReferenceSpiralsSetting,
    make_reference_spirals,
)
from gradand.experiments.spirals import (
    PRESETS,
    SUCCESS,
    SpiralsSetting,
    TrainSetting,
    claims,
    make_spirals,
    preset,
    run,
)

sizes = st.fixed_dictionaries(
    {
        "n_envs": st.integers(1, 6),
        "examples_per_env": st.integers(2, 40),
        "n_test": st.integers(2, 40),
        "shortcut_dims": st.integers(0, 6),
        "shortcut_scale": st.sampled_from([0.1, 1.0, 3.0]),
        "revolutions": st.sampled_from([0.5, 1.0, 3.0]),
        "seed": st.integers(0, 2**31),
    }
)


@settings(max_examples=40)
@given(sizes)
def test_shapes_dtypes_and_exact_label_balance(kw):
    d = make_spirals(**kw)
    e, n, t, k = kw["n_envs"], kw["examples_per_env"], kw["n_test"], kw["shortcut_dims"]
    assert d.train_x.shape == (e, n, 2 + k) and d.train_y.shape == (e, n)
    assert d.test_x.shape == (t, 2 + k) and d.test_y.shape == (t,)
    assert d.shortcuts.shape == (e, k)
    for a in d:
        assert a.dtype == np.float32 and np.all(np.isfinite(a))
    assert set(np.unique(d.train_y)) <= {0.0, 1.0}
    np.testing.assert_array_equal(d.train_y.sum(axis=1), np.full(e, n // 2))
    assert d.test_y.sum() == t // 2


@settings(max_examples=40)
@given(sizes.filter(lambda kw: kw["shortcut_dims"] > 0))
def test_shortcut_is_one_vector_times_the_label_sign_and_perfectly_predictive_within_an_environment(kw):
    d = make_spirals(**kw)
    signs = 2.0 * d.train_y - 1.0
    np.testing.assert_allclose(d.train_x[:, :, 2:], signs[:, :, None] * d.shortcuts[:, None, :], rtol=1e-6)
    # the linear rule "project on this environment's vector" classifies every example of it
    scores = np.einsum("enk,ek->en", d.train_x[:, :, 2:], d.shortcuts)
    assert np.all((scores > 0) == (d.train_y == 1))


def test_shortcuts_differ_across_environments_so_no_single_direction_predicts_all_of_them():
    d = make_spirals(n_envs=32, examples_per_env=64, shortcut_dims=8, seed=3)
    pooled_x = d.train_x.reshape(-1, d.train_x.shape[-1])[:, 2:]
    pooled_y = d.train_y.reshape(-1)
    accs = [float(np.mean((pooled_x @ s > 0) == (pooled_y == 1))) for s in d.shortcuts]
    # each environment's own direction is right in its own environment and a coin flip elsewhere
    assert max(accs) < 0.8
    cos = d.shortcuts @ d.shortcuts.T / np.outer(*(2 * [np.linalg.norm(d.shortcuts, axis=1)]))
    assert np.abs(cos[~np.eye(32, dtype=bool)]).mean() < 0.5


def test_test_shortcuts_are_random_per_example_and_carry_no_label_information():
    d = make_spirals(n_envs=16, examples_per_env=32, n_test=4000, shortcut_dims=8, seed=1)
    short = d.test_x[:, 2:]
    assert np.linalg.matrix_rank(short) == 8  # not one vector times a sign
    for s in d.shortcuts:
        acc = float(np.mean((short @ s > 0) == (d.test_y == 1)))
        assert abs(acc - 0.5) < 0.05
    # the class-conditional means of the test shortcuts coincide (no label signal)
    gap = short[d.test_y == 1].mean(0) - short[d.test_y == 0].mean(0)
    assert np.abs(gap).max() < 0.15


def _nearest_neighbour_accuracy(train_x, train_y, test_x, test_y):
    dist = ((test_x[:, None, :] - train_x[None, :, :]) ** 2).sum(-1)
    return float(np.mean(train_y[dist.argmin(1)] == test_y))


def test_the_spiral_mechanism_is_the_same_in_every_environment_and_at_test_time():
    d = make_spirals(n_envs=4, examples_per_env=1024, n_test=500, revolutions=1.0, seed=0)
    ref_x, ref_y = d.train_x[0, :, :2], d.train_y[0]
    for e in range(1, 4):
        assert _nearest_neighbour_accuracy(ref_x, ref_y, d.train_x[e, :, :2], d.train_y[e]) > 0.95
    assert _nearest_neighbour_accuracy(ref_x, ref_y, d.test_x[:, :2], d.test_y) > 0.95
    np.testing.assert_allclose(d.train_x[:, :, :2].reshape(-1, 2).std(0), [1.0, 1.0], rtol=1e-5)


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = make_spirals(seed=5, n_envs=2), make_spirals(seed=5, n_envs=2), make_spirals(seed=6, n_envs=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.train_x, c.train_x)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_envs": 0}, "n_envs"),
        ({"examples_per_env": 1}, "examples_per_env"),
        ({"shortcut_dims": -1}, "shortcut_dims"),
        ({"shortcut_scale": float("nan")}, "shortcut_scale"),
        ({"revolutions": 0}, "revolutions"),
        ({"noise": 0.1}, "noise"),
        ({"seed": -1}, "seed"),
        ({"n_envs": 2.5}, "n_envs"),
    ],
)
def test_bad_generator_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_spirals(**kwargs)


def test_presets_hold_the_reference_code_and_paper_settings():
    data, train = preset("reference")
    assert isinstance(data, ReferenceSpiralsSetting) and data == ReferenceSpiralsSetting()
    assert (data.n_envs, data.examples_per_env, data.shortcut_dims, data.revolutions, data.n_test) == (
        16,
        1024,
        8,
        3.0,
        2000,
    )
    assert (train.epochs, train.lr, train.weight_decay, train.lr_milestone, train.lr_decay) == (
        150,
        1e-2,
        1e-3,
        0.75,
        0.1,
    )
    assert (train.hidden_units, train.hidden_layers, train.batch_size) == (256, 3, 256)
    mine, mine_train = preset("gradand")
    assert isinstance(mine, SpiralsSetting) and mine == SpiralsSetting()
    assert (mine_train.init_seed, mine_train.shuffle_seed, mine_train.evaluate) == (None, None, "end")
    paper, _ = preset("paper")
    assert (paper.n_envs, paper.examples_per_env, paper.shortcut_dims, paper.n_test) == (32, 1280, 32, 2000)
    assert set(PRESETS) == {"reference", "gradand", "paper", "quick"}
    assert SpiralsSetting(n_envs=2, examples_per_env=4, n_test=4).make(0).train_x.shape == (2, 4, 10)
    with pytest.raises(ValueError, match="preset"):
        preset("nope")


def test_reference_preset_fixes_init_and_shuffle_seed_and_reports_the_start_of_the_last_epoch():
    _, train = preset("reference")
    assert train.init_seed == train.shuffle_seed == REFERENCE_INIT_SEED == 0
    assert train.evaluate == "start"


def _fake_trainer(calls):
    """A stand-in for train_classifier: records its arguments, returns accuracies from the data seed."""

    def fake(model, **kw):
        calls.append(kw)
        epochs = kw["epochs"]
        evals = list(range(kw["eval_every"], epochs + 1, kw["eval_every"]))
        if not evals or evals[-1] != epochs:
            evals.append(epochs)
        value = float(kw["train_x"][0, 0, 0] > 0)  # anything that depends on the data only
        curve = {"epoch": evals, **{k: [0.5 + 0.1 * i for i in range(len(evals))] for k in kw["eval_sets"]}}
        curve["test"] = [value] * len(evals)
        final = {k: curve[k][-1] for k in kw["eval_sets"]}
        return {
            "final": final,
            "curve": curve,
            "survivor_fraction": 0.5,
            "steps": 1,
            "seconds": 0.0,
            "model": None,
        }

    return fake


def test_reference_preset_wiring_reference_generator_fixed_seeds_and_evaluation(monkeypatch):
    from gradand.experiments import spirals

    calls = []
    monkeypatch.setattr(spirals, "train_classifier", _fake_trainer(calls))
    data, train = preset("reference")
    data = dataclasses.replace(data, n_envs=3, examples_per_env=8, n_test=6)
    train = dataclasses.replace(train, epochs=4, batch_size=4, hidden_units=4)
    report = run(data, train, methods=("mean", "and_mask"), seeds=(3, 7), show_progress=False)
    assert len(calls) == 4 and report.config["generator"] == "reference"
    for kw in calls:
        assert kw["init_seed"] == 0 and kw["seed"] == 0  # fixed, whatever the data seed
        assert kw["eval_every"] == 3  # after epochs - 1 epochs (and at the end)
        test_x, test_y = kw["eval_sets"]["test"]
        zeroed, zeroed_y = kw["eval_sets"]["test_no_shortcuts"]
        np.testing.assert_array_equal(zeroed[:, :2], test_x[:, :2])
        assert np.all(zeroed[:, 2:] == 0) and np.array_equal(zeroed_y, test_y)
    # the reference generator drew the data: environment e of seed s is RandomState(s + e)
    expected = [make_reference_spirals(n_envs=3, examples_per_env=8, n_test=6, seed=s) for s in (3, 7)]
    for kw in calls:
        assert sum(np.array_equal(kw["train_x"], e.train_x) for e in expected) == 1
        np.testing.assert_array_equal(kw["eval_sets"]["test"][0], expected[0].test_x)  # one test set
    assert {id(kw["train_x"]) for kw in calls} and not np.array_equal(
        expected[0].train_x, expected[1].train_x
    )
    m = report.results["methods"]["mean"]
    assert m["train_acc"] == [0.5, 0.5]  # the curve's value after epochs - 1 = 3 epochs ...
    assert [a["train"] for a in m["at_end"]] == [0.6, 0.6]  # ... the last epoch's kept as at_end


def test_gradand_preset_seed_initialises_and_shuffles(monkeypatch):
    from gradand.experiments import spirals

    calls = []
    monkeypatch.setattr(spirals, "train_classifier", _fake_trainer(calls))
    data, train = preset("gradand")
    data = dataclasses.replace(data, n_envs=3, examples_per_env=8, n_test=6)
    train = dataclasses.replace(train, epochs=4, batch_size=4, hidden_units=4)
    run(data, train, methods=("mean",), seeds=(3, 7), show_progress=False)
    assert [(kw["init_seed"], kw["seed"], kw["eval_every"]) for kw in calls] == [(3, 3, 5), (7, 7, 5)]


def test_distributions_per_method_and_the_claims_decided_on_them(monkeypatch):
    from gradand.experiments import spirals

    monkeypatch.setattr(spirals, "train_classifier", _fake_trainer([]))
    data = SpiralsSetting(n_envs=2, examples_per_env=8, n_test=6)
    report = run(data, TrainSetting(epochs=2, batch_size=4, hidden_units=4), methods=("mean",),
                 seeds=tuple(range(6)), show_progress=False)  # fmt: skip
    d = report.results["methods"]["mean"]["distribution"]
    assert set(d) == {"train", "test", "test_no_shortcuts"} and d["test"]["n"] == 6
    assert d["test"]["successes"] == sum(v >= SUCCESS for v in d["test"]["values"])
    assert "test >= 0.95" in report.table and "shortcuts zeroed" in report.table


def _runs(test, train=1.0):
    return {"test": distribution(test), "train": distribution([train] * len(test))}


@pytest.mark.parametrize(("n", "passed"), [(3, [True, False, True, True]), (5, [True, True, True, True])])
def test_success_rate_claim_needs_disjoint_wilson_intervals(n, passed):
    checks = claims({"mean": _runs([0.5] * n), "and_mask": _runs([1.0] * n)})
    assert [c.passed for c in checks] == passed


def test_and_mask_claim_is_on_the_lower_end_of_the_interval_and_baselines_on_the_upper_end():
    wide = [1.0, 1.0, 1.0, 0.6, 1.0, 1.0]  # mean 0.933, but the interval reaches below 0.9
    # l2: mean 0.55 but the interval reaches above 0.65
    checks = claims({"and_mask": _runs(wide), "l2": _runs([0.5, 0.5, 0.8, 0.5, 0.5, 0.5])})
    assert [c.passed for c in checks] == [False, False, True]
    assert "AND-mask" in checks[0].claim and "near chance" in checks[1].claim


def test_train_setting_checks_its_seeds_and_evaluation():
    with pytest.raises(ValueError, match="evaluate"):
        TrainSetting(evaluate="middle")
    with pytest.raises(ValueError, match="init_seed"):
        TrainSetting(init_seed=-1)
    with pytest.raises(ValueError, match="epochs"):
        TrainSetting(epochs=1, evaluate="start")
    with pytest.raises(ValueError, match="loop"):
        run(SpiralsSetting(), TrainSetting(), loop="theirs")
    with pytest.raises(ValueError, match="sand_mask"):
        run(SpiralsSetting(), TrainSetting(), methods=("sand_mask",), loop="reference")
