"""backprop.cpp: the C++ path verified as the eager kernels are (the oracle on the op table's fixed,
small and drawn cases, the bad-input fuzz), plus what is its own: the C++ is actually taken on
the cases it covers, its caches and the eager ones are interchangeable, and its build cache
refuses a file it did not build."""

import inspect
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import backprop
from backprop import cpp
from backprop.compiled import cpu_compiler_found
from backprop.testing.fuzz import bad_cases, check_bad_input
from backprop.testing.opinfo import OPS as TABLE
from backprop.testing.suite import check_case

pytestmark = pytest.mark.skipif(not cpu_compiler_found(), reason="backprop.cpp is built with g++")

NAMES = list(cpp.OPS)

# per op: options that the C++ covers, with the op's first fixed case's args, on the notebook's
# scale; each must not reach the eager kernel (test_the_cpp_path_is_taken). "(C,)" stands for a
# positive (C,) tensor, C = args[0].shape[1], "(V,)" for a positive (V,) tensor, V = args[1].shape[0]
# (linear_cross_entropy's classes); an option naming a positional parameter replaces that argument
POSITIVE, CLASSES = "(C,)", "(V,)"
STATS = {"running_mean": POSITIVE, "running_var": POSITIVE}
COVERED = {
    "cross_entropy": [{}, {"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.1},
                      {"weight": POSITIVE}, {"weight": POSITIVE, "label_smoothing": 0.2, "reduction": "none"}],
    "batch_norm": [{}, {"correction": 1}, {"eps": 0.1}, {**STATS}, {**STATS, "training": False},
                   {**STATS, "momentum": None, "num_batches_tracked": 3, "correction": 1}],
    "embedding": [{}, {"padding_idx": 3}, {"padding_idx": -1}, {"scale_grad_by_freq": True},
                  {"padding_idx": 0, "scale_grad_by_freq": True, "deterministic": False}],
    "linear_cross_entropy": [{}, {"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.1},
                             {"weight": CLASSES}, {"linear_bias": None, "weight": CLASSES, "label_smoothing": 0.2,
                                                   "reduction": "none", "chunk_size": 7}],
    "tanh": [{}],  # no options: its shapes and dtypes in test_tanh_shapes_and_dtypes_run_the_cpp
    "logsumexp": [{}, {"keepdim": True}, {"dim": 1}, {"dim": -1, "keepdim": True}, {"dim": (1,)},
                  {"dim": [0, 1]}, {"dim": (1, -2), "keepdim": True}],
}


@pytest.fixture(scope="module", autouse=True)
def built():
    """Build (or load) the kernels once: a failure here is this file's first failure."""
    assert cpp.kernels() is not None, "backprop.cpp's kernels did not build (see the warning)"


def covered_cases(name):
    (first, _), = TABLE[name].fixed_cases("cpu")[:1]
    positional = list(inspect.signature(cpp.OPS[name].forward).parameters)[:len(first)]  # eager may be patched
    sizes = {POSITIVE: lambda: first[0].shape[1], CLASSES: lambda: first[1].shape[0]}
    for options in COVERED[name]:
        options = {k: (torch.rand(sizes[v](), generator=torch.Generator().manual_seed(3)) + 0.5
                       if isinstance(v, str) and v in sizes else v) for k, v in options.items()}
        args = [options.pop(p, a) for p, a in zip(positional, first)]
        yield args, options


def at_one_and_two_threads(run):
    """[run() on 1 torch thread, run() on 2]: the threaded loops' results at two thread counts;
    torch's count restored after."""
    threads = torch.get_num_threads()
    try:
        return [torch.set_num_threads(t) or run() for t in (1, 2)]
    finally:
        torch.set_num_threads(threads)


def test_every_op_with_a_cpp_file_is_listed():
    assert set(NAMES) == {p.stem for p in cpp.HERE.glob("*.cpp")} == set(COVERED)


@pytest.mark.parametrize("name", NAMES)
def test_same_signature_and_cache_as_the_eager_op(name):
    eager, fast = backprop.OPS[name], cpp.OPS[name]
    for ours, theirs in [(fast.forward, eager.forward), (fast.backward, eager.backward)]:
        assert parameters(ours) == parameters(theirs)
    assert fast.Cache is eager.Cache


def parameters(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("name", NAMES)
def test_fixed_and_small_cases(name):
    """The oracle (autograd, float64, rounding floor) on every fixed and small case: the covered
    ones run the C++, the others the eager kernel behind it."""
    for case in [*TABLE[name].fixed_cases("cpu"), *TABLE[name].small_cases(dtype=torch.float32),
                 *TABLE[name].small_cases(dtype=torch.float64), *covered_cases(name)]:
        check_case(name, cpp.OPS[name], case, checks=())


@pytest.mark.parametrize("name", NAMES)
def test_drop_in_stages(name):
    """jvp, second order and vmap through the adapter (the eager op's contract pieces, on the C++
    path's caches) on the op table's first small case (float64, covered by the C++ for every op
    here), as test_dropin runs them for backprop.<op>; the notebook-scale case took 5 s for
    batch_norm's second order, the same code on a larger input."""
    from backprop.testing.stages import applicable

    assert applicable(name, cpp.OPS[name]) >= {"jvp", "second-order", "vmap"}
    check_case(name, cpp.OPS[name], TABLE[name].small_cases()[0])


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_drawn_cases(name, data):
    check_case(name, cpp.OPS[name], data.draw(TABLE[name].cases(), label="case"), checks=())


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_bad_inputs_fail_as_the_eager_op(name, data):
    check_bad_input(name, cpp.OPS[name], data.draw(bad_cases(name), label="case"))


@pytest.mark.parametrize("name", NAMES)
def test_the_cpp_path_is_taken(name, monkeypatch):
    """On the covered cases neither direction reaches the eager kernel, and the results are the
    eager kernel's to rounding."""
    eager, fast = backprop.OPS[name], cpp.OPS[name]
    expected = []
    for args, options in covered_cases(name):
        out, cache = eager.forward(*args, **options)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        expected.append((out, eager.backward(dout, cache), dout))

    def refuse(*args, **kwargs):
        raise AssertionError("the eager kernel ran")

    monkeypatch.setattr(eager, "forward", refuse)
    monkeypatch.setattr(eager, "backward", refuse)
    for (args, options), (out, grads, dout) in zip(covered_cases(name), expected):
        out_c, cache_c = fast.forward(*args, **options)
        torch.testing.assert_close(out_c, out)
        for g_c, g in zip(fast.backward(dout, cache_c), grads):
            torch.testing.assert_close(g_c, g)


@pytest.mark.parametrize("name", NAMES)
def test_parameters_take_the_cpp_path(name, monkeypatch):
    """A model's weights are nn.Parameters (embedding's table, batch_norm's weight and bias,
    cross_entropy's class weights, a weight put through tanh): plain tensors underneath, so the
    C++ reads them too."""
    eager, fast = backprop.OPS[name], cpp.OPS[name]
    cases = []
    for args, options in covered_cases(name):
        # the weights: every floating tensor after the first (linear_cross_entropy's linear_weight and
        # linear_bias), or a one-input op's input (tanh)
        args = [torch.nn.Parameter(a) if (i or len(args) == 1) and a is not None and a.is_floating_point() else a
                for i, a in enumerate(args)]
        options = {k: torch.nn.Parameter(v) if k in ("weight", "bias") else v for k, v in options.items()}
        if any(type(t) is torch.nn.Parameter for t in [*args, *options.values()]):
            cases.append((args, options, eager.forward(*args, **options)[0]))
    assert cases, f"no covered case of {name} has a weight"
    monkeypatch.setattr(eager, "forward", lambda *a, **k: pytest.fail("the eager kernel ran"))
    for args, options, out in cases:
        torch.testing.assert_close(fast.forward(*args, **options)[0], out)


@pytest.mark.parametrize("name", NAMES)
def test_caches_are_interchangeable(name):
    """A cache from either path works in the other's backward, with the same gradients; the two
    hold the same fields (what else the cache returns, e.g. batch_norm's updated statistics)."""
    eager, fast = backprop.OPS[name], cpp.OPS[name]
    for args, options in covered_cases(name):
        out, cache = eager.forward(*args, **options)
        _, cache_c = fast.forward(*args, **options)
        for field, a, b in zip(eager.Cache._fields, cache_c, cache, strict=True):
            if isinstance(b, torch.Tensor):
                torch.testing.assert_close(a, b, msg=lambda m, f=field: f"cache.{f}: {m}")
            else:
                assert type(a) is type(b) and a == b, f"cache.{field}: {a!r} != {b!r}"
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
        for ours, theirs in [(fast.backward(dout, cache), eager.backward(dout, cache)),
                             (eager.backward(dout, cache_c), fast.backward(dout, cache_c))]:
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_the_cache_is_the_eager_ones(name):
    """Field by field (the options as the eager kernel normalises them, e.g. embedding's wrapped
    padding_idx), so that code reading a cache cannot tell the paths apart."""
    for args, options in covered_cases(name):
        _, cache = backprop.OPS[name].forward(*args, **options)
        _, cache_c = cpp.OPS[name].forward(*args, **options)
        for field, a, b in zip(cache._fields, cache_c, cache):
            if isinstance(b, torch.Tensor):
                torch.testing.assert_close(a, b, msg=field)
            else:
                assert type(a) is type(b) and a == b, (field, a, b)


def test_embedding_padding_idx_beyond_int64_raises_the_eager_error():
    """The C++ op cannot take such an int: the Python keeps it on the eager path."""
    with pytest.raises(ValueError, match="padding_idx must lie in"):
        cpp.embedding.forward(torch.tensor([0, 1]), torch.randn(4, 2), padding_idx=2**70)


@pytest.mark.parametrize("options", [{}, {"padding_idx": 7, "scale_grad_by_freq": True}])
@pytest.mark.parametrize(("V", "E", "shape", "dtype"), [(1000, 100, (3, 257), torch.float32),
                                                        (1000, 100, (3, 257), torch.float64),
                                                        (20011, 420, (20000,), torch.float32)])
def test_embedding_large_inputs_run_on_threads_with_the_same_bits(V, E, shape, dtype, options, monkeypatch):
    """embedding's C++ above kGrain (2^16) elements: the forward's positions and the backward's
    columns (cache lines: E=100 float32 is 7 of them, the last partial, and split between the
    threads) in ranges on torch's threads; the 20011 x 420 float32 dW and the 20000 x 420 out are
    over 32 MiB, populated before they are written. At 1 and 2 threads the same bits, and the eager
    kernel's bit for bit: each row's repeats (a third of the positions draw from 8 rows, the padding
    row among them) summed in position order as index_add_ does, then divided by the count."""
    g = torch.Generator().manual_seed(E)
    indices = torch.randint(0, V, shape, generator=g)
    indices.view(-1)[::3] = torch.randint(0, 8, indices.view(-1)[::3].shape, generator=g)
    weight = torch.randn(V, E, generator=g, dtype=dtype)
    dout = torch.randn(*shape, E, generator=g, dtype=dtype)
    out_e, cache_e = backprop.embedding.forward(indices, weight, **options)
    _, grad_e = backprop.embedding.backward(dout, cache_e)
    refuse_eager(monkeypatch, backprop.embedding)

    def run():
        out, cache = cpp.embedding.forward(indices, weight, **options)
        return out, cpp.embedding.backward(dout, cache)[1]

    (out1, grad1), (out2, grad2) = at_one_and_two_threads(run)
    assert torch.equal(out1, out_e) and torch.equal(out2, out_e)
    assert torch.equal(grad1, grad_e) and torch.equal(grad2, grad_e)
    if options:
        assert grad1[7].eq(0).all() and grad1[:8].ne(0).any()


@pytest.mark.parametrize("name", NAMES)
def test_an_edited_input_is_refused_as_by_the_eager_op(name):
    (args, options), = list(covered_cases(name))[:1]
    args = [a.clone() for a in args]
    out, cache = cpp.OPS[name].forward(*args, **options)
    getattr(cache, backprop.OPS[name].VERSIONED[0]).mul_(2)  # an input the cache keeps, not a copy
    with pytest.raises(RuntimeError, match="modified in place"):
        cpp.OPS[name].backward(torch.ones_like(out), cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(33, 150), (6, 192), (40, 1)])
@pytest.mark.parametrize("correction", [0, 1])
def test_batch_norm_rows_backward_every_channel(shape, dtype, correction, monkeypatch):
    """The C++ training backward for (N, C) x: every channel's gradients are the eager kernel's, for
    C many vectors wide, not a multiple of one, or one channel (a channel-blocked loop's full blocks,
    a partial one: a wrong block boundary leaves channels unwritten or summed twice)."""
    g = torch.Generator().manual_seed(shape[1])
    x = torch.randn(shape, generator=g, dtype=dtype) * 3 + 50
    w, b = torch.randn(shape[1], generator=g, dtype=dtype), torch.randn(shape[1], generator=g, dtype=dtype)
    dout = torch.randn(shape, generator=g, dtype=dtype) + torch.linspace(-2, 2, shape[1], dtype=dtype)
    out, cache = backprop.batch_norm.forward(x, w, b, correction=correction)
    grads = backprop.batch_norm.backward(dout, cache)
    monkeypatch.setattr(backprop.batch_norm, "backward", lambda *a, **k: pytest.fail("the eager kernel ran"))
    for g_c, g_e in zip(cpp.batch_norm.backward(dout, cache), grads, strict=True):
        torch.testing.assert_close(g_c, g_e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(9, 4), (5, 4, 7), (3, 4, 5, 2)])
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "bias", "none"])
@pytest.mark.parametrize("mode", ["train", "train+stats", "eval"])
def test_batch_norm_layouts_and_modes_run_the_cpp(shape, dtype, affine, mode, monkeypatch):
    """batch_norm's C++ reads x as (N, C, L) (L = 1: its channel loops over rows): every layout,
    dtype, affine and mode it covers runs it, gives the eager kernel's results and cache (the
    updated running statistics on it), and leaves the running statistics unwritten."""
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g, dtype=dtype) * 3 + 50  # at an offset: the two-pass mean's case
    w, b = (torch.randn(4, generator=g, dtype=dtype) if name in affine else None for name in ("weight", "bias"))
    options = {"correction": len(shape) % 2, "eps": 1e-3}
    if mode != "train":
        stats = torch.randn(4, generator=g, dtype=dtype), torch.rand(4, generator=g, dtype=dtype) + 0.5
        options.update(running_mean=stats[0].clone(), running_var=stats[1].clone(), training=mode == "train+stats",
                       momentum=None if len(shape) == 3 else 0.3, num_batches_tracked=2)
    out, cache = backprop.batch_norm.forward(x, w, b, **options)
    dout = torch.randn(shape, generator=g, dtype=dtype)
    grads = backprop.batch_norm.backward(dout, cache)

    def refuse(*args, **kwargs):
        raise AssertionError("the eager kernel ran")

    monkeypatch.setattr(backprop.batch_norm, "forward", refuse)
    monkeypatch.setattr(backprop.batch_norm, "backward", refuse)
    out_c, cache_c = cpp.batch_norm.forward(x, w, b, **options)
    torch.testing.assert_close(out_c, out)
    for field, a, e in zip(cache._fields, cache_c, cache, strict=True):
        if isinstance(e, torch.Tensor):
            torch.testing.assert_close(a, e, msg=lambda m, f=field: f"cache.{f}: {m}")
        else:
            assert a == e, field
    for g_c, g_e in zip(cpp.batch_norm.backward(dout, cache_c), grads, strict=True):
        torch.testing.assert_close(g_c, g_e)
    if mode != "train":
        assert torch.equal(options["running_mean"], stats[0]) and torch.equal(options["running_var"], stats[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["train", "train+stats", "eval"])
@pytest.mark.parametrize("shape", [(1031, 1001), (2, 19, 127, 131)])
def test_batch_norm_threads_give_the_same_results(shape, mode, dtype, monkeypatch):
    """batch_norm's C++ on torch's threads: at 2 threads its results are the ones at 1, bit for bit
    (a fixed split: rows in blocks, here of 261, 261, 261 and 248 rows, two a thread, each summed
    kRows = 4 rows at a time with 1 left over, into its own partial sums; planes by channel; float64
    shows a different order of the double sums), and the eager kernel's in float64 to x's rounding
    (for float32 the eager float32 sums are the less accurate ones: dweight sums 1031 products that
    cancel). C = 1001 and 19, L = 16637 end in a partial vector; at x ~ 50 the shifted sums'
    accuracy shows."""
    g = torch.Generator().manual_seed(shape[1])
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=dtype) * 2 + 50
    w, b = torch.randn(C, generator=g, dtype=dtype), torch.randn(C, generator=g, dtype=dtype)
    dout = torch.randn(shape, generator=g, dtype=dtype) + 0.5
    options = {"correction": len(shape) % 2}
    if mode != "train":
        options.update(running_mean=torch.randn(C, generator=g, dtype=dtype) + 50,
                       running_var=torch.rand(C, generator=g, dtype=dtype) + 3, training=mode == "train+stats")
    wide = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    out, cache = backprop.batch_norm.forward(x.double(), w.double(), b.double(), **wide)

    def refuse(*args, **kwargs):
        raise AssertionError("the eager kernel ran")

    def run():
        out_c, cache_c = cpp.batch_norm.forward(x, w, b, **options)
        return [out_c, cache_c, *cpp.batch_norm.backward(dout, cache_c)]

    with monkeypatch.context() as m:
        m.setattr(backprop.batch_norm, "forward", refuse)
        m.setattr(backprop.batch_norm, "backward", refuse)
        found = at_one_and_two_threads(run)
    out_c, cache_c = found[1][:2]
    found = [[out, *cache_, *grads] for out, cache_, *grads in found]
    for one, two in zip(*found, strict=True):
        assert torch.equal(one, two) if isinstance(one, torch.Tensor) else one == two
    torch.testing.assert_close(out_c, out.to(dtype))
    for field, a, e in zip(cache._fields, cache_c, cache, strict=True):
        if isinstance(e, torch.Tensor) and field != "weight":
            torch.testing.assert_close(a, e.to(dtype), msg=lambda m, f=field: f"cache.{f}: {m}")
    # the backward of the C++ cache's own x-hat (recomputed in x's dtype, as the C++ does) and rstd, in
    # float64: x = x-hat, mean 0, rstd 1 and the weight w rstd give the same sums and dx = w rstd (...)
    xhat = backprop.batch_norm.normalised(cache_c).double()
    wide_cache = cache_c._replace(x=xhat, mean=torch.zeros(C, dtype=torch.float64), mean_rest=None,
                                  rstd=torch.ones(C, dtype=torch.float64),
                                  weight=w.double() * cache_c.rstd.double(), dtype=torch.float64, versions=())
    grads = backprop.batch_norm.backward(dout.double(), wide_cache)
    for g_c, g_e in zip(found[0][-3:], grads, strict=True):
        torch.testing.assert_close(g_c, g_e.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(), (0,), (2, 0, 3), (1,), (7,), (13,), (3, 5, 7), (32, 200), (2, 1, 3, 1, 5)])
