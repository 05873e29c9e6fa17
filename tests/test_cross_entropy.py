import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, example, given

from backprop import cross_entropy
from backprop.testing import check_against_autograd, references
from backprop.testing.strategies import cross_entropy_cases, to_device, values
from backprop.testing.suite import check_case, gradcheck_case


@given(case=cross_entropy_cases())
# softmax - q on the target, 1 - 0.925: (p - eps/C) - (1 - eps) is 6 ulps off where torch is
# exact; expm1(log p) + eps (1 - 1/C) has no O(1) cancellation
@example(case=((torch.tensor([[25409.9609375, 7065.7109375, -11787.8935546875, 15684.3125]]), torch.tensor([0])),
               {"reduction": "mean", "ignore_index": -100, "label_smoothing": 0.1}))
# near-uniform logits with label_smoothing=1: dlogits = p - 1/3 cancels in every entry, so both
# errors are ~eps/3 of the terms and their ratio is luck: the floor scales with the terms
@example(case=((torch.tensor([[0.0154099613, -0.0029342892, -0.0217878930]]), torch.tensor([2])),
               {"reduction": "mean", "ignore_index": -100, "label_smoothing": 1.0}))
# bfloat16 near-uniform logits with label_smoothing=1: the target entry (p_y - 1) + eps (1 - 1/C)
# cancels; computed in bfloat16 it was 0.0036 off where torch is 0.00094 (ratio 3.8): now in float32
@example(case=((torch.tensor([[-0.0231, -0.0037, -0.0106, 0.0100, -0.0089, -0.0128],
                              [-0.0062, -0.0087, -0.0129, 0.0153, 0.0032, 0.0201],
                              [0.0114, -0.0123, 0.0007, 0.0034, 0.0015, -0.0063],
                              [-0.0126, -0.0073, -0.0126, -0.0112, 0.0117, 0.0093],
                              [0.0080, 0.0021, 0.0014, -0.0003, -0.0031, 0.0024],
                              [-0.0135, 0.0024, -0.0001, -0.0020, -0.0166, 0.0092]], dtype=torch.bfloat16),
                torch.tensor([2, 3, 5, 0, 1, 3])),
               {"reduction": "sum", "ignore_index": -100, "label_smoothing": 1.0}))
# every kept target's class weight 0 with smoothing: torch divides its nll and smoothing terms by
# the weight total apart, 0/0 = nan; the two terms summed first gave inf / 0 = inf (a fault hunt)
@example(case=((torch.tensor([[0.3, -1.2, 0.8, 0.1], [1.5, 0.2, -0.4, 0.0], [-0.7, 0.9, 0.3, -1.1]]),
                torch.tensor([2, -100, 2])),
               {"reduction": "mean", "ignore_index": -100, "label_smoothing": 0.1,
                "weight": torch.tensor([1.0, 1.0, 0.0, 1.0])}))
def test_matches_autograd(device, case):
    check_case("cross_entropy", cross_entropy, to_device(case, device))


@given(case=cross_entropy_cases(dtype=torch.float64))
# finite differences at logits of 1e4 (loss ~1e5) exceed gradcheck's atol: the op table's
# gradcheck_inputs rescales them (backprop.testing.opinfo)
@example(case=((values((8, 10), torch.float64, 0, scale=1e4), torch.tensor([4, 9, 3, 0, 3, 9, 7, 3])),
               {"reduction": "sum", "ignore_index": -100, "label_smoothing": 0.1}))
def test_gradcheck(case):
    assume(gradcheck_case("cross_entropy", cross_entropy, case))



@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_logits_of_1e4_are_finite_and_correct(device, reduction):
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4 - 1]], device=device)
    targets = torch.tensor([1, 2], device=device)
    loss, cache = cross_entropy.forward(logits, targets, reduction=reduction)
    assert torch.isfinite(loss).all()
    check_against_autograd(cross_entropy, references.cross_entropy, logits, targets,
                           reduction=reduction)


