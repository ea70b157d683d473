"""Independent training runs in worker processes, one CPU thread budget each.

The experiments train many small models (methods × seeds) whose steps are
dominated by matrix products too small to use several cores well: two
processes with one thread each finish a batch of runs about twice as fast as
one process with two threads. Workers are *spawned* (not forked: torch,
TensorFlow and XLA keep thread pools that do not survive a fork) and set
their framework's thread count before any work, so a run computes the same
numbers whichever worker runs it, given the same thread count.

Stopping is prompt: when the main process is interrupted (Ctrl-C, or SIGTERM
turned into an exception by the caller) or a job fails, the workers are
terminated at once rather than left to finish their runs. Workers ignore
SIGINT, so Ctrl-C in a terminal (which signals every process of the
foreground group) is answered by the main process alone, without a
traceback from each worker; on Linux a worker also ends when the main
process dies without cleaning up (``PR_SET_PDEATHSIG``).

Standard library only.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any, TypeVar

K = TypeVar("K", bound=Hashable)

__all__ = ["available_cpus", "run_jobs", "run_many", "set_threads", "worker_plan"]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one).

    Example:
        >>> from gradand.experiments._parallel import available_cpus
        >>> available_cpus() >= 1
        True
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def worker_plan(n_jobs: int, jobs: int | None, threads: int | None, device: str) -> tuple[int, int | None]:
    """``(workers, threads per worker)`` for ``n_jobs`` runs.

    ``jobs=None`` picks one worker per available CPU on ``cpu`` (at most
    ``n_jobs``) and one worker on an accelerator; ``threads=None`` then
    splits the CPUs evenly between workers (``None`` with one worker: the
    framework's default).

    Example:
        >>> from gradand.experiments._parallel import worker_plan
        >>> worker_plan(24, 2, None, "cpu")
        (2, 1)
        >>> worker_plan(24, 1, None, "cpu")
        (1, None)
        >>> worker_plan(3, 8, 2, "cpu")
        (3, 2)
    """
    if jobs is None:
        jobs = available_cpus() if device == "cpu" else 1
    workers = max(1, min(int(jobs), int(n_jobs)))
    if threads is None and workers > 1:
        threads = max(1, available_cpus() // workers)
    return workers, threads


def set_threads(backend: str, n: int) -> None:
    """Pin ``backend``'s CPU thread count to ``n`` (before its first computation).

    JAX reads its flags when it is imported: after that, this has no effect
    on JAX (the thread count stays XLA's choice).

    Example:
        >>> from gradand.experiments._parallel import set_threads
        >>> set_threads("numpy", 1)  # numpy: nothing to pin
    """
    if backend == "torch":
        import torch

        torch.set_num_threads(n)
    elif backend == "tensorflow":
        import tensorflow as tf

        try:
            tf.config.threading.set_intra_op_parallelism_threads(n)
            tf.config.threading.set_inter_op_parallelism_threads(n)
        except RuntimeError:  # already initialised (in-process reuse)
            pass
    elif backend == "jax" and "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={n}"
        )


#: Seconds a terminated worker gets to exit before it is killed.
_STOP_GRACE_S = 3.0


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this process when ``parent`` dies (even by SIGKILL); elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - no libc / no prctl
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _init_worker(backend: str, threads: int | None, parent: int) -> None:
    # Ctrl-C reaches every process of the terminal's foreground group: the main process
    # answers it (and terminates the workers); a worker ignores it instead of printing a
    # traceback. (It was blocked at spawn time too, so it cannot land during start-up.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)
    if threads is not None:
        set_threads(backend, threads)


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread while workers are spawned (they inherit the mask).

    A Ctrl-C meanwhile stays pending and is delivered when the block ends.
    """
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _stop(pool: cf.ProcessPoolExecutor) -> None:
    """Cancel what has not started and terminate the workers now (killed after a grace period)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            p.terminate()
    deadline = time.monotonic() + _STOP_GRACE_S
    for p in processes:
        with contextlib.suppress(OSError, ValueError, AttributeError, AssertionError):
            _reap(p, deadline)
            if p.is_alive():
                p.kill()
                _reap(p, time.monotonic() + _STOP_GRACE_S)


def _reap(p: Any, until: float) -> None:
    """Wait until ``p`` has exited and is reaped, or until ``until``.

    ``join(timeout)`` alone can return with the process still alive: it waits for the process's
    end of a pipe to close, which happens while the process is still exiting (a worker killed
    while it starts up), and then polls once without blocking.
    """
    while p.is_alive() and time.monotonic() < until:
        p.join(0.05)
        if p.is_alive():
            time.sleep(0.005)


def run_jobs(
    fn: Callable[..., Any],
    jobs: Sequence[tuple[Any, ...]],
    *,
    workers: int,
    backend: str,
    threads: int | None,
    on_done: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """``[fn(*job) for job in jobs]``, in ``workers`` spawned processes; results in ``jobs`` order.

    ``fn`` must be a module-level function and every job picklable. With one
    worker everything runs in this process (its thread count pinned when
    ``threads`` is given). ``on_done(index, result)`` is called in this
    process as each job finishes. The first job that raises, or an
    exception in this process (``KeyboardInterrupt``, or whatever a SIGTERM
    handler raises), cancels the jobs not yet started, terminates the
    workers (running jobs included, within seconds) and propagates.

    Example:
        >>> from gradand.experiments._parallel import run_jobs
        >>> run_jobs(pow, [(2, 3), (3, 2)], workers=1, backend="numpy", threads=None)
        [8, 9]
    """
    results: list[Any] = [None] * len(jobs)
    if workers <= 1:
        if threads is not None:
            set_threads(backend, threads)
        for i, job in enumerate(jobs):
            results[i] = fn(*job)
            if on_done is not None:
                on_done(i, results[i])
        return results
    ctx = multiprocessing.get_context("spawn")
    pool = cf.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(backend, threads, os.getpid()),
    )
    try:
        with _sigint_blocked():  # workers are spawned by submit(): none starts able to see a Ctrl-C
            futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
        for future in cf.as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            if on_done is not None:
                on_done(i, results[i])
    except BaseException:
        _stop(pool)
        raise
    pool.shutdown(wait=True)
    return results


def run_many(
    fn: Callable[..., Any],
    runs: Sequence[K],
    job: Callable[[K, bool], tuple[Any, ...]],
    *,
    jobs: int | None,
    threads: int | None,
    device: str,
    backend: str,
    desc: str,
    show_progress: bool,
    first: Callable[[K], Any] | None = None,
    inner_progress: bool = False,
    log: Callable[[str], None] | None = None,
    line: Callable[[K, Any], str] | None = None,
) -> tuple[dict[K, Any], int, int | None]:
    """An experiment's runs (e.g. ``(seed, method)`` keys), in workers, with one progress bar.

    ``job(key, progress)`` gives ``fn``'s arguments for a run (``progress``: whether that run may
    show its own bar, i.e. one worker and ``inner_progress``); runs go in ``first``'s order
    (smallest key first: the longest runs, so that workers finish together); ``log(line(key,
    result))`` as each finishes. Returns ``({key: result}, workers, threads per worker)``
    (:func:`worker_plan`'s, for the report).

    Example:
        >>> from gradand.experiments._parallel import run_many
        >>> run_many(pow, [2, 3], lambda k, _: (k, 2), jobs=1, threads=None, device="cpu",
        ...          backend="numpy", desc="powers", show_progress=False)[0]
        {2: 4, 3: 9}
    """
    from gradand.experiments._report import progress

    workers, threads = worker_plan(len(runs), jobs, threads, device)
    order = list(range(len(runs)))
    if first is not None:
        order.sort(key=lambda i: first(runs[i]))
    inner = inner_progress and show_progress and workers == 1
    bar = progress(range(len(runs)), total=len(runs), desc=desc, enabled=show_progress and not inner)
    ticks = iter(bar)

    def done(k: int, out: Any) -> None:
        next(ticks, None)
        if log is not None and line is not None:
            log(line(runs[order[k]], out))

    try:
        outs = run_jobs(
            fn, [job(runs[i], inner) for i in order], workers=workers, backend=backend, threads=threads,
            on_done=done,
        )  # fmt: skip
    finally:
        if hasattr(bar, "close"):
            bar.close()
    return {runs[i]: out for i, out in zip(order, outs)}, workers, threads
