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

from backprop import batch_norm, cross_entropy, embedding, linear, logsumexp, tanh

OPS = {
    "cross_entropy": cross_entropy,
    "logsumexp": logsumexp,
    "batch_norm": batch_norm,
    "tanh": tanh,
    "linear": linear,
    "embedding": embedding,
}

__version__ = "0.1.0"
__all__ = ["OPS", "batch_norm", "cross_entropy", "embedding", "linear", "logsumexp", "tanh"]
