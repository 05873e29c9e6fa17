"""backprop.makemore.aot: the compiled step, its disk cache and its checks."""

import pytest
import torch

from backprop.compiled import cpu_compiler_found
from backprop.makemore import aot, model, notebook, step, train

# the CPU build (AOTInductor) compiles C++: without a compiler these tests skip
needs_compiler = pytest.mark.skipif(not cpu_compiler_found() and not torch.cuda.is_available(),
                                    reason="compiling the step on the CPU needs a C++ compiler (g++)")


# train's default and the benchmark's (benchmarks/bench_train_step.py, manual-compiled): the sgd step
# these tests build is the package that benchmark builds, one AOTInductor build (~18 s of CPU, cold)
# for both where they share a cache (the default run: aot's lock makes a second worker wait and load)
HIDDEN = 200


def batch(ds, hidden=HIDDEN):
    return notebook.first_batch(ds, hidden)


@needs_compiler
@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_compiled_training_matches_eager_training(dataset, optimizer):
    """The whole step compiled (fused, reordered): same parameters up to rounding."""
    eager = train.train(dataset, steps=30, hidden=HIDDEN, lr_decay_step=15, optimizer=optimizer)
    fast = train.train(dataset, steps=30, hidden=HIDDEN, lr_decay_step=15, optimizer=optimizer, compile="yes")
    assert fast.compiled and not eager.compiled
    for name in model.PARAM_NAMES:
        torch.testing.assert_close(fast.model.params[name], eager.model.params[name], rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.losses, eager.losses, rtol=1e-5, atol=0)


@needs_compiler
def test_any_learning_rate_schedule_runs_compiled(dataset, monkeypatch):
    """lr is a graph input: a rate that changes at every step needs no table of rates and no rebuild."""
    monkeypatch.setattr(train, "learning_rate", lambda i, lr, decay: lr / (1 + i))
    eager = train.train(dataset, steps=20, hidden=HIDDEN, optimizer="momentum")
    fast = train.train(dataset, steps=20, hidden=HIDDEN, optimizer="momentum", compile="yes")
    for name in model.PARAM_NAMES:
        torch.testing.assert_close(fast.model.params[name], eager.model.params[name], rtol=0, atol=1e-5)


@needs_compiler
def test_compiled_step_is_built_once_per_shape_and_takes_any_training_set(dataset, monkeypatch):
    """One build per (shapes, dtypes, optimizer, torch, code): a second training set of another
    size reuses it (the number of examples is symbolic), and each step equals the eager step."""
    p0, _, _ = batch(dataset)  # the shapes of the test above: one build for both
    X, Y = dataset.splits["train"]
    aot.compiled_step({k: v.clone() for k, v in p0.items()}, {}, X[:500], Y[:500], 32)  # built
    builds = []
    monkeypatch.setattr(aot, "_build", lambda *a: builds.append(a))
    for rows in (500, 50, 7):
        params = {k: v.clone() for k, v in p0.items()}
        fast = aot.compiled_step(params, {}, X[:rows], Y[:rows], 32)
        ix = torch.randint(0, rows, (32,), generator=torch.Generator().manual_seed(rows))
        eager = {k: v.clone() for k, v in p0.items()}
        expected = step.eager_step(eager, {}, X[:rows], Y[:rows])(ix, torch.tensor(0.1))
        loss = fast(ix, torch.tensor(0.1))
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
        for k in model.PARAM_NAMES:
            torch.testing.assert_close(params[k], eager[k], rtol=0, atol=1e-6)
        assert not torch.equal(params["W1"], p0["W1"])  # updated in place (b1's gradient is ~0:
        # the batch norm after it cancels any shift)
    assert builds == []
    other = {**p0, "W1": torch.zeros(30, 25), "b1": torch.zeros(25)}
    momentum = step.init_state("momentum", p0)
    assert aot.step_path(other, {}, X, 32) != aot.step_path(p0, {}, X, 32)
    assert aot.step_path(p0, {}, X, 16) != aot.step_path(p0, {}, X, 32)
    assert aot.step_path(p0, {}, X.int(), 32) != aot.step_path(p0, {}, X, 32)
    assert aot.step_path(p0, momentum, X, 32, optimizer="momentum") != aot.step_path(p0, {}, X, 32)


@needs_compiler
@pytest.mark.parametrize("ix, lr, error, match", [
    (torch.zeros(16, dtype=torch.int64), None, ValueError, r"ix must have shape \(32,\)"),
    (torch.zeros(32, dtype=torch.int32), None, TypeError, "ix must be an integer index tensor of dtype torch.int64"),
    (torch.full((32,), 500), None, ValueError, r"ix must lie in \[0, 500\), got 500"),
    (torch.full((32,), -1), None, ValueError, r"ix must lie in \[0, 500\), got -1"),
    (None, torch.tensor(0.1, dtype=torch.float64), TypeError, "lr must have the dtype of the parameters"),
    (None, torch.tensor([0.1]), ValueError, r"lr must have shape \(\)"),
])
def test_the_compiled_step_checks_each_call(dataset, ix, lr, error, match):
    """The built step reads raw memory: a short or int32 ix, or a float64 lr, would be read as
    garbage, so the step checks them (the trainer, drawing ix itself, skips it)."""
    params, _, _ = batch(dataset)
    X, Y = dataset.splits["train"]
    before = {k: v.clone() for k, v in params.items()}
    fast = aot.compiled_step(params, {}, X[:500], Y[:500], 32)
    with pytest.raises(error, match=match):
        fast(torch.zeros(32, dtype=torch.int64) if ix is None else ix,
             torch.tensor(0.1) if lr is None else lr)
    for k in model.PARAM_NAMES:
        assert torch.equal(params[k], before[k]), k


@pytest.mark.parametrize("change, error, match", [
    (lambda p, X, Y: ({**p, "W1": p["W1"].T.contiguous().T}, X, Y), ValueError, r"params\['W1'\] must be contiguous"),
    (lambda p, X, Y: ({k: v for k, v in p.items() if k != "b2"}, X, Y), ValueError, "missing b2"),
    (lambda p, X, Y: ({**p, "b1": p["b1"].double()}, X, Y), TypeError, r"params\['b1'\] must have the dtype"),
    (lambda p, X, Y: ({**p, "b1": p["b1"][:5]}, X, Y), ValueError, r"params\['b1'\] must have shape \(200,\)"),
    (lambda p, X, Y: (p, X.int(), Y), TypeError, "Xtr must be an integer index tensor of dtype torch.int64"),
    (lambda p, X, Y: (p, X, Y[:-1]), ValueError, r"Ytr must have shape \(500,\)"),
    (lambda p, X, Y: (p, X[:1], Y[:1]), ValueError, "Xtr must hold at least 2 examples, got 1"),
    (lambda p, X, Y: (p, X, torch.where(Y == Y[3], 27, Y)), ValueError, r"Ytr must lie in \[0, 27\), got 27"),
])
def test_the_compiled_step_checks_what_it_is_built_for(dataset, change, error, match):
    params, _, _ = batch(dataset)
    X, Y = dataset.splits["train"]
    p, X, Y = change(params, X[:500], Y[:500])
    with pytest.raises(error, match=match):
        aot.compiled_step(p, {}, X, Y, 32)
