"""backprop's ops as PyTorch custom ops: ``torch.ops.backprop.<op>``, opaque to compile and export.

    import backprop.library  # registers the ops
    loss = torch.ops.backprop.cross_entropy(logits, targets, label_smoothing=0.1)
    loss.backward()  # runs torch.ops.backprop.cross_entropy_backward: our hand-written backward

Each op in ``TABLE`` (every op of ``backprop.OPS``) becomes three custom ops whose schemas are
read off the module's ``forward`` signature (options stay keyword-only arguments, but for a tensor
option such as cross_entropy's weight: custom_op refuses keyword-only tensors, so it follows the
positional arguments, still passed by name):

    backprop::<op>(<forward's arguments>) -> Tensor                 the public op
    backprop::<op>_forward(<forward's arguments>) -> (Tensor out, Tensor cache0, ...)
    backprop::<op>_backward(Tensor dout, Tensor out, Tensor cache0, ..., <forward's arguments>) -> (Tensor, ...)

``<op>`` is ``<op>_forward``'s first output. The cache crosses the op boundary as tensors: the
forward op also returns the cache's tensors that are neither inputs nor ``out`` (``CACHE_SLOTS``
slots, the unused ones empty), so the backward never recomputes the forward; the cache's plain
fields are read off prepare and forward_math run on meta tensors (shapes only). Each has a fake
(meta) implementation, and ``register_autograd`` ties ``<op>_forward`` to ``<op>_backward``, which
runs the module's ``backward_math`` (one gradient per positional argument of ``forward``, an empty
tensor where there is none). Second order: ``<op>_backward`` has a registered derivative, autograd
through our ``backward_math`` on a cache that ``forward_math`` recomputes from the inputs, both
functionalised (``backprop.autograd.differentiable_grads``, the adapter's method), so a backward
with ``create_graph=True`` and a second one through it work.

torch.compile's on-disk caches (Inductor's and AOTAutograd's, ``/tmp/torchinductor_$USER``) key a
graph by its custom ops' names, not by their schemas or fakes: a graph compiled against another
backprop's ops would be loaded and fail ("wrong number of dimensions1 for op:
torch.ops.backprop.batch_norm_forward.default", after that op's outputs changed). So importing this
module appends ``backprop-<digest of backprop's sources>`` to ``torch.compiler.config.cache_key_tag``,
torch's own cache breaker (a tag already there is kept): each backprop has graphs of its own. The tag
is the process's: the other graphs compiled there (your models') are keyed by it too, so they compile
afresh once after backprop changes. A tag set after this import replaces ours. A torch without the
setting (older than about 2.6) gets no tag: clear its cache directory after upgrading backprop.

Host checks: ops whose ``prepare`` reads targets or indices on the host use a sync-free
``prepare`` (``backprop._sync_free``): the range check on the device, the eager message on the CPU.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import torch

import backprop
from backprop._sync_free import SYNC_FREE_PREPARE
from backprop.autograd import differentiable_grads, join_cache, split_cache

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


def tensor_options(forward: Callable) -> tuple[str, ...]:
    """forward's keyword-only tensor parameters (cross_entropy's weight). custom_op refuses
    keyword-only tensors, so the schema lists them after forward's positional parameters (callers
    still pass them by name); they get no gradient, as in the kernel's backward."""
    return tuple(p.name for p in inspect.signature(forward).parameters.values()
                 if p.kind is p.KEYWORD_ONLY and _SCHEMA_TYPES.get(p.annotation, "").startswith("Tensor"))


def schema_of(forward: Callable, prefix: str = "") -> str:
    """The custom-op schema of ``forward``'s signature: ``(Tensor x, *, int dim=-1) -> Tensor``.
    ``prefix`` is prepended to the arguments (the backward op's ``Tensor dout, ``)."""
    params = list(inspect.signature(forward).parameters.values())
    moved = tensor_options(forward)
    params = ([p for p in params if p.kind is not p.KEYWORD_ONLY] + [p for p in params if p.name in moved]
              + [p for p in params if p.kind is p.KEYWORD_ONLY and p.name not in moved])
    parts, keyword_only = [], False
    for p in params:
        if p.kind is p.KEYWORD_ONLY and p.name not in moved and not keyword_only:
            parts.append("*")
            keyword_only = True
        if p.annotation not in _SCHEMA_TYPES:
            raise TypeError(f"{forward.__module__}.forward: no schema type for {p.name}: {p.annotation}")
        default = "" if p.default is p.empty else "=" + _literal(p.default)
        parts.append(f"{_SCHEMA_TYPES[p.annotation]} {p.name}{default}")
    return f"({prefix}{', '.join(parts)})"


