"""A catalogue of plausible backward bugs: each a small variant of a correct kernel, with a
one-line docstring naming the mistake, one module per op (``mutants/<op>.py``, each with its own
``MUTANTS`` list). tests/test_mutants.py asserts the suite catches every one, and the pytest plugin
(backprop.pytest_plugin) reruns the catalogue on a user's machine before it trusts a green run
("suite power").

    stage = first_catch(m, max_examples=300)   # "gradient", "forward", ... or None: it survived

Adding a bug: write it with ``@mutant(op)`` in its op's module and put it in that module's
``MUTANTS``; a new module goes in ``_MODULES`` below.
"""

from __future__ import annotations

from backprop.testing.catalogue import first_catch, mutant  # noqa: F401 (re-exported)
from backprop.testing.mutants import (
    batch_norm,
    cross_entropy,
    dropin,
    embedding,
    linear,
    linear_cross_entropy,
    logsumexp,
    tanh,
)

_MODULES = (cross_entropy, logsumexp, batch_norm, tanh, linear, embedding, linear_cross_entropy, dropin)

MUTANTS = [m for module in _MODULES for m in module.MUTANTS]
globals().update({m.__name__: m for m in MUTANTS})  # each mutant by name: mutants.tanh_one_plus_backward
__all__ = ["MUTANTS", "first_catch", "mutant", *(m.__name__ for m in MUTANTS)]
