"""The per-tensor comparison record: the grown-up form of the notebook's ``cmp``.

Each tensor (forward output or gradient) is compared three ways:
  ours  against torch in the same dtype  -> exact, approximate, max abs/rel diff, worst element
  ours  against a float64 reference      -> our error
  torch against the same float64 reference -> torch's error; error ratio = ours / torch's

Acceptance: float64 must be close to the float64 reference at torch.testing's float64
tolerances. Lower precisions must satisfy  our_error <= 2 * torch_error + floor, where floor is
a few units of rounding at the largest magnitude of the reference or of the terms summed to
make it (FlashAttention's test rule, with Higham's |A||B| scale for the floor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# torch.testing.assert_close defaults: (rtol, atol) per dtype
TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float16: (1e-3, 1e-5),
}
ERROR_RATIO = 2.0  # ours may be at most this many times torch's own error, plus the floor
FLOOR_ULPS = 4  # the rounding floor, in units of eps(dtype) at the largest magnitude


def _abs_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in float64, with matching NaNs and matching infinities counting as 0, others inf."""
    a, b = a.double(), b.double()
    same = (a == b) | (a.isnan() & b.isnan())
    err = (a - b).abs()
    return torch.where(same, 0.0, torch.where(err.isnan(), torch.inf, err))


def _worst(err: torch.Tensor) -> tuple[int, ...]:
    if err.numel() == 0:
        return ()
    flat = int(torch.argmax(err.reshape(-1)))
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape)) if err.ndim else ()


@dataclass(frozen=True)
class Record:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    exact: bool  # bit-identical to torch in the same dtype
    approximate: bool  # within the dtype's torch.testing tolerance of torch in the same dtype
    max_abs_diff: float  # against torch, same dtype
    max_rel_diff: float
    worst_index: tuple[int, ...]  # where our error against the float64 reference is largest
    ours: float  # our value at worst_index
    expected: float  # the float64 reference at worst_index
    our_error: float  # max |ours - float64 reference|
    torch_error: float  # max |torch - float64 reference|
    floor: float
    passed: bool

    @property
    def error_ratio(self) -> float:
        if self.our_error == 0:
            return 0.0
        return self.our_error / self.torch_error if self.torch_error > 0 else float("inf")


def compare(
    name: str, ours: torch.Tensor, theirs: torch.Tensor, reference: torch.Tensor,
    magnitude: torch.Tensor | None = None,
) -> Record:
    """Compare our tensor with torch's (same dtype) and with a float64 reference.

    ``magnitude`` (optional, float64) is the size of the terms that were summed to make each
    entry, e.g. |dout| @ |W| for dx = dout @ W. Rounding error scales with it, not with the
    result, which a cancelling sum can make arbitrarily small; the floor takes the larger."""
    if ours.shape != theirs.shape:
        raise AssertionError(f"{name}: shape {tuple(ours.shape)}, torch has {tuple(theirs.shape)}")
    if ours.dtype != theirs.dtype:
        raise AssertionError(f"{name}: dtype {ours.dtype}, torch has {theirs.dtype}")
    dtype = ours.dtype
    rtol, atol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    ours_c, theirs_c, ref = ours.detach().cpu(), theirs.detach().cpu(), reference.detach().cpu()

    diff = _abs_err(ours_c, theirs_c)
    scale = theirs_c.double().abs()
    rel = torch.where(diff == 0, 0.0, diff / scale)
    err_ours = _abs_err(ours_c, ref)
    err_torch = _abs_err(theirs_c, ref)
    our_error = float(err_ours.max()) if err_ours.numel() else 0.0
    torch_error = float(err_torch.max()) if err_torch.numel() else 0.0
    sizes = [ref.double().abs()]
    if magnitude is not None:
        sizes.append(magnitude.detach().cpu().double().abs())
    finite = torch.cat([t[t.isfinite()].reshape(-1) for t in sizes])
    magnitude = float(finite.max()) if finite.numel() else 0.0
    eps = torch.finfo(dtype).eps
    floor = FLOOR_ULPS * eps * magnitude + torch.finfo(dtype).tiny

    if dtype == torch.float64:
        passed = bool(((err_ours == 0) | (err_ours <= atol + rtol * ref.double().abs())).all())
    else:
        passed = our_error <= ERROR_RATIO * torch_error + floor
    worst = _worst(err_ours)
    return Record(
        name=name,
        dtype=dtype,
        shape=tuple(ours.shape),
        exact=bool(diff.max() == 0) if diff.numel() else True,
        approximate=bool(((diff == 0) | (diff <= atol + rtol * scale)).all()),
        max_abs_diff=float(diff.max()) if diff.numel() else 0.0,
        max_rel_diff=float(rel.max()) if rel.numel() else 0.0,
        worst_index=worst,
        ours=float(ours_c[worst]) if ours_c.numel() else float("nan"),
        expected=float(ref[worst]) if ref.numel() else float("nan"),
        our_error=our_error,
        torch_error=torch_error,
        floor=floor,
        passed=passed,
    )


class Report(list):
    """A list of Records that prints as a table, one row per tensor: the verdict first, then what
    it rests on (errors against the float64 reference), then, apart, ours against torch in the
    same dtype, which is information, not the acceptance rule."""

    COLUMNS = (
        "verdict", "tensor", "dtype", "shape", "our err", "torch err", "ratio", "floor",
        "worst at", "ours", "float64",
        "| vs torch, same dtype: bitwise", "allclose", "max abs diff", "max rel diff",
    )
    LEGEND = (
        f"verdict: our err <= {ERROR_RATIO:g} x torch err + floor (float64: within torch.testing's "
        "float64 tolerances of float64); err = max |. - float64 reference|.\n"
        "vs torch, same dtype: ours against torch in the test dtype (bitwise equal, torch.testing "
        "allclose, differences): for information only, not the verdict."
    )

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self)

    def rows(self) -> list[tuple[str, ...]]:
        def g(v: float) -> str:
            return f"{v:.3g}"

        return [
            (
                "ok" if r.passed else "FAIL", r.name, str(r.dtype).removeprefix("torch."),
                "x".join(map(str, r.shape)) or "()", g(r.our_error), g(r.torch_error),
                g(r.error_ratio), g(r.floor), str(list(r.worst_index)), g(r.ours), g(r.expected),
                f"| {r.exact}", str(r.approximate), g(r.max_abs_diff), g(r.max_rel_diff),
            )
            for r in self
        ]

    def __str__(self) -> str:
        table = [self.COLUMNS, *self.rows()]
        widths = [max(len(row[i]) for row in table) for i in range(len(self.COLUMNS))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join([self.LEGEND, *lines])
