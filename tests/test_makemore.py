"""The main job: the notebook's data, init, gradient table and training."""

import os
from pathlib import Path

import pytest
import torch

from backprop import makemore
from backprop.compiled import cpu_compiler_found

# torch.compile's CPU backend (Inductor) builds C++: without a compiler these tests skip
needs_compiler = pytest.mark.skipif(not cpu_compiler_found() and not torch.cuda.is_available(),
                                    reason="torch.compile on the CPU needs a C++ compiler (g++)")

DATA = Path(__file__).resolve().parent.parent / "data" / "names.txt"
ORIGINAL = os.environ.get("BACKPROP_ORIGINAL_NAMES")


@pytest.fixture(scope="module")
def dataset():
    return makemore.load_dataset(DATA)


def batch(ds, n=32, seed=makemore.INIT_SEED, hidden=64, dtype=torch.float32):
    return makemore.first_batch(ds, hidden, batch_size=n, seed=seed, dtype=dtype)


def test_shipped_data(dataset):
    assert dataset.summary() == {"words": 29910, "vocab_size": 27, "examples": [171878, 21405, 21481]}
    assert dataset.words[:3] == ["emma", "olivia", "ava"]
    assert len(set(dataset.words)) == len(dataset.words)


@pytest.mark.skipif(not ORIGINAL, reason="BACKPROP_ORIGINAL_NAMES is not set")
def test_parity_with_the_seed_on_the_original_list():
    ds = makemore.load_dataset(ORIGINAL, split_seed=666)
    assert ds.summary() == {"words": 32033, "vocab_size": 27, "examples": [182426, 22807, 22913]}
    assert makemore.count_params(makemore.init_params(ds.vocab.size, 64)) == 4137


def test_dataset_examples_are_trigram_contexts():
    vocab = makemore.build_vocab(["ab"])
    X, Y = makemore.build_dataset(["ab"], vocab)
    assert X.tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 2]] and Y.tolist() == [1, 2, 0]


def test_init_is_reproducible_and_non_degenerate(dataset):
    a, b = makemore.init_params(27, 64), makemore.init_params(27, 64)
    assert all(torch.equal(a[k], b[k]) for k in makemore.PARAM_NAMES)
    assert all((a[k] != 0).all() for k in makemore.PARAM_NAMES)  # nothing for a bug to hide behind


@pytest.mark.parametrize("seed", [makemore.INIT_SEED, 1, 2])
def test_exercise_1_is_bit_exact_on_cpu_float32(dataset, seed):
    _, rows = makemore.gradient_table(*batch(dataset, seed=seed))
    by_name = {r.name: r for r in rows}
    for name in makemore.EXERCISE1_ROWS:
        assert by_name[name].exact, by_name[name]
    for name in makemore.FUSED_ROWS:
        assert by_name[f"fused {name}"].approximate, by_name[f"fused {name}"]


def test_gradient_table_in_float64(dataset):
    _, rows = makemore.gradient_table(*batch(dataset, dtype=torch.float64))
    assert all(r.approximate for r in rows), [r for r in rows if not r.approximate]


def test_fused_backward_is_the_notebooks_closed_forms(dataset):
    """Exercise 2: dlogits = (softmax - onehot) / n; exercise 3: the one-line BatchNorm backward."""
    params, Xb, Yb = batch(dataset, dtype=torch.float64)
    _, caches = makemore.fused_forward(params, Xb, Yb)
    grads = makemore.fused_backward(caches)
    with torch.no_grad():
        _, a = makemore.atomised_forward(params, Xb, Yb)
    n = Xb.shape[0]
    expected = (torch.softmax(a["logits"], 1) - torch.nn.functional.one_hot(Yb, 27)) / n
    torch.testing.assert_close(grads["logits"], expected)
    dhpreact = (grads["logits"] @ params["W2"].T) * (1 - a["h"] ** 2)
    bngain, bnraw, bnvar_inv = params["bngain"], a["bnraw"], a["bnvar_inv"]
    dhprebn = bngain * bnvar_inv / n * (n * dhpreact - dhpreact.sum(0) - n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0))
    torch.testing.assert_close(grads["hprebn"], dhprebn)


def test_training_lowers_the_loss(dataset):
    model, losses = makemore.train(dataset, steps=300, hidden=64, verify_every=100)
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert last < first - 0.3, (first, last)
    assert makemore.evaluate(model, *dataset.splits["val"]) < 2.9


def test_manual_and_autograd_training_keep_matching_parameters(dataset):
    """Same seed, 100 steps: the two only round differently, so the parameters stay within
    float32 noise (1e-4 absolute on weights of order 1)."""
    manual, _ = makemore.train(dataset, steps=100, hidden=64, backward="manual")
    auto, _ = makemore.train(dataset, steps=100, hidden=64, backward="autograd")
    for name in makemore.PARAM_NAMES:
        torch.testing.assert_close(manual.params[name], auto.params[name], rtol=0, atol=1e-4)