@pytest.mark.parametrize("options", [{}, {"reduction": "sum"}, {"reduction": "none", "ignore_index": 2}])
def test_masked_logits_like_torch(options):
    """-inf on non-target classes (vocabulary or action masks): a finite loss and a zero gradient
    at the masked entries, as in torch: a smoothing term computed at label_smoothing = 0 would
    turn 0 * inf into nan here."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    logits[torch.arange(6), (targets + 1) % 5] = -torch.inf
    loss, cache = cross_entropy.forward(logits, targets, **options)
    assert torch.isfinite(loss).all()
    check_against_autograd(cross_entropy, references.cross_entropy, logits, targets, **options)
    check_against_autograd(cross_entropy, references.cross_entropy, logits.float(), targets,
                           label_smoothing=0.0, **options)


def test_every_row_ignored_gives_nan_loss_and_zero_gradient_like_torch():
    logits = torch.randn(3, 4)
    targets = torch.full((3,), -100)
    loss, cache = cross_entropy.forward(logits, targets)
    assert loss.isnan()
    (dlogits, _) = cross_entropy.backward(torch.tensor(1.0), cache)
    assert torch.equal(dlogits, torch.zeros(3, 4))


ZERO_TOTAL = {  # logits' shape, targets: every kept target is class 2, whose weight is 0
    "(N, C)": ((3, 4), [2, 2, 2]),
    "(N, C) with an ignored row": ((3, 4), [2, -100, 2]),
    "(C,)": ((4,), 2),
    "(N, C, d1)": ((2, 4, 3), [[2, -100, 2], [2, 2, 2]]),
    "every row ignored": ((3, 4), [-100, -100, -100]),
}


@pytest.mark.parametrize("label_smoothing", [0.1, 1.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", list(ZERO_TOTAL))
def test_a_zero_weight_total_with_smoothing_gives_nan_like_torch(layout, dtype, label_smoothing):
    """'mean' with class weights and label smoothing where the kept targets' weights sum to 0: torch
    divides the nll term (0 / 0 = nan) and the smoothing term apart, so the loss is nan, and so is
    the gradient of every kept row (an ignored row's is 0). The terms summed first gave inf / 0 = inf,
    the gradient inf at the target. Every row ignored: nan and a zero gradient, with and without."""
    shape, targets = ZERO_TOTAL[layout]
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    targets = torch.tensor(targets)
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=dtype)
    for options in ({"weight": weight, "label_smoothing": label_smoothing}, {"weight": weight},
                    {"label_smoothing": label_smoothing}):
        if "weight" not in options and layout != "every row ignored":
            continue  # a weight total needs the weights
        leaf = logits.clone().requires_grad_()
        expected = F.cross_entropy(leaf, targets, **options)
        expected.backward()
        out, cache = cross_entropy.forward(logits, targets, **options)
        (dlogits, _) = cross_entropy.backward(torch.ones((), dtype=dtype), cache)
        kept = (targets != -100).unsqueeze(-2 if logits.ndim > 2 else -1).expand(logits.shape)
        assert out.isnan() and expected.isnan(), options
        assert torch.equal(dlogits.isnan(), kept) and torch.equal(leaf.grad.isnan(), kept), options
        assert not dlogits[~kept].any(), options
        torch.testing.assert_close(dlogits, leaf.grad, equal_nan=True)
    check_against_autograd(cross_entropy, references.cross_entropy, logits, targets, weight=weight,
                           label_smoothing=label_smoothing)


def test_ignored_rows_do_not_count_in_the_mean():
    logits, targets = torch.randn(4, 5, dtype=torch.float64), torch.tensor([1, -100, 3, -100])
    loss, _ = cross_entropy.forward(logits, targets)
    kept, _ = cross_entropy.forward(logits[[0, 2]], targets[[0, 2]])
    torch.testing.assert_close(loss, kept)


@pytest.mark.parametrize(
    "logits, targets, options, error, message",
    [
        (torch.tensor(1.0), torch.tensor(0), {}, ValueError, r"logits must be 1-D \(C,\), 2-D \(N, C\) or \(N, C, d1, ..., dK\), got a 0-D"),
        (torch.randn(3), torch.tensor([0]), {}, ValueError, r"targets must have shape \(\) \(0-D\) for unbatched logits \(C,\), got \(1,\)"),
        (torch.randn(2, 3, 4), torch.tensor([[0, 1], [1, 2]]), {}, ValueError, r"targets must have shape \(2, 4\) \(N, d1, ..., dK\): logits' shape without the class dim 1, got \(2, 2\)"),
        (torch.randn(2, 3, 4), torch.tensor([[0, 1, 2, 3], [0, 0, 0, 0]]), {}, ValueError, r"targets must lie in \[0, 3\) \(or ignore_index=-100\), got 3 at index \(0, 3\)"),
        (torch.randn(3, 4), torch.rand(3, 4, dtype=torch.float64), {}, TypeError, r"targets must have the dtype of logits \(torch.float32\), got torch.float64"),
        (torch.randn(3, 4), torch.rand(3, 5), {}, ValueError, r"targets must have shape \(3, 4\) of logits \(class probabilities\), got \(3, 5\)"),
        (torch.randn(3, 4), torch.rand(3, 4), {"ignore_index": 1}, ValueError, r"ignore_index must be negative with class-probability targets .*got 1"),
        (torch.randn(3, 4), torch.tensor([0, 1, 2]), {"weight": torch.rand(3)}, ValueError, r"weight must have shape \(4,\) \(C,\) with C=4 classes of logits, got \(3,\)"),
        (torch.randn(3, 4), torch.tensor([0, 1, 2]), {"weight": torch.rand(4, dtype=torch.float64)}, TypeError, r"weight must have the dtype of logits \(torch.float32\), got torch.float64"),
        (torch.randn(3, 4), torch.tensor([0, 1, 2]), {"weight": torch.tensor([1, 2, 3, 4])}, TypeError, r"weight must be a floating-point tensor, got dtype torch.int64"),
        (torch.randn(3, 4), torch.tensor([0, 1, 2]), {"weight": [1.0, 2.0, 3.0, 4.0]}, TypeError, r"weight must be a torch.Tensor, got list"),
        (torch.randn(3, 4), torch.tensor([0, 1]), {}, ValueError, r"targets must have shape \(3,\)"),
        (torch.randn(3, 4), torch.rand(3), {}, TypeError, r"targets must be .*int64, got dtype torch.float32"),
        (torch.randn(3, 4), torch.tensor([0, 1, 4]), {}, ValueError, r"targets must lie in \[0, 4\) \(or ignore_index=-100\), got 4 at index \(2,\)"),
        (torch.randn(3, 4), torch.tensor([0, -1, 2]), {}, ValueError, r"targets must lie in \[0, 4\) \(or ignore_index=-100\), got -1"),
        (torch.randn(3, 4), torch.tensor([0, 1, 2]), {"reduction": "avg"}, ValueError, r"reduction must be one of .* got 'avg'"),
        (torch.randn(3, 4), torch.tensor([0, 1, 2]), {"label_smoothing": 1.5}, ValueError, r"label_smoothing must lie in \[0, 1\], got 1.5"),
        (torch.randn(3, 4), torch.tensor([0, 1, 2]), {"label_smoothing": -0.5}, ValueError, r"label_smoothing must lie in \[0, 1\], got -0.5"),
        (torch.randint(0, 3, (3, 4)), torch.tensor([0, 1, 2]), {}, TypeError, r"logits must be a floating-point tensor, got dtype torch.int64"),
        (torch.randn(3, 0), torch.tensor([0, 1, 2]), {}, ValueError, r"logits must have at least one class"),
    ],
)
def test_bad_input(logits, targets, options, error, message):
    with pytest.raises(error, match=message):
        cross_entropy.forward(logits, targets, **options)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("layout", ["(N, C)", "(C,)", "(N, C, d1, d2)", "probabilities (N, C, d1)"])
def test_every_option_combination_is_torchs_formula(layout, weighted, label_smoothing, reduction):
    """torch's weighted smoothing: (1 - eps) nll_w + eps/C sum_c -w_c log p_c, 'mean' dividing both
    by the kept rows' weight sum; probability targets: 'mean' divides by the rows. float64."""
    g = torch.Generator().manual_seed(5)
    shape = {"(N, C)": (6, 5), "(C,)": (5,), "(N, C, d1, d2)": (3, 5, 4, 2), "probabilities (N, C, d1)": (3, 5, 4)}[layout]
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    if layout.startswith("probabilities"):
        targets = torch.rand(shape, generator=g, dtype=torch.float64)  # not normalised: torch does not ask it
    else:
        targets = torch.randint(0, 5, shape[:1] + shape[2:] if len(shape) > 1 else (), generator=g)
        if targets.ndim:
            targets.view(-1)[::3] = -100
    options = {"reduction": reduction, "label_smoothing": label_smoothing}
    if weighted:
        options["weight"] = torch.rand(5, generator=g, dtype=torch.float64) * 2
    check_against_autograd(cross_entropy, references.cross_entropy, logits, targets, **options)


def test_weighted_mean_divides_by_the_kept_weight_sum():
    logits, targets = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 2, -100, 2])
    weight = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    summed, _ = cross_entropy.forward(logits, targets, weight=weight, reduction="sum")
    mean, _ = cross_entropy.forward(logits, targets, weight=weight)
    torch.testing.assert_close(mean, summed / (0.5 + 3.0 + 3.0))


