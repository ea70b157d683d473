"""Every TensorFlow entry point, on every scenario, against the numpy core."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import gradand  # noqa: E402
from gradand.backends import tensorflow as gtf  # noqa: E402

from ._asserts import assert_raises_on_nan, assert_result_is_consistent, assert_updates_match  # noqa: E402
from ._scenarios import COMBINERS, IN, OUT, Scenario, scenarios  # noqa: E402

SCENARIOS = scenarios()
IDS = [s.name for s in SCENARIOS]


def _model(data, dtype="float32"):
    layer = keras.layers.Dense(OUT, dtype=dtype)
    model = keras.Sequential([keras.Input((IN,), dtype=dtype), layer])
    layer.kernel.assign(data.weight.T.astype(dtype))
    layer.bias.assign(data.bias.astype(dtype))
    return model, layer


def _mse(outputs, targets):
    return tf.reduce_mean((outputs - targets) ** 2)


def _updates(grads, layer):
    by_var = dict(zip([v.path for v in layer.trainable_variables], grads))
    return {"weight": np.asarray(by_var[layer.kernel.path]).T, "bias": by_var[layer.bias.path]}


def _run_losses_form(s: Scenario, method: str):
    data = s.data()
    model, layer = _model(data)
    with tf.GradientTape(persistent=True) as tape:
        losses = [_mse(model(np.float32(x)), np.float32(y)) for x, y in zip(data.xs, data.ys)]
    grads, result = gtf.gradient(
        tape, losses, layer.trainable_variables, COMBINERS[s.combiner], method=method, nan_policy=s.nan_policy
    )
    return _updates(grads, layer), result


def _run_model_form(s: Scenario, method: str, **kw):
    data = s.data()
    model, layer = _model(data)
    if s.equal:
        x, y = data.stacked()
        extra = {}
    else:
        x, y, ids = data.flat()
        extra = {"env_ids": tf.constant(ids, tf.int32), "num_envs": s.envs}
    grads, result = gtf.model_gradient(
        model,
        _mse,
        tf.constant(x, tf.float32),
        tf.constant(y, tf.float32),
        COMBINERS[s.combiner],
        method=method,
        variables=layer.trainable_variables,
        nan_policy=s.nan_policy,
        **extra,
        **kw,
    )
    return _updates(grads, layer), result


ENTRY_POINTS = {
    "gradient-streaming": lambda s: _run_losses_form(s, "streaming"),
    "model_gradient-streaming": lambda s: _run_model_form(s, "streaming"),
    "model_gradient-vectorized": lambda s: _run_model_form(s, "vectorized"),
    "model_gradient-factored": lambda s: _run_model_form(s, "factored"),
    "model_gradient-factored-chunked": lambda s: _run_model_form(s, "factored", chunk_size=2),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("scenario", SCENARIOS, ids=IDS)
def test_every_entry_point_matches_the_numpy_core(entry, scenario):
    run = ENTRY_POINTS[entry]
    if scenario.nan_policy == "raise" and scenario.poison is not None:
        assert_raises_on_nan(lambda: run(scenario))
        return
    updates, result = run(scenario)
    assert_updates_match(scenario, updates)
    assert_result_is_consistent(scenario, result, list(result.infos))


def test_the_result_is_the_one_core_type():
    _, result = _run_model_form(SCENARIOS[0], "factored")
    assert type(result) is gradand.Result
