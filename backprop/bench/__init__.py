"""Benchmarks that can be trusted: paired rounds and their statistics (``stats``), the run's
groups and its history (``history``). ``backprop bench`` itself is ``backprop.cli.bench``."""

from backprop.bench.history import *  # noqa: F403
from backprop.bench.stats import *  # noqa: F403
from backprop.bench.stats import DEFAULT_THREADS  # noqa: F401
