"""The kernel contract, checked the same way for every op."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import backprop
from backprop.autograd import apply
from backprop.testing.opinfo import OPS as TABLE
from backprop.testing.oracle import _bitwise_equal, random_dout
from backprop.testing.strategies import noncontiguous

OPS = list(backprop.OPS)


def run(op, args, options, dout=None, seed=0):
    out, cache = op.forward(*args, **options)
    if dout is None:
        dout = random_dout(out.shape, out.dtype, out.device, seed)
    return out, cache, op.backward(dout, cache), dout


@pytest.mark.parametrize("name", OPS)
def test_module_shape(name):
    op = backprop.OPS[name]
    assert callable(op.forward) and callable(op.backward)
    assert hasattr(op.Cache, "_fields"), "Cache must be a NamedTuple"
    assert op.backward.__doc__ and "d" in op.backward.__doc__, "backward documents its derivation"


@pytest.mark.parametrize("name", OPS)
@given(data=st.data())
def test_grads_tuple_with_none_where_due(name, data):
    op = backprop.OPS[name]
    args, options = data.draw(TABLE[name].cases(), label="case")
    _, cache, grads, _ = run(op, args, options)
    assert isinstance(cache, op.Cache)
    assert isinstance(grads, tuple) and len(grads) == len(args)
    for a, g in zip(args, grads):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            assert (g.shape, g.dtype, g.device) == (a.shape, a.dtype, a.device)
        else:
            assert g is None


@pytest.mark.parametrize("name", OPS)
@given(data=st.data())
def test_pure_deterministic_and_autograd_free(name, data):
    op = backprop.OPS[name]
    args, options = data.draw(TABLE[name].cases(), label="case")
    args = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]
    before = [a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args]
    out, cache, grads, dout = run(op, args, options)
    assert out.grad_fn is None and not out.requires_grad, "no autograd graph inside the kernel"
    assert all(not isinstance(v, torch.Tensor) or v.grad_fn is None for v in cache)
    for a, b in zip(args, before):
        if isinstance(a, torch.Tensor):
            assert _bitwise_equal(a.detach(), b), "an input was modified"
    # an upstream gradient that requires grad (a double-backward caller's) records nothing either
    for g in op.backward(dout.detach().clone().requires_grad_(), cache):
        assert g is None or (g.grad_fn is None and not g.requires_grad), "backward recorded history"
    out2, _, grads2, _ = run(op, args, options, dout=dout)
    assert _bitwise_equal(out, out2)
    again = op.backward(dout, cache)
    for g, g2, g3 in zip(grads, grads2, again):
        assert g is None or (_bitwise_equal(g, g2) and _bitwise_equal(g, g3))


@pytest.mark.parametrize("name", OPS)
@given(data=st.data())
def test_noncontiguous_inputs_give_the_same_results(name, data):
    op = backprop.OPS[name]
    args, options = data.draw(TABLE[name].cases(dtype=torch.float64), label="case")
    out, _, grads, dout = run(op, args, options)
    out_nc, _, grads_nc, _ = run(op, [noncontiguous(a) for a in args], options,
                                 dout=noncontiguous(dout))
    # float64 at torch.testing's float64 tolerances, not bitwise: a reduction over strided memory
    # may sum in another order, and batch_norm's cancellation (shift 50, spread 0.01) magnifies that
    torch.testing.assert_close(out_nc, out, equal_nan=True)
    for g, g_nc in zip(grads, grads_nc):
        if g is not None:
            torch.testing.assert_close(g_nc, g, equal_nan=True)


@pytest.mark.parametrize("name", OPS)
def test_adapter_backward_is_the_kernel(name):
    op = backprop.OPS[name]
    for args, options in TABLE[name].fixed_cases("cpu"):
        out, cache, grads, dout = run(op, args, options)
        leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor)
                  and a.is_floating_point() else a for a in args]
        y = apply(op, *leaves, **options)
        y.backward(dout)
        assert _bitwise_equal(y.detach(), out)
        for leaf, g in zip(leaves, grads):
            if g is not None:
                assert _bitwise_equal(leaf.grad, g)


@pytest.mark.parametrize("name", OPS)
def test_adapter_backward_on_a_kept_graph_then_the_last(name):
    """A graph kept with retain_graph=True runs backward again on the same cache: only the last
    backward (which frees the graph) may hand a cached gradient over; each gives the kernel's."""
    op = backprop.OPS[name]
    for args, options in TABLE[name].fixed_cases("cpu"):
        _, _, grads, dout = run(op, args, options)
        leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor)
                  and a.is_floating_point() else a for a in args]
        wrt = [a for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]
        y = apply(op, *leaves, **options)
        for retain in (True, True, False):
            got = torch.autograd.grad(y, wrt, dout, retain_graph=retain)
            assert all(_bitwise_equal(g, w) for g, w in zip(got, [g for g in grads if g is not None]))


def test_adapter_drops_into_a_model():
    """A two-layer MLP whose backward runs entirely through our kernels matches autograd."""
    g = torch.Generator().manual_seed(1)
    idx, y = torch.randint(0, 27, (32, 3), generator=g), torch.randint(0, 27, (32,), generator=g)
    params = [torch.randn(27, 10, generator=g), torch.randn(64, 30, generator=g) * 0.2,
              torch.randn(64, generator=g), torch.randn(27, 64, generator=g) * 0.1]
    import torch.nn.functional as F

    def loss_fn(C, W1, b1, W2, ours):
        if ours:
            emb = apply(backprop.embedding, idx, C).reshape(32, 30)
            h = apply(backprop.tanh, apply(backprop.batch_norm, apply(backprop.linear, emb, W1, b1)))
            return apply(backprop.cross_entropy, apply(backprop.linear, h, W2), y)
        h = torch.tanh(F.batch_norm(F.linear(F.embedding(idx, C).reshape(32, 30), W1, b1),
                                    None, None, training=True))
        return F.cross_entropy(F.linear(h, W2), y)

    grads = []
    for ours in (True, False):
        leaves = [p.clone().requires_grad_() for p in params]
        loss_fn(*leaves, ours).backward()
        grads.append([p.grad for p in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "name, args",
    [
        ("cross_entropy", lambda m: (torch.randn(2, 3), torch.tensor([0, 1], device=m))),
        ("batch_norm", lambda m: (torch.randn(4, 3), torch.randn(3, device=m), None)),
        ("linear", lambda m: (torch.randn(2, 4), torch.randn(3, 4, device=m), None)),
        ("embedding", lambda m: (torch.tensor([0, 1], device=m), torch.randn(4, 2))),
    ],
)
def test_tensors_on_two_devices_are_refused(name, args):
    """The 'meta' device stands in for a second device on a CPU-only machine."""
    with pytest.raises(ValueError, match=r"all tensors must be on one device, got \w+ on (cpu|meta), \w+ on (meta|cpu)"):
        backprop.OPS[name].forward(*args("meta"))
