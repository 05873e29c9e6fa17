"""The machinery of the bug catalogue (backprop.testing.mutants): the ``mutant`` decorator that
turns a wrong formula into an op with the kernel contract, and ``first_catch``, which runs the
suite's checks on a mutant and says which stage caught it.

    stage = first_catch(m, max_examples=300)   # "gradient", "forward", ... or None: it survived
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from backprop._check import no_autograd


def mutant(op, *, forward=None, backward=None, differentiable=False):
    """Decorator: the function's docstring names the bug; it replaces op's forward, backward or
    jvp, by its name's ending (``..._forward``, ``..._backward``, ``..._jvp``). A backward runs
    without autograd, as the kernels do: a mutant that records history would be caught by the
    contract's no-history check on every case, whatever its bug, and prove nothing. The mutant
    keeps op's ``prepare``, ``forward_math``, ``Args``, ``Cache`` and ``backward_math`` (what the
    adapter's second order and vmap differentiate, backprop.testing.stages): a wrong backward that
    calls a no-autograd function would fail the second order for that, not for its bug. With
    ``differentiable=True`` the wrong backward (undecorated) is the ``backward_math`` too."""

    def make(fn):
        replaces = next((k for k in ("forward", "backward", "jvp") if fn.__name__.endswith(k)), None)
        wrapped = no_autograd(fn)
        return SimpleNamespace(
            forward=forward or (wrapped if backward is None and replaces == "forward" else op.forward),
            backward=backward or (wrapped if replaces == "backward" else op.backward),
            backward_math=fn if differentiable and replaces == "backward" else op.backward_math,
            jvp=fn if replaces == "jvp" else op.jvp,
            prepare=op.prepare, forward_math=op.forward_math, Args=op.Args,
            Cache=op.Cache, __name__=fn.__name__, __doc__=fn.__doc__, op=op.__name__.split(".")[-1],
        )

    return make


def first_catch(m: Any, *, max_examples: int = 300, dtypes: Sequence[torch.dtype] | None = None,
                device: str = "cpu", fixed: bool = False) -> str | None:
    """Run the suite's checks on the mutant; return the stage that caught it (forward, gradient,
    contract, jvp, second-order, vmap, opcheck or gradcheck: check_case runs every stage that applies
    to the mutant), None if it survived ``max_examples`` derandomised cases. A crash does not count
    as a catch: a mutant that only crashes (say, on shapes that do not line up) must
    still be caught by a check on the cases where it runs, so a broken mutant cannot pass for a
    caught one. ``dtypes`` narrows the drawn cases to those dtypes (the plugin's --backprop-dtypes);
    ``fixed`` tries the op table's fixed cases first, as the plugin's run does."""
    from backprop.testing.opinfo import OPS
    from backprop.testing.oracle import CheckFailure
    from backprop.testing.strategies import to_device, to_dtype
    from backprop.testing.suite import ALL_CHECKS, check_case, gradcheck_case

    info = OPS[m.op]
    strategy = info.cases() if not dtypes else st.sampled_from(list(dtypes)).flatmap(info.cases)
    if hasattr(m, "cases"):
        strategy = m.cases(strategy)
    caught = []
    for args, options in info.fixed_cases(device) if fixed else ():
        for dtype in dtypes or (None,):
            try:
                check_case(m.op, m, to_dtype((args, options), dtype), checks=ALL_CHECKS)
            except CheckFailure as e:
                return e.stage
            except Exception:
                pass

    @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def search(case):
        try:
            check_case(m.op, m, to_device(case, device), checks=ALL_CHECKS)
            gradcheck_case(m.op, m, case)  # finite differences: float64 on the CPU
        except CheckFailure as e:
            caught.append(e.stage)
            raise
        except Exception:  # e.g. a missing transpose on non-square weights: try the next case
            pass

    try:
        with _own_constants_only():
            search()
    except Exception:
        return caught[0] if caught else None
    return None


@contextlib.contextmanager
def _own_constants_only() -> Iterator[None]:
    """Hypothesis (6.131 on) now and then draws a constant found in the source of a module imported
    so far (outside site-packages and test files), so a derandomised search would depend on what the
    process imported before it: pytest's conftest and plugins, backprop.cpp, backprop.makemore, a
    user's own modules. The cases, the stage that catches a mutant and the time it takes changed
    with them (linear_cross_entropy_drops_bias_tangent_jvp: caught on the 12th case in a bare
    process, on the 87th under pytest). The search draws Hypothesis's own constants only. Another
    Hypothesis, without these internals: its own behaviour."""
    try:
        from hypothesis.internal.conjecture import providers

        local, cache = providers._get_local_constants, providers.CONSTANTS_CACHE.cache
        none = providers.Constants()
    except (ImportError, AttributeError, TypeError):
        yield
        return
    providers._get_local_constants = lambda: none
    cache.clear()  # the constants allowed per kind of draw, computed with the module constants
    try:
        yield
    finally:
        providers._get_local_constants = local
        cache.clear()
