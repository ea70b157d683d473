"""Runs in worker processes: same numbers as in-process, results in order, errors propagate."""

from __future__ import annotations

import pytest

from gradand.experiments._parallel import available_cpus, run_jobs, worker_plan


def _fail_on(x: int) -> int:
    if x == 3:
        raise ValueError("job 3 failed")
    return x * x


def test_worker_plan_defaults_split_the_cpus_and_never_exceed_the_number_of_runs():
    cpus = available_cpus()
    workers, threads = worker_plan(100, None, None, "cpu")
    assert workers == cpus
    assert threads == (None if cpus == 1 else max(1, cpus // workers))
    assert worker_plan(100, None, None, "cuda") == (1, None)
    assert worker_plan(2, 16, None, "cpu")[0] == 2
    assert worker_plan(5, 1, 3, "cpu") == (1, 3)


def test_spawned_workers_return_results_in_job_order_and_report_each():
    seen = []
    out = run_jobs(pow, [(i, 2) for i in range(6)], workers=2, backend="numpy", threads=1,
                   on_done=lambda i, r: seen.append((i, r)))
    assert out == [i * i for i in range(6)]
    assert sorted(seen) == [(i, i * i) for i in range(6)]


def test_a_failing_job_raises_its_own_error():
    with pytest.raises(ValueError, match="job 3 failed"):
        run_jobs(_fail_on, [(i,) for i in range(5)], workers=2, backend="numpy", threads=1)
    with pytest.raises(ValueError, match="job 3 failed"):
        run_jobs(_fail_on, [(i,) for i in range(5)], workers=1, backend="numpy", threads=None)


def test_spirals_in_two_workers_equals_one_process_with_the_same_thread_count():
    pytest.importorskip("torch")
    from gradand.experiments.spirals import SpiralsSetting, TrainSetting, run

    data = SpiralsSetting(n_envs=4, examples_per_env=32, n_test=32, shortcut_dims=3, revolutions=1.0)
    train = TrainSetting(hidden_units=16, hidden_layers=2, epochs=3, batch_size=16, eval_every=1)
    kw = dict(methods=("mean", "and_mask", "dropout"), seeds=(0, 1), show_progress=False, threads=1)
    one = run(data, train, jobs=1, **kw)
    two = run(data, train, jobs=2, **kw)
    assert two.config["workers"] == 2 and one.config["workers"] == 1
    for m in kw["methods"]:
        a, b = one.results["methods"][m], two.results["methods"][m]
        assert a["train_acc"] == b["train_acc"] and a["test_acc"] == b["test_acc"]
        assert a["curves"] == b["curves"]
