// embedding: the maths of backprop/embedding.py as loops over positions.
//
//   indices i (*) int64, P = numel, every entry in [0, V); weight W (V, E)
//   forward:  out[p, :] = W[i[p], :]                                       (a copy of each row)
//   backward: out is linear in W, so dW[v, :] = sum_{p : i[p] == v} dout[p, :]; repeats add up,
//             in position order (as index_add_ does on the CPU: the same bits as the eager kernel).
//   scale_grad_by_freq: dW[v, :] /= max(count(v), 1), count(v) = #{p : i[p] == v}, torch's rule
//             (it is not the derivative of forward). padding_idx: dW[padding_idx, :] = 0, though
//             forward reads that row like any other.
//
// Large inputs (kGrain elements or more): forward, ranges of positions on torch's threads; backward,
// dW zeroed in ranges of elements, then ranges of its columns (whole cache lines) on torch's threads,
// each thread walking every position in order for its own columns: every element of dW is the same
// sum in the same order at any thread count (at::parallel_for). An output of kFresh bytes or more is
// populated (common.h) a range at a time before it is written: glibc's malloc maps any allocation
// that large afresh (its mmap threshold grows to 32 MiB at most), whose pages would fault in one by
// one; a smaller one is often heap memory reused, already in memory, where populate only walks the
// page table (a tenth of the forward's profile at 8192 x 768 float32, 25 MiB). dW (V, E) at
// V=50257, E=768 float32 is 154 MB: populated, the backward took 86-121 ms, 130-140 ms with its pages
// faulting in as they are zeroed (1 thread, this 2-core VM, busy).
//
// Covered: int64 indices of any shape, a float32 or float64 table, padding_idx, scale_grad_by_freq,
// either `deterministic` (both sum in position order on the CPU). Not covered (the eager kernel
// runs): int32 indices, sparse=True, max_norm (the eager kernel refuses it), an out-of-range index.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#include "common.h"

namespace backprop_cpp::embedding {

constexpr int64_t kGrain = 1 << 16;  // elements a task at least; below, the calling thread alone
constexpr int64_t kFresh = 32 << 20;  // bytes: an output this large is a fresh mmap, populated

template <typename T>
void gather(const int64_t* i, int64_t p0, int64_t p1, const T* W, int64_t E, T* out) {
  if (E == 0) return;  // an empty table's and out's data may be null: no memcpy from or to them
  for (int64_t p = p0; p < p1; ++p) {
    // glibc's memcpy: a large row without reading out's lines first (as index_select's copy)
    std::memcpy(out + p * E, W + i[p] * E, E * sizeof(T));
  }
}

// out's rows: below kGrain elements on the calling thread alone; else ranges of positions on torch's
// threads, an out of kFresh bytes or more populated a batch of rows at a time before they are written
template <typename T>
void gather_all(const int64_t* i, int64_t P, const T* W, int64_t E, T* out) {
  if (P * E < kGrain) return gather(i, 0, P, W, E, out);
  const int64_t row = std::max<int64_t>(E * int64_t(sizeof(T)), 1);
  const int64_t batch = P * row >= kFresh ? std::max<int64_t>(1, kPopulate / row) : P;
  at::parallel_for(0, P, std::max<int64_t>(1, kGrain / std::max<int64_t>(E, 1)), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; p += batch) {
      const int64_t q = std::min(p1, p + batch);
      if (batch < P) populate(out + p * E, (q - p) * row);
      gather(i, p, q, W, E, out);
    }
  });
}

Tensors forward_cpu(const at::Tensor& indices, const at::Tensor& weight, std::optional<int64_t> padding_idx) {
  if (!raw(indices) || indices.scalar_type() != at::kLong || !raw(weight) || !real(weight) || weight.dim() != 2)
    return {};
  const int64_t V = weight.size(0), E = weight.size(1), P = indices.numel();
  if (padding_idx && (*padding_idx < -V || *padding_idx >= V)) return {};  // the eager kernel's ValueError
  const int64_t* i = indices.data_ptr<int64_t>();
  if (!in_range(i, P, V)) return {};
  std::vector<int64_t> shape(indices.sizes().begin(), indices.sizes().end());
  shape.push_back(E);
  at::Tensor out = at::empty(shape, weight.options());
  if (weight.scalar_type() == at::kFloat) gather_all(i, P, weight.data_ptr<float>(), E, out.data_ptr<float>());
  else gather_all(i, P, weight.data_ptr<double>(), E, out.data_ptr<double>());
  return {out};
}