def test_tanh_shapes_and_dtypes_run_the_cpp(shape, dtype, monkeypatch):
    """Any contiguous float32 or float64 tensor runs tanh's C++: 0-d, empty, and sizes that end in
    a partial vector (7, 13, 105, 30 elements). The output is torch's to an ulp of 1 (Sleef's tanh
    against torch.tanh's MKL); the backward is the eager kernel's bit for bit on either cache (the
    same (1 - y)(1 + y) dout, in the same rounding order)."""
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g, dtype=dtype) * 4
    dout = torch.randn(shape, generator=g, dtype=dtype)
    out_e, cache_e = backprop.tanh.forward(x)
    (grad_e,) = backprop.tanh.backward(dout, cache_e)

    def refuse(*args, **kwargs):
        raise AssertionError("the eager kernel ran")

    monkeypatch.setattr(backprop.tanh, "forward", refuse)
    monkeypatch.setattr(backprop.tanh, "backward", refuse)
    out, cache = cpp.tanh.forward(x)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous() and cache.out is out
    torch.testing.assert_close(out, out_e, rtol=0, atol=torch.finfo(dtype).eps)
    assert torch.equal(cpp.tanh.backward(dout, cache_e)[0], grad_e)
    torch.testing.assert_close(cpp.tanh.backward(dout, cache)[0], grad_e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [(1 << 16) + 3, (1 << 20) + 2 * 1024 + 5])
