"""A floor for any cross_entropy fwd+bwd at (2048, 32768) float32, against F.cross_entropy under
autograd: how far ahead of autograd can a kernel be on this CPU? (docs/benchmarks-log.md, "The targets")

Whatever the kernel, its forward reads the logits and takes 67M exps (for the sum), and its backward
takes 67M exps again (softmax; or reads them back from a cache the forward wrote) and writes a fresh
(N, C) gradient. Timed here, in interleaved rounds:
  read       x.sum(): reading the 256 MiB logits once
  exps       67M exps with no memory traffic (aten's vectorised exp on a 128 KiB buffer, L2-resident)
  exp_fresh  torch.exp(x): read, 67M exps, a fresh 256 MiB output: the backward's least work
floor = exp_fresh + max(read, exps). A design that caches softmax in the forward and scales it in
place in the backward (possible only when the caller releases the cache) moves the exps and the
fresh write into the forward: its floor is exp_fresh alone. Prints autograd / floor for both.

    python docs/scripts/cross_entropy_floor.py [threads]    # default 1
"""

import statistics
import sys

import torch
import torch.nn.functional as F

from backprop.bench import PairedRunner

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
N, C = 2048, 32768
g = torch.Generator().manual_seed(0)
x, y = torch.randn(N, C, generator=g), torch.randint(0, C, (N,), generator=g)
small = torch.randn(N * C // 2048, generator=g)  # 128 KiB
small_out = torch.empty_like(small)
xa = x.clone().requires_grad_()


def autograd():
    return torch.autograd.grad(F.cross_entropy(xa, y), xa)[0]


def exp_fresh():
    return torch.exp(x)


def read():
    return x.sum()


def exps():
    for _ in range(2048):
        torch.exp(small, out=small_out)
    return small_out


runner = PairedRunner({"autograd": autograd, "exp_fresh": exp_fresh, "read": read, "exps": exps})
runner.warm_up()
for _ in range(11):
    runner.round()  # each contender once, in a shuffled order
m = {k: statistics.median(v) for k, v in runner.times.items()}
floor, cached = m["exp_fresh"] + max(m["read"], m["exps"]), m["exp_fresh"]
print(f"threads {torch.get_num_threads()}, medians of 11 interleaved rounds: "
      + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in m.items()))
print(f"floor {floor * 1e3:.0f} ms: autograd / floor = {m['autograd'] / floor:.2f}x; softmax cached in the "
      f"forward and scaled in place: autograd / floor = {m['autograd'] / cached:.2f}x")
