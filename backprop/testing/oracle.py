"""One oracle for every kernel: ``check_against_autograd``, plus a finite-difference gradcheck."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch.autograd.gradcheck import GradcheckError

from backprop.autograd import apply
from backprop.testing.compare import Report, compare


class CheckFailure(AssertionError):
    """A failed check. ``stage`` says which check caught it: forward, gradient, contract, gradcheck."""

    def __init__(self, stage: str, message: str, report: Report | None = None) -> None:
        self.stage, self.report = stage, report
        table = f"\n{report}" if report is not None else ""
        super().__init__(f"[{stage}] {message}{table}")


def _name(op: Any) -> str:
    """op's name for messages: a module's or a SimpleNamespace's __name__, else its repr."""
    name = getattr(op, "__name__", None)
    return name if isinstance(name, str) else repr(op)


def _positional(op: ModuleType, args: tuple) -> tuple[list[str], list]:
    """Names of forward's positional parameters, and args completed with their defaults
    (an omitted optional tensor is None): backward owes one gradient to each of them."""
    params = [
        p for p in inspect.signature(op.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(args) > len(params):
        raise TypeError(f"{_name(op)}.forward takes {len(params)} positional arguments, got {len(args)}")
    rest = [p.default for p in params[len(args):]]
    if any(d is inspect.Parameter.empty for d in rest):
        missing = [p.name for p in params[len(args):] if p.default is inspect.Parameter.empty]
        raise TypeError(f"{_name(op)}.forward is missing positional arguments {missing}")
    return [p.name for p in params], [*args, *rest]


def _differentiable(a: Any) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def _run(reference: Callable, args: list, options: dict, cast: torch.dtype | None = None):
    """reference(*args) on fresh leaves (cast to float64 if asked): returns (out, leaves)."""
    leaves = [
        (a.detach().to(cast) if cast else a.detach().clone()).requires_grad_()
        if _differentiable(a) else a
        for a in args
    ]
    return reference(*leaves, **options), leaves


def _grads(out: torch.Tensor, leaves: list, dout: torch.Tensor) -> list:
    """Gradients of out against the float leaves under dout; None for the other arguments."""
    wrt = [x for x in leaves if _differentiable(x)]
    got = iter(torch.autograd.grad(out, wrt, dout.to(out.dtype), allow_unused=True))
    grads = []
    for x in leaves:
        g = next(got) if _differentiable(x) else None
        grads.append(torch.zeros_like(x) if g is None and _differentiable(x) else g)
    return grads


# dout's stream is offset from the seed: strategies draw inputs from seeded streams too, and a
# dout equal to an input's values (both shrunk to seed 0) makes dx of batch_norm pure cancellation.
# The offset makes that rarer, not impossible: hypothesis also draws integer constants it finds in
# the source, this one included, so an input can still share dout's values. A formula that can
# cancel names its terms' size instead (OpInfo.magnitude), so such a case is checked, not a flake.
DOUT_SEED_OFFSET = 0x5EED_D0E5


def random_dout(shape: torch.Size, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """A random upstream gradient: an all-ones dout cannot catch a backward that ignores it."""
    gen = torch.Generator().manual_seed(seed + DOUT_SEED_OFFSET)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(dtype).to(device)


def check_against_autograd(
    op: ModuleType,
    reference: Callable[..., torch.Tensor],
    *args: Any,
    seed: int = 0,
    dout: torch.Tensor | None = None,
    magnitude: Callable[..., dict[str, torch.Tensor]] | None = None,
    **options: Any,
) -> Report:
    """Check op.forward / op.backward against ``reference`` under autograd.

    Runs the reference in the inputs' dtype and in float64, runs the kernel, and checks the
    forward, every gradient (against a random upstream gradient) and the kernel contract:
    a tensor output of the reference's shape and dtype, a tuple with one gradient per positional
    argument, None for integer/absent inputs, no input or cache modified, forward and backward
    repeatable bit for bit, and no autograd history recorded, even for a ``dout`` that requires
    grad (a double-backward caller's: run the kernel under ``torch.no_grad()``). Returns the
    Report; raises CheckFailure (an AssertionError) whose message holds the table.

    The rounding floor scales with the size of the terms summed into each entry. By default
    that is the reference run on |inputs| and |dout|; ``magnitude(*args64, dout=dout64,
    **options)`` may return {"out": ..., "d<arg>": ...} where a formula cancels internally.
    """
    names, args = _positional(op, args)

    theirs_out, theirs_leaves = _run(reference, args, options)  # torch in the test dtype
    if dout is None:
        dout = random_dout(theirs_out.shape, theirs_out.dtype, theirs_out.device, seed)
    theirs_grads = _grads(theirs_out, theirs_leaves, dout)
    ref_out, ref_leaves = _run(reference, args, options, cast=torch.float64)
    ref_grads = _grads(ref_out, ref_leaves, dout.double())  # the same dout values, upcast exactly
    # magnitudes: the same in |inputs| and |dout|. For linear and embedding this is exactly the
    # |A||B| scale of each rounding error; for the others a like-sized stand-in. Only the floor uses it.
    abs_args = [a.abs() if _differentiable(a) else a for a in args]
    mag_out, mag_leaves = _run(reference, abs_args, options, cast=torch.float64)
    mag_grads = _grads(mag_out, mag_leaves, dout.double().abs())
    if magnitude is not None:
        given = magnitude(*[x.detach() if isinstance(x, torch.Tensor) else x for x in ref_leaves],
                          dout=dout.double(), **options)
        mag_out = given.get("out", mag_out)
        mag_grads = [given.get(f"d{n}", m) for n, m in zip(names, mag_grads)]

    snapshot = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    dout_before = dout.clone()
    out, cache = op.forward(*args, **options)
    if not isinstance(out, torch.Tensor):
        raise CheckFailure("forward",
                           f"{_name(op)}.forward must return (tensor, cache), got {type(out).__name__}")
    if (out.shape, out.dtype, out.device) != (theirs_out.shape, theirs_out.dtype, theirs_out.device):
        raise CheckFailure(
            "forward",
            f"{_name(op)}.forward returned shape {tuple(out.shape)}, {out.dtype}, {out.device}; the "
            f"reference returns {tuple(theirs_out.shape)}, {theirs_out.dtype}, {theirs_out.device}",
        )
    report = Report([compare("out", out, theirs_out.detach(), ref_out.detach(), mag_out.detach())])
    if not report.passed:
        raise CheckFailure("forward", f"{_name(op)}.forward disagrees with the reference", report)

    cache_items = _cache_items(cache)
    cache_before = [v.clone() if isinstance(v, torch.Tensor) else v for _, v in cache_items]
    grads = op.backward(dout, cache)
    if not isinstance(grads, tuple) or len(grads) != len(args):
        got = f"{type(grads).__name__} of length {len(grads)}" if hasattr(grads, "__len__") else repr(grads)
        raise CheckFailure(
            "contract", f"backward must return a tuple of {len(args)} gradients ({names}), got {got}"
        )
    for name, a, g in zip(names, args, grads):
        if not _differentiable(a):
            if g is not None:
                raise CheckFailure("contract", f"d{name} must be None for a non-float input, got a tensor")
        elif not isinstance(g, torch.Tensor):
            raise CheckFailure("contract", f"d{name} must be a tensor, got {type(g).__name__}")
        elif (g.shape, g.dtype, g.device) != (a.shape, a.dtype, a.device):
            raise CheckFailure(
                "contract",
                f"d{name} must match {name}: shape {tuple(a.shape)}, {a.dtype}, {a.device}; "
                f"got {tuple(g.shape)}, {g.dtype}, {g.device}",
            )
    _check_no_history(grads, names, "")
    for name, g, t, r, m in zip(names, grads, theirs_grads, ref_grads, mag_grads):
        if g is not None:
            report.append(compare(f"d{name}", g, t, r, m))
    if not report.passed:
        raise CheckFailure("gradient", f"{_name(op)}.backward disagrees with autograd", report)

    for name, a, s in zip(names, args, snapshot):
        if isinstance(a, torch.Tensor) and not _bitwise_equal(a.detach(), s.detach()):
            raise CheckFailure("contract", f"{name} was modified by forward or backward")
    if not _bitwise_equal(dout, dout_before):
        raise CheckFailure("contract", "dout was modified by backward")
    for (field, v), before in zip(cache_items, cache_before):
        if isinstance(v, torch.Tensor) and not _bitwise_equal(v, before):
            raise CheckFailure("contract", f"cache field {field} was modified by backward")
    # the second backward gets the same dout values, requiring grad as a double-backward caller's
    again = op.backward(dout.detach().clone().requires_grad_(), cache)
    if not isinstance(again, tuple) or len(again) != len(grads):
        got = f"{type(again).__name__} of length {len(again)}" if hasattr(again, "__len__") else repr(again)
        raise CheckFailure("contract", f"a second backward on the same cache returned a {got}, "
                                       f"the first a tuple of {len(grads)}")
    _check_no_history(again, names, " (dout requires grad)")
    for name, g, h in zip(names, grads, again):
        if (g is None) != (h is None) or (g is not None and not _bitwise_equal(g, h)):
            raise CheckFailure("contract", f"a second backward on the same cache changed d{name}")
    out_again, _ = op.forward(*args, **options)
    if not isinstance(out_again, torch.Tensor) or not _bitwise_equal(out, out_again):
        raise CheckFailure("forward", "a second forward on the same inputs changed out")
    return report


def _check_no_history(grads: tuple, names: list[str], when: str) -> None:
    """The contract: backward records no autograd history, so no gradient requires grad."""
    for name, g in zip(names, grads):
        if isinstance(g, torch.Tensor) and (g.requires_grad or g.grad_fn is not None):
            raise CheckFailure("contract", f"d{name} records autograd history{when}: backward must run "
                                           "without it (torch.no_grad())")


def _cache_items(cache: Any) -> list[tuple[str, Any]]:
    """(name, value) for each field of a NamedTuple, tuple or single-tensor cache."""
    if isinstance(cache, tuple):
        names = getattr(cache, "_fields", None) or [f"[{i}]" for i in range(len(cache))]
        return list(zip(names, cache))
    return [("cache", cache)]


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit: NaN equals NaN, -0.0 differs from 0.0."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        width = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        return torch.equal(a.contiguous().view(width), b.contiguous().view(width))
    return torch.equal(a, b)


def check_gradcheck(op: ModuleType, *args: Any, **options: Any) -> None:
    """Finite differences in float64 through the autograd adapter (independent of any formula)."""
    args = list(args)
    where = [i for i, a in enumerate(args) if _differentiable(a)]
    inputs = tuple(args[i].detach().double().requires_grad_() for i in where)

    def run(*xs: torch.Tensor) -> torch.Tensor:
        full = list(args)
        for i, x in zip(where, xs):
            full[i] = x
        return apply(op, *full, **options)

    try:
        torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
    except GradcheckError as e:
        raise CheckFailure("gradcheck", f"{_name(op)}: {e}") from None
