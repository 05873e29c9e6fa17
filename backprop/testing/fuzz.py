"""Fuzzed invalid inputs for every op: the only outcomes allowed are a ValueError/TypeError from
the kernel's own checks, or a result that agrees with torch's (NaN propagating as in torch).
Never a crash from deep inside torch, and never numbers where torch refuses.

    case = data.draw(bad_cases("cross_entropy"), label="case")
    check_bad_input("cross_entropy", backprop.cross_entropy, case)

Shared by tests/test_fuzz_bad_inputs.py and the pytest plugin. Needs hypothesis.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from hypothesis import strategies as st

import backprop
from backprop.testing.opinfo import OPS
from backprop.testing.oracle import random_dout
from backprop.testing.references import REFERENCES, batch_norm_composed
from backprop.testing.strategies import Case

DTYPES = [torch.float32, torch.float64, torch.int64, torch.int32, torch.bool]
# special values: non-finite, the largest finite, a subnormal, and a negative zero
SPECIALS = [torch.nan, torch.inf, -torch.inf, "huge", "-huge", "tiny", -0.0]


def _special_value(special: object, dtype: torch.dtype) -> object:
    info = torch.finfo(dtype)
    return {"huge": info.max, "-huge": -info.max, "tiny": info.tiny / 4}.get(special, special)


@st.composite
def tensors(draw: st.DrawFn, label: str) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3), label=f"{label} shape")
    dtype = draw(st.sampled_from(DTYPES), label=f"{label} dtype")
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if dtype.is_floating_point:
        t = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
        special = draw(st.sampled_from([None, *SPECIALS]), label=f"{label} special")
        if special is not None and t.numel():
            # anywhere: one drawn flat index, or a drawn mask over every element
            n = t.numel()
            where = draw(st.one_of(st.integers(0, n - 1).map(lambda i: [i]),
                                   st.lists(st.booleans(), min_size=n, max_size=n)
                                   .map(lambda m: [i for i, b in enumerate(m) if b])),
                         label=f"{label} special at")
            t.view(-1)[where] = _special_value(special, dtype)
        return t
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    return torch.randint(-3, 6, shape, generator=gen).to(dtype)


def arity(name: str) -> tuple[int, int, tuple[int, ...]]:
    """(fewest, most) positional arguments of the op's forward, and the positions of the optional
    tensors (default None) that may be left out: backward owes one gradient per position."""
    params = [p for p in inspect.signature(backprop.OPS[name].forward).parameters.values()
              if p.kind is p.POSITIONAL_OR_KEYWORD]
    required = sum(p.default is p.empty for p in params)
    return required, len(params), tuple(i for i, p in enumerate(params) if p.default is None)


@st.composite
def bad_cases(draw: st.DrawFn, name: str) -> Case:
    """Arguments of any shape and dtype, NaN and infinities included, and options out of range."""
    lo, hi, optional = arity(name)
    n = draw(st.integers(lo, hi), label="n args")
    args = tuple(draw(st.one_of(st.none(), tensors(f"arg{i}")) if i in optional else tensors(f"arg{i}"))
                 for i in range(n))
    return args, draw(OPS[name].bad_options, label="options")


def _torch_refuses(name: str, args: tuple, options: dict) -> bool:
    try:
        with torch.no_grad():
            REFERENCES[name](*args, **options)
    except Exception:
        return True
    return False


def check_bad_input(name: str, op: Any, case: Case) -> None:
    """op refuses the case with a ValueError/TypeError that says something, or agrees with torch."""
    args, options = case
    try:
        out, cache = op.forward(*args, **options)
    except (ValueError, TypeError) as e:
        assert str(e), "an error must say what was wrong"
        return
    # op accepted the input: torch must too. The documented divergences (backprop/batch_norm.py):
    # a single row with correction=0, which torch refuses and we normalise to the bias; zero
    # channels with a weight or bias, where F.batch_norm fails with an IndexError from select();
    # an infinite weight, where F.batch_norm folds the affine into x * (w rstd) + (b - mean w rstd)
    # and gives inf - inf = nan. In the last two ours follows the formula, as torch's composed ops do.
    # A column whose sum of squared deviations overflows x's dtype (values near its max): torch's
    # CPU kernel accumulates the statistics in float64, ours in x's dtype (float32 for 16-bit), and
    # gives nan there (docs/divergences.md)
    single_row_bn = name == "batch_norm" and args[0].shape[0] == 1
    overflow_bn = False
    if name == "batch_norm" and args[0].shape[0] > 0:
        x64 = args[0].double()
        overflow_bn = bool((((x64 - x64.mean(0)) ** 2).sum(0) > torch.finfo(args[0].dtype).max).any())
    # an empty 1-D x is read as (0, 0): zero channels too
    zero_channel_bn = name == "batch_norm" and (args[0].ndim < 2 or args[0].shape[1] == 0)
    inf_weight_bn = (name == "batch_norm" and len(args) > 1 and args[1] is not None
                     and not args[1].isfinite().all())
    composed_bn = zero_channel_bn or inf_weight_bn
    assert single_row_bn or zero_channel_bn or not _torch_refuses(name, args, options), \
        f"{name}{options} accepted an input that torch refuses"
    if not (single_row_bn or overflow_bn):
        with torch.no_grad():
            expected = (batch_norm_composed if composed_bn else REFERENCES[name])(*args, **options)
        torch.testing.assert_close(out, expected, equal_nan=True, rtol=1e-5, atol=1e-5)
    dout = random_dout(out.shape, out.dtype, out.device, seed=0)
    grads = op.backward(dout, cache)
    assert isinstance(grads, tuple) and len(grads) == arity(name)[1]  # one per positional parameter
