"""backprop: hand-written backward kernels, each proven against autograd.

Every op is a module with two pure functions::

    out, cache = backprop.<op>.forward(*tensors, **options)
    grads      = backprop.<op>.backward(dout, cache)

``grads`` is a tuple with one entry per positional tensor argument of ``forward``,
``None`` for integer inputs and for absent optional tensors. Neither function
modifies its arguments, and neither records autograd history.

Shape letters, used in every module's comments:

    N  rows (batch)            C  classes / channels
    D  in-features             H  out-features
    V  vocabulary (table rows) E  embedding width
    *  any number of leading dimensions
"""

from backprop import batch_norm, cross_entropy, embedding, linear, linear_cross_entropy, logsumexp, tanh

# The library's one list of ops (an op module defines forward, backward and Cache). The harness's
# op table, backprop.testing.opinfo.OP_DB, has one entry for each; tests/test_op_table.py checks.
OPS = {op.__name__.removeprefix("backprop."): op
       for op in (cross_entropy, logsumexp, batch_norm, tanh, linear, embedding, linear_cross_entropy)}

__version__ = "0.1.0"
__all__ = ["OPS", *OPS]
