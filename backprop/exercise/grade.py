"""grade(globals()): every hand-derived gradient of the notebook against autograd, with a diagnosis."""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from backprop.exercise.diagnose import Context, diagnose, magnitude, max_abs, ulps
from backprop.exercise.forward import ATOMS, GRADS, PARAMS, PARENTS, autograd

# Why a correct gradient can differ from autograd's in the last bits (docs/grader.md, "Bit-exactness").
REASONS = {
    "dhpreact": "torch's tanh_backward computes dh * (1 - h*h) rounding 1 - h*h once (its CPU kernel fuses "
                "the multiply-subtract); 1 - h**2 rounds h**2 first, and the subtraction magnifies that "
                "rounding where |h| is near 1; dh * torch.addcmul(torch.ones_like(h), h, h, value=-1) matches "
                "tanh_backward bit for bit",
    "dlogits": "a fused (softmax - one_hot) / n (exercise 2) rounds differently from autograd's chain "
               "through the atoms",
    "dhprebn": "a fused batch-norm backward (exercise 3) rounds differently from autograd's chain "
               "through the atoms",
}


@dataclass
class Row:
    """One graded gradient. ``exact``/``approx``/``maxdiff`` are the notebook's cmp columns: the
    learner's tensor against torch autograd in the same dtype, broadcasting as cmp does (None where
    cmp would raise)."""

    name: str
    verdict: str                # "exact", "ok", "wrong" or "missing"
    diagnosis: str = ""
    exact: bool | None = None
    approx: bool | None = None
    maxdiff: float | None = None


@dataclass
class GradeResult:
    rows: list[Row]
    dtype: torch.dtype
    n: int
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> Row:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    @property
    def missing(self) -> list[str]:
        return [r.name for r in self.rows if r.verdict == "missing"]

    @property
    def wrong(self) -> list[str]:
        return [r.name for r in self.rows if r.verdict == "wrong"]

    @property
    def passed(self) -> bool:
        """No done gradient is wrong (gradients not done yet don't count)."""
        return not self.wrong

    def __str__(self) -> str:
        return format_table(self.rows, self.dtype, f"n={self.n}", self.notes)


def format_table(rows: list[Row], dtype: torch.dtype, what: str, notes: list[str] = ()) -> str:
    kind = str(dtype).removeprefix("torch.")
    lines = [f"verdict: against float64 autograd ({what}, docs/grader.md); exact/approximate/maxdiff: "
             f"the notebook's cmp against torch autograd in {kind}",
             f"{'verdict':7s} | {'gradient':15s} | exact | approximate | {'maxdiff':9s} | diagnosis"]
    show = {None: "-", True: "True", False: "False"}
    for r in rows:
        if r.verdict == "missing":
            continue
        md = "-" if r.maxdiff is None else f"{r.maxdiff:.3g}"
        verdict = "WRONG" if r.verdict == "wrong" else r.verdict
        lines.append(f"{verdict:7s} | {r.name:15s} | {show[r.exact]:5s} | {show[r.approx]:11s} | {md:9s} | "
                     f"{r.diagnosis}".rstrip())
    missing = [r.name for r in rows if r.verdict == "missing"]
    if missing:
        lines.append("not done yet: " + ", ".join(missing))
    counts = {v: sum(r.verdict == v for r in rows) for v in ("exact", "ok", "wrong")}
    lines.append(f"{len(rows) - len(missing)} of {len(rows)} done: {counts['exact']} exact, {counts['ok']} ok, "
                 f"{counts['wrong']} wrong")
    return "\n".join([*lines, *notes])


def _cmp_columns(g: Tensor, same: Tensor) -> tuple[bool | None, bool | None, float | None]:
    out: list = []
    for f in (lambda: torch.all(g == same).item(), lambda: torch.allclose(g, same),
              lambda: (g - same).abs().max().item()):
        try:
            out.append(f())
        except (RuntimeError, TypeError):
            out.append(None)
    return out[0], out[1], out[2]


