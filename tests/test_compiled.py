"""backprop.compiled: the same verification suite on a few fixed shapes, the same errors, and
the recompile policy stated in the module's docstring."""

import pytest
import torch

import backprop
from backprop import compiled
from backprop.compiled import cpu_compiler_found
from backprop.testing.suite import check_case, gradcheck_case

# torch.compile's CPU backend (Inductor) builds C++: without a compiler these tests skip
needs_compiler = pytest.mark.skipif(not cpu_compiler_found() and not torch.cuda.is_available(),
                                    reason="torch.compile on the CPU needs a C++ compiler (g++)")

pytestmark = needs_compiler


def fixed_cases(name: str, device: str = "cpu"):
    """Notebook-scale cases and one with other sizes and options per op (seeded)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    def randint(high, *shape):
        return torch.randint(0, high, shape, generator=g).to(device)

    targets = randint(27, 48)
    targets[::5] = -100
    cases = {
        "cross_entropy": [((randn(32, 27), randint(27, 32)), {}),
                          ((randn(48, 27) * 30, targets), {"label_smoothing": 0.1})],
        "logsumexp": [((randn(32, 27),), {"dim": 1}), ((randn(5, 7, 9) * 50,), {"dim": (0, 2), "keepdim": True})],
        "batch_norm": [((randn(32, 200), randn(200), randn(200)), {"correction": 1}),
                       ((randn(17, 64) + 40, randn(64), None), {})],
        "tanh": [((randn(32, 200),), {}), ((randn(3, 5, 7) * 4,), {})],
        "linear": [((randn(32, 30), randn(200, 30), randn(200)), {}), ((randn(2, 9, 16), randn(8, 16), None), {})],
        "embedding": [((randint(27, 32, 3), randn(27, 10)), {}),
                      ((randint(5, 4, 50), randn(11, 6)), {"padding_idx": 2, "deterministic": True})],
    }
    return cases[name]


@pytest.mark.parametrize("name", list(backprop.OPS))
def test_compiled_matches_autograd(device, name):
    for case in fixed_cases(name, device):
        check_case(name, compiled.OPS[name], case)


@pytest.mark.parametrize("name", list(backprop.OPS))
def test_compiled_gradcheck(name):
    case = fixed_cases(name)[1]
    assert gradcheck_case(name, compiled.OPS[name], case)


@pytest.mark.parametrize("name", list(backprop.OPS))
def test_compiled_agrees_with_eager(name):
    """Inductor may fuse and reorder, so the bar is rounding, not bits."""
    eager, fast = backprop.OPS[name], compiled.OPS[name]
    args, options = fixed_cases(name)[0]
    out, cache = eager.forward(*args, **options)
    out_c, cache_c = fast.forward(*args, **options)
    assert type(cache_c) is type(cache)
    torch.testing.assert_close(out_c, out)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    for g, g_c in zip(eager.backward(dout, cache), fast.backward(dout, cache_c)):
        assert (g is None) == (g_c is None)
        if g is not None:
            torch.testing.assert_close(g_c, g)


def test_compiled_errors_are_the_eager_errors():
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 3\)"):
        compiled.cross_entropy.forward(torch.randn(2, 3), torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        compiled.tanh.forward(torch.arange(3))
    _, cache = compiled.linear.forward(torch.randn(4, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"dout must have the shape of the forward output \(4, 2\)"):
        compiled.linear.backward(torch.ones(4, 3), cache)


def test_new_shapes_stop_recompiling_after_the_dynamic_graph():
    """Shape 1 compiles static, shape 2 recompiles with symbolic sizes, shape 3 reuses it."""
    op = compiled.CompiledOp(backprop.tanh)  # fresh compile caches
    for n in (5, 6):
        op.backward(torch.ones(n, 3), op.forward(torch.randn(n, 3))[1])
    with torch._dynamo.config.patch(error_on_recompile=True):
        out, cache = op.forward(torch.randn(11, 3))
        (dx,) = op.backward(torch.ones(11, 3), cache)
    torch.testing.assert_close(dx, 1 - out**2)


def test_inputs_requiring_grad_record_no_history():
    x = torch.randn(4, 3, requires_grad=True)
    out, cache = compiled.tanh.forward(x)
    assert out.grad_fn is None and cache.out.grad_fn is None