class Entry(NamedTuple):
    """One op: its module (forward's signature gives the schema) and, where the module's prepare
    reads tensors on the host, a sync-free prepare with the same arguments."""

    module: ModuleType
    prepare: Callable[..., tuple] | None = None


# the sync-free prepares (backprop._sync_free); every other op of backprop.OPS uses its module's own
TABLE = {name: Entry(module, SYNC_FREE_PREPARE.get(name)) for name, module in backprop.OPS.items()}


def _is_float(a: object) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def _storage(t: torch.Tensor) -> int | None:
    """Where t's memory starts; None for meta and fake tensors, which have none to compare."""
    if t.device.type == "meta":
        return None
    # a plain eager tensor (the common call) is neither; is_fake walks subclasses and wrappers
    wrapped = type(t) is not torch.Tensor or torch._is_functional_tensor(t)
    if wrapped and torch._subclasses.fake_tensor.is_fake(t):
        return None
    return t.untyped_storage().data_ptr()


def _on_meta(a: object) -> object:
    return torch.empty_like(a, device="meta") if isinstance(a, torch.Tensor) else a


def _signature(args: tuple, options: dict) -> tuple | None:
    """What the meta run that rebuilds a cache's layout reads: each tensor's shape, strides and
    dtype, every other value as it is; None when a value cannot be a dict key (no caching)."""
    def describe(a: object) -> object:  # no tensor itself: a key must not keep one alive
        if isinstance(a, torch.Tensor):
            return tuple(a.shape), a.stride(), a.dtype
        return tuple(a) if isinstance(a, list) else a  # an int[] argument arrives as a list

    key = (*map(describe, args), *((k, describe(v)) for k, v in options.items()))
    try:
        hash(key)
    except TypeError:
        return None
    return key


LAYOUTS_KEPT = 256  # layouts remembered per op (a new shape past that starts the memory afresh)


