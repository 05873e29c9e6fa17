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
// Covered: int64 indices of any shape, a float32 or float64 table, padding_idx, scale_grad_by_freq,
// either `deterministic` (both sum in position order on the CPU). Not covered (the eager kernel
// runs): int32 indices, sparse=True, max_norm (the eager kernel refuses it), an out-of-range index.
#include "common.h"

namespace backprop_cpp::embedding {

template <typename T>
void gather(const int64_t* i, int64_t P, const T* W, int64_t E, T* out) {
  for (int64_t p = 0; p < P; ++p) {
    const T* row = W + i[p] * E;
    T* o = out + p * E;
    for (int64_t e = 0; e < E; ++e) o[e] = row[e];
  }
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
  if (weight.scalar_type() == at::kFloat) gather(i, P, weight.data_ptr<float>(), E, out.data_ptr<float>());
  else gather(i, P, weight.data_ptr<double>(), E, out.data_ptr<double>());
  return {out};
}

template <typename T>
void scatter_add(const T* dout, const int64_t* i, int64_t P, int64_t V, int64_t E, std::optional<int64_t> padding_idx,
                 bool scale_grad_by_freq, T* dW) {
  for (int64_t k = 0; k < V * E; ++k) dW[k] = T(0);
  for (int64_t p = 0; p < P; ++p) {  // position order: repeats of a row add up as index_add_ adds them
    T* row = dW + i[p] * E;
    const T* d = dout + p * E;
    for (int64_t e = 0; e < E; ++e) row[e] += d[e];
  }
  if (scale_grad_by_freq) {
    std::vector<int64_t> count(V, 0);
    for (int64_t p = 0; p < P; ++p) ++count[i[p]];
    for (int64_t v = 0; v < V; ++v) {
      if (count[v] <= 1) continue;  // an unseen row (0, clamped to 1) or a single use: divided by 1
      const T c = T(count[v]);  // the eager kernel divides by the count in the table's dtype
      for (int64_t e = 0; e < E; ++e) dW[v * E + e] /= c;
    }
  }
  if (padding_idx)
    for (int64_t e = 0; e < E; ++e) dW[*padding_idx * E + e] = T(0);
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
