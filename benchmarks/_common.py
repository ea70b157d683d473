"""Workloads, data and the interleaved timing loop shared by every framework's benchmark."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

import numpy as np

import gradand

#: The combiner every gradand strategy and baseline uses (the paper's default threshold).
COMBINER = gradand.AndMask(threshold=1.0)


@dataclass(frozen=True)
class Workload:
    """One benchmark workload: a model family and the shape of one training step's batch.

    ``model`` is one of

    - ``"mlp"``: ``inputs`` features -> ``layers`` x ``hidden`` ReLU -> 1 logit, binary
      cross-entropy;
    - ``"cnn"``: ``channels`` x ``image`` x ``image`` -> conv 16 -> pool -> conv 32 -> pool ->
      ``classes`` logits, cross-entropy;
    - ``"convnet"``: the PyTorch examples' MNIST net without dropout: ``channels`` x ``image``
      x ``image`` (1 x 28 x 28) -> conv 32 3x3 (no padding) -> ReLU -> conv 64 3x3 -> ReLU ->
      max-pool 2 -> flatten (64 x 12 x 12 = 9216 at 28 x 28) -> dense ``hidden`` (128) ->
      ReLU -> dense ``classes``, cross-entropy;
    - ``"resnet"``: a ResNet-18-style net with BatchNorm in train mode (batch statistics) at
      ``width`` / 64 of ResNet-18's width: ``channels`` x ``image`` x ``image`` -> conv 3x3
      ``width`` + BN + ReLU -> 4 stages of 2 BasicBlocks (conv 3x3-BN-ReLU-conv 3x3-BN plus
      the shortcut: identity, or a 1x1 conv + BN where the stride or width changes) of
      ``width`` x 1, 2, 4, 8 channels, stride 2 at stages 2-4 -> global average pool -> dense
      ``classes``, cross-entropy. BatchNorm's batch statistics are over the whole batch in the
      plain step and over each environment's examples in gradand's per-environment passes.

    The batch is ``envs`` environments of ``examples`` examples each (images NCHW, see
    :func:`data`).
    """

    name: str
    model: str
    envs: int
    examples: int
    hidden: int = 256
    layers: int = 3
    inputs: int = 6  # 2 spiral + 4 shortcut dimensions
    image: int = 32
    channels: int = 3  # image models' input channels
    width: int = 16  # resnet: the stem's and first stage's channels (ResNet-18: 64)
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
        # the same architectures on smaller images (convnet: 64 x 3 x 3 after the pool) and batches
        convnet = {"image": 10, "channels": 1, "hidden": 128}
        out += [
            Workload("convnet-4x16", "convnet", 4, 2, **convnet),
            Workload("convnet-16x8", "convnet", 16, 1, **convnet),
            Workload("resnet-bn", "resnet", 4, 4, image=8),
        ]
    else:
        out = [
            Workload("mlp", "mlp", 16, 256),
            Workload("cnn", "cnn", 8, 32),
            Workload("per-example", "mlp", 128, 1),
        ]
        out += [Workload(f"sweep-E{e}", "mlp", e, 4096 // e) for e in (2, 4, 16, 64)]
        convnet = {"image": 28, "channels": 1, "hidden": 128}
        out += [
            Workload("convnet-4x16", "convnet", 4, 16, **convnet),
            Workload("convnet-16x8", "convnet", 16, 8, **convnet),
            Workload("resnet-bn", "resnet", 4, 32, image=32, width=16),  # ResNet-18 at 1/4 width
        ]
    return {w.name: w for w in out}


#: ``--workloads`` names that select every workload named ``<group>-*``.
GROUPS = ("sweep", "convnet")


def select_workloads(names: str | None, quick: bool) -> list[Workload]:
    """``--workloads``: comma-separated names; ``sweep`` selects every ``sweep-E*``, ``convnet`` every
    ``convnet-*``."""
    available = workloads(quick)
    if not names:
        return list(available.values())
    chosen: list[Workload] = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        matches = [
            w for k, w in available.items() if k == name or (name in GROUPS and k.startswith(f"{name}-"))
        ]
        if not matches:
            raise SystemExit(
                f"--workloads: unknown workload {name!r}; expected some of {sorted(available)} or "
                f"{' or '.join(map(repr, GROUPS))}"
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
        x = rng.standard_normal((w.envs, w.examples, w.channels, w.image, w.image)).astype(np.float32)
        y = rng.integers(0, w.classes, (w.envs, w.examples)).astype(np.int64)
    return x, y


T = TypeVar("T")


def accepted(
    framework: str, w: Workload, steps: dict[str, T], trial: Callable[[str, T], object]
) -> dict[str, T]:
    """The strategies whose backend takes the workload's model: each gradand strategy is tried once.

    ``trial(name, step)`` runs (or traces) one step; a gradand strategy (label starting with
    ``"gradand"``) that raises ``ValueError`` there is refused by its backend (e.g. BatchNorm in
    train mode under ``vmap`` or on the factored path): it is left out, with a line on stderr
    naming it, so the row appears by itself once the backend supports the model.
    """
    out = {}
    for name, step in steps.items():
        if name.startswith("gradand"):
            try:
                trial(name, step)
            except ValueError as exc:
                print(f"[{framework}] {w.name}: {name!r} refused ({_first_sentence(exc)}); left out",
                      file=sys.stderr, flush=True)  # fmt: skip
                continue
        out[name] = step
    return out


def _first_sentence(exc: Exception) -> str:
    """The error's own message (also inside ``tf.function``'s "in user code: ..." wrapper), one sentence."""
    text = str(exc).rsplit("ValueError: ", 1)[-1].strip()
    return text.split(". ")[0].splitlines()[0] if text else type(exc).__name__


def time_interleaved(
    steps: dict[str, Callable[[], object]],
    sync: Callable[[object], None],
    *,
    rounds: int,
    baseline: str,
    target_s: float = 0.05,
    seed: int = 0,
    group: Callable[[str], str] | None = None,
) -> dict[str, dict]:
    """Median seconds per step of each strategy, timed in interleaved rounds in a random order per round.

    Each strategy runs twice untimed (compile, warm-up); then every round times every
    strategy once over ``steps_per_round`` consecutive steps (chosen so a round lasts about
    ``target_s`` per strategy). The ratio is the median over rounds of the strategy's time
    divided by the same round's ``baseline`` time (paired, so load that changes between
    rounds cancels). ``group(name)``: strategies with the same group run the same number of
    steps per round (the fewest of theirs), so that two revisions of one strategy are timed
    alike: consecutive steps overlap dispatch with the previous step's work (JAX, TensorFlow),
    so a round of 1 step costs more per step than a round of 2.
    """
    reps: dict[str, int] = {}
    for name, step in steps.items():
        sync(step())
        start = time.perf_counter()
        sync(step())
        reps[name] = max(1, min(20, int(target_s / max(time.perf_counter() - start, 1e-6))))
    if group is not None:
        fewest: dict[str, int] = {}
        for name, n in reps.items():
            fewest[group(name)] = min(n, fewest.get(group(name), n))
        reps = {name: fewest[group(name)] for name in reps}
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
