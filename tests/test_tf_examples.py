"""The TensorFlow examples run (in their --quick form; the mirrored one runs in test_tf_distribute)."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_custom_loop_example_trains_both_combiners(capsys):
    main = runpy.run_path(str(EXAMPLES / "tf_custom_loop.py"), run_name="example")["main"]
    results = main(["--quick"])
    assert set(results) == {"Mean() (plain averaging)", "AndMask(threshold=1.0)"}
    for r in results.values():
        assert 0.0 <= r["test"] <= 1.0 and 0.0 <= r["kept"] <= 1.0 and r["loss"] > 0
    assert results["Mean() (plain averaging)"]["kept"] == 1.0
    assert "test acc" in capsys.readouterr().out


def test_the_keras_fit_example_reports_train_and_test_accuracy(capsys):
    main = runpy.run_path(str(EXAMPLES / "tf_keras_fit.py"), run_name="example")["main"]
    results = main(["--quick", "--verbose", "0"])
    assert 0.0 <= results["train"] <= 1.0 and 0.0 <= results["test"] <= 1.0
    assert "test accuracy" in capsys.readouterr().out
