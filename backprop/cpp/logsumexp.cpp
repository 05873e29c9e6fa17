// logsumexp over trailing dims: the maths of backprop/logsumexp.py as loops over rows.
//
//   x read as (R, C): R = prod(x.shape[:k]) rows of C = prod(x.shape[k:]) values (k = the first
//   reduced dim; a 0-d x is one row of one value: logsumexp of a 0-d tensor is the identity)
//   forward:  m = max_c x[r, c], then T's largest finite value where it is +inf, 0 where it is -inf
//             or nan (nan_to_num(0, max, 0), as the eager kernel: dx 0 at a finite entry of a +inf row)
//             sumexp = sum_c exp(x[r, c] - m)   out = log(sumexp) + m   (C = 0: m = 0, out = -inf)
//   backward: dx[r, c] = exp(x[r, c] - m) (dout[r] / sumexp)
//
// Passes: the forward reads x once: a row block by block (kBlock values), each block's max, then
// its exps from L1 against the running max, the sum so far rescaled when the max grows; the
// backward reads x and writes dx once. exp is Sleef's (1 ulp: ATen's vector exp, as in Inductor's
// loops; torch.exp, the eager kernel's, is MKL's here, also within 1 ulp: vexp below). A block's exps
// are summed in T lanes (kBlock / (4 W) terms a lane), the blocks' lanes in double, so a float32 sum
// of 32768 exps rounds as torch's cascade sum or better.
// A large dx's pages are populated a batch of rows at a time before they are written (populate:
// fewer page faults, the same pages; the values never depend on it).
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

// exp on this CPU's lanes: ATen's vector exp (Sleef's expf/exp, u10: 1 ulp), and for float32 on AVX2
// Sleef's own algorithm inline (the same operations in the same order, so the same bits): the call
// into libtorch's Sleef spills every vector register it holds, and the inline one takes ~0.7x the time
template <typename T>
inline at::vec::Vectorized<T> vexp(const at::vec::Vectorized<T>& d) {
  return d.exp();
}
#if defined(CPU_CAPABILITY_AVX2) && defined(__FMA__)
template <>
inline at::vec::Vectorized<float> vexp(const at::vec::Vectorized<float>& v) {
  const __m256 d = v;  // Sleef's xexpf: q = rint(d / ln 2), s = d - q ln 2 (in two parts), a degree-6
  const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(d, _mm256_set1_ps(1.442695040888963407359924681f)));
  const __m256 qf = _mm256_cvtepi32_ps(q);  // polynomial in s, scaled by 2^q in two steps (subnormals)
  __m256 s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-0.693145751953125f), d);
  s = _mm256_fmadd_ps(qf, _mm256_set1_ps(-1.428606765330187045e-06f), s);
  __m256 u = _mm256_set1_ps(0.000198527617612853646278381f);
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.00139304355252534151077271f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.00833336077630519866943359f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.0416664853692054748535156f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.166666671633720397949219f));
  u = _mm256_fmadd_ps(u, s, _mm256_set1_ps(0.5f));
  u = _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(_mm256_mul_ps(s, s), u, s));
  const __m256i h = _mm256_srai_epi32(q, 1), bias = _mm256_set1_epi32(0x7f);
  const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, bias), 23));
  const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(q, h), bias), 23));
  u = _mm256_mul_ps(_mm256_mul_ps(u, p1), p2);
  u = _mm256_andnot_ps(_mm256_cmp_ps(d, _mm256_set1_ps(-104.0f), _CMP_LT_OQ), u);  // 0 below -104
  u = _mm256_blendv_ps(u, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(_mm256_set1_ps(100.0f), d, _CMP_LT_OQ));
  return _mm256_or_ps(_mm256_cmp_ps(d, d, _CMP_UNORD_Q), u);  // nan stays nan
}
#endif

// add v's lanes into the double lanes acc
template <typename T>
inline void add_lanes(const at::vec::Vectorized<T>& v, double* acc) {
  using V = at::vec::Vectorized<T>;
  alignas(64) T lane[V::size()];
  v.store(lane);
  for (int64_t l = 0; l < V::size(); ++l) acc[l] += lane[l];
}

