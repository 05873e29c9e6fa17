"""Input validation shared by the kernels.

Every message names the argument, what was expected and what was received.
Wrong dtypes raise TypeError; wrong shapes, values and devices raise ValueError.
"""

from __future__ import annotations

import functools

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
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")


def all_in_range(t: torch.Tensor, low: int, high: int) -> bool:
    """Every entry of integer tensor t lies in [low, high): one aminmax pass, one device sync."""
    if t.numel() == 0:
        return True
    lo, hi = (int(v) for v in torch.aminmax(t))
    return low <= lo and hi < high


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


def dout(t: object, out_shape: tuple[int, ...], out_dtype: torch.dtype) -> torch.Tensor:
    t = floating("dout", t)
    if tuple(t.shape) != tuple(out_shape):
        raise ValueError(
            f"dout must have the shape of the forward output {tuple(out_shape)}, got {tuple(t.shape)}"
        )
    if t.dtype != out_dtype:
        raise TypeError(f"dout must have the dtype of the forward output ({out_dtype}), got {t.dtype}")
    return t


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
    Cheaper than @torch.no_grad() when the caller already disabled grad (a training loop)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper
