"""Paired comparison of this checkout's gradand against an earlier revision, in one process.

Ratios committed by ``run.py`` on different days, hosts or loads cannot show whether a
change made a step slower: the plain baseline itself moves by ±10 % between runs. This
script exports ``--base REV``'s ``gradand`` package and its benchmark modules (renamed to
``gradand_base`` and ``_base_*`` with their imports rewritten), builds both revisions'
strategies for the same workload in the same worker, and times them interleaved (the
rounds of ``_common.time_interleaved``). For every strategy label present in both, it
reports the median over rounds of head time / base time: below 1.0 means this checkout is
faster.

Run:
    python benchmarks/paired.py --base a1efa17 --frameworks torch --workloads per-example \
        --match factored --rounds 15
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODULES = {"torch": "_torch", "jax": "_jax", "tensorflow": "_tensorflow"}


def export_base(rev: str, dest: Path) -> None:
    """Write ``rev``'s gradand as ``dest/gradand_base`` and its benchmark helpers as ``dest/_base_*.py``."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "gradand", "benchmarks"],
                         check=True, capture_output=True).stdout  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        for m in t.getmembers():
            if not m.isfile() or not m.name.endswith(".py"):
                continue
            parts = Path(m.name).parts
            if parts[0] == "gradand":
                target = dest.joinpath("gradand_base", *parts[1:])
            elif len(parts) == 2 and parts[1].startswith("_"):
                target = dest / f"_base{parts[1]}"
            else:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(_rewrite(t.extractfile(m).read().decode()))


def _rewrite(src: str) -> str:
    src = re.sub(r"^import gradand$", "import gradand_base as gradand", src, flags=re.M)
    src = re.sub(r"\b(from|import) gradand\b", r"\1 gradand_base", src)
    src = re.sub(r"\b(from|import) _(common|torch|jax|tensorflow)\b", r"\1 _base_\2", src)
    return src


def worker(args: argparse.Namespace) -> None:
    import importlib

    sys.path[:0] = [args._base_dir, str(HERE), str(ROOT)]
    from _common import select_workloads, time_interleaved

    head = importlib.import_module(MODULES[args._worker])
    base = importlib.import_module("_base" + MODULES[args._worker])
    base_common = importlib.import_module("_base_common")
    head.configure(args.threads)
    out = []
    for w in select_workloads(args.workloads, False):
        w_base = base_common.Workload(**{k: v for k, v in w.as_dict().items()
                                         if k in base_common.Workload.__dataclass_fields__})  # fmt: skip
        head_steps, base_steps = head.strategies(w, args.device), base.strategies(w_base, args.device)
        shared = [n for n in head_steps if n in base_steps and re.search(args.match, n)]
        steps = {head.PLAIN: head_steps[head.PLAIN]}
        for n in shared:
            steps[f"head: {n}"], steps[f"base: {n}"] = head_steps[n], base_steps[n]
        timed = time_interleaved(steps, head.sync, rounds=args.rounds, baseline=head.PLAIN,
                                 group=lambda name: name.split(": ", 1)[-1])  # fmt: skip
        for n in shared:
            h, b = timed[f"head: {n}"]["times_ms"], timed[f"base: {n}"]["times_ms"]
            ratios = sorted(x / y for x, y in zip(h, b))
            out.append({"framework": args._worker, "workload": w.name, "strategy": n,
                        "head_ms": statistics.median(h), "base_ms": statistics.median(b),
                        "head_over_base": statistics.median(ratios),
                        "quartiles": [ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]]})  # fmt: skip
        print(f"[{args._worker}] {w.name}: {len(shared)} shared strategies", file=sys.stderr, flush=True)
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the git revision to compare against (e.g. a1efa17)")
    p.add_argument("--frameworks", default="torch,jax,tensorflow")
    p.add_argument("--workloads", default=None, help="as run.py's --workloads (default: all)")
    p.add_argument("--match", default="gradand", help="regular expression on strategy labels")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    p.add_argument("--_base_dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        worker(args)
        return 0
    from run import thread_env

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        export_base(args.base, Path(tmp))
        for f in (s.strip() for s in args.frameworks.split(",") if s.strip()):
            if f not in MODULES:
                raise SystemExit(f"--frameworks: unknown {f!r}; expected some of {list(MODULES)}")
            cmd = [sys.executable, __file__, "--_worker", f, "--_base_dir", tmp, "--base", args.base,
                   "--match", args.match,
                   "--rounds", str(args.rounds), "--threads", str(args.threads), "--device", args.device]
            cmd += ["--workloads", args.workloads] if args.workloads else []
            proc = subprocess.run(cmd, env=thread_env(args.threads), stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                print(f"{f}: worker failed (exit {proc.returncode})", file=sys.stderr)
                return 1
            rows += json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"head = this checkout, base = {args.base}; {args.rounds} interleaved rounds, "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.2f}\n")  # fmt: skip
    print("| framework | workload | strategy | base ms | head ms | head / base [quartiles] |")
    print("|:--|:--|:--|--:|--:|--:|")
    for r in rows:
        q = r["quartiles"]
        print(f"| {r['framework']} | {r['workload']} | {r['strategy']} | {r['base_ms']:.2f} | "
              f"{r['head_ms']:.2f} | {r['head_over_base']:.2f} [{q[0]:.2f}, {q[1]:.2f}] |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
