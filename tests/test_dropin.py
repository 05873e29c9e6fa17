"""Drop-in: forward mode by hand, torch.func through the adapter, second order, custom ops,
torch.compile and torch.export (docs/dropin.md)."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import settings
from torch.func import grad, jacfwd, jacrev, jvp, vjp, vmap

import backprop
from backprop.autograd import apply
from backprop.testing.opinfo import OPS as OP_TABLE
from backprop.testing.references import REFERENCES

OPS = list(backprop.OPS)
F64 = torch.float64


def _cases(name, seed=0, dtype=F64):
    """The op table's small cases: a few tiny (args, options) per op, options covering each branch."""
    return OP_TABLE[name].small_cases(seed, dtype)


def _thorough_seeds():
    """Seed 0 in the default profile; more seeds when the hypothesis profile asks for more examples."""
    return range(1 + settings().max_examples // 100)


CASES = [pytest.param(name, k, id=f"{name}-{k}") for name in OPS for k in range(len(_cases(name)))]


def _is_float(a):
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def _as_function(fn, args, options):
    """fn(*args, **options) as a function of its float tensors alone (integer inputs closed over)."""
    slots = [k for k, a in enumerate(args) if _is_float(a)]

    def f(*floats):
        full = list(args)
        for k, v in zip(slots, floats):
            full[k] = v
        return fn(*full, **options)

    return f, tuple(args[k] for k in slots)


def _ours(name):
    return lambda *a, **o: apply(backprop.OPS[name], *a, **o)


# ---------------------------------------------------------------- 1. forward mode by hand


def _kernel_jvp(name, args, options, tangents):
    out, cache = backprop.OPS[name].forward(*args, **options)
    return backprop.OPS[name].jvp(tangents, cache)


def _torch_jvp(name, args, options, tangents):
    f, floats = _as_function(REFERENCES[name], args, options)
    return jvp(f, floats, tuple(t for t in tangents if t is not None))[1]


def _tangents(args, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    return tuple(torch.randn(a.shape, generator=g, dtype=a.dtype) if _is_float(a) else None for a in args)


@pytest.mark.parametrize("name,k", CASES)
def test_jvp_matches_torch_in_float64(name, k):
    for seed in _thorough_seeds():
        args, options = _cases(name, seed)[k]
        tangents = _tangents(args, seed)
        torch.testing.assert_close(_kernel_jvp(name, args, options, tangents),
                                   _torch_jvp(name, args, options, tangents), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,k", CASES)
def test_jvp_float32_error_is_torchs_at_most_twice(name, k):
    """Error against float64, ours vs torch's own float32 forward mode, plus a floor of 8 eps
    times the magnitude of the terms (|t| times the largest local derivative, about 1 here)."""
    eps = torch.finfo(torch.float32).eps
    for seed in _thorough_seeds():
        args, options = _cases(name, seed)[k]
        tangents = _tangents(args, seed)
        exact = _torch_jvp(name, args, options, tangents)
        down = lambda ts: tuple(t.float() if _is_float(t) else t for t in ts)  # noqa: E731
        options = dict(zip(options, down(options.values())))  # tensor options too (weight, running statistics)
        ours = _kernel_jvp(name, down(args), options, down(tangents)).double()
        theirs = _torch_jvp(name, down(args), options, down(tangents)).double()
        magnitude = max(max(t.abs().max().item() for t in tangents if t is not None), exact.abs().max().item())
        assert (ours - exact).abs().max() <= 2 * (theirs - exact).abs().max() + 8 * eps * magnitude


@pytest.mark.parametrize("name", OPS)
def test_jvp_with_no_tangent_for_some_inputs(name):
    """Only the first float input carries a tangent: the others count as zero."""
    args, options = _cases(name)[0]
    first = next(k for k, a in enumerate(args) if _is_float(a))
    tangents = tuple(torch.randn_like(a) if k == first else None for k, a in enumerate(args))
    f, floats = _as_function(REFERENCES[name], args, options)
    want = jvp(f, floats, tuple(t if t is not None else torch.zeros_like(a)
                                 for a, t in zip(args, tangents) if _is_float(a)))[1]
    torch.testing.assert_close(_kernel_jvp(name, args, options, tangents), want)


# ---------------------------------------------------------------- 2. torch.func through the adapter


def _pair(name, k):
    args, options = _cases(name)[k]
    ours, floats = _as_function(_ours(name), args, options)
    ref, _ = _as_function(REFERENCES[name], args, options)
    return ours, ref, floats


@pytest.mark.parametrize("name,k", CASES)
def test_func_grad_vjp_jacrev_jvp_jacfwd_equal_torchs(name, k):
    ours, ref, floats = _pair(name, k)
    argnums = tuple(range(len(floats)))
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(ref(*floats).shape, generator=g, dtype=F64)
    tangents = tuple(torch.randn(a.shape, generator=g, dtype=F64) for a in floats)
    scalar = lambda f: lambda *a: (f(*a) * dout).sum()  # noqa: E731
    for transform in (
        lambda f: grad(scalar(f), argnums=argnums)(*floats),
        lambda f: vjp(f, *floats)[1](dout),
        lambda f: jacrev(f, argnums=argnums)(*floats),
        lambda f: jvp(f, floats, tangents),
        lambda f: jacfwd(f, argnums=argnums)(*floats),
    ):
        torch.testing.assert_close(transform(ours), transform(ref))


@pytest.mark.parametrize("name,k", CASES)
def test_func_vmap_and_per_sample_grads_equal_torchs(name, k):
    """vmap over a batch of 3 of the first input (for cross_entropy: logits and targets)."""
    args, options = _cases(name, 0)[k]
    batched = [torch.stack([_cases(name, s)[k][0][0] for s in range(3)])]
    if name == "cross_entropy":  # one pattern of ignored rows for every sample (see docs/dropin.md)
        batched.append(torch.stack([args[1]] * 3))
    rest = args[len(batched):]
    in_dims = (0,) * len(batched) + (None,) * len(rest)
    run = lambda fn: vmap(lambda *a: fn(*a, **options), in_dims=in_dims)(*batched, *rest)  # noqa: E731
    # torch's own vmap of weighted label smoothing fails (masked_select): its answer sample by sample
    torch_vmap = not (name == "cross_entropy" and "weight" in options and options.get("label_smoothing"))
    loop = lambda fn: lambda *a: torch.stack([fn(*[x[s] for x in a[:len(batched)]], *rest)  # noqa: E731
                                              for s in range(3)])
    run_ref = run if torch_vmap else lambda fn: loop(lambda *a: fn(*a, **options))(*batched)  # noqa: E731
    torch.testing.assert_close(run(_ours(name)), run_ref(REFERENCES[name]))
    if not _is_float(args[0]):
        return  # embedding: per-sample gradients of the table are below, with the table batched
    per_sample = lambda fn: vmap(grad(lambda x, *a: fn(x, *a, **options).sum()), in_dims=in_dims)  # noqa: E731
    per_sample_ref = per_sample if torch_vmap else lambda fn: loop(grad(lambda x, *a: fn(x, *a, **options).sum()))  # noqa: E731
    torch.testing.assert_close(per_sample(_ours(name))(*batched, *rest),
                               per_sample_ref(REFERENCES[name])(*batched, *rest))


def test_vmap_over_the_table_of_embedding():
    idx = torch.tensor([[1, 1, 0], [3, 2, 1]])
    tables = torch.randn(4, 5, 3, dtype=F64)
    run = lambda fn: vmap(grad(lambda w: (fn(idx, w, padding_idx=1) ** 2).sum()))(tables)  # noqa: E731
    torch.testing.assert_close(run(_ours("embedding")), run(REFERENCES["embedding"]))


def test_vmap_keeps_the_eager_error_messages():
    logits = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 4\)"):
        vmap(_ours("cross_entropy"))(logits, torch.tensor([[0, 1, 2], [0, 9, 1]]))
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\)"):
        vmap(_ours("embedding"), in_dims=(0, None))(torch.tensor([[0, 1], [4, 1]]), torch.randn(4, 2))


def test_vmap_refuses_samples_with_different_ignored_counts():
    logits = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="cross_entropy under vmap needs one cache layout"):
        vmap(_ours("cross_entropy"))(logits, torch.tensor([[0, 1, 2], [0, -100, 1]]))


