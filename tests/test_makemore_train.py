"""backprop.makemore.train: the loop, its validation, the gradient checks and the compiled
step's fallback."""

import pytest
import torch

from backprop import compiled
from backprop.makemore import aot, data, model, step, train


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_training_lowers_the_loss(dataset, optimizer):
    run = train.train(dataset, steps=300, hidden=64, verify_every=100, optimizer=optimizer, eval_every=150)
    first, last = sum(run.losses[:30]) / 30, sum(run.losses[-30:]) / 30
    assert last < first - 0.3, (first, last)
    assert model.evaluate(run.model, *dataset.splits["val"]) < 2.9
    assert run.checks == 3 and not run.compiled
    assert [s for s, _ in run.val_losses] == [150, 300]
    assert run.val_losses[-1][1] == model.evaluate(run.model, *dataset.splits["val"])


def test_manual_and_autograd_training_keep_matching_parameters(dataset):
    """Same seed, 100 steps: the two only round differently, so the parameters stay within
    float32 noise (1e-4 absolute on weights of order 1)."""
    for optimizer in step.OPTIMIZERS:
        manual = train.train(dataset, steps=100, hidden=64, backward="manual", optimizer=optimizer)
        auto = train.train(dataset, steps=100, hidden=64, backward="autograd", optimizer=optimizer)
        for name in model.PARAM_NAMES:
            torch.testing.assert_close(manual.model.params[name], auto.model.params[name], rtol=0, atol=1e-4)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum"])
def test_verify_every_stops_on_a_drifting_gradient(dataset, monkeypatch, optimizer):
    real = step.manual_grads

    def broken(*args, **kwargs):
        loss, grads = real(*args)
        return loss, grads | {"W2": grads["W2"] * 1.01}  # dW2 with a 1% bug

    monkeypatch.setattr(step, "manual_grads", broken)
    with pytest.raises(step.GradientDrift, match=r"step 0: manual dW2 drifted from autograd"):
        train.train(dataset, steps=5, hidden=16, verify_every=1, optimizer=optimizer)


def test_a_failed_build_trains_eager_with_a_handler_and_raises_without(dataset, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(aot, "compiled_step", broken)
    monkeypatch.setattr(compiled, "cpu_compiler_found", lambda: True)
    monkeypatch.setattr(train, "COMPILE_FROM_STEPS", 1)
    seen = []
    run = train.train(dataset, steps=5, hidden=16, compile="auto", on_compile_error=seen.append)
    eager = train.train(dataset, steps=5, hidden=16)
    assert [str(e) for e in seen] == ["no compiler today"]
    assert not run.compiled
    assert run.losses == eager.losses
    for name in model.PARAM_NAMES:
        assert torch.equal(run.model.params[name], eager.model.params[name]), name
    with pytest.warns(UserWarning, match=r"building the compiled step failed \(RuntimeError: no compiler today\)"):
        train.train(dataset, steps=5, hidden=16, compile="auto")
    with pytest.raises(RuntimeError, match="no compiler today"):
        train.train(dataset, steps=5, hidden=16, compile="yes")


def test_auto_compiles_long_runs_only(dataset, monkeypatch):
    asked = []
    monkeypatch.setattr(compiled, "cpu_compiler_found", lambda: True)

    def refuse(*args, **kwargs):
        asked.append(kwargs)
        raise RuntimeError("not today")

    monkeypatch.setattr(aot, "compiled_step", refuse)
    monkeypatch.setattr(train, "COMPILE_FROM_STEPS", 4)
    train.train(dataset, steps=3, hidden=8, compile="auto")
    assert asked == []
    train.train(dataset, steps=4, hidden=8, compile="auto", on_compile_error=lambda e: None)
    assert [{k: v for k, v in a.items() if k != "say"} for a in asked] == [{"optimizer": "sgd", "check": False}]


def test_training_checks_the_data_once(dataset):
    bad = data.Dataset(dataset.words, dataset.vocab, dict(dataset.splits))
    X, Y = bad.splits["train"]
    bad.splits["train"] = (X, torch.where(Y == Y[7], 99, Y))
    with pytest.raises(ValueError, match=r"training targets must lie in \[0, 27\), got 99"):
        train.train(bad, steps=3, hidden=8)


@pytest.mark.parametrize("options, match", [
    ({"backward": "numeric"}, "backward must be 'manual' or 'autograd', got 'numeric'"),
    ({"compile": "maybe"}, "compile must be one of auto, yes, no, got 'maybe'"),
    ({"compile": "yes", "backward": "autograd"}, "compile='yes' applies to the manual backward only"),
    ({"optimizer": "adam"}, "optimizer must be one of sgd, momentum, got 'adam'"),
    ({"steps": 0}, "steps must be an integer >= 1, got 0"),
    ({"batch_size": 1}, r"batch_size must be an integer >= 2 \(batch norm needs 2 rows\), got 1"),
])
def test_bad_options(dataset, options, match):
    with pytest.raises(ValueError, match=match):
        train.train(dataset, **{"steps": 3, "hidden": 8} | options)


def test_sampling_is_reproducible_and_uses_the_vocabulary(dataset):
    run = train.train(dataset, steps=50, hidden=32)
    a, b = model.sample(run.model, 5, seed=3), model.sample(run.model, 5, seed=3)
    assert a == b and len(a) == 5
    assert set("".join(a)) <= set(dataset.vocab.chars)


def test_seconds_count_the_training_loop_not_the_validation_curve(dataset, monkeypatch):
    """run.seconds (the CLI's steps/s) is the loop alone: eval_every's validation losses (each
    calibrates BatchNorm over the training set first, seconds at the full size) are not in it. A
    fake clock that jumps 100 s in each evaluation shows it."""
    clock = [0.0]
    monkeypatch.setattr(train.time, "perf_counter", lambda: clock[0])
    evaluate = train._calibrated

    def slow(*args):
        clock[0] += 100.0
        return evaluate(*args)

    monkeypatch.setattr(train, "_calibrated", slow)
    run = train.train(dataset, steps=20, hidden=8, eval_every=10)
    assert len(run.val_losses) == 2 and clock[0] == 200.0
    assert run.seconds == 0.0
