"""What every experiment shares: atomic result files, progress bars, tables, plots, checks.

A result is a set of files (``NAME.json`` and its plot ``NAME.png``) written
by :class:`ResultFiles` as one unit: both are rendered to temporary files
beside their destination first and then moved into place with SIGINT,
SIGTERM and SIGHUP held back, so an interrupt at any moment leaves either the earlier
set or the new one, never a mix and never a temporary file.

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
import signal
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "Check",
    "Report",
    "ResultExistsError",
    "ResultFiles",
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
        with _signals_held(), tempfile.NamedTemporaryFile(dir=path, prefix=".gradand-probe-", delete=True):
            pass
    except ValueError as e:  # e.g. an embedded NUL byte
        raise OSError(f"output directory {str(path)!r} is not a valid path: {e}") from None
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise OSError(f"output directory {str(path)!r} is not writable: {reason}") from None
    return path


def _file_mode() -> int:
    """The mode a newly created file gets under the current umask (mkstemp makes 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


#: Signals held back while result files are moved into place (and temporaries removed).
_HELD = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Run the block with SIGINT, SIGTERM and SIGHUP held back; afterwards they act as usual.

    A signal that arrives meanwhile is recorded, and re-raised (to the handler
    that was in place) when the block ends. Only the main thread receives
    Python signal handlers, so elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous: dict[int, Any] = {}
    for signum in _HELD:
        handler = signal.getsignal(signum)
        if handler is None or handler == signal.SIG_IGN:  # installed outside Python, or ignored
            continue
        previous[signum] = signal.signal(signum, lambda n, _frame: caught.append(n))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(caught):
            signal.raise_signal(signum)


@contextlib.contextmanager
def _atomic_path(path: Path, suffix: str) -> Iterator[Path]:
    """A temporary path in ``path``'s directory, moved onto ``path`` on success."""
    with _signals_held():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
        os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _file_mode())
        with _signals_held():
            os.replace(tmp, path)
    except BaseException:
        with _signals_held(), contextlib.suppress(OSError):
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
    path = Path(path)
    with _atomic_path(path, ".png") as tmp:
        _render_png(tmp, draw)
    return path


def _render_png(path: Path, draw: Callable[[Any], Any]) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig = draw(plt)
    try:
        fig.savefig(path, dpi=110, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)


def _and(paths: Sequence[Path]) -> str:
    return ", ".join(str(p) for p in paths)


