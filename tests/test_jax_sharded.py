"""gradand.backends.jax across devices: shard_map / pmap with axis_name equals one device seeing all.

The checks run in one subprocess with 4 forced CPU host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``), so this test process
keeps its single device; the subprocess reports its measurements as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

DEVICES = 4


def _worker() -> dict:  # runs in the subprocess
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import gradand
    from gradand.backends import jax as gj

    assert jax.device_count() == DEVICES, jax.devices()
    mesh = jax.make_mesh((DEVICES,), ("d",))
    envs, n, d, h = 8, 6, 3, 5
    rng = np.random.default_rng(0)
    x = rng.standard_normal((envs, n, d)).astype(np.float32)
    shortcut = rng.standard_normal((envs, d)).astype(np.float32)  # each environment its own rule
    y = (x[..., 0] + np.einsum("end,ed->en", x, shortcut) > 0).astype(np.float32)
    params = {
        "hidden": jnp.asarray(rng.standard_normal((d, h)), jnp.float32),
        "out": jnp.asarray(rng.standard_normal((h,)) / 2, jnp.float32),
    }
    combiner = gradand.AndMask(threshold=0.5)

    def loss_fn(p, batch):
        xb, yb = batch
        logits = jnp.tanh(xb @ p["hidden"]) @ p["out"]
        return jnp.mean(jax.nn.softplus(logits) - yb * logits)

    def max_diff(a, b):
        return max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    shard_envs = NamedSharding(mesh, P("d"))
    batch = (jax.device_put(x, shard_envs), jax.device_put(y, shard_envs))
    results: dict = {}

    (loss_1, info_1), grads_1 = jax.jit(gj.value_and_grad(loss_fn, combiner))(params, (x, y))
    result_specs = gradand.Result(loss=P(), losses=P("d"), infos=P(), summary=P(), aux=P())
    fractions = lambda r: [float(i.survivor_fraction) for i in r.infos.values()]  # noqa: E731

    def three_layers(p, b):  # the composition value_and_grad is made of, written out
        _, stats = gj.vectorized_statistics(loss_fn, combiner, p, b, axis_name="d")
        grads, infos = gj.finalize_gradients(gj.all_reduce_statistics(stats, "d"), combiner)
        return grads, infos

    for name, chunk in [("value_and_grad", None), ("value_and_grad_chunked", 1)]:
        local = gj.value_and_grad(loss_fn, combiner, axis_name="d", chunk_size=chunk)
        sharded = jax.jit(
            jax.shard_map(local, mesh=mesh, in_specs=(P(), P("d")), out_specs=((P(), result_specs), P()))
        )
        (loss_n, info_n), grads_n = sharded(params, batch)
        results[name] = {
            "grad_diff": max_diff(grads_n, grads_1),
            "loss_diff": abs(float(loss_n) - float(loss_1)),
            "losses_diff": max_diff(info_n.losses, info_1.losses),
            "fractions_equal": fractions(info_n) == fractions(info_1),
            "fraction_below_one": min(fractions(info_1)) < 1.0,
        }
    layered = jax.jit(jax.shard_map(three_layers, mesh=mesh, in_specs=(P(), P("d")), out_specs=(P(), P())))
    grads_l, infos_l = layered(params, batch)
    results["three_layers"] = {
        "grad_diff": max_diff(grads_l, grads_1),
        "loss_diff": 0.0,
        "losses_diff": 0.0,
        "fractions_equal": [float(i.survivor_fraction) for i in infos_l.values()] == fractions(info_1),
        "fraction_below_one": True,
    }

    # pmap: the leading axis of the batch is the device axis.
    pmapped = jax.pmap(gj.value_and_grad(loss_fn, combiner, axis_name="i"), axis_name="i", in_axes=(None, 0))
    per_device = jax.tree.map(lambda a: a.reshape((DEVICES, envs // DEVICES, *a.shape[1:])), (x, y))
    (loss_p, _), grads_p = pmapped(params, per_device)
    on_device = [jax.tree.map(lambda g, i=i: g[i], grads_p) for i in range(DEVICES)]
    results["pmap"] = {
        "grad_diff": max(max_diff(g, grads_1) for g in on_device),
        "loss_diff": float(jnp.max(jnp.abs(loss_p - loss_1))),
    }

    # combine() of stacked per-environment gradients, environments split over devices.
    stacked = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, (x, y))
    dense = gj.combine(stacked, gradand.SandMask(threshold=0.3, k=10.0))
    split = jax.jit(
        jax.shard_map(
            lambda g: gj.combine(g, gradand.SandMask(threshold=0.3, k=10.0), axis_name="d"),
            mesh=mesh,
            in_specs=P("d"),
            out_specs=P(),
        )
    )(jax.device_put(stacked, shard_envs))
    results["combine"] = {"diff": max_diff(split, dense)}

    # Training with optax: reduce_environments(axis_name) inside shard_map vs one device.
    def make_step(axis_name):
        opt = optax.chain(gj.reduce_environments(combiner, axis_name=axis_name), optax.adam(0.05))

        def step(p, state, b):
            varying = p if axis_name is None else jax.lax.pcast(p, axis_name, to="varying")
            per_env = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(varying, b)
            updates, state = opt.update(per_env, state, p)
            return optax.apply_updates(p, updates), state

        return opt, step

    opt, step_1 = make_step(None)
    _, step_n = make_step("d")
    step_1 = jax.jit(step_1)
    state_specs = (gj.ReduceEnvironmentsState(P(), P()), P())
    step_n = jax.jit(
        jax.shard_map(step_n, mesh=mesh, in_specs=(P(), state_specs, P("d")), out_specs=(P(), state_specs))
    )
    p_1, s_1, p_n, s_n = params, opt.init(params), params, opt.init(params)
    for _ in range(3):
        p_1, s_1 = step_1(p_1, s_1, (x, y))
        p_n, s_n = step_n(p_n, s_n, batch)
    results["reduce_environments_training"] = {
        "param_diff": max_diff(p_n, p_1),
        "moved": max_diff(p_1, params),
        "fractions_equal": s_n[0].survivor_fraction == s_1[0].survivor_fraction,
    }

    # Shardings and devices are kept.
    model_sharded = NamedSharding(mesh, P(None, "d"))
    wide = {"w": jax.device_put(jnp.ones((4, 8)), model_sharded)}
    linear = lambda p, b: jnp.mean((b @ p["w"]) ** 2)  # noqa: E731
    (_, _), g_wide = jax.jit(gj.value_and_grad(linear, combiner))(wide, jnp.ones((envs, 5, 4)))
    stacked_sharded = jax.device_put(jnp.ones((6, 8, 4)), NamedSharding(mesh, P(None, "d")))
    update = jax.jit(lambda g: gj.combine({"w": g}, combiner))(stacked_sharded)["w"]
    device = jax.devices()[2]
    eager = gj.combine({"w": jax.device_put(jnp.ones((3, 2)), device)}, combiner)["w"]
    results["sharding"] = {
        "grads_like_params": g_wide["w"].sharding.is_equivalent_to(model_sharded, 2),
        "update_keeps_parameter_axis_sharding": update.sharding.is_equivalent_to(
            NamedSharding(mesh, P("d", None)), 2
        ),
        "eager_update_on_its_device": eager.devices() == {device},
    }
    return results


@pytest.fixture(scope="module")
def sharded() -> dict:
    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["value_and_grad", "value_and_grad_chunked", "three_layers"])
def test_shard_map_value_and_grad_equals_one_device_seeing_all_environments(sharded, name):
    """Also guards against shard_map's implicit psum of gradients of replicated parameters."""
    r = sharded[name]
    assert r["grad_diff"] < 1e-5
    assert r["loss_diff"] < 1e-6 and r["losses_diff"] < 1e-6
    assert r["fractions_equal"] and r["fraction_below_one"]


def test_pmap_value_and_grad_equals_one_device_seeing_all_environments(sharded):
    assert sharded["pmap"]["grad_diff"] < 1e-5
    assert sharded["pmap"]["loss_diff"] < 1e-6


def test_shard_map_combine_of_split_environments_equals_dense(sharded):
    assert sharded["combine"]["diff"] < 1e-5


def test_reduce_environments_in_shard_map_trains_like_one_device(sharded):
    r = sharded["reduce_environments_training"]
    assert r["moved"] > 1e-2  # the parameters did change
    assert r["param_diff"] < 1e-5
    assert r["fractions_equal"]


def test_updates_keep_the_sharding_and_device_of_their_inputs(sharded):
    assert sharded["sharding"] == {
        "grads_like_params": True,
        "update_keeps_parameter_axis_sharding": True,
        "eager_update_on_its_device": True,
    }


if __name__ == "__main__":
    print(json.dumps(_worker()))
