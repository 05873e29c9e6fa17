"""One training step: the gradients, one update per optimizer, the optimizer's state, and the
checks that the unchecked step relies on.

A step is a function ``step(ix, lr) -> loss``: ix (B,) int64 rows of the training set, lr a 0-d
tensor of the parameters' dtype (a tensor, so that any schedule runs in a compiled step without a
rebuild). It gathers the batch, computes the gradients and updates the parameters and the
optimizer state in place. The eager steps here and the compiled step (aot.py) share this type, and
the manual ones share step_graph.

Adding an optimizer: one entry in OPTIMIZERS (its per-parameter buffers and its update).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from backprop import _check
from backprop.makemore import model
from backprop.makemore.data import BLOCK_SIZE
from backprop.makemore.model import PARAM_NAMES

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Tensors = list[torch.Tensor]
MOMENTUM = 0.9


@dataclass(frozen=True)
class Optimizer:
    about: str  # one line for --help
    buffers: tuple[str, ...]  # per-parameter state: one tensor like each parameter, zeros at the start
    # update(params, grads, state, lr): the lists in PARAM_NAMES order, state by buffer name; grads
    # are the step's own scratch, which an update may overwrite (it saves an allocation each)
    update: Callable[[Tensors, Tensors, dict[str, Tensors], torch.Tensor], None]


def _sgd(params: Tensors, grads: Tensors, state: dict[str, Tensors], lr: torch.Tensor) -> None:
    # p -= lr * grad
    torch._foreach_mul_(grads, lr)
    torch._foreach_sub_(params, grads)


def _momentum(params: Tensors, grads: Tensors, state: dict[str, Tensors], lr: torch.Tensor) -> None:
    # v = 0.9 v + grad; p -= lr * v  (torch.optim.SGD's momentum, no dampening)
    velocity = state["velocity"]
    torch._foreach_mul_(velocity, MOMENTUM)
    torch._foreach_add_(velocity, grads)
    torch._foreach_sub_(params, torch._foreach_mul(velocity, lr))


OPTIMIZERS = {
    "sgd": Optimizer("p -= lr * grad", (), _sgd),
    "momentum": Optimizer(f"SGD with momentum {MOMENTUM}: v = {MOMENTUM} v + grad, p -= lr * v", ("velocity",),
                          _momentum),
}


def state_names(optimizer: str) -> tuple[str, ...]:
    """The optimizer state's tensors, by name: '<buffer>.<parameter>'."""
    return tuple(f"{b}.{k}" for b in OPTIMIZERS[optimizer].buffers for k in PARAM_NAMES)


def init_state(optimizer: str, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    return {name: torch.zeros_like(params[name.split(".", 1)[1]]) for name in state_names(optimizer)}


def update(optimizer: str, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
           state: dict[str, torch.Tensor], lr: torch.Tensor) -> None:
    """The optimizer's update, in place; every tensor is paired with its parameter by name. The
    gradients are consumed: an update may scale them in place."""
    opt = OPTIMIZERS[optimizer]
    buffers = {b: [state[f"{b}.{k}"] for k in PARAM_NAMES] for b in opt.buffers}
    opt.update([params[k] for k in PARAM_NAMES], [grads[k] for k in PARAM_NAMES], buffers, lr)


# ----------------------------------------------------------------------------- gradients


def manual_grads(params: dict[str, torch.Tensor], Xb: torch.Tensor,
                 Yb: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, gradients by name): the model's kernel chain on the unchecked kernels."""
    loss, caches = model.forward(params, Xb, Yb, model.UNCHECKED)
    return loss, model.backward(caches, model.UNCHECKED)


class GradientDrift(RuntimeError):
    """Manual gradients no longer agree with autograd (raised by --verify-every)."""


def verify(params: dict[str, torch.Tensor], Xb: torch.Tensor, Yb: torch.Tensor,
           grads: dict[str, torch.Tensor]) -> None:
    """Compare the manual gradients with autograd's on the model's torch-ops twin. The two round
    differently, and db1 is pure cancellation (BatchNorm removes b1's effect), so the bar is
    absolute: 1000 units of rounding of the largest gradient entry, far below any real bug."""
    leaves = {k: params[k].detach().requires_grad_() for k in PARAM_NAMES}
    with torch.enable_grad():
        loss = model.autograd_loss(leaves, Xb, Yb)
        reference = dict(zip(PARAM_NAMES, torch.autograd.grad(loss, list(leaves.values()))))
    scale = max(float(r.abs().max()) for r in reference.values())
    bound = 1000 * torch.finfo(reference["W1"].dtype).eps * scale
    for name in PARAM_NAMES:
        maxdiff = float((grads[name] - reference[name]).abs().max())
        if not maxdiff <= bound:  # also catches nan
            raise GradientDrift(f"manual d{name} drifted from autograd: maxdiff {maxdiff:.3g} > "
                                f"{bound:.3g} (1000 eps x the largest gradient entry)")


# ----------------------------------------------------------------------------- steps


def step_graph(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor], Xtr: torch.Tensor,
               Ytr: torch.Tensor, ix: torch.Tensor, lr: torch.Tensor, optimizer: str) -> torch.Tensor:
    """One manual step on the rows ix of (Xtr, Ytr): what the eager step runs and aot.py builds."""
    loss, grads = manual_grads(params, Xtr.index_select(0, ix), Ytr.index_select(0, ix))
    update(optimizer, params, grads, state, lr)
    return loss


