import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from backprop import batch_norm
from backprop.testing import check_against_autograd, references
from backprop.testing.compare import Report, compare
from backprop.testing.oracle import random_dout
from backprop.testing.strategies import batch_norm_cases, to_device
from backprop.testing.suite import check_case, gradcheck_case


@given(case=batch_norm_cases())
# at x ~ -50 +- 0.02 a float32 mean is off by half an ulp of 50, 1e-4 of the spread: our forward
# error was 7x torch's (which sums in float64 on the CPU) before the corrected two-pass mean
@example(case=((torch.tensor([[-49.9845886230], [-50.0029335022], [-50.0217895508], [-49.9943161011]]),
                None, None), {"eps": 1e-05, "correction": 0}))
# x and dout drawn from the same stream make dx pure cancellation (the oracle offsets dout's seed)
@example(case=((torch.tensor([[-48.4590034485], [-50.2934303284], [-52.1787910461], [-49.4315681458],
                              [-51.0845222473]]), None, None), {"eps": 1e-05, "correction": 0}))
# ... which an offset seed cannot rule out: hypothesis draws integer constants found in the source,
# the oracle's dout seed among them. x == dout makes dx cancel to O(eps / var) in float32; both
# errors are ~1 ulp of the terms (a conditioning limit), so the floor scales with the terms
# (the op table's batch_norm magnitude), as the policy says
@example(case=((random_dout(torch.Size([4, 1]), torch.float32, "cpu", 0), None, None),
               {"eps": 1e-05, "correction": 0}))
@example(case=((random_dout(torch.Size([33, 12]), torch.float32, "cpu", 0), torch.linspace(0.5, 1.5, 12),
                torch.linspace(-1, 1, 12)), {"eps": 1e-05, "correction": 0}))
def test_matches_autograd(device, case):
    check_case("batch_norm", batch_norm, to_device(case, device))


_DEFAULT_PROFILE = settings().max_examples < 100


# finite differences of every input of (N, C, *) cases: the default run's slowest test (24 s for 15
# examples, cold, 2 workers: one case of 6336 elements took 19 s). The default run takes 15 cases
# of at most 1024 elements (the spatial sides shrink; N and C are drawn as ever); the thorough
# profile 1000 cases of any size
@settings(max_examples=min(15, settings().max_examples) if _DEFAULT_PROFILE else settings().max_examples)
@given(case=batch_norm_cases(dtype=torch.float64, max_numel=1024 if _DEFAULT_PROFILE else None))
def test_gradcheck(case):
    gradcheck_case("batch_norm", batch_norm, case)



def test_correction_1_is_the_notebook_formula():
    x, w, b = torch.randn(32, 64, dtype=torch.float64), torch.randn(64, dtype=torch.float64), None
    out, _ = batch_norm.forward(x, w, b, correction=1)
    expected = w * (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=True) + 1e-5)
    torch.testing.assert_close(out, expected)


def test_notebook_fused_backward(device):
    """The notebook's exercise 3: dx = w*rstd/n * (n*dout - dout.sum(0) - n/(n-1)*xhat*(dout*xhat).sum(0))."""
    n = 32
    x = torch.randn(n, 64, dtype=torch.float64, device=device) * 2 + 1
    w = torch.randn(64, dtype=torch.float64, device=device)
    dout = torch.randn(n, 64, dtype=torch.float64, device=device)
    _, cache = batch_norm.forward(x, w, None, correction=1)
    dx, _, _ = batch_norm.backward(dout, cache)
    xhat, rstd = batch_norm.normalised(cache), cache.rstd
    expected = w * rstd / n * (n * dout - dout.sum(0) - n / (n - 1) * xhat * (dout * xhat).sum(0))
    torch.testing.assert_close(dx, expected)


@pytest.mark.parametrize("N, correction", [(1, 0), (2, 0), (2, 1)])
def test_one_and_two_rows_in_float64(N, correction):
    """One row normalises to the bias; with two, xhat = +-c and dx is pure cancellation, which
    only float64 resolves (the property test draws N >= 3 for that reason)."""
    g = torch.Generator().manual_seed(N + correction)
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((N, 5), (5,), (5,)))
    check_against_autograd(batch_norm, references.batch_norm, x, w, b, correction=correction)


