// linear_cross_entropy: the maths of backprop/linear_cross_entropy.py in one call: the forward, and
// the backward of reduction 'none' (a scalar loss's backward scales the cached gradients: the eager
// kernel's three muls, in Python, cheaper than a call into C++: linear_cross_entropy.py).
//
//   x (N, D), W (V, D), b (V,) or none, targets y (N,) int64, class weights w (V,) or none,
//   eps = label_smoothing.  Rows in chunks of c: z = x[chunk] W^T + b (at::mm / at::addmm into one
//   (c, V) buffer), then row by row m = max z, s = log sum exp(z - m), log p = (z - m) - s:
//   loss_n = (1 - eps) w_y (-log p_y) + eps/V sum_c w_c (-log p_c)
//   dz[n, c] = g_n (a_n p_c - eps/V w_c), the target entry g_n ((1 - eps) w_y expm1(log p_y)
//              + eps/V (S p_y - w_y)),  a_n = (1 - eps) w_y + eps/V S,  S = sum_c w_c (V unweighted)
//   g_n = 1 / sum_n w_{y_n} ('mean'; nan where that sum is 0 with eps > 0, torch's 0 / 0), 1 ('sum'):
//   the gradients at dloss = 1, computed by the forward;
//   g_n = dout[n] ('none'): in the backward, which recomputes the chunk's logits
//   dx[chunk] = dz W,  dW += dz^T x[chunk],  db += sum_rows dz   (dz written over the chunk's logits;
//   dW in x's dtype, its own opmath; db and the loss's sum in double, rounded once)
//
// The matmuls are ATen's (BLAS at every size); the row loops are written for the notebook's V.
// Covered: 2-D float32/float64 contiguous CPU x and W, bias, class weights, every reduction,
// label_smoothing, chunk_size, no ignored row (every target in [0, V), none equal to ignore_index).
// Not covered (the eager kernel runs, and raises the errors): other dtypes, layouts and devices,
// N = 0, an ignored row, an out-of-range target, a bad argument.
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>

#include "common.h"

