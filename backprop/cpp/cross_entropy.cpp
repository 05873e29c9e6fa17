// cross_entropy on class indices: the maths of backprop/cross_entropy.py as loops over rows.
//
//   logits z (N, C), targets y (N,) int64, weight w (C,) or none, eps = label_smoothing
//   m_n = max_c z[n, c]   s_n = log sum_c exp(z[n, c] - m_n)   log p[n, c] = (z[n, c] - m_n) - s_n
//   loss_n = (1 - eps) w_y (m_n - z[n, y] + s_n) + eps/C sum_c w_c (m_n - z[n, c] + s_n)
//   dlogits[n, c] = g_n (p[n, c] S_n - eps/C w_c - (1 - eps) w_y [c == y]),
//   S_n = (1 - eps) w_y + eps/C sum_c w_c;  g_n = dout / total ('mean'), dout ('sum'), dout[n]
//   total = sum_n w_y (N unweighted), nan where it is 0 with weight and eps > 0: torch's 0 / 0
//
// Covered: 2-D logits, every reduction, weight, label_smoothing, no ignored row. Not covered (the
// eager kernel runs): 1-D and K-dim logits, probability targets, uint8 targets, an ignored row.
#include "common.h"

namespace backprop_cpp::cross_entropy {

template <typename T>
Tensors forward(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor* weight,
                int64_t ignore_index, double eps, int64_t reduction) {
  const int64_t N = logits.size(0), C = logits.size(1);
  const T* z = logits.data_ptr<T>();
  const int64_t* y = targets.data_ptr<int64_t>();
  const T* w = weight ? weight->data_ptr<T>() : nullptr;
  for (int64_t n = 0; n < N; ++n)
    if (y[n] < 0 || y[n] >= C || y[n] == ignore_index) return {};  // errors, ignored rows: eager
  double sum_w = C;
  if (w) {
    sum_w = 0;
    for (int64_t c = 0; c < C; ++c) sum_w += w[c];
  }
  auto opts = logits.options();
  at::Tensor shift = at::empty({N, 1}, opts), logsum = at::empty({N, 1}, opts);
  at::Tensor loss = reduction == kNone ? at::empty({N}, opts) : at::empty({}, opts);
  T *m = shift.data_ptr<T>(), *s = logsum.data_ptr<T>(), *out = loss.data_ptr<T>();
  double total = 0, acc = 0;
  std::vector<T> p(C);
  for (int64_t n = 0; n < N; ++n) {
    const T* zn = z + n * C;
    m[n] = row_shift(zn, C);
    exp_shifted(zn, m[n], T(0), p.data(), C);  // exp(z_c - m)
    s[n] = std::log(sum(p.data(), C));
    const double wy = w ? double(w[y[n]]) : 1.0;
    double l = wy * ((double(m[n]) - zn[y[n]]) + s[n]);  // -w_y log p_y = w_y ((m - z_y) + s)
    if (eps > 0) {
      double smooth = 0;  // sum_c w_c (m - z_c)
      for (int64_t c = 0; c < C; ++c) smooth -= (w ? double(w[c]) : 1.0) * (zn[c] - m[n]);
      l = (1 - eps) * l + (eps / C) * (smooth + double(s[n]) * sum_w);
    }
    total += wy;
    if (reduction == kNone) out[n] = T(l);
    else acc += l;
  }
  // torch divides its nll and smoothing terms by the weight total apart: a total of 0 (every target's
  // weight 0) makes the nll term 0 / 0 = nan, where acc / 0 is inf. A nan total, as the eager cache's,
  // gives that nan here and in the backward (every gradient)
  if (w && eps > 0 && reduction == kMean && total == 0) total = std::numeric_limits<double>::quiet_NaN();
  if (reduction == kMean) out[0] = T(acc / total);
  else if (reduction == kSum) out[0] = T(acc);
  if (!w) return {loss, shift, logsum};
  // the weighted 'mean' denominator as the eager cache keeps it: w[y] summed, 0-d
  at::Tensor weight_sum = at::empty({}, opts);
  weight_sum.data_ptr<T>()[0] = T(total);
  return {loss, shift, logsum, weight_sum};
}

Tensors forward_cpu(const at::Tensor& logits, const at::Tensor& targets, const std::optional<at::Tensor>& weight,
                    int64_t ignore_index, double eps, int64_t reduction) {
  const at::Tensor* w = weight && weight->defined() ? &*weight : nullptr;
  if (!raw(logits) || !real(logits) || logits.dim() != 2 || logits.size(1) == 0 || !raw(targets) ||
      targets.scalar_type() != at::kLong || targets.dim() != 1 || targets.size(0) != logits.size(0) ||
      !(eps >= 0 && eps <= 1) || reduction < kMean || reduction > kNone)
    return {};
  if (w && (!raw(*w) || w->scalar_type() != logits.scalar_type() || w->dim() != 1 || w->size(0) != logits.size(1)))
    return {};
  if (logits.scalar_type() == at::kFloat) return forward<float>(logits, targets, w, ignore_index, eps, reduction);
  return forward<double>(logits, targets, w, ignore_index, eps, reduction);
}

template <typename T>
at::Tensor backward(const at::Tensor& dout, const at::Tensor& logits, const at::Tensor& shift,
                    const at::Tensor& logsum, const at::Tensor& targets, const at::Tensor* weight,
                    double total, double eps, int64_t reduction) {
  const int64_t N = logits.size(0), C = logits.size(1);
  const T *z = logits.data_ptr<T>(), *m = shift.data_ptr<T>(), *s = logsum.data_ptr<T>();
  const T *d = dout.data_ptr<T>(), *w = weight ? weight->data_ptr<T>() : nullptr;
  const int64_t* y = targets.data_ptr<int64_t>();
  double sum_w = C;
  if (w) {
    sum_w = 0;
    for (int64_t c = 0; c < C; ++c) sum_w += w[c];
  }
  at::Tensor dlogits = at::empty({N, C}, logits.options());
  T* dz = dlogits.data_ptr<T>();
  // dout / total, rounded once; with 'none' dout has one entry a row, maybe none at all
  const T g_all = reduction == kNone ? T(0) : reduction == kMean ? T(double(d[0]) / total) : d[0];
  for (int64_t n = 0; n < N; ++n) {
    const T* zn = z + n * C;
    T* dn = dz + n * C;
    const double g = reduction == kNone ? double(d[n]) : double(g_all);
    const double wy = w ? double(w[y[n]]) : 1.0;
    const double S = (1 - eps) * wy + (eps / C) * sum_w;
    exp_shifted(zn, m[n], s[n], dn, C);  // softmax p = exp((z - m) - s)
    if (eps == 0) {  // g w_y p: one scale, in T (the loop vectorises)
      const T scale = T(g * S);
      for (int64_t c = 0; c < C; ++c) dn[c] *= scale;
    } else {
      for (int64_t c = 0; c < C; ++c) dn[c] = T(g * (dn[c] * S - (eps / C) * (w ? double(w[c]) : 1.0)));
    }
    // the target entry: p_y - 1 = expm1(log p_y), exact where p_y rounds to 1
    const double logp_y = double((zn[y[n]] - m[n]) - s[n]);
    const double p_y = std::exp(logp_y);
    dn[y[n]] = T(g * ((1 - eps) * wy * std::expm1(logp_y) + (eps / C) * (p_y * sum_w - (w ? double(w[y[n]]) : 1.0))));
  }
  return dlogits;
}

Tensors backward_cpu(const at::Tensor& dout, const at::Tensor& logits, const at::Tensor& shift,
                     const at::Tensor& logsum, const at::Tensor& targets, const std::optional<at::Tensor>& weight,
                     double total, double eps, int64_t reduction) {
  const at::Tensor* w = weight && weight->defined() ? &*weight : nullptr;
  const auto dtype = logits.scalar_type();
  if (!raw(dout) || dout.scalar_type() != dtype || !raw(logits) || !real(logits) || logits.dim() != 2 ||
      !raw(shift) || !raw(logsum) || shift.scalar_type() != dtype || logsum.scalar_type() != dtype ||
      shift.numel() != logits.size(0) || logsum.numel() != logits.size(0) || !raw(targets) ||
      targets.scalar_type() != at::kLong || targets.numel() != logits.size(0) || eps < 0 || eps > 1 ||
      reduction < kMean || reduction > kNone || dout.numel() != (reduction == kNone ? logits.size(0) : 1) || dout.dim() != (reduction == kNone ? 1 : 0))
    return {};
  if (w && (!raw(*w) || w->scalar_type() != dtype || w->numel() != logits.size(1))) return {};
  // the cache's targets are read as indices: range-checked again, as a cache may be built by hand
  if (!in_range(targets.data_ptr<int64_t>(), logits.size(0), logits.size(1))) return {};
  if (dtype == at::kFloat) return {backward<float>(dout, logits, shift, logsum, targets, w, total, eps, reduction)};
  return {backward<double>(dout, logits, shift, logsum, targets, w, total, eps, reduction)};
}

}  // namespace backprop_cpp::cross_entropy

TORCH_LIBRARY_FRAGMENT(backprop_cpp, m) {
  m.def("cross_entropy_forward(Tensor logits, Tensor targets, Tensor? weight, int ignore_index, float eps, "
        "int reduction) -> Tensor[]");
  m.def("cross_entropy_backward(Tensor dout, Tensor logits, Tensor shift, Tensor logsum, Tensor targets, "
        "Tensor? weight, float total, float eps, int reduction) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(backprop_cpp, CompositeImplicitAutograd, m) {
  m.impl("cross_entropy_forward", backprop_cpp::cross_entropy::forward_cpu);
  m.impl("cross_entropy_backward", backprop_cpp::cross_entropy::backward_cpu);
}
