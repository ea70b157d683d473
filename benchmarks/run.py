"""The gradand benchmark suite: one full training step of every strategy, relative to plain averaging.

For each framework (one worker process each, threads pinned before the framework is
imported) and each workload, every strategy runs one full training step (forward,
gradients, combine, optimizer step); strategies are timed side by side in interleaved
rounds in a random order and the medians reported, with the ratio to plain averaging in
the same framework (median over rounds of the paired per-round ratio). Extra peak memory
over plain averaging: on CPU the peak RSS of the steps themselves (reset after a warm-up
step, read from ``VmHWM``; ``_common.peak_rss_of``) in a process forked per strategy (torch)
or a fresh interpreter per strategy (TensorFlow, where forking after its thread pools start
deadlocks), or XLA's temporary-buffer size of the compiled step (JAX); on CUDA
``torch.cuda.max_memory_allocated`` (torch) and XLA's temporary buffers (JAX).

Writes ``bench.json``, ``bench.md`` and ``bench.png`` in ``--out`` (atomically).

Run:
    python benchmarks/run.py --threads 1                     # the full suite (minutes)
    python benchmarks/run.py --quick                         # tiny sizes, 2 rounds (seconds)
    python benchmarks/run.py --frameworks torch --workloads mlp,per-example --rounds 9
    python benchmarks/run.py --quick --workloads convnet,resnet-bn   # the image models, tiny sizes
    python benchmarks/run.py --device cuda                   # torch and JAX on CUDA (see gpu.sh)
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FRAMEWORKS = ("torch", "jax", "tensorflow")
SCHEMA = "gradand-bench/1"
NO_CUDA = 3  # exit status of a worker asked for CUDA where there is none


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds: a smoke test")
    p.add_argument(
        "--frameworks", default=None, help="comma-separated, of torch,jax,tensorflow (default: installed)"
    )
    p.add_argument(
        "--workloads",
        default=None,
        help="comma-separated, of mlp,cnn,per-example,sweep-E<n>,convnet-4x16,convnet-16x8,resnet-bn; "
        "sweep selects every sweep-E<n>, convnet both convnet-* (default: all)",
    )
    p.add_argument(
        "--rounds", type=int, default=None, help="interleaved timing rounds (default 7; --quick 2)"
    )
    p.add_argument("--threads", type=int, default=1, help="threads per framework (default 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the extra-peak-memory measurements")
    p.add_argument("--out", default=str(HERE / "results"), help="output folder (default benchmarks/results)")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_peak", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 7
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1; got {args.rounds}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1; got {args.threads}")
    return args


def thread_env(threads: int) -> dict[str, str]:
    """Environment that pins every framework's thread pools (set before the framework is imported)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), str(ROOT), env.get("PYTHONPATH", "")]))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        env[var] = str(threads)
    env["TF_NUM_INTEROP_THREADS"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if threads == 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                            "intra_op_parallelism_threads=1").strip()  # fmt: skip
    return env


def _module(framework: str):  # imported in the worker only, after the thread environment is set
    import importlib

    return importlib.import_module({"torch": "_torch", "jax": "_jax", "tensorflow": "_tensorflow"}[framework])


def _check_cuda(framework: str) -> None:
    if framework == "torch":
        import torch

        ok, why = torch.cuda.is_available(), f"torch {torch.__version__} sees no CUDA device"
    else:
        import jax

        try:
            ok, why = bool(jax.devices("gpu")), ""
        except RuntimeError as exc:
            ok, why = False, f"jax {jax.__version__} has no GPU backend ({exc}); install jax[cuda12]"
    if not ok:
        print(f"--device cuda: {why}", file=sys.stderr)
        raise SystemExit(NO_CUDA)