@pytest.mark.parametrize(
    "x, weight, bias, options, error, message",
    [
        (torch.randn(4), None, None, {}, ValueError, r"x must be at least 2-D \(N, C, \*\), got 1-D"),
        (torch.randn(1, 3, 1), None, None, {"correction": 1}, ValueError, r"x must have more values per channel \(N \* L\) than correction=1 .*got 1"),
        (torch.randn(4, 3), None, None, {"training": False}, ValueError, r"running_mean and running_var must be given when training=False"),
        (torch.randn(4, 3), None, None, {"running_mean": torch.zeros(3)}, ValueError, r"running_mean and running_var must both be tensors or both be None"),
        (torch.randn(4, 3), None, None, {"running_mean": torch.zeros(2), "running_var": torch.ones(3)}, ValueError, r"running_mean must have shape \(3,\)"),
        (torch.randn(4, 3), None, None, {"running_mean": torch.zeros(3), "running_var": torch.ones(3, dtype=torch.float64)}, TypeError, r"running_var must have the dtype of x \(torch.float32\), got torch.float64"),
        (torch.randn(4, 3), None, None, {"running_mean": torch.zeros(3, dtype=torch.int64), "running_var": torch.ones(3)}, TypeError, r"running_mean must be a floating-point tensor"),
        (torch.randn(1, 3), None, None, {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}, ValueError, r"running_var is updated with the unbiased variance"),
        (torch.randn(4, 3), None, None, {"momentum": "0.1"}, TypeError, r"momentum must be a float, got str"),
        (torch.randn(4, 3), None, None, {"momentum": float("nan")}, ValueError, r"momentum must be finite, got nan"),
        (torch.randn(4, 3), None, None, {"training": 1}, TypeError, r"training must be a bool, got int"),
        (torch.randn(4, 3), None, None, {"num_batches_tracked": -1}, ValueError, r"num_batches_tracked must be a non-negative int, got -1"),
        (torch.randn(4, 3), None, None, {"num_batches_tracked": 1.0}, TypeError, r"num_batches_tracked must be an int, got float"),
        (torch.randn(4, 3), torch.randn(4), None, {}, ValueError, r"weight must have shape \(3,\) .*got \(4,\)"),
        (torch.randn(4, 3), None, torch.randn(2), {}, ValueError, r"bias must have shape \(3,\) .*got \(2,\)"),
        (torch.randn(1, 3), None, None, {"correction": 1}, ValueError, r"x must have more rows than correction=1 .*got N=1"),
        (torch.randn(1, 3), None, None, {"correction": 2}, ValueError, r"x must have more rows than correction=2 .*got N=1"),
        (torch.randn(4, 3), None, None, {"correction": -1}, ValueError, r"correction must be a non-negative int, got -1"),
        (torch.randn(4, 3), None, None, {"correction": True}, ValueError, r"correction must be a non-negative int, got True"),
        (torch.randn(4, 3), None, None, {"eps": -1.0}, ValueError, r"eps must be a positive float, got -1.0"),
        (torch.randn(4, 3), None, None, {"eps": 0.0}, ValueError, r"eps must be a positive float, got 0.0"),
        (torch.randn(4, 3), torch.randn(3, dtype=torch.float64), None, {}, TypeError, r"weight must have the dtype of x \(torch.float32\), got torch.float64"),
        (torch.arange(6).reshape(2, 3), None, None, {}, TypeError, r"x must be a floating-point tensor, got dtype torch.int64"),
    ],
)
def test_bad_input(x, weight, bias, options, error, message):
    with pytest.raises(error, match=message):
        batch_norm.forward(x, weight, bias, **options)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensors_on_different_devices():
    with pytest.raises(ValueError, match=r"one device, got x on cpu, weight on cuda:0"):
        batch_norm.forward(torch.randn(4, 3), torch.randn(3, device="cuda"))


def test_infinite_weight_follows_the_formula(device):
    """x (2, 1) and weight [inf], a documented divergence from F.batch_norm. The formula gives
    +-inf; F.batch_norm (CPU) gives [nan, -inf] from its folded x * s + (bias - mean * s)."""
    x = torch.tensor([[4.623], [-0.8803], [2.0]], device=device)
    for weight, bias in [(torch.tensor([torch.inf]), None), (torch.tensor([-torch.inf]), torch.tensor([1.0]))]:
        weight, bias = weight.to(device), bias.to(device) if bias is not None else None
        out, _ = batch_norm.forward(x, weight, bias)
        torch.testing.assert_close(out, references.batch_norm_composed(x, weight, bias), equal_nan=True)
        assert torch.isinf(out).all() and (out.sign() == ((x - x.mean(0)) * weight.sign()).sign()).all()


