"""One SGD step of the makemore MLP (hidden 200, batch 32), as makemore.train runs it: manual
(step.eager_step: the kernels' maths, eager), manual-compiled (aot.compiled_step: the whole step
built ahead of time on the CPU, torch.compile on CUDA), autograd (step.eager_step with
backward='autograd'), and, for scale, the notebook's own fused manual step written with raw torch
ops. Every contender gathers its batch (rows ix of the training set) and updates in place.

The drop-in contenders (issue 15): the same model written with torch.ops.backprop.* (custom-op-compiled)
and with torch's functionals (functional-compiled: F.embedding, F.linear, the notebook's composed
BatchNorm with the Bessel-corrected variance that our batch_norm(correction=1) computes, torch.tanh,
F.cross_entropy), each under torch.compile(fullgraph=True): the batch gather and the forward
compiled, loss.backward() through the compiled backward, then step.update's SGD, as the autograd
contender does it. Both keep the linear weights in F.linear's (out, in) layout (see linear_layout).
test_train_step_compiled_models times the two in paired rounds (a ratio with an interval)."""

import os

import pytest
import torch
import torch.nn.functional as F

import backprop.library  # noqa: F401  registers torch.ops.backprop.*
from backprop import bench as stats
from backprop.compiled import cpu_compiler_found
from backprop.makemore import aot, model, notebook, step

COMPILED_MODELS = ["custom-op-compiled", "functional-compiled"]
BUDGET = float(os.environ.get("BACKPROP_BENCH_BUDGET", "2"))
MIN_ROUNDS = int(os.environ.get("BACKPROP_BENCH_ROUNDS", "5"))


@pytest.fixture(params=["manual", "manual-compiled", "autograd", "notebook", *COMPILED_MODELS])
def variant(request):
    return request.param


def custom_op_loss(p, Xb, Yb):
    """The makemore MLP on torch.ops.backprop.* (W1, W2 in linear_layout)."""
    ops, n = torch.ops.backprop, Xb.shape[0]
    emb = ops.embedding(Xb, p["C"])  # (N, T, E)
    hprebn = ops.linear(emb.view(n, -1), p["W1"], p["b1"])  # (N, H)
    hpreact = ops.batch_norm(hprebn, p["bngain"].view(-1), p["bnbias"].view(-1), eps=model.BN_EPS,
                             correction=1)
    return ops.cross_entropy(ops.linear(ops.tanh(hpreact), p["W2"], p["b2"]), Yb)


def functional_loss(p, Xb, Yb):
    """The same model on torch's functionals; BatchNorm as model.autograd_loss composes it (torch
    has no op normalising by the Bessel-corrected variance; F.batch_norm divides by N)."""
    n = Xb.shape[0]
    emb = F.embedding(Xb, p["C"])  # (N, T, E)
    hprebn = F.linear(emb.view(n, -1), p["W1"], p["b1"])  # (N, H)
    hpreact = model.batch_norm_composed(hprebn, p["bngain"].view(-1), p["bnbias"].view(-1),
                                        eps=model.BN_EPS, correction=1)
    return F.cross_entropy(F.linear(torch.tanh(hpreact), p["W2"], p["b2"]), Yb)


LOSSES = {"custom-op-compiled": custom_op_loss, "functional-compiled": functional_loss}


def linear_layout(params):
    """The parameters with W1 and W2 as F.linear's (out, in) weights, contiguous. The notebook's
    (in, out) matrices would enter as transposed views, and torch.ops.backprop.linear's backward
    fake kernel declares dweight with the weight's strides (empty_like) while the kernel returns it
    contiguous: Inductor's stride assertion fails on the view (torch 2.13)."""
    return {**params, "W1": params["W1"].T.contiguous(), "W2": params["W2"].T.contiguous()}


def compiled_model_step(params, Xtr, Ytr, variant, *, backend="inductor"):
    """A step (ix, lr) -> loss of the model LOSSES[variant] under torch.compile(fullgraph=True):
    gather and forward compiled, loss.backward() (the compiled backward), then step.update's SGD in
    place, as step.eager_step(backward='autograd') does. params: linear_layout's, updated in place."""
    loss_fn = LOSSES[variant]

    def batch_loss(p, ix):
        return loss_fn(p, Xtr.index_select(0, ix), Ytr.index_select(0, ix))

    compiled = torch.compile(batch_loss, fullgraph=True, backend=backend)
    for p in params.values():
        p.requires_grad_()

    def run(ix, lr):
        for p in params.values():
            p.grad = None
        loss = compiled(params, ix)
        loss.backward()
        with torch.no_grad():
            step.update("sgd", params, {k: p.grad for k, p in params.items()}, {}, lr)
        return loss.detach()

    return run


