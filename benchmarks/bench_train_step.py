"""One SGD step of the makemore MLP (hidden 200, batch 32): manual kernels against autograd."""

import pytest
import torch

from backprop import makemore


@pytest.fixture(scope="module")
def batch():
    ds = makemore.load_dataset(makemore.DEFAULT_DATA)
    g = torch.Generator().manual_seed(makemore.INIT_SEED)
    params = makemore.init_params(ds.vocab.size, 200, generator=g)
    X, Y = ds.splits["train"]
    ix = torch.randint(0, X.shape[0], (32,), generator=g)
    return params, X[ix], Y[ix]


def test_train_step(benchmark, device, variant, batch):
    params, Xb, Yb = batch
    params = {k: v.to(device) for k, v in params.items()}
    Xb, Yb = Xb.to(device), Yb.to(device)
    benchmark.group = f"train_step hidden=200 batch=32 float32 {device}"
    benchmark.extra_info.update(op="train_step", variant=variant, device=device)

    if variant == "manual":
        def step():
            loss, caches = makemore.fused_forward(params, Xb, Yb)
            grads = makemore.fused_backward(caches)
            with torch.no_grad():
                for name, p in params.items():
                    p.sub_(grads[name], alpha=1e-6)
            if device == "cuda":
                torch.cuda.synchronize()
    else:
        leaves = {k: v.requires_grad_() for k, v in params.items()}

        def step():
            loss = makemore.autograd_loss(leaves, Xb, Yb)
            for v in leaves.values():
                v.grad = None
            loss.backward()
            with torch.no_grad():
                for p in leaves.values():
                    p.sub_(p.grad, alpha=1e-6)
            if device == "cuda":
                torch.cuda.synchronize()

    step()
    benchmark(step)
