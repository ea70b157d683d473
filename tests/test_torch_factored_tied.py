"""factored_backward with parameters used outside their layer's call: detected, so never a wrong gradient.

The factored path computes a Linear/Conv2d weight's per-environment gradient
as Δ_eᵀX_e from the calls of its module. A weight also read elsewhere (tied
weights through ``F.linear(x, l.weight.t())``, a matmul with it, a regulariser
in the loss, weight_norm's parameters) must fall back to the batched backward
(or raise under ``fallback="error"``), while a module called twice or two
Linear layers sharing one weight stay factored. Oracle: the streaming
``gt.backward`` over each environment's own forward pass (per-environment
gradients materialised one at a time), float64 so no sign flips on rounding.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import gradand  # noqa: E402
from gradand.backends import torch as gt  # noqa: E402

F = torch.nn.functional
nn = torch.nn

COMBINERS = [gradand.Mean(), gradand.AndMask(threshold=0.6), gradand.AndMask(threshold=1.0, rescale=False)]
D, H, C = 5, 8, 3


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Base(nn.Module):
    def __init__(self, classes: int = C):
        super().__init__()
        self.l1 = nn.Linear(D, H)
        self.l2 = nn.Linear(H, H)
        self.l3 = nn.Linear(H, classes)


class TiedTranspose(Base):
    """The output layer reuses l1's weight, transposed, through F.linear (never a module call)."""

    def __init__(self):
        super().__init__(classes=C)

    def forward(self, x):
        h = torch.tanh(self.l2(torch.tanh(self.l1(x))))
        return F.linear(h, self.l1.weight.t())[:, :C] + self.l3(h)


class MatmulUse(Base):
    """l2's weight also enters a plain matmul next to its own call."""

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        h = torch.tanh(self.l2(h) + 0.5 * h @ self.l2.weight)
        return self.l3(h)


class ScaledByNorm(Base):
    """l3's weight also scales the output through its norm (a use with no batch axis at all)."""

    def forward(self, x):
        h = torch.tanh(self.l2(torch.tanh(self.l1(x))))
        return self.l3(h) * self.l3.weight.norm()


class CalledTwice(Base):
    """l2 called twice: each call contributes its own Δ_eᵀX_e; nothing is used outside a call."""

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        h = torch.tanh(self.l2(h))
        return self.l3(torch.tanh(self.l2(h)))


class SharedWeight(Base):
    """Two Linear modules share one weight (different biases): both calls are hooked."""

    def __init__(self):
        super().__init__()
        self.l2b = nn.Linear(H, H)
        self.l2b.weight = self.l2.weight

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        return self.l3(torch.tanh(self.l2b(torch.tanh(self.l2(h)))))


class TiedEmbedding(nn.Module):
    """Tied input/output embeddings: nn.Embedding and the output nn.Linear share one weight."""

    def __init__(self, vocab: int = 7):
        super().__init__()
        self.emb = nn.Embedding(vocab, H)
        self.mid = nn.Linear(H, H)
        self.out = nn.Linear(H, vocab)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.mid(self.emb(idx).mean(1))))


def ce(o, t):
    return F.cross_entropy(o, t)


def regularised(model: nn.Module):
    """A loss whose regulariser reads l1's weight directly (inside loss_fn, outside any module call)."""

    def loss_fn(o, t):
        return F.cross_entropy(o, t) + 0.05 * model.l1.weight.pow(2).sum()

    return loss_fn


def data(e: int = 5, n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, n, D, generator=g, dtype=torch.float64), torch.randint(0, C, (e, n), generator=g)


def streaming_oracle(model, loss_for, x, y, combiner) -> list[np.ndarray]:
    """``gt.backward`` over one forward pass per environment: materialised per-environment gradients."""
    m = copy.deepcopy(model)
    loss_fn = loss_for(m)
    params = [p for p in m.parameters() if p.requires_grad]
    gt.backward([loss_fn(m(x[e]), y[e]) for e in range(x.shape[0])], params, combiner)
    return [p.grad.detach().numpy() for p in params]


def factored(model, loss_for, x, y, combiner, **kw) -> list[np.ndarray]:
    m = copy.deepcopy(model)
    gt.model_backward(m, loss_for(m), x, y, combiner, **kw, method="factored")
    return [p.grad.detach().numpy() for p in m.parameters() if p.requires_grad]


def build(cls):
    torch.manual_seed(0)
    return cls().double()


def plain(_model):
    return ce


# (model class, loss factory, the parameter used outside its calls, or None when nothing is)
CASES = {
    "tied-F.linear-transpose": (TiedTranspose, plain, "l1.weight"),
    "matmul-next-to-its-call": (MatmulUse, plain, "l2.weight"),
    "scaled-by-its-norm": (ScaledByNorm, plain, "l3.weight"),
    "regulariser-in-the-loss": (Base, regularised, "l1.weight"),
    "module-called-twice": (CalledTwice, plain, None),
    "two-modules-share-a-weight": (SharedWeight, plain, None),
}


