"""backprop.cpp: the notebook-scale path. An op's maths as C++ loops, one call per direction.

    out, cache = backprop.cpp.cross_entropy.forward(logits, targets)
    grads      = backprop.cpp.cross_entropy.backward(dout, cache)

Why: at the notebook's scale (batch 32) an op's arithmetic takes nanoseconds, and a call costs its
Python and one dispatch per aten op. The eager kernels spell their maths out in 5-26 aten calls;
torch's twins call one fused native kernel per direction (docs/benchmarks.md, "Notebook scale").
Here each direction is one call into C++ (an op of ``torch.ops.backprop_cpp``) that reads its
inputs, loops and allocates its outputs. The loops are written for small inputs: one thread, no
blocking; at large shapes use ``backprop.<op>`` or ``backprop.compiled.<op>``. batch_norm's,
embedding's, logsumexp's and tanh's are written for large shapes too (torch's threads,
at::parallel_for; their modules' LARGE_SHAPES: batch_norm.cpp, embedding.cpp, logsumexp.cpp,
tanh.cpp); linear_cross_entropy's matmuls are ATen's (BLAS) at any size.

The contract is backprop.<op>'s: the same signature, the same ``Cache`` type (a cache from either
path works in the other's backward), the same errors, no mutation, no autograd history. The C++
covers the common case: CPU tensors, contiguous, float32 or float64, and the options each module
lists. Anything else (another device or dtype, an option it does not cover, a bad argument, a
tensor subclass, a torch.func transform, a dispatch mode, torch.compile's tracing) runs the eager
kernel, which also raises every error, so each message is written once.

The kernels are built on first use with g++ (~30 s, one translation unit from this folder's .cpp
files) and cached on disk, as the compiled train step is (a private directory, a sha256 digest
checked before loading: docs/faults.md). Without g++, or when the build fails, every call runs the
eager kernel, after one warning that says why.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
NAMESPACE = "backprop_cpp"


def _isa_flags() -> list[str]:
    """ATen's vector types pick their instructions from these defines, as Inductor's C++ does."""
    return {"AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
            "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                       "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
            }.get(torch.backends.cpu.get_cpu_capability(), [])


def compile_command(source: Path, output: Path, openmp: bool = True) -> list[str]:
    """g++ on one translation unit, against this torch's headers and libraries."""
    root = Path(torch.__file__).resolve().parent
    lib = root / "lib"
    # -fopenmp: at::parallel_for (ATen/Parallel.h) runs on torch's OpenMP threads (libgomp.so.1,
    # loaded by torch already), else inline on one
    return ["g++", "-O3", "-std=c++17", "-shared", "-fPIC", "-Wall", *(["-fopenmp"] if openmp else []),
            *_isa_flags(),
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            "-isystem", str(root / "include"), str(source), "-o", str(output),
            f"-L{lib}", "-ltorch", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}"]


def sources() -> list[Path]:
    return sorted([*HERE.glob("*.h"), *HERE.glob("*.cpp")])


def library_path(directory: Path) -> Path:
    """The built library for these sources, this torch, this CPU and this compiler."""
    from backprop.makemore.aot import machine_key

    h = hashlib.sha256(torch.__version__.encode())
    for p in sources():
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    h.update(repr(compile_command(Path("unity.cpp"), Path("out.so"))).encode())
    h.update(machine_key().encode())
    return directory / f"kernels-{h.hexdigest()[:24]}.so"


