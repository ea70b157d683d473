"""Hostile hyperparameters and updates for the optimizers and optax transforms (issue 13, class 6).

Every temporal AND-mask optimizer (PyTorch, optax, Keras) validates each
hyperparameter with the one core check, :func:`gradand.temporal.check_temporal_hparams`:
on construction, and where the framework lets them change later (torch
``param_groups``, optax ``inject_hyperparams`` state, Keras attributes) when
they change. NumPy scalars are numbers like Python's; bools are not. optax
``reduce_environments`` refuses updates that are not ``(E, *param.shape)``
with one ``E >= 1``, and the temporal transform refuses updates shaped
otherwise than the parameters, naming the leaf.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

import gradand
from gradand.temporal import check_temporal_hparams

BASE = dict(
    lr=1e-3,
    betas=(0.9, 0.999),
    beta3=0.9,
    threshold=0.5,
    eps=1e-8,
    weight_decay=0.0,
    weight_decay_order="after",
)

#: (hyperparameter, bad value, exception, message pattern), in the core's names.
BAD = [
    ("lr", -0.1, ValueError, r"lr must be >= 0"),
    ("lr", math.nan, ValueError, r"lr must be finite"),
    ("lr", math.inf, ValueError, r"lr must be finite"),
    ("lr", True, TypeError, r"lr must be a real number"),
    ("lr", "0.1", TypeError, r"lr must be a real number"),
    ("betas", (1.0, 0.999), ValueError, r"betas\[0\] must be in \[0, 1\)"),
    ("betas", (0.9, -0.5), ValueError, r"betas\[1\] must be in \[0, 1\)"),
    ("betas", (0.9,), ValueError, r"betas must be a pair"),
    ("betas", 0.9, TypeError, r"betas must be a pair"),
    ("beta3", 1.0, ValueError, r"beta3 must be in \[0, 1\)"),
    ("beta3", np.bool_(False), TypeError, r"beta3 must be a real number"),
    ("threshold", 5, ValueError, r"threshold must be in \[0, 1\]"),
    ("threshold", -0.1, ValueError, r"threshold must be in \[0, 1\]"),
    ("threshold", True, TypeError, r"threshold must be a real number"),
    ("eps", 0.0, ValueError, r"eps must be > 0"),
    ("eps", math.nan, ValueError, r"eps must be finite"),
    ("weight_decay", -1e-4, ValueError, r"weight_decay must be >= 0"),
    ("weight_decay", None, TypeError, r"weight_decay must be a real number"),
    ("weight_decay_order", "middle", ValueError, r"weight_decay_order must be 'before'"),
    ("weight_decay_order", ["after"], ValueError, r"weight_decay_order must be 'before'"),
]
BAD_IDS = [f"{name}={value!r}" for name, value, _, _ in BAD]
#: The same without the malformed ``betas`` (optax and Keras take ``b1, b2`` / ``beta_1, beta_2``).
BAD_SEPARATE = [b for b in BAD if not (b[0] == "betas" and not (isinstance(b[1], tuple) and len(b[1]) == 2))]
BAD_SEPARATE_IDS = [f"{name}={value!r}" for name, value, _, _ in BAD_SEPARATE]


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_torch = pytest.mark.skipif(not _has("torch"), reason="needs torch")
needs_optax = pytest.mark.skipif(not (_has("jax") and _has("optax")), reason="needs jax and optax")
needs_keras = pytest.mark.skipif(not (_has("tensorflow") and _has("keras")), reason="needs tensorflow")


# --- the core check --------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "value", "error", "match"), BAD, ids=BAD_IDS)
def test_the_core_check_refuses_each_bad_hyperparameter_by_name(name, value, error, match):
    with pytest.raises(error, match=match):
        check_temporal_hparams(**{**BASE, name: value})


def test_numpy_scalars_are_numbers_and_come_back_as_python_floats():
    hp = check_temporal_hparams(
        lr=np.float32(0.5),
        betas=[np.float64(0.9), np.float16(0.5)],
        beta3=np.int64(0),
        threshold=np.int8(1),
        eps=np.float32(1e-6),
        weight_decay=np.int64(0),
        weight_decay_order="before",
    )
    assert hp == {
        "lr": 0.5,
        "betas": (0.9, 0.5),
        "beta3": 0.0,
        "threshold": 1.0,
        "eps": float(np.float32(1e-6)),
        "weight_decay": 0.0,
        "weight_decay_order": "before",
    }
    assert all(type(v) is float for k, v in hp.items() if k not in ("betas", "weight_decay_order"))
    assert all(type(b) is float for b in hp["betas"])


# --- torch.optim: TemporalAndMaskAdam --------------------------------------------------------


def _torch_opt(**kw):
    import torch

    from gradand.backends import torch as gt

    a = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    opt = gt.TemporalAndMaskAdam([{"params": [a]}, {"params": [b], "lr": 0.01}], lr=0.1, **kw)
    return opt, a, b


def _torch_grads(a, b, t: int = 0):
    import torch

    a.grad = torch.tensor([1.0, (-1.0) ** t], dtype=torch.float64)
    b.grad = torch.tensor([2.0], dtype=torch.float64)


@needs_torch
@pytest.mark.parametrize(("name", "value", "error", "match"), BAD, ids=BAD_IDS)
def test_torch_bad_hyperparameter_is_refused_on_construction(name, value, error, match):
    import torch

    from gradand.backends import torch as gt

    with pytest.raises(error, match=match):
        gt.TemporalAndMaskAdam([torch.nn.Parameter(torch.ones(2))], **{**BASE, name: value})


@needs_torch
@pytest.mark.parametrize(("name", "value", "error", "match"), BAD, ids=BAD_IDS)
def test_torch_hyperparameter_changed_in_param_groups_is_refused_at_step_naming_the_group(
    name, value, error, match
):
    opt, a, b = _torch_opt()
    _torch_grads(a, b)
    opt.step()  # validated and cached
    before = [a.detach().clone(), b.detach().clone()]
    steps = [opt.state[p]["step"] for p in (a, b)]
    opt.param_groups[1][name] = value
    _torch_grads(a, b, 1)
    with pytest.raises(error, match=r"^param_groups\[1\]: " + match):
        opt.step()
    # Nothing moved: the check runs before any parameter or state is touched.
    assert all(p.detach().equal(q) for p, q in zip((a, b), before))
    assert [opt.state[p]["step"] for p in (a, b)] == steps
    opt.param_groups[1][name] = BASE[name] if name != "lr" else 0.01  # repaired: trains on
    opt.step()
    assert not b.detach().equal(before[1])


@needs_torch
def test_torch_betas_list_mutated_in_place_is_caught_despite_the_cache():
    opt, a, b = _torch_opt(betas=[0.9, 0.999])
    _torch_grads(a, b)
    opt.step()
    opt.param_groups[0]["betas"] = betas = [0.9, 0.999]
    opt.step()
    betas[1] = 1.5  # same list object, new value
    with pytest.raises(ValueError, match=r"^param_groups\[0\]: betas\[1\] must be in \[0, 1\)"):
        opt.step()


@needs_torch
def test_torch_lr_scheduler_that_makes_lr_negative_is_caught_at_the_next_step():
    import torch

    opt, a, b = _torch_opt()
    torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: -1.0)  # sets lr = -base_lr now
    _torch_grads(a, b)
    with pytest.raises(ValueError, match=r"^param_groups\[0\]: lr must be >= 0; got -0\.1"):
        opt.step()


@needs_torch
def test_torch_state_dict_with_a_bad_hyperparameter_is_caught_at_the_next_step():
    opt, a, b = _torch_opt()
    _torch_grads(a, b)
    opt.step()
    sd = opt.state_dict()
    sd["param_groups"][0]["threshold"] = 5.0
    opt.load_state_dict(sd)
    with pytest.raises(ValueError, match=r"^param_groups\[0\]: threshold must be in \[0, 1\]"):
        opt.step()


@needs_torch
def test_torch_add_param_group_names_the_new_group():
    import torch

    opt, _, _ = _torch_opt()
    with pytest.raises(TypeError, match=r"^param_groups\[2\]: threshold must be a real number"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "threshold": True})
    assert len(opt.param_groups) == 2


@needs_torch
def test_torch_tensor_hyperparameters_are_refused_with_their_type():
    import torch

    from gradand.backends import torch as gt

    with pytest.raises(TypeError, match=r"lr must be a real number.*\(Tensor\)"):
        gt.TemporalAndMaskAdam([torch.nn.Parameter(torch.ones(1))], lr=torch.tensor(0.1))
    opt, a, b = _torch_opt()
    opt.param_groups[0]["lr"] = torch.tensor(0.1)
    _torch_grads(a, b)
    with pytest.raises(TypeError, match=r"^param_groups\[0\]: lr must be a real number"):
        opt.step()


@needs_torch
def test_torch_numpy_scalar_hyperparameters_train_exactly_like_python_floats():
    hp = dict(betas=(0.8, 0.99), beta3=0.7, threshold=0.5, eps=1e-8, weight_decay=0.01)
    numpy_hp = dict(
        betas=(np.float64(0.8), np.float64(0.99)),
        beta3=np.float64(0.7),
        threshold=np.float32(0.5),
        eps=np.float64(1e-8),
        weight_decay=np.float64(0.01),
    )
    runs = []
    for kw in (hp, numpy_hp):
        opt, a, b = _torch_opt(**kw)
        for t in range(5):
            if t == 2:  # a NumPy value set mid-training is used as a number too
                opt.param_groups[1]["lr"] = np.float32(0.02) if kw is numpy_hp else float(np.float32(0.02))
            _torch_grads(a, b, t)
            opt.step()
        runs.append([a.detach().clone(), b.detach().clone()])
        assert all(type(opt.defaults[k]) is float for k in ("lr", "beta3", "threshold", "eps"))
    for p, q in zip(*runs):
        assert p.equal(q)


# --- optax: temporal_and_mask, scale_by_temporal_and_mask, reduce_environments ----------------


def _optax_kwargs(name, value):
    """The core's (name, value) as temporal_and_mask's arguments, and the message's name."""
    if name == "lr":
        return {"learning_rate": value}, "learning_rate"
    if name == "betas":
        b1, b2 = value
        return ({"b1": b1, "b2": b2}, "b1" if b1 != BASE["betas"][0] else "b2")
    return {name: value}, name


