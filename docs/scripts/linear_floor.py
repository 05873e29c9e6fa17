"""A floor for any linear fwd+bwd (or backward) at x (4096, 1024), weight (1024, 1024), bias, float32:
the benchmark's large shape (docs/benchmarks-log.md, "The targets"). How far ahead of torch can a kernel
be on this CPU?

Whatever the kernel, its forward is one (N, D) x (D, H) matmul (2 N D H flops, with the bias added in
it) and its backward two more, dx = dout @ W and dW = dout.T @ x (2 N D H each), and the bias sum over
N; nothing can be fused away (the three products share no operand pair) or skipped. The floor is those
four BLAS calls alone, straight from aten, with no Python checks and no autograd graph. Timed in
interleaved rounds:
  floor     torch.addmm(b, x, W.T); dout @ W; dout.T @ x; dout.sum(0)   (fwd+bwd)
            dout @ W; dout.T @ x; dout.sum(0)                           (bwd)
  ours      backprop.linear.forward then backward (the same four calls, plus the kernel's checks)
  autograd  F.linear under torch.autograd.grad
Prints each one's time and floor / it, the fraction of the floor's speed it reaches: both near 1.0
means torch's path already runs at this CPU's matmul rate, so a ratio of ours over it above 1.0 is out
of reach for any kernel that does the same flops (it can only be parity plus noise). Also prints the
floor's matmul rate in GFLOP/s.

    python docs/scripts/linear_floor.py [threads] [rounds]    # default 1 thread, 11 rounds
"""

import statistics
import sys

import torch
import torch.nn.functional as F

import backprop
from backprop.bench import PairedRunner

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 11
N, D, H = 4096, 1024, 1024
g = torch.Generator().manual_seed(0)
x, w, b = torch.randn(N, D, generator=g), torch.randn(H, D, generator=g), torch.randn(H, generator=g)
dout = torch.randn(N, H, generator=g)
leaves = [t.clone().requires_grad_() for t in (x, w, b)]
_, cache = backprop.linear.forward(x, w, b)


def floor_bwd():
    return dout @ w, dout.t() @ x, dout.sum(0)


def floor_fwd_bwd():
    return torch.addmm(b, x, w.t()), *floor_bwd()


def ours_fwd_bwd():
    out, c = backprop.linear.forward(x, w, b)
    return out, backprop.linear.backward(dout, c)


def autograd_fwd_bwd():
    return torch.autograd.grad(F.linear(*leaves), leaves, dout)


kept = F.linear(*leaves)
contenders = {
    "fwd+bwd": {"floor": floor_fwd_bwd, "ours": ours_fwd_bwd, "autograd": autograd_fwd_bwd},
    "bwd": {"floor": floor_bwd, "ours": lambda: backprop.linear.backward(dout, cache),
            "autograd": lambda: torch.autograd.grad(kept, leaves, dout, retain_graph=True)},
}
for mode, fns in contenders.items():
    runner = PairedRunner(fns)
    runner.warm_up()
    for _ in range(ROUNDS):
        runner.round()  # each contender once, in a shuffled order
    m = {k: statistics.median(v) for k, v in runner.times.items()}
    flops = (3 if mode == "fwd+bwd" else 2) * 2 * N * D * H
    print(f"{mode}, threads {torch.get_num_threads()}, medians of {ROUNDS} interleaved rounds: "
          + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in m.items())
          + f"; floor at {flops / m['floor'] / 1e9:.1f} GFLOP/s; floor / ours {m['floor'] / m['ours']:.3f}, "
          f"floor / autograd {m['floor'] / m['autograd']:.3f}, autograd / ours {m['autograd'] / m['ours']:.3f}")