@pytest.mark.parametrize("name,k", CASES)
def test_second_order_gradgradcheck(name, k):
    """Double backward differentiates our backward_math (functionalised) with autograd."""
    ours, _, floats = _pair(name, k)
    leaves = tuple(a.detach().clone().requires_grad_() for a in floats)
    assert torch.autograd.gradgradcheck(ours, leaves, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name,k", CASES)
def test_hessian_equals_torchs(name, k):
    """Forward over reverse, reverse over reverse and reverse over forward agree with torch."""
    ours, ref, floats = _pair(name, k)
    scalar = lambda f: lambda *a: (f(*a) ** 2).sum()  # noqa: E731 (a non-linear head)
    # torch's reverse over reverse is the reference for all three: torch 2.13's own jacrev(jacfwd) of
    # F.batch_norm (training) disagrees with its jacrev(jacrev) by O(1) (ours agrees with both others)
    want = jacrev(jacrev(scalar(ref)))(*floats)
    for h in (jacfwd(jacrev(scalar(ours))), jacrev(jacrev(scalar(ours))), jacrev(jacfwd(scalar(ours)))):
        torch.testing.assert_close(h(*floats), want)


def test_forward_over_forward_is_a_clear_error():
    f = lambda x: apply(backprop.tanh, x).sum()  # noqa: E731
    with pytest.raises(NotImplementedError, match=r"tanh: forward over forward mode .* not supported"):
        jacfwd(jacfwd(f))(torch.randn(3, dtype=F64))


def test_first_order_adapter_gradient_is_still_the_kernels_bitwise():
    """create_graph=True takes the differentiable path: its first derivative equals the kernel's."""
    args, options = _cases("batch_norm")[0]
    out, cache = backprop.batch_norm.forward(*args, **options)
    dout = torch.randn_like(out)
    want = backprop.batch_norm.backward(dout, cache)
    leaves = [a.detach().clone().requires_grad_() for a in args]
    got = torch.autograd.grad(apply(backprop.batch_norm, *leaves, **options), leaves, dout, create_graph=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


@pytest.mark.parametrize("name,k", CASES)
def test_second_backward_rebuilds_prepares_args(name, k):
    """The differentiable backward rebuilds forward_math's Args by field name from the cache,
    forward's arguments and options (no host checks under vmap): they must equal prepare's."""
    from backprop.autograd import KernelFunction, _args_again

    args, options = _cases(name)[k]
    op = backprop.OPS[name]
    out, *extras, spec = KernelFunction.forward(op, options, *args)

    class Ctx:
        pass

    ctx = Ctx()
    ctx.op, ctx.options, ctx.spec = op, options, spec
    _, cache = op.forward(*args, **options)
    for a, b in zip(_args_again(ctx, list(args), cache), op.prepare(*args, **options)):
        assert (a is b) if isinstance(a, torch.Tensor) and a.is_floating_point() else (
            torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b)


# ---------------------------------------------------------------- 3. custom ops


def _library():
    import backprop.library

    return backprop.library


@pytest.mark.parametrize("name,k", CASES)
def test_opcheck(name, k):
    """schema, autograd registration, fake tensors and AOT dispatch with dynamic shapes."""
    lib = _library()
    for seed in _thorough_seeds():
        args, options = _cases(name, seed, dtype=torch.float32)[k]
        args = [a.requires_grad_() if _is_float(a) else a for a in args]
        lib.opcheck(name, *args, **options)


@pytest.mark.parametrize("name,k", CASES)
def test_custom_op_equals_the_kernel(name, k):
    """forward and the gradients of torch.ops.backprop.<op> are the kernel's, bitwise."""
    _library()
    op, custom = backprop.OPS[name], getattr(torch.ops.backprop, name)
    args, options = _cases(name, 3)[k]
    out, cache = op.forward(*args, **options)
    dout = torch.randn_like(out)
    want = op.backward(dout, cache)
    leaves = [a.detach().clone().requires_grad_() if _is_float(a) else a for a in args]
    got_out = custom(*leaves, **options)
    got = torch.autograd.grad(got_out, [a for a in leaves if _is_float(a)], dout)
    torch.testing.assert_close(got_out, out, rtol=0, atol=0)
    for g, w in zip(got, [w for w in want if w is not None]):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_custom_op_backward_rebuilds_a_layout_once_per_signature(monkeypatch):
    """The backward op reads the cache's plain fields off a meta run of forward_math once per
    shapes-and-options signature, not at every call (it cost 1-17 ms a call: docs/benchmarks-log.md);
    a new shape or option gets its own run, and the gradients stay the kernel's."""
    _library()
    runs = []
    real = backprop.logsumexp.forward_math

    def counted(args):
        runs.append(args.x.device.type)
        return real(args)

    monkeypatch.setattr(backprop.logsumexp, "forward_math", counted)
    for shape, dim in [((3, 4), 1), ((3, 4), 1), ((3, 4), 0), ((5, 4), 1), ((3, 4), 1)]:
        x = torch.randn(*shape, dtype=F64, requires_grad=True)
        (got,) = torch.autograd.grad(torch.ops.backprop.logsumexp(x, dim=dim).sum(), x)
        torch.testing.assert_close(got, torch.softmax(x.detach(), dim), rtol=1e-12, atol=1e-12)
    assert runs.count("meta") <= 3  # (3, 4) dim 1, (3, 4) dim 0, (5, 4) dim 1


def test_custom_op_gradient_of_a_transposed_weight_under_compile():
    """A kernel's gradient for a strided input (a transposed weight) is contiguous, as the backward
    op's fake says: Inductor checks the strides it was promised."""
    _library()
    x, W = torch.randn(4, 3, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    f = torch.compile(lambda x, W: torch.ops.backprop.linear(x, W.T, None).sum(), fullgraph=True)
    got = torch.autograd.grad(f(x, W), (x, W))
    want = torch.autograd.grad(torch.nn.functional.linear(x, W.T).sum(), (x, W))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_custom_op_schemas_mirror_forward():
    lib = _library()
    assert lib.schema_of(backprop.cross_entropy.forward) == (
        '(Tensor logits, Tensor targets, Tensor? weight=None, *, str reduction="mean", int ignore_index=-100, '
        'float label_smoothing=0.0)')
    assert str(torch.ops.backprop.batch_norm.default._schema).startswith(
        "backprop::batch_norm(Tensor x, Tensor? weight=None, Tensor? bias=None, Tensor? running_mean=None, "
        "Tensor? running_var=None, *, bool training=True, float? momentum=0.1")  # custom_op: no kwarg-only tensor
    # one gradient per positional argument of forward (an empty tensor where there is none)
    assert str(torch.ops.backprop.linear_backward.default._schema).endswith("-> (Tensor, Tensor, Tensor)")
    assert str(torch.ops.backprop.tanh_backward.default._schema).endswith("-> Tensor")


@pytest.mark.parametrize("call,error,message", [
    (lambda: torch.ops.backprop.cross_entropy(torch.randn(3, 4), torch.tensor([0, 4, 1])),
     ValueError, r"targets must lie in \[0, 4\) \(or ignore_index=-100\), got 4 at index \(1,\)"),
    (lambda: torch.ops.backprop.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1])),
     ValueError, r"targets must have shape \(3,\)"),
    (lambda: torch.ops.backprop.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 1]), reduction="avg"),
     ValueError, "reduction must be one of"),
    (lambda: torch.ops.backprop.embedding(torch.tensor([[0, 5]]), torch.randn(5, 2)),
     ValueError, r"indices must lie in \[0, 5\), got 5 at index \(0, 1\)"),
    (lambda: torch.ops.backprop.embedding(torch.tensor([0]), torch.randn(5, 2), padding_idx=7),
     ValueError, r"padding_idx must lie in \[-5, 4\]"),
    (lambda: torch.ops.backprop.batch_norm(torch.randn(1, 3), correction=1), ValueError, "more rows than"),
])
def test_custom_ops_keep_the_eager_messages(call, error, message):
    _library()
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_custom_op_cross_entropy_takes_uint8_targets_as_torch(ignore_index):
    """uint8 (Byte) targets: F.cross_entropy and the eager kernel accept them; the custom op's
    sync-free prepare refused them (TypeError: dtype torch.int64)."""
    _library()
    logits = torch.randn(4, 5, dtype=F64)
    targets = torch.tensor([4, 0, 2, 0], dtype=torch.uint8)
    options = dict(label_smoothing=0.1, ignore_index=ignore_index)
    leaves = [logits.clone().requires_grad_() for _ in range(2)]
    got = torch.ops.backprop.cross_entropy(leaves[0], targets, **options)
    want = torch.nn.functional.cross_entropy(leaves[1], targets, **options)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, leaves[0])[0], torch.autograd.grad(want, leaves[1])[0])