@needs_optax
@pytest.mark.parametrize(("name", "value", "error", "match"), BAD_SEPARATE, ids=BAD_SEPARATE_IDS)
def test_optax_bad_hyperparameter_is_refused_on_construction_in_its_own_name(name, value, error, match):
    from gradand.backends import jax as gj

    kwargs, own = _optax_kwargs(name, value)
    own_match = match.replace(r"betas\[0\]", "b1").replace(r"betas\[1\]", "b2").replace("lr", own, 1)
    kwargs.setdefault("learning_rate", 1e-3)
    with pytest.raises(error, match=own_match):
        gj.temporal_and_mask(**kwargs)


@needs_optax
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"threshold": "jnp:[0.5, 0.5]"},
            ValueError,
            r"threshold must be a scalar; got an array of shape \(2,\)",
        ),
        (
            {"threshold": "jnp:True"},
            TypeError,
            r"threshold must be a real number; got an array of dtype bool",
        ),
        ({"eps": "jnp:-1.0"}, ValueError, r"eps must be > 0"),
        ({"learning_rate": "jnp:-0.5"}, ValueError, r"learning_rate must be >= 0"),
        ({"state_dtype": "jnp:int32"}, TypeError, r"state_dtype must be None or a floating dtype"),
    ],
)
def test_optax_concrete_array_hyperparameters_are_validated_by_value(kwargs, error, match):
    import jax.numpy as jnp

    from gradand.backends import jax as gj

    def value(v):
        if v == "jnp:int32":
            return jnp.int32
        return jnp.asarray(eval(v[4:]))

    kwargs = {k: value(v) for k, v in kwargs.items()}
    kwargs.setdefault("learning_rate", 1e-3)
    with pytest.raises(error, match=match):
        gj.temporal_and_mask(**kwargs)


