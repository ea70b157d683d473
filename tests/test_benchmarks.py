"""The benchmark suite (benchmarks/run.py): its JSON schema, reports and failure modes.

Timings are never asserted (the machine is shared); only that the suite runs every
strategy of each framework, that each ratio to plain averaging is finite and positive,
and that the reports agree with the JSON.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "benchmarks" / "run.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

import run as bench  # noqa: E402
from _common import select_workloads, time_interleaved, workloads  # noqa: E402

FRAMEWORKS = bench.FRAMEWORKS

#: Per framework: the workloads run in the test (small, to keep it fast) and strategies that must appear.
CASES = {
    "torch": (
        "mlp,per-example",
        [
            "plain averaging",
            "gradand backward (streaming, forward per env)",
            "gradand vmap_backward",
            "baseline: retain_graph loop (reference code)",
            "baseline: forward+backward per env (DomainBed)",
            "baseline: stacked Jacobian (TorchJD)",
        ],
    ),
    "jax": ("mlp,cnn,sweep", ["plain averaging", "gradand value_and_grad"]),
    "tensorflow": (
        "mlp,cnn",
        ["plain averaging", 'gradand combined_gradients(method="loop")', "gradand vectorized_statistics"],
    ),
}

_TORCH_IMAGE = [
    "plain averaging",
    "gradand backward (streaming, forward per env)",
    "gradand vmap_backward",
    "gradand factored_backward",
    "baseline: retain_graph loop (reference code)",
    "baseline: forward+backward per env (DomainBed)",
    "baseline: stacked Jacobian (TorchJD)",
]
_TORCH_BN = [
    "plain averaging",
    "plain, 4 micro-batches",
    "gradand backward (streaming, forward per env)",
    "baseline: forward+backward per env (DomainBed)",
]
_JAX_IMAGE = ["plain averaging", "gradand value_and_grad", "gradand factored"]
_TF = ["plain averaging", 'gradand combined_gradients(method="loop")', "gradand vectorized_statistics"]

#: The image models of issue 14, per framework: the workloads run here, whether memory is measured
#: (TensorFlow's needs a fresh interpreter per strategy: skipped, the test above covers it), and per
#: workload the strategies that must appear. Kept small: about 45 s together on 2 quiet CPUs.
IMAGE_CASES = {
    "torch": (
        "convnet,resnet-bn",
        True,
        {"convnet-4x16": _TORCH_IMAGE, "convnet-16x8": _TORCH_IMAGE, "resnet-bn": _TORCH_BN},
    ),
    "jax": ("resnet-bn", True, {"resnet-bn": _JAX_IMAGE}),  # the convnet: as the cnn, minus 10 s
    "tensorflow": ("convnet-4x16", False, {"convnet-4x16": [*_TF, "gradand factored_statistics"]}),
}

#: Strategies that a backend may refuse for BatchNorm in train mode (torch's vmap does; its factored
#: path did until it learnt per-environment batch statistics): each must be in the results or named
#: on stderr as refused, so that it appears by itself once the backend supports the model.
REFUSABLE = {
    ("torch", "resnet-bn"): [
        "gradand vmap_backward",
        "gradand vmap_backward(chunk_size=1)",
        "gradand factored_backward",
    ],
}


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(RUN), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _check_result(
    result: dict, framework: str, names: str, expected: dict[str, list[str]], memory: bool
) -> None:
    """The rows of a ``--quick`` run: every chosen workload, the expected strategies, sane numbers."""
    assert result["schema"] == bench.SCHEMA
    assert result["errors"] == [] and result["threads"] == 1 and result["quick"] is True
    assert math.isfinite(result["load_average_start"])
    assert framework in result["versions"] and "gradand" in result["versions"]
    assert result["command"].startswith("python benchmarks/run.py --quick")
    chosen = [w.name for w in select_workloads(names, quick=True)]
    assert sorted({r["workload"] for r in result["rows"]}) == sorted(chosen)
    for name in chosen:
        rows = [r for r in result["rows"] if r["workload"] == name]
        assert {r["framework"] for r in rows} == {framework}
        assert set(expected[name]) <= {r["strategy"] for r in rows}, name
        [base] = [r for r in rows if r["baseline"]]
        assert base["strategy"] == "plain averaging" and base["ratio"] == 1.0
        for r in rows:
            assert math.isfinite(r["ratio"]) and r["ratio"] > 0, r
            assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0, r
            assert len(r["times_ms"]) == result["rounds"] == 2
            assert r["threads"] == 1 and r["envs"] * r["examples_per_env"] > 0
            if not memory:
                assert r["extra_peak_mb"] is None and r["memory_method"] is None, r
                continue
            # torch: forked peak RSS; tensorflow: a fresh process's peak RSS; jax: XLA temporary
            # buffers; all relative to plain averaging
            assert math.isfinite(r["extra_peak_mb"]), r
            if r["baseline"]:
                assert r["extra_peak_mb"] == 0.0


@pytest.mark.parametrize("framework", list(CASES))
def test_quick_suite_reports_every_strategy_with_a_finite_positive_ratio(
    framework: str, tmp_path: Path
) -> None:
    if importlib.util.find_spec(framework) is None:
        pytest.skip(f"{framework} is not installed")
    names, expected = CASES[framework]
    proc = _run(["--quick", "--frameworks", framework, "--workloads", names, "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    chosen = [w.name for w in select_workloads(names, quick=True)]
    _check_result(result, framework, names, dict.fromkeys(chosen, expected), memory=True)
    table = (tmp_path / "bench.md").read_text()
    assert table.count(f"\n| {framework} |") == len(result["rows"])
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp")), "atomic writes leave no temporary files"


@pytest.mark.parametrize("framework", list(IMAGE_CASES))
def test_quick_image_models_run_every_strategy_their_backend_accepts(framework: str, tmp_path: Path) -> None:
    """The MNIST convnet and the BatchNorm ResNet: plain and gradand side by side; refusals named."""
    if importlib.util.find_spec(framework) is None:
        pytest.skip(f"{framework} is not installed")
    names, memory, expected = IMAGE_CASES[framework]
    args = ["--quick", "--frameworks", framework, "--workloads", names, "--out", str(tmp_path)]
    proc = _run(args + ["--no-memory"] * (not memory))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    _check_result(result, framework, names, expected, memory=memory)
    for (f, workload), labels in REFUSABLE.items():
        if f != framework:
            continue
        present = {r["strategy"] for r in result["rows"] if r["workload"] == workload}
        for label in labels:
            assert label in present or f"[{f}] {workload}: {label!r} refused (" in proc.stderr, label
    assert {r["model"]["model"] for r in result["rows"]} <= {"convnet", "resnet"}


#: Trainable parameters: the PyTorch examples' MNIST net (9216 -> 128 at 28 x 28; 576 -> 128 on the
#: quick 10 x 10 images) and ResNet-18 (11.17 M) at 1/4 width, the same in every framework.
PARAMETERS = {
    ("convnet-4x16", False): 1_199_882,
    ("convnet-4x16", True): 93_962,
    ("resnet-bn", True): 701_466,
}


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_image_models_have_the_same_parameters_in_every_framework(framework: str) -> None:
    if importlib.util.find_spec(framework) is None:
        pytest.skip(f"{framework} is not installed")
    mod = importlib.import_module({"torch": "_torch", "jax": "_jax", "tensorflow": "_tensorflow"}[framework])
    for (name, quick), count in PARAMETERS.items():
        w = workloads(quick)[name]
        if framework == "torch":
            n = sum(p.numel() for p in mod.model_for(w).parameters())
        elif framework == "jax":
            import jax

            n = sum(leaf.size for leaf in jax.tree.leaves(jax.eval_shape(lambda w=w: mod.init(w))))
        else:
            n = sum(int(v.numpy().size) for v in mod.model_for(w).trainable_variables)
        assert n == count, (name, quick)


def test_cuda_request_without_a_gpu_fails_clearly_and_writes_nothing(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = _run(["--device", "cuda", "--quick", "--frameworks", "torch", "--out", str(tmp_path / "gpu")])
    assert proc.returncode == bench.NO_CUDA
    assert "CUDA" in proc.stderr and "sees no CUDA device" in proc.stderr
    assert not (tmp_path / "gpu").exists()


def test_gpu_script_fails_clearly_without_a_gpu() -> None:
    if subprocess.run(["sh", "-c", "nvidia-smi -L"], capture_output=True).returncode == 0:
        pytest.skip("a GPU is present")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh")], capture_output=True, text=True)
    assert proc.returncode == bench.NO_CUDA and "no CUDA GPU" in proc.stderr


def test_unknown_workload_or_framework_is_rejected_with_the_name() -> None:
    with pytest.raises(SystemExit, match="'nope'"):
        select_workloads("mlp,nope", quick=True)
    proc = _run(["--quick", "--frameworks", "mxnet"])
    assert proc.returncode != 0 and "mxnet" in proc.stderr


def test_issue_workloads_have_the_specified_sizes() -> None:
    full = workloads(quick=False)
    assert (full["mlp"].envs, full["mlp"].examples, full["mlp"].hidden, full["mlp"].layers) == (
        16,
        256,
        256,
        3,
    )
    assert (full["cnn"].envs, full["cnn"].examples, full["cnn"].image) == (8, 32, 32)
    assert (full["per-example"].envs, full["per-example"].examples) == (128, 1)
    sweep = [w for name, w in full.items() if name.startswith("sweep-")]
    assert [w.envs for w in sweep] == [2, 4, 16, 64]
    assert {w.envs * w.examples for w in sweep} == {4096}
    convnets = [w for name, w in full.items() if name.startswith("convnet-")]
    assert [(w.name, w.envs, w.examples) for w in convnets] == [
        ("convnet-4x16", 4, 16),
        ("convnet-16x8", 16, 8),
    ]
    assert {(w.model, w.channels, w.image, w.hidden, w.classes) for w in convnets} == {
        ("convnet", 1, 28, 128, 10)
    }
    resnet = full["resnet-bn"]
    assert (resnet.model, resnet.envs, resnet.examples) == ("resnet", 4, 32)
    assert (resnet.channels, resnet.image, resnet.width, resnet.classes) == (3, 32, 16, 10)  # 1/4 width
    new = ["convnet-4x16", "convnet-16x8", "resnet-bn"]
    assert set(new) <= set(workloads(quick=True)), "--workloads names are the same in quick and full mode"
    for q in (False, True):
        assert [w.name for w in select_workloads("convnet", quick=q)] == ["convnet-4x16", "convnet-16x8"]
        assert [w.name for w in select_workloads("resnet-bn,convnet-16x8,convnet", quick=q)] == [
            "resnet-bn",
            "convnet-16x8",
            "convnet-4x16",
        ]


def test_interleaved_timing_pairs_rounds_and_gives_the_baseline_ratio_one() -> None:
    calls: list[str] = []
    steps = {"plain averaging": lambda: calls.append("a"), "other": lambda: calls.append("b")}
    out = time_interleaved(steps, lambda _: None, rounds=3, baseline="plain averaging", target_s=0.0)
    assert out["plain averaging"]["ratio"] == 1.0
    for r in out.values():
        assert len(r["times_ms"]) == 3 and r["steps_per_round"] >= 1
        assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
    assert calls.count("a") == 2 + 3 * out["plain averaging"]["steps_per_round"]


def test_markdown_has_one_table_row_per_result_row() -> None:
    row = {"framework": "torch", "workload": "mlp", "envs": 2, "examples_per_env": 3, "strategy": "s",
           "median_ms": 1.5, "ratio": 1.25, "extra_peak_mb": None}  # fmt: skip
    result = {"command": "python benchmarks/run.py", "started": "now", "load_average_start": 0.5,
              "threads": 1, "device": "cpu", "rounds": 2, "versions": {"torch": "x"},
              "machine": {"machine": "m", "cpu_count": 2, "platform": "p"},
              "rows": [row, row | {"extra_peak_mb": 3.25}], "errors": []}  # fmt: skip
    text = bench.markdown(result)
    assert "| torch | mlp (E=2×3) | s | 1.50 | 1.25 |  |" in text
    assert "| 1.25 | 3.2 |" in text and "load average at start 0.5" in text


def test_per_example_floor_script_reports_the_three_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    """The floor script runs (one round, two steps): it prints gradand's and the hand-written ratio."""
    pytest.importorskip("torch")
    floor = importlib.import_module("per_example_floor")
    floor.main(["--rounds", "1", "--steps", "2"])
    out = capsys.readouterr().out
    for label in ("plain averaging", "gradand factored", "hand-written floor", "Adam on zero gradients"):
        assert label in out
