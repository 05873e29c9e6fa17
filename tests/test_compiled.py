"""backprop.compiled: the same verification suite on the op table's fixed cases, the same errors, and
the recompile policy stated in the module's docstring."""

import pytest
import torch
from hypothesis import settings

import backprop
from backprop import compiled
from backprop.compiled import cpu_compiler_found
from backprop.testing.opinfo import OPS as TABLE
from backprop.testing.suite import check_case, gradcheck_case

# torch.compile's CPU backend (Inductor) builds C++: without a compiler these tests skip
needs_compiler = pytest.mark.skipif(not cpu_compiler_found() and not torch.cuda.is_available(),
                                    reason="torch.compile on the CPU needs a C++ compiler (g++)")

pytestmark = needs_compiler

# Inductor unrolls linear_cross_entropy's chunk loop: about 2 minutes of compiling on 2 cores for its
# fixed cases (test durations, docs/linear_cross_entropy.md), so the default run leaves it to thorough
SLOW_TO_COMPILE = {"linear_cross_entropy"}


def skip_slow_compile(name):
    if name in SLOW_TO_COMPILE and settings().max_examples < 100:
        pytest.skip(f"compiling {name} takes minutes: HYPOTHESIS_PROFILE=thorough runs it")


def agrees_with_eager(name, case):
    """The compiled op against the eager kernel on one case: Inductor may fuse and reorder, so the
    bar is rounding, not bits."""
    eager, fast = backprop.OPS[name], compiled.OPS[name]
    args, options = case
    out, cache = eager.forward(*args, **options)
    out_c, cache_c = fast.forward(*args, **options)
    assert type(cache_c) is type(cache)
    torch.testing.assert_close(out_c, out)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    for g, g_c in zip(eager.backward(dout, cache), fast.backward(dout, cache_c)):
        assert (g is None) == (g_c is None)
        if g is not None:
            torch.testing.assert_close(g_c, g)


@pytest.mark.parametrize("name", list(backprop.OPS))
def test_compiled_matches_autograd(device, name):
    """Each fixed case compiles its own graphs (5-7 s a case on 2 cores, cold): the default run
    takes the first (the notebook's scale; test_compiled_gradcheck compiles the second), the
    thorough profile all of them. On the CPU the first case is then checked against the eager
    kernel here, on the graphs just compiled: as a test of its own it compiled them again
    whenever pytest-xdist ran it on the other worker (5-15 s an op, cold)."""
    skip_slow_compile(name)
    cases = TABLE[name].fixed_cases(device)
    for case in cases if settings().max_examples >= 100 else cases[:1]:
        check_case(name, compiled.OPS[name], case)
    if device == "cpu":
        agrees_with_eager(name, cases[0])


@pytest.mark.parametrize("name", list(backprop.OPS))
def test_compiled_gradcheck(name):
    skip_slow_compile(name)
    case = TABLE[name].fixed_cases("cpu")[1]
    assert gradcheck_case(name, compiled.OPS[name], case)


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
