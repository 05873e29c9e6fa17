"""The backprop command. Two runs are real processes, as a user starts them: `python -m backprop`
and the installed console script. The rest run cli.main in this process (the `cli` fixture in
conftest.py), with the same output streams and exit codes; tests/test_faults_cli.py has the
cases that need a process (signals, pipes, resource limits, closed descriptors)."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=120):
    """python -m backprop with this interpreter; PYTHONPATH is inherited, so a source checkout on
    it is the package that runs. One torch thread, as a pytest-xdist worker runs."""
    return subprocess.run([sys.executable, "-m", "backprop", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=timeout)


def console_script(*args, timeout=120):
    """The `backprop` command that pip installed next to this interpreter (the [project.scripts]
    entry point), with this checkout first on PYTHONPATH, so that it is the package that runs."""
    places = (sysconfig.get_path("scripts"), sysconfig.get_path("scripts", f"{os.name}_user"))
    script = next((Path(d) / "backprop" for d in places if (Path(d) / "backprop").is_file()), None)
    assert script, f"no backprop command in {places}: install the package (pip install -e .) to run the tests"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_check_prints_the_table_and_passes():
    """`python -m backprop`, end to end: a fresh interpreter, its stdout and exit code."""
    r = run("check")
    assert r.returncode == 0, r.stderr
    assert "words       29910   vocabulary 27   examples train 171878 / val 21405 / test 21481" in r.stdout
    assert "parameters  4137" in r.stdout
    assert "26/26 exercise-1 rows bit-exact; 0 rows outside torch.allclose" in r.stdout
    assert "verdict: all rows pass (error against float64 autograd <= 2 x autograd's own error" in r.stdout
    assert "fused hprebn" in r.stdout and "fused logits" in r.stdout


def test_check_json_is_one_object(cli):
    code, stdout, err = cli("check", "--json", "--dtype", "float64")
    assert code == 0, err
    out = json.loads(stdout)
    assert set(out) == {"words", "vocab_size", "examples", "parameters", "loss", "rows"}
    assert out["parameters"] == 4137 and len(out["rows"]) == 26 + 9
    assert all(row["approximate"] and row["passed"] for row in out["rows"])
    assert set(out["rows"][0]) == {"name", "exact", "approximate", "maxdiff", "error", "torch_error", "passed"}


def test_train_writes_outputs_and_sample_reads_the_checkpoint(tmp_path, cli):
    """train in this process; sample through the installed `backprop` console script, end to end,
    and again in this process: the same draws."""
    code, out, err = cli("train", "--steps", "300", "--hidden", "32", "--verify-every", "100", "--out",
                         tmp_path, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert set(summary) >= {"train_loss", "val_loss", "test_loss", "steps", "seconds", "samples"}
    assert summary["steps"] == 300 and len(summary["samples"]) == 20
    assert summary["val_loss"] < 3.0
    assert summary["checks"] == 3 and summary["optimizer"] == "sgd"
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Traceback" not in err and "100%" in err  # the progress, on stderr only
    assert json.loads((tmp_path / "summary.json").read_text())["val_loss"] == summary["val_loss"]
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(state["params"]) == {"C", "W1", "b1", "W2", "b2", "bngain", "bnbias"}
    s = console_script("sample", "--checkpoint", str(tmp_path / "model.pt"), "-n", "7", "--seed", "1")
    assert s.returncode == 0, s.stderr
    assert len(s.stdout.splitlines()) == 7
    assert cli("sample", "--checkpoint", tmp_path / "model.pt", "-n", "7", "--seed", "1")[:2] == (0, s.stdout)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "/nonexistent/words.txt"], "does not exist"),
        (["train", "--steps", "0"], "--steps: expected a positive integer, got 0"),
        (["check", "--batch-size", "-3"], "--batch-size: expected an integer >= 2 (batch norm's 1/(n-1) variance needs two rows), got -3"),
        (["sample", "--checkpoint", "/nonexistent/model.pt"], "does not exist"),
    ],
)
def test_bad_input_is_a_clear_message_and_exit_2(args, message, cli):
    code, out, err = cli(*args)
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err


def test_empty_data_file(tmp_path, cli):
    (tmp_path / "empty.txt").write_text("")
    code, _, err = cli("check", "--data", tmp_path / "empty.txt")
    assert code == 2 and "holds no words" in err and "Traceback" not in err


@pytest.mark.parametrize("content", [b"not a checkpoint", b'{"steps": 10}\n'])
def test_a_foreign_checkpoint_is_refused(tmp_path, cli, content):
    """One line that says what was expected and what torch.load found, never torch's advice to
    reload with weights_only=False (it would run whatever code a foreign file holds)."""
    (tmp_path / "junk.pt").write_bytes(content)
    code, _, err = cli("sample", "--checkpoint", tmp_path / "junk.pt")
    assert code == 2 and "is not a backprop checkpoint" in err and "Traceback" not in err
    assert "written by train --out" in err and "weights_only" not in err, err


def test_characters_outside_a_to_z_are_handled(tmp_path, cli):
    (tmp_path / "words.txt").write_text("zoë\nrenée\njosé\nanna-lee\n" * 50)
    code, out, err = cli("train", "--data", tmp_path / "words.txt", "--steps", "20", "--hidden", "16", "--json")
    assert code == 0, err
    assert json.loads(out)["steps"] == 20


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_a_gpu(cli):
    code, _, err = cli("check", "--device", "cuda")
    assert code == 2 and "no CUDA device is available" in err and "Traceback" not in err


@pytest.mark.parametrize("mode, code", [("auto", 0), ("yes", 1)])
def test_a_failed_compiled_build(mode, code, monkeypatch, cli):
    """In process (the failure is injected): --compile auto says why on stderr and trains eager,
    reporting compiled: false; --compile yes fails with one line, exit 1."""
    from backprop import compiled
    from backprop.makemore import aot, train

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler today\nsecond line")

    monkeypatch.setattr(aot, "compiled_step", broken)
    monkeypatch.setattr(compiled, "cpu_compiler_found", lambda: True)
    monkeypatch.setattr(train, "COMPILE_FROM_STEPS", 1)
    got, out, err = cli("train", "--steps", "3", "--hidden", "8", "--json", "--compile", mode)
    assert got == code
    if mode == "yes":
        assert err == ("backprop train: --compile yes: building the compiled step failed "
                       "(RuntimeError: no compiler today)\n")
        return
    assert json.loads(out)["compiled"] is False
    assert "building the compiled step failed (RuntimeError: no compiler today); training with the eager step" in err


@pytest.mark.parametrize("args, message", [
    (("train", "--batch-size", "1"), "--batch-size: expected an integer >= 2"),
    (("check", "--batch-size", "1"), "--batch-size: expected an integer >= 2"),
])
def test_a_batch_of_one_row_is_refused(args, message, cli):
    code, _, err = cli(*args)
    assert code == 2 and message in err and "Traceback" not in err


def test_too_few_words_is_a_clear_message(tmp_path, cli):
    (tmp_path / "two.txt").write_text("ab\ncd\n")
    code, _, err = cli("train", "--data", tmp_path / "two.txt", "--steps", "3")
    assert code == 2 and "Traceback" not in err
    assert "2 words split 80/10/10 into 1 / 0 / 1 words, leaving the val split empty" in err


def test_momentum_with_verification_prints_the_checks(cli):
    code, out, err = cli("train", "--optimizer", "momentum", "--steps", "200", "--hidden", "16",
                         "--verify-every", "50", "--compile", "no")
    assert code == 0, err
    assert "trained 200 steps in" in out and "steps/s; manual backward, momentum)" in out
    assert "gradient checks against autograd: 4 passed (every 50 steps)" in out


def test_a_bad_optimizer_is_refused(cli):
    code, _, err = cli("train", "--optimizer", "adam")
    assert code == 2 and "--optimizer: invalid choice: 'adam'" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["check", "train", "sample", "bench"])
def test_every_option_has_help_and_its_default(command):
    """One line of help for each option, and its default shown."""
    from backprop import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.dest == "help":
            continue
        assert action.help, (command, action.dest)
        if not action.required:
            assert "default" in sub.formatter_class(command)._get_help_string(action), (command, action.dest)
    text = sub.format_help()
    assert "(default: " in text


def test_train_help_lists_the_defaults(cli):
    code, out, _ = cli("train", "--help")
    assert code == 0
    help_text = " ".join(out.split())
    for expected in ("training steps (default: 200000)", "learning rate (default: 0.1)",
                     "(default: sgd)", "(default: auto)", "(0: never) (default: 0)"):
        assert expected in help_text, expected


def test_without_matplotlib_train_out_says_so_and_writes_the_rest(tmp_path, monkeypatch, cli):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code, out, err = cli("train", "--steps", "3", "--hidden", "8", "--out", tmp_path, "--json")
    assert code == 0
    assert json.loads(out)["steps"] == 3
    assert "loss.png needs matplotlib, which is not installed (pip install 'backprop[plot]')" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt", "summary.json"]


def test_progress_off_a_terminal_is_a_line_every_tenth(capsys):
    from backprop.cli.progress import Progress

    progress = Progress(1000)
    for done in range(100, 1001, 100):
        progress(done, 1000, 2.5)
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and lines[-1].startswith("100%") and "loss=2.5000" in lines[-1]
    assert all("step" in line for line in lines)


@pytest.mark.parametrize("flags, full, quick, select", [
    ((), None, None, None),
    (("--full",), "1", None, None),
    (("--quick", "--no-sweep"), None, "1", "(notebook or train_step) and (not sweep)"),
])
def test_bench_passes_its_run_to_pytest(cli, tmp_path, monkeypatch, flags, full, quick, select):
    """backprop bench's options reach the benchmark run: --full (BACKPROP_BENCH_FULL: the xl
    shapes, the custom-op path at the large ones, the per-contender tables), --quick, the -k
    selection; a timing pass, a memory pass, then the report. No benchmark runs here."""
    import subprocess

    from backprop.cli import bench

    calls = []
    monkeypatch.setattr(bench.subprocess, "run", lambda argv, env=None, stdout=None: calls.append(
        (argv, env)) or subprocess.CompletedProcess(argv, 0))
    code, _, err = cli("bench", "--out", tmp_path, *flags)
    assert code == 0, err
    (timing, env), (memory, memory_env), (report, _) = calls
    assert [env.get("BACKPROP_BENCH_FULL"), env.get("BACKPROP_BENCH_QUICK")] == [full, quick]
    assert memory_env["BACKPROP_BENCH"] == "memory" and memory_env.get("BACKPROP_BENCH_FULL") == full
    assert (timing[timing.index("-k") + 1] if "-k" in timing else None) == select
    assert "--benchmark-enable" in timing and report[1].endswith("report.py")