def register(name: str, entry: Entry, namespace: str = NAMESPACE) -> tuple:
    """Register ``<namespace>::<name>`` and ``<namespace>::<name>_backward`` for an op module with
    the backprop contract (prepare / forward_math / backward_math). Returns both custom ops.

    The cache crosses the op boundary as tensors: ``<name>_forward`` returns ``[out, *extras]``
    (the cache's tensors that are neither inputs nor ``out``) and ``<name>`` is its first output,
    so the backward never recomputes the forward. The cache's plain fields (counts, flags, dims)
    are read off a run of prepare and forward_math on meta tensors: shapes only, no arithmetic."""
    module = entry.module
    prepare = entry.prepare or module.prepare
    backward_math = getattr(module, "backward_math", module.backward)  # a user's module may have no split
    n_args = sum(p.kind is not p.KEYWORD_ONLY for p in inspect.signature(module.forward).parameters.values())
    moved = tensor_options(module.forward)

    def call(args, options):
        """The schema's arguments as forward's: the tensor options moved back to keywords."""
        return args[:n_args], {**dict(zip(moved, args[n_args:])), **options}

    def forward_impl(*args, **options):
        args, options = call(args, options)
        out, cache = module.forward_math(prepare(*args, **options))
        extras, _ = split_cache((*args, *options.values()), out, cache)
        if len(extras) > CACHE_SLOTS:
            raise RuntimeError(f"{name}: {len(extras)} cache tensors, more than the {CACHE_SLOTS} slots")
        # a custom op's outputs may not share memory with its inputs or with each other: copy a
        # cache tensor that does (a reshaped input, say), and only that one
        seen = {_storage(t) for t in (*args, *options.values(), out) if isinstance(t, torch.Tensor)}
        kept = []
        for e in extras:
            # (a view of the kernel's own temporary, x-hat reshaped say, aliases nothing: kept)
            if _storage(e) is not None and _storage(e) in seen:
                e = e.clone()
            seen.add(_storage(e))
            kept.append(e)
        extras = kept
        return (out, *extras, *(out.new_empty(0) for _ in range(CACHE_SLOTS - len(extras))))

    layouts: dict = {}  # the cache's layout per _signature: it depends on shapes and options only

    def rebuild(out, extras, args, options):
        key = _signature(args, options)
        layout = layouts.get(key) if key is not None else None
        if layout is None:
            meta, meta_options = tuple(map(_on_meta, args)), {k: _on_meta(v) for k, v in options.items()}
            meta_out, meta_cache = module.forward_math(prepare(*meta, **meta_options))
            _, layout = split_cache((*meta, *meta_options.values()), meta_out, meta_cache)
            if key is not None:
                if len(layouts) >= LAYOUTS_KEPT:
                    layouts.clear()
                layouts[key] = layout
        return join_cache(layout, (*args, *options.values()), out, extras)

    def backward_impl(dout, out, *rest, **options):
        extras = rest[:CACHE_SLOTS]
        args, options = call(rest[CACHE_SLOTS:], options)
        cache = rebuild(out, extras, args, options)
        # backward_math, not backward: autograd's saved tensors already refuse in-place edits
        # contiguous, as the fake promises: a kernel may return a gradient in its input's strides
        # (a transposed weight) or not, and a compiled graph trusts the fake's strides
        grads = tuple(dout.new_empty(0) if g is None else g.contiguous() if g.layout == torch.strided else g
                      for g in backward_math(dout, cache))
        return grads if n_args > 1 else grads[0]  # a one-Tensor schema returns the Tensor itself

    def backward_fake(dout, out, *rest, **options):
        args = rest[CACHE_SLOTS:CACHE_SLOTS + n_args]  # omitted trailing optionals are not passed
        grads = tuple(a.new_empty(a.shape) if _is_float(a) else dout.new_empty(0)
                      for a in (*args, *[None] * (n_args - len(args))))
        return grads if n_args > 1 else grads[0]

    schema = schema_of(module.forward)
    # fixed tuples, not Tensor[]: torch 2.13's autograd for custom ops with a Tensor[] in the schema
    # rejects a backward for an op called with an optional tensor set to None (a pytree mismatch).
    # The backward op returns one gradient per positional argument, empty where there is none
    fwd = torch.library.custom_op(f"{namespace}::{name}_forward", forward_impl, mutates_args=(),
                                  schema=schema + f" -> ({', '.join(['Tensor'] * (1 + CACHE_SLOTS))})")
    slots = "".join(f"Tensor cache{i}, " for i in range(CACHE_SLOTS))
    bwd = torch.library.custom_op(f"{namespace}::{name}_backward", backward_impl, mutates_args=(),
                                  schema=schema_of(module.forward, f"Tensor dout, Tensor out, {slots}")
                                  + f" -> ({', '.join(['Tensor'] * n_args)})")
    fwd.register_fake(forward_impl)  # prepare and forward_math on fake tensors: no host read left
    bwd.register_fake(backward_fake)

    def setup_context(ctx, inputs, output, keyword_only_inputs=None):  # called by keyword
        ctx.slots = [isinstance(a, torch.Tensor) for a in inputs]
        ctx.save_for_backward(*(a for a in inputs if isinstance(a, torch.Tensor)), *output)
        ctx.n_inputs = sum(ctx.slots)
        ctx.plain = [None if t else a for a, t in zip(inputs, ctx.slots)]
        ctx.options = keyword_only_inputs or {}
        # the cache outputs never get a gradient: do not materialise zeros of their size for them
        ctx.set_materialize_grads(False)

    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        inputs, (out, *extras) = iter(saved[:ctx.n_inputs]), saved[ctx.n_inputs:]
        args = [next(inputs) if t else a for a, t in zip(ctx.plain, ctx.slots)]
        dout = grads[0] if grads[0] is not None else torch.zeros_like(out)
        dgrads = bwd(dout.contiguous(), out, *extras, *args, **ctx.options)
        dgrads = dgrads if n_args > 1 else (dgrads,)
        # the tensor options (after the first n_args) get no gradient, as in the kernel's backward
        return tuple(dgrads[k] if k < n_args and _is_float(a) else None for k, a in enumerate(args))

    def setup_second_order(ctx, inputs, output, keyword_only_inputs=None):
        rest = inputs[2 + CACHE_SLOTS:]  # forward's arguments; out and the cache are rebuilt from them
        ctx.slots = [isinstance(a, torch.Tensor) for a in rest]
        ctx.save_for_backward(inputs[0], *(a for a in rest if isinstance(a, torch.Tensor)))
        ctx.plain = [None if t else a for a, t in zip(rest, ctx.slots)]
        ctx.options = keyword_only_inputs or {}

    def second_order(ctx, *ggrads):
        """The derivative of <name>_backward: autograd through our backward_math on a cache that
        forward_math recomputes from the inputs, both functionalised (backprop.autograd's
        differentiable_grads, as the adapter's second order). out and the cache tensors get no
        gradient: their dependence on the inputs is in the recomputation."""
        dout, *tensors = ctx.saved_tensors
        tensors = iter(tensors)
        rest = [next(tensors) if t else a for a, t in zip(ctx.plain, ctx.slots)]
        wrt = [k for k, a in enumerate(rest) if k < n_args and _is_float(a)]  # the real gradients

        def grads_of(dout, *floats):
            full = list(rest)
            for k, v in zip(wrt, floats):
                full[k] = v
            args, options = call(full, ctx.options)
            grads = differentiable_grads(module, prepare(*args, **options), dout)
            return [g for g in grads if g is not None]

        floats = [rest[k] for k in wrt]
        grads, pullback = torch.func.vjp(grads_of, dout, *floats)
        ggrads = [ggrads[k] for k in wrt]
        ddout, *dfloats = pullback([torch.zeros_like(g) if gg is None else gg for g, gg in zip(grads, ggrads)])
        drest = [None] * len(rest)
        for k, d in zip(wrt, dfloats):
            drest[k] = d
        return (ddout, None, *[None] * CACHE_SLOTS, *drest)

    fwd.register_autograd(backward, setup_context=setup_context)
    bwd.register_autograd(second_order, setup_context=setup_second_order)
    # the public op: the first output of <name>_forward (one Tensor, as the twin returns)
    qualname = f"{namespace}::{name}"
    if namespace not in _LIBS:
        _LIBS[namespace] = torch.library.Library(namespace, "FRAGMENT")
    torch.library.define(qualname, schema + " -> Tensor", lib=_LIBS[namespace])
    arguments = fwd._opoverload._schema.arguments
    positional = sum(not p.kwarg_only for p in arguments)
    keyword_only = [p.name for p in arguments if p.kwarg_only]

    def public(*args, **options):
        # the dispatcher may hand keyword-only arguments over by position: name them again
        named = dict(zip(keyword_only, args[positional:]))
        return fwd(*args[:positional], **named, **options)[0]

    torch.library.impl(qualname, "CompositeImplicitAutograd", lib=_LIBS[namespace])(public)
    return getattr(getattr(torch.ops, namespace), name), bwd