def test_tanh_large_inputs_run_on_threads_with_the_same_bits(n, dtype, monkeypatch):
    """tanh's C++ above kGrain (2^16) elements runs ranges on torch's threads, and an output of 4 MiB
    or more is populated a range at a time before it is written: at 1 and 2 threads the same bits,
    every element (the last, partial range and vector included) the small path's own result (the
    eager kernel's backward bit for bit; the forward to an ulp of 1 of torch.tanh)."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g, dtype=dtype) * 4
    dout = torch.randn(n, generator=g, dtype=dtype)
    out_e, cache_e = backprop.tanh.forward(x)
    (grad_e,) = backprop.tanh.backward(dout, cache_e)
    refuse_eager(monkeypatch, backprop.tanh)
    (out1, dx1), (out2, dx2) = at_one_and_two_threads(
        lambda: (cpp.tanh.forward(x)[0], cpp.tanh.backward(dout, cache_e)[0]))
    assert torch.equal(out1, out2) and torch.equal(dx1, dx2)
    assert torch.equal(dx1, grad_e)
    torch.testing.assert_close(out1, out_e, rtol=0, atol=torch.finfo(dtype).eps)
    small = torch.cat([cpp.tanh.forward(part)[0] for part in x.split(1 << 15)])  # each below kGrain
    assert torch.equal(out1, small)


def test_tanh_strided_or_16_bit_inputs_run_the_eager_kernel():
    """The forward's eager kernel, the same results; the backward runs whichever path covers the
    cache's out (contiguous after x[:, ::2], transposed after x.t())."""
    x = torch.randn(6, 8, dtype=torch.float64)
    for t in (x.t(), x[:, ::2], x.half(), x.bfloat16()):
        out, cache = cpp.tanh.forward(t)
        assert torch.equal(out, backprop.tanh.forward(t)[0])
        assert torch.equal(cpp.tanh.backward(torch.ones_like(out), cache)[0],
                           backprop.tanh.backward(torch.ones_like(out), cache)[0])


def floats_between(lo, hi):
    """Every float32 in [lo, hi] (lo, hi > 0)."""
    bits = torch.tensor([lo, hi], dtype=torch.float32).view(torch.int32).tolist()
    return torch.arange(bits[0], bits[1] + 1, dtype=torch.int32).view(torch.float32)


def test_tanh_is_correctly_rounded_where_sleef_is_not():
    """Sleef's tanh (ATen's vector tanh) returns +-1 from |x| > ln(2^(p+1))/2, half an ulp early,
    where the backward's (1 - y)(1 + y) is then 0 and not torch's; and for float32 x in
    [2^-24, 2^-23] it is one ulp off on an eighth of the inputs. tanh.cpp rounds both bands
    correctly: every float32 there, and the float64 band's ends."""
    for lo, hi in [(8.5, 9.1), (2.0**-24, 2.0**-23)]:
        x = floats_between(lo, hi)
        for signed in (x, -x):
            assert torch.equal(cpp.tanh.forward(signed)[0], torch.tanh(signed.double()).float())
    below_one = 1 - 2.0**-53
    x = torch.tensor([18.7, 18.8, 19.0, 19.061547465398494, 19.061547465398497, 30.0], dtype=torch.float64)
    assert cpp.tanh.forward(x)[0].tolist() == [below_one] * 4 + [1.0] * 2
    assert cpp.tanh.forward(-x)[0].tolist() == [-below_one] * 4 + [-1.0] * 2
    for x in (floats_between(8.7, 9.0), torch.tensor([18.8, 19.0], dtype=torch.float64)):
        out, cache = cpp.tanh.forward(x)
        assert torch.equal(out, torch.tanh(x))  # MKL's torch.tanh rounds these correctly too
        assert (cpp.tanh.backward(torch.ones_like(x), cache)[0] > 0).all()
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-40])
    out = cpp.tanh.forward(special)[0]
    torch.testing.assert_close(out, torch.tanh(special), rtol=0, atol=0, equal_nan=True)
    assert torch.signbit(out).tolist()[:4] == [False, True, False, True]


