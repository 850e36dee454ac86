// The elementwise work around SCANet's dense GEMMs on CPU, one pass each way (scanet/native_dense.py drives it).
//
// Co-attention epilogue (eqs. 4-9 after the GEMM z = f W^T, which torch/oneDNN runs; the bias b is added here):
//     forward   p = softmax(relu(z + b)) per row,  out = p * g * scale
//     backward  dg = dout * p * scale,  dz = [z + b > 0] * p * (dp - sum_n dp p),  dp = dout * g * scale,
//               db = sum over rows of dz
// Eager torch runs this as relu, softmax, two multiplies forward and five kernels backward, each a pass over
// the (M, N) map: for the Wiki step (M = 256, N = 1024, four maps a step) those passes measured 1.3 ms per map
// against 2.3 ms for its GEMMs. Here one pass reads z and g and writes out (and p, float32, for backward);
// backward reads dout, p, z, g and writes dz, dg. Bytes per map at bf16 z, g, out: forward 2+2+2+4 = 10 B an
// element, backward 2+4+2+2+2+2 = 14 B (2.6 MB and 3.7 MB at 256 x 1024: L2-resident).
//
// Similarity head (scanet.layers.SimilarityHead: dropout, then FC(f_T * f_I) to one logit):
//     forward   logit_m = b + s * sum_n w_n keep_mn f_T,mn f_I,mn         (s = 1 / (1 - p))
//     backward  df_T = dl_m s keep w_n f_I,  df_I = dl_m s keep w_n f_T,  dw_n = s sum_m dl_m keep f_T f_I,
//               db = sum_m dl_m
// with keep_mn the counter-based dropout bit of element m * N + n (native_common.h: the hash of the Chebyshev
// epilogue's dropout), regenerated in backward instead of a stored mask. Eager torch: a multiply, bernoulli_
// (scalar, ~1.8 ms for 256 x 1024 here), a multiply, a GEMV, and their backward: 3.6 ms a step measured; here
// one pass each way over f_T, f_I.
//
// Precision. Everything is computed in float32 from inputs in float32, bfloat16 or float16 (as torch.autocast
// hands them over); outputs are rounded once. The softmax's row max and sum of exponentials, the head's dot
// products and the weight-gradient sums are float32/float64, never bf16 (the softmax's sums in double). exp is a float32 polynomial (below),
// within 2 ulp of the correctly rounded value on the softmax's range (x <= 0).
//
// Determinism. Each row of the co-attention maps and each logit is computed by one thread in a fixed order; the
// head's dw is summed in double over fixed blocks of rows (rows in order within a block, blocks in order), db in
// row order: bitwise the same results for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "native_common.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace scanet_native {
namespace {

using at::Tensor;

// A parallel region costs more than it saves below this many elements (and can wait at its barrier on a busy
// machine); results do not depend on the thread count either way.
constexpr int64_t kSerialElems = 1 << 15;
inline int threads_for(int64_t elems) { return elems < kSerialElems ? 1 : std::max(1, at::get_num_threads()); }

// exp(x) for x <= 0 in float32, written so that a loop of it vectorizes (no libm call): x = n ln2 + r with
// |r| <= ln2 / 2, exp(r) by its Taylor polynomial to r^7 (truncation < 6e-9 relative), times 2^n built in the
// exponent bits. x below -87 is clamped there (exp(-87) = 1.6e-38: against a softmax row's largest term, 1,
// it is 0 in float32 anyway); NaN stays NaN.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  // n = round(x / ln2) by the 1.5 * 2^23 trick (std::floor does not vectorize in GCC 12 without -ffast-math);
  // this file is not compiled with -ffast-math, so the compiler keeps the add and subtract as written.
  constexpr float kRound = 12582912.0f;
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * std::bit_cast<float>(bits);
}

// sum of x[0:n] in double, over kLanes fixed lanes (element i in lane i % kLanes), then the lanes in order: a
// float32 sum of 1,024 softmax terms measured 4e-6 relative error (median); a plain double reduction stayed
// scalar in GCC's output. Fixed order: the same result for any thread count.
constexpr int kLanes = 16;
inline double sum_lanes(const float* x, int64_t n) {
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) lanes[l] += double(x[i + l]);
  }
  for (int l = 0; i + l < n; ++l) lanes[l] += double(x[i + l]);
  double s = 0.0;
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

