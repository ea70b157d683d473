"""The command line under faults: absurd sizes, interrupts and failures while writing, signals to workers.

Every absurd value is refused up front with one line naming the option, the value and the limit;
an interrupt or an error at any moment of the result write leaves the earlier set of files or the
new one (never a mix, never a temporary file) and the message says which; SIGTERM and Ctrl-C of
``spirals --jobs 2`` stop its workers within seconds, with one line and no traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradand import cli
from gradand.experiments import _parallel, _report
from gradand.experiments._report import ResultFiles

# --------------------------------------------------------------------------- helpers


def _refused(capsys, argv, *needles):
    """``main(argv)`` exits 2 with exactly one short line on stderr, nothing on stdout."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == ""
    assert err.startswith("gradand: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and len(err) < 400, err
    for needle in needles:
        assert needle in err, err
    return err


def _numeric_options():
    """(experiment, option, argparse type) for every option of every experiment that takes a number."""
    parser = cli.build_parser()
    reproduce = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    reproduce = reproduce.choices["reproduce"]
    experiments = next(a for a in reproduce._actions if isinstance(a, argparse._SubParsersAction))
    found = []
    for name, sub in experiments.choices.items():
        for action in sub._actions:
            if action.type not in (None, *STRING_TYPES) and action.option_strings:
                found.append((name, action.option_strings[0], action.type))
    return found


#: The options that take text, validated by these (length, NUL bytes); every other typed option is a number.
STRING_TYPES = (cli._directory, cli._device)


NUMERIC = _numeric_options()
INT_OPTIONS = [(e, o) for e, o, t in NUMERIC if o in cli.LIMITS and isinstance(cli.LIMITS[o], int)]
INT_OPTIONS += [(e, o) for e, o, _ in NUMERIC if o in ("--jobs", "--threads")]
FLOAT_OPTIONS = [(e, o) for e, o, _ in NUMERIC if isinstance(cli.LIMITS.get(o), float)]


def _limit(option: str) -> int | float:
    if option in ("--jobs", "--threads"):
        return cli.PER_CPU * _parallel.available_cpus()
    return cli.LIMITS[option]


def _listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --------------------------------------------------------------------------- absurd sizes


def test_every_numeric_option_of_every_experiment_has_a_limit():
    options = {o for _, o, _ in NUMERIC}
    # --seeds and --thresholds are lists (limited by how many); --jobs and --threads by the CPUs
    assert options == set(cli.LIMITS) - {"--seeds", "--thresholds"} | {"--jobs", "--threads"}
    # and each is enforced by its parser (not only listed)
    for _experiment, _option, parse in NUMERIC:
        with pytest.raises(argparse.ArgumentTypeError, match="too large; at most"):
            parse(str(10**30))


@pytest.mark.parametrize(("experiment", "option"), INT_OPTIONS)
@pytest.mark.parametrize("value", ["{limit_plus_1}", "100000000000", "9" * 5000, "1e400", "-" + "9" * 40])
def test_absurd_integers_are_refused_naming_the_option_the_value_and_the_limit(
    capsys, tmp_path, experiment, option, value
):
    limit = _limit(option)
    text = value.format(limit_plus_1=int(limit) + 1)
    err = _refused(capsys, ["reproduce", experiment, option, text, "--out", str(tmp_path)], option)
    if text.lstrip("-").isdigit() and not text.startswith("-"):
        assert text[:20] in err and f"at most {limit}" in err
    assert not tmp_path.exists() or _listing(tmp_path) == []


@pytest.mark.parametrize(("experiment", "option"), FLOAT_OPTIONS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e309", "1e300", "-1", "twelve", ""])
def test_absurd_numbers_are_refused_naming_the_option(capsys, tmp_path, experiment, option, value):
    err = _refused(capsys, ["reproduce", experiment, option, value, "--out", str(tmp_path)], option)
    if value == "1e300":
        assert f"at most {cli.LIMITS[option]:g}" in err
    assert _listing(tmp_path) == []


@settings(max_examples=60, deadline=None)
@given(
    option=st.sampled_from(sorted({o for _, o in INT_OPTIONS})),
    excess=st.integers(min_value=1, max_value=10**60),
)
def test_any_integer_above_a_limit_is_refused_by_the_parser(option, excess):
    parse = next(t for _, o, t in NUMERIC if o == option)
    value = int(_limit(option)) + excess
    with pytest.raises(argparse.ArgumentTypeError) as e:
        parse(str(value))
    message = str(e.value)
    assert "\n" not in message and f"at most {_limit(option)}" in message and len(message) < 200


@settings(max_examples=60, deadline=None)
@given(count=st.integers(min_value=cli.LIMITS["--seeds"] + 1, max_value=10**40))
def test_any_seed_count_above_the_limit_is_refused_without_allocating(count):
    with pytest.raises(cli.CLIError, match=rf"--seeds .*at most {cli.LIMITS['--seeds']}"):
        cli._parse_seeds(str(count))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(min_value=cli.MAX_SEED + 1, max_value=10**4000))
def test_any_seed_value_above_the_seeding_range_is_refused(seed):
    with pytest.raises(cli.CLIError, match=rf"--seeds: seed .* too large; at most {cli.MAX_SEED}") as e:
        cli._parse_seeds(f"0,{seed}")
    assert len(str(e.value)) < 200


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["spirals", "--seeds", "100000000000"], ["--seeds 100000000000", "at most 1000"]),
        (
            ["patchwork", "--seeds", ",".join(map(str, range(1001)))],
            ["--seeds", "1001 seeds", "at most 1000"],
        ),
        (["consistency", "--seeds", "0,4294967296"], ["--seeds", "4294967296", "at most 4294967295"]),
        (["spirals", "--seeds", "0,,1"], ["--seeds '0,,1'"]),
        (["spirals", "--seeds", "9" * 5000], ["--seeds 99999", "(5000 characters)", "at most 1000"]),
        (["spirals", "--seeds", "1," + "9" * 5000], ["--seeds: seed 99999", "at most 4294967295"]),
        (["spirals", "--envs", "1000", "--examples-per-env", "100000"], ["--envs 1000", "at most 1e+08"]),
        (["spirals", "--shortcut-dims", "1000", "--n-test", "1000000"], ["--shortcut-dims 1000", "at most"]),
        (["spirals", "--methods", "mean,mean"], ["--methods", "mean appears twice"]),
        (["spirals", "--methods", "x" * 5000], ["--methods", "characters"]),
        (["spirals", "--threshold", "9" * 5000], ["--threshold", "out of range"]),
        (["memorization", "--labels", "true,true"], ["--labels", "true appears twice"]),
        (["memorization", "--thresholds", ",".join(str(i / 1000) for i in range(101))], ["at most 100"]),
        (["spirals", "--device", "cuda:" + "9" * 3000], ["--device", "(3005 characters)", "not a device"]),
        (["patchwork", "--out", ""], ["--out", "not a directory name"]),
        (["patchwork", "--out", "a\0b"], ["--out", "not a directory name"]),
    ],
)
def test_absurd_lists_sizes_and_names_are_refused_in_one_line(capsys, tmp_path, argv, needles):
    out = [] if "--out" in argv else ["--out", str(tmp_path)]
    _refused(capsys, ["reproduce", *argv, *out], *needles)
    assert _listing(tmp_path) == []