def test_zero_channels(device):
    """x (2, 0) with a weight of shape (0,), a documented divergence (F.batch_norm raises an
    IndexError there). The output and every gradient are empty, with the inputs' shapes."""
    x, w, b = (torch.randn(2, 0, device=device), torch.ones(0, device=device), torch.zeros(0, device=device))
    out, cache = batch_norm.forward(x, w, b)
    dx, dw, db = batch_norm.backward(torch.randn(2, 0, device=device), cache)
    assert [t.shape for t in (out, dx, dw, db)] == [(2, 0), (2, 0), (0,), (0,)]


# ---------------------------------------------------------------- layouts, running statistics, eval


def _drawn_with_stats(draw, training):
    """A drawn case with running statistics, in the mode asked for."""
    (x, w, b), options = draw(batch_norm_cases(), label="case")
    C = x.shape[1]
    g = torch.Generator().manual_seed(C)
    options = {**options, "training": training,
               "running_mean": options.get("running_mean", torch.randn(C, generator=g).to(x.dtype)),
               "running_var": options.get("running_var", torch.rand(C, generator=g).add(0.5).to(x.dtype))}
    options.setdefault("momentum", 0.1)
    options.setdefault("num_batches_tracked", 0)
    return (x, w, b), options


@given(data=st.data())
def test_running_statistics_are_torchs_update_and_nothing_is_mutated(data):
    """Training with running statistics: torch writes (1 - m) r + m stat into them in place; we
    return those values on the cache and leave the caller's tensors as they were. momentum=None is
    nn.BatchNorm's cumulative average, m = 1 / (num_batches_tracked + 1)."""
    (x, w, b), options = _drawn_with_stats(data.draw, training=True)
    rm, rv = options["running_mean"], options["running_var"]
    before = (rm.clone(), rv.clone())
    out, cache = batch_norm.forward(x, w, b, **options)
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1]), "running statistics mutated"
    m = options["momentum"]
    m = 1 / (options["num_batches_tracked"] + 1) if m is None else m
    theirs, exact = [rm.clone(), rv.clone()], [rm.double(), rv.double()]
    F.batch_norm(x, *theirs, w, b, training=True, momentum=m, eps=options["eps"])
    F.batch_norm(x.double(), *exact, None, None, training=True, momentum=m, eps=options["eps"])
    stats = batch_norm.updated_stats(cache)
    assert stats.running_mean is cache.updated_mean and stats.running_var is cache.updated_var
    assert stats.num_batches_tracked == options["num_batches_tracked"] + 1
    # the harness's rule: our error against float64 at most 2x torch's own, plus a rounding floor
    # at the size of the terms (|running| + the batch's mean and variance)
    xa = x.double().abs()
    sizes = (rm.double().abs() + xa.mean((0, *range(2, x.ndim))), rv.double().abs() + (xa * xa).amax((0, *range(2, x.ndim))))
    for name, got, t, e, size in zip(("running_mean", "running_var"), stats, theirs, exact, sizes):
        record = compare(name, got, t, e, size)
        assert record.passed, Report([record])


def test_momentum_none_is_nn_batchnorms_cumulative_average():
    """Three steps carried through updated_stats equal nn.BatchNorm2d(momentum=None)'s buffers."""
    module = torch.nn.BatchNorm2d(4, momentum=None).double()
    stats = batch_norm.RunningStats(module.running_mean.clone(), module.running_var.clone(), 0)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(5, 4, 3, 2, generator=g, dtype=torch.float64) * 2 + 1
        want = module(x)
        out, cache = batch_norm.forward(x, module.weight.detach(), module.bias.detach(), momentum=None,
                                        running_mean=stats.running_mean, running_var=stats.running_var,
                                        num_batches_tracked=stats.num_batches_tracked)
        stats = batch_norm.updated_stats(cache)
        torch.testing.assert_close(out, want.detach())
    torch.testing.assert_close(stats.running_mean, module.running_mean)
    torch.testing.assert_close(stats.running_var, module.running_var)
    assert stats.num_batches_tracked == int(module.num_batches_tracked) == 3