// f(A{}, B{}, C{}) with A, B, C the C++ types of three float32 / bfloat16 / float16 storage dtypes.
template <typename F>
void dispatch3(at::ScalarType a, at::ScalarType b, at::ScalarType c, const char* what, F&& f) {
  dispatch_float_storage(a, what, [&](auto ta) {
    dispatch_float_storage(b, what, [&](auto tb) { dispatch_float_storage(c, what, [&](auto tc) { f(ta, tb, tc); }); });
  });
}

// Column sums over rows in a fixed order: rows are summed in blocks of kSumRows (each block by one thread, rows
// in order, in double, into part[block][n]), then sum_row_blocks adds the blocks in block order. The result does
// not depend on the thread count.
constexpr int64_t kSumRows = 16;

inline void sum_row_blocks(const double* part, int64_t nblocks, int64_t N, double* out) {
  for (int64_t n = 0; n < N; ++n) out[n] = 0.0;
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const double* pb = part + blk * N;
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) out[n] += pb[n];
  }
}

void check_2d(const Tensor& t, const char* name, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2, what, ": ", name, " must be 2-D (M, N), got shape ", t.sizes());
}

// ------------------------------------------------------------------------------- co-attention epilogue
template <typename Tz, typename Tg, typename To>
void coattention_forward_impl(const Tz* z, const Tg* g, const float* bias, int64_t M, int64_t N, float scale,
                              float* p, To* out) {
#pragma omp parallel num_threads(threads_for(M * N))
  {
    std::vector<float> e_buf(N);
    float* e = e_buf.data();  // a plain pointer: stores through e[n] cannot alias the vector's own fields
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      const Tz* zr = z + m * N;
      const Tg* gr = g + m * N;
      float mx = 0.0f;  // relu(z) >= 0: the row max is at least 0
#pragma omp simd reduction(max : mx)
      for (int64_t n = 0; n < N; ++n) {
        const float zn = load_as<float>(zr[n]) + (bias ? bias[n] : 0.0f);
        const float a = zn < 0.0f ? 0.0f : zn;  // zn < 0 keeps NaN, as F.relu does
        e[n] = a;
        mx = a > mx ? a : mx;
      }
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) e[n] = exp_nonpositive(e[n] - mx);
      const float inv = float(1.0 / sum_lanes(e, N));
      float* pr = p ? p + m * N : nullptr;
      To* orow = out + m * N;
      if (pr) {
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) {
          const float pn = e[n] * inv;
          pr[n] = pn;
          orow[n] = store_as<To, float>(pn * load_as<float>(gr[n]) * scale);
        }
      } else {
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) orow[n] = store_as<To, float>(e[n] * inv * load_as<float>(gr[n]) * scale);
      }
    }
  }
}

// The bias (N,) in float32, contiguous (a no-op for a float32 one), or an undefined tensor.
Tensor bias_f32(const c10::optional<Tensor>& bias, int64_t N, const char* what) {
  if (!bias.has_value()) return Tensor();
  TORCH_CHECK(bias->device().is_cpu() && bias->dim() == 1 && bias->size(0) == N, what,
              ": bias must be a CPU tensor of shape (N,) = (", N, ",), got ", bias->sizes());
  TORCH_CHECK(bias->is_floating_point(), what, ": bias must be floating point, got ", bias->scalar_type());
  return bias->to(at::kFloat).contiguous();
}

