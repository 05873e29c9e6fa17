from unittest import mock

import pytest
import torch
from hypothesis import assume, example, given, settings

from backprop import linear_cross_entropy
from backprop.autograd import apply
from backprop.testing import check_against_autograd, random_dout, references
from backprop.testing.oracle import _bitwise_equal
from backprop.testing.strategies import linear_cross_entropy_cases, to_device
from backprop.testing.suite import check_case, gradcheck_case

ref = references.linear_cross_entropy


def on(device, case):
    """to_device, the class weights (an option) included."""
    (args, options) = to_device(case, device)
    w = options.get("weight")
    return args, {**options, "weight": None if w is None else w.to(device)}


def inputs(N=10, D=6, V=13, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, D, generator=g, dtype=dtype), torch.randn(V, D, generator=g, dtype=dtype),
            torch.randint(0, V, (N,), generator=g), torch.randn(V, generator=g, dtype=dtype))


def _every_row_ignored(reduction):
    x, w, t, b = inputs(N=3, D=2, V=4)
    return (x, w, t.fill_(-100), b), {"reduction": reduction}


def _zero_weight_total(targets):
    """Class weights and label smoothing where every kept target's weight is 0 ('mean')."""
    x, w, _, b = inputs(N=3, D=2, V=4)
    return (x, w, torch.tensor(targets), b), {"weight": torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=torch.float64),
                                              "label_smoothing": 0.1}


@given(case=linear_cross_entropy_cases())
@example(case=_every_row_ignored("mean"))  # found by hypothesis: the jvp was 0, torch's 0 / 0 = nan
@example(case=_every_row_ignored("sum"))
# found by a fault hunt: torch divides the nll term (0 / 0 = nan) and the smoothing term apart; the
# two summed first gave inf / 0 = inf, and gradients inf in the target's column
@example(case=_zero_weight_total([2, 2, 2]))
@example(case=_zero_weight_total([2, -100, 2]))
def test_matches_autograd(device, case):
    check_case("linear_cross_entropy", linear_cross_entropy, on(device, case))


@given(case=linear_cross_entropy_cases(dtype=torch.float64))
@settings(max_examples=15)  # ~0.3 s a case (each differenced forward also computes the gradients)
def test_gradcheck(case):
    assume(gradcheck_case("linear_cross_entropy", linear_cross_entropy, case))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 9, 10, 11, None])
def test_every_chunking_gives_the_same_gradients(reduction, chunk_size):
    """Chunk boundaries (1 row, uneven tail, exact multiple, one chunk, larger than N) change only the
    order of summation; ignored rows and class weights on the boundaries."""
    x, w, t, b = inputs()
    t[[0, 3, 4, 9]] = -100
    options = {"reduction": reduction, "label_smoothing": 0.2, "weight": torch.rand(13, dtype=torch.float64) + 0.5}
    check_against_autograd(linear_cross_entropy, ref, x, w, t, b, chunk_size=chunk_size, **options)


def test_the_default_chunk_bounds_the_logits():
    x, w, t, _ = inputs(N=5, V=3)
    assert linear_cross_entropy.prepare(x, w, t).chunk_size == linear_cross_entropy.CHUNK_ELEMENTS // 3
    big = torch.empty(2 * linear_cross_entropy.CHUNK_ELEMENTS, 1)  # V above the bound: one row a chunk
    assert linear_cross_entropy.prepare(torch.empty(4, 1), big, torch.zeros(4, dtype=torch.int64)).chunk_size == 1


def test_scalar_loss_caches_gradients_not_logits():
    """'mean' keeps dx, dW, db (O(N D + V D)) besides the inputs themselves; 'none' keeps the
    inputs alone: nothing of size N V either way."""
    x, w, t, b = inputs(N=64, D=4, V=100)
    for reduction, made in (("mean", [(64, 4), (100, 4), (100,)]), ("none", [])):
        _, cache = linear_cross_entropy.forward(x, w, t, b, reduction=reduction)
        assert cache.x is x and cache.linear_weight is w and cache.linear_bias is b and cache.targets is t
        new = [v for v in cache if isinstance(v, torch.Tensor) and not any(v is a for a in (x, w, t, b))]
        assert sorted(tuple(v.shape) for v in new) == sorted(made), reduction


