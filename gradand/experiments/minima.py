"""How consistent are the minima that averaging, the AND-mask and the geometric mean reach?

The paper (§2) calls a minimum θ* consistent across environments when moving inside one
environment's ε-sublevel region changes no other environment's loss by much:

    I^ε(θ*) = max_{A ≠ B} max_{θ ∈ N^ε_{A,θ*}} |L_B(θ) − L_A(θ*)|

(:func:`gradand.consistency.empirical_inconsistency` estimates it from the per-environment
loss functions). Its theory predicts that the AND-mask, which only follows directions on
which the environments agree, reaches more consistent minima (lower I^ε) than averaging,
which can sew a minimum together from per-environment shortcuts.

This module measures it on the spirals task: after training, the per-environment training
losses (binary cross-entropy on each environment's full training set) are evaluated in
**numpy from the trained weights** (:meth:`Backend.dense_layers
<gradand.experiments.training.Backend.dense_layers>` exports the MLP's linear layers the
same way in every backend, so the measurement is one code path whatever trained the model,
in float64, with no framework dispatch per evaluation — the estimator evaluates the losses
thousands of times, one point at a time) and restricted to a random ``dims``-dimensional
subspace of parameter space through θ*: θ(z) = θ* + Σ_i z_i D_i. Each direction D_i is
Gaussian, rescaled layer by layer to the norm of that layer's trained parameters (weights
and bias together), so ``|z| = 1`` is a perturbation as large as the weights themselves in
every layer, whatever the minimum's scale (ReLU networks can be rescaled layer by layer
without changing their function, which makes raw parameter distances incomparable between
minima). The estimate is a lower bound (the probes are random); the methods are compared
with the same subspace seed, probe budget and ε.

The spread ``max_e L_e(θ*) − min_e L_e(θ*)`` is reported too: it is the part of I^ε that
needs no move at all (|L_B(θ*) − L_A(θ*)|).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from gradand.consistency import empirical_inconsistency
from gradand.experiments import spirals
from gradand.experiments._distribution import distribution, paired_difference
from gradand.experiments._parallel import run_many
from gradand.experiments._report import Check, Report, format_table
from gradand.experiments.training import Backend, get_backend

__all__ = [
    "METHODS",
    "PRESETS",
    "ProbeSetting",
    "mlp_logits",
    "run",
    "subspace_losses",
]

#: The methods compared (spirals methods; τ = 1 for the AND-mask and the geometric mean).
METHODS: tuple[str, ...] = ("mean", "and_mask", "geometric_mean")

_LEAKY_SLOPE = 0.01  # every backend's LeakyReLU


@dataclasses.dataclass(frozen=True)
class ProbeSetting:
    """How the inconsistency is probed: ε, subspace dimension, probes, points per probe, radius.

    Example:
        >>> from gradand.experiments.minima import ProbeSetting
        >>> ProbeSetting().epsilon, ProbeSetting().dims
        (0.1, 8)
        >>> ProbeSetting(dims=0)
        Traceback (most recent call last):
        ...
        ValueError: dims must be an integer >= 1; got 0
    """

    epsilon: float = 0.1
    dims: int = 8
    n_probes: int = 32
    n_steps: int = 4
    max_radius: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dims", "n_probes", "n_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {v!r}")
        for name in ("epsilon", "max_radius"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < np.inf:
                raise ValueError(f"{name} must be a finite number > 0; got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0; got {self.seed!r}")


#: Probe settings: ``default`` (ε = 0.1, a 4-dimensional subspace, 8 probe directions per
#: environment pair, out to half the weights' norm per layer) and ``quick`` (tests).
PRESETS: dict[str, ProbeSetting] = {
    "default": ProbeSetting(epsilon=0.1, dims=4, n_probes=8, n_steps=4, max_radius=0.5),
    "quick": ProbeSetting(epsilon=0.1, dims=2, n_probes=2, n_steps=2, max_radius=0.5),
}


def mlp_logits(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray, *, activation: str = "leaky_relu"
               ) -> np.ndarray:  # fmt: skip
    """The logits of an MLP given as ``[(W (in, out), b), ...]`` (LeakyReLU 0.01 or ReLU between layers).

    Example:
        >>> import numpy as np
        >>> from gradand.experiments.minima import mlp_logits
        >>> layers = [(np.array([[1.0, -1.0]]), np.zeros(2)), (np.array([[1.0], [1.0]]), np.zeros(1))]
        >>> mlp_logits(layers, np.array([[2.0], [-2.0]])).ravel().tolist()  # 2 - 0.02, -0.02 + 2
        [1.98, 1.98]
    """
    if activation not in ("leaky_relu", "relu"):
        raise ValueError(f"activation must be 'leaky_relu' or 'relu'; got {activation!r}")
    slope = _LEAKY_SLOPE if activation == "leaky_relu" else 0.0
    h = x
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = np.where(h > 0, h, slope * h)
    return h


def _bce(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mean binary cross-entropy over the last axis (logits (..., n), labels (..., n) in {0, 1})."""
    return np.mean(np.logaddexp(0.0, logits) - y * logits, axis=-1)


