// batch_norm: the maths of backprop/batch_norm.py as loops over channels.
//
//   x (N, C, L...) read as (N, C, L): the n = N * L values of channel c; d = n - correction
//   training: shifted sums, K = the channel's first value (accurate at a large offset, x ~ 50 +- 0.01):
//             s1 = sum(x - K),  s2 = sum((x - K)^2),  mu = K + s1 / n,
//             S = s2 - s1^2 / n = sum((x - mu)^2),  var = S / d
//             (s2 = S + n (mu - K)^2 and (mu - K)^2 <= S, K being one of the values: the subtraction
//             cancels at most a factor n + 1, log2(n + 1) of double's 53 bits: enough for float32;
//             float64 sums a second time with K = that mu, the eager kernel's corrected two-pass)
//   eval:     mu = running_mean,  var = running_var
//   rstd = 1 / sqrt(var + eps),  xhat = (x - mu) rstd,  out = w xhat + b
//   training with running statistics r (returned, never written): torch's m stat + (1 - m) r, stat = mu
//   for the mean and S / (n - 1) for the variance (unbiased, whatever correction is, as torch keeps it),
//   m = momentum or, for momentum None, 1 / (num_batches_tracked + 1), rounded to T as torch rounds it
//
//   backward, g = dout, xhat recomputed:  dbias = sum(g),  dweight = sum(g xhat)
//   training: d var / d x_i = 2 (x_i - mu) / d and d rstd = -rstd^3 d var / 2, so
//             dx = w rstd (g - dbias / n - xhat dweight / d)   (the mean's path, the variance's)
//   eval:     dx = w rstd g   (the statistics are constants)
//
// The sums per channel run in double. The elementwise maths runs in x's dtype, as the eager kernel's,
// from per-channel coefficients rounded once: mu = hi + lo (hi = mu rounded, lo the rest),
// xhat = ((x - hi) - lo) rstd (x - hi exact near the mean), out = xhat w + b; dx = k (g - (a + xhat v))
// with k = w rstd, a = dbias / n, v = dweight / d.
// xhat is recomputed in the backward with the forward's operations (the same bits), as torch's kernel
// does: the forward writes out alone (3 n values moved, not 4 n) and nothing of x's size is kept.
// Two layouts, each a pass for the sums and a pass for the elementwise maths, on torch's threads
// (at::parallel_for), split so that the results are the same at any thread count:
//   planes (L > 1): threads split the channels; a channel's sums, then its elementwise pass while its
//     N runs of L values are still in cache; a run is summed across the vector unit's lanes
//   rows (N, C): a channel's values are C apart, so the loops go row by row, over c (they vectorise),
//     kRows rows at a time; threads split the rows in blocks of about kBlock values, a fixed split
//     whatever the thread count, each block summed into its own partial sums, added in block order
// Covered: float32/float64 contiguous CPU x of 2 or more dims with values (n > correction; n > 1
// with running statistics), weight, bias, running statistics, eval, any correction, momentum (or
// None) and eps. Not covered (the eager kernel runs): other dtypes and layouts, empty inputs, every
// bad argument.
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "common.h"