@needs_optax
def test_optax_inject_hyperparams_values_are_checked_at_init_and_at_an_eager_update():
    import jax.numpy as jnp
    import optax

    from gradand.backends import jax as gj

    params = jnp.zeros(3)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
        optax.inject_hyperparams(gj.temporal_and_mask)(learning_rate=0.1, threshold=5.0).init(params)
    opt = optax.inject_hyperparams(gj.temporal_and_mask)(learning_rate=0.1, threshold=0.5)
    state = opt.init(params)
    state.hyperparams["learning_rate"] = jnp.asarray(-0.1)
    with pytest.raises(ValueError, match=r"learning_rate must be >= 0"):
        opt.update(jnp.ones(3), state, params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.1)
    state.hyperparams["b2"] = jnp.asarray(1.0)
    with pytest.raises(ValueError, match=r"b2 must be in \[0, 1\)"):
        opt.update(jnp.ones(3), state, params)


@needs_optax
def test_optax_numpy_scalars_and_a_schedule_are_accepted_and_work_under_jit():
    import jax
    import jax.numpy as jnp
    import optax

    from gradand.backends import jax as gj

    params = {"w": jnp.zeros(3)}
    grads = [{"w": jnp.array([1.0, (-1.0) ** t, 0.5])} for t in range(4)]

    def run(opt):
        state = opt.init(params)
        p = params
        step = jax.jit(opt.update)
        for g in grads:
            u, state = step(g, state, p)
            p = optax.apply_updates(p, u)
        return np.asarray(p["w"])

    plain = run(gj.temporal_and_mask(0.1, b1=0.8, beta3=0.7, threshold=0.6, weight_decay=0.01))
    numpy = run(
        gj.temporal_and_mask(
            np.float32(0.1),
            b1=np.float64(0.8),
            beta3=np.float32(0.7),
            threshold=np.float32(0.6),
            weight_decay=np.float64(0.01),
        )
    )
    np.testing.assert_allclose(numpy, plain, rtol=1e-6)
    scheduled = run(gj.temporal_and_mask(optax.constant_schedule(0.1), b1=0.8, beta3=0.7, threshold=0.6,
                                         weight_decay=0.01))  # fmt: skip
    np.testing.assert_allclose(scheduled, plain, rtol=1e-6)
    assert run(gj.temporal_and_mask(np.int64(0))).tolist() == [0.0, 0.0, 0.0]  # lr = 0: nothing moves


