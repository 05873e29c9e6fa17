"""Autograd adapter: run any backprop op inside a torch autograd graph, with our kernel as backward.

    loss = backprop.autograd.apply(backprop.cross_entropy, logits, targets, reduction="sum")
    loss.backward()  # calls backprop.cross_entropy.backward

The Function is in the ``setup_context`` style, so torch.func accepts it: ``grad``, ``vjp``,
``jacrev`` (backward), ``jvp``, ``jacfwd`` (the op's hand-written ``jvp``) and ``vmap`` (a rule
that runs the op once per sample, see ``KernelFunction.vmap``). Forward over forward mode
(``jacfwd(jacfwd(f))``) raises NotImplementedError; the other three pairings work.

Second order: a backward with ``create_graph=True`` (or under an outer ``torch.func.grad``)
recomputes the cache from the saved inputs and runs ``forward_math`` / ``backward_math`` as
differentiable torch ops (functionalised: the kernels' in-place updates become out-of-place),
so autograd differentiates our hand-written backward. The first-order gradient is the same
formula either way; only the graph is extra.

The last backward: when autograd frees the graph after this backward (no retain_graph or
create_graph), grad mode is off and no torch.func transform is active, an op whose ``backward``
takes ``release`` is called with ``release=True``: it may hand over what its cache holds
(linear_cross_entropy scales its cached gradients in place and returns them) instead of copying.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.func import functionalize


def split_cache(args: tuple, out: torch.Tensor, cache: Any) -> tuple[list, tuple]:
    """The cache as extra tensors to return from a forward, plus a plain layout ``(kind, fields)``:
    kind rebuilds the cache (its NamedTuple or tuple type, or "single" for a cache that is one
    bare value, which a user's kernel may return); each field is ("arg", i) an input, ("out",)
    the output, ("saved", j) extra tensor j or ("plain", v) a value. Inputs and the output are not
    returned again, and a tensor in two fields takes one slot: a forward's outputs (an
    autograd.Function's, a custom op's) may not alias its inputs or each other. ``join_cache`` is
    the inverse; the custom ops (backprop.library) use the same pair."""
    kind = type(cache) if isinstance(cache, tuple) else "single"
    extras, spec = [], []
    for v in (cache if isinstance(cache, tuple) else (cache,)):
        if not isinstance(v, torch.Tensor):
            spec.append(("plain", v))
        elif v is out:
            spec.append(("out",))
        elif any(v is a for a in args):
            spec.append(("arg", next(i for i, a in enumerate(args) if v is a)))
        elif any(v is e for e in extras):
            spec.append(("saved", next(k for k, e in enumerate(extras) if v is e)))
        else:
            spec.append(("saved", len(extras)))
            extras.append(v)
    return extras, (kind, tuple(spec))


def join_cache(layout: tuple, args: Sequence, out: torch.Tensor, extras: Sequence) -> Any:
    """The cache again, from ``split_cache``'s layout and the tensors it named."""
    kind, spec = layout
    pick = {"arg": args.__getitem__, "saved": extras.__getitem__, "plain": lambda v: v}
    fields = [out if field == "out" else pick[field](*v) for field, *v in spec]
    if kind == "single":
        return fields[0]
    return kind(*fields) if hasattr(kind, "_fields") else kind(fields)