def worker(args: argparse.Namespace) -> None:
    """One framework, every selected workload: timings (and memory) as rows in ``--_result``."""
    from _common import select_workloads, time_interleaved

    framework = args._worker
    if args.device == "cuda":
        _check_cuda(framework)
    mod = _module(framework)
    mod.configure(args.threads)
    if args._peak is not None:  # a fresh process measuring one strategy's peak RSS (see _spawned)
        (w,) = select_workloads(args.workloads, args.quick)
        print(json.dumps(mod.peak_memory(w, args._peak, args.device)))
        return
    rows = []
    for w in select_workloads(args.workloads, args.quick):
        start = time.perf_counter()
        steps = mod.strategies(w, args.device)
        timed = time_interleaved(steps, mod.sync, rounds=args.rounds, baseline=mod.PLAIN)
        del steps
        memory, method = ({}, None) if args.no_memory else _memory(mod, framework, w, list(timed), args)
        base = memory.get(mod.PLAIN)
        print(f"[{framework}] {w.name}: memory {method}", file=sys.stderr, flush=True)
        for name, t in timed.items():
            extra = memory.get(name)
            rows.append({
                "framework": framework, "workload": w.name, "envs": w.envs, "examples_per_env": w.examples,
                "model": w.as_dict(), "strategy": name, "baseline": name == mod.PLAIN,
                "median_ms": t["median_ms"], "ratio": t["ratio"], "ratio_min": t["ratio_min"],
                "ratio_max": t["ratio_max"], "steps_per_round": t["steps_per_round"],
                "times_ms": t["times_ms"],
                "extra_peak_mb": None if extra is None or base is None else (extra - base) / 2**20,
                "memory_method": method, "threads": args.threads, "device": args.device,
            })  # fmt: skip
        print(f"[{framework}] {w.name}: {len(timed)} strategies, {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)  # fmt: skip
    _write_atomic(Path(args._result), json.dumps({"versions": mod.versions(), "rows": rows}))


def _memory(mod, framework: str, w, names: list[str], args) -> tuple[dict[str, float], str]:
    if framework == "tensorflow":  # forking after TF has started its thread pools deadlocks
        return {n: _spawned(framework, w, n, args) for n in names}, (
            "peak RSS (VmHWM after a reset) of a fresh process per strategy, minus plain averaging's"
        )
    if framework == "jax":
        return mod.temp_memory(w, args.device), "XLA temporary buffers of the compiled step (memory_analysis)"
    if args.device == "cuda":
        return {n: mod.peak_memory(w, n, args.device) for n in names}, "torch.cuda.max_memory_allocated"
    return {n: _forked(lambda n=n: mod.peak_memory(w, n, args.device)) for n in names}, (
        "peak RSS (VmHWM after a reset) of a process forked per strategy, minus plain averaging's"
    )


def _spawned(framework: str, w, strategy: str, args, timeout_s: float = 300.0) -> float | None:
    """Peak RSS of a fresh interpreter that builds and runs ``strategy`` (for frameworks that cannot fork)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", framework, "--_peak", strategy,
           "--workloads", w.name, "--threads", str(args.threads), "--device", args.device]  # fmt: skip
    cmd += ["--quick"] * args.quick
    try:
        proc = subprocess.run(cmd, env=thread_env(args.threads), capture_output=True, text=True,
                              timeout=timeout_s)  # fmt: skip
    except subprocess.TimeoutExpired:
        return None
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if proc.returncode == 0 and lines else None


def _forked(measure, timeout_s: float = 300.0) -> float | None:
    """Run ``measure()`` in a forked child (its ``ru_maxrss`` starts at the parent's current RSS)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: measure, report, exit without running the parent's cleanup
        try:
            os.write(write, json.dumps(measure()).encode())
        finally:
            os._exit(0)
    os.close(write)
    deadline = time.monotonic() + timeout_s
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.05)
    with os.fdopen(read) as f:
        text = f.read()
    return json.loads(text) if text else None


def _write_atomic(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
    os.replace(tmp, path)


def machine() -> dict:
    info = {"platform": platform.platform(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version()}  # fmt: skip
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def markdown(result: dict) -> str:
    lines = [
        f"Command: `{result['command']}`  ",
        f"Started {result['started']}; load average at start {result['load_average_start']}"
        f"{'' if result.get('load_average_end') is None else ', at end ' + str(result['load_average_end'])}; "
        f"{result['threads']} thread(s); device {result['device']}; "
        f"{result['rounds']} interleaved rounds, medians.  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + "  ",
        f"Machine: {result['machine'].get('cpu', result['machine']['machine'])}, "
        f"{result['machine']['cpu_count']} CPUs, {result['machine']['platform']}",
        "",
        "| framework | workload | strategy | ms/step | ratio to plain | extra peak MB |",
        "|:--|:--|:--|--:|--:|--:|",
    ]
    for r in result["rows"]:
        mem = "" if r["extra_peak_mb"] is None else f"{r['extra_peak_mb']:.1f}"
        workload = f"{r['workload']} (E={r['envs']}×{r['examples_per_env']})"
        lines.append(f"| {r['framework']} | {workload} | {r['strategy']} | {r['median_ms']:.2f} | "
                     f"{r['ratio']:.2f} | {mem} |")  # fmt: skip
    for e in result["errors"]:
        lines.append(f"\nError ({e['framework']}): {e['message'].splitlines()[-1] if e['message'] else ''}")
    return "\n".join(lines) + "\n"


def plot(result: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frameworks = list(dict.fromkeys(r["framework"] for r in result["rows"]))
    counts = [sum(r["framework"] == f for r in result["rows"]) for f in frameworks]
    fig, axes = plt.subplots(len(frameworks) or 1, 1, figsize=(10, 1.5 + 0.22 * sum(counts)),
                             gridspec_kw={"height_ratios": counts or [1]}, squeeze=False)  # fmt: skip
    for ax, f in zip(axes[:, 0], frameworks):
        rows = [r for r in result["rows"] if r["framework"] == f]
        labels = [f"{r['workload']}: {r['strategy']}" for r in rows]
        colors = ["tab:gray" if r["baseline"] else "tab:red" if "baseline:" in r["strategy"] else "tab:blue"
                  for r in rows]  # fmt: skip
        ax.barh(range(len(rows)), [r["ratio"] for r in rows], color=colors)
        ax.set_yticks(range(len(rows)), labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(f"{f}: step time / plain averaging ({result['threads']} thread(s), {result['device']})",
                     fontsize=9)  # fmt: skip
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        worker(args)
        return 0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    default = ("torch", "jax") if args.device == "cuda" else FRAMEWORKS
    requested = [f.strip() for f in (args.frameworks or ",".join(default)).split(",") if f.strip()]
    unknown = [f for f in requested if f not in FRAMEWORKS]
    if unknown:
        raise SystemExit(f"--frameworks: unknown {unknown}; expected some of {list(FRAMEWORKS)}")
    if args.device == "cuda" and "tensorflow" in requested:
        raise SystemExit(
            "--device cuda: the TensorFlow part is CPU only here (tensorflow-cpu); use torch,jax"
        )
    from _common import select_workloads  # validates --workloads before any worker starts

    select_workloads(args.workloads, args.quick)
    versions = {"python": platform.python_version()}
    import numpy

    import gradand

    versions |= {"numpy": numpy.__version__, "gradand": getattr(gradand, "__version__", "dev")}
    rows, errors, skipped = [], [], []
    for f in requested:
        if importlib.util.find_spec(f) is None:
            skipped.append(f)
            print(f"{f} is not installed: skipped", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", f, "--_result", str(out),
                   "--rounds", str(args.rounds), "--threads", str(args.threads),
                   "--device", args.device]  # fmt: skip
            cmd += ["--quick"] * args.quick + ["--no-memory"] * args.no_memory
            cmd += ["--workloads", args.workloads] if args.workloads else []
            proc = subprocess.run(cmd, env=thread_env(args.threads), stderr=subprocess.PIPE, text=True)
            sys.stderr.write(proc.stderr)
            if proc.returncode == NO_CUDA:
                print(
                    "CUDA is not available: no GPU benchmark was run and nothing was written", file=sys.stderr
                )
                return NO_CUDA
            if proc.returncode != 0:
                errors.append({"framework": f, "message": proc.stderr[-4000:]})
                continue
            part = json.loads(out.read_text())
        versions |= part["versions"]
        rows += part["rows"]
    given = sys.argv[1:] if argv is None else argv
    result = {
        "schema": SCHEMA, "command": shlex.join(["python", "benchmarks/run.py", *given]),
        "started": started, "load_average_start": round(load, 2),
        "load_average_end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "threads": args.threads,
        "device": args.device, "rounds": args.rounds, "quick": args.quick, "machine": machine(),
        "versions": versions, "skipped_frameworks": skipped, "errors": errors, "rows": rows,
    }  # fmt: skip
    for r in rows:
        if not (math.isfinite(r["ratio"]) and r["ratio"] > 0):
            errors.append({"framework": r["framework"], "message": f"non-finite or non-positive ratio: {r}"})
    out_dir = Path(args.out)
    _write_atomic(out_dir / "bench.json", json.dumps(result, indent=1))
    _write_atomic(out_dir / "bench.md", markdown(result))
    if rows:
        _write_atomic(out_dir / "bench.png", plot(result))
    print(markdown(result))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