def test_tanh_under_vmap_the_eager_kernel_runs(monkeypatch):
    """Under torch.func.vmap the op sees BatchedTensors: plain torch.Tensors to Python's eye, but
    wrappers whose memory the C++ must not read (torch has no batching rule for the op: it raises).
    cpp.unwrapped() sends both directions to the eager kernel."""
    ran = []
    for direction in ("forward", "backward"):
        kernel = getattr(backprop.tanh, direction)
        monkeypatch.setattr(backprop.tanh, direction,
                            lambda *a, kernel=kernel, d=direction: ran.append(d) or kernel(*a))
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    dout = torch.randn(4, 3, 5, dtype=torch.float64)
    torch.testing.assert_close(torch.vmap(lambda v: cpp.tanh.forward(v)[0])(x), torch.tanh(x))
    torch.testing.assert_close(torch.vmap(lambda v: cpp.tanh.forward(v)[0], in_dims=1)(x),
                               torch.tanh(x).transpose(0, 1))
    y = torch.tanh(x)
    grads = torch.vmap(lambda d, y: cpp.tanh.backward(d, cpp.tanh.Cache(y))[0])(dout, y)
    torch.testing.assert_close(grads, (1 - y) * (1 + y) * dout)
    assert ran == ["forward", "forward", "backward"]


def test_under_vmap_through_the_adapter():
    """backprop.autograd.apply runs the op once per sample under vmap, on unwrapped tensors."""
    from backprop.autograd import apply

    z, y = torch.randn(2, 4, 3, dtype=torch.float64), torch.randint(0, 3, (2, 4))
    per_sample = torch.vmap(lambda z, y: apply(cpp.cross_entropy, z, y))(z, y)
    torch.testing.assert_close(per_sample, torch.stack([torch.nn.functional.cross_entropy(a, b)
                                                        for a, b in zip(z, y)]))


def test_under_a_dispatch_mode_the_eager_kernel_runs():
    """A dispatch mode sees aten calls: the C++ (invisible to it) must step aside."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with Record():
        loss, _ = cpp.cross_entropy.forward(z, y)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(z, y))
    assert any("amax" in f for f in seen), seen


def test_a_corrupt_or_foreign_library_is_not_loaded(tmp_path):
    """The digest record and the owner/mode checks run before torch loads anything."""
    from backprop.makemore.aot import _record

    lib = tmp_path / "kernels-x.so"
    lib.write_bytes(b"not a library")
    _record(lib).write_text("0" * 64 + "\n")
    with pytest.raises(ValueError, match="digest differs"):
        cpp.load(lib)
    os.chmod(lib, 0o666)
    with pytest.raises(ValueError, match="group- or world-writable"):
        cpp.load(lib)


def test_without_a_compiler_the_eager_kernels_run(tmp_path):
    """g++ missing: one warning, then every call runs the eager kernel (a fresh process: this one
    has loaded the kernels already)."""
    code = ("import warnings, torch\n"
            "warnings.simplefilter('error')\n"
            "from backprop import cpp\n"
            "try:\n    cpp.kernels()\nexcept UserWarning as w:\n    print('warned:', w)\n"
            "warnings.simplefilter('ignore')\n"
            "loss, cache = cpp.cross_entropy.forward(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))\n"
            "print(cache.logsum.shape, cpp.op('cross_entropy_forward'))\n")
    env = dict(os.environ, PATH=str(tmp_path), BACKPROP_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "warned: backprop.cpp: no C++ compiler (g++ is not on PATH): running the eager kernels" in done.stdout
    assert "torch.Size([4, 1]) None" in done.stdout
    assert shutil.which("g++") is not None  # this process's PATH untouched


def test_a_hand_built_cache_with_targets_out_of_range_is_the_eager_ops_error():
    """The backward reads the cache's targets as indices: a cache whose targets were replaced (a
    fresh tensor passes the version check) must get the eager op's error, not an out-of-bounds
    read (found by review: 10**12 crashed the process)."""
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    _, cache = cpp.cross_entropy.forward(z, y)
    for bad in ([7, 1, 2, 0], [-1, 1, 2, 0], [10**12, 1, 2, 0]):
        tampered = cache._replace(targets=torch.tensor(bad))
        with pytest.raises(Exception) as eager_error:
            backprop.cross_entropy.backward(torch.tensor(1.0), tampered)
        with pytest.raises(eager_error.type):
            cpp.cross_entropy.backward(torch.tensor(1.0), tampered)


def test_no_rows_with_reduction_none():
    """An empty 'none' loss has an empty dout: the C++ must not read dout[0] (found by review)."""
    z, y = torch.randn(0, 4), torch.zeros(0, dtype=torch.long)
    out, cache = cpp.cross_entropy.forward(z, y, reduction="none")
    (dz, _), (dz_eager, _) = (op.backward(torch.ones_like(out), cache) for op in (cpp.cross_entropy,
                                                                                  backprop.cross_entropy))
    assert dz.shape == dz_eager.shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["cross_entropy", "linear_cross_entropy"])
def test_a_zero_weight_total_with_smoothing_gives_nan_like_torch(name, dtype, monkeypatch):
    """'mean' with class weights and label smoothing where every target's weight is 0 (a fault hunt):
    torch's nll term is 0 / 0 = nan, so the loss and every gradient are nan; the C++ summed the two
    terms first, inf / 0: an inf loss, gradients of +-inf. The C++ runs here (the eager kernel refused)."""
    g = torch.Generator().manual_seed(0)
    targets, weight = torch.tensor([2, 2, 2]), torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=dtype)
    if name == "cross_entropy":
        args = (torch.randn(3, 4, generator=g, dtype=dtype), targets)
        reference = torch.nn.functional.cross_entropy
    else:
        args = (torch.randn(3, 5, generator=g, dtype=dtype), torch.randn(4, 5, generator=g, dtype=dtype), targets,
                torch.randn(4, generator=g, dtype=dtype))
        reference = lambda x, w, t, b, **kw: torch.nn.functional.linear_cross_entropy(  # noqa: E731
            x, w, t, linear_bias=b, ignore_index=-100, **kw)
    leaves = [a.clone().requires_grad_() if a.is_floating_point() else a for a in args]
    expected = reference(*leaves, weight=weight, label_smoothing=0.1)
    expected.backward()
    eager = backprop.OPS[name]

    def refuse(*args, **kwargs):
        raise AssertionError("the eager kernel ran")

    monkeypatch.setattr(eager, "forward", refuse)
    monkeypatch.setattr(eager, "backward", refuse)
    out, cache = cpp.OPS[name].forward(*args, weight=weight, label_smoothing=0.1)
    grads = [d for d in cpp.OPS[name].backward(torch.ones((), dtype=dtype), cache) if d is not None]
    assert out.isnan() and expected.isnan()
    leaf_grads = [a.grad for a in leaves if a.is_floating_point()]
    assert len(grads) == len(leaf_grads)
    for ours, theirs in zip(grads, leaf_grads):
        assert ours.isnan().all() and theirs.isnan().all()


def _unit(cmd: list[str]) -> str:
    """Which g++ call of cpp.build cmd is: the ops' unit, the binding's, or the link."""
    return ("link" if "-shared" in cmd else
            "ops" if cmd[cmd.index("-c") + 1].endswith(".ops.cpp") else
            "binding" if cmd[cmd.index("-c") + 1].endswith(".binding.cpp") else "?")


def _fake_build(tmp_path, monkeypatch, fails):
    """cpp.build with g++ stood in for: fails(cmd) is the stderr of a call that fails, or None (the
    call writes its output). The library must come out with its digest record; returns (the g++
    commands, the warnings said)."""
    from backprop.makemore.aot import _record

    commands = []

    def run(cmd, **kwargs):
        commands.append(cmd)
        if (stderr := fails(cmd)) is not None:
            return subprocess.CompletedProcess(cmd, 1, "", stderr)
        Path(cmd[cmd.index("-o") + 1]).write_bytes(b"a library")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(cpp.subprocess, "run", run)
    lib = tmp_path / "kernels-x.so"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cpp.build(lib)
    assert lib.read_bytes() == b"a library" and _record(lib).exists()
    return commands, [str(w.message) for w in seen]


NO_OPENMP = "g++: error: unrecognized option '-fopenmp'"


@pytest.mark.parametrize("openmp_works", [True, False])
def test_a_compiler_without_openmp_still_builds_every_op(tmp_path, monkeypatch, openmp_works):
    """One translation unit for the ops: a g++ that refuses -fopenmp (no libgomp development files,
    clang as g++) failed the whole build, and all four ops ran eager. It compiles them again without
    -fopenmp, after a warning, and links without it; with a working -fopenmp, one compile and no
    warning. The binding's unit (compiled beside it) needs no OpenMP."""
    commands, said = _fake_build(tmp_path, monkeypatch,
                                 lambda cmd: NO_OPENMP if "-fopenmp" in cmd and not openmp_works else None)
    ops = [c for c in commands if _unit(c) == "ops"]
    assert [("-fopenmp" in c) for c in ops] == ([True] if openmp_works else [True, False])
    assert [("-fopenmp" in c) for c in commands if _unit(c) == "binding"] == [False]
    link = commands[-1]
    assert _unit(link) == "link" and ("-fopenmp" in link) == openmp_works and "-ltorch_python" in link
    assert said == ([] if openmp_works else [said[0]])
    assert openmp_works or "built without OpenMP" in said[0] and "-fopenmp" in said[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels-x.sha256", "kernels-x.so"]  # no sources left


def test_a_build_failing_without_openmp_too_raises_the_first_error(tmp_path, monkeypatch):
    def run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "first" if "-fopenmp" in cmd else "second")

    monkeypatch.setattr(cpp.subprocess, "run", run)
    with pytest.raises(RuntimeError, match="g\\+\\+ failed \\(exit 1\\): first"):
        cpp.build(tmp_path / "kernels-x.so")
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_a_digest_record_left_without_its_library_is_rebuilt(tmp_path, monkeypatch):
    """A build killed between its two renames leaves the .sha256 alone: the next process must
    rebuild, not give up on the C++ for good (found by review)."""
    from backprop.makemore.aot import _record

    lib = tmp_path / "kernels-x.so"
    _record(lib).write_text("0" * 64 + "\n")
    built = []

    def build(path):
        built.append(path)
        path.write_bytes(b"built")

    def load(path):
        if path.read_bytes() != b"built":
            raise ValueError("not what build wrote")

    monkeypatch.setattr(cpp, "build", build)
    monkeypatch.setattr(cpp, "load", load)
    with pytest.warns(UserWarning, match="rebuilding"):
        assert cpp._load_or_build(lib, tmp_path, True) is not None
    assert built == [lib]


