// Shared by every backprop.cpp kernel (one translation unit: backprop/cpp/__init__.py builds all
// the .cpp files of this folder together, so each op keeps its helpers in a namespace of its own).
//
// A kernel reads raw memory, so it first checks that it may (raw below); when it may not, or when
// an argument is not one its loops cover, it returns an empty list and the Python side runs the
// eager kernel instead, which raises every error: the messages are written once, in Python.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace backprop_cpp {

using Tensors = std::vector<at::Tensor>;

// a loss's reduction as the Python side passes it (backprop.cpp.REDUCTIONS)
enum Reduction : int64_t { kMean = 0, kSum = 1, kNone = 2 };

// a dense CPU tensor whose elements lie in memory in row-major order: data_ptr<T>()[i] is element i
inline bool raw(const at::Tensor& t) {
  return t.defined() && t.has_storage() && t.device().is_cpu() && t.layout() == at::kStrided &&
         t.is_contiguous() && !t.is_neg() && !t.is_conj() && !t._is_zerotensor();
}

// float32 and float64: the dtypes the loops are written for (T); accumulations run in double
inline bool real(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

// every entry of i (n of them) lies in [0, V): an index the loops may use (else the eager kernel
// raises its error)
inline bool in_range(const int64_t* i, int64_t n, int64_t V) {
  for (int64_t p = 0; p < n; ++p)
    if (i[p] < 0 || i[p] >= V) return false;
  return true;
}

// the row maximum, as torch's amax followed by nan_to_num(0, inf, 0): a nan propagates and is then
// shifted by 0, a -inf maximum (a row of -inf) is shifted by 0 so that z - m stays -inf, not nan
template <typename T>
inline T row_shift(const T* z, int64_t C) {
  using V = at::vec::Vectorized<T>;
  const T m = at::vec::reduce_all<T>([](V& a, V& b) { return at::vec::maximum(a, b); }, z, C);
  return std::isnan(m) || m == -std::numeric_limits<T>::infinity() ? T(0) : m;
}

// sum_i x[i] in T, on this CPU's lanes (as torch's own float sums)
template <typename T>
inline T sum(const T* x, int64_t n) {
  using V = at::vec::Vectorized<T>;
  return n == 0 ? T(0) : at::vec::reduce_all<T>([](V& a, V& b) { return a + b; }, x, n);
}

// out[i] = exp((x[i] - a) - b), i < n: ATen's vector exp (Sleef, 1 ulp) on this CPU's lanes. The two
// subtractions round as the eager kernel's (z - shift) - logsum does
template <typename T>
inline void exp_shifted(const T* x, T a, T b, T* out, int64_t n) {
  using V = at::vec::Vectorized<T>;
  const V va(a), vb(b);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) ((V::loadu(x + i) - va) - vb).exp().store(out + i);
  if (i < n) ((V::loadu(x + i, n - i) - va) - vb).exp().store(out + i, n - i);
}

#if defined(__linux__) && !defined(MADV_POPULATE_WRITE)
#define MADV_POPULATE_WRITE 23  // Linux 5.14; an older kernel refuses it (EINVAL): the pages then fault one by one
#endif

// a large output (a fresh allocation: mmap'd, not yet in memory) is populated kPopulate bytes at a
// time just before it is written, one madvise for 64 pages instead of 64 page faults: 256 MiB took
// 300 ms to fault in by first touch, 210 ms this way (this 2-core VM; the same 4 KiB pages, zeroed)
constexpr int64_t kPopulate = 1 << 18, kPopulateFrom = 4 << 20;

inline void populate(void* p, int64_t bytes) {
#ifdef MADV_POPULATE_WRITE  // Linux only: elsewhere the pages fault in as they are written
  static const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + page - 1) & ~(page - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + uintptr_t(bytes)) & ~(page - 1);
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_POPULATE_WRITE);  // advice: errors ignored
#endif
}

}  // namespace backprop_cpp