def _custom(name):
    return lambda *a, **o: getattr(torch.ops.backprop, name)(*a, **o)


@pytest.mark.parametrize("name,k", CASES)
def test_custom_op_second_order_gradgradcheck(name, k):
    """A double backward through torch.ops.backprop.<op>: <op>_backward's registered derivative
    differentiates our backward_math (as the adapter does). Finite differences of the first
    derivative in float64; gradcheck's fast mode (random projections) in the default profile,
    every Jacobian entry when the profile asks for more examples."""
    _library()
    args, options = _cases(name)[k]
    ours, floats = _as_function(_custom(name), args, options)
    leaves = tuple(a.detach().clone().requires_grad_() for a in floats)
    assert torch.autograd.gradgradcheck(ours, leaves, eps=1e-6, atol=1e-5, rtol=1e-4,
                                        fast_mode=settings().max_examples < 100)


def test_second_backward_through_a_custom_op_differentiates_its_backward_op():
    _library()
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(torch.ops.backprop.tanh(x).sum(), x, create_graph=True)
    assert "backprop_tanh_backward" in type(g.grad_fn).__name__  # the backward op, differentiable
    (h,) = torch.autograd.grad(g.sum(), x)
    y = torch.tanh(x.detach())
    torch.testing.assert_close(h, -2 * y * (1 - y * y))  # d/dx of sum(1 - tanh(x)**2)


