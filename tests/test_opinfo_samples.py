"""PyTorch's own OpInfo samples through our kernels: ``op_db``'s ``reference_inputs`` (which hold
the ``sample_inputs``) for each twin, CPU, float64 and float32, mapped onto our signatures and
checked under the harness's acceptance rule (``check_against_autograd``); and every
``error_inputs`` sample that torch refuses must be refused by us too.

A sample that does not fit is counted with its reason. Two reasons are expected:
  - max_norm: F.embedding renormalises the caller's table in place; our embedding refuses it (a
    ValueError that says why), by design (docs/divergences.md);
  - cross_entropy features that live on another branch (soft targets, class weights, K-dim
    inputs): while our cross_entropy lacks one (probed below, not assumed), its samples are
    counted as "needs cross_entropy features (other branch)" and lower the threshold by as many.
    Once the features are merged the probes pass, those samples run, and the threshold is the
    issue's target: at least TARGET of the 252 samples (torch 2.13) fit the contract.

Run with -s to see the summary table (counts per op and every skip reason).
"""

from __future__ import annotations

import collections
import functools
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings

import backprop
from backprop.testing import check_against_autograd, references
from backprop.testing.opinfo import OPS as TABLE

# op_db: conftest.py's fixture (torch.testing._internal, imported when these tests run)

OPINFO = {  # op_db name -> our op
    "nn.functional.cross_entropy": "cross_entropy",
    "logsumexp": "logsumexp",
    "nn.functional.batch_norm": "batch_norm",
    "tanh": "tanh",
    "nn.functional.linear": "linear",
    "nn.functional.embedding": "embedding",
}
DTYPES = (torch.float64, torch.float32)
TARGET = 240  # issue 14: of the 252 samples (torch 2.13, CPU, float64 and float32), the rest only max_norm
MAX_NORM = "max_norm: refused, F.embedding renormalises the caller's table in place"
OTHER_BRANCH = "needs cross_entropy features (other branch)"
ELEMENTWISE_CAP = 1 << 16  # elements of a tanh sample checked in the default profile (see _map)


class Unfit(Exception):
    """A sample that does not fit, with its reason."""


# ---------------------------------------------------------------- cross_entropy features, probed


def _accepts(call) -> bool:
    try:
        call()
    except (TypeError, ValueError):
        return False
    return True


@functools.cache
def cross_entropy_features() -> dict[str, bool]:
    """Which of the other branch's cross_entropy features our kernel has: tried, not assumed."""
    ce, z = backprop.cross_entropy, torch.randn(2, 3, dtype=torch.float64)
    return {
        "soft targets": _accepts(lambda: ce.forward(z, torch.softmax(torch.randn(2, 3, dtype=torch.float64), 1))),
        "class weights": _accepts(lambda: ce.forward(z, torch.tensor([0, 2]), weight=torch.ones(3, dtype=torch.float64))),
        "K-dim": _accepts(lambda: ce.forward(z[..., None], torch.tensor([[0], [2]]))),
    }


def _cross_entropy_needs(logits, target, kwargs) -> list[str]:
    needs = []
    if target.is_floating_point():
        needs.append("soft targets")
    if kwargs.get("weight") is not None:
        needs.append("class weights")
    if logits.ndim > 2:
        needs.append("K-dim")
    return needs


# ---------------------------------------------------------------- samples onto our signatures


def _map(name: str, sample) -> tuple[tuple, dict, object]:
    """(args, options, reference) for our op: the reference has our signature."""
    x, args, kwargs = sample.input, list(sample.args), dict(sample.kwargs)
    if name == "cross_entropy":
        return (x, args[0]), kwargs, references.cross_entropy  # casts weight with the logits
    if name == "logsumexp":
        dim, keepdim = (args + [kwargs.pop("dim", None), kwargs.pop("keepdim", False)])[:2] if args else (
            kwargs["dim"], kwargs.get("keepdim", False))
        return (x,), {"dim": dim, "keepdim": keepdim}, references.logsumexp
    if name == "batch_norm":
        # F.batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
        # momentum=0.1, eps=1e-5): note torch's training=False default, ours is True
        rm, rv, weight, bias = (args + [None] * 4)[:4]
        options = {"training": kwargs.get("training", False), "momentum": kwargs.get("momentum", 0.1),
                   "eps": kwargs.get("eps", 1e-5)}
        if rm is not None:
            options.update(running_mean=rm, running_var=rv)
        return (x, kwargs.get("weight", weight), kwargs.get("bias", bias)), options, references.batch_norm
    if name == "tanh":
        if x.numel() > ELEMENTWISE_CAP and settings().max_examples < 100:
            # an elementwise op: a slice of the sample is a sample of its own; the whole of it costs
            # seconds per sample in the oracle (six of these, ~1M elements each). The thorough
            # hypothesis profile checks them whole.
            x = x.reshape(-1)[:ELEMENTWISE_CAP]
        return (x,), {}, references.tanh
    if name == "linear":
        weight, bias = (args + [kwargs.get("weight"), kwargs.get("bias")])[:2] if args else (kwargs["weight"], kwargs.get("bias"))
        return (x, weight, bias), {}, references.linear
    if name == "embedding":  # the OpInfo's input is the table: F.embedding(args[0], input, **kwargs)
        return (args[0], x), kwargs, references.embedding
    raise AssertionError(name)


