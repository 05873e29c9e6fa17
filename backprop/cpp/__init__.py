"""backprop.cpp: the notebook-scale path. An op's maths as C++ loops, one call per direction.

    out, cache = backprop.cpp.cross_entropy.forward(logits, targets)
    grads      = backprop.cpp.cross_entropy.backward(dout, cache)

Why: at the notebook's scale (batch 32) an op's arithmetic takes nanoseconds, and a call costs its
Python and one dispatch per aten op. The eager kernels spell their maths out in 5-26 aten calls;
torch's twins call one fused native kernel per direction (docs/benchmarks-log.md, "Notebook scale").
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

The kernels are built on first use with g++ (~30 s on two cores: one translation unit from this
folder's .cpp files, and the Python binding's beside it) and cached on disk, as the compiled train
step is (a private directory, a sha256 digest checked before loading: docs/faults.md). Without g++,
or when the build fails, every call runs the eager kernel, after one warning that says why. The
library is also a Python module whose functions call the C++ ones straight, without torch.ops'
argument parsing and dispatch (binding.h: ~1 us less a call); where that part does not build (no
Python.h), the calls go through torch.ops, after a warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import torch

HERE = Path(__file__).resolve().parent
NAMESPACE = "backprop_cpp"
MODULE = "backprop_cpp_kernels"  # the library's Python module (PyInit_backprop_cpp_kernels): binding.h


def _isa_flags() -> list[str]:
    """ATen's vector types pick their instructions from these defines, as Inductor's C++ does."""
    return {"AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
            "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                       "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
            }.get(torch.backends.cpu.get_cpu_capability(), [])


def compile_command(source: Path, output: Path, openmp: bool = True, python: bool = False) -> list[str]:
    """g++ -c on one translation unit, against this torch's headers (python: and this Python's,
    for the binding's translation unit)."""
    root = Path(torch.__file__).resolve().parent
    # -fopenmp: at::parallel_for (ATen/Parallel.h) runs on torch's OpenMP threads (libgomp.so.1,
    # loaded by torch already), else inline on one
    return ["g++", "-O3", "-std=c++17", "-fPIC", "-Wall", *(["-fopenmp"] if openmp else []), *_isa_flags(),
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            *(["-isystem", sysconfig.get_paths()["include"]] if python else []),
            "-isystem", str(root / "include"), "-c", str(source), "-o", str(output)]


def link_command(objects: list[Path], output: Path, openmp: bool = True, binding: bool = True) -> list[str]:
    """g++ -shared on the object files, against torch's libraries (binding: and torch's Python one)."""
    lib = Path(torch.__file__).resolve().parent / "lib"
    return ["g++", "-shared", *(["-fopenmp"] if openmp else []), *map(str, objects), "-o", str(output),
            f"-L{lib}", "-ltorch", "-ltorch_cpu", "-lc10", *(["-ltorch_python"] if binding else []),
            f"-Wl,-rpath,{lib}"]


def sources() -> list[Path]:
    return sorted([*HERE.glob("*.h"), *HERE.glob("*.cpp")])


_IMPL = re.compile(r'm\.impl\("(\w+)",\s*([\w:]+)\);')  # a TORCH_LIBRARY_IMPL line: (op name, C++ function)


def bindings() -> list[tuple[str, str]]:
    """(op name, C++ function) of every m.impl line of the .cpp files: what TORCH_LIBRARY_IMPL
    registers is what the module binds (tests/test_cpp.py checks that every op of torch.ops is bound)."""
    return [found for p in sources() if p.suffix == ".cpp" for found in _IMPL.findall(p.read_text())]


def module_source() -> str:
    """The Python module of the library: one binding.h bind per registered function."""
    binds = "".join(f'  backprop_cpp::binding::bind<&{fn}>(m, "{name}");\n' for name, fn in bindings())
    return f"PYBIND11_MODULE({MODULE}, m) {{\n{binds}}}\n"


def unity_source() -> str:
    """Every .cpp file here as one translation unit: the ops and their registrations."""
    return "".join(f'#include "{p}"\n' for p in sources() if p.suffix == ".cpp")


def binding_source() -> str:
    """The module's own translation unit, compiled beside the ops' (torch's Python headers alone take
    ~20 s to parse): each bound function declared as its .cpp file defines it (a declaration that
    drifted from its definition leaves a symbol undefined, and the library fails to load), then
    binding.h and the module."""
    declared = []
    for p in (p for p in sources() if p.suffix == ".cpp"):
        text = p.read_text()
        for _, fn in _IMPL.findall(text):
            space, _, name = fn.rpartition("::")
            found = re.search(rf"^([^\n(]*?)\b{name}\(([^)]*)\)\s*\{{", text, re.M)
            if found is None:
                raise RuntimeError(f"{p.name}: no definition of {fn} to declare for the binding")
            params = " ".join(found[2].split())
            declared.append(f"namespace {space} {{ {found[1].strip()} {name}({params}); }}\n")
    return ("#include <ATen/core/Tensor.h>\n#include <optional>\n#include <vector>\n"
            "namespace backprop_cpp { using Tensors = std::vector<at::Tensor>; }  // common.h's\n"
            + "".join(declared) + f'#include "{HERE / "binding.h"}"\n' + module_source())


def library_path(directory: Path) -> Path:
    """The built library for these sources, this torch, this CPU and this compiler."""
    from backprop.makemore.aot import machine_key

    h = hashlib.sha256(torch.__version__.encode())
    for p in sources():
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    commands = compile_command(Path("a.cpp"), Path("a.o"), python=True), link_command([Path("a.o")], Path("a"))
    h.update(repr(commands).encode() + binding_source().encode())
    h.update(machine_key().encode())
    return directory / f"kernels-{h.hexdigest()[:24]}.so"


