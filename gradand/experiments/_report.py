"""What every experiment shares: atomic result files, progress bars, tables, plots, checks.

Numpy and the standard library only; tqdm and matplotlib are used when
installed (the ``experiments`` extra) and skipped with a message otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "Check",
    "Report",
    "ResultExistsError",
    "check_writable",
    "format_table",
    "have_matplotlib",
    "mean_std",
    "progress",
    "save_figure",
    "to_jsonable",
    "write_json_atomic",
]


class ResultExistsError(FileExistsError):
    """A result file is already there and ``force`` was not given."""


class Check(NamedTuple):
    """One qualitative claim of the paper, tested on the measured numbers.

    Attributes:
        claim: the claim in words, with the numbers it compares.
        passed: whether the measurement supports it.
        measured: the numbers it was decided on.
    """

    claim: str
    passed: bool
    measured: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """JSON form.

        Example:
            >>> from gradand.experiments._report import Check
            >>> Check("x > 0", True, {"x": 1.0}).as_dict()["passed"]
            True
        """
        return {"claim": self.claim, "passed": bool(self.passed), "measured": to_jsonable(self.measured)}


@dataclasses.dataclass
class Report:
    """What an experiment hands the command line: numbers, checks, a table and a plot.

    Attributes:
        experiment: the experiment's name (``"spirals"``, ...).
        config: every setting the numbers depend on.
        results: the measured numbers (JSON-able).
        checks: the paper's claims tested on ``results``.
        table: the summary table printed on stdout.
        draw: ``draw(plt) -> figure`` for the PNG, or ``None``.
        notes: remarks printed under the table (e.g. what a preset does not test).
    """

    experiment: str
    config: dict[str, Any]
    results: dict[str, Any]
    checks: list[Check]
    table: str
    draw: Callable[[Any], Any] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The JSON document (without the plot).

        Example:
            >>> from gradand.experiments._report import Check, Report
            >>> r = Report("demo", {"n": 1}, {"acc": 1.0}, [Check("acc > 0.5", True, {"acc": 1.0})], "")
            >>> r.as_dict()["reproduced"], sorted(r.as_dict())
            (True, ['checks', 'config', 'experiment', 'notes', 'reproduced', 'results'])
        """
        return {
            "experiment": self.experiment,
            "config": to_jsonable(self.config),
            "results": to_jsonable(self.results),
            "checks": [c.as_dict() for c in self.checks],
            "reproduced": all(c.passed for c in self.checks),
            "notes": list(self.notes),
        }


def to_jsonable(value: Any) -> Any:
    """Numpy scalars/arrays, tuples and NaN/inf made JSON-safe (non-finite floats become None).

    Example:
        >>> import numpy as np
        >>> from gradand.experiments._report import to_jsonable
        >>> to_jsonable({"a": np.float32(0.5), "b": (1, np.nan), "c": np.arange(2)})
        {'a': 0.5, 'b': [1, None], 'c': [0, 1]}
    """
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_writable(directory: str | os.PathLike[str]) -> Path:
    """Create ``directory`` if needed and make sure a file can be written there.

    Raises ``OSError`` with a one-line message naming the directory otherwise.

    Example:
        >>> import tempfile
        >>> from gradand.experiments._report import check_writable
        >>> with tempfile.TemporaryDirectory() as d:
        ...     check_writable(d + "/results").name
        'results'
    """
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise OSError(f"output directory {str(path)!r} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".gradand-probe-", delete=True):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise OSError(f"output directory {str(path)!r} is not writable: {reason}") from None
    return path


def _file_mode() -> int:
    """The mode a newly created file gets under the current umask (mkstemp makes 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def _atomic_path(path: Path, suffix: str) -> Iterator[Path]:
    """A temporary path in ``path``'s directory, moved onto ``path`` on success."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike[str], data: Any, *, force: bool = False) -> Path:
    """Write ``data`` as JSON to ``path`` atomically.

    The JSON goes to a temporary file in the same directory, is flushed to
    disk, and then replaces ``path`` with ``os.replace`` (atomic on POSIX and
    Windows): a killed run leaves either the old file or the new one, never a
    half-written one. An existing file is only replaced with ``force``.

    Example:
        >>> import json, tempfile
        >>> from gradand.experiments._report import write_json_atomic
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = write_json_atomic(d + "/r.json", {"acc": 1.0})
        ...     json.loads(p.read_text())
        {'acc': 1.0}
    """
    path = Path(path)
    if path.exists() and not force:
        raise ResultExistsError(f"{str(path)!r} already exists; pass --force to overwrite it")
    text = json.dumps(to_jsonable(data), indent=2, allow_nan=False) + "\n"
    with _atomic_path(path, ".tmp") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return path


def have_matplotlib() -> bool:
    """Whether matplotlib is installed (plots are skipped otherwise).

    Example:
        >>> from gradand.experiments._report import have_matplotlib
        >>> isinstance(have_matplotlib(), bool)
        True
    """
    return importlib.util.find_spec("matplotlib") is not None


def save_figure(path: str | os.PathLike[str], draw: Callable[[Any], Any]) -> Path | None:
    """Draw with matplotlib (Agg backend) and save a PNG atomically; ``None`` without matplotlib.

    ``draw(plt)`` makes the figure and returns it. The PNG is written to a
    temporary file first and then moved into place, like the JSON.

    Example:
        >>> import tempfile
        >>> from gradand.experiments._report import save_figure
        >>> def draw(plt):
        ...     fig, ax = plt.subplots(figsize=(1, 1))
        ...     ax.plot([0, 1])
        ...     return fig
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = save_figure(d + "/f.png", draw)
        ...     p is None or p.read_bytes()[:4] == b"\\x89PNG"
        True
    """
    if not have_matplotlib():
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig = draw(plt)
    try:
        with _atomic_path(path, ".png") as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return path


def progress(
    iterable: Iterable[Any], *, total: int | None = None, desc: str = "", enabled: bool = True
) -> Any:
    """A tqdm progress bar on stderr (when tqdm is installed, ``enabled``, and stderr is a terminal).

    Example:
        >>> from gradand.experiments._report import progress
        >>> list(progress(range(3), desc="steps", enabled=False))
        [0, 1, 2]
    """
    if not enabled or importlib.util.find_spec("tqdm") is None:
        return iterable
    from tqdm.auto import tqdm

    # disable=None: tqdm shows the bar only when stderr is a terminal (no noise in logs and pipes).
    return tqdm(
        iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5, disable=None
    )


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation of a list of numbers.

    Example:
        >>> from gradand.experiments._report import mean_std
        >>> mean_std([0.5, 1.0])
        (0.75, 0.25)
    """
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std())


_NUMBER = re.compile(r"^(-|[-+]?[\d.]+(e[-+]?\d+)?( ± [\d.]+)?)$")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: numeric columns right-aligned, the others left-aligned.

    Example:
        >>> from gradand.experiments._report import format_table
        >>> print(format_table(["method", "acc"], [["mean", "0.50"], ["and_mask", "1.00"]]))
        method     acc
        mean      0.50
        and_mask  1.00
    """
    body = [[str(c) for c in row] for row in rows]
    cells = [[str(h) for h in headers], *body]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [bool(body) and all(_NUMBER.match(r[i]) for r in body) for i in range(len(headers))]
    lines = []
    for r in cells:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
