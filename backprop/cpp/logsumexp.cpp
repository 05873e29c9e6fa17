// logsumexp over trailing dims: the maths of backprop/logsumexp.py as loops over rows.
//
//   x read as (R, C): R = prod(x.shape[:k]) rows of C = prod(x.shape[k:]) values (k = the first
//   reduced dim; a 0-d x is one row of one value: logsumexp of a 0-d tensor is the identity)
//   forward:  m = max_c x[r, c], then 0 where not finite (nan_to_num(0, 0, 0), as the eager kernel)
//             sumexp = sum_c exp(x[r, c] - m)   out = log(sumexp) + m   (C = 0: m = 0, out = -inf)
//   backward: dx[r, c] = exp(x[r, c] - m) (dout[r] / sumexp)
//
// Passes: the forward reads a row twice (its max, then its sum of exps), the second time from the
// cache (a 32768-value float32 row is 128 KiB, inside L2); the backward reads x and writes dx once.
// exp is ATen's vector exp (Sleef's, 1 ulp), the eager kernel's torch.exp; the sum of a row runs in
// T lanes over blocks of kBlock values (kBlock / (4 W) terms a lane), each block's lanes then added
// into double ones, so a float32 sum of 32768 exps rounds as torch's cascade sum does or better.
// Threads (at::parallel_for, torch's): rows split in contiguous ranges, each row reduced by one
// thread in a fixed order, so the results are the same bits at any thread count.
//
// Covered: float32/float64 contiguous CPU x reduced over a set of trailing dims (any order, keepdim
// either way), a 0-d x, empty rows and no rows. Not covered (the eager kernel runs): other dtypes,
// devices and layouts, a reduction over dims that are not trailing, every bad argument.
#include <ATen/Parallel.h>

#include <algorithm>

#include "common.h"

namespace backprop_cpp::logsumexp {

// values a task at least (a row takes ~C ns an element: a smaller input runs on the calling thread)
constexpr int64_t kGrain = 1 << 15;

template <typename T>
constexpr int64_t kBlock = 16 * 4 * at::vec::Vectorized<T>::size();

// the row's shift: its max, 0 where that is +-inf or nan (so x - m is never inf - inf)
template <typename T>
inline T shift_of(const T* z, int64_t C) {
  using V = at::vec::Vectorized<T>;
  if (C == 0) return T(0);
  const T m = at::vec::reduce_all<T>([](V& a, V& b) { return at::vec::maximum(a, b); }, z, C);
  return std::isfinite(m) ? m : T(0);
}

// add v's lanes into the double lanes acc
template <typename T>
inline void add_lanes(const at::vec::Vectorized<T>& v, double* acc) {
  using V = at::vec::Vectorized<T>;
  alignas(64) T lane[V::size()];
  v.store(lane);
  for (int64_t l = 0; l < V::size(); ++l) acc[l] += lane[l];
}

// sum_c exp(z[c] - m): four vector accumulators in T over a block, added into double lanes a block
template <typename T>
inline double sum_exp(const T* z, T m, int64_t C) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t W = V::size();
  const V vm(m);
  double acc[W] = {};
  int64_t i = 0;
  for (; i + kBlock<T> <= C; i += kBlock<T>) {
    V a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
    for (int64_t j = i; j < i + kBlock<T>; j += 4 * W) {
      a0 += (V::loadu(z + j) - vm).exp();
      a1 += (V::loadu(z + j + W) - vm).exp();
      a2 += (V::loadu(z + j + 2 * W) - vm).exp();
      a3 += (V::loadu(z + j + 3 * W) - vm).exp();
    }
    add_lanes((a0 + a1) + (a2 + a3), acc);
  }
  V a(T(0));
  for (; i + W <= C; i += W) a += (V::loadu(z + i) - vm).exp();
  // the tail: its n lanes only (loadu fills the others with 0, whose exp(0 - m) is not 0)
  if (i < C) a = V::set(a, a + (V::loadu(z + i, C - i) - vm).exp(), C - i);
  add_lanes(a, acc);
  double s = 0;
  for (int64_t l = 0; l < W; ++l) s += acc[l];
  return s;
}

template <typename T>
void forward(const T* x, int64_t R, int64_t C, T* out, T* shift, T* sumexp) {
  at::parallel_for(0, R, std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* z = x + r * C;
      const T m = shift_of(z, C), s = T(sum_exp(z, m, C));
      shift[r] = m, sumexp[r] = s;
      out[r] = std::log(s) + m;  // in T, as the eager kernel's sumexp.log().add_(shift)
    }
  });
}