def build(path: Path) -> None:
    """Compile the ops (every .cpp file here, one translation unit) and the Python binding (its own
    unit), side by side, and link them into path: under a temporary name, renamed into place after
    its digest record, so a concurrent process never loads half a file. A compiler without OpenMP
    (no libgomp development files, or clang as g++) fails on -fopenmp: the ops again without it. A
    Python without its headers (Python.h) fails the binding: the library without it. Each after a
    warning that quotes g++: then only the threaded loops (at::parallel_for) run on one thread, or
    the calls go through torch.ops; every op keeps its C++."""
    from backprop.makemore.aot import _digest, _record

    tmp = path.with_suffix(f".{os.getpid()}.tmp.so")
    ops, binding = (path.with_suffix(f".{os.getpid()}.{unit}.cpp") for unit in ("ops", "binding"))
    ops_o, binding_o = ops.with_suffix(".o"), binding.with_suffix(".o")

    def g(cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    def compile_ops() -> tuple[bool, list[subprocess.CompletedProcess]]:  # (openmp, g++'s answers)
        answers = [g(compile_command(ops, ops_o, openmp=True))]
        if answers[0].returncode != 0:
            answers.append(g(compile_command(ops, ops_o, openmp=False)))
        return len(answers) == 1, answers

    try:
        ops.write_text(unity_source())
        binding.write_text(binding_source())
        with ThreadPoolExecutor(2) as pool:  # two g++ at once: the binding's headers beside the ops
            bound = pool.submit(g, compile_command(binding, binding_o, openmp=False, python=True))
            openmp, answers = compile_ops()
            bound = bound.result()
        if answers[-1].returncode != 0:  # not OpenMP's fault: the first error is the one to read
            first = answers[0]
            raise RuntimeError(f"g++ failed (exit {first.returncode}): {first.stderr.strip()[-2000:]}")
        if not openmp:
            _say(f"g++ -fopenmp failed ({answers[0].stderr.strip()[-300:]}); built without OpenMP: "
                 "the threaded loops (batch_norm's) run on one thread")
        if bound.returncode == 0:
            bound = g(link_command([ops_o, binding_o], tmp, openmp, binding=True))
        if bound.returncode != 0:
            linked = g(link_command([ops_o], tmp, openmp, binding=False))
            if linked.returncode != 0:
                raise RuntimeError(f"g++ failed to link (exit {linked.returncode}): "
                                   f"{linked.stderr.strip()[-2000:]}")
            _say(f"the Python binding did not build ({bound.stderr.strip()[-300:]}); built "
                 "without it: the calls go through torch.ops (~1 us more each at the notebook's scale)")
        record = _record(tmp)
        record.write_text(_digest(tmp) + "\n")
        os.replace(record, _record(path))
        os.replace(tmp, path)
    finally:
        for p in (tmp, _record(tmp), ops, binding, ops_o, binding_o):
            p.unlink(missing_ok=True)


def load(path: Path) -> ModuleType | None:
    """torch.ops.load_library(path), after checking its owner, its mode and its recorded digest; then
    the same file (the handle torch opened) imported as its Python module, None if built without it."""
    from backprop.makemore.aot import _digest, _record, unsafe

    for p in (path, _record(path)):
        if why := unsafe(p):
            raise ValueError(f"{p} {why}")
    if _digest(path) != _record(path).read_text().strip():
        raise ValueError(f"{path}: its sha256 digest differs from the one recorded when it was built "
                         "(truncated or corrupt)")
    torch.ops.load_library(str(path))
    if not hasattr(ctypes.CDLL(str(path)), f"PyInit_{MODULE}"):
        return None
    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(MODULE, path,
                                                                                    loader=loader))
    loader.exec_module(module)
    return module


def _say(line: str) -> None:
    warnings.warn(f"backprop.cpp: {line}", stacklevel=4)


class Kernels(NamedTuple):
    ops: Any  # torch.ops.backprop_cpp
    module: ModuleType | None  # the library as a Python module (binding.h), None where built without it


@functools.cache
def kernels() -> Kernels | None:
    """The kernels, built and loaded once per process; None (after one warning) where they cannot
    be: then every op runs its eager kernel."""
    from backprop.makemore.aot import exclusive, usable_cache_dir

    if shutil.which("g++") is None:
        _say("no C++ compiler (g++ is not on PATH): running the eager kernels")
        return None
    directory, persistent = usable_cache_dir(_say, what="C++ kernel")
    path = library_path(directory)
    try:
        with exclusive(path.with_suffix(".lock")):  # one build at a time (pytest-xdist workers)
            return _load_or_build(path, directory, persistent)
    except Exception as e:
        _say(f"the C++ kernels cannot be built or loaded ({type(e).__name__}: {e}): running the eager kernels")
        return None


def _load_or_build(path: Path, directory: Path, persistent: bool) -> Kernels:
    from backprop.makemore.aot import _record, set_aside

    if path.exists() or _record(path).exists():
        try:
            return Kernels(getattr(torch.ops, NAMESPACE), load(path))
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
    return Kernels(getattr(torch.ops, NAMESPACE), load(path))


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
    """The C++ function of op name as Python calls it: the library module's (binding.h: the function
    called straight, ~1 us a call less at this scale), else torch.ops.backprop_cpp.<name>.default's
    C++ callable (the overload resolved once, without OpOverload's Python frame: ~1 us a call); None
    without the kernels."""
    k = kernels()
    if k is None:
        return None
    if (bound := getattr(k.module, name, None)) is not None:
        return bound
    overload = getattr(k.ops, name).default
    return getattr(overload, "_op", overload)


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
