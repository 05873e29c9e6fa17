"""The catalogue of known bugs lives in backprop.testing.mutants, so that it ships with the package
(the pytest plugin reruns it on a user's machine); this name stays for the tests that import it."""

from backprop.testing.mutants import *  # noqa: F403
from backprop.testing.mutants import MUTANTS, first_catch, mutant  # noqa: F401
