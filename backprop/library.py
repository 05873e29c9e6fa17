"""backprop's ops as PyTorch custom ops: ``torch.ops.backprop.<op>``, opaque to compile and export.

    import backprop.library  # registers the ops
    loss = torch.ops.backprop.cross_entropy(logits, targets, label_smoothing=0.1)
    loss.backward()  # runs torch.ops.backprop.cross_entropy_backward: our hand-written backward

Each op in ``TABLE`` becomes two custom ops whose schemas are read off the module's ``forward``
signature (options stay keyword-only arguments):

    backprop::<op>(<forward's arguments>) -> Tensor
    backprop::<op>_backward(Tensor dout, <forward's arguments>) -> Tensor[]

with a fake (meta) implementation for each and ``register_autograd`` tying the first to the
second. The backward op returns the gradients of the floating-point tensor arguments, in order.

Memory for compute: the forward op returns only ``out``, so the backward op recomputes the cache
from the inputs (one extra ``forward_math``, as activation checkpointing does) and then runs the
module's ``backward``. Second derivatives are not offered on this path (a clear error); the
autograd adapter (``backprop.autograd.apply``) has them.

Host checks: ``prepare`` reads targets and indices on the host to raise a message naming the
offending entry. In a custom op that would be a device sync inside a compiled graph, so the ops in
``TABLE`` with such a check give a sync-free ``prepare``: the range check becomes a device-side
``torch._assert_async``; on the CPU (where there is nothing to sync with) a failed check calls the
module's own ``prepare``, which raises its usual message.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

import torch

from backprop import _check, batch_norm, cross_entropy, embedding, linear, logsumexp, tanh

NAMESPACE = "backprop"

# forward's annotations (strings: the modules use `from __future__ import annotations`) in schema types
_SCHEMA_TYPES = {
    "torch.Tensor": "Tensor",
    "torch.Tensor | None": "Tensor?",
    "int": "int",
    "int | None": "int?",
    "float": "float",
    "float | None": "float?",
    "bool": "bool",
    "str": "str",
    "int | tuple[int, ...]": "int[1]",  # a single int is accepted, as in torch's own dim arguments
}


def _literal(v: object) -> str:
    return f'"{v}"' if isinstance(v, str) else repr(v)


def _is_tensor_param(p: inspect.Parameter) -> bool:
    return p.annotation in ("torch.Tensor", "torch.Tensor | None")


def schema_params(forward: Callable) -> list[inspect.Parameter]:
    """forward's parameters in schema order: custom_op refuses keyword-only tensors, so those
    (batch_norm's running_mean and running_var) come after the positional ones and before the
    ``*``. Callers still pass them by keyword; they get no gradient (backward's tuple covers
    forward's positional arguments)."""
    params = list(inspect.signature(forward).parameters.values())
    return ([p for p in params if p.kind is not p.KEYWORD_ONLY]
            + [p for p in params if p.kind is p.KEYWORD_ONLY and _is_tensor_param(p)]
            + [p for p in params if p.kind is p.KEYWORD_ONLY and not _is_tensor_param(p)])


def schema_of(forward: Callable, prefix: str = "") -> str:
    """The custom-op schema of ``forward``'s signature: ``(Tensor x, *, int dim=-1) -> Tensor``.
    ``prefix`` is prepended to the arguments (the backward op's ``Tensor dout, ``)."""
    parts, keyword_only = [], False
    for p in schema_params(forward):
        if p.kind is p.KEYWORD_ONLY and _is_tensor_param(p):
            p = p.replace(kind=p.POSITIONAL_OR_KEYWORD)
        if p.kind is p.KEYWORD_ONLY and not keyword_only:
            parts.append("*")
            keyword_only = True
        if p.annotation not in _SCHEMA_TYPES:
            raise TypeError(f"{forward.__module__}.forward: no schema type for {p.name}: {p.annotation}")
        default = "" if p.default is p.empty else "=" + _literal(p.default)
        parts.append(f"{_SCHEMA_TYPES[p.annotation]} {p.name}{default}")
    return f"({prefix}{', '.join(parts)})"


def _range_checked(ok: torch.Tensor, message: str, eager_prepare: Callable[[], Any]) -> None:
    """Assert ok (a 0-d bool) without a host sync. On real CPU tensors, a failure re-runs the
    module's prepare, which raises the eager message (offending value and its index)."""
    if ok.device.type == "cpu" and not torch._subclasses.fake_tensor.is_fake(ok):
        if not bool(ok):
            eager_prepare()
        return
    torch._assert_async(ok, message)


def _cross_entropy_prepare(logits, targets, *, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    """cross_entropy.prepare without host reads: ignored rows are masked on the device and the
    'mean' denominator stays a 0-d tensor (forward_math and backward_math divide by it as by an int)."""
    _check.floating("logits", logits)
    _check.index("targets", targets, (torch.int64,))
    _check.ndim("logits", logits, 2, "(N, C)")
    N, C = logits.shape
    _check.shape("targets", targets, (N,), f"(N,) with N={N} rows of logits")
    # the rest of prepare's checks, on zero rows: nothing left to read on the host
    cross_entropy.prepare(logits[:0], targets[:0], reduction=reduction, label_smoothing=label_smoothing)
    valid = targets != ignore_index  # (N,)
    ok = (~valid | ((targets >= 0) & (targets < C))).all()
    _range_checked(ok, f"targets must lie in [0, {C}) (or ignore_index={ignore_index})",
                   lambda: cross_entropy.prepare(logits, targets, reduction=reduction,
                                                 ignore_index=ignore_index, label_smoothing=label_smoothing))
    safe = torch.where(valid, targets, 0)  # (N,) a gatherable index on ignored rows
    return cross_entropy.Args(logits, safe, valid, valid.sum(), reduction, float(label_smoothing))


def _embedding_prepare(indices, weight, *, padding_idx=None, max_norm=None, norm_type=2.0,
                       scale_grad_by_freq=False, sparse=False, deterministic=True):
    """embedding.prepare without host reads: its checks on an empty view of indices (every check but
    the range one reads dtypes, shapes and options only), the range check on the device.
    sparse=True is refused: a custom op's backward declares dense gradients (its fake kernel)."""
    options = dict(padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type,
                   scale_grad_by_freq=scale_grad_by_freq, sparse=sparse, deterministic=deterministic)
    args = embedding.prepare(indices.reshape(-1)[:0], weight, **options)
    if sparse:
        raise ValueError("sparse=True is not offered by torch.ops.backprop.embedding (a custom op's "
                         "gradients are dense); use backprop.autograd.apply(backprop.embedding, ...)")
    V = weight.shape[0]
    ok = ((indices >= 0) & (indices < V)).all()
    eager = lambda: embedding.prepare(indices, weight, **options)  # noqa: E731
    _range_checked(ok, f"indices must lie in [0, {V})", eager)
    return args._replace(indices=indices)


class Entry(NamedTuple):
    """One op: its module (forward's signature gives the schema) and, where the module's prepare
    reads tensors on the host, a sync-free prepare with the same arguments."""

    module: ModuleType
    prepare: Callable[..., tuple] | None = None


TABLE = {
    "cross_entropy": Entry(cross_entropy, _cross_entropy_prepare),
    "logsumexp": Entry(logsumexp),
    "batch_norm": Entry(batch_norm),
    "tanh": Entry(tanh),
    "linear": Entry(linear),
    "embedding": Entry(embedding, _embedding_prepare),
}


def _is_float(a: object) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def register(name: str, entry: Entry, namespace: str = NAMESPACE) -> tuple:
    """Register ``<namespace>::<name>`` and ``<namespace>::<name>_backward`` for an op module with
    the backprop contract (prepare / forward_math / backward). Returns both custom ops."""
    module = entry.module
    prepare = entry.prepare or module.prepare
    params = schema_params(module.forward)
    n_pos = sum(p.kind is not p.KEYWORD_ONLY for p in params)  # forward's positional arguments
    moved = [p.name for p in params[n_pos:] if _is_tensor_param(p)]  # keyword-only tensors, made positional

    def call(fn, args, options):
        """fn (prepare) with the moved tensors passed back by keyword."""
        return fn(*args[:n_pos], **dict(zip(moved, args[n_pos:])), **options)

    def forward_impl(*args, **options):
        out, _ = module.forward_math(call(prepare, args, options))
        return out

    def backward_impl(dout, *args, **options):
        _, cache = module.forward_math(call(prepare, args, options))  # the cache, recomputed
        return [g for g in module.backward(dout, cache) if g is not None]

    def backward_fake(dout, *args, **options):
        return [torch.empty_like(a) for a in args[:n_pos] if _is_float(a)]

    fwd = torch.library.custom_op(f"{namespace}::{name}", forward_impl, mutates_args=(),
                                  schema=schema_of(module.forward) + " -> Tensor")
    bwd = torch.library.custom_op(f"{namespace}::{name}_backward", backward_impl, mutates_args=(),
                                  schema=schema_of(module.forward, "Tensor dout, ") + " -> Tensor[]")
    fwd.register_fake(forward_impl)  # prepare and forward_math on fake tensors: no host read left
    bwd.register_fake(backward_fake)

    def setup_context(ctx, inputs, output, keyword_only_inputs=None):  # called by keyword
        ctx.slots = [isinstance(a, torch.Tensor) for a in inputs]
        ctx.save_for_backward(*(a for a in inputs if isinstance(a, torch.Tensor)))
        ctx.plain = [None if t else a for a, t in zip(inputs, ctx.slots)]
        ctx.options = keyword_only_inputs or {}

    def backward(ctx, dout):
        saved = iter(ctx.saved_tensors)
        args = [next(saved) if t else a for a, t in zip(ctx.plain, ctx.slots)]
        grads = iter(bwd(dout, *args, **ctx.options))
        return tuple(next(grads) if _is_float(a) and k < n_pos else None for k, a in enumerate(args))

    def no_second_order(ctx, *_):
        raise NotImplementedError(
            f"{namespace}::{name}_backward has no derivative: the custom-op path offers first "
            f"order only; for a second backward use backprop.autograd.apply(backprop.{name}, ...)"
        )

    fwd.register_autograd(backward, setup_context=setup_context)
    bwd.register_autograd(no_second_order)
    return fwd, bwd


OPS = {name: register(name, entry) for name, entry in TABLE.items()}

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck(op: Any, *args: Any, **kwargs: Any) -> dict[str, str]:
    """torch.library.opcheck with the four checks backprop's ops pass: ``op`` is a name in TABLE
    (``"tanh"``) or any custom op (your own: ``torch.ops.mylib.myop``). Raises on a failure."""
    if isinstance(op, str):
        op = getattr(getattr(torch.ops, NAMESPACE), op)
    return torch.library.opcheck(op, args, kwargs, test_utils=OPCHECK_UTILS)


__all__ = ["OPCHECK_UTILS", "OPS", "TABLE", "Entry", "opcheck", "register", "schema_of", "schema_params"]
