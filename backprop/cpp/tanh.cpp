// tanh: the maths of backprop/tanh.py as one pass over the elements.
//
//   forward:  y = tanh(x)                       ATen's vector tanh (Sleef, 1 ulp), correctly rounded
//                                               in the bands where it is not (tanh_vec)
//   backward: dx = (1 - y)(1 + y) dout          factored as the eager kernel: 1 - y is exact near
//                                               |y| = 1, where 1 - y*y cancels the rounded y*y
//
// Large inputs (kGrain elements or more): ranges of elements on torch's threads (at::parallel_for;
// each element on its own, so the same bits at any thread count), and an output of kPopulateFrom
// bytes or more populated a range at a time before it is written (common.h's populate).
//
// Covered: any contiguous float32 or float64 CPU tensor, of any shape (0-d and empty included).
// Not covered (the eager kernel runs): other dtypes, devices and layouts, a strided x, a bad dout.
#include <ATen/Parallel.h>

#include <algorithm>

#include "common.h"

namespace backprop_cpp::tanh {

constexpr int64_t kGrain = 1 << 16;  // elements a task at least; below, the calling thread alone

// f(i, j) over [0, n): inline for a small n (the notebook's scale: no parallel_for at all), else on
// torch's threads, each range's output populated kPopulate bytes at a time just before it is written
template <typename T, typename F>
void elementwise(T* out, int64_t n, const F& f) {
  if (n < kGrain) return f(int64_t(0), n);
  const bool fresh = n * int64_t(sizeof(T)) >= kPopulateFrom;
  const int64_t step = kPopulate / int64_t(sizeof(T));
  at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i += step) {
      const int64_t j = std::min(i1, i + step);
      if (fresh) populate(out + i, (j - i) * int64_t(sizeof(T)));
      f(i, j);
    }
  });
}

// Where ATen's vector tanh (Sleef's, 1 ulp) is not correctly rounded, bands that two blends fix:
// - past ln(2^(p+1))/2 (p = 24, 53 mantissa bits) it returns +-1, half an ulp early: up to
//   kLastBelowOne, ln(2^(p+2) - 1)/2 rounded down, tanh(x) rounds to +-(1 - 2^-p), the float
//   below 1 (so that the backward's (1 - y)(1 + y) is not 0 there, as after torch.tanh);
// - for float32 x in [2^-24, 2^-23] it is one ulp off on an eighth of the inputs: below kTiny, where
//   x^2/3 < 2^-(p+1), tanh(x) = x - x^3/3 + ... rounds to x itself.
template <typename T> constexpr T kLastBelowOne = 0;
template <> constexpr float kLastBelowOne<float> = 0x1.205966p+3f;          // 9.010912895...
template <> constexpr double kLastBelowOne<double> = 0x1.30fc1931f09c9p+4;  // 19.061547465398494
template <typename T> constexpr T kTiny = 0;
template <> constexpr float kTiny<float> = 0x1p-12f;
template <> constexpr double kTiny<double> = 0x1p-27;

template <typename T>
inline at::vec::Vectorized<T> tanh_vec(const at::vec::Vectorized<T>& x) {
  using V = at::vec::Vectorized<T>;
  const V ax = x.abs(), y = x.tanh(), below_one(T(1) - std::numeric_limits<T>::epsilon() / 2);
  const V saturated = V::blendv(y, at::vec::clamp(y, -below_one, below_one), ax <= V(kLastBelowOne<T>));
  return V::blendv(saturated, x, ax < V(kTiny<T>));  // nan: each comparison false, Sleef's nan
}

// y[i] = tanh(x[i]), i < n: whole vectors, then the tail as one partial vector (loadu/store with a
// count), so that every element takes the same path
template <typename T>
void forward(const T* x, T* y, int64_t n) {
  using V = at::vec::Vectorized<T>;
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) tanh_vec(V::loadu(x + i)).store(y + i);
  if (i < n) tanh_vec(V::loadu(x + i, n - i)).store(y + i, n - i);
}

template <typename T>
void forward_all(const T* x, T* y, int64_t n) {
  elementwise(y, n, [&](int64_t i, int64_t j) { forward(x + i, y + i, j - i); });
}

// dx[i] = ((1 - y[i]) * (1 + y[i])) * d[i]: the eager kernel's rounding order, plain arithmetic
// that g++ -O3 vectorises (no fused multiply-add: -std=c++17 keeps -ffp-contract=off)
template <typename T>
void backward(const T* __restrict d, const T* __restrict y, T* __restrict dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dx[i] = ((T(1) - y[i]) * (T(1) + y[i])) * d[i];
}

template <typename T>
void backward_all(const T* d, const T* y, T* dx, int64_t n) {
  elementwise(dx, n, [&](int64_t i, int64_t j) { backward(d + i, y + i, dx + i, j - i); });
}

// One output a direction: a Tensor? (None where not covered) rather than the other ops' Tensor[],
// whose Python list costs ~0.3 us a call, a tenth of the backward's whole call at 32x200
std::optional<at::Tensor> forward_cpu(const at::Tensor& x) {
  if (!raw(x) || !real(x)) return std::nullopt;
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.scalar_type() == at::kFloat) forward_all(x.data_ptr<float>(), out.data_ptr<float>(), x.numel());
  else forward_all(x.data_ptr<double>(), out.data_ptr<double>(), x.numel());
  return out;
}

std::optional<at::Tensor> backward_cpu(const at::Tensor& dout, const at::Tensor& out) {
  if (!raw(out) || !real(out) || !raw(dout) || dout.scalar_type() != out.scalar_type() ||
      dout.sizes() != out.sizes())
    return std::nullopt;
  at::Tensor dx = at::empty(out.sizes(), out.options());
  if (out.scalar_type() == at::kFloat)
    backward_all(dout.data_ptr<float>(), out.data_ptr<float>(), dx.data_ptr<float>(), out.numel());
  else backward_all(dout.data_ptr<double>(), out.data_ptr<double>(), dx.data_ptr<double>(), out.numel());
  return dx;
}

}  // namespace backprop_cpp::tanh

TORCH_LIBRARY_FRAGMENT(backprop_cpp, m) {
  m.def("tanh_forward(Tensor x) -> Tensor?");
  m.def("tanh_backward(Tensor dout, Tensor out) -> Tensor?");
}

TORCH_LIBRARY_IMPL(backprop_cpp, CompositeImplicitAutograd, m) {
  m.impl("tanh_forward", backprop_cpp::tanh::forward_cpu);
  m.impl("tanh_backward", backprop_cpp::tanh::backward_cpu);
}
