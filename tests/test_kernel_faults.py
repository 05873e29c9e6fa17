"""Faults that used to give silently wrong gradients, or errors from deep inside the kernels:
caches edited in place after forward, options of the wrong type, a dout on another device,
a forged or mismatched cache, and the inputs where backprop differed from torch."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings

import backprop
from backprop import (
    batch_norm,
    compiled,
    cross_entropy,
    embedding,
    linear,
    linear_cross_entropy,
    logsumexp,
    tanh,
)
from backprop.autograd import apply
from backprop.testing import check_against_autograd, references
from backprop.testing.opinfo import OPS as TABLE


def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def _fixed(name):
    """The op table's first fixed case (the notebook's scale): the shapes, dtypes and options that
    tests/test_compiled.py compiles, so that a compiled case here runs on its graphs where the two
    share a worker (another shape compiled a graph with symbolic sizes: 2-9 s a case, cold)."""
    return lambda: TABLE[name].fixed_cases("cpu")[0]


# (op, () -> (args, options), index of the argument that the cache keeps, or "out" for the output)
KEPT = {
    "tanh out": (tanh, _fixed("tanh"), "out"),
    "cross_entropy logits": (cross_entropy, _fixed("cross_entropy"), 0),
    "cross_entropy targets": (cross_entropy, _fixed("cross_entropy"), 1),
    "logsumexp x": (logsumexp, _fixed("logsumexp"), 0),
    "linear x": (linear, _fixed("linear"), 0),
    "linear weight": (linear, _fixed("linear"), 1),
    "batch_norm x": (batch_norm, _fixed("batch_norm"), 0),
    "batch_norm weight": (batch_norm, _fixed("batch_norm"), 1),
    "embedding indices": (embedding, _fixed("embedding"), 0),
    "linear_cross_entropy x": (linear_cross_entropy, lambda: ((_randn(3, 4), _randn(5, 4), torch.tensor([0, 4, 1])),
                                                              {"reduction": "none"}), 0),
    "linear_cross_entropy linear_weight": (linear_cross_entropy, lambda: ((_randn(3, 4), _randn(5, 4),
                                                                          torch.tensor([0, 4, 1])), {}), 1),
}


def _edit_in_place(t):
    """The edits a training script makes: a scale, an accumulation (h += r), a fill."""
    if t.is_floating_point():
        t.mul_(2)
    else:
        t.copy_(t.flip(0))  # permuted targets or indices: still in range, still silently wrong


@pytest.mark.parametrize("case", list(KEPT))
@pytest.mark.parametrize("impl", ["eager", "compiled"])
def test_a_kept_tensor_edited_in_place_after_forward_is_refused(case, impl):
    """The cache keeps the caller's tensor (no copy): an in-place edit would change the gradient
    silently. torch's saved tensors raise here; so does backward, naming the tensor."""
    op, make, kept = KEPT[case]
    name = case.split()[1]
    if impl == "compiled":
        if not compiled.cpu_compiler_found():
            pytest.skip("torch.compile on the CPU needs a C++ compiler (g++)")
        if op is linear_cross_entropy and settings().max_examples < 100:  # as in tests/test_compiled.py
            pytest.skip("compiling linear_cross_entropy takes minutes: HYPOTHESIS_PROFILE=thorough runs it")
        op = compiled.OPS[op.__name__.rsplit(".", 1)[-1]]
    args, options = make()
    out, cache = op.forward(*args, **options)
    dout = torch.randn_like(out)
    op.backward(dout, cache)  # untouched: fine, and repeatable
    _edit_in_place(out if kept == "out" else args[kept])
    with pytest.raises(RuntimeError, match=rf"cache: {name} was modified in place after forward "
                                           r"\(version 0 -> 1\); backward would be silently wrong"):
        op.backward(dout, cache)


@pytest.mark.parametrize("case", list(KEPT))
def test_the_autograd_adapter_refuses_the_same_edit(case):
    """Through backprop.autograd.apply the tensors go through save_for_backward: torch's own
    version check speaks first, with its message."""
    op, make, kept = KEPT[case]
    args, options = make()
    args = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    out = apply(op, *args, **options)
    victim = out if kept == "out" else args[kept]
    with torch.no_grad():
        _edit_in_place(victim)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward(torch.ones_like(out))


def test_edits_to_tensors_the_cache_does_not_keep_are_fine():
    """tanh keeps its output, not x; cross_entropy's dout is not kept; clones are the advice."""
    x = _randn(3, 4)
    out, cache = tanh.forward(x)
    (dx,) = tanh.backward(torch.ones_like(out), cache)
    x.mul_(2)
    h = out.clone()
    h += 1
    torch.testing.assert_close(tanh.backward(torch.ones_like(out), cache)[0], dx)


def test_a_cache_built_by_hand_records_no_versions():
    """Cache(out) without versions is the caller's own: nothing to compare, backward runs."""
    out = torch.tanh(_randn(4))
    cache = tanh.Cache(out)
    out.mul_(0.5)
    assert cache.versions == ()
    torch.testing.assert_close(tanh.backward(torch.ones(4), cache)[0], 1 - out**2)


