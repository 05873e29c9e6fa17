// batch_norm: the maths of backprop/batch_norm.py as loops over channels.
//
//   x (N, C, L...) read as (N, C, L): the n = N * L values of channel c; d = n - correction
//   training: corrected two-pass mean and variance (accurate at a large offset, x ~ 50 +- 0.01):
//             m1 = sum(x) / n,  xc = x - m1,  m2 = sum(xc) / n (m1's rounding error),
//             S = sum(xc^2) - n m2^2 = sum((x - mu)^2),  mu = m1 + m2,  var = S / d
//   eval:     mu = running_mean,  var = running_var
//   rstd = 1 / sqrt(var + eps),  xhat = (x - mu) rstd,  out = w xhat + b
//   training with running statistics r (returned, never written): lerp(r, stat, m), stat = mu for the
//   mean and S / (n - 1) for the variance (unbiased, whatever correction is, as torch keeps it),
//   m = momentum or, for momentum None, 1 / (num_batches_tracked + 1)
//
//   backward, g = dout:  dbias = sum(g),  dweight = sum(g xhat)
//   training: d var / d x_i = 2 (x_i - mu) / d and d rstd = -rstd^3 d var / 2, so
//             dx = w rstd (g - dbias / n - xhat dweight / d)   (the mean's path, the variance's)
//   eval:     dx = w rstd g   (the statistics are constants)
//
// Sums per channel run in double, the elementwise maths too, rounded once to x's dtype.
// Covered: float32/float64 contiguous CPU x of 2 or more dims with values (n > correction; n > 1
// with running statistics), weight, bias, running statistics, eval, any correction, momentum (or
// None) and eps. Not covered (the eager kernel runs): other dtypes and layouts, empty inputs, every
// bad argument.
#include "common.h"

namespace backprop_cpp::batch_norm {

// kL = 1: x is (N, C) and a channel's values are one per row, C apart (the loops over c then
// vectorise); kL = 0: L = prod(x.shape[2:]), runs of L contiguous values per (row, channel)
template <typename T, int64_t kL>
Tensors forward(const at::Tensor& x, const at::Tensor* weight, const at::Tensor* bias, const at::Tensor* running_mean,
                const at::Tensor* running_var, bool training, double momentum, double eps, int64_t correction) {
  const int64_t N = x.size(0), C = x.size(1), L = kL ? kL : x.numel() / (N * C);
  const double n = double(N * L);
  const T* __restrict__ px = x.data_ptr<T>();
  std::vector<double> buf(6 * C, 0.0);
  double *__restrict__ mu = buf.data(), *__restrict__ r = mu + C, *__restrict__ s = r + C;
  double *__restrict__ q = s + C, *__restrict__ w = q + C, *__restrict__ b = w + C;
  auto opts = x.options();
  at::Tensor out = at::empty(x.sizes(), opts), xhat = at::empty(x.sizes(), opts), rstd = at::empty({C}, opts);
  Tensors result = {out, xhat, rstd};
  if (training) {
    for (int64_t i = 0; i < N; ++i)  // first pass: m1 = sum(x) / n
      for (int64_t c = 0; c < C; ++c) {
        const T* p = px + (i * C + c) * L;
        double acc = p[0];
        for (int64_t l = 1; l < L; ++l) acc += p[l];
        mu[c] += acc;
      }
    for (int64_t c = 0; c < C; ++c) mu[c] /= n;
    for (int64_t i = 0; i < N; ++i)  // second pass, on xc = x - m1: sum(xc) and sum(xc^2)
      for (int64_t c = 0; c < C; ++c) {
        const T* p = px + (i * C + c) * L;
        double acc = 0, acc2 = 0;
        for (int64_t l = 0; l < L; ++l) {
          const double xc = p[l] - mu[c];
          acc += xc;
          acc2 += xc * xc;
        }
        s[c] += acc;
        q[c] += acc2;
      }
    const T *rm = running_mean ? running_mean->data_ptr<T>() : nullptr;
    const T *rv = running_var ? running_var->data_ptr<T>() : nullptr;
    T *new_mean = nullptr, *new_var = nullptr;
    if (rm) {
      result.push_back(at::empty({C}, opts));
      result.push_back(at::empty({C}, opts));
      new_mean = result[3].data_ptr<T>(), new_var = result[4].data_ptr<T>();
    }
    // torch.lerp's formula: the nearer end plus a fraction of the difference
    auto lerp = [momentum](double a, double z) {
      return std::abs(momentum) < 0.5 ? a + momentum * (z - a) : z - (z - a) * (1 - momentum);
    };
    for (int64_t c = 0; c < C; ++c) {
      const double m2 = s[c] / n, S = q[c] - n * m2 * m2;
      mu[c] += m2;
      r[c] = 1 / std::sqrt(S / (n - correction) + eps);
      if (rm) {
        new_mean[c] = T(lerp(rm[c], mu[c]));
        new_var[c] = T(lerp(rv[c], S / (n - 1)));
      }
    }
  } else {
    const T *rm = running_mean->data_ptr<T>(), *rv = running_var->data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      mu[c] = rm[c];
      r[c] = 1 / std::sqrt(double(rv[c]) + eps);
    }
  }
  const T* pw = weight ? weight->data_ptr<T>() : nullptr;
  const T* pb = bias ? bias->data_ptr<T>() : nullptr;
  T* pr = rstd.data_ptr<T>();
  for (int64_t c = 0; c < C; ++c) {
    pr[c] = T(r[c]);
    w[c] = pw ? double(pw[c]) : 1.0;  // w xhat + b with 1 and 0 is xhat exactly
    b[c] = pb ? double(pb[c]) : 0.0;
  }
  T *__restrict__ po = out.data_ptr<T>(), *__restrict__ ph = xhat.data_ptr<T>();
  for (int64_t i = 0; i < N; ++i)  // xhat = (x - mu) rstd, out = w xhat + b
    for (int64_t c = 0; c < C; ++c) {
      const int64_t at = (i * C + c) * L;
      for (int64_t l = 0; l < L; ++l) {
        const double h = (px[at + l] - mu[c]) * r[c];
        ph[at + l] = T(h);
        po[at + l] = T(h * w[c] + b[c]);
      }
    }
  return result;
}