class _Losses:
    """The environments' losses at θ(z), one environment at a time or all at once (cached per point)."""

    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray, y: np.ndarray,
                 directions: np.ndarray, activation: str) -> None:  # fmt: skip
        self.shapes = [(w.shape, b.shape) for w, b in layers]
        self.theta = np.concatenate([np.concatenate([w.ravel(), b.ravel()]) for w, b in layers])
        self.x, self.y, self.directions, self.activation = x, y, directions, activation
        self.last: bytes | None = None
        self.all: tuple[bytes, np.ndarray] | None = None

    def layers(self, z: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        flat, out, i = self.theta + z @ self.directions, [], 0
        for ws, bs in self.shapes:
            nw, nb = int(np.prod(ws)), int(np.prod(bs))
            out.append((flat[i : i + nw].reshape(ws), flat[i + nw : i + nw + nb]))
            i += nw + nb
        return out

    def __call__(self, z: np.ndarray, env: int) -> float:
        key = np.asarray(z, dtype=np.float64).tobytes()
        if self.all is not None and self.all[0] == key:
            return float(self.all[1][env])
        layers = self.layers(np.asarray(z, dtype=np.float64))
        if key == self.last:  # a second environment at this point: evaluate them all in one pass
            logits = mlp_logits(layers, self.x, activation=self.activation)[..., 0]
            self.all = (key, _bce(logits, self.y))
            return float(self.all[1][env])
        self.last = key
        return float(_bce(mlp_logits(layers, self.x[env], activation=self.activation)[..., 0], self.y[env]))


def subspace_losses(
    layers: list[tuple[np.ndarray, np.ndarray]],
    train_x: np.ndarray,
    train_y: np.ndarray,
    *,
    dims: int = 8,
    seed: int = 0,
    activation: str = "leaky_relu",
) -> list[Callable[[np.ndarray], float]]:
    """Per-environment BCE losses ``L_e(z)`` of the MLP at θ* + Σ z_i D_i (the module docstring's D_i).

    Args:
        layers: the trained MLP, ``[(W (in, out), b (out,)), ...]`` with one output (a logit).
        train_x, train_y: (E, n, features) inputs and (E, n) labels in {0, 1}.
        dims: the subspace's dimension (≥ 1).
        seed: seed of the directions.
        activation: the MLP's activation.

    Returns:
        ``E`` callables of a ``(dims,)`` vector; ``z = 0`` is θ*.

    Example:
        >>> import numpy as np
        >>> from gradand.experiments.minima import subspace_losses
        >>> layers = [(np.array([[4.0], [0.0]]), np.zeros(1))]  # a linear model: logit = 4 x_0
        >>> x = np.array([[[1.0, 0.0]], [[-1.0, 0.0]]])  # two environments of one example each
        >>> losses = subspace_losses(layers, x, np.array([[1.0], [0.0]]), dims=3)
        >>> [round(f(np.zeros(3)), 4) for f in losses]  # log(1 + e^-4) in both
        [0.0181, 0.0181]
    """
    x = np.asarray(train_x, dtype=np.float64)
    y = np.asarray(train_y, dtype=np.float64)
    if x.ndim != 3 or y.shape != x.shape[:2] or x.shape[0] < 2:
        raise ValueError(
            f"train_x must be (E, n, features) and train_y (E, n) with E >= 2; got {x.shape} and {y.shape}"
        )
    if not layers or layers[-1][0].shape[1] != 1:
        raise ValueError("layers must be an MLP with one output (a logit)")
    ProbeSetting(dims=dims, seed=seed)  # validates dims and seed
    rng = np.random.default_rng(seed)
    blocks = []
    for w, b in layers:
        size = w.size + b.size
        d = rng.standard_normal((dims, size))
        norm = float(np.sqrt(np.sum(w**2) + np.sum(b**2)))
        blocks.append(d / np.linalg.norm(d, axis=1, keepdims=True) * norm)
    shared = _Losses(layers, x, y, np.concatenate(blocks, axis=1), activation)
    return [lambda z, e=e: shared(z, e) for e in range(x.shape[0])]


def _one_blas_thread() -> Any:
    """numpy's BLAS limited to one thread where threadpoolctl (scikit-learn's dependency) is installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - without the experiments extra
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _measure(layers: list[tuple[np.ndarray, np.ndarray]], data: spirals.SpiralsData, probe: ProbeSetting
             ) -> dict[str, Any]:  # fmt: skip
    """The inconsistency estimate, the environments' losses at θ* and their spread."""
    losses = subspace_losses(layers, data.train_x, data.train_y, dims=probe.dims, seed=probe.seed)
    z0 = np.zeros(probe.dims)
    with _one_blas_thread():  # thousands of small products: threads only contend (20x slower here)
        at_min = [f(z0) for f in losses]
        est = empirical_inconsistency(
            losses, z0, epsilon=probe.epsilon, n_probes=probe.n_probes, n_steps=probe.n_steps,
            max_radius=probe.max_radius, seed=probe.seed,
        )  # fmt: skip
    return {
        "inconsistency": est.value,
        "pair": list(est.pair),
        "radius": float(np.linalg.norm(est.point)),
        "env_losses": at_min,
        "spread": float(max(at_min) - min(at_min)),
        "train_loss": float(np.mean(at_min)),
    }


class _Keeping(Backend):
    """A backend that keeps the trainer it makes, so the trained model can be read afterwards."""

    def __init__(self, inner: Backend) -> None:
        self.inner, self.name, self.trainer_type, self.kept = inner, inner.name, inner.trainer_type, None

    def resolve_device(self, device: str) -> Any:
        return self.inner.resolve_device(device)

    def build(self, spec: Any, *, seed: int) -> Any:
        return self.inner.build(spec, seed=seed)

    def patchwork_gradient(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.patchwork_gradient(*args, **kwargs)

    def dense_layers(self, model: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        return self.inner.dense_layers(model)

    def trainer(self, model: Any, **options: Any) -> Any:
        self.kept = self.inner.trainer(model, **options)
        return self.kept


def _run_one(backend: str, setting: spirals.SpiralsSetting, train: spirals.TrainSetting, method: str,
             seed: int, device: str, probe: ProbeSetting) -> dict[str, Any]:  # fmt: skip
    """Train one (method, seed) with the spirals training function, then probe the minimum."""
    data, keeping = setting.make(seed), _Keeping(get_backend(backend))
    out = spirals._train(keeping, data, train, train.methods()[method], seed=seed, init_seed=seed,
                         device=device, show_progress=False, desc="")  # fmt: skip
    out["minimum"] = _measure(keeping.dense_layers(keeping.kept.model), data, probe)
    return out


def _cell(values: list[float], digits: int = 3) -> str:
    d = distribution(values)
    return f"{d.mean:.{digits}f}" + ("" if d.half_width is None else f" ± {d.half_width:.{digits}f}")


def run(
    setting: spirals.SpiralsSetting,
    train: spirals.TrainSetting,
    *,
    probe: ProbeSetting = ProbeSetting(),
    methods: tuple[str, ...] = METHODS,
    seeds: tuple[int, ...] = (0, 1, 2),
    backend: str = "torch",
    device: str = "cpu",
    show_progress: bool = True,
    preset_name: str = "custom",
    log: Any = None,
    jobs: int | None = 1,
    threads: int | None = None,
) -> Report:
    """Train each method on each seed, then estimate the inconsistency of the minimum reached.

    Per method: the test accuracy, the mean training loss, the spread of the environments'
    losses at θ* and the inconsistency estimate, each as a distribution over seeds (mean
    with a 95 % t interval); the paired difference of the inconsistency (averaging minus
    the method, same seeds) decides the claim.

    Example:
        >>> from gradand.experiments.minima import ProbeSetting, run
        >>> from gradand.experiments.sweep import preset
        >>> data, train, _ = preset("quick")
        >>> report = run(data, train, probe=ProbeSetting(dims=2, n_probes=2), methods=("mean", "and_mask"),
        ...              seeds=(0, 1), show_progress=False)
        >>> sorted(report.results["methods"]["mean"])
        ['inconsistency', 'spread', 'test', 'test_no_shortcuts', 'train', 'train_loss']
    """
    if backend not in spirals.TRAINERS:
        raise ValueError(f"backend must be one of {sorted(spirals.TRAINERS)}; got {backend!r}")
    if not methods or len(set(methods)) != len(methods) or any(m not in spirals.METHODS for m in methods):
        raise ValueError(
            f"methods must be distinct spirals methods ({list(spirals.METHODS)}); got {methods!r}"
        )
    if not seeds:
        raise ValueError("seeds must hold at least one seed; got none")
    runs = [(m, s) for s in seeds for m in methods]

    def line(run: tuple[str, int], out: dict[str, Any]) -> str:
        return (f"minima {run[0]} seed {run[1]}: test {out['final']['test']:.3f} "
                f"inconsistency {out['minimum']['inconsistency']:.4f} ({out['seconds']:.1f} s)")  # fmt: skip

    by, workers, threads = run_many(
        _run_one, runs, lambda run, inner: (backend, setting, train, run[0], run[1], device, probe),
        jobs=jobs, threads=threads, device=device, backend=backend, desc="minima runs",
        show_progress=show_progress, log=log, line=line,
    )  # fmt: skip
    per_method: dict[str, dict[str, Any]] = {}
    rows = []
    for m in methods:
        got = [by[(m, s)] for s in seeds]
        values = {k: [o["final"][k] for o in got] for k in ("train", "test", "test_no_shortcuts")}
        for k in ("inconsistency", "spread", "train_loss"):
            values[k] = [o["minimum"][k] for o in got]
        per_method[m] = {
            k: {**distribution(v, threshold=spirals.SUCCESS).to_json()} for k, v in values.items()
        }
        rows.append([m, _cell(values["test"]), f"{per_method[m]['test']['successes']}/{len(seeds)}",
                     _cell(values["train_loss"], 4), _cell(values["spread"], 4),
                     _cell(values["inconsistency"], 4)])  # fmt: skip
    table = format_table(
        [
            "method",
            "test acc",
            f"test >= {spirals.SUCCESS}",
            "train loss",
            "loss spread",
            f"I^ε (ε={probe.epsilon})",
        ],
        rows,
    )
    checks = []
    if "mean" in per_method and len(seeds) >= 2:
        base = per_method["mean"]["inconsistency"]["values"]
        for m in methods:
            if m == "mean":
                continue
            d = paired_difference(base, per_method[m]["inconsistency"]["values"])
            low, high = d.low, d.high
            checks.append(Check(
                f"{m} reaches more consistent minima than averaging (§2): inconsistency of averaging minus "
                f"{m}, paired by seed, {d.mean:+.4f} [{low:+.4f}, {high:+.4f}] (95% t interval above 0; "
                f"sign-flip p = {d.p_value:.3f})",
                low > 0,
                {"difference": d.mean, "low": low, "high": high, "p_value": d.p_value},
            ))  # fmt: skip

    def draw(plt: Any) -> Any:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for k, m in enumerate(methods):
            inc = per_method[m]["inconsistency"]["values"]
            test = per_method[m]["test"]["values"]
            ax1.scatter(inc, test, label=m, color=f"C{k}", alpha=0.7)
            ax2.scatter(k + np.linspace(-0.15, 0.15, len(inc)), inc, color=f"C{k}", alpha=0.7)
            d = distribution(inc)
            if d.low is not None:
                ax2.errorbar(k + 0.3, d.mean, yerr=[[d.mean - d.low], [d.high - d.mean]], color="k",
                             capsize=4,
                             fmt="_")  # fmt: skip
        ax1.set_xlabel(f"inconsistency I^ε (ε={probe.epsilon}, {probe.dims}-dim random subspace)")
        ax1.set_ylabel("test accuracy")
        ax1.set_xscale("symlog", linthresh=1e-3)
        ax1.legend(fontsize=8)
        ax2.set_xticks(range(len(methods)), methods)
        ax2.set_yscale("symlog", linthresh=1e-3)
        ax2.set_ylabel("inconsistency per seed; mean and 95% interval")
        fig.suptitle(f"consistency of the minima (spirals {preset_name}), {len(seeds)} seed(s)")
        fig.tight_layout()
        return fig

    config = {
        "preset": preset_name,
        "data": dataclasses.asdict(setting),
        "train": dataclasses.asdict(train),
        "probe": dataclasses.asdict(probe),
        "methods": list(methods),
        "seeds": list(seeds),
        "backend": backend,
        "device": device,
        "workers": workers,
        "threads_per_worker": threads,
    }
    results = {
        "methods": per_method,
        "runs": [{"method": m, "seed": s, **by[(m, s)]["minimum"]} for m, s in runs],
    }
    notes = ["the inconsistency is a lower bound from random probes in a random subspace; compare methods, "
             "not absolute values"]  # fmt: skip
    return Report("minima", config, results, checks, table, draw, notes)
