"""Autograd adapter: run any backprop op inside a torch autograd graph, with our kernel as backward.

    loss = backprop.autograd.apply(backprop.cross_entropy, logits, targets, reduction="sum")
    loss.backward()  # calls backprop.cross_entropy.backward

This is what ``torch.autograd.gradcheck`` runs on, and how the kernels drop into a real model.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch.autograd.function import once_differentiable


class KernelFunction(torch.autograd.Function):
    """Saves the kernel's cache and unpacks it; the maths lives in the op module."""

    @staticmethod
    def forward(ctx: Any, op: ModuleType, options: dict, *args: Any) -> torch.Tensor:
        out, cache = op.forward(*args, **options)
        ctx.op, ctx.single = op, not isinstance(cache, tuple)  # a bare tensor cache is allowed
        fields = [cache] if ctx.single else list(cache)
        # tensors go through save_for_backward (version-checked, no reference cycles), the rest on ctx
        slots = [isinstance(v, torch.Tensor) for v in fields]
        ctx.save_for_backward(*(v for v, t in zip(fields, slots) if t))
        ctx.plain = [None if t else v for v, t in zip(fields, slots)]
        ctx.slots, ctx.cache_type = slots, type(cache)
        ctx.set_materialize_grads(True)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: torch.Tensor) -> tuple:
        saved = iter(ctx.saved_tensors)
        fields = [next(saved) if t else v for v, t in zip(ctx.plain, ctx.slots)]
        if ctx.single:
            cache = fields[0]
        elif hasattr(ctx.cache_type, "_fields"):
            cache = ctx.cache_type(*fields)
        else:
            cache = ctx.cache_type(fields)
        grads = ctx.op.backward(dout.contiguous(), cache)
        return (None, None, *grads)


def apply(op: ModuleType, *args: Any, **options: Any) -> torch.Tensor:
    """op.forward(*args, **options) as an autograd node whose backward is op.backward."""
    return KernelFunction.apply(op, options, *args)
