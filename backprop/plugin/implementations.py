"""Load a user's implementation and give it the kernel contract.

    op = load("cross_entropy", "mypkg.ops:fused_ce")            # kind detected
    op = load("tanh", "mypkg.ops:tanh@autograd")                 # kind named
    out, cache = op.forward(logits, targets); grads = op.backward(dout, cache)

Two kinds:
  contract  an object (often a module) with ``forward(*args, **options) -> (out, cache)`` and
            ``backward(dout, cache) -> tuple of grads``: backprop's own contract, used as it is.
  autograd  a differentiable callable with the torch twin's signature: a function, an
            ``autograd.Function`` (its ``.apply`` is called), a ``torch.library.custom_op``, an
            ``nn.Module``. ``forward`` runs it on leaves that require grad and keeps the graph;
            ``backward`` takes the gradients with ``torch.autograd.grad``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch

KINDS = ("contract", "autograd")


class Cache(NamedTuple):
    # (out,): the callable's output with its autograd graph, in a tuple so that the autograd
    # adapter keeps it as a plain value instead of returning it (and cutting its graph) as an output
    graph: tuple[torch.Tensor]
    inputs: tuple  # the positional arguments as the callable saw them: float tensors as leaves


def _differentiable(a: Any) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def resolve(spec: str) -> tuple[Any, str | None]:
    """'pkg.mod', 'pkg.mod:attr.attr' or either with '@contract' / '@autograd': (object, kind)."""
    target, _, kind = spec.partition("@")
    if kind and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r} in {spec!r}: use @contract or @autograd")
    module_name, _, attrs = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for attr in filter(None, attrs.split(".")):
        obj = getattr(obj, attr)
    return obj, kind or None


def detect(obj: Any) -> str:
    """'autograd' for an autograd.Function or a plain callable, 'contract' for forward/backward."""
    if isinstance(obj, type) and issubclass(obj, torch.autograd.Function):
        return "autograd"  # it has forward/backward too, but with ctx: its .apply is the op
    if callable(getattr(obj, "forward", None)) and callable(getattr(obj, "backward", None)):
        return "contract"
    if callable(obj):
        return "autograd"
    raise TypeError(f"{obj!r} has neither forward/backward nor __call__")


def differentiable(fn: Callable[..., torch.Tensor], reference: Callable, name: str) -> SimpleNamespace:
    """The kernel contract around a differentiable callable: its gradients come from autograd.
    forward takes the reference's signature, so the harness owes one gradient to each positional
    parameter, an omitted optional tensor included."""
    signature = inspect.signature(reference)

    def forward(*args: Any, **options: Any) -> tuple[torch.Tensor, Cache]:
        bound = signature.bind(*args, **options)  # a TypeError for arguments the twin refuses
        bound.apply_defaults()
        positional = [p.name for p in signature.parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        inputs = tuple(bound.arguments[p] for p in positional)
        inputs = tuple(a.detach().requires_grad_() if _differentiable(a) else a for a in inputs)
        with torch.enable_grad():  # the autograd adapter and gradcheck call forward without grad
            out = fn(*inputs, **options)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{name} must return a tensor, got {type(out).__name__}")
        return out.detach(), Cache((out,), inputs)

    def backward(dout: torch.Tensor, cache: Cache) -> tuple:
        wrt = [x for x in cache.inputs if _differentiable(x)]
        got: list = [None] * len(wrt)
        (out,) = cache.graph
        if wrt and out.requires_grad:
            # retain_graph: the contract allows a second backward on the same cache
            got = list(torch.autograd.grad(out, wrt, dout.detach(), retain_graph=True,
                                           allow_unused=True))
        given, grads = iter(got), []
        for x in cache.inputs:
            g = next(given) if _differentiable(x) else None
            # an input the output does not depend on gets zeros, as in the harness's reference
            grads.append(torch.zeros_like(x) if g is None and _differentiable(x) else g)
        return tuple(grads)

    forward.__signature__ = signature  # what the harness reads to count positional arguments
    return SimpleNamespace(forward=forward, backward=backward, Cache=Cache, __name__=name, fn=fn)


def adapt(obj: Any, reference: Callable, name: str, kind: str | None = None) -> Any:
    """obj with the kernel contract: itself for kind 'contract', wrapped for 'autograd'."""
    kind = kind or detect(obj)
    if kind == "contract":
        return obj
    if isinstance(obj, type) and issubclass(obj, torch.autograd.Function):
        obj = obj.apply
    return differentiable(obj, reference, name)


def load(op_name: str, spec: str) -> tuple[Any, str]:
    """The implementation named by spec, adapted to the contract, and its kind."""
    from backprop.testing.references import REFERENCES

    obj, kind = resolve(spec)
    kind = kind or detect(obj)
    return adapt(obj, REFERENCES[op_name], spec.partition("@")[0], kind), kind