// Returns (out, p): out in out_dtype (default z's), p = the attention map (M, N) float32 when save_p, else (0,).
// With a bias the map is softmax(relu(z + bias)): the GEMM before it runs without its bias (no bias copy
// into its output), and backward returns the bias's gradient (no separate sum over rows).
std::tuple<Tensor, Tensor> coattention_epilogue_forward(const Tensor& z_in, const Tensor& g_in, double scale,
                                                        bool save_p, c10::optional<at::ScalarType> out_dtype,
                                                        const c10::optional<Tensor>& bias) {
  const char* what = "coattention_epilogue_forward";
  check_2d(z_in, "z", what);
  check_2d(g_in, "g", what);
  TORCH_CHECK(z_in.sizes() == g_in.sizes(), what, ": z and g must have one shape, got ", z_in.sizes(), " and ",
              g_in.sizes());
  const Tensor z = z_in.contiguous(), g = g_in.contiguous();
  const int64_t M = z.size(0), N = z.size(1);
  const Tensor b = bias_f32(bias, N, what);
  const at::ScalarType odt = out_dtype.value_or(z.scalar_type());
  Tensor out = at::empty({M, N}, z.options().dtype(odt));
  Tensor p = save_p ? at::empty({M, N}, z.options().dtype(at::kFloat)) : at::empty({0}, z.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return {out, p};
  dispatch3(z.scalar_type(), g.scalar_type(), odt, what, [&](auto tz, auto tg, auto to) {
        using Tz = decltype(tz);
        using Tg = decltype(tg);
        using To = decltype(to);
        coattention_forward_impl<Tz, Tg, To>(static_cast<const Tz*>(z.data_ptr()), static_cast<const Tg*>(g.data_ptr()),
                                             b.defined() ? b.data_ptr<float>() : nullptr, M, N, float(scale),
                                             save_p ? p.data_ptr<float>() : nullptr, static_cast<To*>(out.data_ptr()));
  });
  return {out, p};
}

template <typename Td, typename Tz, typename Tg>
void coattention_backward_impl(const Td* dout, const float* p, const Tz* z, const Tg* g, const float* bias,
                               int64_t M, int64_t N, float scale, Tz* dz, Tg* dg, double* db) {
  const int64_t nblocks = (M + kSumRows - 1) / kSumRows;
  std::vector<double> part(db ? nblocks * N : 0, 0.0);
#pragma omp parallel num_threads(threads_for(M * N))
  {
    std::vector<float> t_buf(N), d_buf(N);
    float* t = t_buf.data();
    float* d = d_buf.data();
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      double* acc = db ? part.data() + blk * N : nullptr;
      for (int64_t m = blk * kSumRows; m < std::min(M, (blk + 1) * kSumRows); ++m) {
        const Td* dr = dout + m * N;
        const float* pr = p + m * N;
        const Tg* gr = g + m * N;
#pragma omp simd
        for (int64_t n = 0; n < N; ++n) t[n] = load_as<float>(dr[n]) * scale * load_as<float>(gr[n]) * pr[n];
        const float c = float(sum_lanes(t, N));  // sum_n dp_n p_n, dp = dout * g * scale
        if (dz || acc) {
          const Tz* zr = z + m * N;
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) {
            const float dp = load_as<float>(dr[n]) * scale * load_as<float>(gr[n]);
            const float zn = load_as<float>(zr[n]) + (bias ? bias[n] : 0.0f);
            d[n] = zn > 0.0f ? pr[n] * (dp - c) : 0.0f;
          }
          if (dz) {
            Tz* dzr = dz + m * N;
#pragma omp simd
            for (int64_t n = 0; n < N; ++n) dzr[n] = store_as<Tz, float>(d[n]);
          }
          if (acc) {
#pragma omp simd
            for (int64_t n = 0; n < N; ++n) acc[n] += double(d[n]);
          }
        }
        if (dg) {
          Tg* dgr = dg + m * N;
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) dgr[n] = store_as<Tg, float>(load_as<float>(dr[n]) * scale * pr[n]);
        }
      }
    }
  }
  if (db) sum_row_blocks(part.data(), nblocks, N, db);
}

// Returns (dz, dg, dbias): dz, dg in z's and g's dtypes, dbias (N,) float32 (the sum of dz over rows, in
// double, in a fixed order); each is (0,) when not needed (dbias: without a bias or need_bias).
std::tuple<Tensor, Tensor, Tensor> coattention_epilogue_backward(const Tensor& dout_in, const Tensor& p_in,
                                                                 const Tensor& z_in, const Tensor& g_in, double scale,
                                                                 bool need_z, bool need_g,
                                                                 const c10::optional<Tensor>& bias, bool need_bias) {
  const char* what = "coattention_epilogue_backward";
  for (auto [t, name] : {std::pair<const Tensor&, const char*>{dout_in, "dout"}, {p_in, "p"}, {z_in, "z"},
                         {g_in, "g"}}) {
    check_2d(t, name, what);
    TORCH_CHECK(t.sizes() == z_in.sizes(), what, ": ", name, " must have z's shape ", z_in.sizes(), ", got ",
                t.sizes());
  }
  TORCH_CHECK(p_in.scalar_type() == at::kFloat, what, ": p must be float32 (the forward's saved map)");
  const Tensor dout = dout_in.contiguous(), p = p_in.contiguous(), z = z_in.contiguous(), g = g_in.contiguous();
  const int64_t M = z.size(0), N = z.size(1);
  const Tensor b = bias_f32(bias, N, what);
  need_bias = need_bias && b.defined();
  Tensor dz = need_z ? at::empty({M, N}, z.options()) : at::empty({0}, z.options());
  Tensor dg = need_g ? at::empty({M, N}, g.options()) : at::empty({0}, g.options());
  Tensor db64 = at::zeros({need_bias ? N : 0}, z.options().dtype(at::kDouble));
  if (M == 0 || N == 0 || !(need_z || need_g || need_bias)) return {dz, dg, db64.to(at::kFloat)};
  dispatch3(dout.scalar_type(), z.scalar_type(), g.scalar_type(), what, [&](auto td, auto tz, auto tg) {
        using Td = decltype(td);
        using Tz = decltype(tz);
        using Tg = decltype(tg);
        coattention_backward_impl<Td, Tz, Tg>(
            static_cast<const Td*>(dout.data_ptr()), p.data_ptr<float>(), static_cast<const Tz*>(z.data_ptr()),
            static_cast<const Tg*>(g.data_ptr()), b.defined() ? b.data_ptr<float>() : nullptr, M, N, float(scale),
            need_z ? static_cast<Tz*>(dz.data_ptr()) : nullptr, need_g ? static_cast<Tg*>(dg.data_ptr()) : nullptr,
            need_bias ? db64.data_ptr<double>() : nullptr);
  });
  return {dz, dg, db64.to(at::kFloat)};
}

