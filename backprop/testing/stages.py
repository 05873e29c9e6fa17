"""The drop-in checks that ``check_case`` runs after the oracle (backprop.testing.suite), each a
stage of its own name in ``CheckFailure.stage``:

    jvp           op.jvp against torch.func.jvp of the twin, in the case's dtype and in float64,
                  under the acceptance rule (compare.py); the floor from |J| |t|, the terms' size,
                  or OpInfo.magnitude's term sizes times |t| where larger (J itself cancels)
    second-order  a double backward (create_graph=True) through the autograd adapter and, where
                  the op has one, through its custom op, against autograd's double backward of the
                  twin, in float64: the first derivative, the derivative of <grads, v> for the
                  inputs and for dout
    vmap          per-sample gradients, vmap(grad(...)) through the adapter over a batch of two,
                  against the twin's gradients sample by sample (float64); an error raised under
                  vmap only (the same call runs unbatched) is this stage's failure
    opcheck       torch.library.opcheck of the op's custom op (schema, autograd registration,
                  fake tensors, AOT dispatch with dynamic shapes): seconds a call, so opt-in

A stage runs where it applies (``applicable``): jvp needs ``op.jvp``; second-order and vmap the
adapter's contract (``forward_math``, ``backward_math``, ``Args``); opcheck a custom op (``op`` is
``backprop.<name>``, whose custom op is ``torch.ops.backprop.<name>``, or carries ``custom_op``, a
function that returns one). ``backprop.compiled``'s ops and a user's bare forward/backward get the
oracle's checks alone.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.func import grad, jacrev, jvp, vmap
from torch.testing._internal.optests.generate_tests import OpCheckError

import backprop
from backprop.autograd import apply
from backprop.testing.compare import Report, compare
from backprop.testing.opinfo import OPS
from backprop.testing.oracle import CheckFailure, _name, _positional, random_dout

STAGES = ("jvp", "second-order", "vmap", "opcheck")
DEFAULT_CHECKS = ("jvp", "second-order", "vmap")  # opcheck compiles: a few cases (tests/test_dropin.py)
TANGENT_SEED_OFFSET = 0x7A46E  # tangents and second-order directions on streams of their own


def _float(a: Any) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def custom_op(name: str, op: Any) -> Any:
    """op's custom op, or None: torch.ops.backprop.<name> for backprop.<name> itself."""
    if hasattr(op, "custom_op"):
        return op.custom_op()
    if op is backprop.OPS.get(name):
        importlib.import_module("backprop.library")  # registers torch.ops.backprop.*
        return getattr(torch.ops.backprop, name)
    return None


def applicable(name: str, op: Any) -> set[str]:
    """The stages that apply to op (see the module's docstring)."""
    found = set()
    if callable(getattr(op, "jvp", None)):
        found.add("jvp")
    if all(hasattr(op, a) for a in ("forward_math", "backward_math", "Args", "Cache")):
        found |= {"second-order", "vmap"}
    if hasattr(op, "custom_op") or op is backprop.OPS.get(name):
        found.add("opcheck")
    return found


def run(name: str, op: Any, reference: Callable, case: tuple, checks: Iterable[str], seed: int = 0) -> Report:
    """The stages of ``checks`` that apply to op, in STAGES order; raises CheckFailure."""
    checks = set(checks)
    unknown = checks - set(STAGES)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}; the stages are {STAGES}")
    report = Report()
    todo = checks & applicable(name, op)
    for stage, check in (("jvp", check_jvp), ("second-order", check_second_order), ("vmap", check_vmap)):
        if stage in todo:
            report.extend(check(name, op, reference, case, seed))
    if "opcheck" in todo:
        check_opcheck(name, op, case)
    return report


def _directions(args: list, seed: int) -> list:
    """A seeded random direction for each float argument, None for the others."""
    gen = torch.Generator().manual_seed(seed + TANGENT_SEED_OFFSET)
    return [torch.randn(a.shape, generator=gen, dtype=torch.float64).to(a.dtype).to(a.device)
            if _float(a) else None for a in args]


def _of_floats(fn: Callable, args: list, options: dict) -> Callable:
    """fn(*args, **options) as a function of the float arguments alone."""
    slots = [k for k, a in enumerate(args) if _float(a)]

    def f(*floats: torch.Tensor) -> torch.Tensor:
        full = list(args)
        for k, v in zip(slots, floats):
            full[k] = v
        return fn(*full, **options)

    return f


def _upcast(args: list, options: dict) -> tuple[list, dict]:
    up = lambda a: a.double() if _float(a) else a  # noqa: E731
    return [up(a) for a in args], {k: up(v) for k, v in options.items()}


