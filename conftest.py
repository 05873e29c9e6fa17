"""Shared pytest configuration: hypothesis profiles and the device fixture.

Profiles (choose with HYPOTHESIS_PROFILE=<name>):
  ci        derandomised and bounded; used whenever CI is set (hypothesis's own 'ci' is replaced)
  dev       the local default: random seeds, a moderate number of examples
  thorough  deep runs: many examples, random seeds
  mutation  ci without shrinking, for tests/mutation/score.py
"""

import functools
import os
import random
import shutil
import signal
import sys
import threading

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings


def load_hypothesis_profile() -> None:
    """Register the profiles above and load the chosen one; again after torch.testing._internal is
    imported (the op_db fixture): its common_utils registers profiles of its own at import ("dev"
    with 10 examples, "pytorch_ci" with 50) and loads "pytorch_ci" if CI is set, else "dev".
    Imported at collection, as it was, it replaced this suite's profile for the whole run."""
    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
    settings.register_profile("ci", derandomize=True, max_examples=40, **common)
    settings.register_profile("dev", max_examples=40, **common)
    settings.register_profile("thorough", max_examples=1000, **common)
    # the mutation score (tests/mutation/score.py): as ci, but a failure is not shrunk (a kill is all it needs)
    settings.register_profile("mutation", derandomize=True, max_examples=40, database=None,
                              phases=[Phase.explicit, Phase.generate], **common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


load_hypothesis_profile()
# pytest-xdist runs the default suite on 2 workers: one torch thread each, so that two workers'
# parallel regions do not wait on each other's descheduled threads (2 cores here)
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

DEVICES = [
    pytest.param("cpu"),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


@pytest.fixture(params=DEVICES, scope="session")
def device(request):
    return request.param


@pytest.fixture(scope="session")
def dataset():
    """The shipped word list (backprop.makemore.data.DEFAULT_DATA), split as the notebook splits it:
    loaded once per process (0.6-0.8 s a load; it was once per module). Tests read it, never change it."""
    from backprop.makemore import data

    return data.load_dataset(data.DEFAULT_DATA)


@pytest.fixture(scope="session")
def op_db():
    """PyTorch's OpInfo database (tests/test_opinfo_samples.py), imported when a test first asks:
    the import takes ~4 s, which each pytest-xdist worker paid at collection for the two tests that
    read it. Skips where it cannot be imported."""
    try:
        import expecttest  # noqa: F401  torch.testing._internal imports it
        from torch.testing._internal.common_methods_invocations import op_db
    except Exception as e:  # ImportError, or torch's internals moved
        pytest.skip(f"torch.testing._internal's op_db is not importable ({type(e).__name__}: {e}); "
                    "pip install expecttest")
    finally:
        load_hypothesis_profile()  # common_utils loaded its own
    return op_db


def _process_state() -> dict:
    """What a run of the command line in this process could change for the tests after it."""
    return dict(threads=torch.get_num_threads(), dtype=torch.get_default_dtype(), grad=torch.is_grad_enabled(),
                deterministic=(torch.are_deterministic_algorithms_enabled(),
                               torch.is_deterministic_algorithms_warn_only_enabled()),
                rng=torch.get_rng_state(), random=random.getstate(), environ=dict(os.environ),
                cwd=os.getcwd(), sigint=signal.getsignal(signal.SIGINT))


def _restore(state: dict) -> None:
    torch.set_num_threads(state["threads"])
    torch.set_default_dtype(state["dtype"])
    torch.set_grad_enabled(state["grad"])
    torch.use_deterministic_algorithms(state["deterministic"][0], warn_only=state["deterministic"][1])
    torch.set_rng_state(state["rng"])
    random.setstate(state["random"])
    if dict(os.environ) != state["environ"]:
        os.environ.clear()
        os.environ.update(state["environ"])
    os.chdir(state["cwd"])
    signal.signal(signal.SIGINT, state["sigint"])


@pytest.fixture
def cli(capsys):
    """The backprop command in this process: cli(*args) -> (exit code, stdout, stderr), SystemExit
    (argparse, parser.error) read as its code. A subprocess pays a torch import (seconds) per run:
    only the tests whose point is the process itself (the entry points, signals, pipes, resource
    limits, closed descriptors) start one. Global torch and process state is put back afterwards."""
    from backprop import cli as command

    state = _process_state()

    def run(*args) -> tuple[int, str, str]:
        capsys.readouterr()  # only this run's output
        try:
            code = command.main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    _restore(state)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Timing runs in one process: pyproject's addopts spread the default run over 2 workers
    (pytest-xdist), under which pytest-benchmark would switch itself off. Before xdist and
    pytest-benchmark read the option, a --benchmark-enable run goes back to one process."""
    if config.getoption("benchmark_enable", False) and getattr(config.option, "dist", "no") != "no":
        config.option.dist, config.option.numprocesses = "no", 0
    if not (config.option.collectonly or config.option.help or config.option.version):
        _start_building_cpp_kernels()


_INFO_ONLY = {"--collect-only", "--co", "--help", "-h", "--version", "-V", "--fixtures", "--markers"}


@functools.cache  # once a process: at import, else at configure
def _start_building_cpp_kernels() -> None:
    """backprop.cpp's kernels take ~30 s to build cold (two g++ parsing torch's headers, ~50 s of
    CPU, once per machine; cached after): start that build in a thread as early as this process
    can, in every process. In a pytest-xdist run the first is the controller, at this file's
    import: g++ gets the core it leaves idle while it loads the plugins and benchmarks/conftest.py
    and starts the workers (~5 s), before pytest's session clock starts. The workers' threads wait
    in backprop.cpp.kernels() (its file lock), then load; so does a test that needs the kernels.
    (The first test's session fixture started it before: ~28 s into a cold default run, after both
    workers had collected.) Not for --collect-only, --help or --version."""
    from backprop import cpp

    if shutil.which("g++") is not None:  # (its one-line notice: on the terminal, or in a test's warnings)
        threading.Thread(target=cpp.kernels, daemon=True).start()


if not _INFO_ONLY.intersection(sys.argv[1:]):
    _start_building_cpp_kernels()
