"""Input validation shared by the kernels.

Every message names the argument, what was expected and what was received.
Wrong types and dtypes raise TypeError (an option of the wrong Python type too: bool is not an int,
and a float option takes an int or a float but not a bool, a str or None); wrong shapes, values
and devices raise ValueError. A cache whose tensors were modified in place after forward raises
RuntimeError, as torch's own saved tensors do ("modified by an inplace operation").
"""

from __future__ import annotations

import functools
import math
import numbers

import torch

_INDEX_DTYPES = (torch.int64, torch.int32)


def tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def floating(name: str, t: object) -> torch.Tensor:
    t = tensor(name, t)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def index(name: str, t: object, dtypes: tuple[torch.dtype, ...] = _INDEX_DTYPES) -> torch.Tensor:
    t = tensor(name, t)
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must be an integer index tensor of dtype {want}, got dtype {t.dtype}")
    return t


def ndim(name: str, t: torch.Tensor, expected: int, legend: str) -> None:
    if t.ndim != expected:
        raise ValueError(
            f"{name} must be {expected}-D {legend}, got {t.ndim}-D with shape {tuple(t.shape)}"
        )


def shape(name: str, t: torch.Tensor, expected: tuple[int, ...], legend: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {tuple(expected)} {legend}, got {tuple(t.shape)}"
        )


def same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def same_dtype_as(name: str, t: object, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    """t is a tensor of ref's dtype (a TypeError naming both otherwise); returns t."""
    same_dtype(name, tensor(name, t), ref_name, ref)
    return t


def same_device(**tensors: torch.Tensor | None) -> None:
    devices = [t.device for t in tensors.values() if t is not None]
    if not devices or devices.count(devices[0]) == len(devices):  # the common case, without the message's dicts
        return
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")


def all_in_range(t: torch.Tensor, low: int, high: int) -> bool:
    """Every entry of integer tensor t lies in [low, high): t equals itself clamped into the range.
    One fused comparison and one device sync (torch.equal), two aten calls; an aminmax read back
    as two ints is three calls and two syncs."""
    return t.numel() == 0 or torch.equal(t, t.clamp(low, high - 1))


def in_range(name: str, t: torch.Tensor, low: int, high: int, allowed: str = "") -> None:
    """Every entry of integer tensor t lies in [low, high). ``allowed`` names an exception that
    the caller has already replaced by an in-range value (cross_entropy's ignore_index)."""
    if all_in_range(t, low, high):
        return
    bad = (t < low) | (t >= high)
    first = t[bad].reshape(-1)[0].item()
    where = tuple(torch.nonzero(bad)[0].tolist())
    extra = f" (or {allowed})" if allowed else ""
    raise ValueError(f"{name} must lie in [{low}, {high}){extra}, got {first} at index {where}")


def dout(
    t: object, out_shape: tuple[int, ...], out_dtype: torch.dtype, out_device: torch.device
) -> torch.Tensor:
    t = floating("dout", t)
    if tuple(t.shape) != tuple(out_shape):
        raise ValueError(
            f"dout must have the shape of the forward output {tuple(out_shape)}, got {tuple(t.shape)}"
        )
    if t.dtype != out_dtype:
        raise TypeError(f"dout must have the dtype of the forward output ({out_dtype}), got {t.dtype}")
    if t.device != out_device:
        raise ValueError(f"dout must be on the device of the forward output ({out_device}), got {t.device}")
    return t


# ----------------------------------------------------------------------------- options


def _typename(v: object) -> str:
    return type(v).__name__


def int_option(name: str, v: object) -> int:
    """An int option: a Python (or numpy) integer, not a bool, within int64 as torch's are."""
    # an exact int first: isinstance against the ABC costs more than the rest of the check
    if type(v) is not int and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
        raise TypeError(f"{name} must be an int, got {_typename(v)}")
    v = int(v)
    if not -(2**63) <= v < 2**63:
        raise ValueError(f"{name} must lie in the int64 range [-2**63, 2**63 - 1], got {v}")
    return v


def float_option(name: str, v: object) -> float:
    """A finite float option: an int or a float (numpy's too), not a bool, a str or None."""
    if type(v) is not float and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
        raise TypeError(f"{name} must be a float, got {_typename(v)}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v!r}")
    return v


def bool_option(name: str, v: object) -> bool:
    """A bool option: exactly True or False (a truthy string such as "no" is refused)."""
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {_typename(v)}")
    return v


def str_option(name: str, v: object, choices: tuple[str, ...]) -> str:
    if not isinstance(v, str):
        raise TypeError(f"{name} must be a str, one of {choices}, got {_typename(v)}")
    if v not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {v!r}")
    return v


# ----------------------------------------------------------------------------- caches


def cache(c: object, expected: type, op: str) -> None:
    """c is a Cache of this op (a TypeError naming cache otherwise): a tuple, None or another
    op's cache would fail deep in backward with an unpack or attribute error."""
    if type(c) is not expected:
        t = type(c)
        got = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
        want = f"{expected.__module__}.{expected.__qualname__}"
        raise TypeError(f"cache must be a {want} from {op}.forward, got {got}")


def versions(*tensors: torch.Tensor | None) -> tuple[int | None, ...]:
    """The version counters of the tensors a cache keeps (None for an absent one): host-side ints,
    no device sync. Every in-place op on a tensor (or on a view of its storage) bumps its counter."""
    return tuple(None if t is None else t._version for t in tensors)


def unmodified(c: tuple, names: tuple[str, ...]) -> None:
    """The cache's tensors named in ``names`` still hold what forward saw: their version counters
    equal those recorded in ``c.versions``, in the order of ``names``. The cache keeps the
    caller's tensors, not copies (no extra memory), so an in-place edit after forward (a scale,
    ``h += r``) would silently change the gradient; torch's saved tensors refuse it the same way.
    A cache built by hand has ``versions=()``: there is nothing to compare."""
    if not c.versions:
        return
    for name, before in zip(names, c.versions):
        t = getattr(c, name)
        if t is None and before is None:  # an optional tensor that forward did not get
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"cache.{name} must be a torch.Tensor, got {_typename(t)}")
        if t._version != before:
            raise RuntimeError(
                f"cache: {name} was modified in place after forward (version {before} -> {t._version}); "
                "backward would be silently wrong. Clone it before editing in place."
            )


def wrap_dim(name: str, dim: object, ndim_: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    rank = max(ndim_, 1)  # a 0-d tensor accepts dim 0 and -1, as in torch
    if not -rank <= dim < rank:
        raise ValueError(f"{name} must lie in [{-rank}, {rank - 1}] for a {ndim_}-D input, got {dim}")
    return dim % rank


def opmath(dtype: torch.dtype) -> torch.dtype:
    """The dtype reductions accumulate in: float32 for 16-bit floats, as torch's own kernels do."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """t in dtype; t itself when it already is (cheaper than a no-op .to), None stays None."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def no_autograd(fn):
    """Run fn with autograd off, so that inputs with requires_grad=True record no history.
    Nothing to do when the caller already disabled grad (a training loop); else the grad mode is
    switched directly, about 1.5 us a call cheaper than entering torch.no_grad() (what it does)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        torch._C._set_grad_enabled(False)
        try:
            return fn(*args, **kwargs)
        finally:
            torch._C._set_grad_enabled(True)

    return wrapper
