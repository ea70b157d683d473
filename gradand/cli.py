"""The ``gradand`` command line: reproduce the paper's experiments.

    gradand reproduce patchwork       # the notebook's linear regression (numpy only; seconds)
    gradand reproduce spirals         # the synthetic task of §3 / App. B (PyTorch)
    gradand reproduce memorization    # random labels, one environment per example (PyTorch)
    gradand reproduce consistency     # the consistency-of-minima landscapes (numpy)
    gradand reproduce colored-digits  # where the AND-mask cannot help: IRM's Colored MNIST recipe
    gradand reproduce sweep           # where the AND-mask stops working: spirals over a grid
    gradand reproduce minima          # consistency of the minima that each method reaches

Every command prints a summary table and the paper's claims checked on the
measured numbers, writes ``DIR/<experiment>.json`` atomically (an existing
result is kept unless ``--force``) and a PNG plot (with matplotlib).
``--quick`` runs a small version in seconds. Bad arguments, and sizes beyond
:data:`LIMITS`, get a one-line error and exit status 2.

Under faults: the JSON and the PNG are written as one set (an interrupt at
any moment leaves the earlier set or the new one, and no temporary file);
Ctrl-C (SIGINT) ends with one line saying what was written and exit status
130, SIGTERM and SIGHUP likewise with 128 + the signal number; worker
processes (``spirals --jobs N``) are terminated within seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from gradand.experiments._report import ResultFiles

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
    "spirals": (("torch", "jax", "tensorflow"), "torch", 20),
    "memorization": (("torch", "jax", "tensorflow"), "torch", 1),
    "consistency": (("numpy",), "numpy", 3),
    "colored-digits": (("torch", "jax", "tensorflow"), "torch", 10),
    "sweep": (("torch", "jax", "tensorflow"), "torch", 10),
    "minima": (("torch", "jax", "tensorflow"), "torch", 10),
}


#: The largest value of each numeric option (and of ``--seeds`` and ``--thresholds``: how many).
#: Far beyond the paper's settings, and below what makes a run die of memory exhaustion.
LIMITS: dict[str, int | float] = {
    "--seeds": 1000,
    "--steps": 100_000,
    "--envs": 1000,
    "--examples-per-env": 100_000,
    "--n-test": 1_000_000,
    "--shortcut-dims": 1000,
    "--shortcut-scale": 1e6,
    "--revolutions": 100.0,
    "--epochs": 100_000,
    "--thresholds": 100,
    "--n-train": 50_000,
    "--probes": 100_000,
    "--epsilon": 1e6,
}

#: The largest seed: what every framework's seeding accepts (2**32 - 1).
MAX_SEED = 2**32 - 1

#: Floats one spirals data set may hold: (--envs x --examples-per-env + --n-test) x (2 + --shortcut-dims).
MAX_SPIRALS_VALUES = 100_000_000

#: ``--jobs`` and ``--threads``: at most this many per CPU this process may use.
PER_CPU = 4


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


class _Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so that clean-up (workers, temporary files) runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _Parser(argparse.ArgumentParser):
    """argparse, but errors raise :class:`CLIError` (one line, no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(message)


def _one_line(text: str, limit: int = 1000) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _shown(text: str, limit: int = 40) -> str:
    """A value as typed, shortened for an error message (``999…(5000 characters)``)."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:20]}…({len(text)} characters)"


_INTEGER = re.compile(r"\s*[+-]?\d+(_\d+)*\s*")


def _parse_int(text: str) -> int | None:
    """``int(text)``; ``None`` for a valid integer too long to convert (Python's 4300-digit limit)."""
    try:
        return int(text)
    except ValueError:
        if _INTEGER.fullmatch(text):
            return None
        raise


def _parse_seeds(text: str) -> tuple[int, ...]:
    """``"3"`` → seeds 0, 1, 2; ``"0,5,9"`` → those seeds."""
    limit = int(LIMITS["--seeds"])
    bad = CLIError(
        f"--seeds {_shown(text)!r}: expected a count (e.g. 3 for seeds 0,1,2) or a comma-separated list "
        f"of seeds (e.g. 0,5,9), all integers >= 0"
    )
    parts = [p.strip() for p in text.split(",")]
    if len(parts) > limit:
        raise CLIError(f"--seeds: {len(parts)} seeds listed; at most {limit}")
    try:
        values = [_parse_int(p) for p in parts]
    except ValueError:
        raise bad from None
    if len(values) == 1:
        n = values[0]
        if n is not None and n < 1:
            raise CLIError(f"--seeds {_shown(text)!r}: the number of seeds must be >= 1")
        if n is None or n > limit:
            raise CLIError(f"--seeds {_shown(text)}: too many seeds; at most {limit}")
        return tuple(range(n))
    if any(v is not None and v < 0 for v in values):
        raise bad
    if any(v is None or v > MAX_SEED for v in values):
        big = next(p for p, v in zip(parts, values) if v is None or v > MAX_SEED)
        raise CLIError(f"--seeds: seed {_shown(big)} is too large; at most {MAX_SEED}")
    if len(set(values)) != len(values):
        raise CLIError(f"--seeds {_shown(text)!r}: a seed appears twice")
    return tuple(v for v in values if v is not None)


def _no_repeats(option: str, text: str, items: Sequence[Any]) -> None:
    seen: set[Any] = set()
    for item in items:
        if item in seen:
            raise CLIError(f"{option} {_shown(text)!r}: {item} appears twice")
        seen.add(item)


def _parse_threshold(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CLIError(f"{option} {_shown(text)!r}: τ must be a number in [0, 1]") from None
    if not 0.0 <= value <= 1.0:
        raise CLIError(
            f"{option} {_shown(text)}: τ is out of range; it must be in [0, 1] (the fraction of environments "
            f"that must agree in sign)"
        )
    return value


def _cpu_limit() -> int:
    from gradand.experiments._parallel import available_cpus

    return PER_CPU * available_cpus()


def _integer(option: str, minimum: int = 1, *, per_cpu: bool = False) -> Callable[[str], int]:
    """An argparse ``type``: an integer in [minimum, ``LIMITS[option]``] (or ``PER_CPU`` x the CPUs)."""

    def parse(text: str) -> int:
        if per_cpu:
            limit, why = _cpu_limit(), f" ({PER_CPU} per CPU this process may use)"
        else:
            limit, why = int(LIMITS[option]), ""
        try:
            value = _parse_int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{_shown(text)!r} is not an integer") from None
        if (value is None and text.strip().startswith("-")) or (value is not None and value < minimum):
            raise argparse.ArgumentTypeError(f"{_shown(text.strip())} must be >= {minimum}")
        if value is None or value > limit:
            raise argparse.ArgumentTypeError(f"{_shown(text.strip())} is too large; at most {limit}{why}")
        return value

    parse.__name__ = option
    return parse


def _positive_int(option: str) -> Callable[[str], int]:
    return _integer(option, 1)


def _number(option: str, *, positive: bool) -> Callable[[str], float]:
    """An argparse ``type`` for a finite float option, > 0 or >= 0, at most ``LIMITS[option]``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{_shown(text)!r} is not a number") from None
        low = "> 0" if positive else ">= 0"
        if value != value or value in (float("inf"), float("-inf")) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"{_shown(text.strip())} must be finite and {low}")
        if value > LIMITS[option]:
            raise argparse.ArgumentTypeError(
                f"{_shown(text.strip())} is too large; at most {LIMITS[option]:g}"
            )
        return value

    parse.__name__ = option
    return parse


def _directory(text: str) -> str:
    if not text.strip() or "\0" in text:
        raise argparse.ArgumentTypeError(f"{_shown(text)!r} is not a directory name")
    return text


def _device(text: str) -> str:
    if len(text) > 64 or "\0" in text:
        raise argparse.ArgumentTypeError(f"{_shown(text)!r} is not a device (cpu, cuda, cuda:N or mps)")
    return text


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
        "default: 20 for spirals (1 with --quick), 3 for consistency, 1 otherwise",
    )
    g.add_argument(
        "--device",
        default="cpu",
        type=_device,
        help="cpu (default), cuda or cuda:N (torch, jax, tensorflow)",
    )
    g.add_argument(
        "--out",
        default="gradand-results",
        type=_directory,
        metavar="DIR",
        help="output directory (default: %(default)s)",
    )
    g.add_argument("--quick", action="store_true", help="a small version that runs in seconds")
    g.add_argument("--force", action="store_true", help="overwrite an existing result")
    g.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    g.add_argument("--no-progress", action="store_true", help="no progress bars or per-run lines on stderr")
    g.add_argument(
        "--threads",
        type=_integer("--threads", per_cpu=True),
        help="CPU threads for torch or tensorflow (default: the framework's choice; 1 is faster on a "
        f"busy machine; at most {PER_CPU} per CPU)",
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
        "SAND-mask on the spirals task; per method the distribution over seeds of the test accuracy "
        "(mean with a 95%% interval, success rate test >= 0.95 with a 95%% interval) and of the test "
        "accuracy with the shortcut dimensions zeroed.",
    )
    sp.add_argument(
        "--preset",
        choices=["reference", "gradand", "paper", "quick"],
        help="reference (the reference experiment: its data generator, fixed init/shuffle seed, "
        "evaluation; default), gradand (same sizes, gradand's generator, the seed also initialises), "
        "paper (gradand's generator, App. B: 32 x 1280, 32 dims), quick (= --quick)",
    )
    sp.add_argument(
        "--methods",
        help="comma-separated subset of the methods (default: all; the per-environment methods run first)",
    )
    sp.add_argument(
        "--loop",
        choices=["gradand", "reference"],
        default="gradand",
        help="gradand (the one training loop, any backend; default) or reference (the reference "
        "code's loop re-implemented: PyTorch on the CPU, mean/AND-mask/geometric mean and the "
        "averaging regularisers)",
    )
    sp.add_argument("--threshold", help="τ of the AND-mask and geometric mean (default 1.0)")
    sp.add_argument("--envs", type=_positive_int("--envs"), help="training environments")
    sp.add_argument(
        "--examples-per-env", type=_integer("--examples-per-env", 2), help="examples per environment"
    )
    sp.add_argument("--n-test", type=_integer("--n-test", 2), help="test examples")
    sp.add_argument("--shortcut-dims", type=_integer("--shortcut-dims", 0), help="shortcut dimensions (>= 0)")
    sp.add_argument(
        "--shortcut-scale",
        type=_number("--shortcut-scale", positive=False),
        help="standard deviation of the shortcut vectors",
    )
    sp.add_argument(
        "--revolutions", type=_number("--revolutions", positive=True), help="turns of each spiral"
    )
    sp.add_argument("--epochs", type=_positive_int("--epochs"), help="training epochs")
    sp.add_argument(
        "--jobs",
        type=_integer("--jobs", per_cpu=True),
        help="runs (method x seed) trained side by side in worker processes (default: one per CPU "
        "core on cpu, 1 on an accelerator or with --quick); --threads is then per worker "
        f"(default: the cores split between workers); at most {PER_CPU} per CPU",
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
    con.add_argument(
        "--epsilon", type=_number("--epsilon", positive=True), default=1.0, help="loss level ε (default 1)"
    )
    con.add_argument(
        "--probes", type=_positive_int("--probes"), help="probe directions per seed (default 256)"
    )

    cd = experiments.add_parser(
        "colored-digits",
        parents=[common],
        help="where the AND-mask cannot help: IRM's Colored MNIST recipe on the bundled digits",
        description="Averaging, AND-mask (τ=1 and 0.75), geometric mean, IRMv1 and V-REx on colored "
        "digits (every environment's colour agrees with the label in the same direction), and the "
        "controls: grayscale inputs, and one training environment with its colour reversed. Train "
        "and test accuracy as distributions over seeds (default 10).",
    )
    cd.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    cd.add_argument("--envs", type=_positive_int("--envs"), help="training environments (default 8)")
    cd.add_argument("--epochs", type=_positive_int("--epochs"), help="training epochs (default 300)")
    cd.add_argument(
        "--jobs",
        type=_integer("--jobs", per_cpu=True),
        help="runs (method x seed) trained side by side in worker processes (default: one per CPU "
        f"core on cpu, 1 on an accelerator or with --quick); at most {PER_CPU} per CPU",
    )
    jobs_help = (
        "runs trained side by side in worker processes (default: one per CPU core on cpu, 1 on an "
        f"accelerator or with --quick); at most {PER_CPU} per CPU"
    )
    sw = experiments.add_parser(
        "sweep",
        parents=[common],
        help="where the AND-mask stops working: success rates over environments and shortcuts",
        description="Averaging, AND-mask (τ=1 and 0.5), geometric mean and SAND-mask on the spirals "
        "task (the spirals quick preset's sizes) swept over the number of environments, the shortcut "
        "dimensions and the shortcut scale, one axis at a time, examples per environment fixed; per "
        "cell and method the success rate (test >= 0.95) with a 95%% Wilson interval (default 10 seeds).",
    )
    sw.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    sw.add_argument("--envs", help="comma-separated numbers of environments (default 2,4,8,16,32,64)")
    sw.add_argument("--shortcut-dims", help="comma-separated shortcut dimensions (default 0,2,8,32)")
    sw.add_argument("--shortcut-scale", help="comma-separated shortcut scales (default 0.1,0.3,1,3)")
    sw.add_argument("--jobs", type=_integer("--jobs", per_cpu=True), help=jobs_help)

    mi = experiments.add_parser(
        "minima",
        parents=[common],
        help="consistency of the minima found: inconsistency I^ε beside test accuracy",
        description="Averaging, AND-mask and geometric mean on the spirals task (the spirals quick "
        "preset); after training, the empirical inconsistency of the minimum across the training "
        "environments in a random subspace of parameter space, beside the test accuracy, as "
        "distributions over seeds (default 10).",
    )
    mi.add_argument(
        "--epsilon", type=_number("--epsilon", positive=True), help="loss level ε (default 0.1)"
    )
    mi.add_argument("--probes", type=_positive_int("--probes"), help="probe directions (default 8)")
    mi.add_argument("--jobs", type=_integer("--jobs", per_cpu=True), help=jobs_help)
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
        from gradand.experiments.training import get_backend

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
        try:
            get_backend(backend).resolve_device(device)
        except ValueError as e:
            raise CLIError(str(e)) from None
        return device
    if device != "cpu":
        raise CLIError(f"--device {device!r}: the {backend} backend runs on the CPU (use --device cpu)")
    return device


def _result_files(args: argparse.Namespace, stem: str) -> ResultFiles:
    from gradand.experiments._report import ResultFiles, check_writable

    try:
        out = check_writable(args.out)
    except OSError as e:
        raise CLIError(str(e)) from None
    files = ResultFiles(out / f"{stem}.json", out / f"{stem}.png")
    for path in (files.json_path, files.png_path):
        if path.is_dir():
            raise CLIError(f"{str(path)!r} is a directory; choose another --out")
    there = files.existing()
    if there and not args.force:
        raise CLIError(f"{str(there[0])!r} already exists; pass --force to overwrite it (or --out DIR)")
    return files


def _log(args: argparse.Namespace) -> Callable[[str], None] | None:
    if args.no_progress:
        return None

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    return log


def _run_options(args: argparse.Namespace, *, parallel: bool = True) -> dict[str, Any]:
    """The options every experiment's ``run`` takes from the command line (device, progress, log,
    and with ``parallel`` the worker plan: one process for ``--quick`` unless ``--jobs``)."""
    options: dict[str, Any] = {
        "device": args.device,
        "show_progress": not args.no_progress,
        "log": _log(args),
    }
    if parallel:
        options["jobs"] = 1 if args.quick and args.jobs is None else args.jobs
        options["threads"] = args.threads
    return options


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
    data = dataclasses.replace(data, **overrides)
    features = 2 + data.shortcut_dims
    values = (data.n_envs * data.examples_per_env + data.n_test) * features
    if values > MAX_SPIRALS_VALUES:
        raise CLIError(
            f"the data would hold {values:.3g} numbers per seed: (--envs {data.n_envs} x "
            f"--examples-per-env {data.examples_per_env} + --n-test {data.n_test}) x (2 + --shortcut-dims "
            f"{data.shortcut_dims}); at most {MAX_SPIRALS_VALUES:.0e} ({MAX_SPIRALS_VALUES * 8 // 2**20} MiB)"
        )
    # the generator validates its parameters (and the reference's its largest seed): try them on a
    # tiny version before any training
    dataclasses.replace(data, examples_per_env=2, n_test=2).make(max(seeds))
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
        unknown = [_shown(m) for m in methods if m not in spirals.METHODS]
        if unknown or not methods:
            raise CLIError(
                f"--methods {_shown(args.methods)!r}: unknown {unknown[:5]}; choose from "
                f"{', '.join(spirals.METHODS)}"
            )
        _no_repeats("--methods", args.methods, methods)
    if args.loop == "reference":
        spirals.check_reference_loop(train, methods, backend, args.device)
    custom = bool(overrides or train_changes or args.methods)
    label = name if not custom else f"{name} (modified)"

    def go() -> Any:
        return spirals.run(
            data,
            train,
            methods=methods,
            seeds=seeds,
            backend=backend,
            preset_name=label,
            **_run_options(args),
            loop=args.loop,
        )

    stem = "spirals" if name == "reference" else f"spirals-{name}"
    return stem + ("-reference-loop" if args.loop == "reference" else ""), go


def _memorization(args: argparse.Namespace, backend: str, seeds: tuple[int, ...]) -> Prepared:
    import dataclasses

    from gradand.experiments import memorization as mem

    if args.thresholds is not None:
        parts = args.thresholds.split(",")
        if len(parts) > LIMITS["--thresholds"]:
            raise CLIError(f"--thresholds: {len(parts)} values listed; at most {LIMITS['--thresholds']}")
        thresholds = tuple(_parse_threshold(t.strip(), "--thresholds") for t in parts)
        if len(set(thresholds)) != len(thresholds):
            raise CLIError(f"--thresholds {_shown(args.thresholds)!r}: a value appears twice")
    else:
        thresholds = mem.QUICK_THRESHOLDS if args.quick else mem.THRESHOLDS
    labels = mem.LABELS
    if args.labels is not None:
        labels = tuple(x.strip() for x in args.labels.split(",") if x.strip())
        if not labels or any(x not in mem.LABELS for x in labels):
            raise CLIError(f"--labels {_shown(args.labels)!r}: expected random, true or random,true")
        _no_repeats("--labels", args.labels, labels)
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
    except Exception as e:  # unreadable or corrupt files under --data-dir
        raise CLIError(
            f"--data-dir {_shown(args.data_dir, 200)!r}: could not read CIFAR-10: {type(e).__name__}: {e}"
        ) from None

    def go() -> Any:
        return mem.run(
            data,
            setting,
            thresholds=thresholds,
            labels=labels,
            seeds=seeds,
            backend=backend,
            preset_name=name if not changes else f"{name} (modified)",
            **_run_options(args, parallel=False),
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


def _colored_digits(args: argparse.Namespace, backend: str, seeds: tuple[int, ...]) -> Prepared:
    import dataclasses

    from gradand.experiments import colored_digits as cd

    name = "quick" if args.quick else "default"
    data, train = cd.preset(name)
    if args.envs is not None:
        if args.envs < train.reversed_envs:
            raise CLIError(f"--envs {args.envs}: the reversed control needs at least {train.reversed_envs}")
        values = args.envs * data.n_train * 128
        if values > MAX_SPIRALS_VALUES:
            raise CLIError(
                f"--envs {args.envs}: the data would hold {values:.3g} numbers per seed; at most "
                f"{MAX_SPIRALS_VALUES:.0e}"
            )
        data = dataclasses.replace(data, n_envs=args.envs)
    if args.epochs is not None:
        train = dataclasses.replace(train, epochs=args.epochs)
    methods = cd.METHODS
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = [_shown(m) for m in methods if m not in cd.METHODS]
        if unknown or not methods:
            raise CLIError(
                f"--methods {_shown(args.methods)!r}: unknown {unknown[:5]}; choose from "
                f"{', '.join(cd.METHODS)}"
            )
        _no_repeats("--methods", args.methods, methods)
    custom = args.envs is not None or args.epochs is not None or bool(args.methods)

    def go() -> Any:
        return cd.run(
            data,
            train,
            methods=methods,
            seeds=seeds,
            backend=backend,
            preset_name=name if not custom else f"{name} (modified)",
            **_run_options(args),
        )

    return "colored-digits" + ("-quick" if args.quick else ""), go


def _listed(text: str | None, option: str, parse: Callable[[str], Any]) -> tuple[Any, ...] | None:
    """A comma-separated option's values, each parsed, none repeated (``None`` when not given)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or len(parts) > LIMITS["--thresholds"]:
        limit = LIMITS["--thresholds"]
        raise CLIError(f"{option} {_shown(text)!r}: expected 1 to {limit} comma-separated values")
    try:
        values = tuple(parse(p) for p in parts)
    except argparse.ArgumentTypeError as e:
        raise CLIError(f"{option}: {e}") from None
    _no_repeats(option, text, values)
    return values


def _sweep(args: argparse.Namespace, backend: str, seeds: tuple[int, ...]) -> Prepared:
    import dataclasses

    from gradand.experiments import sweep

    name = "quick" if args.quick else "default"
    data, train, grid = sweep.preset(name)
    changes = {
        "n_envs": _listed(args.envs, "--envs", _positive_int("--envs")),
        "shortcut_dims": _listed(args.shortcut_dims, "--shortcut-dims", _integer("--shortcut-dims", 0)),
        "shortcut_scale": _listed(
            args.shortcut_scale, "--shortcut-scale", _number("--shortcut-scale", positive=False)
        ),
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    grid = dataclasses.replace(grid, **changes)
    for setting in [c[2] for c in sweep.cells(data, grid)]:
        values = (setting.n_envs * setting.examples_per_env + setting.n_test) * (2 + setting.shortcut_dims)
        if values > MAX_SPIRALS_VALUES:
            raise CLIError(f"a cell's data would hold {values:.3g} numbers; at most {MAX_SPIRALS_VALUES:.0e}")
    methods = tuple(sweep.METHODS)
    if args.methods:
        methods = _listed(args.methods, "--methods", str)
        unknown = [_shown(m) for m in methods if m not in sweep.METHODS]
        if unknown:
            raise CLIError(
                f"--methods {_shown(args.methods)!r}: unknown {unknown[:5]}; choose from "
                f"{', '.join(sweep.METHODS)}"
            )
    custom = bool(changes or args.methods)

    def go() -> Any:
        return sweep.run(
            data,
            train,
            grid,
            methods=methods,
            seeds=seeds,
            backend=backend,
            preset_name=name if not custom else f"{name} (modified)",
            **_run_options(args),
        )

    return "sweep" + ("-quick" if args.quick else ""), go


def _minima(args: argparse.Namespace, backend: str, seeds: tuple[int, ...]) -> Prepared:
    import dataclasses

    from gradand.experiments import minima, sweep

    name = "quick" if args.quick else "default"
    data, train, _ = sweep.preset(name)
    probe = minima.PRESETS[name]
    changes = {k: v for k, v in {"epsilon": args.epsilon, "n_probes": args.probes}.items() if v is not None}
    probe = dataclasses.replace(probe, **changes)

    def go() -> Any:
        return minima.run(
            data,
            train,
            probe=probe,
            seeds=seeds,
            backend=backend,
            preset_name=name if not changes else f"{name} (modified)",
            **_run_options(args),
        )

    return "minima" + ("-quick" if args.quick else ""), go


HANDLERS = {
    "patchwork": _patchwork,
    "spirals": _spirals,
    "memorization": _memorization,
    "consistency": _consistency,
    "colored-digits": _colored_digits,
    "sweep": _sweep,
    "minima": _minima,
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
    _say(report.table)
    for note in report.notes:
        _say(f"note: {note}")
    _say()
    failed = 0
    for check in report.checks:
        mark = "reproduced    " if check.passed else "NOT REPRODUCED"
        failed += not check.passed
        _say(f"[{mark}] {check.claim}")
    if report.checks:
        if failed:
            _say(f"{failed} of {len(report.checks)} claims did NOT reproduce (numbers above and in the JSON)")
        else:
            _say(f"all {len(report.checks)} claims reproduced")


class _Session:
    """What :func:`main` needs to say truthfully what a run left on disk when it stops early."""

    def __init__(self) -> None:
        self.results: ResultFiles | None = None  # once the output directory is checked
        self.stopping = False  # an interrupt was raised (or the run is over): ignore further signals

    def outcome(self) -> str:
        return "no result written" if self.results is None else self.results.describe()


def _say(text: str = "") -> None:
    """Print on stdout; a closed stdout (``gradand ... | head``) does not stop the run."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _run(argv: Sequence[str], session: _Session) -> int:
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
    from gradand.experiments._report import ResultExistsError, have_matplotlib

    # Everything is validated before any training: arguments (by the handler), the output
    # directory and whether the result already exists.
    try:
        stem, go = HANDLERS[experiment](args, backend, seeds)
    except ValueError as e:  # an experiment's own validation of its settings
        raise CLIError(str(e)) from None
    results = _result_files(args, stem)
    session.results = results
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
    plot = not args.no_plot and report.draw is not None
    draw = report.draw if plot and have_matplotlib() else None
    try:
        results.write(document, draw, force=args.force)
    except ResultExistsError as e:
        raise CLIError(f"{e} (it appeared during the run); {results.describe()}") from None
    except OSError as e:
        raise CLIError(f"could not write {e.filename!r}: {e.strerror}; {results.describe()}") from None
    _say(f"\nresult: {results.json_path} ({wall:.1f} s)")
    if draw is not None:
        _say(f"plot:   {results.png_path}")
    elif plot:
        _say("plot skipped: matplotlib is not installed (pip install 'gradand[experiments]')")
    for path in results.removed:
        _say(f"removed: {path} (the earlier result's plot; this result has none)")
    return 0


def _set_threads(backend: str, n: int) -> None:
    from gradand.experiments._parallel import set_threads

    set_threads(backend, n)


def _threads(backend: str) -> int | None:
    if backend == "torch" and "torch" in sys.modules:
        return int(sys.modules["torch"].get_num_threads())
    return None


#: Signals that stop a run: SIGINT as KeyboardInterrupt (exit 130), the others as _Terminated (128 + n).
_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def _signals_raise(session: _Session) -> Iterator[None]:
    """Turn the first SIGINT, SIGTERM or SIGHUP into an exception in the main thread; ignore later ones.

    The exception unwinds the run, so clean-up runs (workers terminated, temporary files
    removed); later signals do not interrupt that clean-up. A signal the caller ignores
    (``nohup``, a background job) stays ignored, and one another handler owns is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        if session.stopping:
            return
        session.stopping = True
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise _Terminated(signum)

    previous = {}
    for signum in _STOP_SIGNALS:
        current = signal.getsignal(signum)
        usual = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        if current is usual:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        session.stopping = True
        for signum, old in previous.items():
            signal.signal(signum, old)


def _error(text: str) -> None:
    with contextlib.suppress(OSError):
        print(f"gradand: {_one_line(text)}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gradand`` command; returns the exit status.

    0: done; 2: a bad argument (one line on stderr, nothing run); 130: interrupted
    (Ctrl-C); 128 + n: stopped by signal n (143 for SIGTERM). An interrupted run
    says on stderr which result files it wrote, if any.

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
    session = _Session()
    with _signals_raise(session):
        try:
            code = _main(argv, session)
            session.stopping = True
        except KeyboardInterrupt:
            session.stopping = True
            _error(f"interrupted ({session.outcome()})")
            code = 130
        except _Terminated as e:
            session.stopping = True
            _error(f"terminated by {signal.Signals(e.signum).name} ({session.outcome()})")
            code = 128 + e.signum
    return code


def _main(argv: Sequence[str], session: _Session) -> int:
    try:
        return _run(argv, session)
    except CLIError as e:
        session.stopping = True
        _error(f"error: {e}")
        return 2
    except MemoryError:
        session.stopping = True
        _error(f"error: out of memory ({session.outcome()}); try smaller sizes (--seeds, --envs, ...)")
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