def test_the_chunk_buffer_is_reused_not_reallocated():
    """One (c, V) buffer for the whole forward, whatever the number of chunks."""
    x, w, t, _ = inputs(N=40, D=4, V=50)
    sizes = []
    real_empty = torch.Tensor.new_empty

    def spy(self, *shape, **kw):
        sizes.append(tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple) else shape)
        return real_empty(self, *shape, **kw)

    with mock.patch.object(torch.Tensor, "new_empty", spy):
        linear_cross_entropy.forward(x, w, t, chunk_size=3)
    assert sizes.count((3, 50)) == 1 and not any(50 in s for s in sizes if s != (3, 50)), sizes


def test_every_row_ignored_gives_nan_mean_and_zero_gradient_like_torch():
    x, w, t, b = inputs(N=3, V=4)
    t[:] = -100
    loss, cache = linear_cross_entropy.forward(x, w, t, b, chunk_size=2)
    assert loss.isnan()
    dx, dw, dt, db = linear_cross_entropy.backward(torch.tensor(1.0, dtype=torch.float64), cache)
    assert dt is None and not dx.any() and not dw.any() and not db.any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("targets", [[2, 2, 2], [2, -100, 2], [-100, -100, -100]], ids=str)
def test_a_zero_weight_total_with_smoothing_gives_nan_like_torch(targets, dtype):
    """'mean' with class weights and label smoothing where the kept targets' weights sum to 0: torch's
    nll term is 0 / 0 = nan, so the loss and every gradient are nan (dx 0 on an ignored row); the
    two terms summed first gave inf. Every row ignored: nan and zero gradients, as before."""
    x, w, _, b = (t.to(dtype) for t in inputs(N=3, D=5, V=4))
    t, cw = torch.tensor(targets), torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=dtype)
    leaves = [a.clone().requires_grad_() for a in (x, w, b)]
    expected = torch.nn.functional.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2], weight=cw,
                                                         ignore_index=-100, label_smoothing=0.1)
    expected.backward()
    for chunk_size in (None, 2):
        loss, cache = linear_cross_entropy.forward(x, w, t, b, weight=cw, label_smoothing=0.1, chunk_size=chunk_size)
        dx, dw, _, db = linear_cross_entropy.backward(torch.ones((), dtype=dtype), cache)
        assert loss.isnan() and expected.isnan()
        torch.testing.assert_close(loss, expected.detach(), equal_nan=True)
        for ours, leaf in zip((dx, dw, db), leaves):
            torch.testing.assert_close(ours, leaf.grad, equal_nan=True)
        kept = t != -100
        assert dx[kept].isnan().all() and not dx[~kept].any()
        assert dw.isnan().all() == db.isnan().all() == bool(kept.any())


def test_weighted_mean_divides_by_the_kept_targets_weights():
    x, w, t, _ = inputs()
    t[:3] = -100
    cw = torch.rand(13, dtype=torch.float64) + 0.5
    loss, _ = linear_cross_entropy.forward(x, w, t, weight=cw)
    total, _ = linear_cross_entropy.forward(x, w, t, weight=cw, reduction="sum")
    torch.testing.assert_close(loss, total / cw[t[3:]].sum())