@needs_optax
@pytest.mark.parametrize(
    ("updates", "match"),
    [
        (
            {"w": (3, 4), "b": (4,)},
            r"updates\['b'\] has shape \(4,\); expected \(E, 4\).*environment axis is missing",
        ),
        ({"w": (2, 3, 4), "b": (2,)}, r"updates\['b'\] has shape \(2,\); expected \(2, 4\)"),
        (
            {"w": (2, 3, 4), "b": (5, 4)},
            r"updates\['w'\] has shape \(2, 3, 4\), but updates\['b'\] has 5 environments on axis 0; "
            r"expected \(5, 3, 4\)",
        ),
        ({"w": (2, 1, 4), "b": (2, 4)}, r"updates\['w'\] has shape \(2, 1, 4\); expected \(2, 3, 4\)"),
        ({"w": (0, 3, 4), "b": (0, 4)}, r"updates\['[wb]'\] has 0 environments"),
        ({"w": (2, 3, 4), "b": ()}, r"updates\['b'\] has shape \(\) and so no environment axis"),
        ({"w": (2, 3, 4)}, r"updates and params have different tree structures"),
    ],
    ids=["param-shaped", "bias-without-E", "E-mismatch", "broadcastable", "E=0", "0-d", "missing-leaf"],
)
def test_optax_reduce_environments_refuses_updates_that_are_not_E_times_the_parameter(updates, match):
    import jax
    import jax.numpy as jnp
    import optax

    from gradand.backends import jax as gj

    params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
    u = {k: jnp.ones(s) for k, s in updates.items()}
    opt = optax.chain(gj.reduce_environments(gradand.AndMask()), optax.sgd(0.1))
    state = opt.init(params)
    with pytest.raises(ValueError, match=match):
        opt.update(u, state, params)
    with pytest.raises(ValueError, match=match):  # the shapes are static: jit raises at trace time
        jax.jit(opt.update)(u, state, params)