class KernelFunction(torch.autograd.Function):
    """Saves the kernel's cache and unpacks it; the maths lives in the op module.

    forward returns (out, *extras, spec): the cache tensors that are neither an input nor the
    output (non-differentiable outputs, so that torch.func sees them), and the cache's layout.
    ``apply`` below hands the caller ``out`` alone.
    """

    @staticmethod
    def forward(op: ModuleType, options: dict, *args: Any) -> tuple:
        out, cache = op.forward(*args, **options)
        extras, spec = split_cache(args, out, cache)
        return (out, *extras, spec)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        op, options, *args = inputs
        out, *extras, spec = output
        ctx.mark_non_differentiable(*extras)
        # no zeros for the cache outputs, which never get a gradient (a (V, D) buffer for
        # linear_cross_entropy's dW): backward makes dout itself when out got none
        ctx.set_materialize_grads(False)
        ctx.op, ctx.options, ctx.spec, ctx.n_args = op, options, spec, len(args)
        # every tensor input is kept, not only the cache's: a second backward recomputes the cache
        # from them (a parameter or an activation that the caller holds anyway, in a model)
        ctx.arg_slots = [isinstance(a, torch.Tensor) for a in args]
        tensors = [a for a in args if isinstance(a, torch.Tensor)] + [out, *extras]
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)
        ctx.plain_args = [None if t else a for a, t in zip(args, ctx.arg_slots)]

    @staticmethod
    def _unpack(ctx: Any) -> tuple[list, Any]:
        saved = iter(ctx.saved_tensors)
        args = [next(saved) if t else a for a, t in zip(ctx.plain_args, ctx.arg_slots)]
        out = next(saved)
        return args, join_cache(ctx.spec, args, out, list(saved))

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor | None, *_: Any) -> tuple:
        args, cache = KernelFunction._unpack(ctx)
        op = ctx.op
        if dout is None:  # out did not reach the loss (the cache outputs never get a gradient)
            dout = torch.zeros_like(ctx.saved_tensors[sum(ctx.arg_slots)])
        if torch.is_grad_enabled():  # create_graph=True, or an outer torch.func transform
            grads = _differentiable_backward(ctx, args, cache, dout)
        elif _last_use() and _takes_release(op.backward):
            # nothing reads this cache again: an op whose cache holds finished gradients hands them
            # over, scaled in place (the engine then frees the saved tensors, and AccumulateGrad
            # keeps the handed-over tensor as .grad rather than a copy)
            grads = op.backward(dout.contiguous(), cache, release=True)
        else:
            grads = op.backward(dout.contiguous(), cache)
        return (None, None, *grads)

    @staticmethod
    def jvp(ctx: Any, _op: None, _options: None, *tangents: torch.Tensor | None) -> tuple:
        args, cache = KernelFunction._unpack(ctx)
        jvp_levels = [i for i in retrieve_all_functorch_interpreters() if i.key() == TransformType.Jvp]
        if len(jvp_levels) > 1:
            # the outer forward mode sees a zero tangent for what this rule computes (found by test);
            # an error, not a silently wrong second derivative
            name = ctx.op.__name__.rsplit(".", 1)[-1]
            raise NotImplementedError(
                f"{name}: forward over forward mode (jacfwd(jacfwd(...)), jvp of jvp) is not supported "
                f"through backprop.autograd.apply; use jacfwd(jacrev(...)) or jacrev(jacfwd(...))"
            )
        if _outer_transform(args):  # jacfwd(jacfwd), jacrev(jacfwd): the cache must carry history
            _, cache = functionalize(ctx.op.forward_math)(_args_again(ctx, args, cache))
            t_out = functionalize(ctx.op.jvp)(tangents, cache)
        else:
            t_out = ctx.op.jvp(tangents, cache)
        if t_out is None:  # every tangent was None (an integer input's)
            out = ctx.saved_tensors[sum(ctx.arg_slots)]
            t_out = torch.zeros_like(out)
        return (t_out, *[None] * (len(ctx.saved_tensors) - sum(ctx.arg_slots) - 1), None)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, op: ModuleType, options: dict, *args: Any) -> tuple:
        """One kernel call per sample, stacked. Correct for every op (prepare's host checks run on
        each unbatched sample, with their messages), at the cost of a Python loop over the batch."""
        name = op.__name__.rsplit(".", 1)[-1]
        arg_dims = in_dims[2:]
        if info.batch_size == 0:
            raise ValueError(f"{name} under vmap needs a batch of at least one sample, got 0")
        per_sample = []
        for i in range(info.batch_size):
            sample = [a if d is None else a.select(d, i) for a, d in zip(args, arg_dims)]
            per_sample.append(KernelFunction.apply(op, options, *sample))
        spec = per_sample[0][-1]
        for res in per_sample[1:]:
            if res[-1] != spec:
                raise ValueError(
                    f"{name} under vmap needs one cache layout for every sample (the same count of "
                    f"ignored rows, for cross_entropy), got {spec} and {res[-1]}"
                )
        stacked = [torch.stack([res[k] for res in per_sample]) for k in range(len(per_sample[0]) - 1)]
        return (*stacked, spec), (*[0] * len(stacked), None)