def _check_sample(name: str, sample) -> str:
    """'fit', or raises Unfit(reason)."""
    args, options, reference = _map(name, sample)
    op = backprop.OPS[name]
    if name == "cross_entropy":
        missing = [f for f in _cross_entropy_needs(args[0], args[1], options) if not cross_entropy_features()[f]]
        if missing:
            raise Unfit(OTHER_BRANCH)
    if name == "embedding" and options.get("max_norm") is not None:
        with pytest.raises(ValueError, match="max_norm"):
            op.forward(*args, **options)
        raise Unfit(MAX_NORM)
    magnitude = TABLE[name].magnitude if name != "cross_entropy" or set(options) <= {
        "reduction", "ignore_index", "label_smoothing"} else None
    if name == "embedding" and options.get("sparse"):
        # the oracle compares dense tensors: the dense twin under the harness, then the sparse
        # gradient against torch's, entry for entry
        check_against_autograd(op, reference, *args, magnitude=magnitude, **{**options, "sparse": False})
        indices, weight = args
        out, cache = op.forward(*args, **options)
        dout = torch.randn_like(out)
        leaf = weight.detach().clone().requires_grad_()
        F.embedding(indices.reshape(-1), leaf, **options).backward(dout.reshape(-1, weight.shape[1]))
        dweight = op.backward(dout, cache)[1]
        torch.testing.assert_close(dweight.coalesce().to_dense(), leaf.grad.coalesce().to_dense())
        return "fit"
    try:
        check_against_autograd(op, reference, *args, magnitude=magnitude, **options)
    except (TypeError, ValueError) as e:
        raise Unfit(f"refused: {type(e).__name__}: {e}") from None
    return "fit"


def results(op_db) -> list[tuple[str, str, str, str]]:
    """(op, dtype, sample, outcome) for every reference input: 'fit' or the reason it does not."""
    rows = []
    for info in op_db:
        if info.name not in OPINFO:
            continue
        name = OPINFO[info.name]
        label = info.name + (f".{info.variant_test_name}" if info.variant_test_name else "")
        for dtype in DTYPES:
            for k, sample in enumerate(info.reference_inputs("cpu", dtype, requires_grad=False)):
                try:
                    outcome = _check_sample(name, sample)
                except Unfit as e:
                    outcome = str(e)
                except AssertionError as e:  # a CheckFailure, or the sparse comparison
                    outcome = f"MISMATCH: {str(e).splitlines()[0]}"
                rows.append((label, str(dtype).removeprefix("torch."), f"#{k} {sample.summary()[:90]}"
                             if hasattr(sample, "summary") else f"#{k}", outcome))
    return rows


def summary(rows) -> str:
    by_op = collections.Counter((r[0], r[3] == "fit") for r in rows)
    reasons = collections.Counter(r[3] for r in rows if r[3] != "fit")
    lines = [f"OpInfo samples: {sum(r[3] == 'fit' for r in rows)} of {len(rows)} fit the contract"]
    for op in dict.fromkeys(r[0] for r in rows):
        lines.append(f"  {op:40s} fit {by_op[(op, True)]:3d}  not {by_op[(op, False)]:3d}")
    lines += [f"  not fit ({n}): {reason}" for reason, n in reasons.most_common()]
    if settings().max_examples < 100:
        lines.append(f"  (default profile: tanh samples over {ELEMENTWISE_CAP} elements are checked on their "
                     "first ones; HYPOTHESIS_PROFILE=thorough checks them whole)")
    return "\n".join(lines)


def threshold(rows) -> int:
    """TARGET, less the samples that wait for the other branch's cross_entropy features."""
    return TARGET - sum(r[3] == OTHER_BRANCH for r in rows)


def test_opinfo_samples_fit_the_contract(op_db):
    rows = results(op_db)
    text = summary(rows)
    print("\n" + text)
    unexpected = [r for r in rows if r[3] not in ("fit", MAX_NORM, OTHER_BRANCH)]
    assert not unexpected, "\n".join(" | ".join(r) for r in unexpected) + "\n" + text
    fit = sum(r[3] == "fit" for r in rows)
    assert fit >= threshold(rows), text
    if not any(r[3] == OTHER_BRANCH for r in rows):  # merged: the issue's own target
        assert fit >= TARGET, text


def test_every_torch_error_input_is_refused(op_db):
    """op_db's error_inputs (torch raises on each): ours must raise too, ideally ValueError/TypeError."""
    seen = 0
    for info in op_db:
        if info.name not in OPINFO or info.error_inputs_func is None:
            continue
        name = OPINFO[info.name]
        for error in info.error_inputs("cpu"):
            args, options, _ = _map(name, error.sample_input)
            with pytest.raises((ValueError, TypeError)):
                backprop.OPS[name].forward(*args, **options)
            seen += 1
    assert seen > 0, "op_db gave no error inputs for these ops"


def test_torchs_test_utilities_leave_this_suites_hypothesis_profile(op_db):
    """torch.testing._internal's common_utils, imported for op_db, registers and loads Hypothesis
    profiles of its own ("pytorch_ci", 50 examples, when CI is set; its "dev", 10): conftest.py's
    fixture loads this suite's again (ci and dev: 40 examples), for the tests after it."""
    name = os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
    assert settings.get_current_profile_name() == name
    assert settings.get_profile("dev").max_examples == 40
    if name in ("ci", "dev"):
        assert settings().max_examples == 40