// ------------------------------------------------------------------------------------------ similarity head
// keep bits of row m, columns [n0, n1), into k (1.0 kept, 0.0 dropped): vectorizable (64-bit multiplies).
inline void keep_row(const Dropout& drop, int64_t m, int64_t N, int64_t n0, int64_t n1, float* k) {
  const uint64_t seed = drop.seed, thr = drop.threshold, base = uint64_t(m) * uint64_t(N);
#pragma omp simd
  for (int64_t n = n0; n < n1; ++n) k[n - n0] = keep_bit(seed, thr, base + uint64_t(n)) ? 1.0f : 0.0f;
}

template <typename Tf, typename Ti, typename Tw>
void head_forward_impl(const Tf* ft, const Ti* fi, const Tw* w, float bias, const Dropout& drop, int64_t M,
                       int64_t N, float* logit) {
  const float s = float(drop.scale);
#pragma omp parallel num_threads(threads_for(M * N))
  {
    std::vector<float> k(drop.on ? N : 0);
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) {
      const Tf* a = ft + m * N;
      const Ti* b = fi + m * N;
      float acc = 0.0f;
      if (drop.on) {
        keep_row(drop, m, N, 0, N, k.data());
#pragma omp simd reduction(+ : acc)
        for (int64_t n = 0; n < N; ++n) acc += k[n] * load_as<float>(w[n]) * load_as<float>(a[n]) * load_as<float>(b[n]);
        acc *= s;
      } else {
#pragma omp simd reduction(+ : acc)
        for (int64_t n = 0; n < N; ++n) acc += load_as<float>(w[n]) * load_as<float>(a[n]) * load_as<float>(b[n]);
      }
      logit[m] = bias + acc;
    }
  }
}

void check_head(const Tensor& ft, const Tensor& fi, const Tensor& w, const char* what) {
  check_2d(ft, "f_t", what);
  check_2d(fi, "f_i", what);
  TORCH_CHECK(ft.sizes() == fi.sizes(), what, ": f_t and f_i must have one shape, got ", ft.sizes(), " and ",
              fi.sizes());
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 1 && w.size(0) == ft.size(1), what,
              ": weight must be a CPU tensor of shape (N,) = (", ft.size(1), ",), got ", w.sizes());
}

// logits (M,) float32 = b + FC(dropout(f_t * f_i)).
Tensor similarity_head_forward(const Tensor& ft_in, const Tensor& fi_in, const Tensor& w_in,
                               const c10::optional<Tensor>& b, double dropout_p, int64_t seed) {
  const char* what = "similarity_head_forward";
  check_head(ft_in, fi_in, w_in, what);
  const Tensor ft = ft_in.contiguous(), fi = fi_in.contiguous(), w = w_in.contiguous();
  const int64_t M = ft.size(0), N = ft.size(1);
  float bias = 0.0f;
  if (b.has_value()) {
    TORCH_CHECK(b->numel() == 1, what, ": bias must have one element, got shape ", b->sizes());
    bias = b->to(at::kFloat).item<float>();
  }
  const Dropout drop = Dropout::make(dropout_p, seed, what);
  Tensor logit = at::empty({M}, ft.options().dtype(at::kFloat));
  if (M == 0) return logit;
  dispatch3(ft.scalar_type(), fi.scalar_type(), w.scalar_type(), what, [&](auto tf, auto ti, auto tw) {
        using Tf = decltype(tf);
        using Ti = decltype(ti);
        using Tw = decltype(tw);
        head_forward_impl<Tf, Ti, Tw>(static_cast<const Tf*>(ft.data_ptr()), static_cast<const Ti*>(fi.data_ptr()),
                                      static_cast<const Tw*>(w.data_ptr()), bias, drop, M, N,
                                      logit.data_ptr<float>());
  });
  return logit;
}

