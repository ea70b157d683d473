"""The paper's first result in pure numpy: averaging gives a patchwork, the AND-mask the invariant feature."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gradand
from gradand.experiments.patchwork import train

ROOT = Path(__file__).resolve().parents[1]


def test_mean_sews_the_four_shortcuts_into_a_patchwork():
    np.testing.assert_allclose(train(gradand.Mean()).weights, [0.32, 0.32, 0.32, 0.32, 0.13], atol=0.01)


@pytest.mark.parametrize(
    "combiner", [gradand.AndMask(1.0, rescale=False), gradand.GeometricMean(1.0, rescale=False)]
)
def test_and_mask_and_geometric_mean_find_the_invariant_feature(combiner):
    np.testing.assert_allclose(train(combiner).weights, [0, 0, 0, 0, 3.0], atol=0.02)


def test_invariant_solution_transfers_to_held_out_environments_and_patchwork_does_not():
    mean = train(gradand.Mean(), environments=(0, 1))
    andm = train(gradand.AndMask(1.0, rescale=False), environments=(0, 1))
    assert andm.heldout_loss < 0.05 < 0.3 < mean.heldout_loss
    assert mean.trajectory.shape == (1001, 5)


def test_patchwork_example_script_runs():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "numpy_patchwork.py")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "and_mask" in out.stdout and "3.00" in out.stdout
