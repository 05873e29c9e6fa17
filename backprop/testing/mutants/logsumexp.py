"""Known bugs in logsumexp's kernel (see backprop.testing.mutants)."""

from __future__ import annotations

import torch

from backprop import logsumexp
from backprop.testing.catalogue import mutant


@mutant(logsumexp)
@torch.no_grad()  # caught by its maths, not by recording history
def lse_keepdim_broadcast_backward(dout, cache):
    """Wrong keepdim broadcast: puts the reduced dim back last instead of where it was."""
    x, shift, sumexp, dims, keepdim, _ = cache
    if dims and not keepdim:
        dout = dout.unsqueeze(-1)
    return (torch.exp(x - shift) * (dout / sumexp),)


@mutant(logsumexp)
@torch.no_grad()  # caught by its maths, not by recording history
def lse_unnormalised_backward(dout, cache):
    """Gradient exp(x) without normalising by the sum."""
    x, shift, sumexp, dims, keepdim, _ = cache
    if dims and not keepdim:
        dout = dout.reshape(shift.shape)
    return (torch.exp(x - shift) * dout,)


MUTANTS = [
    lse_keepdim_broadcast_backward,
    lse_unnormalised_backward,
]
