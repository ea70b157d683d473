"""torch.compile: the combine step compiles with fullgraph=True; vmap_backward compiles with graph breaks."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

import gradand  # noqa: E402
from gradand.backends import torch as gt  # noqa: E402

F = torch.nn.functional
XP = gradand.array_namespace(torch.empty(0))
# torch's own compile machinery still calls torch.jit.script_method internally
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script:DeprecationWarning")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(n)


def problem(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    g = torch.Generator().manual_seed(seed)
    return model, torch.randn(6, 4, 3, generator=g), torch.randint(0, 2, (6, 4), generator=g)


def test_vmapped_gradients_and_combine_compile_as_one_graph_with_inductor() -> None:
    """fullgraph=True: no graph break from per-environment gradients to the combined update."""
    model, x, y = problem()
    combiner = gradand.AndMask(threshold=0.5)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def env_loss(p, xe, ye):
        return F.cross_entropy(torch.func.functional_call(model, p, (xe,)), ye)

    per_env = torch.func.vmap(torch.func.grad(env_loss), in_dims=(None, 0, 0))

    def step(p, xs, ys):
        grads = per_env(p, xs, ys)
        # nan_policy="raise" would read values on the host (a graph break); xp= skips the namespace lookup
        return {n: gradand.combine(g, combiner, nan_policy="propagate", xp=XP) for n, g in grads.items()}

    eager = step(params, x, y)
    compiled = torch.compile(step, fullgraph=True)(params, x, y)
    for n in eager:
        torch.testing.assert_close(compiled[n], eager[n], rtol=1e-5, atol=1e-6)


def test_compiled_vmap_backward_writes_the_eager_gradients() -> None:
    """The default nan_policy="raise" reads values on the host: graph breaks, same result."""
    model, x, y = problem(1)
    combiner = gradand.SandMask(threshold=0.2, k=10.0)
    loss, *_ = gt.model_backward(model, F.cross_entropy, x, y, combiner, chunk_size=4, method="vectorized")
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # graph-break notices
        fn = torch.compile(gt.vmap_backward, backend="aot_eager")
        closs, _ = fn(model, F.cross_entropy, x, y, combiner, chunk_size=4)
    for p, e in zip(model.parameters(), eager):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(closs, loss)
