"""The sweep over environments and shortcuts: cells, methods' thresholds, distributions."""

from __future__ import annotations

import dataclasses

import pytest

import gradand
from gradand.experiments import spirals, sweep


def test_the_base_setting_is_one_cell_shared_by_every_axis():
    data = spirals.SpiralsSetting(n_envs=16, shortcut_dims=8, shortcut_scale=1.0)
    grid = sweep.SweepGrid(n_envs=(2, 16), shortcut_dims=(0, 8), shortcut_scale=(1.0, 3.0))
    got = [(axis, value) for axis, value, _ in sweep.cells(data, grid)]
    assert got == [("n_envs", 2), ("n_envs", 16), ("shortcut_dims", 0), ("shortcut_scale", 3.0)]
    settings = [s for _, _, s in sweep.cells(data, grid)]
    assert settings[2] == dataclasses.replace(data, shortcut_dims=0) and len(set(settings)) == 4


def test_the_low_threshold_needs_fewer_votes_than_every_environment_in_every_cell():
    _, train, grid = sweep.preset("default")
    name, threshold = sweep.METHODS["and_mask_low"]
    assert name == "and_mask" and threshold == sweep.LOW_THRESHOLD
    for e in grid.n_envs:
        assert gradand.required_votes(threshold, e) < e  # τ·E never rounds up to E
    assert sweep._trained_by("and_mask_low", train)[1].threshold == threshold
    assert sweep._trained_by("and_mask", train)[1].threshold == 1.0
    assert sweep._trained_by("sand_mask", train)[1] == train


def test_the_default_grid_keeps_examples_per_environment_fixed():
    data, _, grid = sweep.preset("default")
    assert {s.examples_per_env for _, _, s in sweep.cells(data, grid)} == {data.examples_per_env}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_envs": (0,)}, "n_envs values"),
        ({"shortcut_dims": (-1,)}, "shortcut_dims values"),
        ({"shortcut_scale": (float("inf"),)}, "shortcut_scale values"),
        ({"n_envs": (2, 2)}, "must not repeat"),
    ],
)
def test_bad_grids_name_the_axis(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sweep.SweepGrid(**kwargs)


def test_run_rejects_unknown_methods_and_empty_seeds():
    data, train, grid = sweep.preset("quick")
    with pytest.raises(ValueError, match="methods"):
        sweep.run(data, train, grid, methods=("fish",), show_progress=False)
    with pytest.raises(ValueError, match="seeds"):
        sweep.run(data, train, grid, seeds=(), show_progress=False)
    with pytest.raises(ValueError, match="backend"):
        sweep.run(data, train, grid, backend="mxnet", show_progress=False)


def test_quick_sweep_reports_a_success_rate_with_a_wilson_interval_per_cell_and_method():
    pytest.importorskip("torch")
    data, train, grid = sweep.preset("quick")
    report = sweep.run(data, train, grid, methods=("mean", "and_mask_low"), seeds=(0, 1), show_progress=False)
    cells = report.results["cells"]
    assert [(c["axis"], c["value"]) for c in cells] == [("n_envs", 2), ("n_envs", 4), ("shortcut_dims", 0)]
    for c in cells:
        for m in ("mean", "and_mask_low"):
            test = c["methods"][m]["test"]
            assert test["n"] == 2 and test["threshold"] == spirals.SUCCESS
            assert 0.0 <= test["success_low"] <= test["success_rate"] <= test["success_high"] <= 1.0
    assert cells[2]["data"]["shortcut_dims"] == 0 and cells[0]["data"]["n_envs"] == 2
    # the same run twice gives the same numbers (the seed fixes data, initialisation and batches)
    again = sweep.run(data, train, grid, methods=("mean",), seeds=(0, 1), show_progress=False)
    assert again.results["cells"][0]["methods"]["mean"]["test"] == cells[0]["methods"]["mean"]["test"]