def test_a_corrupt_library_is_set_aside_once_and_rebuilt(tmp_path, monkeypatch):
    """A library that fails its digest is moved aside under a dated name (the warning gives it) and
    rebuilt; an older copy set aside by an earlier run is removed, so a file corrupted on every run
    keeps one copy on disk."""
    from backprop.makemore.aot import _record

    lib = tmp_path / "kernels-x.so"
    lib.write_bytes(b"corrupt")
    _record(lib).write_text("0" * 64 + "\n")
    older = tmp_path / "kernels-x.so.bad-20260101-000000-1"
    older.write_bytes(b"older")
    real_load = cpp.load

    def build(path):
        path.write_bytes(b"built")

    def load(path):
        if path.read_bytes() != b"built":
            real_load(path)  # the digest check raises
    monkeypatch.setattr(cpp, "build", build)
    monkeypatch.setattr(cpp, "load", load)
    with pytest.warns(UserWarning, match="digest differs.*moved it to .*rebuilding") as said:
        assert cpp._load_or_build(lib, tmp_path, True) is not None
    (aside,) = tmp_path.glob("*.bad-*")
    assert aside != older and aside.read_bytes() == b"corrupt" and str(aside) in str(said[0].message)


@pytest.mark.parametrize("shape", [(1 << 18, 2), (4, 2, 1 << 16)])
def test_batch_norm_float64_statistics_keep_their_bits_whatever_the_first_value(shape):
    """float64 batch_norm through C++ against the eager kernel's corrected two-pass, at float64's
    own rounding: data at 1e4 +- 1e-3 whose first value (the one-pass sums' shift) sits 1 away from
    the mean, 1000 spreads out. Sums about that first value alone cancel log2(n + 1) bits (18 here):
    rstd came out 2e-9 off (a review's measurement at n = 4M), so float64 sums again about the mean."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 1e-3 + 1e4
    x.view(shape[0], shape[1], -1)[0, :, 0] += 1.0  # the first value of each channel
    out_c, cache_c = cpp.batch_norm.forward(x, eps=1e-15)
    out_e, cache_e = backprop.batch_norm.forward(x, eps=1e-15)
    torch.testing.assert_close(cache_c.rstd, cache_e.rstd, rtol=1e-12, atol=0)
    torch.testing.assert_close(out_c, out_e, rtol=1e-9, atol=1e-9)


def _refuse_eager(monkeypatch, module):
    for direction in ("forward", "backward"):
        monkeypatch.setattr(module, direction, lambda *a, d=direction, **k: pytest.fail(f"the eager {d} ran"))


def _lce_inputs(N, D, V, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, D, generator=g, dtype=dtype) * scale, torch.randn(V, D, generator=g, dtype=dtype) * 0.5,
            torch.randint(0, V, (N,), generator=g), torch.randn(V, generator=g, dtype=dtype),
            torch.rand(V, generator=g, dtype=dtype) + 0.25, torch.randn(N, generator=g, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_chunks_and_options_run_the_cpp(dtype, reduction, monkeypatch):
    """linear_cross_entropy's C++ in chunks of 1 row, of 5 (13 = 5 + 5 + 3: an uneven tail, dW and db
    summed over chunks) and the default (one chunk), with and without bias, class weights and smoothing:
    both directions run the C++ (the 'none' backward recomputes the chunks there), give the loss and
    gradients of torch's F.linear + F.cross_entropy under autograd in float64 (to the dtype's
    rounding), the eager kernel's cache field by field, and the eager backward's gradients on it."""
    import torch.nn.functional as F

    x, W, y, b, cw, d = _lce_inputs(13, 6, 9, dtype, seed=len(reduction))
    dout = d if reduction == "none" else d[0]
    cases = [(None, {}), (b, {"weight": cw, "label_smoothing": 0.3}), (b, {"label_smoothing": 0.1}),
             (None, {"weight": cw})]
    expected = []
    for chunk in (1, 5, None):
        for bias, options in cases:
            options = {**options, "reduction": reduction, "chunk_size": chunk}
            out, cache = backprop.linear_cross_entropy.forward(x, W, y, bias, **options)
            expected.append((cache, backprop.linear_cross_entropy.backward(dout, cache)))
            wide = [t.double().requires_grad_() for t in (x, W, *([] if bias is None else [bias]))]
            loss = F.cross_entropy(F.linear(*wide), y, weight=None if "weight" not in options else cw.double(),
                                   reduction=reduction, label_smoothing=options.get("label_smoothing", 0.0))
            expected[-1] += ((loss, *torch.autograd.grad(loss, wide, dout.double())),)
    _refuse_eager(monkeypatch, backprop.linear_cross_entropy)
    for i, (chunk, (bias, options)) in enumerate((c, o) for c in (1, 5, None) for o in cases):
        cache_e, grads_e, (loss, *grads) = expected[i]
        options = {**options, "reduction": reduction, "chunk_size": chunk}
        out_c, cache_c = cpp.linear_cross_entropy.forward(x, W, y, bias, **options)
        torch.testing.assert_close(out_c, loss.to(dtype))
        for field, a, e in zip(cache_e._fields, cache_c, cache_e, strict=True):
            if isinstance(e, torch.Tensor):
                torch.testing.assert_close(a, e, msg=lambda m, f=field: f"cache.{f}: {m}")
            else:
                assert type(a) is type(e) and a == e, (field, a, e)
        dx, dW, none, db = cpp.linear_cross_entropy.backward(dout, cache_c)
        assert none is None and (db is None) == (bias is None)
        for ours, eager, wide in zip([dx, dW, db], [grads_e[0], grads_e[1], grads_e[3]], [*grads, None]):
            if eager is not None:
                torch.testing.assert_close(ours, eager)
                torch.testing.assert_close(ours, wide.to(dtype))


def test_linear_cross_entropy_confident_rows_keep_the_target_gradient():
    """Rows whose target holds most of the probability (1 - p_y from 1e-5 to 0.2 here), where the
    target entry of dz, -(1 - p_y) w_y g, is small against p_y: the C++ gives the eager kernel's dW
    and dx to float32's relative rounding, and dW's rows are not flushed to 0. (It does not single out
    expm1: at these p_y, exp(log p_y) - 1 in float32 is as close, as the rounding of the log-sum
    dominates both; where p_y rounds to 1, log p_y is 0 and every path, torch's too, gives 0.)"""
    x, W, y, b, cw, _ = _lce_inputs(8, 4, 5, torch.float32, seed=5)
    y = torch.arange(8) % 4  # class 4 is no row's target: its logits are pushed down
    W[4] = -W[:4].sum(0)
    x = x * 0 + W[y] * 12  # z_y dominates each row by far
    for options in ({}, {"weight": cw, "reduction": "sum", "label_smoothing": 1e-9}):
        (_, cache), (_, cache_c) = (op.forward(x, W, y, **options) for op in (backprop.linear_cross_entropy,
                                                                             cpp.linear_cross_entropy))
        assert (cache.dlinear_weight[:4].abs() > 0).all()
        torch.testing.assert_close(cache_c.dlinear_weight, cache.dlinear_weight, rtol=1e-4, atol=0)
        torch.testing.assert_close(cache_c.dx, cache.dx, rtol=1e-4, atol=0)


def test_linear_cross_entropy_release_and_the_eager_fallbacks(monkeypatch):
    """release=True scales the C++ cache's gradients in place and hands them over (no copy); an
    ignored row (ignore_index -100, or a class), a strided x and a float16 x run the eager kernel, with its results; an out-of-range
    target and a hand-built 'none' cache whose targets lie outside [0, V) get the eager op's errors,
    not an out-of-bounds read."""
    x, W, y, b, cw, d = _lce_inputs(6, 3, 4, torch.float64, seed=9)
    out, cache = cpp.linear_cross_entropy.forward(x, W, y, b, weight=cw)
    grads_e = backprop.linear_cross_entropy.backward(d[0], cache)
    dx, dW, _, db = cpp.linear_cross_entropy.backward(d[0], cache, release=True)
    assert dx is cache.dx and dW is cache.dlinear_weight and db is cache.dlinear_bias
    for a, e in zip((dx, dW, db), grads_e[:2] + grads_e[3:]):
        torch.testing.assert_close(a, e)
    ignored, ignored_in_range = y.clone(), y.clone()
    ignored[2], ignored_in_range[3] = -100, 1  # an ignore_index that is a class: the row is still ignored
    ran = []
    forward = backprop.linear_cross_entropy.forward
    monkeypatch.setattr(backprop.linear_cross_entropy, "forward", lambda *a, **k: ran.append(1) or forward(*a, **k))
    for args, options in [((x, W, ignored, b), {"label_smoothing": 0.2}), ((x, W, ignored_in_range), {"ignore_index": 1}),
                          ((x.t().contiguous().t(), W, y), {}), ((x.half(), W.half(), y), {"reduction": "sum"})]:
        out, cache = cpp.linear_cross_entropy.forward(*args, **options)
        torch.testing.assert_close(out, forward(*args, **options)[0])
    assert len(ran) == 4  # the eager kernel ran for each
    with pytest.raises(ValueError, match="targets must lie in"):
        cpp.linear_cross_entropy.forward(x, W, torch.tensor([0, 1, 4, 0, 1, 2]))
    _, cache = cpp.linear_cross_entropy.forward(x, W, y, reduction="none")
    for bad in ([7, 1, 2, 0, 1, 1], [-1, 1, 2, 0, 1, 1], [10**12, 1, 2, 0, 1, 1]):
        # a fresh tensor has version 0, as the one forward saw: the cache reaches the C++ (versions=()
        # would send it to the eager kernel first), which must refuse it, not read out of bounds
        tampered = cache._replace(targets=torch.tensor(bad))
        assert cpp.op("linear_cross_entropy_backward")(d, x, W, tampered.targets, None, None, 0.0, 7) == []
        with pytest.raises(Exception) as eager_error:
            backprop.linear_cross_entropy.backward(d, tampered)
        with pytest.raises(eager_error.type, match=re.escape(str(eager_error.value))):
            cpp.linear_cross_entropy.backward(d, tampered)
    # a hand-built cache holding something else than a tensor: the eager op's TypeError, not an
    # AttributeError from reading its version (found by review)
    for reduction in ("mean", "none"):
        _, cache = cpp.linear_cross_entropy.forward(x, W, y, b, weight=cw, reduction=reduction)
        for field, junk in (("linear_weight", None), ("targets", [0, 1]), ("weight", "w"), ("linear_bias", 1.0)):
            tampered = cache._replace(**{field: junk})
            with pytest.raises(TypeError) as eager_error:
                backprop.linear_cross_entropy.backward(d if reduction == "none" else d[0], tampered)
            with pytest.raises(TypeError, match=re.escape(str(eager_error.value))):
                cpp.linear_cross_entropy.backward(d if reduction == "none" else d[0], tampered)


def refuse_eager(monkeypatch, module):
    def refuse(*args, **kwargs):
        raise AssertionError("the eager kernel ran")

    monkeypatch.setattr(module, "forward", refuse)
    monkeypatch.setattr(module, "backward", refuse)


def assert_same_logsumexp(found, expected, **tolerance):
    """(out, cache, dx) of the C++ against the eager kernel's: shapes, dtypes, values (nan where
    theirs is), the cache's fields."""
    for a, e in zip(found, expected, strict=True):
        if isinstance(e, tuple):  # the cache
            for field, fa, fe in zip(e._fields, a, e, strict=True):
                if isinstance(fe, torch.Tensor):
                    assert fa.shape == fe.shape and fa.dtype == fe.dtype, field
                    torch.testing.assert_close(fa, fe, equal_nan=True, msg=lambda m, f=field: f"cache.{f}: {m}",
                                               **tolerance)
                else:
                    assert type(fa) is type(fe) and fa == fe, (field, fa, fe)
        else:
            assert a.shape == e.shape and a.dtype == e.dtype
            torch.testing.assert_close(a, e, equal_nan=True, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("shape", "dim"), [
    ((), -1), ((), 0), ((0,), -1), ((5, 0), -1), ((0, 4), -1), ((1, 7), -1), ((7,), 0), ((3, 1000), -1),
    ((2, 513), -1), ((4, 3, 5), -1), ((4, 3, 5), (1, 2)), ((4, 3, 5), (2, 0, 1)), ((2, 3, 0), (1, 2)),
])
@pytest.mark.parametrize("keepdim", [False, True])
def test_logsumexp_shapes_and_dtypes_run_the_cpp(shape, dim, keepdim, dtype, monkeypatch):
    """Every covered shape runs logsumexp's C++ (a 0-d x, empty rows, no rows, one row, rows that
    end in a partial vector or span several blocks and a partial one: 1000 = 512 + 488, 513 = 512
    + 1) and gives the eager kernel's out, cache and dx (empty rows: -inf, shift 0)."""
    g = torch.Generator().manual_seed(sum(shape) + len(shape))
    x = torch.randn(shape, generator=g, dtype=dtype) * 5
    out, cache = backprop.logsumexp.forward(x, dim=dim, keepdim=keepdim)
    dout = torch.randn(out.shape, generator=g, dtype=dtype)
    expected = (out, cache, *backprop.logsumexp.backward(dout, cache))
    refuse_eager(monkeypatch, backprop.logsumexp)
    out_c, cache_c = cpp.logsumexp.forward(x, dim=dim, keepdim=keepdim)
    assert cache_c.x is x
    assert_same_logsumexp((out_c, cache_c, *cpp.logsumexp.backward(dout, cache_c)), expected)
    assert torch.equal(cache_c.shift, cache.shift)  # the row max: exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logsumexp_rows_of_inf_and_nan_are_shifted_as_the_eager_kernel(dtype, monkeypatch):
    """Rows whose max is +inf are shifted by the dtype's largest finite value, -inf (all -inf) or nan
    by 0 (nan_to_num(0, max, 0)): out +inf, -inf, nan; dx as the eager kernel's (nan for a row of
    -inf). Placed in the first block, a later block and the partial tail of a 1300-value row (blocks
    of 512 float32, 256 float64 values), and rows whose -inf values fill the first blocks before
    finite ones, or whose max grows block by block (the running max's rescaled sum)."""
    C, inf, nan = 1300, float("inf"), float("nan")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(14, C, generator=g, dtype=dtype) * 3
    for row, value in enumerate((inf, -inf, nan)):
        for j, col in enumerate((3, 700, C - 2)):
            x[3 * row + j, col] = value
    x[9] = -inf
    x[10, :600] = -inf
    x[11, :] = torch.linspace(-40, 40, C, dtype=dtype)
    x[12, :] = torch.linspace(40, -40, C, dtype=dtype)
    x[13, 1100:] = -inf
    out, cache = backprop.logsumexp.forward(x)
    dout = torch.randn(out.shape, generator=g, dtype=dtype)
    expected = (out, cache, *backprop.logsumexp.backward(dout, cache))
    refuse_eager(monkeypatch, backprop.logsumexp)
    out_c, cache_c = cpp.logsumexp.forward(x)
    found = (out_c, cache_c, *cpp.logsumexp.backward(dout, cache_c))
    assert_same_logsumexp(found, expected)
    assert out_c[:3].eq(inf).all() and out_c[3:6].isfinite().all() and out_c[6:9].isnan().all()
    assert out_c[9] == -inf and found[2][9].isnan().all()  # 0 * (dout / 0), as the eager kernel's
    assert cache_c.shift[[6, 7, 8, 9]].eq(0).all() and cache_c.shift[3:6].gt(0).all()
    assert cache_c.shift[:3].eq(torch.finfo(dtype).max).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logsumexp_rows_holding_inf_and_large_finite_entries_as_torch(dtype, monkeypatch):
    """A row holding +inf (and no nan): out +inf and dx dout * exp(x - out), 0 at every finite entry
    even above log(max) (710: exp overflows in both dtypes), nan at the +inf, as torch's; the shift
    the eager kernel's bit for bit (the dtype's largest finite value; 0 where the row holds a nan,
    before or after the +inf). Placed in one block, across blocks either way round (the running max
    growing to +inf: the second pass), with -inf entries, and in a 0-d x."""
    C, inf, nan, big = 1300, float("inf"), float("nan"), torch.finfo(dtype).max
    x = torch.randn(9, C, generator=torch.Generator().manual_seed(6), dtype=dtype) * 3
    x[0, :3] = torch.tensor([inf, 710.0, 1.0], dtype=dtype)  # the fault hunt's row, in the first block
    x[1, [3, 900]] = torch.tensor([inf, 710.0], dtype=dtype)  # +inf first, the large entry in a later block
    x[2, [3, 900, C - 1]] = torch.tensor([710.0, inf, -inf], dtype=dtype)  # the finite max first, then +inf
    x[3, [5, 700, C - 2]] = torch.tensor([inf, big, inf], dtype=dtype)
    x[4, :700], x[4, 1000] = -inf, inf  # -inf blocks, then +inf
    x[5, [3, 1200]] = torch.tensor([inf, nan], dtype=dtype)  # amax nan: shifted by 0
    x[6, [3, 1200]] = torch.tensor([nan, inf], dtype=dtype)
    x[7, 1000] = 800.0  # a finite row, its max in a later block
    x[8, 0:2] = torch.tensor([-big, inf], dtype=dtype)
    leaf = x.clone().requires_grad_()
    dout = torch.randn(9, generator=torch.Generator().manual_seed(7), dtype=dtype)
    want_out = torch.logsumexp(leaf, 1)
    want_dx = torch.autograd.grad(want_out, leaf, dout)[0]
    out, cache = backprop.logsumexp.forward(x)
    expected = (out, cache, *backprop.logsumexp.backward(dout, cache))
    cache0 = backprop.logsumexp.forward(torch.tensor(inf, dtype=dtype))[1]
    refuse_eager(monkeypatch, backprop.logsumexp)
    out_c, cache_c = cpp.logsumexp.forward(x)
    found = (out_c, cache_c, *cpp.logsumexp.backward(dout, cache_c))
    assert_same_logsumexp(found, expected)
    assert torch.equal(cache_c.shift, cache.shift)
    for name, (o, dx) in {"eager": (out, expected[2]), "cpp": (out_c, found[2])}.items():
        torch.testing.assert_close(o, want_out.detach(), equal_nan=True, msg=lambda m, n=name: f"{n} out: {m}")
        torch.testing.assert_close(dx, want_dx, equal_nan=True, msg=lambda m, n=name: f"{n} dx: {m}")
    assert found[2][0, 1:].eq(0).all() and found[2][0, 0].isnan()  # the fault hunt's row
    assert cache_c.shift[[0, 1, 2, 3, 4, 8]].eq(big).all() and cache_c.shift[5:7].eq(0).all()
    out_c, cache_c = cpp.logsumexp.forward(torch.tensor(inf, dtype=dtype))  # a 0-d x: out = x
    assert out_c == inf and torch.equal(cache_c.shift, cache0.shift)
    assert cpp.logsumexp.backward(torch.ones((), dtype=dtype), cache_c)[0].isnan()  # exp(inf - inf), as torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("shape", "dim"), [((261, 4099), -1), ((3, 5, 7, 601), (2, 3))])
def test_logsumexp_threads_give_the_same_results(shape, dim, dtype, monkeypatch):
    """logsumexp's C++ on torch's threads: at 2 threads its results are the ones at 1, bit for bit
    (rows split between the threads, each row reduced by one in a fixed order), and the eager
    kernel's in float64 to x's rounding: out, shift, sumexp, and dx (the float64 backward of the
    C++ cache's own shift and sumexp). 261 x 4099 float32 is 4.1 MiB: its dx is populated 16 rows
    at a time, each thread's last batch a partial one."""
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(shape, generator=g, dtype=dtype) * 4 + 20
    dout = torch.randn(shape[:len(shape) - (1 if dim == -1 else len(dim))], generator=g, dtype=dtype)
    out, cache = backprop.logsumexp.forward(x.double(), dim=dim)
    refuse_eager(monkeypatch, backprop.logsumexp)
    def run():
        out_c, cache_c = cpp.logsumexp.forward(x, dim=dim)
        return [out_c, cache_c.shift, cache_c.sumexp, *cpp.logsumexp.backward(dout, cache_c)]

    found = at_one_and_two_threads(run)
    for one, two in zip(*found, strict=True):
        assert torch.equal(one, two)
    out_c, shift, sumexp, dx = found[0]
    torch.testing.assert_close(out_c, out.to(dtype))
    assert torch.equal(shift, cache.shift.to(dtype))
    torch.testing.assert_close(sumexp, cache.sumexp.to(dtype))
    wide = cache._replace(shift=shift.double(), sumexp=sumexp.double(), versions=())
    torch.testing.assert_close(dx, backprop.logsumexp.backward_math(dout.double(), wide)[0].to(dtype))


def test_logsumexp_uncovered_cases_run_the_eager_kernel():
    """A reduction over dims that are not trailing, a strided x, 16-bit dtypes: the eager kernel's
    results (the backward runs whichever path covers the cache)."""
    x = torch.randn(6, 8, dtype=torch.float64)
    for t, dim in [(x, 0), (x.t(), -1), (x[:, ::2], -1), (x.half(), -1), (x.bfloat16(), 1),
                   (x.reshape(2, 3, 8), (0, 2))]:
        out, cache = cpp.logsumexp.forward(t, dim=dim)
        out_e, cache_e = backprop.logsumexp.forward(t, dim=dim)
        assert torch.equal(out, out_e)
        assert torch.equal(cpp.logsumexp.backward(torch.ones_like(out), cache)[0],
                           backprop.logsumexp.backward(torch.ones_like(out), cache_e)[0])


def test_logsumexp_exp_is_within_an_ulp():
    """logsumexp's C++ exp (Sleef's algorithm, inline for float32 on AVX2: logsumexp.cpp's vexp),
    read through the backward of a hand-built cache (shift 0, sumexp 1, dout 1: dx = exp(x)): within
    1 ulp of exp in float64 for 1M float32 x spanning [-110, 95] (measured: 0.97), subnormal results
    within one spacing, and the special values torch.exp's (overflow to inf past 88.72, 0 below
    -103.97, inf, -inf, nan)."""
    x = torch.cat([torch.linspace(-110, 95, 1 << 20), torch.tensor(
        [0.0, -0.0, 1e-30, 88.72283, 88.72284, 88.7229, 100.5, -87.33654, -103.97, -103.973, -104.01,
         float("inf"), -float("inf"), float("nan")])])
    cache = cpp.logsumexp.Cache(x[None], torch.zeros(1, 1), torch.ones(1, 1), (1,), False, ())
    dx = cpp.logsumexp.backward(torch.ones(1), cache)[0][0].double()
    exact = torch.exp(x.double())
    normal = exact.float().isfinite() & (exact >= 2.0**-126)
    ulp = torch.finfo(torch.float32).eps * 2.0 ** torch.floor(torch.log2(exact[normal]))
    assert ((dx[normal] - exact[normal]).abs() <= ulp).all()
    tiny, huge = exact < 2.0**-126, exact.float() == float("inf")
    assert ((dx[tiny] - exact[tiny]).abs() <= 2.0**-149).all()  # subnormal or 0
    assert (dx[huge] == float("inf")).all() and dx[x.isnan()].isnan().all()
    torch.testing.assert_close(dx[-14:].float(), torch.exp(x[-14:]), rtol=torch.finfo(torch.float32).eps, atol=0,
                               equal_nan=True)


# the library as a Python module (binding.h): each op's C++ function called without torch.ops


def bound():
    """The library's Python module; the test is skipped where this Python has no headers to build it."""
    module = cpp.kernels().module
    if module is None and not Path(cpp.sysconfig.get_paths()["include"], "Python.h").exists():
        pytest.skip("no Python.h: built without the Python binding, the calls go through torch.ops")
    assert module is not None, "built without its Python binding (see the warning)"
    return module


def dispatched(name):
    """torch.ops.backprop_cpp.<name>.default: the overload, its C++ callable (what op() returned before)."""
    overload = getattr(getattr(torch.ops, cpp.NAMESPACE), name).default
    return overload, overload._op


def test_op_is_the_bound_function_of_every_registered_op():
    """The module binds every op of torch.ops.backprop_cpp (bindings() reads the .cpp files' m.impl
    lines: one written otherwise would be missing), and op() hands out the bound function."""
    module = bound()
    registered = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas()
                  if s.name.startswith(f"{cpp.NAMESPACE}::")}
    assert registered == {name for name, _ in cpp.bindings()} and len(registered) == 2 * len(NAMES)
    for name in registered:
        assert cpp.op(name) is getattr(module, name)