// acc (double lanes) += exp(z[i] - m), i < n (n <= kBlock): four vector accumulators in T
template <typename T>
inline void add_exps(const T* z, int64_t n, const at::vec::Vectorized<T>& vm, double* acc) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t W = V::size();
  V a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    a0 += vexp<T>(V::loadu(z + j) - vm);
    a1 += vexp<T>(V::loadu(z + j + W) - vm);
    a2 += vexp<T>(V::loadu(z + j + 2 * W) - vm);
    a3 += vexp<T>(V::loadu(z + j + 3 * W) - vm);
  }
  for (; j + W <= n; j += W) a0 += vexp<T>(V::loadu(z + j) - vm);
  // the tail: its n - j lanes only (loadu fills the others with 0, whose exp(0 - m) is not 0)
  if (j < n) a1 = V::set(a1, a1 + vexp<T>(V::loadu(z + j, n - j) - vm), n - j);
  add_lanes((a0 + a1) + (a2 + a3), acc);
}

template <typename T>
inline double lanes_sum(const double* acc) {
  double s = 0;
  for (int64_t l = 0; l < at::vec::Vectorized<T>::size(); ++l) s += acc[l];
  return s;
}

// a row whose max is not finite, shifted as the eager kernel's nan_to_num(0, max, 0) shifts it: by
// T's largest finite value where the max is +inf (the row holds +inf and no nan: exp(z - m) is inf at a
// +inf, at most 1 elsewhere, so sumexp is inf and dx 0 at every finite entry, as torch's), by 0 where
// it is nan (a nan anywhere in the row, before or after a +inf: sumexp nan) or -inf (a row of -inf or
// an empty one: sumexp 0). Its max read again in full: the first pass stopped at the first nan or +inf
template <typename T>
inline std::pair<T, double> special_row(const T* z, int64_t C) {
  using V = at::vec::Vectorized<T>;
  const T m = C ? at::vec::reduce_all<T>([](V& a, V& b) { return at::vec::maximum(a, b); }, z, C) : T(0);
  const T shift = m == std::numeric_limits<T>::infinity() ? std::numeric_limits<T>::max() : T(0);
  double acc[V::size()] = {};
  for (int64_t i = 0; i < C; i += kBlock<T>) add_exps(z + i, std::min(kBlock<T>, C - i), V(shift), acc);
  return {shift, lanes_sum<T>(acc)};
}

// (shift, sumexp) of a row in one read: block by block (kBlock values, in L1 after their max), the
// running max M and the sum of exp(z - M), rescaled (in double) when M grows; a finite row's M ends
// as its max, the eager kernel's shift. A row whose max is +inf or nan, or -inf (all -inf, or
// empty), is special_row's, shifted as the eager kernel's nan_to_num(0, max, 0): a second pass.
template <typename T>
inline std::pair<T, double> reduce_row(const T* z, int64_t C) {
  using V = at::vec::Vectorized<T>;
  constexpr T kInf = std::numeric_limits<T>::infinity();
  double acc[V::size()] = {};
  T M = -kInf;
  for (int64_t i = 0; i < C; i += kBlock<T>) {
    const int64_t n = std::min(kBlock<T>, C - i);
    const T bm = at::vec::reduce_all<T>([](V& a, V& b) { return at::vec::maximum(a, b); }, z + i, n);
    if (!(bm <= M)) {  // a larger max, or nan
      if (!(bm < kInf)) return special_row(z, C);  // nan or +inf
      if (M > -kInf) {
        const double f = std::exp(double(M) - double(bm));
        for (int64_t l = 0; l < V::size(); ++l) acc[l] *= f;
      }
      M = bm;
    }
    if (M > -kInf) add_exps(z + i, n, V(M), acc);  // else every value so far is -inf: exp(-inf - M) = 0
  }
  return M > -kInf ? std::make_pair(M, lanes_sum<T>(acc)) : special_row(z, C);
}

template <typename T>
void forward(const T* x, int64_t R, int64_t C, T* out, T* shift, T* sumexp) {
  at::parallel_for(0, R, std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const auto [m, sum] = reduce_row(x + r * C, C);
      const T s = T(sum);
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
  const int64_t batch = R * C * int64_t(sizeof(T)) >= kPopulateFrom
                            ? std::max<int64_t>(1, kPopulate / (C * int64_t(sizeof(T)))) : 0;
  at::parallel_for(0, R, std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (batch && (r - r0) % batch == 0) populate(dx + r * C, std::min(batch, r1 - r) * C * int64_t(sizeof(T)));
      const T* z = x + r * C;
      T* d = dx + r * C;
      const V vm(shift[r]), vg(dout[r] / sumexp[r]);
      int64_t i = 0;
      for (; i + W <= C; i += W) (vexp<T>(V::loadu(z + i) - vm) * vg).store(d + i);
      if (i < C) (vexp<T>(V::loadu(z + i, C - i) - vm) * vg).store(d + i, C - i);
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
