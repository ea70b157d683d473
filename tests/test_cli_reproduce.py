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
    # the distribution over seeds, and the mechanism: the AND-mask's model uses the spirals
    test = m["and_mask"]["distribution"]["test"]
    assert test["n"] == 1 and test["successes"] == int(test["values"][0] >= 0.95)
    assert m["and_mask"]["distribution"]["test_no_shortcuts"]["mean"] >= 0.9
    assert doc["config"]["generator"] == "gradand" and doc["config"]["loop"] == "gradand"


_TINY_SPIRALS = ["--envs", "4", "--examples-per-env", "32", "--n-test", "40", "--epochs", "3", "--seeds", "2"]


@pytest.mark.parametrize("loop", ["gradand", "reference"])
def test_spirals_reference_preset_distributions_in_both_loops(capsys, tmp_path, loop):
    pytest.importorskip("torch")
    out = _run(
        capsys,
        ["reproduce", "spirals", *_TINY_SPIRALS, "--methods", "mean,and_mask", "--loop", loop,
         "--out", str(tmp_path), "--no-progress", "--jobs", "1"],
    )  # fmt: skip
    assert "test >= 0.95 (95% CI)" in out and "shortcuts zeroed" in out
    name = "spirals.json" if loop == "gradand" else "spirals-reference-loop.json"
    doc = json.loads((tmp_path / name).read_text())
    assert doc["config"]["generator"] == "reference" and doc["config"]["loop"] == loop
    assert doc["config"]["train"]["init_seed"] == 0 and doc["config"]["train"]["evaluate"] == "start"
    assert doc["seeds"] == [0, 1] and (tmp_path / name.replace(".json", ".png")).exists()
    for m in ("mean", "and_mask"):
        r = doc["results"]["methods"][m]
        assert len(r["test_acc"]) == 2 and r["distribution"]["test"]["n"] == 2
        assert r["distribution"]["test"]["low"] is not None  # an interval from two seeds
    assert [c["claim"][:8] for c in doc["checks"]][:2] == ["AND-mask", "AND-mask"]


def test_spirals_errors_name_the_option(capsys, tmp_path):
    for argv, match in (
        (["--loop", "reference", "--methods", "sand_mask"], "sand_mask"),
        (["--loop", "reference", "--backend", "jax"], "PyTorch on the CPU"),
        (["--seeds", "4294967290"], "seed"),
    ):
        assert cli.main(["reproduce", "spirals", *argv, "--out", str(tmp_path)]) == 2
        assert match in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


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


def test_colored_digits_quick_averaging_learns_the_colour_and_the_penalties_do_not(capsys, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("sklearn")
    out = _run(
        capsys,
        ["reproduce", "colored-digits", "--quick", "--seeds", "2", "--methods", "mean,and_mask,irm,grayscale",
         "--out", str(tmp_path), "--no-progress"],
    )  # fmt: skip
    assert "test acc ± 95%" in out and "no better than averaging" in out and "IRMv1 beats averaging" in out
    doc = json.loads((tmp_path / "colored-digits-quick.json").read_text())
    m = doc["results"]["methods"]
    assert list(m) == ["mean", "and_mask", "irm", "grayscale"] and doc["seeds"] == [0, 1]
    for r in m.values():
        assert r["test"]["n"] == 2 and r["test"]["low"] is not None and r["test"]["threshold"] == 0.5
        assert r["test"]["values"] == r["test_acc"] and r["train"]["values"] == r["train_acc"]
    # every environment's colour agrees with the label: averaging fits it and fails the reversed test set
    assert m["mean"]["train"]["mean"] >= 0.8 and m["mean"]["test"]["mean"] < 0.5
    assert m["and_mask"]["survivor_fraction"][0] < 1.0 and m["mean"]["survivor_fraction"] == [1.0, 1.0]
    assert m["grayscale"]["test"]["mean"] > 0.6  # without colour, the shape is what is learnt
    assert doc["config"]["preset"] == "quick (modified)" and doc["config"]["anneal_steps"] == 20
    assert doc["config"]["methods"]["irm"]["penalty"] == ["irm", 10000.0]
    claims = [c["claim"] for c in doc["checks"]]
    assert claims[0].startswith("averaging learns the colour") and len(claims) == 4
    assert (tmp_path / "colored-digits-quick.png").exists()


def test_colored_digits_errors_name_the_option(capsys, tmp_path):
    for argv, match in (
        (["--methods", "mean,fish"], "'fish'"),
        (["--methods", "mean,mean"], "mean appears twice"),
        (["--backend", "numpy"], "not supported for the colored-digits experiment"),
        (["--envs", "0"], "--envs"),
        (["--envs", "1000"], "numbers per seed"),
    ):
        assert cli.main(["reproduce", "colored-digits", *argv, "--out", str(tmp_path)]) == 2
        assert match in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_sweep_quick_writes_success_rates_per_cell_and_the_plot(capsys, tmp_path):
    pytest.importorskip("torch")
    out = _run(
        capsys,
        ["reproduce", "sweep", "--quick", "--seeds", "2", "--methods", "mean,and_mask", "--envs", "2,4",
         "--shortcut-dims", "2", "--shortcut-scale", "1", "--out", str(tmp_path), "--no-progress"],
    )  # fmt: skip
    assert "runs with test >= 0.95 / runs" in out and "AND-mask (τ=1) succeeds more often" in out
    doc = json.loads((tmp_path / "sweep-quick.json").read_text())
    cells = doc["results"]["cells"]
    assert [(c["axis"], c["value"]) for c in cells] == [("n_envs", 2), ("n_envs", 4)]
    assert sorted(cells[0]["methods"]) == ["and_mask", "mean"] and doc["seeds"] == [0, 1]
    assert cells[1]["methods"]["mean"]["test"]["n"] == 2 and doc["config"]["preset"] == "quick (modified)"
    assert (tmp_path / "sweep-quick.png").exists()


def test_minima_quick_reports_inconsistency_beside_test_accuracy(capsys, tmp_path):
    pytest.importorskip("torch")
    argv = ["reproduce", "minima", "--quick", "--seeds", "2", "--out", str(tmp_path), "--no-progress"]
    out = _run(capsys, argv)
    assert "I^ε (ε=0.1)" in out and "more consistent minima than averaging" in out
    doc = json.loads((tmp_path / "minima-quick.json").read_text())
    assert sorted(doc["results"]["methods"]) == ["and_mask", "geometric_mean", "mean"]
    assert doc["config"]["probe"]["dims"] == 2 and len(doc["results"]["runs"]) == 6
    assert (tmp_path / "minima-quick.png").exists()


def test_sweep_and_minima_errors_name_the_option(capsys, tmp_path):
    for argv, match in (
        (["sweep", "--envs", "2,x"], "--envs"),
        (["sweep", "--envs", "2,2"], "2 appears twice"),
        (["sweep", "--shortcut-scale", "-1"], "--shortcut-scale"),
        (["sweep", "--methods", "mean,fish"], "'fish'"),
        (["sweep", "--shortcut-scale", "1,x"], "--shortcut-scale"),
        (["minima", "--epsilon", "0"], "--epsilon"),
        (["minima", "--backend", "numpy"], "not supported for the minima experiment"),
    ):
        assert cli.main(["reproduce", *argv, "--out", str(tmp_path)]) == 2
        assert match in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