def build(path: Path) -> None:
    """Compile every .cpp file here as one translation unit into path: under a temporary name,
    renamed into place after its digest record, so a concurrent process never loads half a file.
    A compiler without OpenMP (no libgomp development files, or clang as g++) fails on -fopenmp:
    then once more without it, so that every op keeps its C++ and only the threaded loops
    (at::parallel_for) run on one thread, after a warning."""
    from backprop.makemore.aot import _digest, _record

    tmp = path.with_suffix(f".{os.getpid()}.tmp.so")
    unity = path.with_suffix(f".{os.getpid()}.cpp")
    try:
        unity.write_text("".join(f'#include "{p}"\n' for p in sources() if p.suffix == ".cpp"))
        done = subprocess.run(compile_command(unity, tmp), capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            plain = subprocess.run(compile_command(unity, tmp, openmp=False), capture_output=True, text=True,
                                   timeout=600)
            if plain.returncode != 0:  # not OpenMP's fault: the first error is the one to read
                raise RuntimeError(f"g++ failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
            _say(f"g++ -fopenmp failed ({done.stderr.strip()[-300:]}); built without OpenMP: "
                 "the threaded loops (batch_norm's) run on one thread")
        record = _record(tmp)
        record.write_text(_digest(tmp) + "\n")
        os.replace(record, _record(path))
        os.replace(tmp, path)
    finally:
        for p in (tmp, _record(tmp), unity):
            p.unlink(missing_ok=True)


def load(path: Path) -> None:
    """torch.ops.load_library(path), after checking its owner, its mode and its recorded digest."""
    from backprop.makemore.aot import _digest, _record, unsafe

    for p in (path, _record(path)):
        if why := unsafe(p):
            raise ValueError(f"{p} {why}")
    if _digest(path) != _record(path).read_text().strip():
        raise ValueError(f"{path}: its sha256 digest differs from the one recorded when it was built "
                         "(truncated or corrupt)")
    torch.ops.load_library(str(path))


def _say(line: str) -> None:
    warnings.warn(f"backprop.cpp: {line}", stacklevel=4)


@functools.cache
def kernels() -> Any:
    """torch.ops.backprop_cpp, built and loaded once per process; None (after one warning) where
    it cannot be: then every op runs its eager kernel."""
    from backprop.makemore.aot import usable_cache_dir

    if shutil.which("g++") is None:
        _say("no C++ compiler (g++ is not on PATH): running the eager kernels")
        return None
    directory, persistent = usable_cache_dir(_say, what="C++ kernel")
    path = library_path(directory)
    try:
        with _exclusive(path.with_suffix(".lock")):  # one build at a time (pytest-xdist workers)
            return _load_or_build(path, directory, persistent)
    except Exception as e:
        _say(f"the C++ kernels cannot be built or loaded ({type(e).__name__}: {e}): running the eager kernels")
        return None


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load_or_build(path: Path, directory: Path, persistent: bool) -> Any:
    from backprop.makemore.aot import _record, set_aside

    if path.exists() or _record(path).exists():
        try:
            load(path)
            return getattr(torch.ops, NAMESPACE)
        except Exception as e:  # a bad digest, a foreign owner, a truncated file: rebuild once
            aside = None
            if path.exists():  # else a digest record left without its library (a killed build)
                aside = set_aside(path)
            _record(path).unlink(missing_ok=True)
            where = f"moved it to {aside}" if aside else "its digest record was there, the library not"
            _say(f"loading the cached kernels {path} failed ({e}); {where}; rebuilding")
    where = f"cached in {directory}" if persistent else f"in {directory}, for this run only"
    _say(f"building the C++ kernels (once; {where}): ~30 s")
    build(path)
    load(path)
    return getattr(torch.ops, NAMESPACE)


# a loss's reduction as it crosses into C++ (common.h's enum Reduction)
REDUCTIONS = {"mean": 0, "sum": 1, "none": 2}

# an int option crosses into C++ as int64: one outside [-INT64, INT64) stays on the eager path, whose
# checks refuse it with their message
INT64 = 2**63

# the tensor types whose memory the C++ may read: a Parameter (a model's weight) is a plain tensor
# underneath (no __torch_dispatch__, its __torch_function__ disabled); other subclasses are not
TENSORS = (torch.Tensor, torch.nn.Parameter)


@functools.cache
def op(name: str) -> Any:
    """torch.ops.backprop_cpp.<name>.default's C++ callable (the overload resolved once, without
    OpOverload's Python frame: ~1 us a call at this scale), or None without the kernels."""
    k = kernels()
    return None if k is None else getattr(getattr(k, name).default, "_op", getattr(k, name).default)


def plain(*tensors: Any) -> bool:
    """The C++ may read these tensors' memory (None stands for an absent optional tensor): each a
    plain torch.Tensor or a Parameter (no other subclass: no fake, functional or other wrapper tensor), outside
    torch.func's transforms (their tensors are plain Tensors that wrap others), dispatch modes and
    torch.compile's tracing. The op modules test their tensors' types inline (a call here costs
    a microsecond) and then call ``unwrapped()``."""
    return all(t is None or type(t) in TENSORS for t in tensors) and unwrapped()


_transforms = torch._C._are_functorch_transforms_active
_modes = torch._C._len_torch_dispatch_stack
_compiling = torch.compiler.is_compiling


def unwrapped() -> bool:
    """No torch.func transform, dispatch mode or torch.compile tracing is active."""
    return not (_transforms() or _modes() or _compiling())


# the op modules use the helpers above
from backprop.cpp import batch_norm, cross_entropy, embedding, linear_cross_entropy, logsumexp, tanh  # noqa: E402

# the ops with a C++ path; the others are not here (backprop.<op> is their fastest small path)
OPS = {op.__name__.rsplit(".", 1)[-1]: op for op in (cross_entropy, embedding, batch_norm, tanh,
                                                     linear_cross_entropy, logsumexp)}

__all__ = ["OPS", "kernels", "op", "plain", "unwrapped", *OPS]