# ------------------------------------------------------------------------ options


def _ce(**options):
    return cross_entropy.forward(_randn(3, 4), torch.tensor([0, 1, 2]), **options)


@pytest.mark.parametrize(
    "call, error, message",
    [
        # ignore_index=True or 1.0 silently ignored every class-1 row
        (lambda: _ce(ignore_index=True), TypeError, r"ignore_index must be an int, got bool"),
        (lambda: _ce(ignore_index=1.0), TypeError, r"ignore_index must be an int, got float"),
        (lambda: _ce(ignore_index=1.5), TypeError, r"ignore_index must be an int, got float"),
        (lambda: _ce(ignore_index=None), TypeError, r"ignore_index must be an int, got NoneType"),
        (lambda: _ce(ignore_index="1"), TypeError, r"ignore_index must be an int, got str"),
        (lambda: _ce(ignore_index=2**70), ValueError, r"ignore_index must lie in the int64 range .*got 1180591620717411303424"),
        (lambda: _ce(ignore_index=-(2**63) - 1), ValueError, r"ignore_index must lie in the int64 range"),
        (lambda: _ce(label_smoothing=None), TypeError, r"label_smoothing must be a float, got NoneType"),
        (lambda: _ce(label_smoothing="0.1"), TypeError, r"label_smoothing must be a float, got str"),
        (lambda: _ce(label_smoothing=True), TypeError, r"label_smoothing must be a float, got bool"),
        (lambda: _ce(label_smoothing=float("nan")), ValueError, r"label_smoothing must be finite, got nan"),
        (lambda: _ce(label_smoothing=float("inf")), ValueError, r"label_smoothing must be finite, got inf"),
        (lambda: _ce(reduction=None), TypeError, r"reduction must be a str, one of .*got NoneType"),
        (lambda: _ce(reduction=1), TypeError, r"reduction must be a str, one of .*got int"),
        (lambda: logsumexp.forward(_randn(3), keepdim="no"), TypeError, r"keepdim must be a bool, got str"),
        (lambda: logsumexp.forward(_randn(3), keepdim=1), TypeError, r"keepdim must be a bool, got int"),
        (lambda: logsumexp.forward(_randn(3), keepdim=None), TypeError, r"keepdim must be a bool, got NoneType"),
        (lambda: logsumexp.forward(_randn(3), dim=2**70), ValueError, r"dim must lie in \[-1, 0\]"),
        (lambda: batch_norm.forward(_randn(4, 3), eps=None), TypeError, r"eps must be a float, got NoneType"),
        (lambda: batch_norm.forward(_randn(4, 3), eps="1e-5"), TypeError, r"eps must be a float, got str"),
        (lambda: batch_norm.forward(_randn(4, 3), eps=True), TypeError, r"eps must be a float, got bool"),
        (lambda: batch_norm.forward(_randn(4, 3), eps=float("inf")), ValueError, r"eps must be finite, got inf"),
        (lambda: batch_norm.forward(_randn(4, 3), eps=float("nan")), ValueError, r"eps must be finite, got nan"),
        (lambda: batch_norm.forward(_randn(4, 3), correction=1.0), ValueError, r"correction must be a non-negative int, got 1.0"),
        (lambda: embedding.forward(torch.tensor([0]), _randn(3, 2), padding_idx=1.0), TypeError, r"padding_idx must be an int or None, got float"),
        (lambda: embedding.forward(torch.tensor([0]), _randn(3, 2), deterministic=None), TypeError, r"deterministic must be a bool, got NoneType"),
    ],
)
def test_options_of_the_wrong_type_are_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_ignore_index_one_was_silently_every_class_1_row():
    """The fault: ignore_index=True compared equal to class 1. An int 1 still ignores class 1."""
    logits, targets = _randn(3, 4), torch.tensor([1, 0, 1])
    loss, _ = cross_entropy.forward(logits, targets, ignore_index=1)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets, ignore_index=1))


def test_int_and_numpy_scalars_are_accepted_where_they_fit():
    np = pytest.importorskip("numpy")
    x = _randn(4, 3)
    loss, _ = cross_entropy.forward(x, torch.tensor([0, 1, 2, 0]), ignore_index=np.int64(2),
                                    label_smoothing=np.float32(0.25))
    torch.testing.assert_close(loss, F.cross_entropy(x, torch.tensor([0, 1, 2, 0]), ignore_index=2,
                                                     label_smoothing=0.25))
    out, _ = batch_norm.forward(x, eps=1)  # an int eps is a float, as in torch
    torch.testing.assert_close(out, F.batch_norm(x, None, None, training=True, eps=1.0))


# ------------------------------------------------------------------------ dout and cache


