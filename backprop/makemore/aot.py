"""The compiled training step, with the same type as the eager one: step(ix, lr) -> loss.

At batch 32 one step is ~35 kernels of a few microseconds: driving them from Python (the eager
step) or through Dynamo's guards and wrappers (torch.compile) costs more than the arithmetic. On
the CPU the step is compiled ahead of time instead: torch.export captures step.step_graph (the
batch gather, the manual gradients and the optimizer's update) as one graph, AOTInductor builds it
into a shared library, and each step is one call into C++. The build (~30 s) is cached on disk,
keyed by everything the graph depends on. On CUDA the step goes through torch.compile (no host C++
build needed).

The graph's inputs are flat: the parameters and the optimizer state in the order of their names
(model.PARAM_NAMES, step.state_names), then Xtr, Ytr, ix and lr.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import glob
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from backprop import _check, batch_norm, cross_entropy, embedding, linear, tanh
from backprop.makemore import data, model, step
from backprop.makemore.model import PARAM_NAMES

_SOURCES = (sys.modules[__name__], step, model, data, embedding, linear, batch_norm, tanh, cross_entropy,
            _check)


class _StepModule(torch.nn.Module):  # torch.export takes a Module
    def __init__(self, optimizer: str):
        super().__init__()
        self.optimizer = optimizer
        self.state_names = step.state_names(optimizer)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        n, k = len(PARAM_NAMES), len(self.state_names)
        params = dict(zip(PARAM_NAMES, tensors[:n]))
        state = dict(zip(self.state_names, tensors[n:n + k]))
        Xtr, Ytr, ix, lr = tensors[n + k:]
        return step.step_graph(params, state, Xtr, Ytr, ix, lr, self.optimizer)


def cache_dir() -> Path:
    """Where built steps are kept: $BACKPROP_CACHE_DIR, else $XDG_CACHE_HOME/backprop (~/.cache)."""
    if os.environ.get("BACKPROP_CACHE_DIR"):
        return Path(os.environ["BACKPROP_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "backprop"


@functools.cache
def machine_key() -> str:
    """What the built code depends on besides the graph: it is compiled with -march=native, so the
    CPU (architecture, the ISA torch dispatches to, the cpuinfo flags) and the compiler."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    try:
        cxx = subprocess.run(["g++", "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        cxx = ""
    return repr((platform.machine(), torch.backends.cpu.get_cpu_capability(),
                 hashlib.sha256(flags.encode()).hexdigest(), (cxx.splitlines() or [""])[0]))


def step_path(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor], Xtr: torch.Tensor,
              batch_size: int, *, optimizer: str = "sgd", directory: Path | None = None) -> Path:
    """The package for these shapes and dtypes (the number of training examples aside), this
    optimizer, this torch, this code (any edit rebuilds), this CPU and this compiler."""
    h = hashlib.sha256(torch.__version__.encode())
    for module in _SOURCES:
        h.update(Path(module.__file__).read_bytes())
    fixed = [(k, tuple(t.shape), t.dtype) for k, t in _fixed(params, state, optimizer).items()]
    h.update(repr((fixed, tuple(Xtr.shape[1:]), Xtr.dtype, batch_size, optimizer)).encode())
    h.update(machine_key().encode())
    return (directory or cache_dir()) / f"train_step-{h.hexdigest()[:24]}.pt2"


def _fixed(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
           optimizer: str) -> dict[str, torch.Tensor]:
    """The graph's first inputs, in their order: the parameters, then the optimizer state."""
    return {k: params[k] for k in PARAM_NAMES} | {k: state[k] for k in step.state_names(optimizer)}


# ----------------------------------------------------------------------------- the disk cache
# A package is native code that this process loads and runs, so the cache must be private: a
# directory (and files) owned by this user and writable by nobody else. A sha256 digest of each
# package, written next to it when it is built, is checked before it is loaded: it catches a
# truncated or corrupt file (full disk, a killed build), not a forger who can write the directory
# (docs/faults.md, "The compiled-step cache").


def unsafe(path: Path) -> str:
    """Why path (the cache directory or a file in it) must not be trusted, or '' if it may."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return f"cannot be inspected ({e.strerror or e})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if st.st_uid != os.geteuid():
        return f"is owned by another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"is group- or world-writable (mode {stat.S_IMODE(st.st_mode):o})"
    return ""


def _private_tmp() -> Path:
    d = Path(tempfile.mkdtemp(prefix="backprop-step-"))  # 0700, ours
    atexit.register(shutil.rmtree, d, True)
    return d


def usable_cache_dir(say: Callable[[str], None], what: str = "compiled-step") -> tuple[Path, bool]:
    """(directory, persistent): the cache directory, created 0700, when it is private and
    writable; else a private temporary directory for this run, after one line to say(why), which
    names the cache: the compiled-step cache, or backprop.cpp's ("C++ kernel")."""
    d = cache_dir()
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        why = unsafe(d) or ("is not a directory" if not d.is_dir() else "")
        if not why:
            fd, probe = tempfile.mkstemp(dir=d, prefix=".probe-")  # writable? (root ignores the bits)
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        why = f"cannot be written ({e.strerror or e})"
    if not why:
        return d, True
    tmp = _private_tmp()
    say(f"the {what} cache {d} {why}: not using it; building into {tmp} for this run")
    return tmp, False


@contextlib.contextmanager
def exclusive(lock: Path) -> Iterator[None]:
    """One process at a time between a cached file's check and its build (pytest-xdist's workers,
    two runs at once): a second waits, then loads what the first built, instead of building it too."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _record(path: Path) -> Path:
    return path.with_suffix(".sha256")


def set_aside(path: Path) -> Path:
    """Move an unusable cached file aside, under a dated name that the message gives, so it can be
    inspected; the older ones set aside for the same name are removed, so that a file corrupted
    again and again keeps one copy on disk, not one a run. Raises OSError if path cannot move."""
    aside = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    os.replace(path, aside)
    for old in path.parent.glob(f"{glob.escape(path.name)}.bad-*"):
        if old != aside:
            with contextlib.suppress(OSError):
                old.unlink()
    return aside


def _load(path: Path) -> Callable:
    """The package's runner, after checking its owner, its mode and its recorded digest."""
    for p in (path, _record(path)):
        if why := unsafe(p):
            raise ValueError(f"{p} {why}")
    expected = _record(path).read_text().strip()
    if _digest(path) != expected:
        raise ValueError("its sha256 digest differs from the one recorded when it was built "
                         "(truncated or corrupt)")
    return torch._inductor.aoti_load_package(str(path)).loader.run


def _build(path: Path, optimizer: str, args: tuple[torch.Tensor, ...]) -> None:
    """Build the package under a temporary name and rename it, so a concurrent run never reads
    half a file; the digest record is renamed first, so a package in place always has one."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp.pt2")
    try:
        _compile_package(tmp, optimizer, args)
        record = _record(tmp)
        record.write_text(_digest(tmp) + "\n")
        os.replace(record, _record(path))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        _record(tmp).unlink(missing_ok=True)


def _compile_package(tmp: Path, optimizer: str, args: tuple[torch.Tensor, ...]) -> None:
    """Export the step (the number of training examples stays symbolic), build it into tmp."""
    examples = torch.export.Dim("examples", min=2)
    fixed = len(args) - 4  # the parameters and the optimizer state
    dynamic = (None,) * fixed + ({0: examples}, {0: examples}, None, None)
    with torch.no_grad(), warnings.catch_warnings():
        # torch's export/Inductor path emits a FutureWarning about its own internals on every
        # build; nothing here can act on it, and it buried the one line the user needs
        warnings.simplefilter("ignore", FutureWarning)
        # forward(*tensors) takes one argument to export: the tuple, hence (dynamic,)
        program = torch.export.export(_StepModule(optimizer), args, dynamic_shapes=(dynamic,))
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))


def _cpu_step(path: Path, persistent: bool, optimizer: str, args: tuple[torch.Tensor, ...],
              say: Callable[[str], None]) -> Callable:
    """Load the package at path, or build it (once) and load it. An unusable package is moved
    aside, named, and rebuilt once; every message names the path. One process at a time (its
    lock file beside it): a step that two processes need at once is built once."""
    with exclusive(path.with_suffix(".lock")):
        return _load_or_build(path, persistent, optimizer, args, say)


def _load_or_build(path: Path, persistent: bool, optimizer: str, args: tuple[torch.Tensor, ...],
                   say: Callable[[str], None]) -> Callable:
    if path.exists() or _record(path).exists():
        try:
            return _load(path)
        except Exception as e:  # a bad digest, a corrupt zip, a foreign owner: many kinds
            try:
                aside = set_aside(path)
                _record(path).unlink(missing_ok=True)
                where = f"moved it to {aside}"
            except OSError as move:
                where = f"could not move it aside ({move.strerror or move})"
                path = _private_tmp() / path.name
            say(f"loading the cached compiled step {path} failed ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}); {where}; rebuilding it once")
    where = f"cached in {path.parent}" if persistent else f"in {path.parent}, for this run only"
    say(f"building the compiled train step (once; {where}): ~30 s")
    _build(path, optimizer, args)
    try:
        return _load(path)
    except Exception as e:
        raise RuntimeError(f"the compiled step just built at {path} cannot be loaded: {e}") from None


_dynamo_steps: dict[tuple[str, str], torch.nn.Module] = {}  # per (device type, optimizer)


def compiled_step(params: dict[str, torch.Tensor], state: dict[str, torch.Tensor], Xtr: torch.Tensor,
                  Ytr: torch.Tensor, batch_size: int, *, optimizer: str = "sgd",
                  check: bool = True, say: Callable[[str], None] | None = None) -> step.Step:
    """step.step_graph for these tensors, compiled (AOTInductor on the CPU, built once and cached;
    torch.compile on CUDA): a step (ix, lr) -> loss updating params and state in place. ix holds
    the batch's row numbers (int64, (batch_size,), in [0, len(Xtr))), lr is a 0-d tensor of the
    parameters' dtype. The built step reads raw memory and checks nothing, so the arguments are
    checked here: the fixed ones once, ix and lr on every call. check=False skips both, for a
    caller that has run step.check_inputs and draws ix itself (train). say(line) hears about the
    build and the cache (default: a warning)."""
    if say is None:
        def say(line: str) -> None:
            warnings.warn(line, stacklevel=3)
    if check:
        step.check_inputs(params, state, Xtr, Ytr, batch_size, optimizer=optimizer)
    tensors = [*_fixed(params, state, optimizer).values(), Xtr, Ytr]
    device = params["W1"].device
    if device.type == "cpu":
        directory, persistent = usable_cache_dir(say)
        path = step_path(params, state, Xtr, batch_size, optimizer=optimizer, directory=directory)
        example = (*tensors, torch.zeros(batch_size, dtype=torch.int64),
                   torch.tensor(0.0, dtype=params["W1"].dtype))
        # the loaded model's loader runs a flat list of tensors; calling the model itself would
        # first parse its input/output specs and flatten the arguments (~100 us a step)
        run = _cpu_step(path, persistent, optimizer, example, say)

        def fast(ix: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
            return run([*tensors, ix, lr])[0]
    else:
        key = (device.type, optimizer)
        if key not in _dynamo_steps:
            _dynamo_steps[key] = torch.compile(_StepModule(optimizer), dynamic=False)
        fn = _dynamo_steps[key]

        def fast(ix: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return fn(*tensors, ix, lr)
    if not check:
        return fast

    def checked(ix: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        _check.shape("ix", _check.index("ix", ix, (torch.int64,)), (batch_size,), "(batch_size,)")
        _check.shape("lr", _check.same_dtype_as("lr", lr, "the parameters", params["W1"]), (), "(0-d)")
        _check.same_device(ix=ix, lr=lr, W1=params["W1"])
        _check.in_range("ix", ix, 0, Xtr.shape[0])
        return fast(ix, lr)
    return checked