def test_release_hands_the_cached_gradients_over_and_the_default_leaves_the_cache():
    """backward(dout, cache) returns new tensors and leaves the cache as it was (it can run again);
    release=True scales a scalar loss's cached gradients in place and returns them, the same values."""
    x, w, t, b = inputs()
    dout = torch.tensor(2.5, dtype=torch.float64)
    for reduction in ("mean", "sum"):
        _, cache = linear_cross_entropy.forward(x, w, t, b, reduction=reduction)
        cached = [cache.dx, cache.dlinear_weight, cache.dlinear_bias]
        before = [v.clone() for v in cached]
        kept = linear_cross_entropy.backward(dout, cache)
        assert all(torch.equal(v, v0) for v, v0 in zip(cached, before))
        assert not any(g is v for g in kept for v in cached)
        released = linear_cross_entropy.backward(dout, cache, release=True)
        assert [released[k] for k in (0, 1, 3)] == cached and released[2] is None  # the cache's own tensors
        assert all(_bitwise_equal(r, k) for r, k in zip(released, kept) if k is not None)
    _, cache = linear_cross_entropy.forward(x, w, t, b, reduction="none")  # nothing cached: computed anew
    once = linear_cross_entropy.backward(torch.ones(10, dtype=torch.float64), cache, release=True)
    twice = linear_cross_entropy.backward(torch.ones(10, dtype=torch.float64), cache, release=True)
    assert all(a is None or _bitwise_equal(a, b) for a, b in zip(once, twice))


def test_the_adapter_hands_the_cached_gradients_over_to_grad(monkeypatch):
    """loss.backward() through backprop.autograd frees the graph after it: the node returns the
    cache's gradient tensors scaled in place, and AccumulateGrad keeps them as .grad (no copy)."""
    x, w, t, b = (a.requires_grad_() if a.is_floating_point() else a for a in inputs(N=40, D=8, V=16))
    pointers = []
    real = linear_cross_entropy.forward

    def spy(*args, **options):  # keeps the addresses only: a reference would stop the hand-over
        out, cache = real(*args, **options)
        pointers.extend(v.data_ptr() for v in (cache.dx, cache.dlinear_weight, cache.dlinear_bias))
        return out, cache

    monkeypatch.setattr(linear_cross_entropy, "forward", spy)
    (2.5 * apply(linear_cross_entropy, x, w, t, b, chunk_size=7)).backward()
    assert [x.grad.data_ptr(), w.grad.data_ptr(), b.grad.data_ptr()] == pointers
    leaves = [a.detach().requires_grad_() for a in (x, w, b)]
    (2.5 * ref(leaves[0], leaves[1], t, leaves[2])).backward()
    for ours, theirs in zip((x, w, b), leaves):
        torch.testing.assert_close(ours.grad, theirs.grad)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("keep", ["retain_graph", "create_graph"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_kept_graph_gives_the_twins_gradients_on_every_backward(keep, reduction):
    """retain_graph=True (or create_graph=True) keeps the cache: the first backward must not hand
    it over, so the second (which frees the graph, and may) sees it unscaled."""
    x, w, t, b = inputs(N=12, seed=3)
    t[:2] = -100
    dout = random_dout((12,) if reduction == "none" else (), torch.float64, "cpu", 0)
    grads = []
    for f in (lambda *a: apply(linear_cross_entropy, *a, reduction=reduction, chunk_size=5),
              lambda *a: ref(*a, reduction=reduction)):
        leaves = [a.detach().clone().requires_grad_() for a in (x, w, b)]
        loss = f(leaves[0], leaves[1], t, leaves[2])
        loss.backward(dout, **{keep: True})
        first = [a.grad.detach().clone() for a in leaves]
        loss.backward(dout)  # accumulates: twice the gradient
        grads.append(first + [a.grad.detach() for a in leaves])
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs)


def test_bfloat16_sums_chunks_in_float32():
    """Many 1-row chunks: dW summed in bfloat16 would round 40 times; the oracle bounds the error."""
    x, w, t, b = (a.bfloat16() if a.is_floating_point() else a for a in inputs(N=40, D=8, V=16, seed=2))
    check_against_autograd(linear_cross_entropy, ref, x, w, t, b, chunk_size=1,
                           magnitude=references.linear_cross_entropy_magnitude)


X, W, T = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])


