"""The notebook grader: a correct solution passes, each seeded learner's slip gets its diagnosis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from backprop.exercise import cli_main, grade, grade_training
from backprop.exercise.cli import run_solution
from backprop.exercise.forward import GRADS, PARAMS

SOLUTIONS = Path(__file__).parent / "exercise_solutions"
CORRECT = SOLUTIONS / "correct.py"
ROOT = Path(__file__).parent.parent


def solution(tmp_path: Path, old: str = "", new: str = "", name: str = "solution.py") -> Path:
    """correct.py with its one line containing ``old`` replaced by ``new``."""
    text = CORRECT.read_text()
    if old:
        lines = text.splitlines()
        hits = [i for i, ln in enumerate(lines) if old in ln]
        assert len(hits) == 1, f"{old!r} is on {len(hits)} lines of correct.py"
        lines[hits[0]] = lines[hits[0]].replace(old, new)
        text = "\n".join(lines) + "\n"
    path = tmp_path / name
    path.write_text(text)
    return path


def graded(tmp_path: Path, old: str = "", new: str = ""):
    return grade(run_solution(solution(tmp_path, old, new)), quiet=True)


def test_correct_solution_passes_every_row():
    result = grade(run_solution(CORRECT), quiet=True)
    assert result.passed and not result.missing
    assert {r.verdict for r in result.rows} <= {"exact", "ok"}
    # Above dhpreact the notebook's formulas are autograd's, rounding included.
    assert all(result[k].verdict == "exact" for k in GRADS[:GRADS.index("dhpreact")])
    assert result["dhpreact"].verdict == "ok"
    assert "tanh_backward" in result["dhpreact"].diagnosis and "ulp" in result["dhpreact"].diagnosis
    assert "carries the rounding of dhpreact" in result["dbnbias"].diagnosis


def test_addcmul_tanh_backward_is_bit_exact(tmp_path):
    """The finding in docs/grader.md: with dhpreact rounded as tanh_backward does, every row is exact."""
    result = graded(tmp_path, "dhpreact = (1.0 - h**2) * dh",
                    "dhpreact = dh * torch.addcmul(torch.ones_like(h), h, h, value=-1)")
    assert [r.name for r in result.rows if r.verdict != "exact"] == [], "see docs/grader.md, Bit-exactness"


# One learner's slip per line: (text in correct.py, what the learner wrote, row, verdict, words of the diagnosis)
SLIPS = [
    ("dlogprobs[range(n), Yb] = -1.0/n", "dlogprobs[range(n), Yb] = -1.0", "dlogprobs", "wrong", "missing 1/n"),
    ("dcounts_sum = -counts_sum**-2", "dcounts_sum = counts_sum**-2", "dcounts_sum", "wrong", "sign flipped"),
    ("dcounts += torch.ones_like(counts) * dcounts_sum", "pass", "dcounts", "wrong", "missing the branch through counts_sum"),
    ("dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes",
     "dlogits = F.softmax(logits, 1) / n", "dlogits", "wrong", "one-hot's -1 at the targets is missing"),
    ("dW2 = h.T @ dlogits", "dW2 = dlogits.T @ h", "dW2", "wrong", "transposed: shape [27, 64] instead of [64, 27]"),
    ("db2 = dlogits.sum(0)", "db2 = dlogits.sum(1)", "db2", "wrong", "summed over dim 1 instead of dim 0"),
    ("dbnbias = dhpreact.sum(0, keepdim=True)", "dbnbias = dhpreact.sum(1, keepdim=True)", "dbnbias", "wrong",
     "summed over dim 1 instead of dim 0"),
    ("dbnvar = (-0.5*(bnvar + 1e-5)**-1.5) * dbnvar_inv", "dbnvar = (bnvar + 1e-5)**-1.5 * dbnvar_inv", "dbnvar",
     "wrong", "power rule's -1/2 is missing"),
    ("dbndiff2 = (1.0/(n-1))*", "dbndiff2 = (1.0/n)*", "dbndiff2", "wrong", "1/n where Bessel's 1/(n-1) belongs"),
    ("dbndiff += (2*bndiff) * dbndiff2", "dbndiff += bndiff * dbndiff2", "dbndiff", "wrong",
     "the branch through bndiff2 is wrong: half the gradient"),
    ("dbnmeani = (-dbndiff).sum(0, keepdim=True)", "dbnmeani = (-dbndiff).sum(0)", "dbnmeani", "wrong",
     "shape [64] instead of [1, 64]: right values"),
    ("dC[ix] += demb[k, j]", "dC[ix] = demb[k, j]", "dC", "wrong", "wrong: max error"),
    ("dhpreact = (1.0 - h**2) * dh", "dhpreact = (1.0 - h*h) * dh", "dhpreact", "ok", "not bit-exact"),
    ("dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1]) * dlogit_maxes",
     "dlogits = (F.softmax(logits, 1) - F.one_hot(Yb, 27)) / n", "dlogits", "ok", "exercise 2"),
    ("dhprebn += 1.0/n * (torch.ones_like(hprebn) * dbnmeani)",
     "dhprebn = bngain*bnvar_inv/n * (n*dhpreact - dhpreact.sum(0) - n/(n-1)*bnraw*(dhpreact*bnraw).sum(0))",
     "dhprebn", "ok", "not bit-exact"),
]


@pytest.mark.parametrize(("old", "new", "row", "verdict", "words"), SLIPS, ids=[s[2] + "-" + s[3] for s in SLIPS])
def test_slip_gets_its_diagnosis_on_its_row(tmp_path, old, new, row, verdict, words):
    result = graded(tmp_path, old, new)
    assert result[row].verdict == verdict, result[row]
    assert words in result[row].diagnosis, result[row].diagnosis
    before = GRADS[:GRADS.index(row)]
    assert [k for k in before if result[k].verdict not in ("ok", "exact")] == []
    assert result.passed == (verdict != "wrong")


def test_rows_computed_from_a_wrong_row_point_at_it(tmp_path):
    result = graded(tmp_path, "dlogprobs[range(n), Yb] = -1.0/n", "dlogprobs[range(n), Yb] = -1.0")
    assert result["dprobs"].verdict == "wrong"
    assert "downstream of wrong dlogprobs" in result["dprobs"].diagnosis
    assert "downstream of wrong dlogprobs" not in result["dlogprobs"].diagnosis


def test_broadcasting_cmp_columns_hide_what_the_verdict_catches(tmp_path):
    row = graded(tmp_path, "dbnmeani = (-dbndiff).sum(0, keepdim=True)", "dbnmeani = (-dbndiff).sum(0)")["dbnmeani"]
    assert row.verdict == "wrong" and row.approx is True  # cmp's allclose broadcasts [64] against [1, 64]


def test_missing_gradients_are_not_done_yet(capsys):
    ns = run_solution(CORRECT)
    for k in ("dW1", "demb", "dC"):
        del ns[k]
    result = grade(ns)
    assert result.missing == ["dW1", "demb", "dC"] and result.passed
    out = capsys.readouterr().out
    assert "not done yet: dW1, demb, dC" in out and "23 of 26 done" in out


def test_a_gradient_under_another_name_is_pointed_at(capsys):
    ns = run_solution(CORRECT)
    ns["dbnmean"] = ns.pop("dbnmeani")  # exercise 4's forward calls it bnmean
    result = grade(ns)
    assert result.missing == ["dbnmeani"]
    assert "dbnmeani is not done yet, but dbnmean is defined" in capsys.readouterr().out


def test_table_puts_the_verdict_first_and_quiet_prints_nothing(capsys):
    ns = run_solution(CORRECT)
    grade(ns, quiet=True)
    assert capsys.readouterr().out == ""
    grade(ns)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("verdict | gradient") and "autograd in float32" in lines[0]
    assert lines[2].startswith("exact   | dlogprobs")


def test_learner_tensors_are_left_alone():
    ns = run_solution(CORRECT)
    before = {k: v.clone() for k, v in ns.items() if isinstance(v, torch.Tensor)}
    grade(ns, quiet=True)
    assert all(torch.equal(ns[k], v) for k, v in before.items())
    assert all(ns[k].grad is None for k in PARAMS)


def test_float64_solution_is_graded_at_float64_tolerances(tmp_path):
    old, new = "import torch.nn.functional as F", "import torch.nn.functional as F; torch.set_default_dtype(torch.float64)"
    default = torch.get_default_dtype()
    try:
        assert graded(tmp_path, old, new).passed
        ns = run_solution(solution(tmp_path, old, new))
    finally:
        torch.set_default_dtype(default)
    assert ns["C"].dtype == torch.float64
    ns["dW2"] = ns["dW2"] * (1 + 1e-6)  # a float32-sized error is wrong in float64
    assert grade(ns, quiet=True)["dW2"].verdict == "wrong"


def test_not_a_tensor_is_wrong():
    ns = run_solution(CORRECT)
    ns["dh"] = ns["dh"].tolist()
    assert "not a tensor: list" in grade(ns, quiet=True)["dh"].diagnosis


@pytest.mark.parametrize(("change", "error", "words"), [
    (lambda ns: 42, TypeError, "expected a mapping"),
    (lambda ns: {k: v for k, v in ns.items() if k != "W1"}, ValueError, "no `W1`"),
    (lambda ns: {**ns, "Xb": ns["Xb"].float()}, TypeError, "integer tensors"),
    (lambda ns: {**ns, "n": 7}, ValueError, "n is 7"),
    (lambda ns: {**ns, "W2": ns["W2"] + 0.1}, ValueError, "re-run the forward cell"),
])
def test_bad_namespace_raises_naming_the_problem(change, error, words):
    with pytest.raises(error, match=words):
        grade(change(run_solution(CORRECT)), quiet=True)


def notebook(tmp_path: Path, extra: str = "") -> Path:
    """correct.py as a notebook, one cell per '# %%', with the magics and plots a real notebook has."""
    cells = ["%matplotlib inline\nimport matplotlib.pyplot as plt", "!ls"]
    cells += CORRECT.read_text().split("# %%")[1:]
    cells += ["plt.figure(figsize=(4, 4))\nplt.imshow(dlogits.detach().numpy(), cmap='gray')\nplt.show()" + extra]
    nb = {"cells": [{"cell_type": "markdown", "source": ["# exercise 1"]}]
          + [{"cell_type": "code", "source": c.splitlines(keepends=True), "outputs": []} for c in cells],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "ninja.ipynb"
    path.write_text(json.dumps(nb))
    return path


def test_cli_grades_a_notebook(tmp_path, capsys):
    assert cli_main([str(notebook(tmp_path))]) == 0
    assert "26 of 26 done" in capsys.readouterr().out


def test_notebook_runs_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert cli_main([str(notebook(tmp_path))]) == 0
    assert sys.modules["matplotlib"] is None


def test_cli_exit_codes_for_py(tmp_path, capsys):
    assert cli_main([str(solution(tmp_path))]) == 0
    assert cli_main([str(solution(tmp_path, "dW2 = h.T @ dlogits", "dW2 = dlogits.T @ h"))]) == 1
    assert "transposed" in capsys.readouterr().out


@pytest.mark.parametrize(("make", "words"), [
    (lambda tmp: tmp / "absent.py", "no such file"),
    (lambda tmp: (tmp / "sol.txt").write_text("") and tmp / "sol.txt", "expected a .py or .ipynb"),
    (lambda tmp: solution(tmp, "dC = torch.zeros_like(C)", "raise RuntimeError('boom')"), "RuntimeError: boom"),
    (lambda tmp: (tmp / "nb.ipynb").write_text("{") and tmp / "nb.ipynb", "not a Jupyter notebook"),
    (lambda tmp: (tmp / "empty.py").write_text("x = 1") and tmp / "empty.py", "no `C`"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, make, words):
    path = make(tmp_path)
    assert cli_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and str(path) in err and "Traceback" not in err


def test_a_whole_notebook_with_exercise_4_is_graded_where_it_last_fits(tmp_path, capsys):
    """A learner's whole notebook: exercise 4's training cell changes the parameters after exercise 1's forward,
    so the final state can't be graded; the last cell after which it can is graded, and the output says so."""
    step = ("\n# %%\nwith torch.no_grad():\n    for p, grad in zip(parameters, [dC, dW1, db1, dW2, db2, dbngain, "
            "dbnbias]):\n        p.data += -0.1 * grad\n")
    nb = notebook(tmp_path)
    cells = json.loads(nb.read_text())
    cells["cells"].append({"cell_type": "code", "source": step, "outputs": []})
    nb.write_text(json.dumps(cells))
    assert cli_main([str(nb)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "26 of 26 done" in out and "as it stood after cell 7 of 8" in out and "`emb` differs" in out
    nb.write_text(nb.read_text().replace("dbndiff2 = (1.0/(n-1))*", "dbndiff2 = (1.0/n)*"))
    assert cli_main([str(nb)]) == 1
    assert "WRONG   | dbndiff2" in capsys.readouterr().out


def test_a_wrong_last_cell_is_not_graded_from_an_earlier_state(tmp_path, capsys):
    """The fallback above is for a later cell that trains the parameters. A last cell that changes an
    atom and a gradient (the parameters untouched) is the notebook's answer: exit 2 with the reason,
    never the earlier, correct gradient graded with exit 0."""
    nb = notebook(tmp_path)
    cells = json.loads(nb.read_text())
    cells["cells"].append({"cell_type": "code", "source": "logits = logits + 0.5\ndh = dh * 2\n", "outputs": []})
    nb.write_text(json.dumps(cells))
    assert cli_main([str(nb)]) == 2
    captured = capsys.readouterr()
    assert "as it stood after" not in captured.out and "`logits` differs" in captured.err, captured


def test_a_line_magic_keeps_the_error_line_number(tmp_path, capsys):
    """A cell's % and ! lines are blanked, not dropped, so an error's 'cell K, line L' is the learner's line."""
    nb = notebook(tmp_path)
    cells = json.loads(nb.read_text())
    cells["cells"].append({"cell_type": "code", "source": "%matplotlib inline\n!ls\nx = 1\nundefined_name\n",
                           "outputs": []})
    nb.write_text(json.dumps(cells))
    assert cli_main([str(nb)]) == 2
    assert "line 4" in capsys.readouterr().err


def test_a_script_with_a_training_step_after_the_backward_says_what_to_do(tmp_path, capsys):
    path = solution(tmp_path)
    path.write_text(path.read_text() + "with torch.no_grad():\n    W2 -= 0.1 * dW2\n")
    assert cli_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "`logits` differs" in err and "grade a copy that stops before it" in err, err


def test_an_atom_changed_in_place_is_named_as_such(tmp_path):
    """Exercise 2 written on a .detach() of logits changes logits itself: not a training step."""
    ns = run_solution(solution(tmp_path, "dlogits += F.one_hot(logits.max(1).indices, num_classes=logits.shape[1])",
                               "dlogits = logits.detach(); dlogits.exp_(); dlogits /= dlogits.sum(1, keepdim=True)  #"))
    with pytest.raises(ValueError, match=r"`logits` was changed in place .*\.clone\(\)"):
        grade(ns, quiet=True)


@pytest.mark.parametrize(("change", "words"), [
    (lambda t: t.to_sparse(), "sparse_coo tensor"),
    (lambda t: t.to("meta"), "on device meta"),
])
def test_a_sparse_or_other_device_gradient_is_wrong_not_a_crash(change, words):
    ns = run_solution(CORRECT)
    ns["dC"] = change(ns["dC"])
    row = grade(ns, quiet=True)["dC"]
    assert row.verdict == "wrong" and words in row.diagnosis, row


def test_a_gradient_in_a_coarser_dtype_says_so():
    ns = run_solution(CORRECT)
    ns["dW2"] = ns["dW2"].half()
    row = grade(ns, quiet=True)["dW2"]
    assert row.verdict == "wrong" and row.diagnosis.startswith("dtype torch.float16, coarser than autograd's torch.float32")


def test_a_sum_that_cancels_counts_ulp_of_its_terms():
    """db1 sums to 0 in exact arithmetic: its largest entry is rounding noise, no yardstick for ulp."""
    diagnosis = grade(run_solution(CORRECT), quiet=True)["db1"].diagnosis
    scaled = float(diagnosis.split("by at most ")[1].split(" ulp")[0])
    assert scaled < 16 and "sum of |terms|" in diagnosis, diagnosis
    assert "elementwise" not in diagnosis, diagnosis  # ulp of the rounding noise: billions, and no meaning


@pytest.mark.parametrize(("make", "words"), [
    (lambda tmp: solution(tmp, "dcounts_sum_inv = (counts * dprobs).sum(1, keepdim=True)",
                          "dcounts_sum_inv = (counts * dprobs).sum(1)"),
     "non-singleton dimension 1 (at line 68: dcounts += torch.ones_like(counts) * dcounts_sum)"),
    (lambda tmp: solution(tmp, "words = [", "words = open('names.txt').read().splitlines() or ["),
     "; relative paths are read from the solution's folder"),
    (lambda tmp: (tmp / "cells.ipynb").write_text('{"cells": ["x = 1"]}') and tmp / "cells.ipynb",
     "cells.ipynb: not a Jupyter notebook: "),
    (lambda tmp: (tmp / "nb.ipynb").write_text("{") and tmp / "nb.ipynb", "nb.ipynb: not a Jupyter notebook: "),
    (lambda tmp: (tmp / "folder.py").mkdir() or tmp / "folder.py", "folder.py: a directory, not a file"),
])
def test_cli_errors_say_where_and_what(tmp_path, capsys, make, words):
    path = make(tmp_path)
    assert cli_main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err, err
    assert "the solution raised ValueError" not in err


def test_python_m_backprop_exercise(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # one thread, as a worker
    bad = solution(tmp_path, "db2 = dlogits.sum(0)", "db2 = dlogits.sum(1)")
    proc = subprocess.run([sys.executable, "-m", "backprop.exercise", str(bad)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "WRONG   | db2" in proc.stdout


def manual_grads(p, Xb, Yb, slip=""):
    """Exercise 4's learner: the fused backward of exercises 2 and 3 in a training step."""
    C, W1, b1, W2, b2, bngain, bnbias = (p[k] for k in PARAMS)
    n = Xb.shape[0]
    embcat = C[Xb].view(n, -1)
    hprebn = embcat @ W1 + b1
    bnvar_inv = (hprebn.var(0, keepdim=True, unbiased=True) + 1e-5)**-0.5
    bnraw = (hprebn - hprebn.mean(0, keepdim=True)) * bnvar_inv
    h = torch.tanh(bngain * bnraw + bnbias)
    dlogits = F.softmax(h @ W2 + b2, 1)
    dlogits[range(n), Yb] -= 1
    if slip != "no 1/n":
        dlogits /= n
    dh = dlogits @ W2.T
    dhpreact = (1.0 - h**2) * dh
    dhprebn = bngain*bnvar_inv/n * (n*dhpreact - dhpreact.sum(0) - n/(n-1)*bnraw*(dhpreact*bnraw).sum(0))
    dC = torch.zeros_like(C).index_add_(0, Xb.view(-1), (dhprebn @ W1.T).view(-1, C.shape[1]))
    grads = [dC, embcat.T @ dhprebn, dhprebn.sum(0), h.T @ dlogits, dlogits.sum(0),
             (bnraw * dhpreact).sum(0, keepdim=True), dhpreact.sum(0, keepdim=True)]
    return grads if slip != "dict" else dict(zip(PARAMS, grads))


@pytest.mark.parametrize("form", ["list", "dict"])
def test_training_with_correct_gradients_passes(form):
    result = grade_training(lambda p, X, Y: manual_grads(p, X, Y, form), steps=20, quiet=True)
    assert result.passed and result.wrong_step is None, str(result)
    assert [r.name for r in result.rows] == list(PARAMS)


def test_training_with_float64_gradients_keeps_the_parameters_dtype():
    """p.data += -lr * grad keeps a float32 parameter float32 for a float64 grad; so does grade_training."""
    result = grade_training(lambda p, X, Y: [g.double() for g in manual_grads(p, X, Y)], steps=3, quiet=True)
    assert result.passed, str(result)


def test_training_stops_at_the_first_wrong_step(capsys):
    result = grade_training(lambda p, X, Y: manual_grads(p, X, Y, "no 1/n"), steps=5)
    assert not result.passed and result.wrong_step == 0
    assert "missing 1/n" in {r.name: r for r in result.rows}["dW2"].diagnosis
    assert "the gradients at step 0" in capsys.readouterr().out


@pytest.mark.parametrize(("kwargs", "error", "words"), [
    ({"grads_fn": 3}, TypeError, "grads_fn"),
    ({"grads_fn": lambda p, X, Y: 3}, TypeError, "must return"),
    ({"grads_fn": lambda p, X, Y: {"C": p["C"]}}, ValueError, "no gradient for W1"),
    ({"steps": 0}, ValueError, "steps"),
    ({"dtype": torch.int64}, TypeError, "dtype"),
])
def test_training_bad_input(kwargs, error, words):
    kwargs = {"grads_fn": manual_grads, "quiet": True, **kwargs}
    with pytest.raises(error, match=words):
        grade_training(**kwargs)