def judge(g: object, c: Context) -> str:
    """The verdict of the acceptance rule (docs/grader.md); fills ``c.err`` and ``c.allowed``."""
    if (not isinstance(g, Tensor) or g.layout != torch.strided or g.device != c.same.device
            or not g.is_floating_point() or g.shape != c.ref.shape):
        return "wrong"
    if g.dtype == c.same.dtype and torch.equal(g, c.same):
        return "exact"
    g64 = g.detach().double()
    c.err = max_abs(g64 - c.ref)
    if c.same.dtype == torch.float64:
        c.allowed = 1e-7 + 1e-7 * max_abs(c.ref)
        ok = torch.allclose(g64, c.ref, rtol=1e-7, atol=1e-7)
    else:
        c.allowed = 2 * c.err_same + 4 * c.eps * c.scale
        ok = c.err <= c.allowed  # False for nan
    return "ok" if ok else "wrong"


def _upstream(name: str, verdicts: dict[str, str], want: str) -> str | None:
    """The nearest upstream gradient with verdict ``want``, looking through ones not done yet."""
    todo = list(PARENTS.get(name, ()))
    while todo:
        p = todo.pop(0)
        v = verdicts.get(p, "missing")
        if v == want:
            return p
        if v == "missing":
            todo += PARENTS.get(p, ())
    return None


def grade_tensors(learner: Mapping[str, object], params: Mapping[str, Tensor], Xb: Tensor, Yb: Tensor,
                  names: tuple[str, ...] = GRADS) -> list[Row]:
    """Rows for ``names``; a name absent from ``learner`` is "missing". Reads, never writes, its inputs."""
    dtype = params["C"].dtype
    _, same = autograd(params, Xb, Yb, dtype)
    atoms, refs = autograd(params, Xb, Yb, torch.float64)
    eps = torch.finfo(dtype).eps
    rows, verdicts = [], {}
    for name in names:
        if name not in learner:
            rows.append(Row(name, "missing"))
            continue
        g = learner[name]
        err_same = max_abs(same[name].double() - refs[name])
        c = Context(name, refs[name], same[name], refs, atoms, Yb, eps, err_same)
        c.scale = magnitude(c)
        verdict = verdicts[name] = judge(g, c)
        row = Row(name, verdict)
        if isinstance(g, Tensor):
            row.exact, row.approx, row.maxdiff = _cmp_columns(g.detach(), same[name])
        if verdict == "wrong":
            row.diagnosis = diagnose(g, c)
            up = _upstream(name, verdicts, "wrong")
            if up:
                row.diagnosis += f"; downstream of wrong {up}: fix that first"
        elif verdict == "ok":
            row.diagnosis = _not_exact(g, c, _upstream(name, verdicts, "ok"))
        rows.append(row)
    return rows


def _not_exact(g: Tensor, c: Context, up: str | None) -> str:
    if g.dtype != c.same.dtype:
        return f"dtype {g.dtype}, autograd's is {c.same.dtype}"
    u = ulps(g.detach(), c.same)
    top, of = max_abs(c.same), "its largest entry"
    if c.scale > 2 * top:  # a sum that cancels (db1 is 0 in exact arithmetic): its terms set its rounding
        top, of = c.scale, "its largest sum of |terms|"
    ulp_top = c.eps * 2.0 ** math.floor(math.log2(top)) if top else 1.0  # one ulp of the largest entry
    scaled = max_abs(g.detach().double() - c.same.double()) / ulp_top
    why = (f"carries the rounding of {up} upstream" if up else
           REASONS.get(c.name, "a different order of rounding than autograd's kernels"))
    # elementwise ulp only where the entries are the scale: at a cancelling sum's entries (rounding noise
    # around 0) it counts in ulp of that noise, billions for a correct db1
    elementwise = "" if of != "its largest entry" else f" ({u.max().item():.0f} ulp elementwise)"
    return (f"not bit-exact: {int((u > 0).sum())} of {u.numel()} entries differ from autograd, by at most "
            f"{scaled:.3g} ulp of {of}{elementwise}; {why}")