def test_a_users_own_op_registers_and_checks_the_same_way():
    """register() takes any module with the kernel contract; opcheck() checks it as ours."""
    import types

    lib = _library()
    mine = types.ModuleType("mine")
    mine.forward, mine.prepare, mine.forward_math = (backprop.tanh.forward, backprop.tanh.prepare,
                                                     backprop.tanh.forward_math)
    mine.backward = backprop.tanh.backward
    lib.register("my_tanh", lib.Entry(mine), namespace="backprop_test")
    x = torch.randn(4, requires_grad=True)
    lib.opcheck(torch.ops.backprop_test.my_tanh.default, x)


# ---------------------------------------------------------------- 4. compile and export


def _mlp_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    V, E, T, H = 27, 10, 3, 64
    params = [torch.randn(V, E, generator=g), torch.randn(H, T * E, generator=g) * 0.2,
              torch.randn(H, generator=g) * 0.1, torch.randn(V, H, generator=g) * 0.1,
              torch.zeros(V), torch.ones(H), torch.zeros(H)]
    X, Y = torch.randint(0, V, (32, T), generator=g), torch.randint(0, V, (32,), generator=g)
    return params, X, Y


def _mlp_custom(C, W1, b1, W2, b2, gamma, beta, X, Y):
    ops = torch.ops.backprop
    emb = ops.embedding(X, C)  # (N, T, E)
    h = ops.linear(emb.view(X.shape[0], -1), W1, b1)  # (N, H)
    h = ops.tanh(ops.batch_norm(h, gamma, beta, correction=1))
    return ops.cross_entropy(ops.linear(h, W2, b2), Y)