class ResultFiles:
    """A result's JSON and its PNG plot, written as one set.

    :meth:`write` serialises the JSON and renders the plot to temporary files
    in the destination directory, then moves them into place with SIGINT,
    SIGTERM and SIGHUP held back until both are there (a signal meanwhile
    acts right after). A failure between the two moves puts the earlier plot
    back. So after an interrupt or an error at any moment the directory holds
    the complete earlier set or the complete new one, and no temporary file.
    A new result without a plot removes the earlier result's plot (with
    ``force``): it would not match the new JSON.

    :attr:`written`, :attr:`removed` and :attr:`leftovers` say at every moment
    what :meth:`write` changed on disk, also when it raised, and
    :meth:`describe` puts that in words.

    Example:
        >>> import json, tempfile
        >>> from pathlib import Path
        >>> from gradand.experiments._report import ResultFiles
        >>> with tempfile.TemporaryDirectory() as d:
        ...     files = ResultFiles(Path(d) / "r.json", Path(d) / "r.png")
        ...     written = files.write({"acc": 1.0})  # no plot
        ...     [p.name for p in written], json.loads(files.json_path.read_text())
        (['r.json'], {'acc': 1.0})
        >>> files.describe().endswith("r.json")
        True
    """

    def __init__(self, json_path: str | os.PathLike[str], png_path: str | os.PathLike[str] | None = None):
        self.json_path = Path(json_path)
        self.png_path = None if png_path is None else Path(png_path)
        #: files on disk that hold the new result
        self.written: list[Path] = []
        #: files of the earlier result removed because the new one has none (its plot)
        self.removed: list[Path] = []
        #: temporary files, or the earlier plot's backup, that could not be removed or put back
        self.leftovers: list[Path] = []
        self._target = self.json_path

    def existing(self) -> list[Path]:
        """The files of this set that are already there (a result ``write`` needs ``force`` for).

        Example:
            >>> import tempfile
            >>> from pathlib import Path
            >>> from gradand.experiments._report import ResultFiles
            >>> with tempfile.TemporaryDirectory() as d:
            ...     ResultFiles(Path(d) / "r.json", Path(d) / "r.png").existing()
            []
        """
        paths = [self.json_path] if self.png_path is None else [self.json_path, self.png_path]
        return [p for p in paths if os.path.lexists(p)]

    def describe(self) -> str:
        """What :meth:`write` changed, in words: ``no result written`` or ``result written: ...``.

        Example:
            >>> from gradand.experiments._report import ResultFiles
            >>> ResultFiles("r.json", "r.png").describe()
            'no result written'
        """
        text = f"result written: {_and(self.written)}" if self.written else "no result written"
        if self.removed:
            text += f"; removed the earlier result's {_and(self.removed)}"
        if self.leftovers:
            text += f"; left behind: {_and(self.leftovers)}"
        return text

    def write(
        self, document: Any, draw: Callable[[Any], Any] | None = None, *, force: bool = False
    ) -> list[Path]:
        """Write ``document`` as the JSON and ``draw(plt)``'s figure as the PNG; returns the files written.

        Raises :class:`ResultExistsError` when a file of the set exists and
        ``force`` is not given, ``TypeError``/``ValueError`` for a document
        that is not JSON (before any file is touched), and ``OSError`` (its
        ``filename`` the file of the set concerned) when a file cannot be
        written; an interrupt propagates. In every case the earlier set is
        left whole unless the new one is complete, and :attr:`written` says
        which.
        """
        json_path, png_path = self.json_path, self.png_path
        if draw is not None and png_path is None:
            raise ValueError("a plot needs png_path")
        there = self.existing()
        if there and not force:
            raise ResultExistsError(f"{str(there[0])!r} already exists; pass --force to overwrite it")
        text = json.dumps(to_jsonable(document), indent=2, allow_nan=False) + "\n"
        temps: list[Path] = []

        def temporary(target: Path, suffix: str) -> Path:
            with _signals_held():
                fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
                os.close(fd)
                temps.append(Path(name))
            return Path(name)

        self._target = json_path
        try:
            try:
                tmp_json = temporary(json_path, ".tmp")
                with open(tmp_json, "w", encoding="utf-8") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp_json, _file_mode())
                tmp_png = None
                if draw is not None and png_path is not None:
                    self._target = png_path
                    tmp_png = temporary(png_path, ".png")
                    _render_png(tmp_png, draw)
                    os.chmod(tmp_png, _file_mode())
                with _signals_held():
                    self._commit(tmp_json, tmp_png, temps)
            except OSError as e:
                raise OSError(e.errno, e.strerror or str(e), str(self._target)) from e
        finally:
            with _signals_held():
                for tmp in temps:
                    try:
                        os.unlink(tmp)
                    except FileNotFoundError:
                        pass
                    except OSError:
                        self.leftovers.append(tmp)
        return list(self.written)

    def _move(self, src: Path, dst: Path, temps: list[Path]) -> None:
        os.replace(src, dst)
        if src in temps:
            temps.remove(src)

    def _commit(self, tmp_json: Path, tmp_png: Path | None, temps: list[Path]) -> None:
        """Move the temporaries into place: the plot first, the JSON last; undo the plot on failure."""
        png_path = self.png_path
        backup: Path | None = None
        try:
            if png_path is not None and (tmp_png is not None or os.path.lexists(png_path)):
                self._target = png_path
                if os.path.lexists(png_path):  # keep the earlier plot until the JSON is in place
                    fd, name = tempfile.mkstemp(
                        dir=png_path.parent, prefix=f".{png_path.name}.", suffix=".old"
                    )
                    os.close(fd)
                    backup = Path(name)
                    temps.append(backup)
                    os.replace(png_path, backup)
                    self.removed.append(png_path)
                if tmp_png is not None:
                    self._move(tmp_png, png_path, temps)
                    self.written.append(png_path)
                    if backup is not None:
                        self.removed.remove(png_path)
            self._target = self.json_path
            self._move(tmp_json, self.json_path, temps)
            self.written.append(self.json_path)
        except BaseException:
            self._undo_plot(backup, temps)
            raise

    def _undo_plot(self, backup: Path | None, temps: list[Path]) -> None:
        """Put the earlier plot back (or remove the new one where there was none)."""
        png_path = self.png_path
        if png_path is None or png_path not in self.written + self.removed:
            return
        try:
            if backup is not None:
                os.replace(backup, png_path)
                temps.remove(backup)
            else:
                os.unlink(png_path)
        except OSError:
            if backup is not None:  # keep it: it is the only copy of the earlier plot
                temps.remove(backup)
                self.leftovers.append(backup)
            return
        for paths in (self.written, self.removed):
            if png_path in paths:
                paths.remove(png_path)


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
