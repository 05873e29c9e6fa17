"""backprop.makemore.notebook: exercise 1 bit-exact against autograd, exercises 2 and 3 as the
notebook's closed forms, the gradient table."""

import pytest
import torch

from backprop.makemore import data, model, notebook


@pytest.fixture(scope="module")
def dataset():
    return data.load_dataset(data.DEFAULT_DATA)


def batch(ds, n=32, seed=model.INIT_SEED, hidden=64, dtype=torch.float32):
    return notebook.first_batch(ds, hidden, batch_size=n, seed=seed, dtype=dtype)


@pytest.mark.parametrize("seed", [model.INIT_SEED, 1, 2])
def test_exercise_1_is_bit_exact_on_cpu_float32(dataset, seed):
    _, rows = notebook.gradient_table(*batch(dataset, seed=seed))
    by_name = {r.name: r for r in rows}
    for name in notebook.EXERCISE1_ROWS:
        assert by_name[name].exact, by_name[name]
    for name in notebook.FUSED_ROWS:
        assert by_name[f"fused {name}"].approximate, by_name[f"fused {name}"]


def test_gradient_table_in_float64(dataset):
    _, rows = notebook.gradient_table(*batch(dataset, dtype=torch.float64))
    assert all(r.approximate for r in rows), [r for r in rows if not r.approximate]


def test_fused_backward_is_the_notebooks_closed_forms(dataset):
    """Exercise 2: dlogits = (softmax - onehot) / n; exercise 3: the one-line BatchNorm backward."""
    params, Xb, Yb = batch(dataset, dtype=torch.float64)
    _, caches = model.forward(params, Xb, Yb)
    grads = model.backward(caches)
    with torch.no_grad():
        _, a = notebook.atomised_forward(params, Xb, Yb)
    n = Xb.shape[0]
    expected = (torch.softmax(a["logits"], 1) - torch.nn.functional.one_hot(Yb, 27)) / n
    torch.testing.assert_close(grads["logits"], expected)
    dhpreact = (grads["logits"] @ params["W2"].T) * (1 - a["h"] ** 2)
    bngain, bnraw, bnvar_inv = params["bngain"], a["bnraw"], a["bnvar_inv"]
    dhprebn = bngain * bnvar_inv / n * (n * dhpreact - dhpreact.sum(0) - n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0))
    torch.testing.assert_close(grads["hprebn"], dhprebn)