def _mlp_kernels(C, W1, b1, W2, b2, gamma, beta, X, Y):
    emb = apply(backprop.embedding, X, C)
    h = apply(backprop.linear, emb.view(X.shape[0], -1), W1, b1)
    h = apply(backprop.tanh, apply(backprop.batch_norm, h, gamma, beta, correction=1))
    return apply(backprop.cross_entropy, apply(backprop.linear, h, W2, b2), Y)


def _loss_and_grads(fn, params, X, Y):
    leaves = [p.clone().requires_grad_() for p in params]
    loss = fn(*leaves, X, Y)
    return loss, torch.autograd.grad(loss, leaves)


def test_importing_the_custom_ops_tags_torch_compiles_caches_with_backprops_sources():
    """torch.compile's disk caches key a graph by its custom ops' names alone: backprop.library adds
    its sources' digest to torch.compiler.config.cache_key_tag, so a graph compiled against another
    backprop (another schema or fake) is not loaded. A tag the user set stays, and it is added once.
    That torch puts the tag in its keys is torch's (documented) part: checked by hand on a stale
    cache, docs/benchmarks.md (session 14)."""
    if not hasattr(getattr(torch.compiler, "config", None), "cache_key_tag"):
        pytest.skip("this torch has no torch.compiler.config.cache_key_tag")
    code = ("import torch, backprop.library as lib; first = torch.compiler.config.cache_key_tag; "
            "lib.tag_compile_caches(); print(first, torch.compiler.config.cache_key_tag, lib.source_digest())")
    env = {**os.environ, "TORCH_COMPILE_CACHE_KEY_TAG": "mine"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    first, again, digest = done.stdout.split()
    assert first == again == f"mine+backprop-{digest}"


def test_the_sources_digest_changes_with_any_file_that_defines_an_op(tmp_path):
    from backprop.library import source_digest

    sources = ("op.py", "cpp/op.cpp", "cpp/common.h", "cpp/op.py", "testing/mutants/fake.py")
    others = ("notes.txt", "makemore/train.py", "testing/strategies.py")  # no op is defined there
    for name in sources + others:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"# {name}\n")
    (tmp_path / ".#op.py").symlink_to(tmp_path / "gone")  # an editor's lock file: a dangling link
    before = source_digest(tmp_path)
    assert len(before) == 16 and source_digest(tmp_path) == before
    for name in others:
        (tmp_path / name).write_text("edited")
        assert source_digest(tmp_path) == before, name
    for name in sources:
        path = tmp_path / name
        text = path.read_text()
        path.write_text(text + " ")
        assert source_digest(tmp_path) != before, name
        path.write_text(text)
        assert source_digest(tmp_path) == before
    (tmp_path / "cpp/op.cpp").rename(tmp_path / "cpp/other.cpp")  # same bytes, another file
    assert source_digest(tmp_path) != before