namespace backprop_cpp::batch_norm {

constexpr int64_t kRows = 4, kBlock = 1 << 18, kMaxBlocks = 64;

// xhat in T, the forward's and the backward's: ((x - hi) - lo) r (x - hi exact near the mean)
template <typename T>
inline T normal(T x, T hi, T lo, T r) { return ((x - hi) - lo) * r; }

// db += sum(g), dw += sum(g xhat) over a run of L values, xhat from x (the backward's sums of a plane)
template <typename T>
inline void run_sums(const T* __restrict__ g, const T* __restrict__ x, T hi, T lo, T r, int64_t L, double& db,
                     double& dw) {
  double p = 0, q = 0;
#pragma omp simd reduction(+ : p, q)
  for (int64_t l = 0; l < L; ++l) {
    const double d = g[l];
    p += d;
    q += d * double(normal(x[l], hi, lo, r));
  }
  db += p, dw += q;
}

// s1 += sum(a(l)), s2 += sum(a(l) b(l)) over a run of L values, the sums split across the vector
// unit's lanes (omp simd: g++ vectorises the reduction, lanes added at the end)
template <typename A, typename B>
inline void run_sums(const A& a, const B& b, int64_t L, double& s1, double& s2) {
  double p = 0, q = 0;
#pragma omp simd reduction(+ : p, q)
  for (int64_t l = 0; l < L; ++l) {
    const double d = a(l);
    p += d;
    q += d * b(l);
  }
  s1 += p, s2 += q;
}

// s1[c] += a(i, c), s2[c] += a(i, c) b(i, c) for each channel c of R rows i (C apart), a channel's
// running sums kept in registers across the R rows (read and written once, not R times)
template <int64_t R, typename A, typename B>
inline void row_sums(const A& a, const B& b, int64_t C, double* __restrict__ s1, double* __restrict__ s2) {
  for (int64_t c = 0; c < C; ++c) {
    double p = s1[c], q = s2[c];
    for (int64_t i = 0; i < R; ++i) {
      const double d = a(i, c);
      p += d;
      q += d * b(i, c);
    }
    s1[c] = p, s2[c] = q;
  }
}

// one row of the forward's elementwise pass: h = ((x - hi) - lo) r, o = h w + b, per channel c
template <typename T>
inline void normalise_row(const T* __restrict__ x, const T* __restrict__ hi, const T* __restrict__ lo,
                          const T* __restrict__ r, const T* __restrict__ w, const T* __restrict__ b, int64_t C,
                          T* __restrict__ o) {
  for (int64_t c = 0; c < C; ++c) o[c] = normal(x[c], hi[c], lo[c], r[c]) * w[c] + b[c];
}

// one row of the backward's: dx = k (g - (a + xhat v)) (training), k g (eval), per channel c
template <typename T>
inline void dx_row(const T* __restrict__ g, const T* __restrict__ x, const T* __restrict__ hi, const T* __restrict__ lo,
                   const T* __restrict__ r, const T* __restrict__ k, const T* __restrict__ a, const T* __restrict__ v,
                   int64_t C, bool training, T* __restrict__ dx) {
  if (training)
    for (int64_t c = 0; c < C; ++c) dx[c] = k[c] * (g[c] - (a[c] + normal(x[c], hi[c], lo[c], r[c]) * v[c]));
  else
    for (int64_t c = 0; c < C; ++c) dx[c] = k[c] * g[c];
}

// (N, C): per-channel s1, s2 over all rows, rows(R, i, p1, p2) adding rows [i, i + R) into partial
// sums p1, p2, one set per block of B rows (one task each), added in block order; at most kMaxBlocks
// blocks, so that the partial sums stay small beside x when C is large (one row a block would hold 4x
// a float32 x)
template <typename F>
void column_sums(const F& rows, int64_t N, int64_t C, double* s1, double* s2) {
  const int64_t B = std::max({int64_t(1), kBlock / C, (N + kMaxBlocks - 1) / kMaxBlocks}), blocks = (N + B - 1) / B;
  std::vector<double> part(2 * blocks * C, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      double *p1 = &part[2 * blk * C], *p2 = p1 + C;
      int64_t i = blk * B;
      for (const int64_t end = std::min(N, (blk + 1) * B); i + kRows <= end; i += kRows)
        rows(std::integral_constant<int64_t, kRows>(), i, p1, p2);
      for (; i < std::min(N, (blk + 1) * B); ++i) rows(std::integral_constant<int64_t, 1>(), i, p1, p2);
    }
  });
  for (int64_t blk = 0; blk < blocks; ++blk)
    for (int64_t c = 0; c < C; ++c) s1[c] += part[2 * blk * C + c], s2[c] += part[(2 * blk + 1) * C + c];
}