# (momentum, num_batches_tracked): m = momentum, or 1 / (num_batches_tracked + 1) for None; 1 - 1e-9
# is 1 in float32 (torch's CPU kernel rounds m to the statistics' dtype), 2.0 and -0.5 put m or 1 - m
# below 0
SPECIAL_MOMENTA = [(0.0, 0), (0.1, 0), (0.5, 0), (1.0, 0), (None, 0), (None, 3), (1 - 1e-9, 0), (2.0, 0),
                   (-0.5, 0)]


def infinite_running_stats_case(shape, dtype, momentum, num_batches_tracked):
    """x of `shape` with C = 3 channels and running statistics (finite, +inf, -inf) and (finite,
    -inf, +inf); the options for forward, and torch's updated statistics (F.batch_norm's in place)."""
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g, dtype=dtype)
    inf = float("inf")
    rm, rv = torch.tensor([0.5, inf, -inf], dtype=dtype), torch.tensor([1.5, -inf, inf], dtype=dtype)
    options = {"running_mean": rm, "running_var": rv, "momentum": momentum,
               "num_batches_tracked": num_batches_tracked}
    m = 1 / (num_batches_tracked + 1) if momentum is None else momentum
    theirs = [rm.clone(), rv.clone()]
    F.batch_norm(x, *theirs, training=True, momentum=m)
    return x, options, theirs