def test_probability_targets_get_a_gradient_and_one_hot_ones_equal_indices():
    logits = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 1, 2])
    onehot = F.one_hot(y, 4).double()
    weight = torch.rand(4, dtype=torch.float64)
    for options in ({}, {"label_smoothing": 0.2}, {"weight": weight, "reduction": "sum", "label_smoothing": 0.2}):
        soft, soft_cache = cross_entropy.forward(logits, onehot, **options)
        hard, hard_cache = cross_entropy.forward(logits, y, **options)
        dout = torch.ones_like(soft)
        dlogits, dtargets = cross_entropy.backward(dout, soft_cache)
        torch.testing.assert_close(dlogits, cross_entropy.backward(dout, hard_cache)[0])
        assert dtargets is not None and dtargets.shape == onehot.shape
        if "weight" not in options:  # torch's 'mean' divides by the kept weight sum for indices only
            torch.testing.assert_close(soft, hard)


@pytest.mark.parametrize("which", ["weight", "targets"])
def test_weight_and_probability_targets_edited_in_place_are_refused(which):
    logits, targets, weight = torch.randn(3, 4), torch.rand(3, 4), torch.rand(4)
    _, cache = cross_entropy.forward(logits, targets, weight=weight)
    {"weight": weight, "targets": targets}[which].mul_(2)
    with pytest.raises(RuntimeError, match=rf"cache: {which} was modified in place after forward"):
        cross_entropy.backward(torch.tensor(1.0), cache)