def _forward_base(self, x):
    return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(x)))))


Base.forward = _forward_base


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("combiner", COMBINERS, ids=repr)
@pytest.mark.parametrize("n", [1, 4], ids=lambda n: f"n{n}")
def test_factored_gradient_equals_streaming_backward_whatever_else_reads_the_weight(case, combiner, n):
    cls, loss_for, _ = CASES[case]
    model = build(cls)
    x, y = data(n=n)
    got = factored(model, loss_for, x, y, combiner)
    want = streaming_oracle(model, loss_for, x, y, combiner)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("case", [c for c, v in CASES.items() if v[2] is not None])
def test_fallback_error_names_the_parameter_used_outside_its_layer(case):
    cls, loss_for, name = CASES[case]
    model = build(cls)
    x, y = data()
    m = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"also used outside the layers' calls") as err:
        gt.model_backward(m, loss_for(m), x, y, gradand.AndMask(), fallback="error", method="factored")
    message = str(err.value)
    assert f"'{name} (" in message
    others = [n for n, _ in model.named_parameters() if n != name]
    assert not any(f"'{o} (" in message for o in others)  # only the parameter read elsewhere
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("case", [c for c, v in CASES.items() if v[2] is None])
def test_a_module_called_twice_or_sharing_its_weight_stays_factored(case):
    cls, loss_for, _ = CASES[case]
    x, y = data()
    m = build(cls)
    gt.model_backward(
        m, loss_for(m), x, y, gradand.AndMask(0.6), fallback="error", method="factored"
    )  # nothing falls back
    assert all(p.grad is not None for p in m.parameters())


def test_tied_input_and_output_embeddings_fall_back_and_match_streaming_backward():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randint(0, 7, (4, 3, 5), generator=g), torch.randint(0, 7, (4, 3), generator=g)
    model = build(TiedEmbedding)
    for c in (gradand.Mean(), gradand.AndMask(0.6)):
        got = factored(model, plain, x, y, c)
        want = streaming_oracle(model, plain, x, y, c)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match=r"emb\.weight \(7, 8\)"):
        gt.model_backward(copy.deepcopy(model), ce, x, y, gradand.Mean(), fallback="error", method="factored")


def test_weight_norm_parameters_are_not_taken_for_the_layers_bias():
    def make():  # built afresh each time: a weight_norm module cannot be deep-copied
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated, still in use
            torch.manual_seed(0)
            return nn.Sequential(
                nn.Linear(D, H), nn.Tanh(), torch.nn.utils.weight_norm(nn.Linear(H, C))
            ).double()

    x, y = data()
    for c in (gradand.Mean(), gradand.AndMask(0.6)):
        gt.model_backward(m := make(), ce, x, y, c, method="factored")
        o = make()
        params = list(o.parameters())
        gt.backward([ce(o(x[e]), y[e]) for e in range(x.shape[0])], params, c)
        for a, b in zip(m.parameters(), params):
            np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match=r"weight_g .*weight_v"):
        gt.model_backward(make(), ce, x, y, gradand.Mean(), fallback="error", method="factored")


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 3 * 4, C)
    ).double()


class OnPositions(nn.Module):
    """Linear layers on (B, positions, features) inputs, the same layer on every position."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(D, H), nn.Linear(H, C)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x.reshape(x.shape[0], 2, D)))).sum(1)


@pytest.mark.parametrize(
    "name", ["mlp", "mlp-per-example", "no-bias", "positions", "conv", "called-twice-autocast"]
)
def test_untied_models_are_never_reported_as_tied(name):
    """No false positive: every parameter of these models stays factored (fallback="error" passes)."""
    g = torch.Generator().manual_seed(5)
    x, y = data(n=1 if name == "mlp-per-example" else 4)
    model: nn.Module
    autocast = False
    if name in ("mlp", "mlp-per-example"):
        model = build(Base)
    elif name == "no-bias":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(D, H, bias=False), nn.ReLU(), nn.Linear(H, C, bias=False)).double()
    elif name == "positions":
        model = OnPositions().double()
        x = torch.randn(5, 4, 2 * D, generator=g, dtype=torch.float64)
    elif name == "conv":
        model = conv_net()
        x = torch.randn(5, 3, 2, 5, 6, generator=g, dtype=torch.float64)
        y = y[:, :3]
    else:  # autocast casts a weight once per region and shares the cast between the module's calls
        model, autocast = build(CalledTwice).float(), True
        x = x.float()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        gt.model_backward(model, ce, x, y, gradand.AndMask(0.6), fallback="error", method="factored")
    assert all(p.grad is not None for p in model.parameters())


def test_a_tied_weight_under_autocast_is_still_detected():
    model = build(TiedTranspose).float()
    x, y = data()
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        pytest.raises(ValueError, match=r"'l1\.weight \(8, 5\)'"),
    ):
        gt.model_backward(model, ce, x.float(), y, gradand.AndMask(), fallback="error", method="factored")
