"""Workloads, data and the interleaved timing loop shared by every framework's benchmark."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

import gradand

#: The combiner every gradand strategy and baseline uses (the paper's default threshold).
COMBINER = gradand.AndMask(threshold=1.0)


@dataclass(frozen=True)
class Workload:
    """One benchmark workload: a model family and the shape of one training step's batch.

    ``model`` is ``"mlp"`` (``inputs`` features -> ``layers`` x ``hidden`` ReLU -> 1 logit,
    binary cross-entropy) or ``"cnn"`` (3 x ``image`` x ``image`` -> conv 16 -> pool ->
    conv 32 -> pool -> ``classes`` logits, cross-entropy). The batch is ``envs``
    environments of ``examples`` examples each.
    """

    name: str
    model: str
    envs: int
    examples: int
    hidden: int = 256
    layers: int = 3
    inputs: int = 6  # 2 spiral + 4 shortcut dimensions
    image: int = 32
    classes: int = 10

    def as_dict(self) -> dict:
        return asdict(self)


def workloads(quick: bool) -> dict[str, Workload]:
    """The workloads by name: full sizes, or tiny ones for ``--quick``."""
    if quick:
        mlp = {"hidden": 32, "layers": 2}
        out = [
            Workload("mlp", "mlp", 4, 16, **mlp),
            Workload("cnn", "cnn", 2, 4, image=8),
            Workload("per-example", "mlp", 8, 1, **mlp),
        ]
        out += [Workload(f"sweep-E{e}", "mlp", e, 64 // e, **mlp) for e in (2, 4)]
    else:
        out = [
            Workload("mlp", "mlp", 16, 256),
            Workload("cnn", "cnn", 8, 32),
            Workload("per-example", "mlp", 128, 1),
        ]
        out += [Workload(f"sweep-E{e}", "mlp", e, 4096 // e) for e in (2, 4, 16, 64)]
    return {w.name: w for w in out}


def select_workloads(names: str | None, quick: bool) -> list[Workload]:
    """``--workloads``: comma-separated names; ``sweep`` selects every ``sweep-E*``."""
    available = workloads(quick)
    if not names:
        return list(available.values())
    chosen: list[Workload] = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        matches = [
            w for k, w in available.items() if k == name or (name == "sweep" and k.startswith("sweep-"))
        ]
        if not matches:
            raise SystemExit(
                f"--workloads: unknown workload {name!r}; expected some of {sorted(available)} or 'sweep'"
            )
        chosen += [w for w in matches if w not in chosen]
    return chosen


def data(w: Workload, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random inputs and targets, environments on axis 0: ``(E, n, ...)`` (images NCHW)."""
    rng = np.random.default_rng(seed)
    if w.model == "mlp":
        x = rng.standard_normal((w.envs, w.examples, w.inputs)).astype(np.float32)
        y = rng.integers(0, 2, (w.envs, w.examples, 1)).astype(np.float32)
    else:
        x = rng.standard_normal((w.envs, w.examples, 3, w.image, w.image)).astype(np.float32)
        y = rng.integers(0, w.classes, (w.envs, w.examples)).astype(np.int64)
    return x, y


def time_interleaved(
    steps: dict[str, Callable[[], object]],
    sync: Callable[[object], None],
    *,
    rounds: int,
    baseline: str,
    target_s: float = 0.05,
    seed: int = 0,
) -> dict[str, dict]:
    """Median seconds per step of each strategy, timed in interleaved rounds in a random order per round.

    Each strategy runs twice untimed (compile, warm-up); then every round times every
    strategy once over ``steps_per_round`` consecutive steps (chosen so a round lasts about
    ``target_s`` per strategy). The ratio is the median over rounds of the strategy's time
    divided by the same round's ``baseline`` time (paired, so load that changes between
    rounds cancels).
    """
    reps: dict[str, int] = {}
    for name, step in steps.items():
        sync(step())
        start = time.perf_counter()
        sync(step())
        reps[name] = max(1, min(20, int(target_s / max(time.perf_counter() - start, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in steps}
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        for name in rng.permutation(list(steps)):
            start = time.perf_counter()
            for _ in range(reps[name]):
                out = steps[name]()
            sync(out)
            times[name].append((time.perf_counter() - start) / reps[name])
    result = {}
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times[baseline])]
        result[name] = {
            "median_ms": 1e3 * statistics.median(ts),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "steps_per_round": reps[name],
            "times_ms": [1e3 * t for t in ts],
        }
    return result


def peak_rss_of(step: Callable[[], object], steps: int) -> float:
    """Peak resident memory in bytes while running ``step`` ``steps`` times.

    On Linux the process's peak is reset first (``/proc/self/clear_refs``) and read
    from ``VmHWM``, so imports, tracing and earlier work do not hide the steps' own
    peak; elsewhere, the process's lifetime peak (``ru_maxrss``).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        reset = False
    else:
        reset = True
    for _ in range(steps):
        step()
    if reset:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)