def _tensor(ns: Mapping[str, object], name: str) -> Tensor:
    if name not in ns:
        raise ValueError(f"grade(namespace): no `{name}` in it; it needs the parameters {', '.join(PARAMS)} "
                         f"and the batch Xb, Yb under the notebook's names")
    t = ns[name]
    if not isinstance(t, Tensor):
        raise TypeError(f"grade(namespace): `{name}` is a {type(t).__name__}, not a torch.Tensor")
    return t.detach()


def _check_forward(ns: Mapping[str, object], atoms: dict[str, Tensor]) -> None:
    """The learner's gradients come from the learner's atoms: those must be this forward's."""
    for name in ATOMS:
        t = ns.get(name)
        if not isinstance(t, Tensor):
            continue
        a = atoms[name]
        if t.shape != a.shape or not torch.allclose(t.detach().to(a.dtype), a, rtol=1e-4, atol=1e-6):
            if _changed_in_place(t):
                raise ValueError(f"grade(namespace): `{name}` was changed in place after the forward pass (an "
                                 f"in-place op on it or on a tensor sharing its memory, such as "
                                 f"{name}.detach(); copy it with .clone() first); re-run the forward cell")
            raise ValueError(f"grade(namespace): `{name}` differs from the forward pass recomputed from the "
                             f"parameters and Xb, Yb; re-run the forward cell (did a training step change "
                             f"the parameters after it?)")


def _misnamed(namespace: Mapping[str, object], missing: list[str]) -> list[str]:
    """A tensor named like a gradient not done yet (dbnmean for dbnmeani) is probably that gradient."""
    others = [k for k, v in namespace.items() if isinstance(v, Tensor) and k.startswith("d") and k not in GRADS]
    notes = []
    for name in missing:
        close = difflib.get_close_matches(name, others, n=1, cutoff=0.8)
        if close:
            notes.append(f"{name} is not done yet, but {close[0]} is defined: is it {name} under another name?")
    return notes


def _changed_in_place(t: Tensor) -> bool:
    """Whether an in-place op ran on ``t`` (or on a tensor sharing its version counter, as .detach() does)."""
    try:
        return t._version > 0
    except RuntimeError:  # inference tensors keep no version counter
        return False


def grade(namespace: Mapping[str, object], *, quiet: bool = False) -> GradeResult:
    """Grade the notebook's hand-derived gradients found in ``namespace`` (pass ``globals()``).

    Prints the table unless ``quiet``; returns the rows either way.
    """
    if not isinstance(namespace, Mapping):
        raise TypeError(f"grade(namespace): expected a mapping such as globals(), "
                        f"got {type(namespace).__name__}")
    params = {k: _tensor(namespace, k) for k in PARAMS}
    Xb, Yb = _tensor(namespace, "Xb"), _tensor(namespace, "Yb")
    dtypes = {p.dtype for p in params.values()}
    if len(dtypes) != 1 or not params["C"].is_floating_point():
        raise TypeError(f"grade(namespace): the parameters must share one floating dtype, "
                        f"got {sorted(map(str, dtypes))}")
    if Xb.dtype not in (torch.int64, torch.int32) or Yb.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"grade(namespace): Xb and Yb must be integer tensors, got {Xb.dtype} and {Yb.dtype}")
    if Xb.dim() != 2 or Yb.shape != (Xb.shape[0],):
        raise ValueError(f"grade(namespace): Xb must be (n, block_size) and Yb (n,), got {list(Xb.shape)} and "
                         f"{list(Yb.shape)}")
    n = Xb.shape[0]
    if "n" in namespace and namespace["n"] != n:
        raise ValueError(f"grade(namespace): n is {namespace['n']!r} but Xb has {n} rows")
    try:
        atoms, _ = autograd(params, Xb, Yb, params["C"].dtype)
    except (RuntimeError, IndexError) as e:
        raise ValueError(f"grade(namespace): the parameters and batch don't fit the notebook's forward: "
                         f"{e}") from e
    _check_forward(namespace, atoms)
    result = GradeResult(grade_tensors(namespace, params, Xb, Yb), params["C"].dtype, n)
    result.notes += _misnamed(namespace, result.missing)
    if not quiet:
        print(result)
    return result
