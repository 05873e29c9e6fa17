"""grade_training: exercise 4, a short SGD run with the learner's gradients against one with autograd's."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from backprop.exercise.diagnose import Context, max_abs
from backprop.exercise.forward import PARAMS, autograd, init_params
from backprop.exercise.grade import Row, _cmp_columns, format_table, grade_tensors, judge

GradsFn = Callable[[dict[str, Tensor], Tensor, Tensor], "Mapping[str, Tensor] | Sequence[Tensor]"]


@dataclass
class TrainingResult:
    """``rows`` grade each parameter after ``steps`` SGD steps; if a gradient failed the acceptance rule
    first, training stopped at that step (``wrong_step``) and ``rows`` grade that step's gradients."""

    rows: list[Row]
    steps: int
    dtype: torch.dtype
    wrong_step: int | None = None

    @property
    def passed(self) -> bool:
        return self.wrong_step is None and all(r.verdict in ("ok", "exact") for r in self.rows)

    def __str__(self) -> str:
        if self.wrong_step is not None:
            what = f"the gradients at step {self.wrong_step}, where training stopped"
        else:
            what = f"parameters after {self.steps} SGD steps"
        return format_table(self.rows, self.dtype, what)


def _grads(grads_fn: GradsFn, params: dict[str, Tensor], Xb: Tensor, Yb: Tensor) -> dict[str, object]:
    # The learner gets copies, so nothing it does in place can reach the three trajectories.
    out = grads_fn({k: v.clone() for k, v in params.items()}, Xb.clone(), Yb.clone())
    if isinstance(out, Mapping):
        absent = [k for k in PARAMS if k not in out]
        if absent:
            raise ValueError(f"grade_training(grads_fn): its result has no gradient for {', '.join(absent)}")
        return {"d" + k: out[k] for k in PARAMS}
    if isinstance(out, Sequence) and len(out) == len(PARAMS):
        return {"d" + k: g for k, g in zip(PARAMS, out)}
    raise TypeError(f"grade_training(grads_fn): it must return a dict {{'C': dC, ...}} or the list "
                    f"[dC, dW1, db1, dW2, db2, dbngain, dbnbias], got {type(out).__name__}")


def _sgd(params: dict[str, Tensor], grads: Mapping[str, object], lr: float) -> dict[str, Tensor]:
    # In the parameters' dtype, as the notebook's p.data += -lr * grad keeps it for a float64 grad.
    return {k: (p - lr * grads["d" + k]).to(p.dtype) for k, p in params.items()}


def _batches(data: tuple[Tensor, Tensor] | None, steps: int, n: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed + 1)
    if data is None:
        return [(torch.randint(0, 27, (n, 3), generator=g), torch.randint(0, 27, (n,), generator=g))
                for _ in range(steps)]
    X, Y = data
    if not isinstance(X, Tensor) or not isinstance(Y, Tensor) or X.dim() != 2 or Y.shape != (X.shape[0],):
        raise ValueError("grade_training(data): expected (X, Y) tensors shaped (N, block_size) and (N,)")
    out = []
    for _ in range(steps):
        ix = torch.randint(0, X.shape[0], (n,), generator=g)
        out.append((X[ix], Y[ix]))
    return out


def grade_training(grads_fn: GradsFn, *, steps: int = 20, lr: float = 0.1, n: int = 32, seed: int = 2147483647,
                   dtype: torch.dtype = torch.float32, data: tuple[Tensor, Tensor] | None = None,
                   params: Mapping[str, Tensor] | None = None, quiet: bool = False) -> TrainingResult:
    """Train ``steps`` SGD steps with ``grads_fn(params, Xb, Yb)`` and with autograd, from the same
    initialisation and batches, and grade the parameters they end at.

    ``grads_fn`` gets a dict of the parameters ``C, W1, b1, W2, b2, bngain, bnbias`` (copies) and a batch,
    and returns their gradients as a dict with those keys or as a list in that order. ``data`` is the
    (X, Y) to draw batches of ``n`` from (random contexts over 27 characters if None); ``params``
    replaces the notebook's seeded initialisation. Prints the table unless ``quiet``.
    """
    if not callable(grads_fn):
        raise TypeError(f"grade_training(grads_fn): expected a function, got {type(grads_fn).__name__}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"grade_training(steps): expected a positive int, got {steps!r}")
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"grade_training(n): expected an int >= 2 (batch norm's 1/(n-1)), got {n!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"grade_training(dtype): expected a floating torch.dtype, got {dtype!r}")
    start = init_params(seed) if params is None else {k: params[k].detach() for k in PARAMS}
    learner = {k: v.to(dtype).clone() for k, v in start.items()}
    same, ref = dict(learner), {k: v.double() for k, v in learner.items()}
    with torch.no_grad():
        for step, (Xb, Yb) in enumerate(_batches(data, steps, n, seed)):
            grads = _grads(grads_fn, learner, Xb, Yb)
            rows = grade_tensors(grads, learner, Xb, Yb, tuple("d" + k for k in PARAMS))
            if any(r.verdict == "wrong" for r in rows):
                return _done(TrainingResult(rows, steps, dtype, wrong_step=step), quiet)
            learner = _sgd(learner, grads, lr)
            same = _sgd(same, autograd(same, Xb, Yb, dtype)[1], lr)
            ref = _sgd(ref, autograd(ref, Xb, Yb, torch.float64)[1], lr)
    rows = [_final_row(k, learner[k], same[k], ref[k]) for k in PARAMS]
    return _done(TrainingResult(rows, steps, dtype), quiet)


def _done(result: TrainingResult, quiet: bool) -> TrainingResult:
    if not quiet:
        print(result)
    return result


def _final_row(name: str, got: Tensor, same: Tensor, ref: Tensor) -> Row:
    err_same = max_abs(same.double() - ref)
    c = Context(name, ref, same, {}, {}, torch.zeros(0), torch.finfo(same.dtype).eps, err_same, max_abs(ref))
    verdict = judge(got, c)
    row = Row(name, verdict)
    row.exact, row.approx, row.maxdiff = _cmp_columns(got, same)
    if verdict == "wrong":
        row.diagnosis = f"max error {c.err:.3g} against float64 training, allowed {c.allowed:.3g}"
    return row