# True while a backward runs with retain_graph=True or create_graph=True (and outside any backward);
# False when autograd frees the graph's saved tensors after each node. Private in torch: absent, never release
_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True)


def _last_use() -> bool:
    """Is this the cache's last use? The engine frees the graph after this backward (no
    retain_graph or create_graph), grad mode is off and no torch.func transform is active."""
    return not (_keep_graph() or torch.is_grad_enabled() or torch._C._functorch.peek_interpreter_stack())


@functools.cache
def _takes_release(backward: Any) -> bool:
    """Does op.backward take ``release`` (may it consume its cache)? Looked up once per op."""
    try:
        return "release" in inspect.signature(backward).parameters
    except (TypeError, ValueError):  # a callable without a signature
        return False


def _outer_transform(args: list) -> bool:
    """Is the jvp itself differentiated? Then an input is wrapped by an outer torch.func transform
    or tracked by autograd, and the cache (computed without history) must be recomputed from it."""
    return any(
        isinstance(a, torch.Tensor)
        and (torch._C._functorch.is_functorch_wrapped_tensor(a)
             or (torch.is_grad_enabled() and a.requires_grad))
        for a in args
    )


def _differentiable_backward(ctx: Any, args: list, cache: tuple, dout: torch.Tensor) -> tuple:
    """op's gradients as a differentiable function of args and dout: the cache is recomputed
    from the inputs (the forward's cache records no history), and both halves run functionalised,
    because the kernels update their own buffers in place (exp_, mul_, scatter_), which autograd
    cannot differentiate through when the overwritten value was saved."""
    return differentiable_grads(ctx.op, _args_again(ctx, args, cache), dout)


def differentiable_grads(op: ModuleType, fargs: tuple, dout: torch.Tensor) -> tuple:
    """op's gradients as differentiable torch ops of forward_math's Args and dout: forward_math
    rebuilds the cache with history, backward_math (our hand-written formula) runs on it, both
    functionalised. The adapter's second order and the custom ops' (backprop.library) share it."""
    _, cache = functionalize(op.forward_math)(fargs)
    return functionalize(op.backward_math)(dout, cache)


def _args_again(ctx: Any, args: list, cache: tuple) -> tuple:
    """forward_math's Args without prepare (its host checks cannot run under vmap, and they
    passed already), each field by name: the cache's (an input itself, or a prepared plain value
    such as cross_entropy's masked targets), else forward's argument, option, or default."""
    op = ctx.op
    params = inspect.signature(op.forward).parameters
    by_name = dict(zip(params, args))
    fields = {}
    for name in op.Args._fields:
        if isinstance(ctx.options.get(name), torch.Tensor):
            # a tensor option (cross_entropy's weight) is the caller's own: the cache holds the
            # same tensor, but saved as an output, without history
            fields[name] = ctx.options[name]
        elif name in op.Cache._fields:
            kind = ctx.spec[1][op.Cache._fields.index(name)][0]
            value = getattr(cache, name)
            if kind in ("saved", "out") and isinstance(value, torch.Tensor) and value.is_floating_point():
                raise TypeError(f"{op.__name__}: Args.{name} would come from a cache tensor without "
                                f"history; a second backward needs it recomputed from the inputs")
            fields[name] = value
        elif name in by_name:
            fields[name] = by_name[name]
        elif name in ctx.options:
            fields[name] = ctx.options[name]
        else:
            fields[name] = params[name].default
    return op.Args(**fields)


def apply(op: ModuleType, *args: Any, **options: Any) -> torch.Tensor:
    """op.forward(*args, **options) as an autograd node whose backward is op.backward.
    A tensor option (cross_entropy's weight) is a constant: no gradient flows to it."""
    for name, value in options.items():
        if isinstance(value, torch.Tensor) and value.requires_grad:
            raise ValueError(f"{name} requires grad, but a tensor option gets no gradient from "
                             f"{op.__name__}.backward; pass {name}.detach()")
    return KernelFunction.apply(op, options, *args)[0]
