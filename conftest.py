"""Shared pytest configuration: hypothesis profiles and the device fixture; the C++ kernels' build
started with the run; under pytest-xdist, the long tests first.

Profiles (choose with HYPOTHESIS_PROFILE=<name>):
  ci        derandomised and bounded; used whenever CI is set (hypothesis's own 'ci' is replaced)
  dev       the local default: random seeds, a moderate number of examples
  thorough  deep runs: many examples, random seeds
  mutation  ci without shrinking, for tests/mutation/score.py
"""

import functools
import gc
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
    """Register this suite's profiles (the module's docstring) and load the chosen one; again after
    torch.testing._internal is imported (the op_db fixture): its common_utils registers profiles of
    its own at import ("dev" with 10 examples, "pytorch_ci" with 50) and loads "pytorch_ci" if CI is
    set, else "dev". Imported at collection, as it was, it replaced this suite's profile for the
    whole run."""
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


# The tests of 3 s or more in a cold default run (2 workers), longest first: each worker's first share
# of the run starts with half of them (pytest_collection_modifyitems). pytest-xdist's work stealing
# hands the end of one worker's queue to the other, down to single tests at the last: a long test
# that starts late leaves the other worker idle until it ends (10 s in one cold run, a 14 s mutant
# search started last). With the long tests first, a run ends on short ones. A pattern (a part of a
# test's id) that matches nothing costs nothing; a long test missing here runs in its place; the
# tests of a tuple's patterns go to one worker.
# The compiled ops' graphs are shared where the tests share a worker (Dynamo's cache: backprop.compiled's
# ops are module-level): tests/test_compiled.py's first fixed case, tests/test_kernel_faults.py's
# compiled cases and, for four ops, the benchmark's manual-compiled notebook shape are the same
# shapes and options, so each op's go to one worker together. So do its benchmark's compiled cases
# and its paired ones (which call every contender once, untimed): a compiled contender compiles on
# its first case in a worker, and its bwd and fwd+bwd cases share those graphs (batch_norm's
# four autograd-compiled notebook cases: 15 s summed in a cold run of two workers, 8.3 s in one process).
_SAME_GRAPHS = tuple(
    (f"tests/test_compiled.py::test_compiled_matches_autograd[cpu-{op}]", f"[compiled-{op} ",
     *(f"benchmarks/bench_{op}.py::test_{op}[cpu-{v}-" for v in ("manual-compiled", "autograd-compiled",
                                                                 "paired")))
    for op in ("cross_entropy", "logsumexp", "batch_norm", "tanh", "linear", "embedding"))
LONG_TESTS = (
    "tests/test_batch_norm.py::test_gradcheck",
    *_SAME_GRAPHS[:2],
    "tests/test_makemore_aot.py::test_compiled_training_matches_eager_training",
    "benchmarks/bench_train_step.py::test_train_step[cpu-manual-compiled]",
    "tests/test_mutants.py::test_mutant_is_caught[linear_cross_entropy_drops_bias_tangent_jvp]",
    *_SAME_GRAPHS[2:],
    "tests/test_batch_norm.py::test_blocked_channel_sums",
    "tests/test_batch_norm.py::test_matches_autograd",
    "tests/test_cross_entropy.py::test_gradcheck",
    "tests/test_cli.py::test_train_writes_outputs_and_sample_reads_the_checkpoint",
    "tests/test_linear.py::test_gradcheck",
    "tests/test_compiled.py::test_compiled_gradcheck",
    "tests/test_faults_cli.py::test_a_full_output_device_and_a_closed_stderr",
    "tests/test_plugin.py::test_every_check_of_a_correct_kernel_passes_with_power_printed",
    "tests/test_linear_cross_entropy.py::test_matches_autograd",
    "tests/test_faults_cli.py::test_ctrl_c_stops_cleanly_and_keeps_the_steps_done",
    "tests/test_plugin.py::test_a_bug_the_suite_cannot_catch_fails_the_session",
    "tests/test_compiled.py::test_new_shapes_stop_recompiling_after_the_dynamic_graph",
    "tests/test_cross_entropy.py::test_matches_autograd",
    ("tests/test_opinfo_samples.py::",),  # together: one worker imports op_db (conftest.py, ~4 s)
    "tests/test_dropin.py::test_custom_op_gradient_of_a_transposed_weight_under_compile",
    "tests/test_dropin.py::test_makemore_mlp_compiles_fullgraph_and_matches_the_eager_kernels",
    "tests/test_exercise.py::test_python_m_backprop_exercise",
    "tests/test_mutants.py::test_mutant_is_caught[ce_kdim_softmax_last_dim_backward]",
    "tests/test_cli.py::test_check_prints_the_table_and_passes",
    "tests/test_faults_cli.py::test_a_full_disk_keeps_the_old_checkpoint",
    "tests/test_faults_cli.py::test_a_closed_pipe_is_quiet",
    "tests/test_cpp.py::test_without_a_compiler_the_eager_kernels_run",
    "tests/test_mutants.py::test_mutant_is_caught[embedding_",
)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """What is alive once the tests are collected (torch and the other imports, the collected tests:
    ~450k objects in a worker) stays alive for the run: gc.freeze() leaves it out of every later full
    collection, CPython's own and the five with which pytest looks for unraisable exceptions when the
    session ends (0.57 s each over the 572k objects left after a third of the suite in one process;
    an xdist run waits for its last worker's). Reference counting still frees any of it."""
    gc.collect()
    gc.freeze()


@pytest.hookimpl(trylast=True)  # after -k, -m and --deselect: the order of what runs
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (every worker collects, in the same order): the LONG_TESTS first in each
    worker's share of worksteal's first split (n // workers consecutive tests each), dealt in turn,
    one test at a time, or a tuple's tests together; every other test keeps its place in the
    order. Without workers the order is pytest's."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers < 2:
        return
    units, taken = [], set()
    for entry in LONG_TESTS:
        together = isinstance(entry, tuple)
        found = [i for i in items if i.nodeid not in taken and any(p in i.nodeid for p in
                                                                   (entry if together else (entry,)))]
        taken.update(i.nodeid for i in found)
        units += [found] if together and found else [[i] for i in found]
    rest = [i for i in items if i.nodeid not in taken]
    shares, left = [], len(items)
    for k in range(workers):  # as xdist's WorkStealingScheduling splits the pending tests
        shares.append(left // (workers - k))
        left -= shares[-1]
    order = []
    for k, size in enumerate(shares):
        first = [i for unit in units[k::workers] for i in unit]
        take = max(0, size - len(first))
        order += first + rest[:take]
        rest = rest[take:]
    items[:] = order + rest


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