def eager_step(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor], Xtr: torch.Tensor,
               Ytr: torch.Tensor, *, optimizer: str = "sgd", backward: str = "manual",
               verify_gradients: bool = False) -> Step:
    """The step in Python. backward='manual': the kernels' maths, unchecked (check_inputs first);
    verify_gradients=True compares the gradients with autograd before the update (GradientDrift).
    backward='autograd': autograd's gradients of the same model, then the same update."""
    if backward == "autograd":
        for p in params.values():
            p.requires_grad_()

        def autograd(ix: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
            for p in params.values():
                p.grad = None
            loss = model.autograd_loss(params, Xtr.index_select(0, ix), Ytr.index_select(0, ix))
            loss.backward()
            with torch.no_grad():
                update(optimizer, params, {k: p.grad for k, p in params.items()}, state, lr)
            return loss.detach()
        return autograd

    if verify_gradients:
        def verified(ix: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
            Xb, Yb = Xtr.index_select(0, ix), Ytr.index_select(0, ix)
            with torch.no_grad():
                loss, grads = manual_grads(params, Xb, Yb)
            verify(params, Xb, Yb, grads)  # before the update
            with torch.no_grad():
                update(optimizer, params, grads, state, lr)
            return loss
        return verified

    def manual(ix: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the kernels need none; entering it once saves one per kernel
            return step_graph(params, state, Xtr, Ytr, ix, lr, optimizer)
    return manual


# ----------------------------------------------------------------------------- checks


def check_inputs(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor], Xtr: torch.Tensor,
                 Ytr: torch.Tensor, batch_size: int, *, optimizer: str = "sgd",
                 names: tuple[str, str] = ("Xtr", "Ytr")) -> None:
    """What the unchecked and the compiled steps assume: dense tensors on one device, parameters
    of one floating dtype with init_params' shapes, the optimizer's state shaped like them, int64
    contexts and targets in the vocabulary. names: what the messages call Xtr and Ytr."""
    X, Y = names
    missing = [k for k in PARAM_NAMES if k not in params]
    if missing:
        raise ValueError(f"params must hold {', '.join(PARAM_NAMES)}, missing {', '.join(missing)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if set(state) != set(state_names(optimizer)):
        raise ValueError(f"the {optimizer} state must hold {', '.join(state_names(optimizer)) or 'nothing'}, "
                         f"got {', '.join(state) or 'nothing'}")
    tensors = {f"params[{k!r}]": params[k] for k in PARAM_NAMES}
    tensors |= {f"state[{k!r}]": v for k, v in state.items()}
    _check.floating("params['W1']", params["W1"])
    for name, t in tensors.items():
        _check.same_dtype_as(name, t, "params['W1']", params["W1"])
    for name, t in [*tensors.items(), (X, Xtr), (Y, Ytr)]:
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")
    _check.same_device(Xtr=Xtr, Ytr=Ytr, **{k: params[k] for k in PARAM_NAMES}, **{
        k.replace(".", "_"): v for k, v in state.items()})
    V, E = params["C"].shape
    H = params["W1"].shape[1]
    expected = {"C": (V, E), "W1": (BLOCK_SIZE * E, H), "b1": (H,), "W2": (H, V), "b2": (V,),
                "bngain": (1, H), "bnbias": (1, H)}
    for k, shape in expected.items():
        _check.shape(f"params[{k!r}]", params[k], shape, "(init_params' layout)")
    for k, t in state.items():
        _check.shape(f"state[{k!r}]", t, expected[k.split(".", 1)[1]], "(its parameter's shape)")
    _check.index(X, Xtr, (torch.int64,))
    _check.index(Y, Ytr, (torch.int64,))
    _check.ndim(X, Xtr, 2, "(examples, block_size)")
    _check.shape(X, Xtr, (Xtr.shape[0], BLOCK_SIZE), "(examples, block_size)")
    _check.shape(Y, Ytr, (Xtr.shape[0],), f"(examples,) like {X}")
    if Xtr.shape[0] < 2:
        raise ValueError(f"{X} must hold at least 2 examples, got {Xtr.shape[0]}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an integer >= 2 (batch norm needs 2 rows), got {batch_size!r}")
    _check.in_range(X, Xtr, 0, V)
    _check.in_range(Y, Ytr, 0, V)