def test_a_corrupt_cifar_directory_is_named_in_one_line(capsys, tmp_path):
    pytest.importorskip("torch")
    data = tmp_path / "cifar"
    data.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (data / name).write_bytes(b"\x80\x04not a pickle")
    out = tmp_path / "out"
    _refused(
        capsys,
        ["reproduce", "memorization", "--dataset", "cifar10", "--data-dir", str(data), "--out", str(out)],
        "--data-dir",
        "could not read CIFAR-10",
    )
    assert not out.exists()


def test_running_out_of_memory_anyway_is_one_line_not_a_traceback(capsys, tmp_path, monkeypatch):
    def exhausted(*args):
        raise MemoryError

    monkeypatch.setitem(cli.HANDLERS, "patchwork", exhausted)
    assert cli.main(["reproduce", "patchwork", "--out", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and "out of memory" in err and "no result written" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- the result set under faults


def _draw(plt):
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1])
    return fig


OLD_JSON, OLD_PNG = '{"old": true}\n', b"old plot"

needs_default_sigterm = pytest.mark.skipif(
    sys.platform == "win32" or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL,
    reason="POSIX signals; the CLI turns SIGTERM into an exception only where it has its default action",
)


def _state(d: Path) -> tuple[str | None, bytes | None]:
    j, p = d / "r.json", d / "r.png"
    return (j.read_text() if j.exists() else None, p.read_bytes() if p.exists() else None)


