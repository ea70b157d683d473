"""factored_backward: per-environment gradients from one forward and one backward pass.

Oracle: each environment's gradient from its own ``loss.backward()``, combined
by the numpy core (``gradand.combine``); and ``vmap_backward`` on the same model.
Models are float64 so that no sign flips on rounding between the two paths.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradand  # noqa: E402
from gradand.backends import torch as gt  # noqa: E402

F = torch.nn.functional
nn = torch.nn

COMBINERS = [
    gradand.Mean(),
    gradand.AndMask(threshold=1.0),
    gradand.AndMask(threshold=0.5, rescale=False),
    gradand.GeometricMean(threshold=0.6),
    gradand.SandMask(threshold=0.4, k=3.0),
]


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mlp(bias: bool = True, d: int = 5, h: int = 12, out: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d, h, bias=bias),
        nn.ReLU(),
        nn.Linear(h, h, bias=bias),
        nn.Tanh(),
        nn.Linear(h, out, bias=bias),
    ).double()


def clone(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def oracle(model, loss_fn, x, y, combiner) -> list[np.ndarray]:
    """Each environment's own backward, combined by the numpy core."""
    m = clone(model)
    params = [p for p in m.parameters() if p.requires_grad]
    per_env = []
    for e in range(x.shape[0]):
        grads = torch.autograd.grad(loss_fn(m(x[e]), y[e]), params, allow_unused=True, materialize_grads=True)
        per_env.append([g.detach().numpy() for g in grads])
    return [gradand.combine(np.stack([g[i] for g in per_env]), combiner) for i in range(len(params))]


def grads_of(model) -> list[np.ndarray]:
    return [p.grad.detach().numpy() for p in model.parameters() if p.requires_grad]


def assert_close(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)


def data(e: int, n: int, d: int = 5, classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, n, d, generator=g, dtype=torch.float64), torch.randint(
        0, classes, (e, n), generator=g
    )


@pytest.mark.parametrize("combiner", COMBINERS, ids=repr)
@pytest.mark.parametrize("shape", [(1, 6), (3, 4), (16, 5), (12, 1)], ids=lambda s: f"E{s[0]}xn{s[1]}")
def test_factored_equals_each_environments_own_backward_and_vmap(combiner, shape):
    model = mlp()
    x, y = data(*shape)
    want = oracle(model, F.cross_entropy, x, y, combiner)
    a, b = clone(model), clone(model)
    loss, _, infos, *_ = gt.model_backward(a, F.cross_entropy, x, y, combiner, method="factored")
    vloss, _, vinfos, *_ = gt.model_backward(b, F.cross_entropy, x, y, combiner, method="vectorized")
    assert_close(grads_of(a), want)
    assert_close(grads_of(a), grads_of(b))
    assert float(loss) == pytest.approx(float(vloss), rel=1e-12)
    assert len(infos) == len(vinfos) == 6
    for i, j in zip(infos, vinfos):
        assert float(i.survivor_fraction) == pytest.approx(float(j.survivor_fraction))
        assert float(i.agreement) == pytest.approx(float(j.agreement))


@pytest.mark.parametrize("combiner", [gradand.AndMask(threshold=0.8), gradand.GeometricMean()], ids=repr)
@pytest.mark.parametrize("n", [1, 4])
def test_factored_without_bias_matches_oracle(combiner, n):
    model = mlp(bias=False)
    x, y = data(6, n)
    gt.model_backward(model_ := clone(model), F.cross_entropy, x, y, combiner, method="factored")
    assert_close(grads_of(model_), oracle(model, F.cross_entropy, x, y, combiner))