FIXED = {
    "cross_entropy": lambda: cross_entropy.forward(_randn(3, 4), torch.tensor([0, 1, 2]), reduction="none"),
    "logsumexp": lambda: logsumexp.forward(_randn(3, 4)),
    "batch_norm": lambda: batch_norm.forward(_randn(4, 3), _randn(3)),
    "tanh": lambda: tanh.forward(_randn(3, 4)),
    "linear": lambda: linear.forward(_randn(3, 4), _randn(2, 4)),
    "embedding": lambda: embedding.forward(torch.tensor([0, 2]), _randn(3, 2)),
    "linear_cross_entropy": lambda: linear_cross_entropy.forward(_randn(3, 4), _randn(5, 4), torch.tensor([0, 4, 1])),
}


@pytest.mark.parametrize("name", list(backprop.OPS))
def test_dout_on_another_device_is_refused(name):
    """The 'meta' device stands in for a second device: tanh used to ignore it silently."""
    out, cache = FIXED[name]()
    with pytest.raises(ValueError, match=r"dout must be on the device of the forward output \(cpu\), got meta"):
        backprop.OPS[name].backward(torch.ones_like(out, device="meta"), cache)


@pytest.mark.parametrize("name", list(backprop.OPS))
def test_a_forged_or_mismatched_cache_is_named(name):
    op = backprop.OPS[name]
    out, cache = FIXED[name]()
    other = "tanh" if name != "tanh" else "linear"
    _, other_cache = FIXED[other]()
    for forged, got in [(None, "NoneType"), (tuple(cache), "tuple"), (other_cache, rf"backprop\.{other}\.Cache")]:
        with pytest.raises(TypeError, match=rf"cache must be a backprop\.{name}\.Cache from {name}\.forward, got {got}$"):
            op.backward(torch.ones_like(out), forged)


def test_a_cache_with_a_non_tensor_field_is_named():
    _, cache = tanh.forward(_randn(3))
    with pytest.raises(TypeError, match=r"cache\.out must be a torch\.Tensor, got NoneType"):
        tanh.backward(torch.ones(3), cache._replace(out=None))


# ------------------------------------------------------------------------ matched divergences


def test_inf_on_a_non_target_logit_gives_nan_as_torch():
    """Was inf (shifted by 0); torch's log_softmax gives nan for the whole row, and so do we now."""
    logits = torch.tensor([[0.0, torch.inf, 1.0], [0.5, -1.0, 2.0]], dtype=torch.float64)
    targets = torch.tensor([0, 2])
    for options in ({}, {"reduction": "none"}, {"label_smoothing": 0.1}):
        leaf = logits.clone().requires_grad_()
        expected = F.cross_entropy(leaf, targets, **options)
        expected.backward(torch.ones_like(expected))
        out, cache = cross_entropy.forward(logits, targets, **options)
        (dlogits, _) = cross_entropy.backward(torch.ones_like(out), cache)
        torch.testing.assert_close(out, expected.detach(), equal_nan=True)
        torch.testing.assert_close(dlogits, leaf.grad, equal_nan=True)
        assert dlogits[0].isnan().all() and dlogits[1].isfinite().all()


def test_uint8_targets_as_torch():
    """torch accepts uint8 (Byte) targets; we refused them."""
    logits = _randn(4, 5).double()
    check_against_autograd(cross_entropy, references.cross_entropy, logits,
                           torch.tensor([4, 0, 2, 0], dtype=torch.uint8), label_smoothing=0.1)


def test_a_row_holding_inf_and_a_large_finite_entry_gives_torch_gradient():
    """Was nan at the finite entry 710 (the row shifted by 0: exp(710) overflows, inf * (dout / inf));
    torch's dout * exp(x - out), out = +inf, is 0 there, and so is ours now (eager and backprop.cpp)."""
    from backprop.compiled import cpu_compiler_found

    x = torch.tensor([[torch.inf, 710.0, 1.0]], dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    expected = torch.autograd.grad(torch.logsumexp(leaf, 1).sum(), leaf)[0]  # [[nan, 0, 0]]
    for op in (logsumexp, *([backprop.cpp.logsumexp] if cpu_compiler_found() else [])):
        out, cache = op.forward(x, dim=1)
        (dx,) = op.backward(torch.ones_like(out), cache)
        assert out.tolist() == [torch.inf]
        torch.testing.assert_close(dx, expected, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("targets", [[2, 2, 2], [2, -100, 2]], ids=str)
def test_a_zero_weight_total_with_smoothing_gives_nan_as_torch(targets):
    """'mean', class weights, label smoothing, every kept target's weight 0: torch's nll term is
    0 / 0 = nan; ours summed it with the smoothing term first and gave inf (found by a fault hunt)."""
    targets, weight = torch.tensor(targets), torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    options = {"weight": weight, "label_smoothing": 0.1}
    check_against_autograd(cross_entropy, references.cross_entropy, _randn(3, 4).double(), targets, **options)
    check_against_autograd(linear_cross_entropy, references.linear_cross_entropy, _randn(3, 5).double(),
                           _randn(4, 5).double(), targets, _randn(4).double(), **options)