def test_kdim_logits_are_not_copied_or_edited():
    """The class dim is reduced where it is: the cache keeps the caller's (N, C, d1) logits."""
    logits, targets = torch.randn(2, 5, 7), torch.randint(0, 5, (2, 7))
    before = logits.clone()
    loss, cache = cross_entropy.forward(logits, targets, reduction="none")
    assert cache.logits is logits and loss.shape == (2, 7) and cache.shift.shape == (2, 1, 7)
    cross_entropy.backward(torch.ones(2, 7), cache)
    assert torch.equal(logits, before)


def test_bad_dout():
    _, cache = cross_entropy.forward(torch.randn(3, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"dout must have the shape of the forward output \(\), got \(3,\)"):
        cross_entropy.backward(torch.ones(3), cache)
    with pytest.raises(TypeError, match=r"dout must have the dtype .*float32.*got torch.float64"):
        cross_entropy.backward(torch.tensor(1.0, dtype=torch.float64), cache)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensors_on_different_devices():
    with pytest.raises(ValueError, match=r"one device, got logits on cpu, targets on cuda"):
        cross_entropy.forward(torch.randn(2, 3), torch.tensor([0, 1], device="cuda"))


def test_jvp_floor_counts_the_cancellation_inside_the_gradient():
    """Found by hypothesis (test_dropin's drawn cases): probability targets at label_smoothing=1 on
    near-uniform logits, float32. Every entry of softmax - q cancels, so any float32 jvp rounds at
    the size of those terms (ours 9.3e-8 from float64, torch's 6.9e-9 by luck on 8 classes), while
    |J| |t| put the floor at 1.4e-9: the jvp stage now takes OpInfo.magnitude's term sizes, as the
    gradient stage does. Fails with the |J| |t| floor alone."""
    from backprop.testing.references import REFERENCES
    from backprop.testing.stages import check_jvp

    logits = torch.tensor([[0.0066, 0.0027, 0.0006, 0.0062, -0.0045, -0.0017, -0.0152, 0.0038]])
    targets = torch.tensor([[0.1478, 0.1230, 0.1019, 0.1341, 0.1136, 0.1101, 0.1319, 0.1377]])
    check_jvp("cross_entropy", cross_entropy, REFERENCES["cross_entropy"],
              ((logits, targets), {"reduction": "mean", "label_smoothing": 1.0}))


def test_an_infinite_probability_target_gives_torchs_inf():
    """Found by hypothesis (the bad-input fuzz, through backprop.cpp's): q = [inf, -0.88]. The loss
    was s sum_c q_c + sum_c q_c (m - z_c), whose second sum has inf * 0 = nan at the max class,
    where torch's -sum_c q_c log p_c is inf. Now one product per class, q_c (s + m - z_c)."""
    from backprop.testing.fuzz import check_bad_input

    logits, targets = torch.tensor([[0.5, -0.3]]), torch.tensor([[float("inf"), -0.88]])
    for reduction in cross_entropy.REDUCTIONS:
        check_bad_input("cross_entropy", cross_entropy, ((logits, targets), {"reduction": reduction}))
