"""Hypothesis strategies for kernel inputs: shapes, dtypes, values, options and seeds.

Each ``<op>_cases(...)`` strategy draws ``(args, options)`` ready for
``check_against_autograd(op, reference, *args, **options)``. Values come from a seeded
torch.Generator (a drawn seed), so a failing example replays exactly and shrinks well.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from hypothesis import strategies as st

Case = tuple[tuple[Any, ...], dict[str, Any]]  # (positional args, options)

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)

seeds = st.integers(0, 2**32 - 1)


def dtypes(low_precision: bool = True) -> st.SearchStrategy[torch.dtype]:
    """float64 and float32 always; bfloat16 and float16 where meaningful (every op: torch runs
    them all on the CPU, and compare.py's rule bounds our error by torch's own)."""
    return st.sampled_from(FLOAT_DTYPES if low_precision else FLOAT_DTYPES[:2])


def sizes(min_size: int = 1, max_size: int = 9) -> st.SearchStrategy[int]:
    """Small sizes, 1 and odd sizes included."""
    return st.integers(min_size, max_size)


def shapes(
    min_dims: int = 0, max_dims: int = 3, min_side: int = 1, max_side: int = 6
) -> st.SearchStrategy[tuple[int, ...]]:
    return st.lists(sizes(min_side, max_side), min_size=min_dims, max_size=max_dims).map(tuple)


scales = st.sampled_from([1e-2, 1.0, 10.0])  # spread of the values
shifts = st.sampled_from([0.0, 0.0, 1e4, -1e4])  # large common offsets: stability checks


def values(
    shape: Sequence[int], dtype: torch.dtype, seed: int, *, scale: float = 1.0, shift: float = 0.0
) -> torch.Tensor:
    """randn * scale + shift, drawn in float64 from a seeded generator, then rounded to dtype."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale + shift
    return x.to(dtype)


