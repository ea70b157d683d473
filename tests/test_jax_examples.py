"""The JAX examples run (``--quick``) and print what they promise.

One subprocess runs all of them (one JAX start-up), with 4 forced host devices
for examples/jax_sharded.py; the other examples use the first device.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = ["jax_sharded.py", "jax_spirals.py", "jax_memorisation.py"]

RUNNER = """
import runpy, sys
for script in sys.argv[1:]:
    print(f"=== {script}", flush=True)
    sys.argv = [script, "--quick"]
    runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture(scope="module")
def outputs() -> dict[str, str]:
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
    paths = [str(EXAMPLES / s) for s in SCRIPTS]
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, *paths], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    parts = proc.stdout.split("=== ")[1:]
    return {Path(p.split("\n", 1)[0]).name: p.split("\n", 1)[1] for p in parts}


def test_sharded_example_matches_one_device_and_trains(outputs):
    out = outputs["jax_sharded.py"]
    assert "4 devices" in out
    diff = float(out.split("max |difference| = ")[1].split()[0])
    assert diff < 1e-4
    assert out.count("mean loss") >= 1


def test_spirals_example_trains_both_combiners(outputs):
    out = outputs["jax_spirals.py"]
    assert "Mean() (plain averaging)" in out and "AndMask(threshold=1.0)" in out


def test_memorisation_example_reports_every_labelling_and_combiner(outputs):
    out = outputs["jax_memorisation.py"]
    rows = [line for line in out.splitlines() if line.startswith(("real", "random"))]
    assert len(rows) == 4
