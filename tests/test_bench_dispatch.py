"""The dispatch counts at the notebook scale (backprop.bench.dispatch): one forward and one backward
of each op on its notebook-scale benchmark inputs may dispatch at most the pinned number of aten
ops and host syncs. A change that adds one fails here: lower a bound when a kernel sheds a
dispatch, raise one only with the reason in the commit (docs/benchmarks-log.md, "Notebook scale:
dispatches and host syncs", has the table and what each op's calls are)."""

import pytest
import torch

import backprop
from backprop import _check
from backprop.bench import dispatch

# "<op> <notebook label>": (forward ops, forward syncs, backward ops, backward syncs), at most
BOUNDS = {
    "cross_entropy notebook 32x27": (14, 1, 12, 0),  # the range check: one fused comparison, one sync
    "logsumexp notebook 32x27": (8, 0, 5, 0),
    # + 1 forward op since the variance's sum folded into the residual mean's pass (one addcmul_ of
    # (C,) vectors), which saves the compiled forward a reduction over x at the large shapes
    # + 3 backward ops since the cache keeps x, not x-hat: backward recomputes x-hat with the
    # forward's sub, sub_ and mul_ (the forward writes one (N, C) buffer less, the cache keeps none)
    "batch_norm notebook 32x64 correction=0": (12, 0, 12, 0),
    "batch_norm notebook 32x64 correction=1": (12, 0, 12, 0),
    "tanh notebook 32x200": (1, 0, 4, 0),
    "linear notebook 32x30->200": (2, 0, 4, 0),
    "embedding notebook V=27 E=10 32x3": (5, 1, 4, 0),  # the range check, as cross_entropy's
    # the gradients come out of the forward, chunk by chunk (log_softmax, the smoothing and weight
    # terms, two matmuls per chunk); the backward only scales them by dout
    "linear_cross_entropy notebook 32x200->27": (36, 1, 3, 0),
}


@pytest.fixture(scope="module")
def rows():
    return dispatch.rows()


def test_every_op_within_its_bound(rows):
    assert {r.case.op for r in rows} == set(backprop.OPS)
    assert dispatch.over_bounds(rows, BOUNDS) == []


def test_torch_paths_counted(rows):
    """The torch columns are real counts: autograd's cross-entropy is log_softmax and nll_loss
    (forward) and their two backward ops; aten's native pair the same four."""
    (ce,) = [r for r in rows if r.case.op == "cross_entropy"]
    assert [n for n in ce.torch_fwd.names + ce.torch_bwd.names if "detach" not in n] == [
        "aten::_log_softmax", "aten::nll_loss_forward", "aten::nll_loss_backward",
        "aten::_log_softmax_backward_data"]
    assert ce.native.ops == 4 and ce.native.syncs == 0


def test_syncs_counted():
    """int(t), bool(t), .item() and data-sized outputs are host syncs; a view is a dispatch only."""
    t = torch.arange(4)
    _, c = dispatch.record(lambda: (int(t.sum()), bool(t.any()), t.nonzero(), t.view(2, 2)))
    assert c.syncs == 3 and c.ops == 6, c.names


def _old_all_in_range(t, low, high):
    """The range check before: aminmax read back as two ints (two syncs)."""
    if t.numel() == 0:
        return True
    lo, hi = (int(v) for v in torch.aminmax(t))
    return low <= lo and hi < high


def _tanh_backward_with_a_copy(dout, cache):
    """A deliberately worse kernel: the same gradient, one needless copy more."""
    return (backprop.tanh.backward_math.__wrapped__(dout.contiguous().clone(), cache)[0],)


def test_bound_fails_on_a_worse_kernel(monkeypatch):
    """The bounds can fail: an extra sync in a check, an extra dispatch in a backward."""
    monkeypatch.setattr(_check, "all_in_range", _old_all_in_range)
    original = backprop.tanh.backward_math
    _tanh_backward_with_a_copy.__wrapped__ = original
    monkeypatch.setattr(backprop.tanh, "backward_math", _tanh_backward_with_a_copy)
    rows = [dispatch.measure(c) for c in dispatch.cases() if c.op in ("embedding", "tanh")]
    rows.sort(key=lambda r: r.case.op)
    problems = [p.split(":")[0] + ":" + p.split(":")[1] for p in dispatch.over_bounds(rows, BOUNDS)]
    assert problems == ["embedding notebook V=27 E=10 32x3: forward ops 6 > bound 5",
                        "embedding notebook V=27 E=10 32x3: forward syncs 2 > bound 1",
                        "tanh notebook 32x200: backward ops 5 > bound 4"], problems


def test_cli_prints_the_table(capsys):
    assert dispatch.main(["--names"]) == 0
    out = capsys.readouterr().out
    assert "| cross_entropy | notebook 32x27 | 14 (1 sync) |" in out
    assert "- native fwd+bwd (4): _log_softmax, nll_loss_forward" in out