def integers(shape: Sequence[int], low: int, high: int, seed: int) -> torch.Tensor:
    """randint(low, high) from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, tuple(shape), generator=gen)


def _map_case(case: Case, f: Any) -> Case:
    """f applied to every tensor of a case, its positional arguments and its options alike."""
    def g(a: Any) -> Any:
        return f(a) if isinstance(a, torch.Tensor) else a

    args, options = case
    return tuple(map(g, args)), {k: g(v) for k, v in options.items()}


def to_device(case: Case, device: str | torch.device) -> Case:
    """Move a drawn (args, options) case to device, its tensor options too (class weights, running
    statistics): cases are drawn on the CPU, so they replay identically everywhere and can be pinned
    with @example."""
    return _map_case(case, lambda t: t.to(device))


def to_dtype(case: Case, dtype: torch.dtype | None) -> Case:
    """The case with its floating-point tensors in dtype, options too (class weights, running
    statistics), as the strategies draw them; integer tensors (class indices) keep theirs. None:
    the case unchanged."""
    return _map_case(case, lambda t: t.to(dtype) if dtype and t.is_floating_point() else t)


@st.composite
def cross_entropy_cases(draw: st.DrawFn, dtype: torch.dtype | None = None) -> Case:
    dtype = dtype or draw(dtypes(), label="dtype")
    N, C = draw(sizes(1, 16), label="N"), draw(sizes(1, 12), label="C")
    layout = draw(st.sampled_from(["(N, C)", "(N, C)", "(C,)", "(N, C, d1..dK)"]), label="layout")
    shape = {"(N, C)": (N, C), "(C,)": (C,)}.get(layout) or (N, C, *draw(shapes(1, 2, 1, 4), label="d"))
    rows = shape[:1] + shape[2:] if len(shape) > 1 else ()  # targets' shape: logits' without dim 1
    scale = draw(st.sampled_from([1e-2, 1.0, 10.0, 1e4]), label="scale")  # 1e4: logits of +-1e4
    logits = values(shape, dtype, draw(seeds), scale=scale, shift=draw(shifts, label="shift"))
    if draw(st.booleans(), label="probabilities"):
        # class probabilities, peaked or flat: softmax of a drawn spread, rounded to dtype
        spread = draw(st.sampled_from([0.1, 1.0, 5.0]), label="spread")
        targets = values(shape, torch.float64, draw(seeds), scale=spread).softmax(min(1, len(shape) - 1))
        targets, ignore_index = targets.to(dtype), -100  # torch refuses ignore_index >= 0 here
    else:
        targets = integers(rows, 0, C, draw(seeds))
        ignore_index = draw(st.sampled_from([-100, *range(C)]), label="ignore_index")
        n_ignored = draw(st.integers(0, targets.numel()), label="n_ignored")
        targets.view(-1)[:n_ignored] = ignore_index
    options = {
        "reduction": draw(st.sampled_from(["mean", "sum", "none"]), label="reduction"),
        "ignore_index": ignore_index,
        "label_smoothing": draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]), label="label_smoothing"),
    }
    if draw(st.booleans(), label="has_weight"):
        options["weight"] = values((C,), dtype, draw(seeds)).abs()  # class weights: non-negative
    return (logits, targets), options


@st.composite
def logsumexp_cases(draw: st.DrawFn, dtype: torch.dtype | None = None) -> Case:
    dtype = dtype or draw(dtypes(), label="dtype")
    shape = draw(shapes(0, 4, 0, 6), label="shape")  # empty dims too: -inf, as torch
    x = values(shape, dtype, draw(seeds), scale=draw(scales, label="scale"),
               shift=draw(shifts, label="shift"))
    n_inf = draw(st.integers(0, x.numel()), label="n_neg_inf")  # -inf entries, whole rows too
    x.view(-1)[:n_inf] = -torch.inf
    rank = max(len(shape), 1)
    dim = draw(
        st.one_of(
            st.integers(-rank, rank - 1),
            st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True).map(tuple),
        ),
        label="dim",
    )
    return (x,), {"dim": dim, "keepdim": draw(st.booleans(), label="keepdim")}


@st.composite
def batch_norm_cases(draw: st.DrawFn, dtype: torch.dtype | None = None, max_numel: int | None = None) -> Case:
    """``max_numel`` caps the trailing sides so that x has at most max(max_numel, N * C) elements (N
    and C are drawn as ever). For finite differences: one forward per element of x and one backward
    per element of out, so a case's time grows faster than its size (gradcheck alone: 19 s at
    33 x 12 x 4 x 4, 0.7 s at 33 x 12)."""
    if max_numel is not None and max_numel < 1:
        raise ValueError(f"max_numel must be a positive int or None, got {max_numel!r}")
    dtype = dtype or draw(dtypes(), label="dtype")
    correction = draw(st.sampled_from([0, 1]), label="correction")
    # N >= 3: with two values per channel xhat is +-c whatever x is, and dx is O(eps) left over
    # from cancelling O(|dout|) terms, so no float algorithm has a small relative error there (a
    # conditioning limit); tests/test_batch_norm.py covers N = 1 and 2 in float64 instead
    N, C = draw(sizes(3, 33), label="N"), draw(sizes(1, 12), label="C")
    side = 4 if max_numel is None else max(1, min(4, math.isqrt(max_numel // (N * C))))
    trailing = draw(shapes(0, 2, 1, side), label="trailing")  # (N, C), (N, C, L), (N, C, H, W)
    x = values((N, C, *trailing), dtype, draw(seeds), scale=draw(scales, label="scale"),
               shift=draw(st.sampled_from([0.0, 3.0, -50.0]), label="shift"))
    weight = values((C,), dtype, draw(seeds), shift=1.0)
    bias = values((C,), dtype, draw(seeds))
    weight = weight if draw(st.booleans(), label="has_weight") else None
    bias = bias if draw(st.booleans(), label="has_bias") else None
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]), label="eps")
    options = {"eps": eps, "correction": correction}
    mode = draw(st.sampled_from(["train", "train+stats", "eval"]), label="mode")
    if mode != "train":
        options["running_mean"] = values((C,), dtype, draw(seeds))
        options["running_var"] = values((C,), torch.float64, draw(seeds)).abs_().add_(0.1).to(dtype)
        options["training"] = mode == "train+stats"
        options["momentum"] = draw(st.sampled_from([0.1, 0.9, None]), label="momentum")
        options["num_batches_tracked"] = draw(st.integers(0, 5), label="num_batches_tracked")
    return (x, weight, bias), options


@st.composite
def tanh_cases(draw: st.DrawFn, dtype: torch.dtype | None = None) -> Case:
    dtype = dtype or draw(dtypes(), label="dtype")
    x = values(draw(shapes(0, 4), label="shape"), dtype, draw(seeds),
               scale=draw(st.sampled_from([1e-3, 1.0, 3.0, 30.0]), label="scale"))
    return (x,), {}


@st.composite
def linear_cases(draw: st.DrawFn, dtype: torch.dtype | None = None) -> Case:
    dtype = dtype or draw(dtypes(), label="dtype")
    lead = draw(shapes(0, 3, 1, 5), label="leading")
    D, H = draw(sizes(1, 17), label="D"), draw(sizes(1, 17), label="H")
    scale = draw(scales, label="scale")
    x = values((*lead, D), dtype, draw(seeds), scale=scale)
    weight = values((H, D), dtype, draw(seeds))
    bias = values((H,), dtype, draw(seeds)) if draw(st.booleans(), label="has_bias") else None
    return (x, weight, bias), {}


@st.composite
def embedding_cases(draw: st.DrawFn, dtype: torch.dtype | None = None) -> Case:
    dtype = dtype or draw(dtypes(), label="dtype")
    V, E = draw(sizes(1, 20), label="V"), draw(sizes(1, 9), label="E")
    shape = draw(shapes(0, 3, 0, 7), label="indices_shape")  # empty index tensors included
    high = draw(st.integers(1, V), label="index_high")  # small highs force repeated indices
    indices = integers(shape, 0, high, draw(seeds))
    weight = values((V, E), dtype, draw(seeds))
    padding_idx = draw(st.one_of(st.none(), st.integers(-V, V - 1)), label="padding_idx")
    deterministic = draw(st.booleans(), label="deterministic")
    scale_grad_by_freq = draw(st.booleans(), label="scale_grad_by_freq")
    # sparse=True gives a sparse dweight, which the oracle's dense comparison does not take:
    # tests/test_embedding.py draws it in a test of its own
    return (indices, weight), {"padding_idx": padding_idx, "deterministic": deterministic,
                               "scale_grad_by_freq": scale_grad_by_freq}


def noncontiguous(t: Any) -> Any:
    """The same values, laid out with stride 2 in every dimension (non-tensors and 0-d as they are)."""
    if not isinstance(t, torch.Tensor) or t.ndim == 0:
        return t
    big = torch.zeros([2 * s for s in t.shape], dtype=t.dtype, device=t.device)
    view = big[tuple(slice(None, None, 2) for _ in t.shape)]
    view.copy_(t)
    return view


@st.composite
def linear_cross_entropy_cases(draw: st.DrawFn, dtype: torch.dtype | None = None) -> Case:
    dtype = dtype or draw(dtypes(), label="dtype")
    N, D, V = draw(sizes(1, 12), label="N"), draw(sizes(1, 8), label="D"), draw(sizes(1, 12), label="V")
    scale = draw(st.sampled_from([1e-2, 1.0, 10.0, 300.0]), label="scale")  # 300: logits of ~1e3
    x = values((N, D), dtype, draw(seeds), scale=scale)
    linear_weight = values((V, D), dtype, draw(seeds))
    linear_bias = values((V,), dtype, draw(seeds)) if draw(st.booleans(), label="has_bias") else None
    targets = integers((N,), 0, V, draw(seeds))
    ignore_index = draw(st.sampled_from([-100, *range(V)]), label="ignore_index")
    n_ignored = draw(st.integers(0, N), label="n_ignored")
    targets[:n_ignored] = ignore_index
    # positive class weights, as used in practice: a zero total kept weight is 0/0 in torch too
    weight = (values((V,), dtype, draw(seeds)).abs() + 0.25) if draw(st.booleans(), label="weighted") else None
    options = {
        "weight": weight,
        "reduction": draw(st.sampled_from(["mean", "sum", "none"]), label="reduction"),
        "ignore_index": ignore_index,
        "label_smoothing": draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]), label="label_smoothing"),
        # chunks of 1 row, a few rows, or one chunk for all (the default)
        "chunk_size": draw(st.one_of(st.none(), st.integers(1, N)), label="chunk_size"),
    }
    return (x, linear_weight, targets, linear_bias), options