// a (C,) tensor the loops may read as T
inline bool vector_of(const at::Tensor* t, int64_t C, at::ScalarType dtype) {
  return !t || (raw(*t) && t->scalar_type() == dtype && t->dim() == 1 && t->size(0) == C);
}

inline const at::Tensor* given(const std::optional<at::Tensor>& t) { return t && t->defined() ? &*t : nullptr; }

Tensors forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& weight_, const std::optional<at::Tensor>& bias_,
                    const std::optional<at::Tensor>& running_mean_, const std::optional<at::Tensor>& running_var_,
                    bool training, std::optional<double> momentum, double eps, int64_t correction,
                    int64_t num_batches_tracked) {
  const at::Tensor *weight = given(weight_), *bias = given(bias_);
  const at::Tensor *running_mean = given(running_mean_), *running_var = given(running_var_);
  if (!raw(x) || !real(x) || x.dim() < 2 || x.numel() == 0 || !(eps > 0 && std::isfinite(eps)) ||
      (momentum && !std::isfinite(*momentum)) || correction < 0 || num_batches_tracked < 0 ||
      (running_mean == nullptr) != (running_var == nullptr) || (!training && !running_mean))
    return {};
  const int64_t C = x.size(1), n = x.numel() / C;
  const auto dtype = x.scalar_type();
  if (!vector_of(weight, C, dtype) || !vector_of(bias, C, dtype) || !vector_of(running_mean, C, dtype) ||
      !vector_of(running_var, C, dtype))
    return {};
  if (training && (n <= correction || (running_mean && n == 1))) return {};  // the eager kernel's errors
  const double m = momentum ? *momentum : 1.0 / (double(num_batches_tracked) + 1);
  const bool rows = x.dim() == 2;
  if (dtype == at::kFloat)
    return rows ? forward<float, 1>(x, weight, bias, running_mean, running_var, training, m, eps, correction)
                : forward<float, 0>(x, weight, bias, running_mean, running_var, training, m, eps, correction);
  return rows ? forward<double, 1>(x, weight, bias, running_mean, running_var, training, m, eps, correction)
              : forward<double, 0>(x, weight, bias, running_mean, running_var, training, m, eps, correction);
}