def test_verify_every_stops_on_a_drifting_gradient(dataset, monkeypatch):
    real = makemore.manual_grads

    def broken(*args, **kwargs):
        loss, grads = real(*args)
        grads[3] = grads[3] * 1.01  # dW2 with a 1% bug
        return loss, grads

    monkeypatch.setattr(makemore, "manual_grads", broken)
    with pytest.raises(makemore.GradientDrift, match=r"step 0: manual dW2 drifted from autograd"):
        makemore.train(dataset, steps=5, hidden=16, verify_every=1)


def test_unchecked_step_computes_the_checked_kernels_gradients(dataset):
    """The trainer's step skips the kernels' argument checks; its gradients must be the checked
    path's, bit for bit (same kernels, same order of operations)."""
    params, Xb, Yb = makemore.first_batch(dataset, 64)
    with torch.no_grad():
        loss, grads = makemore.manual_grads(params, Xb, Yb)
        checked_loss, caches = makemore.fused_forward(params, Xb, Yb)
        checked = makemore.fused_backward(caches)
    assert torch.equal(loss, checked_loss)
    for name, g in zip(makemore.PARAM_NAMES, grads):
        assert torch.equal(g, checked[name]), name


@needs_compiler
def test_compiled_training_matches_eager_training(dataset):
    """The whole step under torch.compile (fused, reordered): same parameters up to rounding."""
    eager, eager_losses = makemore.train(dataset, steps=30, hidden=32, lr_decay_step=15)
    fast, fast_losses = makemore.train(dataset, steps=30, hidden=32, lr_decay_step=15, compile=True)
    for name in makemore.PARAM_NAMES:
        torch.testing.assert_close(fast.params[name], eager.params[name], rtol=0, atol=1e-5)
    torch.testing.assert_close(fast_losses, eager_losses, rtol=1e-5, atol=0)


@needs_compiler
def test_compiled_step_is_built_once_per_shape_and_takes_any_training_set(dataset, monkeypatch):
    """One build per (shapes, dtypes, torch, code): a second training set of another size reuses
    it (the number of examples is symbolic), and each step equals the eager step on that batch."""
    p0, _, _ = batch(dataset, hidden=32)  # the shapes of the test above: one build for both
    X, Y = dataset.splits["train"]
    makemore.compiled_trainer({k: v.clone() for k, v in p0.items()}, X[:500], Y[:500], 32)  # built
    builds = []
    monkeypatch.setattr(makemore, "_build_aot_step", lambda *a: builds.append(a))
    for rows in (500, 50, 7):
        params = {k: v.clone() for k, v in p0.items()}
        step = makemore.compiled_trainer(params, X[:rows], Y[:rows], 32)
        ix = torch.randint(0, rows, (32,), generator=torch.Generator().manual_seed(rows))
        eager = {k: v.clone() for k, v in p0.items()}
        expected = makemore.manual_step(eager, X[ix], Y[ix], 0.1)
        loss = step(ix, torch.tensor(0.1))
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
        for k in makemore.PARAM_NAMES:
            torch.testing.assert_close(params[k], eager[k], rtol=0, atol=1e-6)
        assert not torch.equal(params["W1"], p0["W1"])  # updated in place (b1's gradient is ~0:
        # the batch norm after it cancels any shift)
    assert builds == []
    other = {**p0, "W1": torch.zeros(30, 25), "b1": torch.zeros(25)}
    assert makemore.aot_step_path(other, X, 32) != makemore.aot_step_path(p0, X, 32)
    assert makemore.aot_step_path(p0, X, 16) != makemore.aot_step_path(p0, X, 32)
    assert makemore.aot_step_path(p0, X.int(), 32) != makemore.aot_step_path(p0, X, 32)


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
    params, _, _ = batch(dataset, hidden=32)
    X, Y = dataset.splits["train"]
    before = {k: v.clone() for k, v in params.items()}
    step = makemore.compiled_trainer(params, X[:500], Y[:500], 32)
    with pytest.raises(error, match=match):
        step(torch.zeros(32, dtype=torch.int64) if ix is None else ix,
             torch.tensor(0.1) if lr is None else lr)
    for k in makemore.PARAM_NAMES:
        assert torch.equal(params[k], before[k]), k


