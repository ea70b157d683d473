"""Bad arguments: one line on stderr, exit status 2, no traceback, nothing written, nothing trained."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from gradand import cli


def _fails(capsys, argv, *needles):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert err.startswith("gradand: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["reproduce", "spirals", "--backend", "mxnet"], ["--backend", "invalid choice", "'mxnet'"]),
        (
            ["reproduce", "consistency", "--backend", "torch"],
            ["not supported for the consistency experiment"],
        ),
        (
            ["reproduce", "memorization", "--thresholds", "0,0.2,1.5"],
            ["--thresholds 1.5", "out of range", "[0, 1]"],
        ),
        (["reproduce", "memorization", "--thresholds", "0,abc"], ["--thresholds 'abc'"]),
        (["reproduce", "memorization", "--thresholds", "0.2,0.2"], ["appears twice"]),
        (["reproduce", "spirals", "--threshold", "-0.1"], ["--threshold -0.1", "out of range"]),
        (["reproduce", "spirals", "--methods", "mean,lasso"], ["--methods", "lasso"]),
        (["reproduce", "spirals", "--quick", "--preset", "paper"], ["--quick and --preset paper disagree"]),
        (["reproduce", "spirals", "--epochs", "0"], ["--epochs", "must be >= 1"]),
        (["reproduce", "spirals", "--jobs", "0"], ["--jobs", "must be >= 1"]),
        (["reproduce", "spirals", "--jobs", "two"], ["--jobs"]),
        (["reproduce", "spirals", "--shortcut-dims", "-2"], ["--shortcut-dims: -2 must be >= 0"]),
        (["reproduce", "spirals", "--shortcut-scale", "nan"], ["--shortcut-scale: nan must be finite"]),
        (["reproduce", "memorization", "--n-train", "10"], ["--n-train 10 is smaller than one batch"]),
        (["reproduce", "memorization", "--n-train", "1797"], ["n_train must be in [1, 1796]"]),
        (["reproduce", "patchwork", "--seeds", "x"], ["--seeds 'x'"]),
        (["reproduce", "patchwork", "--seeds", "0"], ["number of seeds must be >= 1"]),
        (["reproduce", "patchwork", "--device", "cuda"], ["numpy backend runs on the CPU"]),
        (["reproduce", "consistency", "--epsilon", "-1"], ["--epsilon", "> 0"]),
        (["reproduce", "memorization", "--labels", "noisy"], ["--labels 'noisy'"]),
        (["reproduce", "memorization", "--dataset", "cifar10"], ["needs --data-dir"]),
        (
            ["reproduce", "memorization", "--dataset", "cifar10", "--data-dir", "/nonexistent"],
            ["CIFAR-10 not found"],
        ),
        (["reproduce", "mnist"], ["invalid choice: 'mnist'"]),
        (["reproduce"], ["required"]),
        ([], ["required"]),
    ],
)
def test_bad_arguments_get_one_line_and_exit_status_2(capsys, tmp_path, argv, needles):
    _fails(capsys, [*argv, "--out", str(tmp_path)] if len(argv) > 1 else argv, *needles)
    assert list(tmp_path.iterdir()) == []


def test_unknown_cuda_device_is_reported_for_torch_experiments(capsys, tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    _fails(
        capsys, ["reproduce", "spirals", "--device", "cuda", "--out", str(tmp_path)], "CUDA is not available"
    )
    _fails(capsys, ["reproduce", "spirals", "--device", "tpu9", "--out", str(tmp_path)], "--device 'tpu9'")


def test_a_backend_that_is_not_installed_is_named_with_the_install_command(capsys, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        cli.importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    _fails(
        capsys,
        ["reproduce", "spirals", "--out", str(tmp_path)],
        "needs torch",
        "pip install 'gradand[torch]'",
    )
    _fails(capsys, ["reproduce", "patchwork", "--backend", "torch", "--out", str(tmp_path)], "needs torch")


def test_an_unwritable_output_directory_is_reported_before_anything_runs(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    _fails(capsys, ["reproduce", "patchwork", "--out", str(blocker)], "is a file, not a directory")
    _fails(capsys, ["reproduce", "consistency", "--out", str(blocker / "sub")], "not writable")
    assert blocker.read_text() == "not a directory"


def test_an_existing_result_is_not_overwritten_without_force(capsys, tmp_path):
    (tmp_path / "patchwork.json").write_text('{"mine": true}')
    _fails(capsys, ["reproduce", "patchwork", "--out", str(tmp_path)], "already exists", "--force")
    assert (tmp_path / "patchwork.json").read_text() == '{"mine": true}'


def test_the_console_script_prints_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "gradand.cli", "reproduce", "spirals", "--threshold", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "gradand: error: --threshold 2: τ is out of range; it must be in [0, 1] (the fraction of "
        "environments that must agree in sign)"
    ]