def answer(run, args, kwargs=None):
    """What a call returns (each tensor's dtype, shape, strides and bytes) or raises (type, message)."""
    def bits(t):
        return None if t is None else (t.dtype, t.shape, t.stride(), t.requires_grad,
                                       bytes(t.detach().reshape(-1).view(torch.uint8).tolist()))
    try:
        found = run(*args, **(kwargs or {}))
    except Exception as e:
        return type(e), str(e)
    return [bits(t) for t in found] if isinstance(found, list) else bits(found)


@pytest.mark.parametrize("name", NAMES)
def test_the_binding_answers_as_torch_ops(name, monkeypatch):
    """Every call the op makes on its covered cases, through the binding and through torch.ops: the
    same results to the bit; with an argument replaced by one of another type (None, a bool, an int,
    a float, a str, a negative view), missing, or given by keyword, the same answer or error."""
    module = bound()
    calls = []

    def recording(op_name):
        return lambda *args: calls.append((op_name, args)) or getattr(module, op_name)(*args)

    monkeypatch.setattr(cpp, "op", recording)
    for args, options in covered_cases(name):
        out, cache = cpp.OPS[name].forward(*args, **options)
        cpp.OPS[name].backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype),
                               cache)
    assert {op_name for op_name, _ in calls} == {f"{name}_forward", f"{name}_backward"}
    for op_name, args in calls:
        ours, (overload, theirs) = getattr(module, op_name), dispatched(op_name)
        found = answer(ours, args)
        assert found == answer(theirs, args) and found is not None and found != []  # the C++ covered it
        for i, a in enumerate(args):
            for other in (None, True, 1, 1.0, "1", *([torch._neg_view(a)] if isinstance(a, torch.Tensor) else [])):
                changed = (*args[:i], other, *args[i + 1:])
                assert answer(ours, changed) == answer(theirs, changed), (op_name, i, other)
        last = overload._schema.arguments[-1].name
        assert answer(ours, args[:-1]) == answer(theirs, args[:-1])
        assert answer(ours, args[:-1], {last: args[-1]}) == answer(theirs, args[:-1], {last: args[-1]}) == found


