"""backprop.compiled: every op with its maths fused by ``torch.compile``, under the same contract.

    out, cache = backprop.compiled.cross_entropy.forward(logits, targets)
    grads      = backprop.compiled.cross_entropy.backward(dout, cache)

Each compiled op runs the eager op's own checks first (``prepare`` / ``check_backward``:
they raise the same errors and read targets and indices on the host), then the eager op's
``forward_math`` / ``backward_math`` compiled by Inductor. Nothing is rewritten: the compiled
path is the readable kernel, fused.

Recompiles: each op keeps one compiled function per direction, created lazily and compiled on
first call. torch.compile's automatic dynamic shapes apply: the first shape compiles a static
graph, the first call with a new shape recompiles once with symbolic sizes, and later shapes
reuse that graph. Options that change the maths (reduction, correction, padding_idx, ...) are
specialised: one graph per combination, up to torch._dynamo's recompile limit (8 per function),
after which torch runs the function eagerly with a warning, so results stay correct.

embedding's backward is not compiled (see OPS below): it is the eager index_add_.
"""

from __future__ import annotations

import functools
import shutil
from types import ModuleType
from typing import Any

import torch

import backprop
from backprop import _check


def cpu_compiler_found() -> bool:
    """torch.compile's CPU backend (Inductor) builds C++ with g++: without it, compiling CPU code
    fails. The CLI, the tests and the benchmarks ask here before they compile on the CPU."""
    return shutil.which("g++") is not None


class CompiledOp:
    """forward/backward with op's signature and errors; forward_math/backward_math compiled."""

    def __init__(self, op: ModuleType, *, compile_backward: bool = True) -> None:
        self.op = op
        self.__name__ = f"backprop.compiled.{op.__name__.rsplit('.', 1)[-1]}"
        self.Cache = op.Cache
        self._forward = torch.compile(op.forward_math)
        self._backward = torch.compile(op.backward_math) if compile_backward else op.backward_math

        @functools.wraps(op.forward)  # same signature and docstring (the oracle reads both)
        def forward(*args: Any, **options: Any) -> tuple[torch.Tensor, tuple]:
            return self._forward(op.prepare(*args, **options))

        @functools.wraps(op.backward)  # its signature: backprop.autograd passes release=True where it has one
        def backward(dout: torch.Tensor, cache: tuple, **release: bool) -> tuple[torch.Tensor | None, ...]:
            op.check_backward(dout, cache)
            return self._backward(dout, cache, **release)

        self.forward, self.backward = _check.no_autograd(forward), _check.no_autograd(backward)

    def __repr__(self) -> str:
        return f"<{self.__name__}>"


# embedding's backward stays eager: it is one index_add_ (nothing to fuse), and Inductor lowers
# index_add_ to a parallel scatter with atomic adds on the CPU, which is not bitwise repeatable
# (the contract check caught it: a second backward on the same cache changed dweight)
OPS = {name: CompiledOp(op, compile_backward=name != "embedding") for name, op in backprop.OPS.items()}
globals().update(OPS)  # backprop.compiled.<op>, as backprop.<op>

__all__ = ["OPS", "CompiledOp", "cpu_compiler_found", *OPS]