// f(i0, i1) over the rows [i0, i1) of (N, C), threads taking blocks of rows as column_sums does
template <typename F>
void over_rows(int64_t N, int64_t C, const F& f) {
  const int64_t B = std::max<int64_t>(1, kBlock / C);
  at::parallel_for(0, (N + B - 1) / B, 1, [&](int64_t b0, int64_t b1) { f(b0 * B, std::min(N, b1 * B)); });
}

// f(c0, c1) over the channels [c0, c1), at least kBlock / n channels a task (small x: one task)
template <typename F>
void over_channels(int64_t C, int64_t n, const F& f) {
  at::parallel_for(0, C, std::max<int64_t>(1, kBlock / n), f);
}

// kL = 1: x is (N, C), rows; kL = 0: L = prod(x.shape[2:]), planes
template <typename T, int64_t kL>
Tensors forward(const at::Tensor& x, const at::Tensor* weight, const at::Tensor* bias, const at::Tensor* running_mean,
                const at::Tensor* running_var, bool training, double momentum, double eps, int64_t correction) {
  const int64_t N = x.size(0), C = x.size(1), L = kL ? kL : x.numel() / (N * C);
  const double n = double(N * L);
  const T* __restrict__ px = x.data_ptr<T>();
  std::vector<double> sums(3 * C, 0.0);
  double *__restrict__ s1 = sums.data(), *__restrict__ s2 = s1 + C, *__restrict__ K = s2 + C;
  std::vector<T> coefs(2 * C);  // w, b
  T *__restrict__ w = coefs.data(), *__restrict__ b = w + C;
  auto opts = x.options();
  // mu = hi + lo (hi = mu rounded to T, lo the rest, rounded)
  at::Tensor out = at::empty(x.sizes(), opts), mean = at::empty({C}, opts), rest = at::empty({C}, opts),
             rstd = at::empty({C}, opts);
  Tensors result = {out, mean, rest, rstd};
  T *__restrict__ hi = mean.data_ptr<T>(), *__restrict__ lo = rest.data_ptr<T>();
  const T *rm = running_mean ? running_mean->data_ptr<T>() : nullptr;
  const T *rv = running_var ? running_var->data_ptr<T>() : nullptr;
  T *new_mean = nullptr, *new_var = nullptr, *__restrict__ r = rstd.data_ptr<T>();
  if (training && rm) {
    result.insert(result.end(), {at::empty({C}, opts), at::empty({C}, opts)});
    new_mean = result[4].data_ptr<T>(), new_var = result[5].data_ptr<T>();
  }
  // torch's formula, m stat + (1 - m) r, with m rounded to T as torch's kernel rounds it (m = 1 - 1e-9
  // is 1 in float32, 1 - m then 0): an infinite r stays infinite, or is nan where torch's is (0 * inf);
  // torch.lerp's r + m (stat - r), its branch for |m| < 0.5, gave nan (inf - inf)
  // keep = 1 - m in double: torch rounds it to T as well (for float32 below 1 ulp of r; the eager kernel
  // keeps it unrounded too)
  const double m = double(T(momentum)), keep = 1 - m;
  auto update = [m, keep](double r, double stat) { return m * stat + keep * r; };
  // channel c's mu and rstd: from its sums (training) or the running statistics (eval)
  auto settle = [&](int64_t c) {
    double mu = rm ? rm[c] : 0, var = rv ? rv[c] : 0;
    if (training) {
      const double S = std::max(0.0, s2[c] - s1[c] * s1[c] / n);  // >= 0 (it may round below)
      mu = K[c] + s1[c] / n, var = S / (n - correction);
      if (rm) {
        new_mean[c] = T(update(rm[c], mu));
        new_var[c] = T(update(rv[c], S / (n - 1)));
      }
    }
    hi[c] = T(mu), lo[c] = T(mu - hi[c]), r[c] = T(1 / std::sqrt(var + eps));
  };
  const T *pw = weight ? weight->data_ptr<T>() : nullptr, *pb = bias ? bias->data_ptr<T>() : nullptr;
  for (int64_t c = 0; c < C; ++c) {
    K[c] = px[c * L];  // the first value of channel c, in row 0
    w[c] = pw ? pw[c] : T(1);  // w xhat + b with 1 and 0 is xhat exactly
    b[c] = pb ? pb[c] : T(0);
  }
  // float64: the sums again about the first pass's mean (the corrected two-pass of the eager kernel):
  // K = the first value can cancel log2(n + 1) bits, which float32's output never sees and float64's
  // would (measured: rstd 2e-9 off at n = 1M with a first value 3e3 from the mean)
  constexpr bool refine = std::is_same_v<T, double>;
  auto recentre = [&](int64_t c) { K[c] += s1[c] / n, s1[c] = 0, s2[c] = 0; };
  // in T, as the eager kernel: xhat = ((x - hi) - lo) rstd (x - hi exact near the mean), out = w xhat + b
  T* __restrict__ po = out.data_ptr<T>();
  auto shifted = [&](auto R, int64_t i, double* p1, double* p2) {  // rows [i, i + R): x - K, (x - K)^2
    const T* u = px + i * C;
    auto d = [&](int64_t j, int64_t c) { return u[j * C + c] - K[c]; };
    row_sums<decltype(R)::value>(d, d, C, p1, p2);
  };
  if (kL == 1) {
    if (training) column_sums(shifted, N, C, s1, s2);
    if (training && refine) {
      for (int64_t c = 0; c < C; ++c) recentre(c);
      column_sums(shifted, N, C, s1, s2);
    }
    for (int64_t c = 0; c < C; ++c) settle(c);
    over_rows(N, C, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0 * C; i < i1 * C; i += C) normalise_row(px + i, hi, lo, r, w, b, C, po + i);
    });
  } else {
    over_channels(C, N * L, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        for (int pass = 0; training && pass < (refine ? 2 : 1); ++pass) {
          if (pass) recentre(c);
          for (int64_t i = 0; i < N; ++i) {
            const T* p = px + (i * C + c) * L;
            const double k = K[c];
            auto d = [&](int64_t l) { return p[l] - k; };
            run_sums(d, d, L, s1[c], s2[c]);
          }
        }
        settle(c);
        const T m1 = hi[c], m2 = lo[c], s = r[c], wc = w[c], bc = b[c];
        for (int64_t i = (c * L); i < N * C * L; i += C * L)  // channel c's runs, still in cache
          for (int64_t l = i; l < i + L; ++l) po[l] = normal(px[l], m1, m2, s) * wc + bc;
      }
    });
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
Tensors backward(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& mean, const at::Tensor* rest,
                 const at::Tensor& rstd, const at::Tensor* weight, bool has_bias, int64_t correction, bool training) {
  const int64_t N = x.size(0), C = x.size(1), L = kL ? kL : x.numel() / (N * C);
  const double n = double(N * L);
  const T *__restrict__ pg = dout.data_ptr<T>(), *__restrict__ px = x.data_ptr<T>();
  const T *hi = mean.data_ptr<T>(), *pr = rstd.data_ptr<T>(), *pw = weight ? weight->data_ptr<T>() : nullptr;
  std::vector<double> sums(2 * C, 0.0);
  double *__restrict__ db = sums.data(), *__restrict__ dw = db + C;
  std::vector<T> coefs(4 * C, T(0));  // lo (0 without mean_rest), k, a, v
  T *__restrict__ lo = coefs.data(), *__restrict__ k = lo + C, *__restrict__ a = k + C, *__restrict__ v = a + C;
  if (rest) std::copy_n(rest->data_ptr<T>(), C, lo);
  const bool sum = training || weight || has_bias;
  // channel c's coefficients, from its sums: dx = k (g - (a + xhat v)) in T, as the eager kernel
  // (training); k g (eval)
  auto settle = [&](int64_t c) {
    k[c] = T((pw ? double(pw[c]) : 1.0) * pr[c]);  // w rstd
    a[c] = T(db[c] / n);
    v[c] = T(dw[c] / (n - correction));
  };
  at::Tensor dx = at::empty(x.sizes(), x.options());
  T* __restrict__ pd = dx.data_ptr<T>();
  if (kL == 1) {
    // dbias = sum(g), dweight = sum(g xhat) over rows [i, i + R)
    auto grads = [&](auto R, int64_t i, double* p1, double* p2) {
      const T *g = pg + i * C, *u = px + i * C;
      auto h = [&](int64_t j, int64_t c) { return double(normal(u[j * C + c], hi[c], lo[c], pr[c])); };
      row_sums<decltype(R)::value>([&](int64_t j, int64_t c) { return double(g[j * C + c]); }, h, C, p1, p2);
    };
    if (sum) column_sums(grads, N, C, db, dw);
    for (int64_t c = 0; c < C; ++c) settle(c);
    over_rows(N, C, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0 * C; i < i1 * C; i += C) dx_row(pg + i, px + i, hi, lo, pr, k, a, v, C, training, pd + i);
    });
  } else {
    over_channels(C, N * L, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const T m1 = hi[c], m2 = lo[c], s = pr[c];
        for (int64_t i = c * L; sum && i < N * C * L; i += C * L)
          run_sums(pg + i, px + i, m1, m2, s, L, db[c], dw[c]);
        settle(c);
        const T kc = k[c], ac = a[c], vc = v[c];
        for (int64_t i = c * L; i < N * C * L; i += C * L)  // channel c's runs, still in cache
          if (training)
            for (int64_t l = i; l < i + L; ++l) pd[l] = kc * (pg[l] - (ac + normal(px[l], m1, m2, s) * vc));
          else
            for (int64_t l = i; l < i + L; ++l) pd[l] = kc * pg[l];
      }
    });
  }
  auto rounded = [&](const double* s) {  // (C,) in T
    at::Tensor t = at::empty({C}, x.options());
    std::copy_n(s, C, t.data_ptr<T>());
    return t;
  };
  return {dx, weight ? rounded(dw) : at::Tensor(), has_bias ? rounded(db) : at::Tensor()};  // undefined: None
}