class _Fault:
    """Raise ``error`` at the n-th call of any of the file operations the writer uses."""

    def __init__(self, monkeypatch, n: int, error: BaseException):
        self.n, self.error, self.calls = n, error, 0
        for module, name in [
            (_report.os, "replace"),
            (_report.os, "fsync"),
            (_report.os, "chmod"),
            (_report.tempfile, "mkstemp"),
            (_report, "_render_png"),
        ]:
            monkeypatch.setattr(module, name, self._wrap(getattr(module, name)))

    def _wrap(self, real):
        def call(*args, **kwargs):
            self.calls += 1
            if self.calls == self.n:
                raise self.error
            return real(*args, **kwargs)

        return call


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left on device")])
@pytest.mark.parametrize(
    ("before", "plot"),
    [
        ("json+png", True),  # the usual --force rerun
        ("json", True),  # an earlier run without a plot
        ("json+png", False),  # --force --no-plot: the earlier plot must go with its JSON
        ("nothing", True),
    ],
)
def test_a_fault_at_every_step_of_the_write_leaves_the_old_set_or_the_new_one_and_says_which(
    tmp_path, monkeypatch, error, before, plot
):
    n = 0
    new_state = None
    while True:
        n += 1
        d = tmp_path / f"try{n}"
        d.mkdir()
        if before != "nothing":
            (d / "r.json").write_text(OLD_JSON)
        if before == "json+png":
            (d / "r.png").write_bytes(OLD_PNG)
        old = _state(d)
        files = ResultFiles(d / "r.json", d / "r.png")
        with monkeypatch.context() as m:
            fault = _Fault(m, n, error)
            try:
                files.write({"new": n}, _draw if plot else None, force=True)
                failed = False
            except (KeyboardInterrupt, OSError):
                failed = True
        assert set(_listing(d)) <= {"r.json", "r.png"}, (n, _listing(d))  # no temporary file
        state = _state(d)
        if not failed:  # the fault came after the last operation: the new set, complete
            assert json.loads(state[0]) == {"new": n}
            assert (state[1] is not None and state[1][:4] == b"\x89PNG") if plot else state[1] is None
            assert files.written == ([d / "r.png", d / "r.json"] if plot else [d / "r.json"])
            assert files.describe().startswith("result written: ")
            new_state = state
            break
        assert state == old, (n, files.describe())  # interrupted: the earlier set, whole
        assert files.written == [] and files.removed == [] and files.leftovers == []
        assert files.describe() == "no result written"
        assert fault.calls >= n
    assert n >= 4 and new_state is not None  # the injector reached every step before the last


