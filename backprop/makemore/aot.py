"""The compiled training step, with the same type as the eager one: step(ix, lr) -> loss.

At batch 32 one step is ~35 kernels of a few microseconds: driving them from Python (the eager
step) or through Dynamo's guards and wrappers (torch.compile) costs more than the arithmetic. On
the CPU the step is compiled ahead of time instead: torch.export captures step.step_graph (the
batch gather, the manual gradients and the optimizer's update) as one graph, AOTInductor builds it
into a shared library, and each step is one call into C++. The build (~30 s) is cached on disk,
keyed by everything the graph depends on. On CUDA the step goes through torch.compile (no host C++
build needed).

The graph's inputs are flat: the parameters and the optimizer state in the order of their names
(model.PARAM_NAMES, step.state_names), then Xtr, Ytr, ix and lr.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from backprop import _check, batch_norm, cross_entropy, embedding, linear, tanh
from backprop.makemore import data, model, step
from backprop.makemore.model import PARAM_NAMES

_SOURCES = (sys.modules[__name__], step, model, data, embedding, linear, batch_norm, tanh, cross_entropy,
            _check)


class _StepModule(torch.nn.Module):  # torch.export takes a Module
    def __init__(self, optimizer: str):
        super().__init__()
        self.optimizer = optimizer
        self.state_names = step.state_names(optimizer)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        n, k = len(PARAM_NAMES), len(self.state_names)
        params = dict(zip(PARAM_NAMES, tensors[:n]))
        state = dict(zip(self.state_names, tensors[n:n + k]))
        Xtr, Ytr, ix, lr = tensors[n + k:]
        return step.step_graph(params, state, Xtr, Ytr, ix, lr, self.optimizer)


def cache_dir() -> Path:
    """Where built steps are kept: $BACKPROP_CACHE_DIR, else $XDG_CACHE_HOME/backprop (~/.cache)."""
    if os.environ.get("BACKPROP_CACHE_DIR"):
        return Path(os.environ["BACKPROP_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "backprop"


def step_path(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor], Xtr: torch.Tensor,
              batch_size: int, *, optimizer: str = "sgd") -> Path:
    """The package for these shapes and dtypes (the number of training examples aside), this
    optimizer, this torch and this code (any edit rebuilds)."""
    h = hashlib.sha256(torch.__version__.encode())
    for module in _SOURCES:
        h.update(Path(module.__file__).read_bytes())
    fixed = [(k, tuple(t.shape), t.dtype) for k, t in _fixed(params, state, optimizer).items()]
    h.update(repr((fixed, tuple(Xtr.shape[1:]), Xtr.dtype, batch_size, optimizer)).encode())
    return cache_dir() / f"train_step-{h.hexdigest()[:24]}.pt2"


def _fixed(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
           optimizer: str) -> dict[str, torch.Tensor]:
    """The graph's first inputs, in their order: the parameters, then the optimizer state."""
    return {k: params[k] for k in PARAM_NAMES} | {k: state[k] for k in step.state_names(optimizer)}


def _build(path: Path, optimizer: str, args: tuple[torch.Tensor, ...]) -> None:
    """Export the step (the number of training examples stays symbolic) and build the package,
    written under a temporary name and renamed, so a concurrent run never reads half a file."""
    examples = torch.export.Dim("examples", min=2)
    fixed = len(args) - 4  # the parameters and the optimizer state
    dynamic = (None,) * fixed + ({0: examples}, {0: examples}, None, None)
    with torch.no_grad():
        # forward(*tensors) takes one argument to export: the tuple, hence (dynamic,)
        program = torch.export.export(_StepModule(optimizer), args, dynamic_shapes=(dynamic,))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.pt2")
    torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
    os.replace(tmp, path)


_dynamo_steps: dict[tuple[str, str], torch.nn.Module] = {}  # per (device type, optimizer)


def compiled_step(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor], Xtr: torch.Tensor,
                  Ytr: torch.Tensor, batch_size: int, *, optimizer: str = "sgd",
                  check: bool = True) -> step.Step:
    """step.step_graph for these tensors, compiled (AOTInductor on the CPU, built once and cached;
    torch.compile on CUDA): a step (ix, lr) -> loss updating params and state in place. ix holds
    the batch's row numbers (int64, (batch_size,), in [0, len(Xtr))), lr is a 0-d tensor of the
    parameters' dtype. The built step reads raw memory and checks nothing, so the arguments are
    checked here: the fixed ones once, ix and lr on every call. check=False skips both, for a
    caller that has run step.check_inputs and draws ix itself (train)."""
    if check:
        step.check_inputs(params, state, Xtr, Ytr, batch_size, optimizer=optimizer)
    tensors = [*_fixed(params, state, optimizer).values(), Xtr, Ytr]
    device = params["W1"].device
    if device.type == "cpu":
        path = step_path(params, state, Xtr, batch_size, optimizer=optimizer)
        if not path.exists():
            ix = torch.zeros(batch_size, dtype=torch.int64)
            _build(path, optimizer, (*tensors, ix, torch.tensor(0.0, dtype=params["W1"].dtype)))
        # the loaded model's loader runs a flat list of tensors; calling the model itself would
        # first parse its input/output specs and flatten the arguments (~100 us a step)
        run = torch._inductor.aoti_load_package(str(path)).loader.run

        def fast(ix: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
            return run([*tensors, ix, lr])[0]
    else:
        key = (device.type, optimizer)
        if key not in _dynamo_steps:
            _dynamo_steps[key] = torch.compile(_StepModule(optimizer), dynamic=False)
        fn = _dynamo_steps[key]

        def fast(ix: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return fn(*tensors, ix, lr)
    if not check:
        return fast

    def checked(ix: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        _check.shape("ix", _check.index("ix", ix, (torch.int64,)), (batch_size,), "(batch_size,)")
        _check.shape("lr", _check.same_dtype_as("lr", lr, "the parameters", params["W1"]), (), "(0-d)")
        _check.same_device(ix=ix, lr=lr, W1=params["W1"])
        _check.in_range("ix", ix, 0, Xtr.shape[0])
        return fast(ix, lr)
    return checked