def notebook_step(p, Xtr, Ytr, ix, lr):
    """The seed's exercise-4 step: forward in raw ops, the fused backward formulas of exercises 2-3."""
    C, W1, b1, W2, b2, bngain, bnbias = (p[k] for k in model.PARAM_NAMES)
    Xb, Yb = Xtr[ix], Ytr[ix]
    n = Xb.shape[0]
    emb = C[Xb]
    embcat = emb.view(n, -1)
    hprebn = embcat @ W1 + b1
    bnvar_inv = (hprebn.var(0, keepdim=True, unbiased=True) + 1e-5) ** -0.5
    bnraw = (hprebn - hprebn.mean(0, keepdim=True)) * bnvar_inv
    h = torch.tanh(bngain * bnraw + bnbias)
    logits = h @ W2 + b2
    dlogits = F.softmax(logits, 1)
    dlogits[range(n), Yb] -= 1
    dlogits /= n
    dh = dlogits @ W2.T
    dhpreact = (1.0 - h**2) * dh
    dhprebn = bngain * bnvar_inv / n * (n * dhpreact - dhpreact.sum(0)
                                        - n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0))
    dC = torch.zeros_like(C).index_add_(0, Xb.view(-1), (dhprebn @ W1.T).view(-1, C.shape[1]))
    grads = [dC, embcat.T @ dhprebn, dhprebn.sum(0), h.T @ dlogits, dlogits.sum(0),
             (bnraw * dhpreact).sum(0, keepdim=True), dhpreact.sum(0, keepdim=True)]
    for param, grad in zip((C, W1, b1, W2, b2, bngain, bnbias), grads):
        param.sub_(grad, alpha=lr)


@pytest.fixture(scope="module")
def batch(dataset):
    return notebook.first_batch(dataset, 200)


def test_train_step(benchmark, device, variant, batch):
    if variant.endswith("compiled") and device == "cpu" and not cpu_compiler_found():
        pytest.skip("torch.compile on the CPU needs a C++ compiler (g++)")
    params, Xb, Yb = batch
    params = {k: v.to(device).clone() for k, v in params.items()}  # each variant its own copy
    Xb, Yb = Xb.to(device), Yb.to(device)
    benchmark.group = f"train_step hidden=200 batch=32 float32 {device}"
    benchmark.extra_info.update(op="train_step", shape="hidden=200 batch=32", variant=variant,
                                mode="step", device=device)
    ix = torch.arange(Xb.shape[0], device=device)  # the batch is rows ix of a training set
    lr = torch.tensor(1e-6, device=device)
    if variant == "manual-compiled":  # exactly what train(compile="yes") runs
        run = aot.compiled_step(params, {}, Xb, Yb, Xb.shape[0], check=False)  # as train
    elif variant in COMPILED_MODELS:
        # untimed (the default test run): Dynamo and AOT autograd without Inductor's codegen, as
        # tests/test_bench_train_step.py checks the models (Inductor's build: 10 s cold on 2 cores)
        backend = "aot_eager" if benchmark.disabled else "inductor"
        run = compiled_model_step(linear_layout(params), Xb, Yb, variant, backend=backend)
    elif variant == "notebook":
        run = torch.no_grad()(lambda ix, lr: notebook_step(params, Xb, Yb, ix, 1e-6))
    else:  # exactly what train runs
        run = step.eager_step(params, {}, Xb, Yb, backward=variant)

    def one_step():
        run(ix, lr)
        if device == "cuda":
            torch.cuda.synchronize()

    one_step()  # warm-up (and compilation) outside the timing
    benchmark(one_step)


def test_train_step_compiled_models(benchmark, device, batch):
    """The two compiled models in paired rounds (only when timing: the default run steps each once
    in test_train_step): extra_info["paired"], a group of its own, the ratio with an interval."""
    if benchmark.disabled:
        pytest.skip("paired rounds run only when timing (--benchmark-enable)")
    if device == "cpu" and not cpu_compiler_found():
        pytest.skip("torch.compile on the CPU needs a C++ compiler (g++)")
    params, Xb, Yb = batch
    Xb, Yb = Xb.to(device), Yb.to(device)
    ix = torch.arange(Xb.shape[0], device=device)
    lr = torch.tensor(1e-6, device=device)
    steps = {}
    for v in COMPILED_MODELS:
        run = compiled_model_step(linear_layout({k: t.to(device).clone() for k, t in params.items()}),
                                  Xb, Yb, v)

        def one_step(run=run):
            run(ix, lr)
            if device == "cuda":
                torch.cuda.synchronize()
        steps[v] = one_step
    benchmark.group = f"train_step compiled models float32 {device}"
    benchmark.extra_info.update(op="train_step", shape="hidden=200 batch=32 compiled models",
                                variant="paired", mode="step", device=device)
    load_before = stats.load()
    runner = stats.PairedRunner(steps)
    runner.warm_up()
    rounds = stats.rounds_for(runner.calibrate(), BUDGET, MIN_ROUNDS, 50)
    done = len(next(iter(runner.times.values())))
    result = benchmark.pedantic(runner.round, rounds=max(1, rounds - done), iterations=1)
    benchmark.extra_info["paired"] = {"times": runner.times, "loops": runner.loops,
                                      "threads": torch.get_num_threads(),
                                      "load": [load_before, stats.load()], "peak_bytes": None}
    return result