// dW's columns [e0, e1) (dW already 0): every position's dout added in position order, divided by
// the count, the padding row zeroed. A column's values depend on that column alone
template <typename T>
void scatter_cols(const T* dout, const int64_t* i, int64_t P, int64_t V, int64_t E, int64_t e0, int64_t e1,
                  const int64_t* count, std::optional<int64_t> padding_idx, T* dW) {
  for (int64_t p = 0; p < P; ++p) {  // position order: repeats of a row add up as index_add_ adds them
    T* row = dW + i[p] * E;
    const T* d = dout + p * E;
    for (int64_t e = e0; e < e1; ++e) row[e] += d[e];
  }
  if (count)
    for (int64_t v = 0; v < V; ++v) {
      if (count[v] <= 1) continue;  // an unseen row (0, clamped to 1) or a single use: divided by 1
      const T c = T(count[v]);  // the eager kernel divides by the count in the table's dtype
      for (int64_t e = e0; e < e1; ++e) dW[v * E + e] /= c;
    }
  if (padding_idx)
    for (int64_t e = e0; e < e1; ++e) dW[*padding_idx * E + e] = T(0);
}

// dW = 0, then its columns: below kGrain elements on the calling thread alone; else dW zeroed in
// ranges of elements on torch's threads (one of kFresh bytes or more populated kPopulate bytes at a
// time before it is zeroed), then ranges of columns (whole cache lines) on torch's threads
template <typename T>
void scatter_add(const T* dout, const int64_t* i, int64_t P, int64_t V, int64_t E, std::optional<int64_t> padding_idx,
                 bool scale_grad_by_freq, T* dW) {
  std::vector<int64_t> count(scale_grad_by_freq ? V : 0, 0);
  if (scale_grad_by_freq)
    for (int64_t p = 0; p < P; ++p) ++count[i[p]];
  const int64_t* c = scale_grad_by_freq ? count.data() : nullptr;
  const int64_t n = V * E;
  if (n + P * E < kGrain) {
    for (int64_t k = 0; k < n; ++k) dW[k] = T(0);
    return scatter_cols(dout, i, P, V, E, 0, E, c, padding_idx, dW);
  }
  const bool fresh = n * int64_t(sizeof(T)) >= kFresh;
  const int64_t step = kPopulate / int64_t(sizeof(T));
  at::parallel_for(0, n, kGrain, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; k += step) {
      const int64_t j = std::min(k1, k + step);
      if (fresh) populate(dW + k, (j - k) * int64_t(sizeof(T)));
      std::fill(dW + k, dW + j, T(0));
    }
  });
  constexpr int64_t line = 64 / int64_t(sizeof(T));  // columns a cache line
  const int64_t lines = (E + line - 1) / line;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(P * line, 1));  // lines a task
  at::parallel_for(0, lines, grain, [&](int64_t l0, int64_t l1) {
    scatter_cols(dout, i, P, V, E, l0 * line, std::min(E, l1 * line), c, padding_idx, dW);
  });
}

Tensors backward_cpu(const at::Tensor& dout, const at::Tensor& indices, int64_t V, int64_t E,
                     std::optional<int64_t> padding_idx, bool scale_grad_by_freq) {
  if (!raw(dout) || !real(dout) || !raw(indices) || indices.scalar_type() != at::kLong || V < 0 || E < 0 ||
      dout.dim() != indices.dim() + 1 || dout.size(-1) != E || (padding_idx && (*padding_idx < 0 || *padding_idx >= V)))
    return {};
  for (int64_t d = 0; d < indices.dim(); ++d)
    if (dout.size(d) != indices.size(d)) return {};  // dout's shape is (*indices.shape, E)
  const int64_t* i = indices.data_ptr<int64_t>();
  const int64_t P = indices.numel();
  if (!in_range(i, P, V)) return {};  // a cache built by hand: the eager kernel raises
  at::Tensor dweight = at::empty({V, E}, dout.options());
  if (dout.scalar_type() == at::kFloat)
    scatter_add(dout.data_ptr<float>(), i, P, V, E, padding_idx, scale_grad_by_freq, dweight.data_ptr<float>());
  else
    scatter_add(dout.data_ptr<double>(), i, P, V, E, padding_idx, scale_grad_by_freq, dweight.data_ptr<double>());
  return {dweight};
}

}  // namespace backprop_cpp::embedding

TORCH_LIBRARY_FRAGMENT(backprop_cpp, m) {
  m.def("embedding_forward(Tensor indices, Tensor weight, int? padding_idx) -> Tensor[]");
  m.def("embedding_backward(Tensor dout, Tensor indices, int V, int E, int? padding_idx, "
        "bool scale_grad_by_freq) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(backprop_cpp, CompositeImplicitAutograd, m) {
  m.impl("embedding_forward", backprop_cpp::embedding::forward_cpu);
  m.impl("embedding_backward", backprop_cpp::embedding::backward_cpu);
}
