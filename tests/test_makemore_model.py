"""backprop.makemore.model: init, the kernel chain on checked and unchecked kernels, the
autograd twin, and the calibrated model."""

import pytest
import torch

from backprop.makemore import model, notebook
from backprop.testing.references import batch_norm_composed


def test_init_is_reproducible_and_non_degenerate():
    a, b = model.init_params(27, 64), model.init_params(27, 64)
    assert all(torch.equal(a[k], b[k]) for k in model.PARAM_NAMES)
    assert all((a[k] != 0).all() for k in model.PARAM_NAMES)  # nothing for a bug to hide behind


def test_the_unchecked_chain_computes_the_checked_kernels_gradients(dataset):
    """The trainer's chain skips the kernels' argument checks; its gradients must be the checked
    chain's, bit for bit (same kernels, same order of operations)."""
    params, Xb, Yb = notebook.first_batch(dataset, 64)
    with torch.no_grad():
        loss, caches = model.forward(params, Xb, Yb, model.UNCHECKED)
        grads = model.backward(caches, model.UNCHECKED)
        checked_loss, checked_caches = model.forward(params, Xb, Yb)
        checked = model.backward(checked_caches)
    assert torch.equal(loss, checked_loss)
    assert set(grads) == set(checked) == {"logits", "hprebn", *model.PARAM_NAMES}
    for name, g in grads.items():
        assert torch.equal(g, checked[name]), name


def test_the_checked_chain_checks_its_inputs(dataset):
    params, Xb, Yb = notebook.first_batch(dataset, 16)
    with pytest.raises(ValueError, match=r"must lie in \[0, 27\)"):
        model.forward(params, Xb, torch.full_like(Yb, 27))


def test_the_models_composed_batch_norm_is_the_test_harness_one():
    """The autograd twin's BatchNorm lives with the model (the program does not import the test
    harness); it is the harness's composed reference, bit for bit."""
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((32, 8), (8,), (8,)))
    ours = model.batch_norm_composed(x, w, b, eps=1e-5, correction=1)
    assert torch.equal(ours, batch_norm_composed(x, w, b, eps=1e-5, correction=1))


def test_a_checkpoint_round_trips(dataset):
    params = model.init_params(dataset.vocab.size, 16)
    m = model.Model(params, dataset.vocab)
    model.calibrate(m, dataset.splits["train"][0])
    again = model.Model.from_state(m.state())
    assert again.vocab == m.vocab
    assert model.sample(again, 5, seed=1) == model.sample(m, 5, seed=1)