template <typename Tf, typename Ti, typename Tw>
void head_backward_impl(const float* dl, const Tf* ft, const Ti* fi, const Tw* w, const Dropout& drop, int64_t M,
                        int64_t N, Tf* dft, Ti* dfi, double* dw) {
  const float s = float(drop.scale);
  const int64_t nblocks = (M + kSumRows - 1) / kSumRows;
  std::vector<double> part(dw ? nblocks * N : 0, 0.0);
  std::vector<float> wv(N);
  for (int64_t n = 0; n < N; ++n) wv[n] = load_as<float>(w[n]);
  const float* wp = wv.data();
#pragma omp parallel num_threads(threads_for(M * N))
  {
    std::vector<float> k_buf(N, 1.0f);
    float* k = k_buf.data();
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      double* acc = dw ? part.data() + blk * N : nullptr;
      for (int64_t m = blk * kSumRows; m < std::min(M, (blk + 1) * kSumRows); ++m) {
        if (drop.on) keep_row(drop, m, N, 0, N, k);
        const float g = dl[m] * s;
        const Tf* a = ft + m * N;
        const Ti* b = fi + m * N;
        if (dft) {
          Tf* da = dft + m * N;
          Ti* db = dfi + m * N;
#pragma omp simd
          for (int64_t n = 0; n < N; ++n) {
            const float gw = g * k[n] * wp[n];
            da[n] = store_as<Tf, float>(gw * load_as<float>(b[n]));
            db[n] = store_as<Ti, float>(gw * load_as<float>(a[n]));
          }
        }
        if (acc) {
#pragma omp simd
          for (int64_t n = 0; n < N; ++n)
            acc[n] += double(g * k[n]) * double(load_as<float>(a[n])) * double(load_as<float>(b[n]));
        }
      }
    }
  }
  if (dw) sum_row_blocks(part.data(), nblocks, N, dw);
}

// Returns (df_t, df_i, dw, db): df_t, df_i in f_t's and f_i's dtypes ((0,) unless need_f); dw (N,) in w's dtype
// and db (1,) float32 ((0,) unless need_w).
std::tuple<Tensor, Tensor, Tensor, Tensor> similarity_head_backward(const Tensor& dl_in, const Tensor& ft_in,
                                                                    const Tensor& fi_in, const Tensor& w_in,
                                                                    double dropout_p, int64_t seed, bool need_f,
                                                                    bool need_w) {
  const char* what = "similarity_head_backward";
  check_head(ft_in, fi_in, w_in, what);
  TORCH_CHECK(dl_in.dim() == 1 && dl_in.size(0) == ft_in.size(0), what, ": grad must be (M,) = (", ft_in.size(0),
              ",), got ", dl_in.sizes());
  const Tensor dl = dl_in.to(at::kFloat).contiguous();
  const Tensor ft = ft_in.contiguous(), fi = fi_in.contiguous(), w = w_in.contiguous();
  const int64_t M = ft.size(0), N = ft.size(1);
  const Dropout drop = Dropout::make(dropout_p, seed, what);
  Tensor dft = need_f ? at::empty({M, N}, ft.options()) : at::empty({0}, ft.options());
  Tensor dfi = need_f ? at::empty({M, N}, fi.options()) : at::empty({0}, fi.options());
  Tensor dw64 = need_w ? at::empty({N}, w.options().dtype(at::kDouble)) : at::empty({0}, w.options().dtype(at::kDouble));
  Tensor db = at::empty({need_w ? 1 : 0}, w.options().dtype(at::kFloat));
  if (need_w) {  // db = sum_m dl_m in row order, in double
    const float* d = dl.data_ptr<float>();
    double t = 0.0;
    for (int64_t m = 0; m < M; ++m) t += double(d[m]);
    db.fill_(t);
  }
  if ((need_f || need_w) && M > 0 && N > 0) {
    dispatch3(ft.scalar_type(), fi.scalar_type(), w.scalar_type(), what, [&](auto tf, auto ti, auto tw) {
          using Tf = decltype(tf);
          using Ti = decltype(ti);
          using Tw = decltype(tw);
          head_backward_impl<Tf, Ti, Tw>(
              dl.data_ptr<float>(), static_cast<const Tf*>(ft.data_ptr()), static_cast<const Ti*>(fi.data_ptr()),
              static_cast<const Tw*>(w.data_ptr()), drop, M, N, need_f ? static_cast<Tf*>(dft.data_ptr()) : nullptr,
              need_f ? static_cast<Ti*>(dfi.data_ptr()) : nullptr, need_w ? dw64.data_ptr<double>() : nullptr);
    });
  } else if (need_w) {
    dw64.zero_();
  }
  return {dft, dfi, need_w ? dw64.to(w.scalar_type()) : at::empty({0}, w.options()), db};
}