template <typename T, int64_t kL>
Tensors backward(const at::Tensor& dout, const at::Tensor& xhat, const at::Tensor& rstd, const at::Tensor* weight,
                 bool has_bias, int64_t correction, bool training) {
  const int64_t N = xhat.size(0), C = xhat.size(1), L = kL ? kL : xhat.numel() / (N * C);
  const double n = double(N * L);
  const T *__restrict__ pg = dout.data_ptr<T>(), *__restrict__ ph = xhat.data_ptr<T>();
  const T *pr = rstd.data_ptr<T>(), *pw = weight ? weight->data_ptr<T>() : nullptr;
  std::vector<double> buf(5 * C, 0.0);
  double *__restrict__ db = buf.data(), *__restrict__ dw = db + C, *__restrict__ k = dw + C;
  double *__restrict__ a = k + C, *__restrict__ v = a + C;
  if (training || weight || has_bias)
    for (int64_t i = 0; i < N; ++i)  // dbias = sum(g), dweight = sum(g xhat)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t at = (i * C + c) * L;
        double acc = pg[at], acc2 = double(pg[at]) * ph[at];
        for (int64_t l = 1; l < L; ++l) {
          acc += pg[at + l];
          acc2 += double(pg[at + l]) * ph[at + l];
        }
        db[c] += acc;
        dw[c] += acc2;
      }
  for (int64_t c = 0; c < C; ++c) k[c] = (pw ? double(pw[c]) : 1.0) * pr[c];  // w rstd
  at::Tensor dx = at::empty(xhat.sizes(), xhat.options());
  T* __restrict__ px = dx.data_ptr<T>();
  if (training) {
    for (int64_t c = 0; c < C; ++c) {
      a[c] = db[c] / n;
      v[c] = dw[c] / (n - correction);
    }
    for (int64_t i = 0; i < N; ++i)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t at = (i * C + c) * L;
        for (int64_t l = 0; l < L; ++l) px[at + l] = T(k[c] * ((pg[at + l] - a[c]) - ph[at + l] * v[c]));
      }
  } else {
    for (int64_t i = 0; i < N; ++i)
      for (int64_t c = 0; c < C; ++c) {
        const int64_t at = (i * C + c) * L;
        for (int64_t l = 0; l < L; ++l) px[at + l] = T(k[c] * pg[at + l]);
      }
  }
  at::Tensor dweight, dbias;  // undefined: None in Python
  if (weight) {
    dweight = at::empty({C}, xhat.options());
    T* p = dweight.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) p[c] = T(dw[c]);
  }
  if (has_bias) {
    dbias = at::empty({C}, xhat.options());
    T* p = dbias.data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) p[c] = T(db[c]);
  }
  return {dx, dweight, dbias};
}

Tensors backward_cpu(const at::Tensor& dout, const at::Tensor& xhat, const at::Tensor& rstd,
                     const std::optional<at::Tensor>& weight_, bool has_bias, int64_t correction, bool training) {
  const at::Tensor* weight = given(weight_);
  if (!raw(xhat) || !real(xhat) || xhat.dim() < 2 || xhat.numel() == 0 || !raw(dout) ||
      dout.scalar_type() != xhat.scalar_type() || dout.sizes() != xhat.sizes() || correction < 0)
    return {};
  const int64_t C = xhat.size(1), n = xhat.numel() / C;
  const auto dtype = xhat.scalar_type();
  if (!vector_of(&rstd, C, dtype) || !vector_of(weight, C, dtype) || (training && n <= correction)) return {};
  const bool rows = xhat.dim() == 2;
  if (dtype == at::kFloat)
    return rows ? backward<float, 1>(dout, xhat, rstd, weight, has_bias, correction, training)
                : backward<float, 0>(dout, xhat, rstd, weight, has_bias, correction, training);
  return rows ? backward<double, 1>(dout, xhat, rstd, weight, has_bias, correction, training)
              : backward<double, 0>(dout, xhat, rstd, weight, has_bias, correction, training);
}

}  // namespace backprop_cpp::batch_norm

TORCH_LIBRARY_FRAGMENT(backprop_cpp, m) {
  m.def("batch_norm_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
        "bool training, float? momentum, float eps, int correction, int num_batches_tracked) -> Tensor[]");
  m.def("batch_norm_backward(Tensor dout, Tensor xhat, Tensor rstd, Tensor? weight, bool has_bias, int correction, "
        "bool training) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(backprop_cpp, CompositeImplicitAutograd, m) {
  m.impl("batch_norm_forward", backprop_cpp::batch_norm::forward_cpu);
  m.impl("batch_norm_backward", backprop_cpp::batch_norm::backward_cpu);
}