@pytest.mark.skipif(not __import__("shutil").which("g++"), reason="Inductor on the CPU needs g++")
def test_makemore_mlp_compiles_fullgraph_and_matches_the_eager_kernels():
    _library()
    torch._dynamo.reset()
    params, X, Y = _mlp_params()
    want_loss, want = _loss_and_grads(_mlp_kernels, params, X, Y)
    compiled = torch.compile(_mlp_custom, fullgraph=True)  # a graph break raises
    loss, got = _loss_and_grads(compiled, params, X, Y)
    torch.testing.assert_close(loss, want_loss)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 27\)"):
        compiled(*params, X, torch.full_like(Y, 27))


def test_makemore_mlp_exports_with_the_ops_opaque():
    _library()

    class MLP(torch.nn.Module):
        def __init__(self, params):
            super().__init__()
            self.params = torch.nn.ParameterList(params)

        def forward(self, X, Y):
            return _mlp_custom(*self.params, X, Y)

    params, X, Y = _mlp_params()
    model = MLP(params)
    exported = torch.export.export(model, (X, Y))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    mlp_ops = {"embedding", "linear", "batch_norm", "tanh", "cross_entropy"}
    assert targets == {f"backprop.{op}.default" for op in mlp_ops} | {"aten.view.default"}, targets
    torch.testing.assert_close(exported.module()(X, Y), _mlp_kernels(*params, X, Y))


