"""One-line diagnoses: why a learner's gradient differs from the true one.

Every check compares the learner's tensor with a candidate mistake built from the float64 reference
(the reference times n, transposed, summed over another dim, missing a branch...) and names the first
candidate that matches; a learner can derive each candidate by hand from the notebook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Context:
    """What a diagnosis may look at; every tensor is float64 unless named ``same``."""

    name: str
    ref: Tensor                 # float64 autograd's gradient
    same: Tensor                # autograd's gradient in the learner's dtype
    refs: dict[str, Tensor]     # every float64 reference gradient, by d-name
    atoms: dict[str, Tensor]    # every float64 forward atom, by name
    Yb: Tensor
    eps: float                  # unit roundoff of the learner's dtype
    err_same: float             # max |same - ref|: autograd's own rounding error
    scale: float = 0.0          # the magnitude the rule's rounding floor is relative to
    err: float = 0.0            # max |learner - ref|
    allowed: float = 0.0        # the acceptance rule's bound on err

    @property
    def n(self) -> int:
        return self.Yb.shape[0]


def max_abs(t: Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def near(g: Tensor, alt: Tensor, c: Context) -> bool:
    """Whether ``g`` is ``alt`` up to rounding, with room for a float32 learner's rounding."""
    if g.shape != alt.shape:
        return False
    tol = max(10 * c.err_same, 1e3 * c.eps * max_abs(alt), 1e-300)
    return max_abs(g - alt) <= tol


# Summed gradients: (the tensor the notebook sums, the dim it sums over), from float64 references.
SUMMANDS: dict[str, tuple[Callable[[Context], Tensor], int]] = {
    "dcounts_sum_inv": (lambda c: c.atoms["counts"] * c.refs["dprobs"], 1),
    "dlogit_maxes": (lambda c: -c.refs["dnorm_logits"], 1),
    "db2": (lambda c: c.refs["dlogits"], 0),
    "dbngain": (lambda c: c.atoms["bnraw"] * c.refs["dhpreact"], 0),
    "dbnbias": (lambda c: c.refs["dhpreact"], 0),
    "dbnvar_inv": (lambda c: c.atoms["bndiff"] * c.refs["dbnraw"], 0),
    "dbnmeani": (lambda c: -c.refs["dbndiff"], 0),
    "db1": (lambda c: c.refs["dhprebn"], 0),
}


def magnitude(c: Context) -> float:
    """max |ref|, or for a summed gradient its largest sum of |terms|: a sum is only accurate to
    eps * sum(|x|), and db1 sums to 0 in exact arithmetic (batch norm cancels b1)."""
    if c.name in SUMMANDS:
        make, dim = SUMMANDS[c.name]
        return max(max_abs(c.ref), max_abs(make(c).abs().sum(dim)))
    return max_abs(c.ref)


def _one_hot_max(c: Context) -> Tensor:
    logits = c.atoms["logits"]
    return torch.nn.functional.one_hot(logits.max(1).indices, logits.shape[1]).double()


# Gradients with two branches: the contribution through each atom that uses the forward tensor.
BRANCHES: dict[str, dict[str, Callable[[Context], Tensor]]] = {
    "dcounts": {"probs": lambda c: c.atoms["counts_sum_inv"] * c.refs["dprobs"],
                "counts_sum": lambda c: c.refs["dcounts_sum"].expand_as(c.ref)},
    "dlogits": {"norm_logits": lambda c: c.refs["dnorm_logits"],
                "logit_maxes": lambda c: _one_hot_max(c) * c.refs["dlogit_maxes"]},
    "dbndiff": {"bnraw": lambda c: c.atoms["bnvar_inv"] * c.refs["dbnraw"],
                "bndiff2": lambda c: 2 * c.atoms["bndiff"] * c.refs["dbndiff2"]},
    "dhprebn": {"bndiff": lambda c: c.refs["dbndiff"],
                "bnmeani": lambda c: (c.refs["dbnmeani"] / c.n).expand_as(c.ref)},
}


def factor_name(k: float, n: int) -> str:
    """Name a constant factor by the slip that usually produces it."""
    known = [
        (n, "n times too large: a missing 1/n (the mean over the batch)"),
        (1 / n, "n times too small: an extra 1/n"),
        ((n - 1) / n, "(n-1)/n times the gradient: 1/n where Bessel's 1/(n-1) belongs"),
        (n / (n - 1), "n/(n-1) times the gradient: Bessel's 1/(n-1) where 1/n belongs"),
        (2.0, "2 times too large: an extra factor 2"),
        (0.5, "half the gradient: a missing factor 2 (d(x**2) = 2x dx)"),
        (-2.0, "-2 times the gradient: the power rule's -1/2 is missing"),
        (-0.5, "-1/2 times the gradient: an extra power-rule -1/2"),
    ]
    for value, text in known:
        if abs(k - value) <= 1e-3 * abs(value):
            return text
    return f"off by a constant factor {k:.6g}"


def _sign(g: Tensor, c: Context) -> str | None:
    if max_abs(c.ref) > 0 and near(g, -c.ref, c):
        return "sign flipped: the gradient times -1"
    return None


def _transposed(g: Tensor, c: Context) -> str | None:
    r = c.ref
    if r.dim() == 2 and g.shape == r.shape[::-1] and near(g.T, r, c) and not near(r.T, r, c):
        return (f"transposed: shape {list(g.shape)} instead of {list(r.shape)}; swap the matmul's operands "
                f"and transpose them (x.T @ dout, not dout.T @ x)")
    return None


