"""Shared pytest configuration: hypothesis profiles and the device fixture.

Profiles (choose with HYPOTHESIS_PROFILE=<name>):
  ci        derandomised and bounded; used whenever CI is set (hypothesis's own 'ci' is replaced)
  dev       the local default: random seeds, a moderate number of examples
  thorough  deep runs: many examples, random seeds
  mutation  ci without shrinking, for tests/mutation/score.py
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("ci", derandomize=True, max_examples=40, **_common)
settings.register_profile("dev", max_examples=40, **_common)
settings.register_profile("thorough", max_examples=1000, **_common)
# the mutation score (tests/mutation/score.py): as ci, but a failure is not shrunk (a kill is all it needs)
settings.register_profile("mutation", derandomize=True, max_examples=40, database=None,
                          phases=[Phase.explicit, Phase.generate], **_common)
# pytest-xdist runs the default suite on 2 workers: one torch thread each, so that two workers'
# parallel regions do not wait on each other's descheduled threads (2 cores here)
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

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


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """Timing runs in one process: pyproject's addopts spread the default run over 2 workers
    (pytest-xdist), under which pytest-benchmark would switch itself off. Before xdist and
    pytest-benchmark read the option, a --benchmark-enable run goes back to one process."""
    if config.getoption("benchmark_enable", False) and getattr(config.option, "dist", "no") != "no":
        config.option.dist, config.option.numprocesses = "no", 0