Tensors backward_cpu(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& mean,
                     const std::optional<at::Tensor>& mean_rest_, const at::Tensor& rstd,
                     const std::optional<at::Tensor>& weight_, bool has_bias, int64_t correction, bool training) {
  const at::Tensor *weight = given(weight_), *rest = given(mean_rest_);
  if (!raw(x) || !real(x) || x.dim() < 2 || x.numel() == 0 || !raw(dout) || dout.scalar_type() != x.scalar_type() ||
      dout.sizes() != x.sizes() || correction < 0)
    return {};
  const int64_t C = x.size(1), n = x.numel() / C;
  const auto dtype = x.scalar_type();
  if (!vector_of(&mean, C, dtype) || !vector_of(rest, C, dtype) || !vector_of(&rstd, C, dtype) ||
      !vector_of(weight, C, dtype) || (training && n <= correction))
    return {};
  const bool rows = x.dim() == 2;
  if (dtype == at::kFloat)
    return rows ? backward<float, 1>(dout, x, mean, rest, rstd, weight, has_bias, correction, training)
                : backward<float, 0>(dout, x, mean, rest, rstd, weight, has_bias, correction, training);
  return rows ? backward<double, 1>(dout, x, mean, rest, rstd, weight, has_bias, correction, training)
              : backward<double, 0>(dout, x, mean, rest, rstd, weight, has_bias, correction, training);
}

}  // namespace backprop_cpp::batch_norm

TORCH_LIBRARY_FRAGMENT(backprop_cpp, m) {
  m.def("batch_norm_forward(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
        "bool training, float? momentum, float eps, int correction, int num_batches_tracked) -> Tensor[]");
  m.def("batch_norm_backward(Tensor dout, Tensor x, Tensor mean, Tensor? mean_rest, Tensor rstd, Tensor? weight, "
        "bool has_bias, int correction, bool training) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(backprop_cpp, CompositeImplicitAutograd, m) {
  m.impl("batch_norm_forward", backprop_cpp::batch_norm::forward_cpu);
  m.impl("batch_norm_backward", backprop_cpp::batch_norm::backward_cpu);
}
