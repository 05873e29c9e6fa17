"""The verification harness, public so that you can point it at your own kernels.

    from backprop.testing import check_against_autograd
    report = check_against_autograd(my_op, torch.tanh, x)   # raises CheckFailure on a mismatch
    print(report)                                            # one row per tensor

``my_op`` is any object with ``forward(*args, **options) -> (out, cache)`` and
``backward(dout, cache) -> tuple of grads``. Hypothesis strategies live in
``backprop.testing.strategies`` (needs hypothesis).
"""

from backprop.testing.compare import ERROR_RATIO, FLOOR_ULPS, TOLERANCES, Record, Report, compare
from backprop.testing.oracle import (
    CheckFailure,
    check_against_autograd,
    check_gradcheck,
    random_dout,
)
from backprop.testing.references import REFERENCES

__all__ = [
    "ERROR_RATIO", "FLOOR_ULPS", "REFERENCES", "TOLERANCES", "CheckFailure", "Record", "Report",
    "check_against_autograd", "check_gradcheck", "compare", "random_dout",
]
