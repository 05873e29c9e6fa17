"""The backprop command under faults: a full disk, Ctrl-C, a closed pipe, a full output device,
bad directories, a diverging run, bad input files and checkpoints, a hostile or corrupt cache.
Each failure is one line on stderr and a documented exit code (docs/faults.md), never a traceback.

Signals, resource limits, pipes and closed descriptors need a real process: those cases run
`python -m backprop`. The rest run cli.main in this process (the `cli` fixture in conftest.py; a
torch import per case would cost seconds). Permission
bits do not stop root: when run as root, a permission case drops to nobody in the subprocess when
nobody can run this interpreter, else it checks the function that decides, with the write refused.
"""

import json
import os
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from backprop.cli import commands
from backprop.makemore import aot, data, model, train

WORDS = ["emma", "olivia", "ava", "isabella", "sophia", "mia", "amelia", "harper", "evelyn", "abigail"]
TINY = ["--steps", "200", "--hidden", "8", "--compile", "no"]


@pytest.fixture
def words(tmp_path) -> Path:
    path = tmp_path / "words.txt"
    path.write_text("\n".join(WORDS) + "\n")
    return path


def run(*args, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kwargs.pop("env", {})}
    kwargs.setdefault("stdout", subprocess.PIPE)
    return subprocess.run([sys.executable, "-m", "backprop", *map(str, args)], stderr=subprocess.PIPE,
                          text=True, timeout=timeout, env=env, **kwargs)


def one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip() and "step/s" not in x and "|" not in x]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- §1 data loss


def test_out_is_refused_before_training(words, tmp_path, cli):
    """A bad --out ends the run before the first step (10**9 steps would never end)."""
    for out, message in ((words, "is a file"), (tmp_path / "o", "model.pt there is a directory")):
        if out != words:
            (out / "model.pt").mkdir(parents=True)
        code, _, err = cli("train", "--data", words, "--steps", 10**9, "--out", out)
        assert code == 2 and message in one_line(err)


