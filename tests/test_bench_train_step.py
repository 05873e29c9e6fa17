"""The train step's drop-in contenders (benchmarks/bench_train_step.py) compute the same thing: the
makemore MLP on torch.ops.backprop.* and on torch's functionals give the same loss and gradients
(eager, and as the contenders' own compiled steps), and the same as the model's autograd twin. No
timing here."""

import importlib.util
from pathlib import Path

import pytest
import torch

from backprop.makemore import model, notebook

spec = importlib.util.spec_from_file_location(
    "bench_train_step", Path(__file__).parents[1] / "benchmarks" / "bench_train_step.py")
bench_train_step = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_train_step)


@pytest.fixture(scope="module")
def batch(dataset):
    return notebook.first_batch(dataset, 200)


def loss_and_grads(loss_fn, params, Xb, Yb):
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss = loss_fn(leaves, Xb, Yb)
    return loss, dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def test_the_two_models_compute_the_same_loss_and_gradients(batch):
    params, Xb, Yb = batch
    want_loss, want = loss_and_grads(model.autograd_loss, params, Xb, Yb)  # the notebook's layout
    want = bench_train_step.linear_layout(want)  # dW1, dW2 as the linear layout's gradients
    for loss_fn in bench_train_step.LOSSES.values():
        loss, grads = loss_and_grads(loss_fn, bench_train_step.linear_layout(params), Xb, Yb)
        torch.testing.assert_close(loss, want_loss)
        for k in model.PARAM_NAMES:
            torch.testing.assert_close(grads[k], want[k], msg=lambda m, k=k: f"d{k}: {m}")


def test_the_compiled_steps_make_the_same_update(batch):
    """Each contender's step (fullgraph capture, AOTAutograd, the custom ops' fake kernels; the
    aot_eager backend, so no C++ build here: the benchmark's default run builds with Inductor)
    returns the same loss and leaves the same parameters."""
    params, Xb, Yb = batch
    ix, lr = torch.arange(Xb.shape[0]), torch.tensor(0.1)
    results = {}
    for variant in bench_train_step.COMPILED_MODELS:
        torch._dynamo.reset()
        p = bench_train_step.linear_layout({k: v.clone() for k, v in params.items()})
        run = bench_train_step.compiled_model_step(p, Xb, Yb, variant, backend="aot_eager")
        losses = [run(ix, lr) for _ in range(2)]  # the second step sees the first's update
        results[variant] = losses, {k: v.detach() for k, v in p.items()}
    (loss_a, p_a), (loss_b, p_b) = results.values()
    torch.testing.assert_close(loss_a, loss_b)
    assert not torch.equal(p_a["W1"], bench_train_step.linear_layout(params)["W1"])  # it did step
    for k in model.PARAM_NAMES:
        torch.testing.assert_close(p_a[k], p_b[k], msg=lambda m, k=k: f"{k}: {m}")
