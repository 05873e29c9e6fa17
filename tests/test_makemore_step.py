"""backprop.makemore.step: the update of each optimizer, the optimizer state, the eager steps,
the gradient check and the input checks."""

import pytest
import torch

from backprop.makemore import model, notebook, step


def whole_batch(Xb):
    return torch.arange(Xb.shape[0])


def test_the_update_follows_parameter_names_not_dict_order(dataset):
    """The foreach update pairs each gradient with its parameter by name: a dict built in
    another order (a checkpoint, a user's own) trains the same."""
    params, Xb, Yb = notebook.first_batch(dataset, 16)
    ordered = {k: v.clone() for k, v in params.items()}
    shuffled = {k: params[k].clone() for k in reversed(model.PARAM_NAMES)}
    for optimizer in step.OPTIMIZERS:
        for p in (ordered, shuffled):
            run = step.eager_step(p, step.init_state(optimizer, p), Xb, Yb, optimizer=optimizer)
            run(whole_batch(Xb), torch.tensor(0.1))
        for name in model.PARAM_NAMES:
            assert torch.equal(ordered[name], shuffled[name]), (optimizer, name)


@pytest.mark.parametrize("optimizer, torch_options", [("sgd", {}), ("momentum", {"momentum": 0.9})])
def test_each_optimizer_is_torch_optims_sgd(dataset, optimizer, torch_options):
    """Five steps with a changing learning rate, against torch.optim.SGD on the same gradients
    (float64: the two order their roundings differently)."""
    params, Xb, Yb = notebook.first_batch(dataset, 16, dtype=torch.float64)
    ours = {k: v.clone() for k, v in params.items()}
    state = step.init_state(optimizer, ours)
    theirs = {k: v.clone().requires_grad_() for k, v in params.items()}
    sgd = torch.optim.SGD(list(theirs.values()), lr=0.1, **torch_options)
    run = step.eager_step(ours, state, Xb, Yb, optimizer=optimizer)
    for lr in (0.1, 0.05, 0.2, 0.01, 0.1):
        _, grads = step.manual_grads({k: v.detach() for k, v in theirs.items()}, Xb, Yb)
        for k, p in theirs.items():
            p.grad = grads[k]
        for group in sgd.param_groups:
            group["lr"] = lr
        sgd.step()
        run(whole_batch(Xb), torch.tensor(lr, dtype=torch.float64))
    for name in model.PARAM_NAMES:
        torch.testing.assert_close(ours[name], theirs[name].detach(), rtol=1e-12, atol=1e-14)
    assert set(state) == set(step.state_names(optimizer))
    if optimizer == "momentum":  # the state is torch's momentum buffer
        for name in model.PARAM_NAMES:
            buffer = sgd.state[theirs[name]]["momentum_buffer"]
            torch.testing.assert_close(state[f"velocity.{name}"], buffer, rtol=1e-12, atol=1e-14)


def test_an_unknown_optimizer():
    with pytest.raises(ValueError, match="optimizer must be one of sgd, momentum, got 'adam'"):
        step.init_state("adam", model.init_params(27, 8))


def test_the_verified_step_updates_like_the_plain_one(dataset):
    params, Xb, Yb = notebook.first_batch(dataset, 16)
    a = {k: v.clone() for k, v in params.items()}
    b = {k: v.clone() for k, v in params.items()}
    for p, verify in ((a, False), (b, True)):
        run = step.eager_step(p, step.init_state("momentum", p), Xb, Yb, optimizer="momentum",
                              verify_gradients=verify)
        for _ in range(3):
            run(whole_batch(Xb), torch.tensor(0.1))
    for name in model.PARAM_NAMES:
        assert torch.equal(a[name], b[name]), name


def test_verify_catches_a_one_percent_error(dataset):
    params, Xb, Yb = notebook.first_batch(dataset, 16)
    _, grads = step.manual_grads(params, Xb, Yb)
    step.verify(params, Xb, Yb, grads)
    with pytest.raises(step.GradientDrift, match="manual dW2 drifted from autograd"):
        step.verify(params, Xb, Yb, grads | {"W2": grads["W2"] * 1.01})


@pytest.mark.parametrize("change, match", [
    (lambda s: {}, r"the momentum state must hold velocity\.C, .*, got nothing"),
    (lambda s: s | {"velocity.b1": s["velocity.b1"][:5]}, r"state\['velocity.b1'\] must have shape \(16,\)"),
    (lambda s: s | {"velocity.b1": s["velocity.b1"].double()}, r"state\['velocity.b1'\] must have the dtype"),
])
def test_the_optimizer_state_is_checked(dataset, change, match):
    params = model.init_params(27, 16)
    X, Y = dataset.splits["train"]
    state = step.init_state("momentum", params)
    with pytest.raises((TypeError, ValueError), match=match):
        step.check_inputs(params, change(state), X, Y, 32, optimizer="momentum")