namespace backprop_cpp::linear_cross_entropy {

constexpr int64_t kChunkElements = int64_t(1) << 23;  // the eager CHUNK_ELEMENTS

struct Problem {
  at::Tensor x, W, y;
  const at::Tensor *b, *w;  // bias and class weights, or nullptr
  double eps;
  int64_t chunk;
};

// the tensors a kernel reads: contiguous CPU, x's dtype (float32/float64), shapes that agree, targets
// in [0, V) and none equal to ignore_index
bool covered(const at::Tensor& x, const at::Tensor& W, const at::Tensor& y, const at::Tensor* b,
             const at::Tensor* w, int64_t ignore_index, double eps, int64_t chunk) {
  if (!raw(x) || !real(x) || x.dim() != 2 || x.size(0) == 0 || !raw(W) || W.scalar_type() != x.scalar_type() ||
      W.dim() != 2 || W.size(0) == 0 || W.size(1) != x.size(1) || !raw(y) || y.scalar_type() != at::kLong ||
      y.dim() != 1 || y.size(0) != x.size(0) || !(eps >= 0 && eps <= 1) || chunk < 1)
    return false;
  for (const at::Tensor* t : {b, w})
    if (t && (!raw(*t) || t->scalar_type() != x.scalar_type() || t->dim() != 1 || t->size(0) != W.size(0)))
      return false;
  const int64_t* i = y.data_ptr<int64_t>();
  for (int64_t n = 0; n < y.size(0); ++n)
    if (i[n] == ignore_index) return false;  // an ignored row: eager
  return in_range(i, y.size(0), W.size(0));
}

// the chunks' logits and their row maths: loss (N,) rows, or nullptr; with dx defined (else the loss
// rows only: the 'none' forward) dz = g (a p - q), g_n = g[n] (g given) or g_all, is written over the
// logits and consumed by the gradient matmuls into dx (N, D), dW (V, D) and db (V,) (nullptr: no bias)
template <typename T>
void chunks(const Problem& P, const T* g, double g_all, T* loss, at::Tensor dx, at::Tensor dW, double* db) {
  const int64_t N = P.x.size(0), V = P.W.size(0);
  const int64_t c_max = std::min(P.chunk, N);
  const int64_t* y = P.y.data_ptr<int64_t>();
  const T* w = P.w ? P.w->data_ptr<T>() : nullptr;
  double S = V;  // sum_c w_c
  if (w) {
    S = 0;
    for (int64_t c = 0; c < V; ++c) S += w[c];
  }
  const double ev = P.eps / V;
  at::Tensor buffer = at::empty({c_max, V}, P.x.options());
  std::vector<T> p(V);
  const at::Tensor Wt = P.W.t();
  for (int64_t i = 0; i < N; i += c_max) {
    const int64_t c = std::min(c_max, N - i);
    at::Tensor z = c == c_max ? buffer : buffer.narrow(0, 0, c);
    const at::Tensor xc = c == N ? P.x : P.x.narrow(0, i, c);
    if (P.b) at::addmm_out(z, *P.b, xc, Wt);
    else at::mm_out(z, xc, Wt);
    T* zr = z.data_ptr<T>();
    for (int64_t r = 0; r < c; ++r) {
      const int64_t n = i + r, t = y[n];
      T* zn = zr + r * V;
      const T m = row_shift(zn, V);
      exp_shifted(zn, m, T(0), p.data(), V);
      const T s = std::log(sum(p.data(), V));
      const T logp_y = (zn[t] - m) - s;
      const double wy = w ? double(w[t]) : 1.0;
      if (loss) {
        double l = -wy * double(logp_y);
        if (P.eps > 0) {  // the sum only when smoothing: at eps = 0 a -inf logit would make 0 * inf = nan
          double smooth = 0;  // sum_c w_c log p_c
          for (int64_t k = 0; k < V; ++k) smooth += (w ? double(w[k]) : 1.0) * double((zn[k] - m) - s);
          l = (1 - P.eps) * l - ev * smooth;
        }
        loss[n] = T(l);
      }
      if (!dx.defined()) continue;  // the 'none' forward: the loss rows only
      const double gn = g ? double(g[n]) : g_all;
      const double a = P.eps > 0 ? (1 - P.eps) * wy + ev * S : wy;
      exp_shifted(zn, m, s, zn, V);  // p, in place: each entry read before it is written
      const T ga = T(gn * a);
      if (P.eps > 0) {
        const T ge = T(gn * ev);
        for (int64_t k = 0; k < V; ++k) zn[k] = zn[k] * ga - ge * (w ? w[k] : T(1));
      } else {
        for (int64_t k = 0; k < V; ++k) zn[k] *= ga;
      }
      // the target entry without the O(1) cancellation of a p_y - (1 - eps) w_y: p_y - 1 = expm1(log p_y)
      double target = (1 - P.eps) * wy * std::expm1(double(logp_y));
      if (P.eps > 0) target += ev * (S * std::exp(double(logp_y)) - wy);
      zn[t] = T(gn * target);
      if (db)
        for (int64_t k = 0; k < V; ++k) db[k] += zn[k];
    }
    if (!dx.defined()) continue;
    at::Tensor dxc = c == N ? dx : dx.narrow(0, i, c);
    at::mm_out(dxc, z, P.W);
    if (i == 0) at::mm_out(dW, z.t(), xc);  // the first chunk writes dW: nothing zero-filled
    else dW.addmm_(z.t(), xc);
  }
}

// dx, dW (and db with a bias) through the chunks: g per row (dout, 'none') or g_all for every row
template <typename T>
Tensors gradients(const Problem& P, const T* g, double g_all, T* loss) {
  const int64_t N = P.x.size(0), D = P.x.size(1), V = P.W.size(0);
  at::Tensor dx = at::empty({N, D}, P.x.options()), dW = at::empty({V, D}, P.x.options());
  std::vector<double> db(P.b ? V : 0, 0.0);  // summed over every chunk's rows in double, rounded once
  chunks<T>(P, g, g_all, loss, dx, dW, P.b ? db.data() : nullptr);
  if (!P.b) return {dx, dW};
  at::Tensor dbias = at::empty({V}, P.x.options());
  T* d = dbias.data_ptr<T>();
  for (int64_t k = 0; k < V; ++k) d[k] = T(db[k]);
  return {dx, dW, dbias};
}

template <typename T>
Tensors forward(const Problem& P, int64_t reduction) {
  const int64_t N = P.x.size(0);
  at::Tensor rows = at::empty({N}, P.x.options());
  T* r = rows.data_ptr<T>();
  if (reduction == kNone) {
    chunks<T>(P, nullptr, 0.0, r, at::Tensor(), at::Tensor(), nullptr);
    return {rows};
  }
  double denom = reduction == kSum ? 1.0 : double(N);  // 'mean': sum_n w_{y_n}
  if (reduction == kMean && P.w) {
    const T* w = P.w->data_ptr<T>();
    const int64_t* y = P.y.data_ptr<int64_t>();
    denom = 0;
    for (int64_t n = 0; n < N; ++n) denom += w[y[n]];
    // torch divides its nll and smoothing terms by the weight total apart: a total of 0 makes the nll
    // term 0 / 0 = nan, where the sum over 0 is inf; a nan denominator, as the eager _denominator's,
    // makes the loss and every gradient nan
    if (P.eps > 0 && denom == 0) denom = std::numeric_limits<double>::quiet_NaN();
  }
  Tensors out = gradients<T>(P, nullptr, 1.0 / denom, r);
  double total = 0;
  for (int64_t n = 0; n < N; ++n) total += r[n];
  at::Tensor loss = at::empty({}, P.x.options());
  loss.data_ptr<T>()[0] = T(total / denom);
  out.insert(out.begin(), loss);
  return out;
}

const at::Tensor* given(const std::optional<at::Tensor>& t) { return t && t->defined() ? &*t : nullptr; }

Tensors forward_cpu(const at::Tensor& x, const at::Tensor& W, const at::Tensor& y, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& weight, int64_t ignore_index, double eps, int64_t reduction,
                    int64_t chunk) {
  const at::Tensor *b = given(bias), *w = given(weight);
  if (chunk == -1 && raw(W) && W.dim() == 2 && W.size(0) > 0) chunk = std::max<int64_t>(1, kChunkElements / W.size(0));
  if (reduction < kMean || reduction > kNone || !covered(x, W, y, b, w, ignore_index, eps, chunk)) return {};
  at::NoGradGuard no_grad;  // the ATen matmuls record no autograd history
  const Problem P{x, W, y, b, w, eps, chunk};
  return x.scalar_type() == at::kFloat ? forward<float>(P, reduction) : forward<double>(P, reduction);
}

// 'none' only (a scalar loss's backward scales the cached gradients: three muls, in Python): the chunks
// again, with g = dout
Tensors backward_cpu(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& W, const at::Tensor& y,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& weight, double eps,
                     int64_t chunk) {
  const at::Tensor *b = given(bias), *w = given(weight);
  // the cache's targets are read as indices: range-checked again (a cache may be built by hand)
  if (!raw(dout) || dout.scalar_type() != x.scalar_type() || !covered(x, W, y, b, w, std::numeric_limits<int64_t>::min(), eps, chunk))
    return {};
  if (dout.dim() != 1 || dout.size(0) != x.size(0)) return {};
  at::NoGradGuard no_grad;
  const Problem P{x, W, y, b, w, eps, chunk};
  if (x.scalar_type() == at::kFloat) return gradients<float>(P, dout.data_ptr<float>(), 0.0, nullptr);
  return gradients<double>(P, dout.data_ptr<double>(), 0.0, nullptr);
}

}  // namespace backprop_cpp::linear_cross_entropy

TORCH_LIBRARY_FRAGMENT(backprop_cpp, m) {
  m.def("linear_cross_entropy_forward(Tensor x, Tensor linear_weight, Tensor targets, Tensor? linear_bias, "
        "Tensor? weight, int ignore_index, float eps, int reduction, int chunk) -> Tensor[]");
  m.def("linear_cross_entropy_backward(Tensor dout, Tensor x, Tensor linear_weight, Tensor targets, "
        "Tensor? linear_bias, Tensor? weight, float eps, int chunk) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(backprop_cpp, CompositeImplicitAutograd, m) {
  m.impl("linear_cross_entropy_forward", backprop_cpp::linear_cross_entropy::forward_cpu);
  m.impl("linear_cross_entropy_backward", backprop_cpp::linear_cross_entropy::backward_cpu);
}