def test_read_only_out_is_refused_before_training(words, tmp_path, cli, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() != 0:
        code, _, err = cli("train", "--data", words, "--steps", 10**9, "--out", out)
    else:  # root writes anyway: refuse the probe's write as the kernel would for another user
        def refused(*a, **k):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(commands.tempfile, "mkstemp", refused)
        code, _, err = cli("train", "--data", words, "--steps", 10**9, "--out", out)
    assert code == 2 and "is not writable (Permission denied)" in one_line(err)


def test_a_full_disk_keeps_the_old_checkpoint(words, tmp_path):
    """RLIMIT_FSIZE makes every write past 2 kB fail (EFBIG) in the subprocess: the new model.pt
    cannot be written, the old one stays whole, no temporary file is left, exit 1 with the reason."""
    out = tmp_path / "out"
    out.mkdir()
    good = out / "model.pt"
    good.write_bytes(b"a good checkpoint")

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    r = run("train", "--data", words, *TINY, "--out", out, preexec_fn=small_disk)
    assert r.returncode == 1, r.stderr
    line = one_line(r.stderr)
    assert f"writing {out} failed" in line and "not saved" in line and "File too large" in line
    assert good.read_bytes() == b"a good checkpoint"
    assert sorted(p.name for p in out.iterdir()) == ["model.pt"]


def test_a_failed_save_keeps_the_work_elsewhere(words, tmp_path, cli, monkeypatch):
    """The out directory goes bad after the check (here: the first write fails): the run is
    written to a temporary directory, named on stderr, and the exit is 1."""
    real = commands._write_outputs
    calls = []

    def flaky(out, *a):
        calls.append(out)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(out, *a)

    monkeypatch.setattr(commands, "_write_outputs", flaky)
    code, _, err = cli("train", "--data", words, *TINY, "--out", tmp_path / "o")
    line = one_line(err)
    assert code == 1 and "No space left on device" in line and f"saved in {calls[1]} instead" in line
    assert (calls[1] / "model.pt").is_file() and (calls[1] / "summary.json").is_file()


@pytest.mark.parametrize("lr", ["inf", "nan", "-1", "0"])
def test_the_learning_rate_must_be_finite(lr, cli):
    code, _, err = cli("train", "--lr", lr, "--steps", "1")
    assert code == 2 and "expected a positive finite number" in one_line(err)


def test_a_diverging_run_stops_writes_its_outputs_and_exits_1(words, tmp_path, cli):
    code, out, err = cli("train", "--data", words, *TINY, "--lr", "1e30", "--out", tmp_path)
    line = one_line(err)
    assert code == 1 and "diverged: the loss is nan at step" in line and "no samples drawn" in line
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stopped"].startswith("diverged") and summary["samples"] == []
    assert summary["steps_done"] < 200 and summary["train_loss"] is None  # NaN is not JSON
    assert torch.load(tmp_path / "model.pt", weights_only=True)["stopped"] == summary["stopped"]
    code, _, err = cli("sample", "--checkpoint", tmp_path / "model.pt")
    assert code == 2 and "non-finite values" in one_line(err)


def test_ctrl_c_stops_cleanly_and_keeps_the_steps_done(words, tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "backprop", "train", "--data", str(words), "--steps",
                          str(10**9), "--hidden", "8", "--compile", "no", "--out", str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"},
                         # as from a terminal: a shell without job control starts a background job
                         # (`.ci/run &`) with SIGINT ignored, every child inherits it, and Python then
                         # installs no KeyboardInterrupt handler (session 11's CI run hung so)
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = p.stderr.readline()  # the first progress line: training has started
    assert "step" in first, first
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # say where it was
        p.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack to stderr
        _, err = p.communicate(timeout=60)
        pytest.fail(f"no exit 60 s after SIGINT; its stacks at SIGABRT:\n{err[-6000:]}")
    assert p.returncode == 130
    line = one_line(err)
    assert line.startswith("backprop train: interrupted: after ") and "marked interrupted" in line
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state["stopped"].startswith("interrupted")
    assert json.loads((tmp_path / "summary.json").read_text())["steps_done"] >= 100
    model.Model.from_state(state)  # a usable checkpoint


# ----------------------------------------------------------------------------- §5 the CLI's own faults


def test_a_closed_pipe_is_quiet(tmp_path, dataset):
    """`backprop sample | head -1`: the reader goes away; no traceback, exit 141 (as SIGPIPE)."""
    ckpt = tmp_path / "model.pt"
    torch.save(_state(dataset), ckpt)
    r, w = os.pipe()
    os.close(r)  # nobody will read
    p = subprocess.run([sys.executable, "-m", "backprop", "sample", "--checkpoint", str(ckpt), "-n", "50"],
                       stdout=w, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(w)
    assert p.returncode == 141 and p.stderr == ""


def test_a_full_output_device_and_a_closed_stderr(tmp_path, dataset):
    ckpt = tmp_path / "model.pt"
    torch.save(_state(dataset), ckpt)
    with open("/dev/full", "w") as full:
        r = run("sample", "--checkpoint", ckpt, stdout=full)
    assert r.returncode == 1 and one_line(r.stderr) == "backprop: cannot write the output: No space left on device"
    # 2>&-: Python starts with sys.stderr None; an error must still exit 2, silently
    r = subprocess.run(f"{sys.executable} -m backprop sample --checkpoint {tmp_path} 2>&-", shell=True,
                       stdout=subprocess.PIPE, timeout=120)
    assert r.returncode == 2 and r.stdout == b""


@pytest.mark.parametrize("args, message", [
    (("check", "--seed", str(2**64)), "expected an integer in [-2**63, 2**64)"),
    (("train", "--seed", str(-(2**63) - 1)), "expected an integer in [-2**63, 2**64)"),
    (("sample", "--checkpoint", "x", "--seed", "1e3"), "expected an integer, got '1e3'"),
    (("train", "--hidden", str(10**12)), "needs about"),
    (("check", "--batch-size", str(10**15)), "needs about"),
    (("train", "--steps", str(10**12), "--hidden", str(10**9)), "needs about"),
])
def test_bad_numbers_are_one_line_and_exit_2(args, message, cli):
    code, _, err = cli(*args)
    assert code == 2 and message in one_line(err)


def test_bad_data_files(tmp_path, cli):
    cases = {tmp_path: "is a directory", Path("/proc/self/mem"): "cannot be read: Input/output error"}
    ctl = tmp_path / "ctl.txt"
    ctl.write_text("\n".join(WORDS + ["bad\x1b[2Jword"]))
    cases[ctl] = "non-printable character U+001B"
    for path, message in cases.items():
        code, _, err = cli("check", "--data", path)
        assert code == 2 and message in one_line(err), err


def test_a_byte_order_mark_is_not_a_character(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(WORDS).encode())
    assert "\ufeff" not in data.load_dataset(path).vocab.chars


def _state(ds, **change) -> dict:
    p = model.init_params(ds.vocab.size, 8)
    m = model.Model(p, ds.vocab, torch.zeros(1, 8), torch.ones(1, 8))
    state = m.state()
    for k, v in change.items():
        if k in model.PARAM_NAMES:
            state["params"][k] = v(state["params"][k])
        else:
            state[k] = v(state[k]) if callable(v) else v
    return state


@pytest.mark.parametrize("change, message", [
    ({"W2": lambda t: t[:, :5]}, "W2 has shape (8, 5), expected (8, 27)"),
    ({"chars": lambda c: c[:-1]}, "C has shape (27, 10), expected (26, 10)"),
    ({"C": lambda t: t.double()}, "one floating dtype"),
    ({"b1": lambda t: t.fill_(float("nan"))}, "b1 holds non-finite values"),
    ({"bnvar": lambda t: t[:, :3]}, "bnvar has shape (1, 3)"),
    ({"block_size": 8}, "block_size 8"),
    ({"chars": lambda c: c[:-1] + ["\x07"]}, "printable"),
])
def test_checkpoints_that_do_not_fit_together(change, message, tmp_path, cli, dataset):
    torch.save(_state(dataset, **change), tmp_path / "m.pt")
    code, _, err = cli("sample", "--checkpoint", tmp_path / "m.pt")
    assert code == 2 and "not a usable backprop checkpoint" in err and message in one_line(err)


def test_directories_are_called_directories(tmp_path, cli):
    code, _, err = cli("sample", "--checkpoint", tmp_path)
    assert code == 2 and "is a directory" in one_line(err)
    code, _, err = cli("bench", "--out", Path(__file__))
    assert code == 2 and "is a file" in one_line(err)


# ----------------------------------------------------------------------------- the compiled step


def test_without_a_compiler(words, tmp_path, cli, monkeypatch):
    """--compile yes with no g++ on PATH: exit 2, one line. auto (from COMPILE_FROM_STEPS): one
    line, then eager."""
    empty = tmp_path / "bin"
    empty.mkdir()
    with monkeypatch.context() as m:
        m.setenv("PATH", str(empty))  # looked up when the step would be built (shutil.which)
        code, _, err = cli("train", "--data", words, "--steps", "5", "--compile", "yes")
    assert code == 2 and "g++ is not on PATH" in one_line(err)
    from backprop import compiled

    monkeypatch.setattr(compiled, "cpu_compiler_found", lambda: False)
    monkeypatch.setattr(train, "COMPILE_FROM_STEPS", 1)
    code, out, err = cli("train", "--data", words, "--steps", "5", "--hidden", "8", "--json")
    assert code == 0 and json.loads(out)["compiled"] is False
    assert one_line(err) == "backprop train: no C++ compiler (g++) on PATH: training with the slower eager step"


def test_compile_yes_failure_is_one_line_exit_1(words, cli, monkeypatch):
    from backprop import compiled

    def broken(*a, **k):
        raise RuntimeError("the linker fell over\nsecond line")

    monkeypatch.setattr(compiled, "cpu_compiler_found", lambda: True)
    monkeypatch.setattr(aot, "compiled_step", broken)
    code, _, err = cli("train", "--data", words, "--steps", "5", "--hidden", "8", "--compile", "yes")
    assert code == 1 and one_line(err) == ("backprop train: --compile yes: building the compiled step failed "
                                           "(RuntimeError: the linker fell over)")


class FakeBuild:
    """aot's compiler and loader replaced: a build writes a few bytes, a load checks them."""

    def __init__(self, monkeypatch):
        self.builds = 0
        monkeypatch.setattr(aot, "_compile_package", self.compile)
        monkeypatch.setattr(torch._inductor, "aoti_load_package", self.load)

    def compile(self, tmp, optimizer, args):
        self.builds += 1
        tmp.write_bytes(b"PK fake package")

    @staticmethod
    def load(path):
        if Path(path).read_bytes() != b"PK fake package":
            raise RuntimeError("PytorchStreamReader failed reading zip archive")
        return type("P", (), {"loader": type("L", (), {"run": staticmethod(lambda t: [torch.tensor(0.0)])})})


@pytest.fixture
def step_args(dataset):
    p = model.init_params(dataset.vocab.size, 8)
    X, Y = dataset.splits["train"]
    return p, {}, X[:100].clone(), Y[:100].clone(), 4


def compile_with(step_args, said):
    return aot.compiled_step(*step_args, check=False, say=said.append)


def test_cache_directory_is_private_and_each_package_has_a_digest(tmp_path, monkeypatch, step_args):
    fake = FakeBuild(monkeypatch)
    cache = tmp_path / "cache"
    monkeypatch.setenv("BACKPROP_CACHE_DIR", str(cache))
    said = []
    compile_with(step_args, said)
    assert (cache.stat().st_mode & 0o777) == 0o700
    assert said == [f"building the compiled train step (once; cached in {cache}): ~30 s"]
    (pkg,) = cache.glob("*.pt2")
    assert pkg.with_suffix(".sha256").read_text().strip() == aot._digest(pkg)
    compile_with(step_args, said)  # loaded: no second build, nothing said
    assert fake.builds == 1 and len(said) == 1


def test_a_step_that_two_processes_need_at_once_is_built_once(tmp_path, monkeypatch, step_args):
    """Two pytest-xdist workers (or two runs) asking for the same step while it builds: the second
    waits on the first's lock (a file beside the package), then loads what the first built."""
    fake = FakeBuild(monkeypatch)
    monkeypatch.setenv("BACKPROP_CACHE_DIR", str(tmp_path))
    first_building, second_arrived, finish = threading.Event(), threading.Event(), threading.Event()
    build, lock = fake.compile, aot.exclusive

    def slow_build(*a):  # the first build waits until the second process has come for the step
        (second_arrived if first_building.is_set() else first_building).set()
        finish.wait(30)
        build(*a)

    def at_the_lock(path):
        if first_building.is_set():
            second_arrived.set()
        return lock(path)

    monkeypatch.setattr(aot, "_compile_package", slow_build)
    monkeypatch.setattr(aot, "exclusive", at_the_lock)
    said = [[], []]
    runs = [threading.Thread(target=compile_with, args=(step_args, s)) for s in said]
    runs[0].start()
    assert first_building.wait(30)
    runs[1].start()
    assert second_arrived.wait(30)  # at the lock, or (without one) building too
    finish.set()
    for run in runs:
        run.join(30)
    assert fake.builds == 1 and len(said[0]) == 1 and said[1] == []
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".lock", ".pt2", ".sha256"]


@pytest.mark.parametrize("damage", ["truncate", "no record", "flip a byte"])
def test_a_corrupt_package_is_moved_aside_and_rebuilt_once(damage, tmp_path, monkeypatch, step_args):
    fake = FakeBuild(monkeypatch)
    monkeypatch.setenv("BACKPROP_CACHE_DIR", str(tmp_path))
    compile_with(step_args, [])
    (pkg,) = tmp_path.glob("*.pt2")
    if damage == "truncate":
        pkg.write_bytes(pkg.read_bytes()[:4])
    elif damage == "no record":
        pkg.with_suffix(".sha256").unlink()
    else:
        pkg.write_bytes(b"PK fake packagf")
    older = pkg.with_name(f"{pkg.name}.bad-20260101-000000-1")  # set aside by an earlier run
    older.write_bytes(b"PK older")
    said = []
    compile_with(step_args, said)
    assert fake.builds == 2 and len(said) == 2
    assert said[0].startswith(f"loading the cached compiled step {pkg} failed (")
    assert "moved it to" in said[0] and said[0].endswith("rebuilding it once")
    assert "building" not in said[0].split(";")[0]
    (aside,) = tmp_path.glob("*.bad-*")  # the newest only: a file corrupted each run keeps one copy
    assert str(aside) in said[0] and aside != older
    assert pkg.read_bytes() == b"PK fake package"


@pytest.mark.parametrize("fault", ["world-writable", "group-writable", "another owner", "unwritable"])
def test_an_unsafe_or_unwritable_cache_is_not_used(fault, tmp_path, monkeypatch, step_args):
    fake = FakeBuild(monkeypatch)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    if fault == "another owner":
        if os.geteuid() != 0:
            pytest.skip("only root can give a directory to another user")
        os.chown(cache, 65534, 65534)
    elif fault == "unwritable":
        cache = tmp_path / "a-file" / "cache"  # cannot be created, even by root
        (tmp_path / "a-file").write_text("")
    else:
        cache.chmod(0o777 if fault == "world-writable" else 0o770)
    monkeypatch.setenv("BACKPROP_CACHE_DIR", str(cache))
    said = []
    compile_with(step_args, said)
    assert fake.builds == 1 and len(said) == 2
    reason = {"world-writable": "is group- or world-writable (mode 777)",
              "group-writable": "is group- or world-writable (mode 770)",
              "another owner": "is owned by another user (uid 65534)",
              "unwritable": "cannot be written (Not a directory)"}[fault]
    assert said[0].startswith(f"the compiled-step cache {cache} {reason}: not using it; building into ")
    assert "for this run only" in said[1]
    assert not cache.exists() or not list(cache.iterdir())


def test_a_planted_package_is_not_loaded(tmp_path, monkeypatch, step_args):
    """A package at the predictable path, without the digest recorded at build time, or writable
    by others, is not run."""
    fake = FakeBuild(monkeypatch)
    monkeypatch.setenv("BACKPROP_CACHE_DIR", str(tmp_path))
    tmp_path.chmod(0o700)
    p, state, X, _, batch_size = step_args
    path = aot.step_path(p, state, X, batch_size, directory=tmp_path)
    path.write_bytes(b"PK a planted package")
    said = []
    compile_with(step_args, said)
    assert fake.builds == 1 and "loading the cached compiled step" in said[0]
    path.chmod(0o666)
    said = []
    compile_with(step_args, said)
    assert fake.builds == 2 and "is group- or world-writable" in said[0]


def test_the_key_holds_the_cpu_and_the_compiler(monkeypatch, step_args):
    key = aot.machine_key()
    assert repr(torch.backends.cpu.get_cpu_capability()) in key
    p, state, X, _, batch_size = step_args
    before = aot.step_path(p, state, X, batch_size)
    monkeypatch.setattr(aot, "machine_key", lambda: key + " another CPU or compiler")
    assert aot.step_path(p, state, X, batch_size) != before