def test_the_binding_calls_the_function_only_where_torch_ops_would():
    """binding.h calls the C++ function itself on plain arguments only; every other call (a keyword,
    a subclass, a negative view, a dispatch or torch function mode, the profiler) must reach torch.ops,
    whose kernel here is replaced by one that answers a mark (a tensor [7.])."""
    tanh_backward = bound().tanh_backward
    dout, out = torch.randn(4, 3), torch.randn(4, 3).tanh()

    class Subclass(torch.Tensor):
        pass

    class FunctionMode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class DispatchMode(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    lib = torch.library.Library(cpp.NAMESPACE, "IMPL")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # overriding a registered kernel
            lib.impl("tanh_backward", lambda *args: torch.tensor([7.0]), "CompositeImplicitAutograd")
        assert torch.equal(tanh_backward(dout, out), (1 - out) * (1 + out) * dout)
        assert torch.equal(tanh_backward(dout, out.requires_grad_()), (1 - out) * (1 + out) * dout)
        out = out.detach()
        for args, kwargs in [((dout,), {"out": out}), ((dout, out.as_subclass(Subclass)), {}),
                             ((dout, torch._neg_view(out)), {})]:
            assert torch.equal(tanh_backward(*args, **kwargs), torch.tensor([7.0])), (args, kwargs)
        for context in (FunctionMode(), DispatchMode(), torch.device("cpu"), torch.autograd.profiler.profile()):
            with context:
                assert torch.equal(tanh_backward(dout, out), torch.tensor([7.0])), context
    finally:
        lib._destroy()
    assert torch.equal(tanh_backward(dout, out=out), (1 - out) * (1 + out) * dout)  # the C++ kernel is back


def test_a_call_releases_the_gil():
    """The large shapes run for a while on torch's threads: meanwhile other Python threads run, as
    through torch.ops (binding.h releases the GIL around the call). Held, the other thread would stop
    for the whole call: the longest pause between its steps is the measure."""
    tanh_backward = bound().tanh_backward
    dout, out = torch.randn(1 << 24), torch.rand(1 << 24)
    seen, stop = [], threading.Event()

    def count():
        while not stop.is_set():
            seen.append(time.perf_counter())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the call on one core, the other thread free to run on another
    thread = threading.Thread(target=count)
    try:
        start = time.perf_counter()
        tanh_backward(dout, out)
        alone = time.perf_counter() - start
        thread.start()
        while not seen:
            time.sleep(0.001)
        start = time.perf_counter()
        tanh_backward(dout, out)
        end = time.perf_counter()
    finally:
        stop.set()
        thread.join()
        torch.set_num_threads(threads)
    steps = [start, *(t for t in seen if start < t < end), end]
    assert max(b - a for a, b in zip(steps, steps[1:])) < alone / 2, f"a call alone took {alone:.3f} s"


@pytest.mark.parametrize("openmp_works", [True, False])
def test_a_python_without_its_headers_builds_the_library_without_its_binding(tmp_path, monkeypatch, openmp_works):
    """The binding's unit fails to compile (no Python.h): the library is linked without it (no
    libtorch_python), after a warning that quotes g++, and every op keeps its C++ through torch.ops;
    with a g++ that refuses -fopenmp too, the ops without it, after both warnings."""
    def fails(cmd):
        if _unit(cmd) == "binding":
            assert "PYBIND11_MODULE" in Path(cmd[cmd.index("-c") + 1]).read_text()
            return "binding.h: fatal error: Python.h: No such file"
        return NO_OPENMP if "-fopenmp" in cmd and not openmp_works else None

    commands, said = _fake_build(tmp_path, monkeypatch, fails)
    built = [(_unit(c), "-fopenmp" in c, "-ltorch_python" in c, any(a.endswith(".binding.o") for a in c))
             for c in commands]
    ops = [("ops", True, False, False)] + ([] if openmp_works else [("ops", False, False, False)])
    assert sorted(b for b in built if b[0] != "link") == sorted([("binding", False, False, True), *ops])
    assert [b for b in built if b[0] == "link"] == [("link", openmp_works, False, False)]
    assert len(said) == (1 if openmp_works else 2)
    assert openmp_works or "built without OpenMP" in said[0]
    assert "the Python binding did not build (binding.h: fatal error: Python.h" in said[-1]
    assert "the calls go through torch.ops" in said[-1]
