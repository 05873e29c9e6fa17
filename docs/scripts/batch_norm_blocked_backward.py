"""batch_norm's backward at 4096x1024 (float32, one thread), timed against a copy of its minimal bytes.

Contenders: the kernel's two-pass formula compiled (per-channel sums in 8-row blocks, then dx); the
same formula in blocks of CB channels (compiled and eager); aten's native backward; and a clone of
1.5 n floats (read 1.5 n, write 1.5 n: the 3 n a one-pass backward must move). Prints the median of
15 interleaved rounds and each one's % of the copy's rate (docs/benchmarks-log.md, "Large shapes").

    python docs/scripts/batch_norm_blocked_backward.py [CB]    # CB: channels a block, default 64
"""

import statistics
import sys
import time

import torch

torch.set_num_threads(1)
N, C = 4096, 1024
CB = int(sys.argv[1]) if len(sys.argv) > 1 else 64
g = torch.Generator().manual_seed(0)
xhat, dy = torch.randn(N, C, generator=g), torch.randn(N, C, generator=g)
rstd, w = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)


def two_pass(dy, xhat, rstd, w):
    db = dy.reshape(-1, 8, C).sum(1).sum(0)
    dw = (dy * xhat).reshape(-1, 8, C).sum(1).sum(0)
    return (dy - (db / N + xhat * (dw / N))) * (rstd * w), dw, db


def blocked(dy, xhat, rstd, w):
    dxs, dws, dbs = [], [], []
    for c0 in range(0, C, CB):
        d, x, s = dy[:, c0:c0 + CB], xhat[:, c0:c0 + CB], slice(c0, c0 + CB)
        db, dw = d.sum(0), (d * x).sum(0)
        dxs.append((d - (db / N + x * (dw / N))) * (rstd[s] * w[s]))
        dws.append(dw)
        dbs.append(db)
    return torch.cat(dxs, 1), torch.cat(dws), torch.cat(dbs)


x = xhat / rstd  # mean 0: aten's x-hat is x * rstd
src = torch.randn(N * C * 3 // 2, generator=g)
two_pass_c, blocked_c = torch.compile(two_pass), torch.compile(blocked)
contenders = {
    "copy": src.clone,
    "two-pass compiled": lambda: two_pass_c(dy, xhat, rstd, w),
    "blocked compiled": lambda: blocked_c(dy, xhat, rstd, w),
    "blocked eager": lambda: blocked(dy, xhat, rstd, w),
    "native": lambda: torch.ops.aten.native_batch_norm_backward(
        dy, x, w, None, None, torch.zeros(C), rstd, True, 0.0, [True, True, True]),
}
want = two_pass(dy, xhat, rstd, w)
for name in ("two-pass compiled", "blocked compiled", "blocked eager"):
    for got, ref in zip(contenders[name](), want):
        torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-4)
times = {name: [] for name in contenders}
for _ in range(15):
    for name, run in contenders.items():
        t0 = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - t0)
copy = statistics.median(times["copy"])
for name, ts in times.items():
    median = statistics.median(ts)
    print(f"{name:18s} {median * 1e3:7.2f} ms  {100 * copy / median:4.0f}% of copy")
