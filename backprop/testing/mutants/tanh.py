"""Known bugs in tanh's kernel (see backprop.testing.mutants)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from backprop import tanh
from backprop._check import no_autograd
from backprop.testing.catalogue import mutant


@mutant(tanh)
def tanh_one_plus_backward(dout, cache):
    """1 + y**2 instead of 1 - y**2."""
    return ((1 + cache.out * cache.out) * dout,)


def tanh_input_forward(x):
    """Uses the input where the rule needs the output: caches x, not tanh(x)."""
    return torch.tanh(x), tanh.Cache(x)


tanh_uses_input = SimpleNamespace(forward=no_autograd(tanh_input_forward), backward=tanh.backward,
                                  Cache=tanh.Cache,
                                  __name__="tanh_uses_input", __doc__=tanh_input_forward.__doc__, op="tanh")


MUTANTS = [
    tanh_one_plus_backward,
    tanh_uses_input,
]
