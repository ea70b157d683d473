"""The ``gradand`` command line: reproduce the paper's experiments.

    gradand reproduce patchwork       # the notebook's linear regression (numpy only; seconds)
    gradand reproduce spirals         # the synthetic task of §3 / App. B (PyTorch)
    gradand reproduce memorization    # random labels, one environment per example (PyTorch)
    gradand reproduce consistency     # the consistency-of-minima landscapes (numpy)

Every command prints a summary table and the paper's claims checked on the
measured numbers, writes ``DIR/<experiment>.json`` atomically (an existing
result is kept unless ``--force``) and a PNG plot (with matplotlib).
``--quick`` runs a small version in seconds. Bad arguments get a one-line
error and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["CLIError", "build_parser", "main"]

#: ``--backend`` value → (importable module, what to install).
FRAMEWORKS: dict[str, tuple[str | None, str]] = {
    "numpy": (None, "numpy"),
    "torch": ("torch", "pip install 'gradand[torch]'"),
    "jax": ("jax", "pip install 'gradand[jax]'"),
    "tensorflow": ("tensorflow", "pip install 'gradand[tensorflow]'"),
}

#: Experiment → (backends it runs on, default backend, default number of seeds).
EXPERIMENTS: dict[str, tuple[tuple[str, ...], str, int]] = {
    "patchwork": (("numpy", "torch", "jax", "tensorflow"), "numpy", 1),
    "spirals": (("torch", "jax", "tensorflow"), "torch", 3),
    "memorization": (("torch", "jax", "tensorflow"), "torch", 1),
    "consistency": (("numpy",), "numpy", 3),
}


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors raise :class:`CLIError` (one line, no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(message)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _parse_seeds(text: str) -> tuple[int, ...]:
    """``"3"`` → seeds 0, 1, 2; ``"0,5,9"`` → those seeds."""
    bad = CLIError(
        f"--seeds {text!r}: expected a count (e.g. 3 for seeds 0,1,2) or a comma-separated list of "
        f"seeds (e.g. 0,5,9), all integers >= 0"
    )
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise bad from None
    if len(values) == 1:
        if values[0] < 1:
            raise CLIError(f"--seeds {text!r}: the number of seeds must be >= 1")
        return tuple(range(values[0]))
    if any(v < 0 for v in values):
        raise bad
    if len(set(values)) != len(values):
        raise CLIError(f"--seeds {text!r}: a seed appears twice")
    return tuple(values)


def _parse_threshold(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CLIError(f"{option} {text!r}: τ must be a number in [0, 1]") from None
    if not 0.0 <= value <= 1.0:
        raise CLIError(
            f"{option} {text}: τ is out of range; it must be in [0, 1] (the fraction of environments "
            f"that must agree in sign)"
        )
    return value


def _positive_int(option: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{value} must be >= 1")
        return value

    parse.__name__ = option
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number > 0")
    return value


def _common_options() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    g = common.add_argument_group("common options")
    g.add_argument(
        "--backend",
        choices=sorted(FRAMEWORKS),
        help="framework that trains (default: numpy for patchwork/consistency, torch otherwise)",
    )
    g.add_argument(
        "--seeds",
        help="a count (3 = seeds 0,1,2) or a comma-separated list (0,5,9); "
        "default: 3 for spirals/consistency (1 for spirals --quick), 1 otherwise",
    )
    g.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N (torch, jax, tensorflow)")
    g.add_argument(
        "--out", default="gradand-results", metavar="DIR", help="output directory (default: %(default)s)"
    )
    g.add_argument("--quick", action="store_true", help="a small version that runs in seconds")
    g.add_argument("--force", action="store_true", help="overwrite an existing result")
    g.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    g.add_argument("--no-progress", action="store_true", help="no progress bars or per-run lines on stderr")
    g.add_argument(
        "--threads",
        type=_positive_int("--threads"),
        help="CPU threads for torch or tensorflow (default: the framework's choice; 1 is faster on a "
        "busy machine)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``gradand`` (``gradand --help``).

    Example:
        >>> from gradand.cli import build_parser
        >>> args = build_parser().parse_args(["reproduce", "spirals", "--quick", "--seeds", "2"])
        >>> args.experiment, args.quick, args.seeds
        ('spirals', True, '2')
    """
    parser = _Parser(
        prog="gradand", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    reproduce = sub.add_parser("reproduce", help="reproduce one of the paper's experiments")
    experiments = reproduce.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    common = _common_options()

    experiments.add_parser(
        "patchwork",
        parents=[common],
        help="the reference notebook's linear regression (numpy; seconds)",
        description="Mean vs AND-mask vs geometric mean on four one-point environments: the patchwork "
        "solution and the invariant one. Deterministic (--seeds is recorded, not used).",
    ).add_argument(
        "--steps", type=_positive_int("--steps"), default=1000, help="gradient steps (default 1000)"
    )

    sp = experiments.add_parser(
        "spirals",
        parents=[common],
        help="the synthetic spirals task with per-environment shortcuts (§3, App. B)",
        description="Plain averaging, dropout, batch norm, L1, L2, AND-mask, geometric mean and "
        "SAND-mask on the spirals task; train/test accuracy over seeds.",
    )
    sp.add_argument(
        "--preset",
        choices=["reference", "paper", "quick"],
        help="reference (the reference code's defaults; default), paper (App. B: 32 x 1280, 32 dims), "
        "quick (= --quick)",
    )
    sp.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    sp.add_argument("--threshold", help="τ of the AND-mask and geometric mean (default 1.0)")
    sp.add_argument("--envs", type=_positive_int("--envs"), help="training environments")
    sp.add_argument(
        "--examples-per-env", type=_positive_int("--examples-per-env"), help="examples per environment"
    )
    sp.add_argument("--n-test", type=_positive_int("--n-test"), help="test examples")
    sp.add_argument("--shortcut-dims", type=int, help="shortcut dimensions (>= 0)")
    sp.add_argument("--shortcut-scale", type=float, help="standard deviation of the shortcut vectors")
    sp.add_argument("--revolutions", type=_positive_float, help="turns of each spiral")
    sp.add_argument("--epochs", type=_positive_int("--epochs"), help="training epochs")
    sp.add_argument(
        "--jobs",
        type=_positive_int("--jobs"),
        help="runs (method x seed) trained side by side in worker processes (default: one per CPU "
        "core on cpu, 1 on an accelerator or with --quick); --threads is then per worker "
        "(default: the cores split between workers)",
    )

    mem = experiments.add_parser(
        "memorization",
        parents=[common],
        help="random vs true labels, every example its own environment (τ sweep)",
        description="Plain averaging memorises random labels; the AND-mask with every example as "
        "its own environment does not, and still learns true labels. Digits (bundled with "
        "scikit-learn) by default; CIFAR-10 from local files with --dataset cifar10 --data-dir DIR.",
    )
    mem.add_argument(
        "--thresholds", help="comma-separated τ values in [0, 1] (default 0,0.05,0.1,0.2,0.4,0.6,0.8)"
    )
    mem.add_argument("--labels", help="random, true or random,true (default)")
    mem.add_argument("--dataset", choices=["digits", "cifar10"], default="digits", help="default: digits")
    mem.add_argument("--data-dir", help="the cifar-10-batches-py directory (for --dataset cifar10)")
    mem.add_argument("--n-train", type=_positive_int("--n-train"), help="training examples")
    mem.add_argument("--epochs", type=_positive_int("--epochs"), help="training epochs")

    con = experiments.add_parser(
        "consistency",
        parents=[common],
        help="arithmetic vs geometric mean landscapes and the inconsistency score (§2)",
        description="H_A = diag(0.05, 1) with H_B = diag(1, 0.05) (swapped) and diag(0.01, 1) "
        "(aligned): OR and AND landscapes, determinants, sublevel areas, I^ε closed form and "
        "sampled (one estimate per seed), and the Proposition 3 bound.",
    )
    con.add_argument("--epsilon", type=_positive_float, default=1.0, help="loss level ε (default 1)")
    con.add_argument(
        "--probes", type=_positive_int("--probes"), help="probe directions per seed (default 256)"
    )
    return parser


# --------------------------------------------------------------------------- validation


def _check_backend(experiment: str, backend: str | None) -> str:
    supported, default, _ = EXPERIMENTS[experiment]
    backend = backend or default
    if backend not in supported:
        raise CLIError(
            f"--backend {backend} is not supported for the {experiment} experiment yet "
            f"(supported: {', '.join(supported)})"
        )
    module, install = FRAMEWORKS[backend]
    if module is not None and importlib.util.find_spec(module) is None:
        raise CLIError(f"--backend {backend} needs {module}, which is not installed: {install}")
    return backend


def _check_device(backend: str, device: str) -> str:
    if backend != "numpy":
        if backend == "torch":
            from gradand.experiments.torch_training import resolve_device
        elif backend == "jax":
            from gradand.experiments.jax_training import resolve_device
        else:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
            from gradand.experiments.tf_training import resolve_device
        try:
            resolve_device(device)
        except ValueError as e:
            raise CLIError(str(e)) from None
        return device
    if device != "cpu":
        raise CLIError(f"--device {device!r}: the {backend} backend runs on the CPU (use --device cpu)")
    return device


def _result_paths(args: argparse.Namespace, stem: str) -> tuple[Path, Path]:
    from gradand.experiments._report import check_writable

    try:
        out = check_writable(args.out)
    except OSError as e:
        raise CLIError(str(e)) from None
    json_path = out / f"{stem}.json"
    if json_path.exists() and not args.force:
        raise CLIError(f"{str(json_path)!r} already exists; pass --force to overwrite it (or --out DIR)")
    if json_path.is_dir():
        raise CLIError(f"{str(json_path)!r} is a directory; choose another --out")
    return json_path, out / f"{stem}.png"


def _log(args: argparse.Namespace) -> Callable[[str], None] | None:
    if args.no_progress:
        return None

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    return log


# --------------------------------------------------------------------------- experiments


Prepared = tuple[str, Callable[[], Any]]


def _patchwork(args: argparse.Namespace, backend: str, seeds: tuple[int, ...]) -> Prepared:
    from gradand.experiments.patchwork import reproduce

    def go() -> Any:
        report = reproduce(backend=backend, device=args.device, steps=args.steps)
        report.config["seeds"] = list(seeds)
        if args.seeds is not None:
            report.notes.append("deterministic: the result does not depend on --seeds")
        if args.quick:
            report.notes.append("--quick changes nothing here: the full run takes seconds")
        return report

    return "patchwork" + ("-quick" if args.quick else ""), go


def _spirals(args: argparse.Namespace, backend: str, seeds: tuple[int, ...]) -> Prepared:
    import dataclasses

    from gradand.experiments import spirals

    if args.quick and args.preset not in (None, "quick"):
        raise CLIError(f"--quick and --preset {args.preset} disagree; pass one of them")
    name = "quick" if args.quick else (args.preset or "reference")
    data, train = spirals.preset(name)
    overrides = {
        "n_envs": args.envs,
        "examples_per_env": args.examples_per_env,
        "n_test": args.n_test,
        "shortcut_dims": args.shortcut_dims,
        "shortcut_scale": args.shortcut_scale,
        "revolutions": args.revolutions,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("shortcut_dims", 0) < 0:
        raise CLIError(f"--shortcut-dims {args.shortcut_dims}: must be >= 0")
    if overrides.get("shortcut_scale", 0) < 0:
        raise CLIError(f"--shortcut-scale {args.shortcut_scale}: must be >= 0")
    if overrides.get("examples_per_env", 2) < 2 or overrides.get("n_test", 2) < 2:
        raise CLIError("--examples-per-env and --n-test must be >= 2")
    data = dataclasses.replace(data, **overrides)
    # the generator validates its parameters: try them on a tiny version before any training
    dataclasses.replace(data, examples_per_env=2, n_test=2).make(0)
    train_changes: dict[str, Any] = {}
    if args.threshold is not None:
        train_changes["threshold"] = _parse_threshold(args.threshold, "--threshold")
    if args.epochs is not None:
        train_changes["epochs"] = args.epochs
    train = dataclasses.replace(train, **train_changes)
    if train.batch_size > data.examples_per_env:
        train = dataclasses.replace(train, batch_size=data.examples_per_env)
    methods = spirals.METHODS
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = [m for m in methods if m not in spirals.METHODS]
        if unknown or not methods:
            raise CLIError(
                f"--methods {args.methods!r}: unknown {unknown}; choose from {', '.join(spirals.METHODS)}"
            )
    custom = bool(overrides or train_changes or args.methods)
    label = name if not custom else f"{name} (modified)"

    def go() -> Any:
        return spirals.run(
            data,
            train,
            methods=methods,
            seeds=seeds,
            backend=backend,
            device=args.device,
            show_progress=not args.no_progress,
            preset_name=label,
            log=_log(args),
            jobs=1 if args.quick and args.jobs is None else args.jobs,
            threads=args.threads,
        )

    return ("spirals" if name == "reference" else f"spirals-{name}"), go


def _memorization(args: argparse.Namespace, backend: str, seeds: tuple[int, ...]) -> Prepared:
    import dataclasses

    from gradand.experiments import memorization as mem

    if args.thresholds is not None:
        thresholds = tuple(_parse_threshold(t.strip(), "--thresholds") for t in args.thresholds.split(","))
        if len(set(thresholds)) != len(thresholds):
            raise CLIError(f"--thresholds {args.thresholds!r}: a value appears twice")
    else:
        thresholds = mem.QUICK_THRESHOLDS if args.quick else mem.THRESHOLDS
    labels = mem.LABELS
    if args.labels is not None:
        labels = tuple(x.strip() for x in args.labels.split(",") if x.strip())
        if not labels or any(x not in mem.LABELS for x in labels):
            raise CLIError(f"--labels {args.labels!r}: expected random, true or random,true")
    name = "quick" if args.quick else "default"
    setting = mem.PRESETS[name]
    if args.dataset == "cifar10":
        if backend != "torch":
            raise CLIError(
                f"--dataset cifar10 trains a CNN with --backend torch only; got --backend {backend}"
            )
        if not args.data_dir:
            raise CLIError("--dataset cifar10 needs --data-dir DIR (the cifar-10-batches-py directory)")
        setting = dataclasses.replace(setting, **mem.CIFAR10_CHANGES)
    changes = {k: v for k, v in {"n_train": args.n_train, "epochs": args.epochs}.items() if v is not None}
    setting = dataclasses.replace(setting, **changes)
    if setting.n_train < setting.batch_size:
        raise CLIError(
            f"--n-train {setting.n_train} is smaller than one batch ({setting.batch_size} examples, each its "
            f"own environment); use --n-train >= {setting.batch_size}"
        )
    try:
        if args.dataset == "cifar10":
            data = mem.load_cifar10(args.data_dir, n_train=setting.n_train)
        else:
            data = mem.load_digits(n_train=setting.n_train)
    except (FileNotFoundError, ValueError, ImportError) as e:
        raise CLIError(str(e)) from None

    def go() -> Any:
        return mem.run(
            data,
            setting,
            thresholds=thresholds,
            labels=labels,
            seeds=seeds,
            backend=backend,
            device=args.device,
            show_progress=not args.no_progress,
            preset_name=name if not changes else f"{name} (modified)",
            log=_log(args),
        )

    stem = (
        "memorization"
        + ("" if args.dataset == "digits" else f"-{args.dataset}")
        + ("-quick" if args.quick else "")
    )
    return stem, go


def _consistency(args: argparse.Namespace, backend: str, seeds: tuple[int, ...]) -> Prepared:
    from gradand.experiments.landscapes import run

    probes = args.probes or (64 if args.quick else 256)

    def go() -> Any:
        return run(
            epsilon=args.epsilon,
            seeds=seeds,
            n_probes=probes,
            preset_name="quick" if args.quick else "default",
        )

    return "consistency" + ("-quick" if args.quick else ""), go


HANDLERS = {
    "patchwork": _patchwork,
    "spirals": _spirals,
    "memorization": _memorization,
    "consistency": _consistency,
}


# --------------------------------------------------------------------------- output


def _versions(backend: str) -> dict[str, str]:
    import numpy

    import gradand

    versions = {
        "gradand": gradand.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }
    module = FRAMEWORKS[backend][0]
    if module is not None:
        versions[module] = getattr(sys.modules.get(module), "__version__", "unknown")
    return versions


def _print_report(report: Any) -> None:
    print(report.table)
    for note in report.notes:
        print(f"note: {note}")
    print()
    failed = 0
    for check in report.checks:
        mark = "reproduced    " if check.passed else "NOT REPRODUCED"
        failed += not check.passed
        print(f"[{mark}] {check.claim}")
    if report.checks:
        if failed:
            print(
                f"{failed} of {len(report.checks)} claims did NOT reproduce (numbers above and in the JSON)"
            )
        else:
            print(f"all {len(report.checks)} claims reproduced")


def _run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    experiment = args.experiment
    backend = _check_backend(experiment, args.backend)
    device = _check_device(backend, args.device)
    if args.seeds is not None:
        seeds = _parse_seeds(args.seeds)
    else:
        seeds = tuple(range(1 if args.quick and experiment != "consistency" else EXPERIMENTS[experiment][2]))
    if args.threads is not None:
        _set_threads(backend, args.threads)
    from gradand.experiments._report import have_matplotlib, save_figure, write_json_atomic

    # Everything is validated before any training: arguments (by the handler), the output
    # directory and whether the result already exists.
    try:
        stem, go = HANDLERS[experiment](args, backend, seeds)
    except ValueError as e:  # an experiment's own validation of its settings
        raise CLIError(str(e)) from None
    json_path, png_path = _result_paths(args, stem)
    start = time.perf_counter()
    report = go()
    wall = time.perf_counter() - start
    _print_report(report)
    document = {
        **report.as_dict(),
        "command": "gradand " + " ".join(argv),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": round(wall, 2),
        "backend": backend,
        "device": device,
        "seeds": list(seeds),
        "threads": _threads(backend),
        "platform": platform.platform(),
        "versions": _versions(backend),
    }
    try:
        write_json_atomic(json_path, document, force=args.force)
    except OSError as e:
        raise CLIError(f"could not write {str(json_path)!r}: {e}") from None
    print(f"\nresult: {json_path} ({wall:.1f} s)")
    if args.no_plot or report.draw is None:
        return 0
    if not have_matplotlib():
        print("plot skipped: matplotlib is not installed (pip install 'gradand[experiments]')")
        return 0
    try:
        save_figure(png_path, report.draw)
    except OSError as e:
        raise CLIError(f"could not write {str(png_path)!r}: {e}") from None
    print(f"plot:   {png_path}")
    return 0


def _set_threads(backend: str, n: int) -> None:
    from gradand.experiments._parallel import set_threads

    set_threads(backend, n)


def _threads(backend: str) -> int | None:
    if backend == "torch" and "torch" in sys.modules:
        return int(sys.modules["torch"].get_num_threads())
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradand`` command; returns the exit status.

    Example:
        >>> import tempfile
        >>> from gradand.cli import main
        >>> with tempfile.TemporaryDirectory() as d:
        ...     main(["reproduce", "patchwork", "--out", d, "--no-plot"])  # doctest: +ELLIPSIS
        method ...
        all 4 claims reproduced
        ...
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except CLIError as e:
        print(f"gradand: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradand: interrupted (no result written)", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