def _factor(g: Tensor, c: Context) -> str | None:
    rr = (c.ref * c.ref).sum().item()
    if rr == 0:
        return None
    k = (g * c.ref).sum().item() / rr
    if abs(k - 1) > 1e-6 and near(g, k * c.ref, c):
        return factor_name(k, c.n)
    return None


def _targets(g: Tensor, c: Context) -> str | None:
    r, n = c.ref, c.n
    if r.shape != c.atoms["logits"].shape:  # only (n, V) tensors have target entries
        return None
    mask = torch.zeros(r.shape, dtype=torch.bool)
    mask[range(n), c.Yb] = True
    if not near(g[~mask], r[~mask], c) or near(g[mask], r[mask], c):
        return None
    delta = (g - r)[mask]
    text = "wrong only at the target entries [range(n), Yb]"
    if max_abs(delta - delta.mean()) > 1e-3 * max_abs(delta):
        return text + f" (max error {max_abs(delta):.3g})"
    m = delta.mean().item() * n
    if abs(m - 1) < 1e-3:
        return text + ", each +1/n: the one-hot's -1 at the targets is missing (softmax - one_hot) / n"
    return text + f", each off by {delta.mean().item():+.4g} ({m:+.4g}/n)"


def _branch(g: Tensor, c: Context) -> str | None:
    for via, make in BRANCHES.get(c.name, {}).items():
        b = make(c)
        bb = (b * b).sum().item()
        if bb == 0 or near(b, torch.zeros_like(b), c):  # a branch that is zero in exact arithmetic
            continue
        k = 1 + ((g - c.ref) * b).sum().item() / bb
        if not near(g, c.ref + (k - 1) * b, c):
            continue
        if abs(k) < 1e-3:
            return (f"missing the branch through {via}: {c.name} is the sum of two chain-rule terms "
                    f"(add the second with +=)")
        if abs(k - 2) < 1e-3:
            return f"counts the branch through {via} twice"
        return f"the branch through {via} is wrong: {factor_name(k, c.n)}"
    return None


def _summed_wrong_dim(g: Tensor, c: Context) -> str | None:
    if c.name not in SUMMANDS:
        return None
    make, right = SUMMANDS[c.name]
    s = make(c)
    for dim in range(s.dim()):
        for keepdim in (True, False):
            if dim != right and near(g, s.sum(dim, keepdim=keepdim), c):
                return f"summed over dim {dim} instead of dim {right}: use .sum({right}, keepdim=True)"
    return None


def _shape(g: Tensor, c: Context) -> str:
    r = c.ref
    got, want = list(g.shape), list(r.shape)
    for check in (_transposed, _summed_wrong_dim):
        text = check(g, c)
        if text:
            return text
    if g.numel() != r.numel():
        return f"shape {got} instead of {want}"
    if near(g.reshape(r.shape), r, c):
        if [d for d in got if d != 1] == [d for d in want if d != 1]:
            return (f"shape {got} instead of {want}: right values, but a size-1 dim is lost "
                    f"(sum with keepdim=True); cmp hides this by broadcasting")
        return f"shape {got} instead of {want}: right values in the wrong shape (view it as {want})"
    return f"shape {got} instead of {want}, and the values differ too: {_values(g.reshape(r.shape), c)}"


def _near_miss(g: Tensor, c: Context) -> str | None:
    if near(g, c.ref, c):
        return (f"close, but outside the acceptance rule: max error {c.err:.3g} against float64, allowed "
                f"{c.allowed:.3g} (autograd's own error is {c.err_same:.3g}); a less accurate formula?")
    return None


def _values(g: Tensor, c: Context) -> str:
    for check in (_near_miss, _sign, _transposed, _factor, _targets, _branch):
        text = check(g, c)
        if text:
            return text
    diff = (g - c.ref).abs()
    i = tuple(int(j) for j in torch.unravel_index(diff.argmax(), diff.shape))
    return (f"wrong: max error {diff[i].item():.3g} at index {list(i)} "
            f"(got {g[i].item():.6g}, expected {c.ref[i].item():.6g})")


def diagnose(g: object, c: Context) -> str:
    """A one-line reason for a gradient that fails the acceptance rule."""
    if not isinstance(g, Tensor):
        return f"not a tensor: {type(g).__name__}"
    if g.layout != torch.strided:
        layout = str(g.layout).removeprefix("torch.")
        return f"a {layout} tensor: a gradient is dense, as autograd's (.to_dense())"
    if g.device != c.same.device:
        return f"on device {g.device}, the parameters on {c.same.device}"
    if not g.is_floating_point():
        return f"dtype {g.dtype}: a gradient is floating point (zeros_like of an integer tensor?)"
    coarse = ""
    if torch.finfo(g.dtype).eps > c.eps:
        coarse = f"dtype {g.dtype}, coarser than autograd's {c.same.dtype} (keep the gradient in it); "
    g = g.detach().double()
    if g.shape != c.ref.shape:
        return coarse + _shape(g, c)
    bad = ~torch.isfinite(g)
    if bad.any():
        i = [int(j) for j in torch.unravel_index(bad.flatten().nonzero()[0, 0], g.shape)]
        return coarse + f"not finite: {g[tuple(i)].item()} at index {i}"
    return coarse + _values(g, c)


def ulps(a: Tensor, b: Tensor) -> Tensor:
    """Units in the last place between same-dtype floats: how many representable numbers apart."""
    bits = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
            torch.bfloat16: torch.int16}[a.dtype]
    lowest = -(2 ** (torch.iinfo(bits).bits - 1))

    def ordered(t: Tensor) -> Tensor:
        i = t.contiguous().view(bits).long()
        return torch.where(i < 0, lowest - i, i)

    return (ordered(a).double() - ordered(b).double()).abs()
