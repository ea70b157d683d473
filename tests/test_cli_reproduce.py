"""Each ``gradand reproduce`` command in ``--quick`` mode: the JSON holds the paper's qualitative result."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gradand import cli
from gradand.experiments import _report


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Other test processes share the CPU: one intra-op thread avoids oversubscription."""
    try:
        import torch
    except ImportError:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _run(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def test_patchwork_reproduces_the_notebook_weights_table_json_and_plot(capsys, tmp_path):
    out = _run(capsys, ["reproduce", "patchwork", "--out", str(tmp_path)])
    assert "[ 0.32,  0.32,  0.32,  0.32,  0.13]" in out
    assert "all 4 claims reproduced" in out
    doc = json.loads((tmp_path / "patchwork.json").read_text())
    four, two = doc["results"]["4 envs"], doc["results"]["2 envs"]
    assert four["mean"]["weights"] == pytest.approx([0.32, 0.32, 0.32, 0.32, 0.13], abs=0.01)
    for name in ("and_mask", "geometric_mean"):
        assert four[name]["weights"] == pytest.approx([0, 0, 0, 0, 3.0], abs=0.01)
        assert two[name]["heldout_loss"] < 0.05 < 0.3 < two["mean"]["heldout_loss"]
    assert doc["reproduced"] is True and doc["backend"] == "numpy"
    assert doc["command"] == f"gradand reproduce patchwork --out {tmp_path}"
    assert len(four["mean"]["trajectory"]) == 101
    assert (tmp_path / "patchwork.png").read_bytes()[:4] == b"\x89PNG"


def test_force_overwrites_a_result_and_no_temporary_file_is_left(capsys, tmp_path):
    (tmp_path / "patchwork.json").write_text("{}")
    _run(capsys, ["reproduce", "patchwork", "--out", str(tmp_path), "--force", "--no-plot"])
    assert json.loads((tmp_path / "patchwork.json").read_text())["experiment"] == "patchwork"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patchwork.json"]


def test_without_matplotlib_the_plot_is_skipped_with_a_message(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(_report, "have_matplotlib", lambda: False)
    out = _run(capsys, ["reproduce", "patchwork", "--out", str(tmp_path)])
    assert "plot skipped: matplotlib is not installed" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patchwork.json"]


def test_patchwork_needs_only_numpy(tmp_path):
    code = (
        "import sys; from gradand.cli import main; "
        f"rc = main(['reproduce', 'patchwork', '--out', {str(tmp_path)!r}, '--no-plot']); "
        "bad = [m for m in ('torch', 'jax', 'tensorflow', 'matplotlib', 'sklearn') if m in sys.modules]; "
        "print('LOADED', bad); sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout


def test_patchwork_on_the_torch_backend_matches_numpy(capsys, tmp_path):
    pytest.importorskip("torch")
    common = ["--steps", "200", "--no-plot"]
    _run(capsys, ["reproduce", "patchwork", "--out", str(tmp_path / "np"), *common])
    _run(capsys, ["reproduce", "patchwork", "--backend", "torch", "--out", str(tmp_path / "pt"), *common])
    a = json.loads((tmp_path / "np" / "patchwork.json").read_text())["results"]
    b = json.loads((tmp_path / "pt" / "patchwork.json").read_text())["results"]
    for key in a:
        for name in a[key]:
            assert b[key][name]["weights"] == pytest.approx(a[key][name]["weights"], abs=1e-6)


def test_consistency_quick_gives_the_closed_form_scores_and_the_figure(capsys, tmp_path):
    out = _run(capsys, ["reproduce", "consistency", "--quick", "--out", str(tmp_path)])
    assert "all 6 claims reproduced" in out
    doc = json.loads((tmp_path / "consistency-quick.json").read_text())
    swapped, aligned = doc["results"]["swapped"], doc["results"]["aligned"]
    assert swapped["inconsistency"] == pytest.approx(20.0) and aligned["inconsistency"] == pytest.approx(5.0)
    assert swapped["det"]["arithmetic"] == pytest.approx(0.525**2)
    assert swapped["det"]["geometric"] == pytest.approx(0.05)
    assert len(swapped["empirical_inconsistency"]) == 3  # one estimate per default seed
    assert all(0.9 * 20 <= v <= 20 + 1e-9 for v in swapped["empirical_inconsistency"])
    assert (tmp_path / "consistency-quick.png").stat().st_size > 10_000


def test_spirals_quick_and_mask_generalises_where_averaging_and_l2_fit_the_shortcuts(capsys, tmp_path):
    pytest.importorskip("torch")
    out = _run(
        capsys,
        [
            "reproduce",
            "spirals",
            "--quick",
            "--methods",
            "mean,l2,and_mask",
            "--out",
            str(tmp_path),
            "--no-plot",
        ],
    )
    assert "and_mask" in out
    doc = json.loads((tmp_path / "spirals-quick.json").read_text())
    m = doc["results"]["methods"]
    assert set(m) == {"mean", "l2", "and_mask"} and doc["seeds"] == [0]
    for base in ("mean", "l2"):
        assert m[base]["train_mean"] >= 0.95  # the shortcuts fit the training environments ...
        assert m[base]["test_mean"] <= 0.65  # ... and are useless at test time
    assert m["and_mask"]["test_mean"] >= 0.9
    assert m["and_mask"]["survivor_fraction"][0] < 0.5  # most gradient components were masked
    assert doc["config"]["data"]["n_envs"] == 16 and doc["config"]["preset"] == "quick (modified)"


def test_memorization_quick_random_labels_are_memorised_by_averaging_not_by_the_and_mask(capsys, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    _run(capsys, ["reproduce", "memorization", "--quick", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "memorization-quick.json").read_text())
    rnd, true = doc["results"]["random"], doc["results"]["true"]
    assert set(rnd) == {"0.0", "0.2"}
    # random labels: averaging memorises far more of them than the AND-mask at τ = 0.2
    assert rnd["0.0"]["train_mean"] >= 0.8
    assert rnd["0.0"]["train_mean"] - rnd["0.2"]["train_mean"] >= 0.4
    assert rnd["0.0"]["test_mean"] < 0.25  # memorising random labels does not generalise
    # true labels: both learn something that generalises
    assert true["0.0"]["test_mean"] >= 0.8 and true["0.2"]["test_mean"] >= 0.8
    assert (tmp_path / "memorization-quick.png").exists()
