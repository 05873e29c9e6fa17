"""Known bugs of the drop-in layer (see backprop.testing.mutants): a wrong forward-mode rule for
each op (caught by the ``jvp`` stage), a custom op whose fake (meta) implementation gives the
wrong shape (``opcheck``), and a backward that is right in eager mode but breaks under vmap
(``vmap``), and one whose first derivative is right but whose derivative is not
(``second-order``). The stages are backprop.testing.stages."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from backprop import batch_norm, cross_entropy, embedding, linear, linear_cross_entropy, logsumexp, tanh
from backprop.testing.catalogue import mutant

# ---------------------------------------------------------------- wrong forward-mode rules


@mutant(tanh)
def tanh_one_plus_jvp(tangents, cache):
    """jvp: 1 + y**2 instead of 1 - y**2."""
    (t_x,) = tangents
    return (1 + cache.out * cache.out) * t_x


@mutant(logsumexp)
def logsumexp_unnormalised_jvp(tangents, cache):
    """jvp: sum(exp(x - m) t_x) without dividing by the sum of exp(x - m)."""
    (t_x,) = tangents
    if not cache.dims:
        return t_x.clone()
    t_out = ((cache.x - cache.shift).exp() * t_x).sum(dim=cache.dims, keepdim=True)
    return t_out if cache.keepdim else t_out.squeeze(cache.dims)


@mutant(cross_entropy)
def cross_entropy_no_smoothing_jvp(tangents, cache):
    """jvp: differentiates the unsmoothed loss (label_smoothing dropped from the rule)."""
    return cross_entropy.jvp(tangents, cache._replace(label_smoothing=0.0))


@mutant(batch_norm)
def batch_norm_constant_statistics_jvp(tangents, cache):
    """jvp in training mode treats the batch statistics as constants (the eval rule: rstd t_x)."""
    return batch_norm.jvp(tangents, cache._replace(training=False))


@mutant(linear)
def linear_drops_weight_tangent_jvp(tangents, cache):
    """jvp: forgets the x t_W^T term (only t_x W^T + t_b)."""
    t_x, _, t_b = (tuple(tangents) + (None, None))[:3]
    return linear.jvp((t_x, None, t_b), cache)


@mutant(linear_cross_entropy)
def linear_cross_entropy_drops_bias_tangent_jvp(tangents, cache):
    """jvp: forgets the bias's tangent (the logits move by t_x W^T + x t_W^T only)."""
    t_x, t_w = (tuple(tangents) + (None, None))[:2]
    return linear_cross_entropy.jvp((t_x, t_w, None, None), cache)


def _bias_and_classes(case):
    (x, linear_weight, targets, linear_bias), options = case
    return linear_bias is not None and linear_weight.shape[0] > 1


# the bug shows only where there is a bias and more than one class (with one, the loss is constant):
# the search draws those cases alone. Over every case its first catch was the 87th draw (13.6 s in
# one process), the 86 before it without a bias, with one class, or (16-bit cases among them) inside
# the rounding bound; now the 8th (2.0 s)
linear_cross_entropy_drops_bias_tangent_jvp.cases = lambda strategy: strategy.filter(_bias_and_classes)


@mutant(embedding)
def embedding_zeroes_padding_jvp(tangents, cache):
    """jvp zeroes the padding row's tangent: the gradient's rule, where forward reads the row."""
    t_out = embedding.jvp(tangents, cache)
    if cache.padding_idx is None or t_out is None:
        return t_out
    return torch.where((cache.indices == cache.padding_idx)[..., None], 0, t_out)


# ---------------------------------------------------------------- a wrong fake (meta) shape

NAMESPACE = "backprop_mutant"


@functools.cache
def _linear_fake_2d_op():
    """linear as a custom op (backprop.library.register) under its own namespace, its forward
    op's fake replaced by a hand-written one that assumes x is (N, D)."""
    from backprop import library

    name = "linear_fake_2d"
    op, _ = library.register(name, library.Entry(linear), namespace=NAMESPACE)

    def fake(x, weight, bias=None):
        out = x.new_empty(x.shape[0], weight.shape[0])  # (N, H): the leading dims of (*, D) lost
        return (out, *(x.new_empty(0) for _ in range(library.CACHE_SLOTS)))

    torch.library.register_fake(f"{NAMESPACE}::{name}_forward", fake)
    return op


linear_fake_2d = SimpleNamespace(
    **{k: getattr(linear, k) for k in ("forward", "backward", "backward_math", "jvp", "prepare",
                                       "forward_math", "Args", "Cache")},
    custom_op=_linear_fake_2d_op, __name__="linear_fake_2d", op="linear",
    __doc__="The custom op's fake (meta) implementation assumes a 2-D x: (N, H) for x (*, D).",
)

# ---------------------------------------------------------------- a backward that breaks under vmap


@mutant(tanh, differentiable=True)  # backward_math too: the adapter's vmap runs it
def tanh_skips_zero_dout_backward(dout, cache):
    """Skips the work when dout is all zeros: Python control flow on a tensor's value, which
    vmap refuses (right in eager mode, first and second order)."""
    if not dout.any():
        return (torch.zeros_like(dout),)
    out = cache.out
    return ((1 - out) * (1 + out) * dout,)


# ---------------------------------------------------------------- a backward wrong in second order


@mutant(tanh, differentiable=True)  # backward_math too: the second order differentiates it
def tanh_detached_output_backward(dout, cache):
    """Reads the saved output through .detach(): first order is right, but a double backward
    loses the derivative through y, d/dx (1 - y**2) dout = -2 y (1 - y**2) dout."""
    y = cache.out.detach()
    return ((1 - y) * (1 + y) * dout,)


MUTANTS = [
    tanh_one_plus_jvp,
    logsumexp_unnormalised_jvp,
    cross_entropy_no_smoothing_jvp,
    batch_norm_constant_statistics_jvp,
    linear_drops_weight_tangent_jvp,
    embedding_zeroes_padding_jvp,
    linear_cross_entropy_drops_bias_tangent_jvp,
    linear_fake_2d,
    tanh_skips_zero_dout_backward,
    tanh_detached_output_backward,
]