def _term_size(magnitude: Callable, names: list, args64: list, options64: dict, ts64: list,
               out: torch.Tensor) -> torch.Tensor:
    """Per output entry k: sum_i <m_i(e_k), |t_i|>, m_i the size of the terms the gradient's formula
    sums into d<arg i> at dout = e_k (OpInfo.magnitude, the gradient stage's floor). |J| |t| misses
    a cancellation inside J itself (cross_entropy: softmax - q at label_smoothing=1 on near-uniform
    logits), which rounds at the size of these terms in any float32 formula, torch's included."""
    floats = [n for n, a in zip(names, args64) if _float(a)]
    sizes = torch.zeros(out.numel(), dtype=torch.float64)
    for k in range(out.numel()):
        dout = torch.zeros(out.numel(), dtype=torch.float64, device=out.device)
        dout[k] = 1
        terms = magnitude(*args64, dout=dout.reshape(out.shape), **options64)
        sizes[k] = sum(float((terms[f"d{n}"].abs() * t.abs()).sum()) for n, t in zip(floats, ts64)
                       if f"d{n}" in terms)
    return sizes.reshape(out.shape).to(out.device)


def _abs_jacobian_times(f: Callable, primals: list, vecs: list) -> torch.Tensor:
    """|J| |v| in float64 (J of f at primals, v one vector per primal): the size of the terms
    summed into each entry of J v, which is what rounding scales with (compare.py's floor)."""
    out = f(*primals)
    if out.numel() == 0:
        return torch.zeros_like(out)
    try:
        jac = jacrev(f, argnums=tuple(range(len(primals))))(*primals)
    except RuntimeError:  # a twin without a batching rule for its backward: one row at a time
        jac = torch.autograd.functional.jacobian(f, tuple(primals))  # a tuple: primals is one
    total = torch.zeros(out.numel(), dtype=torch.float64, device=out.device)
    for J, v in zip(jac, vecs):
        total += J.abs().reshape(out.numel(), v.numel()).nan_to_num(posinf=0.0) @ v.abs().reshape(-1)
    return total.reshape(out.shape)


def check_jvp(name: str, op: Any, reference: Callable, case: tuple, seed: int = 0) -> Report:
    names, args = _positional(op, case[0])
    options = case[1]
    tangents = _directions(args, seed)
    _, cache = op.forward(*args, **options)
    t_out = op.jvp(tuple(tangents), cache)
    floats = [a for a in args if _float(a)]
    ts = [t for t in tangents if t is not None]
    theirs = jvp(_of_floats(reference, args, options), tuple(floats), tuple(ts))[1]
    if not isinstance(t_out, torch.Tensor) or (t_out.shape, t_out.dtype) != (theirs.shape, theirs.dtype):
        got = f"{tuple(t_out.shape)}, {t_out.dtype}" if isinstance(t_out, torch.Tensor) else repr(t_out)
        raise CheckFailure("jvp", f"{_name(op)}.jvp returned {got}; torch.func.jvp of the twin gives "
                                  f"{tuple(theirs.shape)}, {theirs.dtype}")
    args64, options64 = _upcast(args, options)
    f64 = _of_floats(reference, args64, options64)
    floats64, ts64 = [a.double() for a in floats], [t.double() for t in ts]
    ref = jvp(f64, tuple(floats64), tuple(ts64))[1]
    # the floor is for lower precisions; float64 is held to torch.testing's tolerances
    magnitude = None
    if t_out.dtype != torch.float64:
        magnitude = _abs_jacobian_times(f64, floats64, ts64)
        terms = OPS[name].magnitude
        if terms is not None:  # the formula cancels inside J: its terms' size instead
            magnitude = torch.maximum(magnitude, _term_size(terms, names, args64, options64, ts64, ref))
    report = Report([compare("jvp", t_out, theirs, ref, magnitude)])
    if not report.passed:
        raise CheckFailure("jvp", f"{_name(op)}.jvp disagrees with torch.func.jvp of the twin", report)
    return report


def _second_order(fn: Callable, floats: list, dout: torch.Tensor, v: list) -> list:
    """The first derivative under dout, then the derivative of <grads, v> for each float input
    and for dout (a Hessian-vector product and a Jacobian-vector product): what a double
    backward computes. Zeros where there is no path."""
    leaves = [a.detach().clone().requires_grad_() for a in floats]
    d = dout.detach().clone().requires_grad_()
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, d, create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(a) if g is None else g for a, g in zip(leaves, grads)]
    s = sum((g * w).sum() for g, w in zip(grads, v))
    wrt = [*leaves, d]
    second = (torch.autograd.grad(s, wrt, allow_unused=True) if s.requires_grad else [None] * len(wrt))
    return [g.detach() for g in grads] + [torch.zeros_like(w) if h is None else h for w, h in zip(wrt, second)]