@pytest.mark.parametrize("change, error, match", [
    (lambda p, X, Y: ({**p, "W1": p["W1"].T.contiguous().T}, X, Y), ValueError, r"params\['W1'\] must be contiguous"),
    (lambda p, X, Y: ({k: v for k, v in p.items() if k != "b2"}, X, Y), ValueError, "missing b2"),
    (lambda p, X, Y: ({**p, "b1": p["b1"].double()}, X, Y), TypeError, r"params\['b1'\] must have the dtype"),
    (lambda p, X, Y: ({**p, "b1": p["b1"][:5]}, X, Y), ValueError, r"params\['b1'\] must have shape \(32,\)"),
    (lambda p, X, Y: (p, X.int(), Y), TypeError, "Xtr must be an integer index tensor of dtype torch.int64"),
    (lambda p, X, Y: (p, X, Y[:-1]), ValueError, r"Ytr must have shape \(500,\)"),
    (lambda p, X, Y: (p, X[:1], Y[:1]), ValueError, "Xtr must hold at least 2 examples, got 1"),
    (lambda p, X, Y: (p, X, torch.where(Y == Y[3], 27, Y)), ValueError, r"Ytr must lie in \[0, 27\), got 27"),
])
def test_the_compiled_trainer_checks_what_it_is_built_for(dataset, change, error, match):
    params, _, _ = batch(dataset, hidden=32)
    X, Y = dataset.splits["train"]
    with pytest.raises(error, match=match):
        makemore.compiled_trainer(*change(params, X[:500], Y[:500]), 32)


def test_a_failed_build_trains_eager_with_a_handler_and_raises_without(dataset, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(makemore, "compiled_trainer", broken)
    seen = []
    model, losses = makemore.train(dataset, steps=5, hidden=16, compile=True, on_compile_error=seen.append)
    eager, eager_losses = makemore.train(dataset, steps=5, hidden=16)
    assert [str(e) for e in seen] == ["no compiler today"]
    assert losses == eager_losses
    for name in makemore.PARAM_NAMES:
        assert torch.equal(model.params[name], eager.params[name]), name
    with pytest.raises(RuntimeError, match="no compiler today"):
        makemore.train(dataset, steps=5, hidden=16, compile=True)


def test_training_checks_the_data_once(dataset):
    bad = makemore.Dataset(dataset.words, dataset.vocab, dict(dataset.splits))
    X, Y = bad.splits["train"]
    bad.splits["train"] = (X, torch.where(Y == Y[7], 99, Y))
    with pytest.raises(ValueError, match=r"training targets must lie in \[0, 27\), got 99"):
        makemore.train(bad, steps=3, hidden=8)


def test_sampling_is_reproducible_and_uses_the_vocabulary(dataset):
    model, _ = makemore.train(dataset, steps=50, hidden=32)
    a, b = makemore.sample(model, 5, seed=3), makemore.sample(model, 5, seed=3)
    assert a == b and len(a) == 5
    assert set("".join(a)) <= set(dataset.vocab.chars)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", r"holds no words"),
        ("\n\n", r"holds no words"),
        ("ann\nbo.b\n", r"'\.' is the start/end symbol, found in word 'bo\.b'"),
    ],
)
def test_bad_data_files(tmp_path, content, message):
    path = tmp_path / "words.txt"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        makemore.read_words(path)


@pytest.mark.parametrize("n, empty", [(1, "train and val"), (3, "val"), (5, "val")])
def test_too_few_words_for_the_split(tmp_path, n, empty):
    path = tmp_path / "words.txt"
    path.write_text("".join(f"w{chr(97 + i)}\n" for i in range(n)))
    with pytest.raises(ValueError, match=f"{n} words split 80/10/10 into .* leaving the {empty} split empty"):
        makemore.load_dataset(path)


def test_six_words_fill_every_split(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("ab\ncd\nef\ngh\nij\nkl\n")
    assert makemore.load_dataset(path).summary()["examples"] == [12, 3, 3]


def test_vocabulary_comes_from_the_data(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("zoë\nanna-lee\nbob\n" * 10)
    ds = makemore.load_dataset(path)
    assert ds.vocab.chars == tuple(sorted(set("zoëanna-leebob")))
    assert ds.vocab.size == len(ds.vocab.chars) + 1


def test_the_update_follows_parameter_names_not_dict_order(dataset):
    """The foreach update pairs each gradient with its parameter by name: a dict built in
    another order (a checkpoint, a user's own) trains the same."""
    params, Xb, Yb = makemore.first_batch(dataset, 16)
    ordered = {k: v.clone() for k, v in params.items()}
    shuffled = {k: params[k].clone() for k in reversed(makemore.PARAM_NAMES)}
    makemore.manual_step(ordered, Xb, Yb, 0.1)
    makemore.manual_step(shuffled, Xb, Yb, 0.1)
    for name in makemore.PARAM_NAMES:
        assert torch.equal(ordered[name], shuffled[name]), name