@pytest.mark.parametrize(
    "args, options, error, message",
    [
        ((torch.randn(4), W, T), {}, ValueError, r"x must be 2-D \(N, D\), got 1-D"),
        ((X, torch.randn(5), T), {}, ValueError, r"linear_weight must be 2-D \(V, D\), got 1-D"),
        ((X, torch.randn(5, 3), T), {}, ValueError, r"linear_weight must have D=4 columns .* got shape \(5, 3\)"),
        ((X, W, T[:2]), {}, ValueError, r"targets must have shape \(3,\)"),
        ((X, W, T.int()), {}, TypeError, r"targets must be .*int64, got dtype torch.int32"),
        ((X, W, torch.tensor([0, 5, 1])), {}, ValueError, r"targets must lie in \[0, 5\) \(or ignore_index=-100\), got 5 at index \(1,\)"),
        ((X, W, T, torch.randn(4)), {}, ValueError, r"linear_bias must have shape \(5,\)"),
        ((X, W, T, torch.randn(5).double()), {}, TypeError, r"linear_bias must have the dtype of x"),
        ((X, W.double(), T), {}, TypeError, r"linear_weight must have the dtype of x"),
        ((X, W, T), {"weight": torch.rand(4)}, ValueError, r"weight must have shape \(5,\)"),
        ((X, W, T), {"weight": torch.rand(5).double()}, TypeError, r"weight must have the dtype of x"),
        ((X, W, T), {"reduction": "avg"}, ValueError, r"reduction must be one of .* got 'avg'"),
        ((X, W, T), {"label_smoothing": 1.5}, ValueError, r"label_smoothing must lie in \[0, 1\], got 1.5"),
        ((X, W, T), {"chunk_size": 0}, ValueError, r"chunk_size must be a positive int or None, got 0"),
        ((X, W, T), {"chunk_size": 2.0}, TypeError, r"chunk_size must be an int, got float"),
        ((X, W, T), {"chunk_size": True}, TypeError, r"chunk_size must be an int, got bool"),
        ((X, W, T), {"ignore_index": True}, TypeError, r"ignore_index must be an int, got bool"),
        ((X, W, T), {"label_smoothing": None}, TypeError, r"label_smoothing must be a float, got NoneType"),
        ((X, W, T), {"reduction": None}, TypeError, r"reduction must be a str, one of .*got NoneType"),
        ((X, W, T.float()), {}, TypeError, r"targets must be an integer index tensor of dtype torch.int64"),
        ((X, W, T), {"ignore_index": 1.0}, TypeError, r"ignore_index must be an int, got float"),
        ((X, torch.randn(0, 4), T), {}, ValueError, r"linear_weight must have at least one class"),
        ((X.long(), W, T), {}, TypeError, r"x must be a floating-point tensor"),
    ],
)
def test_bad_input(args, options, error, message):
    with pytest.raises(error, match=message):
        linear_cross_entropy.forward(*args, **options)


@pytest.mark.parametrize("reduction, shape", [("mean", (3,)), ("none", ())])
def test_bad_dout(reduction, shape):
    _, cache = linear_cross_entropy.forward(X, W, T, reduction=reduction)
    with pytest.raises(ValueError, match=r"dout must have the shape of the forward output"):
        linear_cross_entropy.backward(torch.ones(shape), cache)
    good = (3,) if reduction == "none" else ()
    with pytest.raises(TypeError, match=r"dout must have the dtype .*float32.*got torch.float64"):
        linear_cross_entropy.backward(torch.ones(good, dtype=torch.float64), cache)


def test_tensors_on_two_devices_are_refused():
    """The 'meta' device stands in for a second device on a CPU-only machine."""
    with pytest.raises(ValueError, match=r"all tensors must be on one device, got .* weight on meta"):
        linear_cross_entropy.forward(X, W, T, weight=torch.rand(5, device="meta"))