class SeqModel(nn.Module):
    """Linear layers on 3-D inputs (n, T, in): the per-example gradient is a sum over T outer products."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).mean(1)


@pytest.mark.parametrize("n", [1, 3])
def test_linear_on_3d_inputs_sums_positions_like_the_oracle(n):
    torch.manual_seed(0)
    model = SeqModel().double()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(5, n, 7, 4, generator=g, dtype=torch.float64), torch.randint(0, 2, (5, n), generator=g)
    c = gradand.AndMask(threshold=0.6)
    gt.model_backward(m := clone(model), F.cross_entropy, x, y, c, fallback="error", method="factored")
    assert_close(grads_of(m), oracle(model, F.cross_entropy, x, y, c))


def cnn(groups: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, (3, 2), stride=2, dilation=(1, 2), padding=(1, 0), groups=groups),
        nn.ReLU(),
        nn.Flatten(),
        nn.LazyLinear(3),
    ).double()


@pytest.mark.parametrize("combiner", [gradand.AndMask(threshold=0.7), gradand.SandMask(0.3, k=2.0)], ids=repr)
@pytest.mark.parametrize("n", [1, 3, 5])  # 1, 3: environments as groups of one convolution; 5: one per env
@pytest.mark.parametrize("groups", [1, 2])
def test_conv2d_matches_oracle(combiner, n, groups):
    model = cnn(groups)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, n, 2, 8, 9, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (4, n), generator=g)
    model(x[0])  # materialise the lazy layer
    want = oracle(model, F.cross_entropy, x, y, combiner)
    gt.model_backward(m := clone(model), F.cross_entropy, x, y, combiner, fallback="error", method="factored")
    assert_close(grads_of(m), want)


@pytest.mark.parametrize("n", [1, 6])
@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d_match_oracle(dims, n):
    conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    torch.manual_seed(0)
    model = nn.Sequential(
        conv(2, 4, 3, padding=1, stride=2), nn.Tanh(), conv(4, 4, 2, groups=2, dilation=2),
        nn.Flatten(), nn.LazyLinear(3),
    ).double()  # fmt: skip
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, n, 2, *[7] * dims, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (3, n), generator=g)
    model(x[0])
    c = gradand.AndMask(threshold=0.6)
    gt.model_backward(m := clone(model), F.cross_entropy, x, y, c, fallback="error", method="factored")
    assert_close(grads_of(m), oracle(model, F.cross_entropy, x, y, c))


def test_conv_with_env_ids_of_different_sizes_matches_the_grouped_batch():
    """Environments of 1, 5 and 2 examples (padded to 5): both conv gradient strategies in one batch."""
    model = cnn(groups=2)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 2, 8, 9, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
    env = torch.tensor([1, 0, 1, 2, 1, 1, 2, 1])
    model(x)
    c = gradand.AndMask(threshold=0.6)
    gt.model_backward(m := clone(model), F.cross_entropy, x, y, c, env_ids=env, fallback="error")
    ref = clone(model)
    losses = [F.cross_entropy(ref(x[env == e]), y[env == e]) for e in range(3)]
    gt.backward(losses, list(ref.parameters()), c)
    assert_close(grads_of(m), grads_of(ref))


class Mixed(nn.Module):
    """Embedding + LayerNorm (unsupported), a Linear used only through F.linear, and a shared Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.norm = nn.LayerNorm(6)
        self.shared = nn.Linear(6, 6)
        self.direct = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, idx):
        h = self.norm(self.emb(idx).sum(1))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))  # called twice: gradients add up
        h = F.linear(h, self.direct.weight, self.direct.bias)  # never called as a module
        return self.head(h)


@pytest.mark.parametrize("n", [1, 4])
def test_unsupported_and_uncalled_layers_fall_back_to_a_batched_backward(n):
    torch.manual_seed(0)
    model = Mixed().double()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randint(0, 10, (6, n, 3), generator=g), torch.randint(0, 2, (6, n), generator=g)
    for c in (gradand.AndMask(threshold=0.6), gradand.GeometricMean(threshold=0.5)):
        for p in model.parameters():
            p.grad = None
        gt.model_backward(m := clone(model), F.cross_entropy, x, y, c, method="factored")
        assert_close(grads_of(m), oracle(model, F.cross_entropy, x, y, c))


def test_fallback_error_lists_the_parameters_outside_supported_layers():
    torch.manual_seed(0)
    model = Mixed().double()
    x, y = torch.randint(0, 10, (3, 2, 3)), torch.randint(0, 2, (3, 2))
    with pytest.raises(ValueError, match=r"emb\.weight") as err:
        gt.model_backward(
            model, F.cross_entropy, x, y, gradand.AndMask(), fallback="error", method="factored"
        )
    msg = str(err.value)
    assert "norm.weight" in msg and "direct.weight" in msg and "shared.weight" not in msg
    assert all(p.grad is None for p in model.parameters())