// dx[r, c] = exp(x[r, c] - m[r]) g[r], g = dout / sumexp rounded in T as the eager kernel's
template <typename T>
void backward(const T* x, const T* shift, const T* sumexp, const T* dout, int64_t R, int64_t C, T* dx) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t W = V::size();
  at::parallel_for(0, R, std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* z = x + r * C;
      T* d = dx + r * C;
      const V vm(shift[r]), vg(dout[r] / sumexp[r]);
      int64_t i = 0;
      for (; i + W <= C; i += W) ((V::loadu(z + i) - vm).exp() * vg).store(d + i);
      if (i < C) ((V::loadu(z + i, C - i) - vm).exp() * vg).store(d + i, C - i);
    }
  });
}

// x.shape[:k] followed by ones for the reduced dims: the shift's (keepdim) shape
inline std::vector<int64_t> kept_shape(const at::Tensor& x, int64_t k) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  std::fill(s.begin() + k, s.end(), 1);
  return s;
}

// (R, C) for x reduced over dims k.. (a 0-d x: one row of one value)
inline std::pair<int64_t, int64_t> rows(const at::Tensor& x, int64_t k) {
  int64_t R = 1;
  for (int64_t d = 0; d < k; ++d) R *= x.size(d);
  int64_t C = 1;
  for (int64_t d = k; d < x.dim(); ++d) C *= x.size(d);
  return {R, C};
}

Tensors forward_cpu(const at::Tensor& x, int64_t k, bool keepdim) {
  // k < dim: a reduction over at least one dim (a 0-d x, k = 0, reduces none)
  if (!raw(x) || !real(x) || k < 0 || (x.dim() > 0 && k >= x.dim()) || (x.dim() == 0 && k != 0)) return {};
  const auto [R, C] = rows(x, k);
  const auto kept = kept_shape(x, k);
  auto opts = x.options();
  at::Tensor shift = at::empty(kept, opts), sumexp = at::empty(kept, opts);
  at::Tensor out = at::empty(keepdim ? at::IntArrayRef(kept) : x.sizes().slice(0, k), opts);
  if (x.scalar_type() == at::kFloat)
    forward(x.data_ptr<float>(), R, C, out.data_ptr<float>(), shift.data_ptr<float>(), sumexp.data_ptr<float>());
  else
    forward(x.data_ptr<double>(), R, C, out.data_ptr<double>(), shift.data_ptr<double>(), sumexp.data_ptr<double>());
  return {out, shift, sumexp};
}

// k = x.dim() - len(dims); k = x.dim() (dims = (), a 0-d x or a cache built by hand): elementwise
std::optional<at::Tensor> backward_cpu(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& shift,
                                       const at::Tensor& sumexp, int64_t k, bool keepdim) {
  if (!raw(x) || !real(x) || k < 0 || k > x.dim()) return std::nullopt;
  const auto dtype = x.scalar_type();
  const auto kept = kept_shape(x, k);
  const at::IntArrayRef out_shape = keepdim || k == x.dim() ? at::IntArrayRef(kept) : x.sizes().slice(0, k);
  if (!raw(shift) || !raw(sumexp) || !raw(dout) || shift.scalar_type() != dtype || sumexp.scalar_type() != dtype ||
      dout.scalar_type() != dtype || shift.sizes() != at::IntArrayRef(kept) || sumexp.sizes() != at::IntArrayRef(kept) ||
      dout.sizes() != out_shape)
    return std::nullopt;
  const auto [R, C] = rows(x, k);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (dtype == at::kFloat)
    backward(x.data_ptr<float>(), shift.data_ptr<float>(), sumexp.data_ptr<float>(), dout.data_ptr<float>(), R, C,
             dx.data_ptr<float>());
  else
    backward(x.data_ptr<double>(), shift.data_ptr<double>(), sumexp.data_ptr<double>(), dout.data_ptr<double>(), R,
             C, dx.data_ptr<double>());
  return dx;
}

}  // namespace backprop_cpp::logsumexp

TORCH_LIBRARY_FRAGMENT(backprop_cpp, m) {
  m.def("logsumexp_forward(Tensor x, int k, bool keepdim) -> Tensor[]");
  m.def("logsumexp_backward(Tensor dout, Tensor x, Tensor shift, Tensor sumexp, int k, bool keepdim) -> Tensor?");
}

TORCH_LIBRARY_IMPL(backprop_cpp, CompositeImplicitAutograd, m) {
  m.impl("logsumexp_forward", backprop_cpp::logsumexp::forward_cpu);
  m.impl("logsumexp_backward", backprop_cpp::logsumexp::backward_cpu);
}
