"""TemporalAndMaskAdam (paper Algorithm 1) against a hand-written reference and torch's Adam/AdamW."""

from __future__ import annotations

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gradand.backends import torch as gt  # noqa: E402

STEPS = 6


def problem(seed: int, shapes=((3, 4), (4,)), dtype=torch.float64):
    """Initial parameters and per-step noisy quadratic gradients g_t(p) = a_t * p + b_t."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    coeffs = [
        [
            (
                torch.rand(s, generator=g, dtype=torch.float64) + 0.5,
                torch.randn(s, generator=g, dtype=torch.float64),
            )
            for s in shapes
        ]
        for _ in range(STEPS)
    ]
    return [p.to(dtype) for p in params], coeffs


def reference(params, coeffs, *, lr, betas, beta3, threshold, eps, weight_decay, order):
    """Algorithm 1 written out in numpy, float64, independently of gradand."""
    b1, b2 = betas
    ps = [p.double().numpy().copy() for p in params]
    m = [np.zeros_like(p) for p in ps]
    v = [np.zeros_like(p) for p in ps]
    s = [np.zeros_like(p) for p in ps]
    for t in range(1, len(coeffs) + 1):
        for i, p in enumerate(ps):
            a, b = (c.numpy() for c in coeffs[t - 1][i])
            g = a * p + b
            if weight_decay and order == "before":
                g = g + weight_decay * p
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            s[i] = beta3 * s[i] + (1 - beta3) * np.sign(g)
            m_hat, v_hat, s_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t), s[i] / (1 - beta3**t)
            mask = np.abs(s_hat) >= threshold
            d = mask * m_hat / (np.sqrt(v_hat) + eps)
            if weight_decay and order == "after":
                d = d + weight_decay * p
            ps[i] = p - lr * d
    return ps


def run(opt_factory, params, coeffs, steps=STEPS, start=0):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = opt_factory(ps)
    for t in range(start, start + steps):
        for p, (a, b) in zip(ps, coeffs[t]):
            p.grad = (a.to(p.dtype) * p.detach() + b.to(p.dtype)).to(p.dtype)
        opt.step()
    return ps, opt


@pytest.mark.parametrize("threshold", [0.0, 0.5, 1.0])
@pytest.mark.parametrize(("weight_decay", "order"), [(0.0, "after"), (0.1, "before"), (0.1, "after")])
def test_temporal_and_mask_adam_equals_algorithm_1_reference(threshold, weight_decay, order) -> None:
    params, coeffs = problem(1)
    hp = dict(lr=0.05, betas=(0.8, 0.99), beta3=0.7, threshold=threshold, eps=1e-8, weight_decay=weight_decay)
    got, _ = run(lambda ps: gt.TemporalAndMaskAdam(ps, weight_decay_order=order, **hp), params, coeffs)
    expected = reference(params, coeffs, order=order, **hp)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.detach().numpy(), e, rtol=1e-12, atol=1e-12)


def test_the_mask_freezes_components_whose_gradient_sign_flips_every_step() -> None:
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = gt.TemporalAndMaskAdam([p], lr=0.1, beta3=0.5, threshold=0.9)
    for t in range(6):
        p.grad = torch.tensor([1.0, (-1.0) ** t], dtype=torch.float64)
        before = p.detach().clone()
        opt.step()
    assert p[0] < before[0]  # consistent sign: keeps moving
    assert p[1] == before[1]  # alternating sign: |sign average| < 0.9, masked


def test_per_group_hyperparameters_are_used() -> None:
    params, coeffs = problem(2)
    common = dict(betas=(0.9, 0.999), beta3=0.9, eps=1e-8, weight_decay=0.0)

    def factory(ps):
        return gt.TemporalAndMaskAdam(
            [
                {"params": [ps[0]], "lr": 0.1, "threshold": 0.2},
                {"params": [ps[1]], "lr": 0.01, "threshold": 0.9},
            ],
            **common,
        )

    got, _ = run(factory, params, coeffs)
    e0 = reference(params[:1], [c[:1] for c in coeffs], lr=0.1, threshold=0.2, order="after", **common)
    e1 = reference(params[1:], [c[1:] for c in coeffs], lr=0.01, threshold=0.9, order="after", **common)
    np.testing.assert_allclose(got[0].detach().numpy(), e0[0], rtol=1e-12)
    np.testing.assert_allclose(got[1].detach().numpy(), e1[0], rtol=1e-12)


def test_threshold_zero_is_adam_and_decay_after_the_mask_is_adamw() -> None:
    params, coeffs = problem(3)
    for ours, theirs in [
        (dict(weight_decay=0.0), lambda ps: torch.optim.Adam(ps, lr=0.05)),
        (
            dict(weight_decay=0.1, weight_decay_order="before"),
            lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.1),
        ),
        (
            dict(weight_decay=0.1, weight_decay_order="after"),
            lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
        ),
    ]:
        got, _ = run(
            lambda ps, kw=ours: gt.TemporalAndMaskAdam(ps, lr=0.05, threshold=0.0, **kw), params, coeffs
        )
        expected, _ = run(theirs, params, coeffs)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g.detach().numpy(), e.detach().numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_state_dict_round_trips_and_training_resumes_identically(dtype) -> None:
    params, coeffs = problem(4, dtype=dtype)

    def factory(ps):
        return gt.TemporalAndMaskAdam(ps, lr=0.01, threshold=0.5, weight_decay=0.01)

    straight, _ = run(factory, params, coeffs)
    first, opt = run(factory, params, coeffs, steps=3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed = factory(resumed_params)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for p, q in zip(first, resumed_params):
        for key in ("exp_avg", "exp_avg_sq", "sign_avg"):
            saved, loaded = opt.state[p][key], resumed.state[q][key]
            assert loaded.dtype == (torch.float32 if dtype != torch.float32 else dtype)
            assert torch.equal(saved, loaded)
        assert resumed.state[q]["step"] == 3
    for t in range(3, STEPS):
        for p, (a, b) in zip(resumed_params, coeffs[t]):
            p.grad = (a.to(p.dtype) * p.detach() + b.to(p.dtype)).to(p.dtype)
        resumed.step()
    for s, r in zip(straight, resumed_params):
        assert s.dtype == r.dtype == dtype
        assert torch.equal(s.detach(), r.detach())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_parameters_keep_float32_state_and_track_the_float32_run(dtype) -> None:
    params, coeffs = problem(5, dtype=dtype)
    got, opt = run(lambda ps: gt.TemporalAndMaskAdam(ps, lr=0.01, threshold=0.3), params, coeffs)
    ref, _ = run(
        lambda ps: gt.TemporalAndMaskAdam(ps, lr=0.01, threshold=0.3), [p.float() for p in params], coeffs
    )
    for g, r in zip(got, ref):
        assert g.dtype == dtype
        assert all(opt.state[g][k].dtype == torch.float32 for k in ("exp_avg", "exp_avg_sq", "sign_avg"))
        np.testing.assert_allclose(g.detach().float().numpy(), r.detach().numpy(), atol=0.02)


def test_parameters_without_grad_are_skipped_and_closure_loss_is_returned() -> None:
    a = torch.nn.Parameter(torch.ones(2))
    b = torch.nn.Parameter(torch.ones(2))
    opt = gt.TemporalAndMaskAdam([a, b], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (a * a).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss.detach()) == 2.0
    assert torch.equal(b.detach(), torch.ones(2)) and b not in opt.state
    assert torch.all(a.detach() < 1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=(1.0, 0.9)), r"betas\[0\]"),
        (dict(beta3=1.5), "beta3"),
        (dict(threshold=2.0), "threshold"),
        (dict(eps=0.0), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(weight_decay_order="middle"), "weight_decay_order"),
    ],
)
def test_invalid_hyperparameters_are_named(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        gt.TemporalAndMaskAdam([torch.nn.Parameter(torch.ones(1))], **kwargs)


def test_a_parameter_group_with_an_invalid_threshold_is_refused() -> None:
    opt = gt.TemporalAndMaskAdam([torch.nn.Parameter(torch.ones(1))])
    with pytest.raises(ValueError, match="threshold"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))], "threshold": -0.5})
    assert len(opt.param_groups) == 1