def bn_net(momentum: float | None = 0.1, track: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=track), nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
        nn.Flatten(), nn.Linear(64, 6), nn.BatchNorm1d(6), nn.Linear(6, 3),
    ).double()  # fmt: skip


def streamed(model, xs, ys, combiner):
    """The reference: one forward pass per environment (BatchNorm statistics per environment)."""
    ref = clone(model)
    gt.backward([F.cross_entropy(ref(x), y) for x, y in zip(xs, ys)], list(ref.parameters()), combiner)
    return ref


def assert_same_state(got: nn.Module, want: nn.Module) -> None:
    assert_close(grads_of(got), grads_of(want))
    for (name, a), b in zip(got.named_buffers(), want.buffers()):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-14, err_msg=name)


@pytest.mark.parametrize("combiner", [gradand.AndMask(threshold=0.6), gradand.SandMask(0.3, k=2.0)], ids=repr)
@pytest.mark.parametrize(("momentum", "track"), [(0.1, True), (None, True), (0.1, False)])
def test_batch_norm_in_train_mode_has_per_environment_statistics(combiner, momentum, track):
    """Gradients and running statistics as from one forward pass per environment (in order)."""
    model = bn_net(momentum, track)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 5, 2, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (3, 5), generator=g)
    r = gt.model_backward(m := clone(model), F.cross_entropy, x, y, combiner, fallback="error")
    assert_same_state(m, streamed(model, x, y, combiner))
    ref = torch.stack([F.cross_entropy(clone(model)(x[e]), y[e]) for e in range(3)])
    np.testing.assert_allclose(r.losses.numpy(), ref.detach().numpy(), rtol=1e-12)


def test_batch_norm_with_env_ids_of_different_sizes():
    model = bn_net()
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(9, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g)
    env = torch.tensor([2, 0, 1, 2, 0, 0, 2, 1, 2])
    c = gradand.AndMask(threshold=0.6)
    gt.model_backward(m := clone(model), F.cross_entropy, x, y, c, env_ids=env, fallback="error")
    assert_same_state(m, streamed(model, [x[env == e] for e in range(3)], [y[env == e] for e in range(3)], c))


@pytest.mark.parametrize("shape", [(7, 3), (7, 3, 5), (7, 2, 3, 4)])
def test_per_environment_normalisation_backward_passes_gradcheck(shape):
    """The hand-written backward of the per-environment normalisation equals autograd's numerical one."""
    from gradand.backends.torch._batchnorm import _Normalize

    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
    env = torch.tensor([2, 0, 1, 0, 2, 1, 0])
    n = (torch.bincount(env, minlength=3) * x[0, 0].numel()).to(x.dtype)[:, None]
    assert torch.autograd.gradcheck(lambda t: _Normalize.apply(t, env, 3, n, 1e-5)[0], (x,))


def test_batch_norm_in_eval_mode_is_factored_and_matches_oracle():
    model = bn_net().eval()
    x, y = torch.randn(4, 3, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4, 3))
    c = gradand.AndMask(threshold=0.7)
    gt.model_backward(m := clone(model), F.cross_entropy, x, y, c, fallback="error")
    assert_same_state(m, streamed(model, x, y, c))


def test_batch_norm_needs_more_than_one_value_per_channel_per_environment():
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
    x, y = data(4, 1)
    with pytest.raises(ValueError, match="BatchNorm1d: an environment has 1 value per channel"):
        gt.model_backward(model, F.cross_entropy, x, y, gradand.AndMask(), method="factored")
    with pytest.raises(ValueError, match="BatchNorm1d '1' in train mode"):
        gt.model_backward(model, F.cross_entropy, x, y, gradand.AndMask(), method="vectorized")


def test_other_batch_norms_in_train_mode_are_refused():
    class MyNorm(nn.BatchNorm1d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(5, 6), MyNorm(6), nn.Linear(6, 3)).double()
    x, y = data(3, 4)
    with pytest.raises(ValueError, match=r"MyNorm '1' in train mode.*factored path cannot"):
        gt.model_backward(model, F.cross_entropy, x, y, gradand.AndMask(), method="factored")
    model.eval()  # running statistics: no interaction between examples; MyNorm's parameters fall back
    c = gradand.AndMask(threshold=0.7)
    gt.model_backward(m := clone(model), F.cross_entropy, x, y, c, method="factored")
    assert_close(grads_of(m), oracle(model, F.cross_entropy, x, y, c))


