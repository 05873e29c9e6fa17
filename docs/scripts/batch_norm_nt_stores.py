"""batch_norm's (N, C) backward, its dx pass alone (backprop/cpp/batch_norm.cpp's dx_row, training):
plain stores against non-temporal ones (_mm256_stream_ps from an L1 buffer of 1024 values, which
write dx's lines without reading them in first), beside a copy of 1.5 n floats and torch.add(dout, x)
(the same 2 reads and 1 write with no arithmetic). 41 interleaved rounds of 5 calls each, medians,
and the median of the per-round ratio plain / stream with its p20 and p80. Needs g++, ninja and AVX2.

    python docs/scripts/batch_norm_nt_stores.py [threads] [NxC]    # default 2 threads, 4096x1024
"""

import random
import statistics
import sys
import time

import torch
from torch.utils.cpp_extension import load_inline

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

template <typename T> inline T normal(T x, T hi, T lo, T r) { return ((x - hi) - lo) * r; }

// batch_norm.cpp's dx_row, training: dx = k (g - (a + xhat v))
template <typename T>
inline void dx_row(const T* __restrict__ g, const T* __restrict__ x, const T* __restrict__ hi,
                   const T* __restrict__ lo, const T* __restrict__ r, const T* __restrict__ k,
                   const T* __restrict__ a, const T* __restrict__ v, int64_t C, T* __restrict__ dx) {
  for (int64_t c = 0; c < C; ++c) dx[c] = k[c] * (g[c] - (a[c] + normal(x[c], hi[c], lo[c], r[c]) * v[c]));
}

inline void stream(float* __restrict__ dst, const float* __restrict__ src, int64_t n) {
  int64_t i = 0;
  for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 31); ++i) dst[i] = src[i];
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
}

// mode 0: plain stores; 1: each row computed into buf, then streamed to dx
at::Tensor dx(at::Tensor g, at::Tensor x, at::Tensor coef, int64_t mode) {
  const int64_t N = x.size(0), C = x.size(1);
  at::Tensor out = at::empty_like(x);
  const float *pg = g.data_ptr<float>(), *px = x.data_ptr<float>(), *cf = coef.data_ptr<float>();
  const float *hi = cf, *lo = cf + C, *r = cf + 2 * C, *k = cf + 3 * C, *a = cf + 4 * C, *v = cf + 5 * C;
  float* pd = out.data_ptr<float>();
  const int64_t B = std::max<int64_t>(1, (1 << 18) / C);  // batch_norm.cpp's over_rows blocks
  at::parallel_for(0, (N + B - 1) / B, 1, [&](int64_t b0, int64_t b1) {
    const int64_t i0 = b0 * B, i1 = std::min(N, b1 * B);
    if (mode == 0) {
      for (int64_t i = i0 * C; i < i1 * C; i += C) dx_row(pg + i, px + i, hi, lo, r, k, a, v, C, pd + i);
      return;
    }
    constexpr int64_t kBuf = 1024;
    alignas(64) float buf[kBuf];
    for (int64_t i = i0 * C; i < i1 * C; i += C)
      for (int64_t c = 0; c < C; c += kBuf) {
        const int64_t m = std::min(kBuf, C - c);
        dx_row(pg + i + c, px + i + c, hi + c, lo + c, r + c, k + c, a + c, v + c, m, buf);
        stream(pd + i + c, buf, m);
      }
    _mm_sfence();
  });
  return out;
}
"""

mod = load_inline("batch_norm_nt_stores", cpp_sources=[SOURCE], functions=["dx"],
                  extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"])
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
N, C = (int(s) for s in sys.argv[2].split("x")) if len(sys.argv) > 2 else (4096, 1024)
g = torch.Generator().manual_seed(0)
x, dout, coef = torch.randn(N, C, generator=g), torch.randn(N, C, generator=g), torch.rand(6 * C, generator=g)
assert torch.equal(mod.dx(dout, x, coef, 0), mod.dx(dout, x, coef, 1))
src = torch.randn(N * C * 3 // 2, generator=g)
contenders = {"plain": lambda: mod.dx(dout, x, coef, 0), "stream": lambda: mod.dx(dout, x, coef, 1),
              "copy": src.clone, "add": lambda: torch.add(dout, x)}
times = {name: [] for name in contenders}
for run in contenders.values():
    for _ in range(5):
        run()
order = list(contenders)
shuffle = random.Random(0).shuffle
for _ in range(41):
    shuffle(order)
    for name in order:
        t0 = time.perf_counter()
        for _ in range(5):
            contenders[name]()
        times[name].append((time.perf_counter() - t0) / 5)
medians = {name: statistics.median(t) for name, t in times.items()}
ratios = sorted(a / b for a, b in zip(times["plain"], times["stream"]))
n = len(ratios)
print(f"{N}x{C}, threads {torch.get_num_threads()}, medians: "
      + ", ".join(f"{name} {m * 1e3:.2f} ms" for name, m in medians.items())
      + f"; plain / stream {ratios[n // 2]:.3f} [p20 {ratios[n // 5]:.3f}, p80 {ratios[4 * n // 5]:.3f}]")
