"""A floor for any training batch_norm backward (and fwd+bwd) at x (4096, 1024), float32, correction=0:
the benchmark's (N, C) large shape (docs/benchmarks-log.md, "The targets"). How close to a copy's
bandwidth can a kernel get on this CPU?

The backward's minimal traffic, what the benchmark's "% copy" counts, is 3n values: read dout and x,
write dx. But dx of any row needs dbias = sum(dout) and dweight = sum(dout * xhat) over all N rows,
so a kernel reads dout and x once for the sums and once more for dx: 5n values when the two 16 MiB
inputs do not stay in cache (they are the whole L3 here). The floor is those two passes done by the
cheapest aten calls that move the same bytes, with no arithmetic of batch_norm's:
  read pass   torch.dot(dout, x), flattened        (reads 2n: what the sums pass reads)
  write pass  torch.add(dout, x)                   (reads 2n, writes a fresh n: the dx pass)
  forward     x.sum(0) then torch.mul(x, 2)        (reads n for the statistics, reads n and writes n)
  copy        src.clone() of 1.5n values, the backward's minimal traffic (the benchmark's copy contender)
  ours        backprop.cpp.batch_norm (the C++ kernel); native: aten's native_batch_norm(_backward)
Prints each one's median time over interleaved rounds and, for the backward, "% copy" = copy's time /
its time (the benchmark's measure: 3n values over its time against the copy's rate). The floor's %
copy is the most that a two-pass backward can show (3n / 5n = 60% if both passes ran at copy's
rate; a read-only pass may run faster). fwd+bwd has no copy: a 2.5n copy (its 5n minimal traffic)
is a 40 MiB allocation that page-faults where the op's 16 MiB ones are reused.

    python docs/scripts/batch_norm_floor.py [threads] [rounds]    # default 1 thread, 11 rounds
"""

import statistics
import sys

import torch

from backprop import cpp
from backprop.bench import PairedRunner

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 11
N, C = 4096, 1024
g = torch.Generator().manual_seed(0)
x, w, b, dout = (torch.randn(*s, generator=g) for s in ((N, C), (C,), (C,), (N, C)))
src = torch.randn(N * C * 3 // 2, generator=g)
_, cache = cpp.batch_norm.forward(x, w, b)
_, mean, rstd = torch.ops.aten.native_batch_norm(x, w, b, None, None, True, 0.1, 1e-5)


def read_pass():
    return torch.dot(dout.view(-1), x.view(-1))


def write_pass():
    return torch.add(dout, x)


def native_bwd():
    return torch.ops.aten.native_batch_norm_backward(dout, x, w, None, None, mean, rstd, True, 1e-5,
                                                     [True, True, True])


def native_fwd_bwd():
    _, m, r = torch.ops.aten.native_batch_norm(x, w, b, None, None, True, 0.1, 1e-5)
    return torch.ops.aten.native_batch_norm_backward(dout, x, w, None, None, m, r, True, 1e-5,
                                                     [True, True, True])


def ours_fwd_bwd():
    out, c = cpp.batch_norm.forward(x, w, b)
    return out, cpp.batch_norm.backward(dout, c)


contenders = {
    "bwd": {"floor": lambda: (read_pass(), write_pass()), "ours": lambda: cpp.batch_norm.backward(dout, cache),
            "native": native_bwd, "copy": src.clone},
    "fwd+bwd": {"floor": lambda: (x.sum(0), torch.mul(x, 2), read_pass(), write_pass()), "ours": ours_fwd_bwd,
                "native": native_fwd_bwd},
}
for mode, fns in contenders.items():
    runner = PairedRunner(fns)
    runner.warm_up()
    runner.calibrate()
    for _ in range(ROUNDS):
        runner.round()  # each contender once, in a shuffled order
    m = {k: statistics.median(v) for k, v in runner.times.items()}
    print(f"{mode}, threads {torch.get_num_threads()}, medians of {ROUNDS} interleaved rounds: "
          + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in m.items())
          + ("; % copy: " + ", ".join(f"{k} {m['copy'] / v:.0%}" for k, v in m.items() if k != "copy")
             if "copy" in m else "")
          + f"; native / ours {m['native'] / m['ours']:.3f}, floor / ours {m['floor'] / m['ours']:.3f}")