def test_update_is_added_to_existing_grad_like_backward():
    model = mlp()
    x, y = data(5, 3)
    c = gradand.AndMask(threshold=0.6)
    want = oracle(model, F.cross_entropy, x, y, c)
    m = clone(model)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    gt.model_backward(m, F.cross_entropy, x, y, c, method="factored")
    assert_close(grads_of(m), [w + 1.0 for w in want])


def test_chunk_size_gives_the_same_update():
    model = mlp()
    x, y = data(7, 1)
    for c in (gradand.AndMask(threshold=0.6), gradand.GeometricMean()):
        a, b = clone(model), clone(model)
        gt.model_backward(a, F.cross_entropy, x, y, c, method="factored")
        gt.model_backward(b, F.cross_entropy, x, y, c, chunk_size=3, method="factored")
        assert_close(grads_of(b), grads_of(a))


def test_in_place_activation_after_linear_raises_instead_of_a_wrong_gradient():
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double()
    x, y = data(3, 2)
    with pytest.raises(ValueError, match="in place"):
        gt.model_backward(model, F.cross_entropy, x, y, gradand.AndMask(), method="factored")


def test_non_finite_gradient_raises_naming_the_parameter_and_zero_policy_matches_vmap():
    model = mlp()
    x, y = data(4, 3)
    x[2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"parameter '0\.weight'.*NaN"):
        gt.model_backward(clone(model), F.cross_entropy, x, y, gradand.AndMask(), method="factored")
    a, b = clone(model), clone(model)
    gt.model_backward(a, F.cross_entropy, x, y, gradand.AndMask(0.5), nan_policy="zero", method="factored")
    gt.model_backward(b, F.cross_entropy, x, y, gradand.AndMask(0.5), nan_policy="zero", method="vectorized")
    assert_close(grads_of(a), grads_of(b))


def test_loss_fn_without_a_batching_rule_is_called_per_environment():
    calls = []

    def loss_fn(out, tgt):  # .item() cannot run under vmap
        calls.append(float(out.sum().item()))
        return F.cross_entropy(out, tgt)

    model = mlp()
    x, y = data(3, 2)
    c = gradand.AndMask(threshold=0.6)
    gt.model_backward(m := clone(model), loss_fn, x, y, c, method="factored")
    assert len(calls) == 3
    assert_close(grads_of(m), oracle(model, F.cross_entropy, x, y, c))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"inputs": torch.randn(4)}, "inputs must have shape"),
        ({"targets": torch.zeros(3, 2, dtype=torch.long)}, "targets must have shape"),
        ({"inputs": torch.randn(0, 2, 5)}, "at least one environment"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"fallback": "vmap"}, "fallback"),
        ({"loss_fn": lambda o, t: F.cross_entropy(o, t, reduction="none")}, "scalar"),
    ],
)
def test_invalid_arguments_raise_with_the_offending_value(kwargs, match):
    model = nn.Linear(5, 3)
    args = {
        "loss_fn": F.cross_entropy,
        "inputs": torch.randn(4, 2, 5),
        "targets": torch.zeros(4, 2, dtype=torch.long),
    }
    args.update({k: v for k, v in kwargs.items() if k in args})
    rest = {k: v for k, v in kwargs.items() if k not in args}
    with pytest.raises(ValueError, match=match):
        gt.model_backward(
            model,
            args["loss_fn"],
            args["inputs"],
            args["targets"],
            gradand.AndMask(),
            **rest,
            method="factored",
        )


@pytest.mark.parametrize("n", [1, 3])
def test_grad_scaler_is_undone_before_combining(n):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3)).double()
    x, y = data(6, n)
    c = gradand.SandMask(threshold=0.4, k=2.0)  # not scale-equivariant: a missing unscale would show
    a, b = clone(model), clone(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    gt.model_backward(a, F.cross_entropy, x, y, c, loss_scale=scaler, method="factored")
    gt.model_backward(b, F.cross_entropy, x, y, c, method="factored")
    for p, q in zip(a.parameters(), b.parameters()):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy() * 2.0**12, rtol=1e-9, atol=1e-12)
    x[1, 0, 0] = float("inf")
    for p in a.parameters():
        p.grad = None
    gt.model_backward(
        a, F.cross_entropy, x, y, c, loss_scale=scaler, method="factored"
    )  # no raise: the scaler skips
    assert not torch.isfinite(a[0].weight.grad).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n", [1, 4])
