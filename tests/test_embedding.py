import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from backprop import embedding
from backprop.testing import check_against_autograd, references
from backprop.testing.oracle import random_dout
from backprop.testing.strategies import embedding_cases, to_device
from backprop.testing.suite import check_case, gradcheck_case


@given(case=embedding_cases())
def test_matches_autograd(device, case):
    args, options = to_device(case, device)
    if device == "cuda":  # the oracle asks for bitwise-repeatable backward: atomics are not
        options = {**options, "deterministic": True}
    check_case("embedding", embedding, (args, options))


@given(case=embedding_cases(dtype=torch.float64))
def test_gradcheck(case):
    gradcheck_case("embedding", embedding, case)



def test_repeated_indices_accumulate():
    weight = torch.zeros(3, 2)
    _, cache = embedding.forward(torch.tensor([1, 1, 1, 2]), weight)
    _, dweight = embedding.backward(torch.ones(4, 2), cache)
    assert torch.equal(dweight, torch.tensor([[0.0, 0.0], [3.0, 3.0], [1.0, 1.0]]))


def test_deterministic_backward_is_bitwise_reproducible(device):
    """Many repeats per row. deterministic=True (the default) gives the same bits run after run on
    every device; deterministic=False on CUDA sums with index_add_'s atomics in arrival order (as
    torch's own embedding backward does: neither was repeatable on an H200). Both modes are
    checked against float64 within the worst-case bound of float32 summation, n * eps * sum|x|."""
    g = torch.Generator().manual_seed(0)
    indices = torch.randint(0, 8, (64, 512), generator=g).to(device)  # ~4096 repeats per row
    weight = torch.randn(8, 96, generator=g).to(device)
    dout = torch.randn(64, 512, 96, generator=g).to(device)
    _, cache = embedding.forward(indices, weight)
    assert cache.deterministic
    first = embedding.backward(dout, cache)[1]
    for _ in range(10):
        assert torch.equal(embedding.backward(dout, cache)[1], first)
    rows, flat = indices.reshape(-1), dout.double().reshape(-1, 96)
    reference = flat.new_zeros(8, 96).index_add_(0, rows, flat)
    abs_sum = flat.new_zeros(8, 96).index_add_(0, rows, flat.abs())
    count = torch.bincount(rows, minlength=8).double()[:, None]
    bound = count * torch.finfo(torch.float32).eps * abs_sum
    _, fast = embedding.forward(indices, weight, deterministic=False)
    for dweight in (first, embedding.backward(dout, fast)[1]):
        assert ((dweight.double() - reference).abs() <= bound).all()


def test_padding_row_gets_no_gradient_and_negative_padding_idx_wraps():
    _, cache = embedding.forward(torch.tensor([[0, 2], [2, 1]]), torch.randn(3, 4), padding_idx=-1)
    _, dweight = embedding.backward(torch.randn(2, 2, 4), cache)
    assert cache.padding_idx == 2 and torch.equal(dweight[2], torch.zeros(4))
    assert dweight[0].abs().sum() > 0 and dweight[1].abs().sum() > 0


def test_int32_indices_like_torch():
    check_against_autograd(embedding, references.embedding,
                           torch.tensor([3, 0, 3], dtype=torch.int32), torch.randn(4, 5))


@pytest.mark.parametrize(
    "indices, weight, options, error, message",
    [
        (torch.tensor([0, 4]), torch.randn(4, 2), {}, ValueError, r"indices must lie in \[0, 4\), got 4 at index \(1,\)"),
        (torch.tensor([0, -1]), torch.randn(4, 2), {}, ValueError, r"indices must lie in \[0, 4\), got -1"),
        (torch.tensor([0.0, 1.0]), torch.randn(4, 2), {}, TypeError, r"indices must be an integer index tensor of dtype torch.int64 or torch.int32, got dtype torch.float32"),
        (torch.tensor([0, 1]), torch.randn(4), {}, ValueError, r"weight must be 2-D \(V, E\), got 1-D"),
        (torch.tensor([0, 1]), torch.randn(4, 2), {"padding_idx": 4}, ValueError, r"padding_idx must lie in \[-4, 3\] for V=4, got 4"),
        (torch.tensor([0, 1]), torch.randn(4, 2), {"padding_idx": 6}, ValueError, r"padding_idx must lie in \[-4, 3\] for V=4, got 6"),
        (torch.tensor([0, 1]), torch.randn(4, 2), {"padding_idx": -5}, ValueError, r"padding_idx must lie in \[-4, 3\] for V=4, got -5"),
        (torch.tensor([0, 1]), torch.randn(4, 2), {"padding_idx": True}, TypeError, r"padding_idx must be an int or None, got bool"),
        (torch.tensor([0, 1]), torch.randint(0, 2, (4, 2)), {}, TypeError, r"weight must be a floating-point tensor"),
        (torch.tensor([0, 1]), torch.randn(4, 2), {"max_norm": 1.0}, ValueError, r"max_norm=1.0 is not supported: F.embedding renormalises the looked-up rows of weight in place"),
        (torch.tensor([0, 1]), torch.randn(4, 2), {"max_norm": "1"}, TypeError, r"max_norm must be a float, got str"),
        (torch.tensor([0, 1]), torch.randn(4, 2), {"norm_type": None}, TypeError, r"norm_type must be a float, got NoneType"),
        (torch.tensor([0, 1]), torch.randn(4, 2), {"sparse": True, "scale_grad_by_freq": True}, ValueError, r"scale_grad_by_freq=True is not supported with sparse=True"),
        (torch.tensor([0, 1]), torch.randn(4, 2), {"sparse": 1}, TypeError, r"sparse must be a bool, got int"),
        (torch.tensor([0, 1]), torch.randn(4, 2), {"scale_grad_by_freq": "yes"}, TypeError, r"scale_grad_by_freq must be a bool, got str"),
    ],
)
def test_bad_input(indices, weight, options, error, message):
    with pytest.raises(error, match=message):
        embedding.forward(indices, weight, **options)