@needs_optax
def test_optax_reduce_environments_needs_params_to_check_the_shapes():
    import jax.numpy as jnp

    from gradand.backends import jax as gj

    params = {"w": jnp.zeros(3)}
    opt = gj.reduce_environments(gradand.Mean())
    with pytest.raises(ValueError, match=r"needs the parameters: call update\(updates, state, params\)"):
        opt.update({"w": jnp.ones(3)}, opt.init(params))
    updates, _ = opt.update({"w": jnp.ones((2, 3))}, opt.init(params), params)
    assert updates["w"].shape == (3,)


@needs_optax
@pytest.mark.parametrize("factory", ["temporal_and_mask", "scale_by_temporal_and_mask"])
def test_optax_temporal_refuses_updates_not_shaped_like_the_parameters(factory):
    import jax.numpy as jnp

    from gradand.backends import jax as gj

    params = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}
    opt = gj.temporal_and_mask(0.1) if factory == "temporal_and_mask" else gj.scale_by_temporal_and_mask()
    state = opt.init(params)
    stacked = {"w": jnp.ones((5, 3, 4)), "b": jnp.ones((5, 4))}  # per-environment, not combined
    with pytest.raises(ValueError, match=r"updates\['b'\] has shape \(5, 4\); expected \(4,\)"):
        opt.update(stacked, state, params)
    with pytest.raises(ValueError, match=r"different tree structures"):
        opt.update({"w": jnp.ones((3, 4))}, state, params)
    with pytest.raises(TypeError, match=r"updates\['b'\]: grad must have a real floating dtype"):
        opt.update({"w": jnp.ones((3, 4)), "b": jnp.ones(4, jnp.int32)}, state, params)


# --- Keras: TemporalAndMask -------------------------------------------------------------------

KERAS_NAMES = {"lr": "learning_rate", "beta3": "beta_3", "eps": "epsilon"}


def _keras_kwargs(name, value):
    if name == "betas":
        return {"beta_1": value[0], "beta_2": value[1]}, None
    return {KERAS_NAMES.get(name, name): value}, KERAS_NAMES.get(name, name)


@needs_keras
@pytest.mark.parametrize(("name", "value", "error", "match"), BAD_SEPARATE, ids=BAD_SEPARATE_IDS)
def test_keras_bad_hyperparameter_is_refused_on_construction_in_its_own_name(name, value, error, match):
    from gradand.backends.tensorflow import TemporalAndMask

    kwargs, own = _keras_kwargs(name, value)
    if name == "weight_decay" and value is None:
        assert TemporalAndMask(weight_decay=None).temporal_weight_decay == 0.0  # Keras's "no decay"
        return
    own_match = match.replace(r"betas\[0\]", "beta_1").replace(r"betas\[1\]", "beta_2")
    if own is not None:
        own_match = own_match.replace(name, own, 1)
    if name == "lr" and error is TypeError:
        own_match = r"learning_rate must be a real number, a keras.optimizers.schedules"
    with pytest.raises(error, match="^" + own_match):
        TemporalAndMask(**kwargs)