@needs_default_sigterm
def test_signals_that_arrive_while_the_files_are_moved_wait_until_both_are_in_place(tmp_path, monkeypatch):
    (tmp_path / "r.json").write_text(OLD_JSON)
    (tmp_path / "r.png").write_bytes(OLD_PNG)
    real = os.replace
    calls = []

    def replace_and_interrupt(src, dst):
        calls.append(dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between the moves
        real(src, dst)

    monkeypatch.setattr(_report.os, "replace", replace_and_interrupt)
    files = ResultFiles(tmp_path / "r.json", tmp_path / "r.png")
    with pytest.raises(KeyboardInterrupt):
        files.write({"new": True}, _draw, force=True)
    assert json.loads((tmp_path / "r.json").read_text()) == {"new": True}
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert _listing(tmp_path) == ["r.json", "r.png"]
    assert files.describe() == f"result written: {tmp_path / 'r.png'}, {tmp_path / 'r.json'}"


def test_a_plot_that_cannot_be_put_back_is_named_and_kept(tmp_path, monkeypatch):
    (tmp_path / "r.json").write_text(OLD_JSON)
    (tmp_path / "r.png").write_bytes(OLD_PNG)
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == "r.json" or Path(src).name.endswith(".old"):
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(_report.os, "replace", replace)
    files = ResultFiles(tmp_path / "r.json", tmp_path / "r.png")
    with pytest.raises(OSError):
        files.write({"new": True}, _draw, force=True)
    (backup,) = files.leftovers
    assert backup.read_bytes() == OLD_PNG  # the only copy of the earlier plot is not deleted
    assert (tmp_path / "r.json").read_text() == OLD_JSON
    assert files.written == [tmp_path / "r.png"]
    assert files.describe() == f"result written: {tmp_path / 'r.png'}; left behind: {backup}"


# --------------------------------------------------------------------------- through the command line


def _old_set(d: Path) -> None:
    d.mkdir(exist_ok=True)
    (d / "patchwork.json").write_text(OLD_JSON)
    (d / "patchwork.png").write_bytes(OLD_PNG)


def _cli(capsys, d: Path, *extra: str) -> tuple[int, str, str]:
    code = cli.main(["reproduce", "patchwork", "--steps", "20", "--out", str(d), "--force", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def _is_old(d: Path) -> bool:
    return (d / "patchwork.json").read_text() == OLD_JSON and (d / "patchwork.png").read_bytes() == OLD_PNG


def _is_new(d: Path) -> bool:
    doc = json.loads((d / "patchwork.json").read_text())
    return doc.get("experiment") == "patchwork" and (d / "patchwork.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("step", [1, 2, 3])
def test_ctrl_c_during_any_rename_keeps_the_old_set_and_says_no_result_written(
    capsys, tmp_path, monkeypatch, step
):
    _old_set(tmp_path)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == step:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(_report.os, "replace", replace)
    code, _, err = _cli(capsys, tmp_path)
    assert code == 130
    assert err == "gradand: interrupted (no result written)\n"
    assert _is_old(tmp_path) and _listing(tmp_path) == ["patchwork.json", "patchwork.png"]


@needs_default_sigterm
@pytest.mark.parametrize(
    ("signum", "code", "said"),
    [(signal.SIGTERM, 143, "terminated by SIGTERM"), (signal.SIGINT, 130, "interrupted")],
)
def test_a_signal_while_the_plot_renders_leaves_the_old_set_and_no_temporary_file(
    capsys, tmp_path, monkeypatch, signum, code, said
):
    _old_set(tmp_path)
    real = _report._render_png

    def render(path, draw):
        os.kill(os.getpid(), signum)  # the signal lands while the PNG is being written
        real(path, draw)

    monkeypatch.setattr(_report, "_render_png", render)
    got, _, err = _cli(capsys, tmp_path)
    assert got == code
    assert err == f"gradand: {said} (no result written)\n"
    assert _is_old(tmp_path) and _listing(tmp_path) == ["patchwork.json", "patchwork.png"]


@needs_default_sigterm
@pytest.mark.parametrize(
    ("signum", "code", "said"),
    [(signal.SIGTERM, 143, "terminated by SIGTERM"), (signal.SIGINT, 130, "interrupted")],
)
def test_a_signal_between_the_two_renames_lands_after_both_and_the_message_names_them(
    capsys, tmp_path, monkeypatch, signum, code, said
):
    _old_set(tmp_path)
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == "patchwork.json":
            os.kill(os.getpid(), signum)  # after the PNG is in place, before the JSON
        real(src, dst)

    monkeypatch.setattr(_report.os, "replace", replace)
    got, _, err = _cli(capsys, tmp_path)
    assert got == code
    png, js = tmp_path / "patchwork.png", tmp_path / "patchwork.json"
    assert err == f"gradand: {said} (result written: {png}, {js})\n"
    assert _is_new(tmp_path) and _listing(tmp_path) == ["patchwork.json", "patchwork.png"]


def test_a_full_disk_keeps_the_old_set_and_says_so_in_one_line(capsys, tmp_path, monkeypatch):
    _old_set(tmp_path)
    real = _report._render_png

    def render(path, draw):
        real(path, draw)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_report, "_render_png", render)
    code, _, err = _cli(capsys, tmp_path)
    assert code == 2
    assert err == (
        f"gradand: error: could not write {str(tmp_path / 'patchwork.png')!r}: No space left on device; "
        "no result written\n"
    )
    assert _is_old(tmp_path) and _listing(tmp_path) == ["patchwork.json", "patchwork.png"]


def test_a_rerun_without_a_plot_removes_the_earlier_plot_and_says_so(capsys, tmp_path):
    _old_set(tmp_path)
    code, out, _ = _cli(capsys, tmp_path, "--no-plot")
    assert code == 0
    assert f"removed: {tmp_path / 'patchwork.png'} (the earlier result's plot" in out
    assert _listing(tmp_path) == ["patchwork.json"]


def test_a_plot_left_from_an_earlier_run_needs_force_too(capsys, tmp_path):
    (tmp_path / "patchwork.png").write_bytes(OLD_PNG)
    _refused(capsys, ["reproduce", "patchwork", "--out", str(tmp_path)], "patchwork.png", "--force")
    assert (tmp_path / "patchwork.png").read_bytes() == OLD_PNG


def test_a_closed_stdout_does_not_stop_the_result_being_written(tmp_path):
    code = (
        "import sys; from gradand.cli import main; "
        f"sys.exit(main(['reproduce', 'patchwork', '--steps', '20', '--out', {str(tmp_path)!r}]))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # like `gradand ... | head -0`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err
    assert _listing(tmp_path) == ["patchwork.json", "patchwork.png"]


# --------------------------------------------------------------------------- worker processes


def _children(pid: int) -> list[int]:
    """Live descendants of ``pid`` (psutil when installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
    if not os.path.isdir("/proc"):
        pytest.skip("needs psutil or /proc to list child processes")
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parents.items() if p in frontier]
        found += kids
        frontier = kids
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the OS
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _start_spirals(out: Path) -> subprocess.Popen:
    pytest.importorskip("torch")
    cmd = [
        sys.executable, "-m", "gradand.cli", "reproduce", "spirals", "--quick", "--jobs", "2",
        "--methods", "mean", "--seeds", "2", "--epochs", "20000", "--no-progress", "--out", str(out),
    ]  # fmt: skip
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # even if ours is ignored
    )


def _wait_for_workers(proc: subprocess.Popen, busy: bool) -> list[int]:
    """The two workers' pids, once spawned (and, if ``busy``, once each has trained for a moment)."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        kids = _children(proc.pid)
        workers = [k for k in kids if b"multiprocessing-fork" in _cmdline(k)]
        if len(workers) >= 2 and (not busy or all(_cpu_seconds(w) > 1.5 for w in workers)):
            return kids
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the workers did not start within 90 s")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b"multiprocessing-fork"  # no /proc: count every child


def _assert_stopped(proc, kids, out: Path, code: int, line: str):
    start = time.monotonic()
    _, stderr = proc.communicate(timeout=30)
    while any(_alive(k) for k in kids) and time.monotonic() - start < 10:
        time.sleep(0.05)
    left = [k for k in kids if _alive(k)]
    for k in left:  # do not leave them running if the assertion below fails
        os.kill(k, signal.SIGKILL)
    assert left == [], f"still running {time.monotonic() - start:.1f} s after the signal"
    assert time.monotonic() - start < 10
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines() == [line], stderr
    assert not out.exists() or _listing(out) == []


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_to_the_main_process_stops_the_spirals_workers_within_seconds(tmp_path):
    out = tmp_path / "out"
    proc = _start_spirals(out)
    kids = _wait_for_workers(proc, busy=True)
    os.kill(proc.pid, signal.SIGTERM)  # `kill -TERM <main pid>`: the workers get no signal of their own
    _assert_stopped(proc, kids, out, 143, "gradand: terminated by SIGTERM (no result written)")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("busy", [True, False], ids=["while-training", "while-workers-start"])
def test_ctrl_c_stops_the_workers_with_one_line_and_no_worker_tracebacks(tmp_path, busy):
    out = tmp_path / "out"
    proc = _start_spirals(out)
    kids = _wait_for_workers(proc, busy=busy)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C signals the whole foreground group
    _assert_stopped(proc, kids, out, 130, "gradand: interrupted (no result written)")


def _sleep_then_return(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def _sigint_disposition(_: int) -> str:
    return signal.getsignal(signal.SIGINT).name


def test_workers_ignore_sigint_and_the_main_process_keeps_it():
    out = _parallel.run_jobs(_sigint_disposition, [(0,), (1,)], workers=2, backend="numpy", threads=1)
    assert out == ["SIG_IGN", "SIG_IGN"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_interrupt_in_the_main_process_terminates_running_jobs_instead_of_waiting_for_them():
    import multiprocessing

    def interrupt(i, result):
        raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        _parallel.run_jobs(
            _sleep_then_return, [(0.0,), (120.0,), (120.0,)], workers=2, backend="numpy", threads=1,
            on_done=interrupt,
        )  # fmt: skip
    assert time.monotonic() - start < 30  # not the 120 s the running job would take
    assert multiprocessing.active_children() == []