def test_bad_dout():
    _, cache = embedding.forward(torch.tensor([[0, 1]]), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"dout must have the shape of the forward output \(1, 2, 3\), got \(2, 3\)"):
        embedding.backward(torch.ones(2, 3), cache)
    with pytest.raises(ValueError, match=r"forward output \(1, 2, 3\), got \(1, 2, 4\)"):
        embedding.backward(torch.ones(1, 2, 4), cache)


def test_zero_width_table_like_torch():
    """Found by the fuzz test: reshape(-1, E) is ambiguous when E = 0; the row count is explicit now."""
    check_against_autograd(embedding, references.embedding, torch.tensor(1), torch.randn(2, 0))


def test_scale_grad_by_freq_divides_each_row_by_its_count():
    weight = torch.zeros(4, 2)
    _, cache = embedding.forward(torch.tensor([[1, 1, 1], [2, 3, 3]]), weight, scale_grad_by_freq=True)
    _, dweight = embedding.backward(torch.ones(2, 3, 2), cache)
    assert torch.equal(dweight, torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]))


@given(case=embedding_cases(), data=st.data())
def test_sparse_gradient_equals_torchs_once_coalesced(case, data):
    """sparse=True: torch's uncoalesced COO gradient, entry for entry (the same positions in the
    same order, padding positions dropped); coalesced, the dense gradient's values."""
    (indices, weight), options = case
    options = {**options, "sparse": True, "scale_grad_by_freq": False}
    seed = data.draw(st.integers(0, 2**16), label="dout seed")
    dout = random_dout(torch.Size([*indices.shape, weight.shape[1]]), weight.dtype, "cpu", seed)
    out, cache = embedding.forward(indices, weight, **options)
    dout_before = dout.clone()
    _, dweight = embedding.backward(dout, cache)
    leaf = weight.clone().requires_grad_()
    # flattened: torch's sparse backward raises an IndexError for 0-d indices with a padding_idx
    want = F.embedding(indices.reshape(-1), leaf, padding_idx=options["padding_idx"], sparse=True)
    want.backward(dout.reshape(-1, weight.shape[1]))
    assert dweight.is_sparse and leaf.grad.is_sparse and dweight.shape == weight.shape
    assert dweight.dtype == weight.dtype and torch.equal(dout, dout_before)
    assert torch.equal(dweight._indices(), leaf.grad._indices())
    assert torch.equal(dweight._values(), leaf.grad._values())
    assert torch.equal(dweight.coalesce().to_dense(), leaf.grad.coalesce().to_dense())
    if weight.dtype == torch.float64:  # the dense gradient sums repeats in another order: in 16-bit,
        # a cancelling sum of 20 repeats differs by more than any fixed tolerance (conditioning)
        _, dense = embedding.backward(dout, cache._replace(sparse=False))
        torch.testing.assert_close(dweight.coalesce().to_dense(), dense)
    dweight._values().zero_()  # the values are a copy: editing them leaves dout as it was
    assert torch.equal(dout, dout_before)


def test_sparse_through_the_autograd_adapter():
    from backprop.autograd import apply

    indices, weight = torch.tensor([[0, 3], [3, 1]]), torch.randn(5, 2, requires_grad=True)
    apply(embedding, indices, weight, sparse=True, padding_idx=1).sum().backward()
    assert weight.grad.is_sparse
    leaf = weight.detach().clone().requires_grad_()
    F.embedding(indices, leaf, sparse=True, padding_idx=1).sum().backward()
    torch.testing.assert_close(weight.grad.to_dense(), leaf.grad.to_dense())


def test_the_custom_op_refuses_sparse_and_max_norm_with_the_reason():
    import backprop.library  # noqa: F401

    with pytest.raises(ValueError, match=r"sparse=True is not offered by torch.ops.backprop.embedding"):
        torch.ops.backprop.embedding(torch.tensor([0]), torch.randn(3, 2), sparse=True)
    with pytest.raises(ValueError, match=r"max_norm=1.0 is not supported"):
        torch.ops.backprop.embedding(torch.tensor([0]), torch.randn(3, 2), max_norm=1.0)


def test_per_sample_gradients_with_a_padding_row_take_batching_rules():
    """Under torch.func.vmap the backward runs on batched tensors: zeroing the padding row in place
    (dweight[padding_idx] = 0, or zero_) has no batching rule, and functorch falls back to a slow
    per-sample loop with a warning. The padding positions' rows are masked out before the sum
    instead; the gradients are F.embedding's, per sample."""
    import warnings

    from torch.func import grad, vmap

    from backprop.autograd import apply

    indices = torch.tensor([[0, 2, 2], [1, 0, 3]])
    weight = torch.randn(4, 3, dtype=torch.float64)

    def loss(w, idx, op):
        return op(w, idx).pow(2).sum()

    ours = lambda w, idx: apply(embedding, idx, w, padding_idx=2)  # noqa: E731
    theirs = lambda w, idx: F.embedding(idx, w, padding_idx=2)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = vmap(grad(loss), in_dims=(None, 0, None))(weight, indices, ours)
    expected = vmap(grad(loss), in_dims=(None, 0, None))(weight, indices, theirs)
    torch.testing.assert_close(got, expected)
    assert got[:, 2].eq(0).all()