@needs_keras
@pytest.mark.parametrize(
    ("attribute", "value", "error", "match"),
    [
        ("threshold", 5.0, ValueError, r"^threshold must be in \[0, 1\]"),
        ("beta_3", 1.0, ValueError, r"^beta_3 must be in \[0, 1\)"),
        ("beta_1", True, TypeError, r"^beta_1 must be a real number"),
        ("epsilon", 0.0, ValueError, r"^epsilon must be > 0"),
        ("temporal_weight_decay", -1.0, ValueError, r"^weight_decay must be >= 0"),
        ("weight_decay_order", "late", ValueError, r"^weight_decay_order must be 'before'"),
        ("learning_rate", -0.1, ValueError, r"^learning_rate must be >= 0"),
        ("learning_rate", np.bool_(True), TypeError, r"^learning_rate must be a real number"),
    ],
)
def test_keras_hyperparameter_set_after_construction_is_checked_and_left_unchanged(
    attribute, value, error, match
):
    from gradand.backends.tensorflow import TemporalAndMask

    opt = TemporalAndMask(0.01, threshold=0.5)
    config = opt.get_config()
    with pytest.raises(error, match=match):
        setattr(opt, attribute, value)
    assert opt.get_config() == config


@needs_keras
def test_keras_numpy_scalars_schedules_and_callables_are_accepted():
    import keras

    from gradand.backends.tensorflow import TemporalAndMask

    def run(opt):
        w = keras.Variable(np.zeros(2, "float32"))
        for t in range(3):
            g = keras.ops.convert_to_tensor(np.array([1.0, (-1.0) ** t], "float32"))
            opt.apply([g], [w])
        return keras.ops.convert_to_numpy(w)

    plain = run(TemporalAndMask(0.1, beta_1=0.8, beta_3=0.7, threshold=0.6))
    numpy = run(
        TemporalAndMask(
            np.float32(0.1), beta_1=np.float64(0.8), beta_3=np.float32(0.7), threshold=np.float32(0.6)
        )
    )
    np.testing.assert_allclose(numpy, plain, rtol=1e-6)
    opt = TemporalAndMask(np.int64(1), threshold=np.int64(1))
    assert opt.threshold == 1.0 and type(opt.threshold) is float
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=1.0)
    np.testing.assert_allclose(
        run(TemporalAndMask(schedule, beta_1=0.8, beta_3=0.7, threshold=0.6)), plain, rtol=1e-6
    )
    np.testing.assert_allclose(
        run(TemporalAndMask(lambda: 0.1, beta_1=0.8, beta_3=0.7, threshold=0.6)), plain, rtol=1e-6
    )
    opt.learning_rate = np.float32(0.5)  # a NumPy scalar set later, as Keras's setter takes a float
    assert float(opt.learning_rate) == 0.5


@needs_keras
def test_keras_learning_rate_set_to_a_tensor_is_checked_by_its_value():
    import tensorflow as tf

    from gradand.backends.tensorflow import TemporalAndMask

    opt = TemporalAndMask(0.1)
    opt.learning_rate = tf.constant(0.25)  # Keras assigns a tensor to its variable: so do we
    assert float(opt.learning_rate) == 0.25
    with pytest.raises(ValueError, match=r"^learning_rate must be >= 0"):
        opt.learning_rate = tf.constant(-0.25)
    with pytest.raises(TypeError, match=r"^learning_rate must be a real number"):
        opt.learning_rate = tf.constant([0.1, 0.2])
    assert float(opt.learning_rate) == 0.25