CACHE_SLOTS = 6  # the most cache tensors an op's forward op returns besides out (unused ones are empty)
_LIBS: dict[str, torch.library.Library] = {}  # per namespace: keeps the public ops' definitions alive


# what defines the ops, their schemas and their fakes: the op modules and this one, backprop.cpp, and
# the mutants' own custom ops
_SOURCES = ("*.py", "cpp/*.py", "cpp/*.cpp", "cpp/*.h", "testing/mutants/*.py")


def source_digest(root: Path | None = None) -> str:
    """sha256 of the files in ``_SOURCES`` under ``root`` (the package's folder by default), with
    their paths, 16 hex digits. Anything else (a link to nothing, an editor's lock file) is skipped."""
    root = Path(backprop.__file__).parent if root is None else root
    h = hashlib.sha256()
    for p in sorted({p for pattern in _SOURCES for p in root.glob(pattern)}):
        try:
            text = p.read_bytes() if p.is_file() else None
        except OSError:
            text = None
        if text is not None:
            h.update(p.relative_to(root).as_posix().encode() + b"\0" + text + b"\0")
    return h.hexdigest()[:16]


def tag_compile_caches() -> str:
    """Append ``backprop-<source_digest()>`` to torch.compiler.config.cache_key_tag (the module's
    docstring says why), once; return the whole tag ("" on a torch without one: torch < 2.6 or so)."""
    config = getattr(torch.compiler, "config", None)
    if not hasattr(config, "cache_key_tag"):
        return ""
    tag = f"backprop-{source_digest()}"
    if tag not in config.cache_key_tag.split("+"):
        config.cache_key_tag = "+".join(t for t in (config.cache_key_tag, tag) if t)
    return config.cache_key_tag


tag_compile_caches()
OPS = {name: register(name, entry) for name, entry in TABLE.items()}

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def opcheck(op: Any, *args: Any, **kwargs: Any) -> dict[str, str]:
    """torch.library.opcheck with the four checks backprop's ops pass: ``op`` is a name in TABLE
    (``"tanh"``) or any custom op (your own: ``torch.ops.mylib.myop``). Raises on a failure."""
    if isinstance(op, str):
        op = getattr(getattr(torch.ops, NAMESPACE), op)
    return torch.library.opcheck(op, args, kwargs, test_utils=OPCHECK_UTILS)


__all__ = ["OPCHECK_UTILS", "OPS", "TABLE", "Entry", "opcheck", "register", "schema_of", "source_digest",
           "tag_compile_caches", "tensor_options"]