# ---------------------------------------------------------------- 5. the harness's drop-in stages


@pytest.mark.parametrize("name", OPS)
def test_check_case_runs_every_stage_on_drawn_cases(name):
    """check_case with every stage: jvp, second-order, vmap and opcheck on drawn cases. opcheck
    compiles (seconds a call): a twentieth of the profile's examples, at least 2 (ci: 2, thorough: 50).
    The other stages run on every drawn case of tests/test_<op>.py (check_case's default)."""
    from hypothesis import given

    from backprop.testing import stages
    from backprop.testing.opinfo import OPS as OP_INFO
    from backprop.testing.suite import ALL_CHECKS, check_case

    op = backprop.OPS[name]
    assert stages.applicable(name, op) == set(stages.STAGES)

    @settings(max_examples=max(2, settings().max_examples // 20))
    @given(case=OP_INFO[name].cases())
    def run(case):
        check_case(name, op, case, checks=ALL_CHECKS)

    run()


def test_compiled_ops_and_bare_kernels_get_the_oracle_alone():
    from types import SimpleNamespace

    from backprop.testing import stages

    bare = SimpleNamespace(forward=backprop.tanh.forward, backward=backprop.tanh.backward)
    assert stages.applicable("tanh", bare) == set()
    with pytest.raises(ValueError, match="unknown checks"):
        stages.run("tanh", backprop.tanh, REFERENCES["tanh"], ((torch.randn(3),), {}), ["jvp", "hessian"])


@pytest.mark.parametrize("path", ["adapter", "custom op"])
def test_embedding_second_order_divides_by_the_counts(path):
    """scale_grad_by_freq divides dweight by each row's count, so d<dweight, v>/ddout is v's row
    divided by its count. torch's double backward of F.embedding leaves the count out (its
    embedding_dense_double_backward takes none), which is why the second-order stage checks
    embedding against the twin without scale_grad_by_freq (opinfo's second_order_inputs)."""
    _library()
    fn = _ours("embedding") if path == "adapter" else _custom("embedding")
    idx = torch.tensor([[0, 0, 2], [1, 0, 2]])
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=g, dtype=F64).requires_grad_()
    dout = torch.randn(2, 3, 3, generator=g, dtype=F64).requires_grad_()
    v = torch.randn(4, 3, generator=g, dtype=F64)
    counts = torch.bincount(idx.reshape(-1), minlength=4).clamp(min=1).to(F64)

    def second(fn):
        (dw,) = torch.autograd.grad(fn(idx, w, scale_grad_by_freq=True), w, dout, create_graph=True)
        return torch.autograd.grad((dw * v).sum(), dout)[0]

    torch.testing.assert_close(second(fn), (v / counts[:, None])[idx])
    torch.testing.assert_close(second(REFERENCES["embedding"]), v[idx])  # torch's: undivided
