"""One SGD step of the makemore MLP (hidden 200, batch 32), as makemore.train runs it: manual
(step.eager_step: the kernels' maths, eager), manual-compiled (aot.compiled_step: the whole step
built ahead of time on the CPU, torch.compile on CUDA), autograd (step.eager_step with
backward='autograd'), and, for scale, the notebook's own fused manual step written with raw torch
ops. Every contender gathers its batch (rows ix of the training set) and updates in place."""

import pytest
import torch
import torch.nn.functional as F

from backprop.compiled import cpu_compiler_found
from backprop.makemore import aot, data, model, notebook, step


@pytest.fixture(params=["manual", "manual-compiled", "autograd", "notebook"])
def variant(request):
    return request.param


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
def batch():
    return notebook.first_batch(data.load_dataset(data.DEFAULT_DATA), 200)


def test_train_step(benchmark, device, variant, batch):
    if variant == "manual-compiled" and device == "cpu" and not cpu_compiler_found():
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
