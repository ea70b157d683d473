"""Where does the AND-mask stop working? Success rates on the spirals task over a grid of settings.

The spirals task (:mod:`gradand.experiments.spirals`) is swept along three axes, one at a
time, the others at the base setting: the number of training environments, the number of
shortcut dimensions, and the shortcut vectors' scale. Every cell trains plain averaging, the
AND-mask at τ = 1 and at a lower τ, the geometric mean and the SAND-mask on the same seeds,
and reports per method the success rate (test accuracy ≥
:data:`~gradand.experiments.spirals.SUCCESS`, the spirals claims' definition) with its 95 %
Wilson interval, and the mean test accuracy with its 95 % t interval.

**Examples per environment are fixed** (the base setting's, 256 in the default preset), so
a cell with more environments has more data. That keeps what each environment's sign vote
is computed from — one batch of the same size, with the same gradient noise — the same in
every cell, so the curves change only the number of voters. With the total fixed instead, 64
environments would hold 64 examples each and a vote would be four times noisier: "more
environments" and "smaller environments" would be confounded. The cost of a cell grows with
the number of environments.

The lower τ is :data:`LOW_THRESHOLD` (0.5): the AND-mask then needs ⌈E/2⌉ net agreeing
votes (:func:`gradand.required_votes`), fewer than E for every E ≥ 2. With E = 2 it keeps a
component only when both environments agree, or one of them is exactly 0 — in practice
τ = 1.

Each run is :func:`gradand.experiments.spirals.run`'s run (the same training function,
data generator and evaluation); only the grid and the summary are new here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from gradand.experiments import spirals
from gradand.experiments._distribution import Distribution, distribution
from gradand.experiments._parallel import run_many
from gradand.experiments._report import Check, Report, format_table

__all__ = ["AXES", "LOW_THRESHOLD", "METHODS", "PRESETS", "SweepGrid", "cells", "preset", "run"]

#: τ of the second AND-mask (``and_mask_low``).
LOW_THRESHOLD: float = 0.5

#: Method → (the spirals method it trains, the τ it trains with; ``None``: the spirals default).
METHODS: dict[str, tuple[str, float | None]] = {
    "mean": ("mean", None),
    "and_mask": ("and_mask", 1.0),
    "and_mask_low": ("and_mask", LOW_THRESHOLD),
    "geometric_mean": ("geometric_mean", 1.0),
    "sand_mask": ("sand_mask", None),
}

#: The swept parameters of :class:`~gradand.experiments.spirals.SpiralsSetting`, in plot order.
AXES: tuple[str, ...] = ("n_envs", "shortcut_dims", "shortcut_scale")


@dataclasses.dataclass(frozen=True)
class SweepGrid:
    """The values of each axis; every other parameter stays at the base setting's value.

    Example:
        >>> from gradand.experiments.sweep import SweepGrid
        >>> SweepGrid(n_envs=(2, 4), shortcut_dims=(), shortcut_scale=()).n_envs
        (2, 4)
        >>> SweepGrid(n_envs=(0,))
        Traceback (most recent call last):
        ...
        ValueError: n_envs values must be integers >= 1; got (0,)
    """

    n_envs: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    shortcut_dims: tuple[int, ...] = (0, 2, 8, 32)
    shortcut_scale: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0)

    def __post_init__(self) -> None:
        for name, minimum in (("n_envs", 1), ("shortcut_dims", 0)):
            values = getattr(self, name)
            if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= minimum
                       for v in values):  # fmt: skip
                raise ValueError(f"{name} values must be integers >= {minimum}; got {values!r}")
        scales = self.shortcut_scale
        if not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < np.inf for v in scales
        ):
            raise ValueError(f"shortcut_scale values must be finite numbers >= 0; got {scales!r}")
        for name in AXES:
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} values must not repeat; got {values!r}")


#: Presets: ``default`` sweeps around the spirals ``quick`` preset's data and training (16
#: environments × 256 examples, 8 shortcut dimensions, one spiral revolution; a 3 × 64 MLP,
#: 60 epochs) — smaller than the reference (3 × 256, 150 epochs, 3 revolutions) so that the
#: grid finishes in minutes; ``quick`` is a tiny version for tests and smoke runs (seconds).
PRESETS: dict[str, tuple[spirals.SpiralsSetting, spirals.TrainSetting, SweepGrid]] = {
    "default": (
        spirals.preset("quick")[0],
        dataclasses.replace(spirals.preset("quick")[1], eval_every=60),
        SweepGrid(),
    ),
    "quick": (
        spirals.SpiralsSetting(n_envs=4, examples_per_env=16, n_test=32, shortcut_dims=2, revolutions=1.0),
        spirals.TrainSetting(hidden_units=8, hidden_layers=1, epochs=2, batch_size=8, eval_every=2),
        SweepGrid(n_envs=(2, 4), shortcut_dims=(0, 2), shortcut_scale=(1.0,)),
    ),
}


def preset(name: str) -> tuple[spirals.SpiralsSetting, spirals.TrainSetting, SweepGrid]:
    """The (data, training, grid) of a named preset.

    Example:
        >>> from gradand.experiments.sweep import preset
        >>> data, train, grid = preset("default")
        >>> data.n_envs, data.examples_per_env, train.hidden_units, train.epochs, grid.n_envs
        (16, 256, 64, 60, (2, 4, 8, 16, 32, 64))
    """
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {name!r}")
    return PRESETS[name]


def cells(data: spirals.SpiralsSetting, grid: SweepGrid) -> list[tuple[str, Any, spirals.SpiralsSetting]]:
    """``(axis, value, data setting)`` of every cell; the base setting is one cell, shared by the axes.

    Example:
        >>> from gradand.experiments.spirals import SpiralsSetting
        >>> from gradand.experiments.sweep import SweepGrid, cells
        >>> grid = SweepGrid(n_envs=(4, 16), shortcut_dims=(8, 32), shortcut_scale=())
        >>> [(axis, value) for axis, value, _ in cells(SpiralsSetting(), grid)]
        [('n_envs', 4), ('n_envs', 16), ('shortcut_dims', 32)]
    """
    out: list[tuple[str, Any, spirals.SpiralsSetting]] = []
    seen: set[spirals.SpiralsSetting] = set()
    for axis in AXES:
        for value in getattr(grid, axis):
            setting = dataclasses.replace(data, **{axis: value})
            if setting not in seen:
                seen.add(setting)
                out.append((axis, value, setting))
    return out


def _trained_by(method: str, train: spirals.TrainSetting) -> tuple[str, spirals.TrainSetting]:
    name, threshold = METHODS[method]
    return name, train if threshold is None else dataclasses.replace(train, threshold=threshold)


def _cell_of(data: spirals.SpiralsSetting, axis: str, value: Any) -> spirals.SpiralsSetting:
    return dataclasses.replace(data, **{axis: value})


def _checks(table: dict[spirals.SpiralsSetting, dict[str, Distribution]], data: spirals.SpiralsSetting,
            grid: SweepGrid) -> list[Check]:  # fmt: skip
    """The claims, decided on success rates (95 % Wilson intervals) where their cells were run."""
    checks = []
    base = table.get(data, {})
    if "mean" in base and "and_mask" in base:
        a, m = base["and_mask"], base["mean"]
        checks.append(
            Check(
                f"at the base setting ({data.n_envs} environments, {data.shortcut_dims} shortcut dims), the "
                f"AND-mask (τ=1) succeeds more often than averaging: {a.successes}/{a.n} "
                f"[{a.success_low:.2f}, {a.success_high:.2f}] vs {m.successes}/{m.n} "
                f"[{m.success_low:.2f}, {m.success_high:.2f}] (95% Wilson intervals disjoint)",
                a.success_low > m.success_high,
                {"and_mask": a.to_json(), "mean": m.to_json()},
            )
        )
    if 0 in grid.shortcut_dims and "mean" in table.get(_cell_of(data, "shortcut_dims", 0), {}):
        m = table[_cell_of(data, "shortcut_dims", 0)]["mean"]
        checks.append(
            Check(
                f"control: without shortcut dimensions, averaging learns the spirals (success rate's 95% "
                f"Wilson interval above 0.5: {m.successes}/{m.n} "
                f"[{m.success_low:.2f}, {m.success_high:.2f}])",
                m.success_low > 0.5,
                {"mean": m.to_json()},
            )
        )
    envs = sorted(grid.n_envs)
    if len(envs) >= 2:
        lo_cell, hi_cell = (table.get(_cell_of(data, "n_envs", e), {}) for e in (envs[0], envs[-1]))
        if "mean" in lo_cell and "mean" in hi_cell:
            lo, hi = lo_cell["mean"], hi_cell["mean"]
            checks.append(
                Check(
                    f"averaging ignores the shortcuts more often with more environments (App. B): success "
                    f"at {envs[-1]} environments {hi.successes}/{hi.n} [{hi.success_low:.2f}, "
                    f"{hi.success_high:.2f}] above {envs[0]}: {lo.successes}/{lo.n} "
                    f"[{lo.success_low:.2f}, {lo.success_high:.2f}] (95% Wilson intervals disjoint)",
                    hi.success_low > lo.success_high,
                    {f"mean_{envs[0]}": lo.to_json(), f"mean_{envs[-1]}": hi.to_json()},
                )
            )
    return checks


def run(
    data: spirals.SpiralsSetting,
    train: spirals.TrainSetting,
    grid: SweepGrid,
    *,
    methods: tuple[str, ...] = tuple(METHODS),
    seeds: tuple[int, ...] = (0, 1, 2),
    backend: str = "torch",
    device: str = "cpu",
    show_progress: bool = True,
    preset_name: str = "custom",
    log: Any = None,
    jobs: int | None = 1,
    threads: int | None = None,
) -> Report:
    """Train every method on every seed of every cell; success rates and test accuracies as distributions.

    Seed ``s`` generates a cell's data and initialises the model and the batches (gradand's
    generator), the same for every method of that cell. The runs are independent:
    ``jobs`` worker processes with ``threads`` threads each, as in
    :func:`gradand.experiments.spirals.run` (the cells with the most environments start first).

    Example:
        >>> from gradand.experiments.sweep import preset, run
        >>> data, train, grid = preset("quick")
        >>> report = run(data, train, grid, methods=("mean", "and_mask"), seeds=(0,), show_progress=False)
        >>> [c["axis"] for c in report.results["cells"]]
        ['n_envs', 'n_envs', 'shortcut_dims']
        >>> sorted(report.results["cells"][0]["methods"]["and_mask"])
        ['seconds', 'survivor_fraction', 'test', 'test_no_shortcuts', 'train']
    """
    if backend not in spirals.TRAINERS:
        raise ValueError(f"backend must be one of {sorted(spirals.TRAINERS)}; got {backend!r}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods or len(set(methods)) != len(methods):
        raise ValueError(
            f"methods must be a non-empty subset of {list(METHODS)} without repeats; got {methods!r}"
        )
    if not seeds:
        raise ValueError("seeds must hold at least one seed; got none")
    grid_cells = cells(data, grid)
    if not grid_cells:
        raise ValueError("grid must hold at least one value on one axis; got none")
    runs = [(c, m, s) for c in range(len(grid_cells)) for m in methods for s in seeds]

    def line(run: tuple[int, str, int], out: dict[str, Any]) -> str:
        axis, value, _ = grid_cells[run[0]]
        test, seconds = out["final"]["test"], out["seconds"]
        return f"sweep {axis}={value} {run[1]} seed {run[2]}: test {test:.3f} ({seconds:.1f} s)"

    def job(run: tuple[int, str, int], inner: bool) -> tuple[Any, ...]:
        name, method_train = _trained_by(run[1], train)
        return (backend, grid_cells[run[0]][2], method_train, name, run[2], device, False)

    by_run, workers, threads = run_many(
        spirals._run_one, runs, job, jobs=jobs, threads=threads, device=device, backend=backend,
        desc="sweep runs", show_progress=show_progress, log=log, line=line,
        first=lambda run: -grid_cells[run[0]][2].n_envs,  # the most environments first
    )  # fmt: skip
    keys = ("train", "test", "test_no_shortcuts")
    results, table, rows = [], {}, []
    for c, (axis, value, setting) in enumerate(grid_cells):
        per_method, dists = {}, {}
        for m in methods:
            outs_m = [by_run[(c, m, s)] for s in seeds]
            d = {k: distribution([o["final"][k] for o in outs_m], threshold=spirals.SUCCESS) for k in keys}
            dists[m] = d["test"]
            per_method[m] = {
                **{k: v.to_json() for k, v in d.items()},
                "survivor_fraction": [o["survivor_fraction"] for o in outs_m],
                "seconds": [o["seconds"] for o in outs_m],
            }
        table[setting] = dists
        results.append(
            {"axis": axis, "value": value, "data": dataclasses.asdict(setting), "methods": per_method}
        )
        rows.append([axis, value] + [f"{d.successes}/{d.n} {d.mean:.2f}" for d in dists.values()])
    text = format_table(["axis", "value", *methods], rows)
    text += f"\n(per method: runs with test >= {spirals.SUCCESS} / runs, then the mean test accuracy)"

    def draw(plt: Any) -> Any:
        fig, axes = plt.subplots(1, len(AXES), figsize=(5 * len(AXES), 4.2), squeeze=False)
        for ax, axis in zip(axes[0], AXES):
            points = [(value, c) for c, (a, value, _) in enumerate(grid_cells) if a == axis]
            base_value = getattr(data, axis)
            base_cell = [c for c, g in enumerate(grid_cells) if g[2] == data]
            if base_cell and base_value not in [v for v, _ in points]:
                points.append((base_value, base_cell[0]))
            if not points:
                ax.set_visible(False)
                continue
            points.sort()
            xs = np.array([v for v, _ in points], dtype=float)
            for k, m in enumerate(methods):
                ds = [table[grid_cells[c][2]][m] for _, c in points]
                rate = np.array([d.success_rate for d in ds])
                low, high = np.array([d.success_low for d in ds]), np.array([d.success_high for d in ds])
                offset = 0.04 * (k - (len(methods) - 1) / 2)  # methods side by side, not on top
                x = xs + 2 * offset if axis == "shortcut_dims" else xs * 2**offset
                ax.errorbar(x, rate, yerr=[rate - low, high - rate], marker="o", capsize=3, label=m)
            if axis != "shortcut_dims":
                ax.set_xscale("log", base=2)
            ax.set_xlabel(axis.replace("_", " ") + f" (base {base_value})")
            ax.set_ylim(-0.03, 1.03)
            ax.set_ylabel(f"success rate (test >= {spirals.SUCCESS}), 95% Wilson")
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"spirals sweep ({preset_name}), {len(seeds)} seed(s) per cell")
        fig.tight_layout()
        return fig

    config = {
        "preset": preset_name,
        "data": dataclasses.asdict(data),
        "train": dataclasses.asdict(train),
        "grid": dataclasses.asdict(grid),
        "methods": {m: {"trains": METHODS[m][0], "threshold": METHODS[m][1]} for m in methods},
        "examples_per_env": "fixed",
        "seeds": list(seeds),
        "success_threshold": spirals.SUCCESS,
        "backend": backend,
        "device": device,
        "workers": workers,
        "threads_per_worker": threads,
    }
    notes = [f"examples per environment fixed at {data.examples_per_env}: more environments, more data"]
    return Report("sweep", config, {"cells": results}, _checks(table, data, grid), text, draw, notes)
