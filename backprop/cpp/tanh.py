"""tanh through C++ (tanh.cpp): backprop.tanh's contract, one call a direction.

The C++ covers any contiguous float32 or float64 CPU tensor, of any shape (0-d and empty too):
the forward is ATen's vector tanh (Sleef's), made correctly rounded in the two bands where it is
not (tanh.cpp); the backward is (1 - y)(1 + y) dout in the eager kernel's rounding order. Anything
else (another dtype or device, a strided x, a bad dout or cache) runs backprop.tanh.
"""

from __future__ import annotations

from torch import Tensor

from backprop import cpp
from backprop import tanh as eager

Cache = eager.Cache
LARGE_SHAPES = True  # threaded, its large outputs populated before they are written: tanh.cpp
# the rest of the contract is the eager op's, on the same caches: forward mode (jvp), and what the
# adapter (backprop.autograd) recomputes for a double backward or torch.func
Args, prepare, forward_math, check_backward, backward_math, jvp = (
    eager.Args, eager.prepare, eager.forward_math, eager.check_backward, eager.backward_math, eager.jvp)


def forward(x: Tensor) -> tuple[Tensor, Cache]:
    run = cpp.op("tanh_forward")
    if run is not None and type(x) in cpp.TENSORS and cpp.unwrapped():
        out = run(x)
        if out is not None:  # else not covered, or an error: the eager kernel decides
            return out, Cache(out, (out._version,))
    return eager.forward(x)


def backward(dout: Tensor, cache: Cache) -> tuple[Tensor]:
    run = cpp.op("tanh_backward")
    if (run is not None and type(cache) is Cache and type(dout) is Tensor and type(cache.out) is Tensor
            and (cache.versions == (cache.out._version,) or cache.versions == ()) and cpp.unwrapped()):
        # the eager check_backward's: out unedited since forward (a cache built by hand has
        # versions=(), nothing to compare); dout's shape and dtype in the C++
        dx = run(dout, cache.out)
        if dx is not None:
            return (dx,)
    return eager.backward(dout, cache)


forward.__doc__, backward.__doc__ = eager.forward.__doc__, eager.backward.__doc__