@pytest.mark.parametrize("path", ["eager", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5)])
@pytest.mark.parametrize("momentum, num_batches_tracked", SPECIAL_MOMENTA)
def test_infinite_running_statistics_update_as_torchs(path, shape, dtype, momentum, num_batches_tracked,
                                                      monkeypatch):
    """torch updates the statistics r with m * stat + (1 - m) * r, m rounded to the statistics'
    dtype: an infinite r stays infinite (its sign that of 1 - m) for any m but 1, and is nan for
    m = 1 (0 * inf), m = 1 - 1e-9 in float32 included. torch.lerp's r + m (stat - r), which both
    paths computed before, gave nan (inf - inf) in its branch for |m| < 0.5 (m = 0, 0.1, None after
    3 batches). The cpp path must not reach the eager kernel (its rows layout (8, 3), its planes
    (4, 3, 5))."""
    from backprop import cpp
    from backprop.compiled import cpu_compiler_found

    x, options, theirs = infinite_running_stats_case(shape, dtype, momentum, num_batches_tracked)
    op = batch_norm
    if path == "cpp":
        if not cpu_compiler_found():
            pytest.skip("backprop.cpp is built with g++")

        def refuse(*args, **kwargs):
            raise AssertionError("the eager kernel ran")

        op = cpp.batch_norm
        monkeypatch.setattr(batch_norm, "forward", refuse)
    _, cache = op.forward(x, **options)
    stats = batch_norm.updated_stats(cache)
    for name, got, want in zip(("running_mean", "running_var"), stats, theirs):
        torch.testing.assert_close(got, want, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("momentum", [0.1, 0.998, 0.999, 0.9999, 1.0, 2.0])
def test_infinite_16_bit_running_statistics_update_as_torchs(dtype, momentum):
    """16-bit statistics (the eager kernel's; it computes in float32): torch's CPU kernel rounds m to
    bfloat16 for bfloat16 statistics (0.999 is 1 there: 0 * inf = nan) and to float32 for float16
    ones (0.9999 stays below 1: +-inf), which we follow. The infinite channels only: torch rounds its
    16-bit terms, we round once (m = 2 cancels: 2 var - 1.5 differs by far more than 16-bit noise)."""
    x, options, theirs = infinite_running_stats_case((8, 3), dtype, momentum, 0)
    stats = batch_norm.updated_stats(batch_norm.forward(x, **options)[1])
    for name, got, want in zip(("running_mean", "running_var"), stats, theirs):
        torch.testing.assert_close(got[1:], want[1:], equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")


def test_eval_mode_uses_the_running_statistics_and_its_backward_is_affine():
    x = torch.randn(6, 3, 5, dtype=torch.float64)
    w, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    check_against_autograd(batch_norm, references.batch_norm, x, w, b, running_mean=rm, running_var=rv,
                           training=False)
    out, cache = batch_norm.forward(x, w, b, running_mean=rm, running_var=rv, training=False)
    assert batch_norm.updated_stats(cache) is None
    dout = torch.randn_like(out)
    dx, _, _ = batch_norm.backward(dout, cache)
    torch.testing.assert_close(dx, dout * (w / (rv + 1e-5).sqrt())[:, None])


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (2, 3, 0), (0, 3, 2, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_no_value_per_channel_gives_an_empty_output_as_torch(shape, training):
    """N = 0 (or an empty spatial dim): torch returns an empty output, zero weight and bias
    gradients, and leaves the running statistics as they were; so do we (the statistics come back
    as copies)."""
    x = torch.randn(shape, dtype=torch.float64)
    w, b = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    check_against_autograd(batch_norm, references.batch_norm, x, w, b, running_mean=rm, running_var=rv,
                           training=training)
    if training:
        check_against_autograd(batch_norm, references.batch_norm, x, w, b)
        _, cache = batch_norm.forward(x, w, b, running_mean=rm, running_var=rv)
        assert torch.equal(cache.updated_mean, rm) and cache.updated_mean is not rm
        assert torch.equal(cache.updated_var, rv) and cache.updated_var is not rv


def test_correction_1_reduces_over_every_dim_but_the_channels():
    """The notebook's Bessel variance with a 4-D layout: 1/(n - 1) with n = N * H * W."""
    x, w = torch.randn(4, 3, 5, 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    out, _ = batch_norm.forward(x, w, None, correction=1)
    xs = x.transpose(0, 1).reshape(3, -1)  # (C, n)
    expected = (xs - xs.mean(1, keepdim=True)) / torch.sqrt(xs.var(1, unbiased=True, keepdim=True) + 1e-5)
    expected = (expected * w[:, None]).reshape(3, 4, 5, 2).transpose(0, 1)
    torch.testing.assert_close(out, expected)
    check_against_autograd(batch_norm, references.batch_norm, x, w, None, correction=1)


@pytest.mark.parametrize("correction", [0, 1])
def test_blocked_channel_sums(correction):
    """A large (N, C), N a multiple of 8, sums in blocks of 8 rows (batch_norm._channel_sum): the
    same sums, and eager and compiled agree with float64 autograd through the composed reference."""
    from backprop import compiled

    x = 3 + 2 * random_dout(torch.Size([2**18, 4]), torch.float32, "cpu", 3)
    w, b = torch.linspace(0.5, 1.5, 4), torch.linspace(-1, 1, 4)
    dout = random_dout(x.shape, torch.float32, "cpu", 4)
    torch.testing.assert_close(batch_norm._channel_sum(x, (0,)).double(), x.double().sum(0), rtol=1e-6, atol=0)
    leaves = [t.double().requires_grad_() for t in (x, w, b)]
    ref_out = references.batch_norm(*leaves, correction=correction)
    ref = (ref_out, *torch.autograd.grad(ref_out, leaves, dout.double()))
    ops = [batch_norm] + ([compiled.batch_norm] if compiled.cpu_compiler_found() and correction == 0 else [])
    for op in ops:
        out, cache = op.forward(x, w, b, correction=correction)
        for got, want in zip((out, *op.backward(dout, cache)), ref):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("path", ["eager", "cpp"])
@pytest.mark.parametrize("shape, options", [((64, 16), {}), ((4, 3, 5, 2), {"correction": 1}),
                                            ((8, 3), {"training": False})])
def test_the_cache_keeps_x_and_per_channel_values_only(path, shape, options):
    """backward recomputes x-hat from the caller's x, as torch's kernel does: the cache holds x
    itself (not a copy) and (C,) values, nothing else of x's size; and the recomputed x-hat is the
    forward's, bit for bit (out = x-hat without weight and bias)."""
    from backprop import cpp

    op = cpp.batch_norm if path == "cpp" else batch_norm
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g) * 3 + 50
    C = shape[1]
    if not options.get("training", True):
        options = {**options, "running_mean": torch.randn(C, generator=g) + 50, "running_var": torch.rand(C) + 1}
    out, cache = op.forward(x, **options)
    assert cache.x is x
    big = [f for f, v in zip(cache._fields, cache) if isinstance(v, torch.Tensor) and v.numel() > C and f != "x"]
    assert big == [], f"cache fields of x's size besides x: {big}"
    assert torch.equal(batch_norm.normalised(cache), out)