def check_second_order(name: str, op: Any, reference: Callable, case: tuple, seed: int = 0) -> Report:
    case = OPS[name].second_order_inputs(case)
    names, args = _positional(op, case[0])
    args, options = _upcast(args, case[1])
    floats = [a for a in args if _float(a)]
    out = reference(*args, **options)
    if out.numel() == 0 or all(a.numel() == 0 for a in floats):
        # nothing to differentiate twice: the gradients are zero or empty. (logsumexp's d/ddout
        # would be 0 * inf = nan from dout / sumexp over an empty reduction, the twin's 0; torch's
        # double backward of F.embedding with empty indices raises)
        return Report()
    float_names = [n for n, a in zip(names, args) if _float(a)]
    labels = ([f"d{n}" for n in float_names] + [f"d(<grads, v>)/d{n}" for n in float_names]
              + ["d(<grads, v>)/ddout"])
    dout = random_dout(out.shape, torch.float64, out.device, seed)
    v = [t for t in _directions(args, seed + 1) if t is not None]
    want = _second_order(_of_floats(reference, args, options), floats, dout, v)
    paths = {"adapter": lambda *a, **o: apply(op, *a, **o)}
    custom = custom_op(name, op)
    if custom is not None:
        paths["custom op"] = custom
    report = Report()
    for path, fn in paths.items():
        got = _second_order(_of_floats(fn, args, options), floats, dout, v)
        report.extend(compare(f"{path} {label}", g, w, w) for label, g, w in zip(labels, got, want))
    if not report.passed:
        raise CheckFailure("second-order", f"{_name(op)}: a double backward disagrees with autograd's "
                                           "double backward of the twin", report)
    return report


def check_vmap(name: str, op: Any, reference: Callable, case: tuple, seed: int = 0) -> Report:
    names, args = _positional(op, case[0])
    args, options = _upcast(args, case[1])
    first = next((k for k, a in enumerate(args) if _float(a)), None)
    if first is None or args[first].numel() == 0:
        return Report()  # nothing to batch
    x = args[first]
    batch = torch.stack([x, x.reshape(-1).roll(1).reshape(x.shape)])  # two samples, the same values
    rest = [a for k, a in enumerate(args) if _float(a) and k != first]
    out = reference(*args, **options)
    dout = random_dout(out.shape, torch.float64, out.device, seed)

    def loss(fn: Callable) -> Callable:
        def f(x: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
            full = list(args)
            full[first] = x
            slots = iter(others)
            full = [next(slots) if _float(a) and k != first else a for k, a in enumerate(full)]
            return (fn(*full, **options) * dout).sum()

        return grad(f, argnums=tuple(range(1 + len(rest))))

    ours = loss(lambda *a, **o: apply(op, *a, **o))
    ours(batch[0], *rest)  # unbatched first: an error here is a crash, not this stage's catch
    try:
        got = vmap(ours, in_dims=(0, *[None] * len(rest)))(batch, *rest)
    except Exception as e:  # noqa: BLE001 (the point of the stage: whatever vmap refuses)
        raise CheckFailure("vmap", f"{_name(op)}: per-sample gradients under vmap raised "
                                   f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    float_names = [names[first]] + [n for k, (n, a) in enumerate(zip(names, args)) if _float(a) and k != first]
    report = Report()
    for s in range(batch.shape[0]):
        want = loss(reference)(batch[s], *rest)
        report.extend(compare(f"sample {s} d{n}", g[s], w, w) for n, g, w in zip(float_names, got, want))
    if not report.passed:
        raise CheckFailure("vmap", f"{_name(op)}: per-sample gradients under vmap disagree with the "
                                   "twin's, sample by sample", report)
    return report


def check_opcheck(name: str, op: Any, case: tuple) -> None:
    from backprop.library import opcheck

    args, options = case
    out, cache = op.forward(*args, **options)
    grads = op.backward(torch.ones_like(out), cache)
    if any(t.isnan().any() for t in (out, *grads) if isinstance(t, torch.Tensor)):
        # opcheck compares eager and AOT-traced results with assert_close, for which nan != nan
        # (cross_entropy's 'mean' over no kept row is nan, as torch's): nothing it can compare
        return
    args = [a.detach().clone().requires_grad_() if _float(a) else a for a in args]
    try:
        opcheck(custom_op(name, op), *args, **options)
    except OpCheckError as e:
        raise CheckFailure("opcheck", f"{_name(op)}: {str(e).splitlines()[0]}") from e
