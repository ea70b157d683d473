"""Distributed AND-masking with torch.distributed (gloo, 2 processes on localhost).

The test launches this file as a script, once per rank; each rank writes what
it computed, and the test compares it with one process that sees every
environment (numpy core as the oracle).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch") if __name__ != "__main__" else __import__("torch")

import gradand  # noqa: E402
from gradand.backends import torch as gt  # noqa: E402

WORLD = 2
ENVS_PER_RANK = 2
COMBINERS = {
    "and": gradand.AndMask(threshold=1.0),
    "sand": gradand.SandMask(threshold=0.2, k=10.0),
    "geom": gradand.GeometricMean(threshold=0.5),
}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def make_data(n_envs: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_envs, 5, 3, generator=g)
    y = torch.randint(0, 2, (n_envs, 5), generator=g)
    return x, y


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(out, y)


def worker(rank: int, port: int, outdir: str) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    result: dict[str, object] = {}
    # 1. DDP communication hook: this rank's gradient is environment `rank`, for two steps.
    x, y = make_data(WORLD)
    for name, combiner in COMBINERS.items():
        model = make_model()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        state = gt.register_comm_hook(ddp, combiner)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        for step in range(2):
            opt.zero_grad()
            loss_fn(ddp(x[rank]), y[rank]).backward()
            result[f"hook_{name}_{step}"] = [p.grad.clone() for p in model.parameters()]
            result[f"hook_{name}_{step}_survivors"] = [
                float(i.survivor_fraction) for i in state.mask_infos(model.parameters())
            ]
            opt.step()
        del ddp, opt  # destroy DDP while its process group is alive
    # 2. Several environments per rank, reduced locally first, then all-reduced.
    xs, ys = make_data(WORLD * ENVS_PER_RANK)
    mine = slice(rank * ENVS_PER_RANK, (rank + 1) * ENVS_PER_RANK)
    combiner = COMBINERS["and"]
    model = make_model()
    losses = [loss_fn(model(xs[e]), ys[e]) for e in range(mine.start, mine.stop)]
    gt.backward(losses, model.parameters(), combiner, all_reduce=True)
    result["streaming"] = [p.grad.clone() for p in model.parameters()]
    model = make_model()
    gt.model_backward(model, loss_fn, xs[mine], ys[mine], combiner, all_reduce=True, method="vectorized")
    result["vmap"] = [p.grad.clone() for p in model.parameters()]
    # 3. A rank that passes a gradient of another shape: a clear error on every rank, no hang.
    shape = (3, 4) if rank == 0 else (3, 5)
    stats = gradand.statistics(torch.ones(2, *shape), combiner)
    try:
        gt.all_reduce_statistics([stats], group=None)
        result["mismatch"] = "no error"
    except ValueError as err:
        result["mismatch"] = str(err)
    # 4. After the error the group still works (nothing was left half-reduced).
    ok = gt.all_reduce_statistics(gradand.statistics(torch.full((2, 3), float(rank + 1)), combiner))
    result["after"] = (ok.count, ok.mean.clone())
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown of gloo/DDP objects (not under test here)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), str(port), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(WORLD)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the 2-process gloo run did not finish in 180 s (a hang)")
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def per_env_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[np.ndarray]:
    """Stacked per-environment gradients (E, *shape) per parameter, as numpy."""
    params = list(model.parameters())
    per = [torch.autograd.grad(loss_fn(model(x[e]), y[e]), params) for e in range(x.shape[0])]
    return [np.stack([g[i].numpy() for g in per]) for i in range(len(params))]


@pytest.mark.parametrize("name", list(COMBINERS))
def test_ddp_hook_equals_one_process_seeing_every_rank_environment(ranks: list[dict], name: str) -> None:
    combiner = COMBINERS[name]
    x, y = make_data(WORLD)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(2):
        expected = [gradand.combine(g, combiner) for g in per_env_grads(model, x, y)]
        for r in range(WORLD):
            got = ranks[r][f"hook_{name}_{step}"]
            for e, g in zip(expected, got):
                np.testing.assert_allclose(g.numpy(), e, rtol=1e-5, atol=1e-6)
        infos = [
            gradand.combine(g, combiner, return_info=True)[1].survivor_fraction
            for g in per_env_grads(model, x, y)
        ]
        np.testing.assert_allclose(ranks[0][f"hook_{name}_{step}_survivors"], infos, rtol=1e-6)
        for p, e in zip(model.parameters(), expected):
            p.grad = torch.from_numpy(e)
        opt.step()


@pytest.mark.parametrize("strategy", ["streaming", "vmap"])
def test_local_environments_all_reduced_equal_one_process(ranks: list[dict], strategy: str) -> None:
    xs, ys = make_data(WORLD * ENVS_PER_RANK)
    expected = [gradand.combine(g, COMBINERS["and"]) for g in per_env_grads(make_model(), xs, ys)]
    for r in range(WORLD):
        for e, g in zip(expected, ranks[r][strategy]):
            np.testing.assert_allclose(g.numpy(), e, rtol=1e-5, atol=1e-6)


def test_mismatched_gradient_shape_raises_on_every_rank_instead_of_hanging(ranks: list[dict]) -> None:
    for r in range(WORLD):
        msg = ranks[r]["mismatch"]
        assert "cannot be summed" in msg, msg
        assert "(3, 4)" in msg and "(3, 5)" in msg and "rank(s) [1]" in msg, msg


def test_group_still_sums_correctly_after_a_mismatch_error(ranks: list[dict]) -> None:
    for r in range(WORLD):
        count, total = ranks[r]["after"]
        assert count == 2 * WORLD
        np.testing.assert_allclose(total.numpy(), np.full(3, (2 * 1.0 + 2 * 2.0) / 4))  # the mean


def test_all_reduce_statistics_without_process_group_raises() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    stats = gradand.statistics(torch.ones(2, 3), gradand.AndMask())
    with pytest.raises(RuntimeError, match="init_process_group"):
        gt.all_reduce_statistics(stats)


def test_all_reduce_statistics_rejects_empty_statistics() -> None:
    with pytest.raises(ValueError, match="empty"):
        gt.all_reduce_statistics([gradand.Statistics()])


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