def test_on_cuda_equals_the_cpu_result(n):
    model = mlp()
    x, y = data(8, n)
    c = gradand.AndMask(threshold=0.6)
    gt.model_backward(cpu := clone(model), F.cross_entropy, x, y, c, method="factored")
    gpu = clone(model).cuda()
    loss, _, infos, *_ = gt.model_backward(gpu, F.cross_entropy, x.cuda(), y.cuda(), c, method="factored")
    assert loss.device.type == "cuda" and infos[0].agreement.device.type == "cuda"
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        np.testing.assert_allclose(q.grad.cpu().numpy(), p.grad.numpy(), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("in_out", [False, True])
def test_outer_sign_votes_through_the_integer_product_equal_the_numpy_core(in_out):
    """torch's ``gradand_sign_product`` (int8 GEMM on CPU): the same exact votes, a zero or NaN casts none."""
    from gradand._outer import outer_statistics
    from gradand.backends.torch._common import XP

    g = np.random.default_rng(0)
    x, d = g.standard_normal((37, 9)), g.standard_normal((37, 5))
    x[g.random(x.shape) < 0.2] = 0.0
    d[3, 1], x[5, 2] = np.nan, np.nan
    c = gradand.AndMask(threshold=0.5)
    xt, dt = torch.from_numpy(x), torch.from_numpy(d)
    got = outer_statistics(xt, dt, c, nan_policy="propagate", xp=XP, _in_out=in_out)
    want = outer_statistics(x, d, c, nan_policy="propagate", _in_out=in_out)
    assert got.sign_sum.dtype == torch.int32
    np.testing.assert_array_equal(got.sign_sum.numpy(), want.sign_sum)


@pytest.mark.parametrize(
    ("loss_fn", "outputs", "targets"),
    [
        (F.cross_entropy, (3, 4, 5), "classes"),
        (F.cross_entropy, (3, 4, 5, 6), "classes"),
        (F.cross_entropy, (3, 4, 5), "probabilities"),
        (F.nll_loss, (3, 4, 5), "classes, one ignored"),
        (F.binary_cross_entropy_with_logits, (3, 4, 2), "like outputs"),
        (F.mse_loss, (3, 4, 2), "like outputs"),
        (F.mse_loss, (3, 4, 1), "broadcast"),
        (F.huber_loss, (3, 4), "like outputs"),
        (F.l1_loss, (3, 4, 2), "like outputs"),
    ],
)
def test_per_environment_losses_of_known_losses_equal_one_call_per_environment(loss_fn, outputs, targets):
    """The unreduced fast path (or its fallback): each environment's loss and its gradient."""
    import warnings

    from gradand.backends.torch._factored import _env_losses

    g = torch.Generator().manual_seed(8)
    o = torch.randn(*outputs, generator=g, dtype=torch.float64, requires_grad=True)
    if targets.startswith("classes"):
        shape = (outputs[0], outputs[1], *outputs[3:])
        t = torch.randint(0, outputs[2], shape, generator=g)
        if "ignored" in targets:
            t[:, 1] = -100
    elif targets == "probabilities":
        t = torch.softmax(torch.randn(*outputs, generator=g, dtype=torch.float64), -1)
    elif targets == "broadcast":
        t = torch.randn(*outputs[:2], generator=g, dtype=torch.float64)
    else:
        t = torch.rand(*outputs, generator=g, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mse_loss warns about broadcasting, as it should
        got = _env_losses(loss_fn, o, t)
        want = torch.stack([loss_fn(o[e], t[e]) for e in range(o.shape[0])])
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=1e-12)
    (g1,) = torch.autograd.grad(got.sum(), o)
    (g2,) = torch.autograd.grad(want.sum(), o)
    np.testing.assert_allclose(g1.numpy(), g2.numpy(), rtol=1e-12, atol=1e-15)