// ------------------------------------------------------------------------------ image standardization
// out = (x - mean) / std per column, in float32 as eager torch computes it (a subtraction, an IEEE division),
// rounded once into out_dtype: the bits of eager torch's sub, div and autocast's cast to bf16 for the image FC,
// in one pass over x instead of three (each writing a fresh (B, D) tensor; ~1.2 ms a Wiki-shaped step at D = 4096).
template <typename To>
void standardize_impl(const float* x, int64_t B, int64_t D, const float* mean, const float* sd, To* out) {
#pragma omp parallel for num_threads(threads_for(B * D)) schedule(static)
  for (int64_t r = 0; r < B; ++r) {
    const float* xr = x + r * D;
    To* o = out + r * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] = store_as<To, float>((xr[d] - mean[d]) / sd[d]);
  }
}

Tensor standardize_rows(const Tensor& x_in, const Tensor& mean_in, const Tensor& std_in,
                        c10::optional<at::ScalarType> out_dtype) {
  const char* what = "standardize_rows";
  check_2d(x_in, "x", what);
  TORCH_CHECK(x_in.scalar_type() == at::kFloat, what, ": x must be float32, got ", x_in.scalar_type());
  const int64_t B = x_in.size(0), D = x_in.size(1);
  for (auto [t, name] : {std::pair<const Tensor&, const char*>{mean_in, "mean"}, {std_in, "std"}}) {
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == D && t.scalar_type() == at::kFloat, what, ": ",
                name, " must be a float32 CPU tensor of shape (D,) = (", D, ",), got ", t.sizes(), " ",
                t.scalar_type());
  }
  const Tensor x = x_in.contiguous(), mean = mean_in.contiguous(), sd = std_in.contiguous();
  const at::ScalarType odt = out_dtype.value_or(at::kFloat);
  Tensor out = at::empty({B, D}, x.options().dtype(odt));
  if (B == 0 || D == 0) return out;
  dispatch_float_storage(odt, what, [&](auto to) {
    using To = decltype(to);
    standardize_impl<To>(x.data_ptr<float>(), B, D, mean.data_ptr<float>(), sd.data_ptr<float>(),
                         static_cast<To*>(out.data_ptr()));
  });
  return out;
}

}  // namespace

// A fragment: the library itself (and its other ops) is defined in csrc/cheb_conv.cpp.
TORCH_LIBRARY_FRAGMENT(scanet_native, m) {
  m.def("coattention_epilogue_forward(Tensor z, Tensor g, float scale, bool save_p, ScalarType? out_dtype=None, "
        "Tensor? bias=None) -> (Tensor, Tensor)");
  m.def("coattention_epilogue_backward(Tensor dout, Tensor p, Tensor z, Tensor g, float scale, bool need_z, "
        "bool need_g, Tensor? bias=None, bool need_bias=False) -> (Tensor, Tensor, Tensor)");
  m.def("similarity_head_forward(Tensor f_t, Tensor f_i, Tensor weight, Tensor? bias, float dropout_p, int seed) "
        "-> Tensor");
  m.def("standardize_rows(Tensor x, Tensor mean, Tensor std, ScalarType? out_dtype=None) -> Tensor");
  m.def("similarity_head_backward(Tensor grad, Tensor f_t, Tensor f_i, Tensor weight, float dropout_p, int seed, "
        "bool need_f, bool need_w) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(scanet_native, CPU, m) {
  m.impl("coattention_epilogue_forward", &coattention_epilogue_forward);
  m.impl("coattention_epilogue_backward", &coattention_epilogue_backward);
  m.impl("similarity_head_forward", &similarity_head_forward);
  m.impl("similarity_head_backward", &similarity_head_backward);
  m.impl("standardize_rows", &standardize_rows);
}

}  // namespace scanet_native
