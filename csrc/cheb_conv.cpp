// Fused Chebyshev graph convolution on CPU: forward, backward and the cached basis.
//
// Dtypes. Compute ("Acc") is float64 for float64 inputs, else float32. x may be float32, bfloat16 or float16
// (as torch.autocast hands it over), y may be written in float32, bfloat16 or float16; the Laplacian values,
// weight, bias, the basis T_1..T_{K-1} and every sum stay in Acc. Why: T_k = 2 L~ T_{k-1} - T_{k-2} doubles
// the previous term and subtracts the one before, so a rounding of T_{k-1} to bf16 (8 bits, 2^-9 relative)
// comes back doubled in T_k and again in every later term (Chebyshev polynomials grow like k^2 in the
// derivative near +-1, where L~'s spectrum ends); low-precision numbers are rounded once on the way in and
// once on the way out, never inside the recursion.
//
// Dropout (optional, in the forward epilogue): y = act(z) * keep / (1 - p) with keep(i) a counter-based
// hash of (seed, i), i the element's index in the (B, V, F_out) row-major order. Backward regenerates keep
// from (seed, i) instead of reading a stored mask.
//
//   y = act(sum_k T_k(L~) x W_k + b),  T_0 = x, T_1 = L~ x, T_k = 2 L~ T_{k-1} - T_{k-2}
//
// Layout. A signal x (B, V, F) is used as X = (V, B*F) row-major, so that the B*F numbers a vertex's neighbour
// contributes are one contiguous, vectorizable run. The ops return (B, V, F) tensors whose storage IS that
// layout (strides (F, B*F, 1)); an input that already has it is read without a copy, so two stacked layers
// and the FC after them (flatten(1) is a view, and GEMM takes a transposed operand for free) never transpose.
//
// Work. Each SpMM computes one output row per task (OpenMP over rows) into a row buffer that stays in L1,
// then an epilogue finishes the row: 2*acc - T_{k-2}, the weight combination, bias and ReLU for the last step
// of the forward; the Clenshaw recurrence for the backward. Every output element is computed by exactly one
// thread in a fixed order, and the dW / db reductions use fixed row blocks (their number depends on V only)
// whose partials are summed in block order, so the results are bitwise identical for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/version.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef SCANET_TORCH_VERSION
#define SCANET_TORCH_VERSION TORCH_VERSION
#endif
#ifndef SCANET_ARCH_FLAG
#define SCANET_ARCH_FLAG ""
#endif

// Read by scanet/native.py from the file's bytes BEFORE the library is loaded: one built against another torch
// (C++ ABI) or for an instruction set this CPU lacks is refused with a reason instead of crashing the process.
extern "C" __attribute__((used, visibility("default"))) const char scanet_native_build_info[] =
    "SCANET_NATIVE_BUILD{torch=" SCANET_TORCH_VERSION ";arch=" SCANET_ARCH_FLAG "}";

namespace scanet_native {
namespace {

using at::Tensor;

// Rows per reduction block: fixed, so the partial sums (and their order) do not depend on the thread count.
constexpr int64_t kReduceRows = 64;
// Independent accumulators per reduction: enough to fill the vector units, fixed for determinism.
constexpr int kLanes = 16;

// Threads for a pass touching about `work` numbers: one below kSerialWork, where a parallel region costs more
// than it saves (and, on a busy machine, can wait a scheduler quantum at its barrier). Results do not depend
// on it: every row and every reduction block is computed the same way by whichever thread runs it.
constexpr int64_t kSerialWork = 1 << 15;
inline int num_threads(int64_t work) { return work < kSerialWork ? 1 : std::max(1, at::get_num_threads()); }

template <typename T>
struct Csr {
  const int64_t* crow;
  const int64_t* col;
  const T* val;
  int64_t nnz;
};

// A 64-byte vector of T (GCC/Clang vector extension): one AVX-512 register, two AVX2 ones.
template <typename T>
struct Vec64 {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int kLen = 64 / sizeof(T);
};

// How many neighbours ahead the gathers prefetch: a neighbour's row is a random, usually L2-missing address,
// and the hardware prefetcher cannot guess it (a standalone SpMM on the 10k-word kNN graph at B=256 ran
// about 1.3x faster with it; timings on the shared machines are noisy).
constexpr int64_t kPrefetchAhead = 4;

// out[c0 : c0 + NV*kLen] = (A X)[v, same columns], the accumulators held in NV vector registers.
template <typename T, int NV>
inline void spmm_tile(const Csr<T>& A, const T* X, int64_t C, int64_t s, int64_t e, int64_t c0, int64_t nnz,
                      T* out) {
  using V = typename Vec64<T>::type;
  constexpr int L = Vec64<T>::kLen;
  V acc[NV];
  for (int i = 0; i < NV; ++i) acc[i] = V{};
  for (int64_t j = s; j < e; ++j) {
    if (j + kPrefetchAhead < nnz) {
      const char* p = reinterpret_cast<const char*>(X + A.col[j + kPrefetchAhead] * C + c0);
      for (int q = 0; q < NV; ++q) __builtin_prefetch(p + 64 * q);
    }
    const T w = A.val[j];
    const T* xr = X + A.col[j] * C + c0;
    for (int i = 0; i < NV; ++i) {
      V xv;
      std::memcpy(&xv, xr + i * L, sizeof(V));  // unaligned load
      acc[i] += w * xv;
    }
  }
  for (int i = 0; i < NV; ++i) std::memcpy(out + c0 + i * L, &acc[i], sizeof(V));
}

// out[0:C] = (A X)[v, 0:C] for X (V, C) row-major: register tiles of 8, 4, 2, 1 vectors, then a scalar tail.
// Every element is summed over the row's non-zeros in index order, whatever tile it falls in.
template <typename T>
inline void spmm_row(const Csr<T>& A, const T* X, int64_t C, int64_t v, int64_t nnz, T* out) {
  constexpr int L = Vec64<T>::kLen;
  const int64_t s = A.crow[v], e = A.crow[v + 1];
  int64_t c0 = 0;
  for (; c0 + 8 * L <= C; c0 += 8 * L) spmm_tile<T, 8>(A, X, C, s, e, c0, nnz, out);
  if (c0 + 4 * L <= C) { spmm_tile<T, 4>(A, X, C, s, e, c0, nnz, out); c0 += 4 * L; }
  if (c0 + 2 * L <= C) { spmm_tile<T, 2>(A, X, C, s, e, c0, nnz, out); c0 += 2 * L; }
  if (c0 + L <= C) { spmm_tile<T, 1>(A, X, C, s, e, c0, nnz, out); c0 += L; }
  if (c0 < C) {
    const int64_t n = C - c0;
    T acc[L] = {};
    for (int64_t j = s; j < e; ++j) {
      const T w = A.val[j];
      const T* xr = X + A.col[j] * C + c0;
      for (int64_t t = 0; t < n; ++t) acc[t] += w * xr[t];
    }
    for (int64_t t = 0; t < n; ++t) out[c0 + t] = acc[t];
  }
}

template <typename T>
inline T activate(T s, bool relu) {
  return (relu && s < T(0)) ? T(0) : s;  // s < 0 keeps NaN, as F.relu does
}

// ----------------------------------------------------------------------------- storage dtypes <-> Acc
// bf16 <-> float by bit operations (plain integer code that the compiler vectorizes; c10's scalar
// conversion does not vectorize): widening is a 16-bit shift, narrowing rounds to nearest even, NaN stays NaN.
using c10::BFloat16;
using c10::Half;

template <typename Acc, typename S>
inline Acc load_as(S v) { return static_cast<Acc>(v); }
template <>
inline float load_as<float, BFloat16>(BFloat16 v) {
  const uint32_t u = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename D, typename Acc>
inline D store_as(Acc v) { return static_cast<D>(v); }
template <>
inline BFloat16 store_as<BFloat16, float>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = (v != v) ? uint16_t(0x7FC0) : uint16_t(rounded);
  return BFloat16(bits, BFloat16::from_bits());
}

// -------------------------------------------------------------------------------------- dropout mask
// keep(i) = splitmix64(seed + (i + 1) * golden) >> 32 >= p * 2^32: SplitMix64's output function on a counter,
// so element i's bit needs no state (backward and any thread recompute it) and P(keep) = 1 - p to 2^-32.
// The seed is drawn per call from torch's default generator by scanet/native.py (torch.manual_seed and a
// saved RNG state reproduce it). Two 64-bit multiplies per element: far less than a stored bernoulli_ mask.
inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct Dropout {
  bool on = false;
  uint64_t seed = 0;
  uint64_t threshold = 0;  // keep iff hash >> 32 >= threshold; 2^32 keeps nothing (p = 1)
  double scale = 1.0;      // 1 / (1 - p); 0 for p = 1

  static Dropout make(double p, int64_t seed) {
    TORCH_CHECK(p >= 0.0 && p <= 1.0, "cheb_conv: dropout_p must be in [0, 1], got ", p);
    Dropout d;
    d.on = p > 0.0;
    d.seed = uint64_t(seed);
    d.threshold = p >= 1.0 ? (uint64_t(1) << 32) : uint64_t(p * 4294967296.0);
    d.scale = p >= 1.0 ? 0.0 : 1.0 / (1.0 - p);
    return d;
  }
  inline bool keep(uint64_t i) const {
    return (splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15ull) >> 32) >= threshold;
  }
};

// s[b * Fout + fo] *= keep(element (b, v, fo) of the (B, V, F_out) output) / (1 - p), for one vertex v.
// One channel (SCANet's text GCN): element b*V + v, a loop the compiler vectorizes (64-bit multiplies).
template <typename T>
inline void apply_dropout_row(T* s, int64_t B, int64_t Fout, int64_t v, int64_t V, const Dropout& drop) {
  const T scale = T(drop.scale);
  const uint64_t seed = drop.seed, thr = drop.threshold;
  if (Fout == 1) {
#pragma omp simd
    for (int64_t b = 0; b < B; ++b) {
      const uint64_t i = uint64_t(b) * uint64_t(V) + uint64_t(v);
      const bool keep = (splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15ull) >> 32) >= thr;
      s[b] = keep ? s[b] * scale : T(0);
    }
    return;
  }
  for (int64_t b = 0; b < B; ++b) {
    const uint64_t base = uint64_t(b) * uint64_t(V * Fout) + uint64_t(v * Fout);
    for (int64_t fo = 0; fo < Fout; ++fo)
      s[b * Fout + fo] = drop.keep(base + fo) ? s[b * Fout + fo] * scale : T(0);
  }
}

// Write one vertex's finished row: s[b * Fout + fo] (Acc, activation applied) -> dst (Ty), times the dropout
// mask of element (b, v, fo) of the (B, V, F_out) output.
template <typename T, typename Ty>
inline void finish_row(T* s, int64_t B, int64_t Fout, int64_t v, int64_t V, const Dropout& drop, Ty* dst) {
  const int64_t Co = B * Fout;
  if (drop.on) apply_dropout_row(s, B, Fout, v, V, drop);
#pragma omp simd
  for (int64_t c = 0; c < Co; ++c) dst[c] = store_as<Ty, T>(s[c]);
}

// y[b, fo] = act(bias[fo] + sum_k sum_fi rows[k][b, fi] W[k, fi, fo]) for one vertex; rows[k] is (B, F_in).
// rows[k][b, fi] sits at rows[k] + b * rstride + fi; y[b, fo] at y + b * ystride + fo.
template <typename T>
inline void combine_row(const T* const* rows, int64_t rstride, int64_t K, const T* W, const T* bias, int64_t B,
                        int64_t Fin, int64_t Fout, bool relu, T* y, int64_t ystride) {
  if (Fin == 1 && Fout == 1) {
    const T b0 = bias ? bias[0] : T(0);
    if (K == 3 && rstride == 1 && ystride == 1) {  // the SCANet case: one channel, T0..T2
      const T *r0 = rows[0], *r1 = rows[1], *r2 = rows[2];
      const T w0 = W[0], w1 = W[1], w2 = W[2];
#pragma omp simd
      for (int64_t b = 0; b < B; ++b) y[b] = activate(b0 + r0[b] * w0 + r1[b] * w1 + r2[b] * w2, relu);
      return;
    }
#pragma omp simd
    for (int64_t b = 0; b < B; ++b) y[b * ystride] = b0;
    for (int64_t k = 0; k < K; ++k) {
      const T* r = rows[k];
      const T w = W[k];
#pragma omp simd
      for (int64_t b = 0; b < B; ++b) y[b * ystride] += r[b * rstride] * w;
    }
    if (relu) {
#pragma omp simd
      for (int64_t b = 0; b < B; ++b) y[b * ystride] = activate(y[b * ystride], true);
    }
    return;
  }
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t fo = 0; fo < Fout; ++fo) {
      T s = bias ? bias[fo] : T(0);
      for (int64_t k = 0; k < K; ++k) {
        const T* r = rows[k] + b * rstride;
        const T* w = W + k * Fin * Fout + fo;
        for (int64_t fi = 0; fi < Fin; ++fi) s += r[fi] * w[fi * Fout];
      }
      y[b * ystride + fo] = activate(s, relu);
    }
  }
}

// g[b, fi] = sum_fo dz[b, fo] W_k[fi, fo]  (the gradient pulled back through the weight of term k).
template <typename T>
inline void pullback_row(const T* dz, const T* Wk, int64_t B, int64_t Fin, int64_t Fout, T* g) {
  if (Fin == 1 && Fout == 1) {
    const T w = Wk[0];
#pragma omp simd
    for (int64_t b = 0; b < B; ++b) g[b] = dz[b] * w;
    return;
  }
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t fi = 0; fi < Fin; ++fi) {
      T s = T(0);
      for (int64_t fo = 0; fo < Fout; ++fo) s += dz[b * Fout + fo] * Wk[fi * Fout + fo];
      g[b * Fin + fi] = s;
    }
  }
}

// acc[lane] += sum over b of a[b * as] * d[b * ds], in double, with kLanes fixed lanes (b % kLanes).
template <typename T>
inline void dot_lanes(const T* a, int64_t as, const T* d, int64_t ds, int64_t n, double* acc) {
  int64_t b = 0;
  if (as == 1 && ds == 1) {  // the one-channel case: contiguous, vectorized
    for (; b + kLanes <= n; b += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) acc[l] += double(a[b + l]) * double(d[b + l]);
    }
  } else {
    for (; b + kLanes <= n; b += kLanes) {
      for (int l = 0; l < kLanes; ++l) acc[l] += double(a[(b + l) * as]) * double(d[(b + l) * ds]);
    }
  }
  for (int l = 0; b + l < n; ++l) acc[l] += double(a[(b + l) * as]) * double(d[(b + l) * ds]);
}

template <typename T>
inline void sum_lanes(const T* d, int64_t ds, int64_t n, double* acc) {
  int64_t b = 0;
  if (ds == 1) {
    for (; b + kLanes <= n; b += kLanes) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) acc[l] += double(d[b + l]);
    }
  } else {
    for (; b + kLanes <= n; b += kLanes) {
      for (int l = 0; l < kLanes; ++l) acc[l] += double(d[(b + l) * ds]);
    }
  }
  for (int l = 0; b + l < n; ++l) acc[l] += double(d[(b + l) * ds]);
}

// Deterministic reduction of per-block lane partials: part is (nblocks, nout, kLanes); out[i] = sum in order.
inline std::vector<double> combine_partials(const std::vector<double>& part, int64_t nblocks, int64_t nout) {
  std::vector<double> out(nout, 0.0);
  for (int64_t blk = 0; blk < nblocks; ++blk)
    for (int64_t i = 0; i < nout; ++i) {
      const double* p = part.data() + (blk * nout + i) * kLanes;
      double s = 0.0;
      for (int l = 0; l < kLanes; ++l) s += p[l];
      out[i] += s;
    }
  return out;
}

// ------------------------------------------------------------------------------------------------ checks
void check_csr(const Tensor& crow, const Tensor& col, const Tensor& values, int64_t V, const char* what) {
  TORCH_CHECK(crow.device().is_cpu() && col.device().is_cpu() && values.device().is_cpu(),
              what, ": the native CPU op needs CPU tensors");
  TORCH_CHECK(crow.scalar_type() == at::kLong && col.scalar_type() == at::kLong,
              what, ": crow and col indices must be int64");
  TORCH_CHECK(crow.dim() == 1 && crow.numel() == V + 1, what, ": crow must have V+1 = ", V + 1,
              " entries, got shape ", crow.sizes());
  TORCH_CHECK(col.dim() == 1 && values.dim() == 1 && col.numel() == values.numel(),
              what, ": col and values must be 1-D of equal length");
}

// The kernels index X by col and walk rows by crow: a bad index would read out of bounds, so every op that
// takes a Laplacian checks it first. O(V + nnz), serial: about 0.1 ms for the 10k-word graph, less than the
// cost of one more parallel region (and its barrier) on a busy machine.
void validate_csr(const Tensor& crow, const Tensor& col, int64_t V, const char* what) {
  const Tensor cr = crow.contiguous(), cl = col.contiguous();
  const int64_t* rp = cr.data_ptr<int64_t>();
  const int64_t* cp = cl.data_ptr<int64_t>();
  const int64_t nnz = cl.numel();
  TORCH_CHECK(rp[0] == 0 && rp[V] == nnz, what, ": laplacian_csr has a malformed crow_indices array "
              "(crow[0] must be 0 and crow[-1] the number of non-zeros)");
  for (int64_t v = 0; v < V; ++v)
    TORCH_CHECK(rp[v + 1] >= rp[v], what, ": laplacian_csr has a malformed crow_indices array (decreasing at row ",
                v, ")");
  int64_t bad_col = 0;
  for (int64_t j = 0; j < nnz; ++j) bad_col += (cp[j] < 0) | (cp[j] >= V);
  TORCH_CHECK(bad_col == 0, what, ": laplacian_csr has ", bad_col, " column indices out of range [0, ", V, ")");
}

// Is a (B, V, F) tensor stored as (V, B, F) row-major (the layout the kernels read)?
inline bool is_vb(const Tensor& x) { return x.permute({1, 0, 2}).is_contiguous(); }

inline Tensor empty_vb(int64_t B, int64_t V, int64_t F, const at::TensorOptions& opt) {
  return at::empty_strided({B, V, F}, {F, B * F, 1}, opt);
}

// (B, V, F) -> the same values stored as (V, B, F): a view when x has that layout, else a copy (into `out`
// when given). The copy is torch's: its tiled transpose measured 4x faster here than a plain 32x32 tiling.
inline Tensor vb_layout(const Tensor& x, Tensor out = Tensor()) {
  if (is_vb(x)) return x.permute({1, 0, 2});
  const int64_t B = x.size(0), V = x.size(1), F = x.size(2);
  if (!out.defined()) out = at::empty({V, B, F}, x.options());
  out.view({V, B, F}).copy_(x.permute({1, 0, 2}));
  return out.view({V, B, F});
}

// ---------------------------------------------------------------------------------------------- forward
// T_k rows: T_0 is X; T_k (1 <= k < K) is at basis + (k - 1) * V * C (the saved basis, or scratch).
// One unfused Chebyshev step over all rows: out = L prev (prev2 == nullptr, i.e. T_1), else 2 L prev - prev2.
template <typename T>
void cheb_step(const Csr<T>& A, const T* prev, const T* prev2, int64_t V, int64_t C, int nt, T* out) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 16)
  for (int64_t v = 0; v < V; ++v) {
    T* o = out + v * C;
    spmm_row(A, prev, C, v, A.nnz, o);
    if (prev2) {
      const T* p2 = prev2 + v * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] = T(2) * o[c] - p2[c];
    }
  }
}

template <typename T, typename Ty>
void forward_impl(const Csr<T>& A, const T* X, int64_t V, int64_t B, int64_t Fin, int64_t Fout, int64_t K,
                  const T* W, const T* bias, bool relu, const Dropout& drop, T* basis, bool keep_last, Ty* y) {
  const int64_t C = B * Fin, Co = B * Fout;
  const int nt = num_threads((V + A.nnz) * (C + Co));
  auto Tk = [&](int64_t k) -> T* { return k == 0 ? const_cast<T*>(X) : basis + (k - 1) * V * C; };
  if (K == 1) {
#pragma omp parallel num_threads(nt)
    {
      std::vector<T> ys(Co);
#pragma omp for schedule(static)
      for (int64_t v = 0; v < V; ++v) {
        const T* rows[1] = {X + v * C};
        combine_row(rows, Fin, 1, W, bias, B, Fin, Fout, relu, ys.data(), Fout);
        finish_row(ys.data(), B, Fout, v, V, drop, y + v * Co);
      }
    }
    return;
  }
  for (int64_t k = 1; k < K - 1; ++k)  // the unfused steps (K >= 3): T_k = 2 L T_{k-1} - T_{k-2}
    cheb_step(A, Tk(k - 1), k >= 2 ? Tk(k - 2) : nullptr, V, C, nt, Tk(k));
  // The last step, fused: the T_{K-1} row (kept only for backward), then the weight combination, bias,
  // activation and dropout of all K rows of the vertex, written straight into y (in its storage dtype).
  const int64_t k = K - 1;
  const T* prev = Tk(k - 1);
  const T* prev2 = k >= 2 ? Tk(k - 2) : nullptr;
#pragma omp parallel num_threads(nt)
  {
    std::vector<T> buf(keep_last ? 0 : C), ys(Co);
    std::vector<const T*> rows(K);
#pragma omp for schedule(dynamic, 16)
    for (int64_t v = 0; v < V; ++v) {
      T* o = keep_last ? Tk(k) + v * C : buf.data();
      spmm_row(A, prev, C, v, A.nnz, o);
      if (prev2) {
        const T* p2 = prev2 + v * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = T(2) * o[c] - p2[c];
      }
      for (int64_t j = 0; j < K - 1; ++j) rows[j] = Tk(j) + v * C;
      rows[K - 1] = o;
      combine_row(rows.data(), Fin, K, W, bias, B, Fin, Fout, relu, ys.data(), Fout);
      finish_row(ys.data(), B, Fout, v, V, drop, y + v * Co);
    }
  }
}

// Call f(Ty{}) with Ty the C++ type of a storage dtype (float, double, bfloat16, half).
template <typename F>
inline void dispatch_storage(at::ScalarType st, const char* what, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(BFloat16{}); break;
    case at::kHalf: f(Half{}); break;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", st);
  }
}

inline bool is_low(at::ScalarType st) { return st == at::kBFloat16 || st == at::kHalf; }

// The compute dtype of a call: float64 for float64 x, else float32 (x float32, bfloat16 or float16).
inline at::ScalarType acc_dtype(const Tensor& x, const char* what) {
  const at::ScalarType st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || is_low(st), what,
              ": x must be float32, float64, bfloat16 or float16, got ", st);
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// (B, V, F) -> the same values stored as (V, B, F) in `dtype`: a view when x has that layout and dtype, else
// one copy (ATen's copy_ transposes and converts in one pass).
inline Tensor vb_layout_as(const Tensor& x, at::ScalarType dtype) {
  if (x.scalar_type() == dtype) return vb_layout(x);
  const int64_t B = x.size(0), V = x.size(1), F = x.size(2);
  Tensor out = at::empty({V, B, F}, x.options().dtype(dtype));
  out.copy_(x.permute({1, 0, 2}));
  return out;
}

// Returns (y, saved). saved is what backward needs for dW, in Acc: T_1..T_{K-1}, preceded by T_0 when x is not
// stored as (V, B, F) in Acc (its tiled, converted copy, so that backward need not transpose x again):
// (K-1 or K, V, B*F_in), or (0, V, B*F_in) without save_basis. y is written in out_dtype (default x's dtype).
std::tuple<Tensor, Tensor> cheb_conv_forward(const Tensor& crow, const Tensor& col, const Tensor& values,
                                             const Tensor& x, const Tensor& weight,
                                             const c10::optional<Tensor>& bias, bool relu, bool save_basis,
                                             bool symmetric, double dropout_p, int64_t seed,
                                             c10::optional<at::ScalarType> out_dtype) {
  (void)symmetric;  // for autograd only: backward then propagates with L~ itself (no transpose)
  TORCH_CHECK(x.dim() == 3 && weight.dim() == 3, "cheb_conv_forward: x (B, V, F_in), weight (K, F_in, F_out)");
  const int64_t B = x.size(0), V = x.size(1), Fin = x.size(2);
  const int64_t K = weight.size(0), Fout = weight.size(2);
  TORCH_CHECK(K >= 1 && weight.size(1) == Fin, "cheb_conv_forward: weight must be (K >= 1, F_in, F_out)");
  check_csr(crow, col, values, V, "cheb_conv_forward");
  validate_csr(crow, col, V, "cheb_conv_forward");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "cheb_conv_forward: CPU tensors only");
  const at::ScalarType acc = acc_dtype(x, "cheb_conv_forward");
  TORCH_CHECK(values.scalar_type() == acc && weight.scalar_type() == acc,
              "cheb_conv_forward: weight and the Laplacian values must be ", acc, " for x of dtype ",
              x.scalar_type(), " (got ", weight.scalar_type(), " and ", values.scalar_type(), ")");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == Fout && bias->scalar_type() == acc,
                "cheb_conv_forward: bias must be (F_out,) of dtype ", acc);
  }
  const at::ScalarType ydt = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(acc == at::kDouble ? ydt == at::kDouble : (ydt == at::kFloat || is_low(ydt)),
              "cheb_conv_forward: out_dtype ", ydt, " does not go with x of dtype ", x.scalar_type());
  const Dropout drop = Dropout::make(dropout_p, seed);
  const int64_t C = B * Fin;
  const bool x_direct = is_vb(x) && x.scalar_type() == acc;  // T_0 read in place
  const int64_t t0 = x_direct ? 0 : 1;  // T_0 copy at the front of the buffer
  const int64_t nsaved = save_basis ? K - 1 + t0 : 0;
  // Without save_basis the buffer is scratch: T_0's copy and T_1..T_{K-2} (the last step stays in registers).
  const int64_t nbuf = save_basis ? nsaved : t0 + std::max<int64_t>(K - 2, 0);
  Tensor buf = at::empty({nbuf, V, C}, x.options().dtype(acc));
  Tensor X;
  if (x_direct) {
    X = vb_layout(x);
  } else {
    X = buf.select(0, 0).view({V, B, Fin});
    X.copy_(x.permute({1, 0, 2}));  // transpose and convert in one pass
  }
  const Tensor Wc = weight.contiguous();
  const Tensor bc = bias.has_value() ? bias->contiguous() : Tensor();
  const Tensor crow_c = crow.contiguous(), col_c = col.contiguous(), val_c = values.contiguous();
  Tensor y = empty_vb(B, V, Fout, x.options().dtype(ydt));
  AT_DISPATCH_FLOATING_TYPES(acc, "cheb_conv_forward", [&] {
    using T = scalar_t;
    dispatch_storage(ydt, "cheb_conv_forward", [&](auto tag) {
      using Ty = decltype(tag);
      Csr<T> A{crow_c.data_ptr<int64_t>(), col_c.data_ptr<int64_t>(), val_c.data_ptr<T>(), col_c.numel()};
      T* basis = (nbuf > t0) ? buf.data_ptr<T>() + t0 * V * C : nullptr;
      forward_impl<T, Ty>(A, X.data_ptr<T>(), V, B, Fin, Fout, K, Wc.data_ptr<T>(),
                          bc.defined() ? bc.data_ptr<T>() : nullptr, relu, drop, basis, save_basis,
                          static_cast<Ty*>(y.data_ptr()));
    });
  });
  if (!save_basis) buf = at::empty({0, V, C}, x.options().dtype(acc));
  return {y, buf};
}

// --------------------------------------------------------------------------------------------- backward
// dz = grad_y masked by the ReLU (y > 0) and by the regenerated dropout mask (times 1/(1-p));
// dW_k = sum_{v,b} T_k[v,b,:]^T dz[v,b,:], db = sum dz (fixed row blocks);
// with dx wanted, also b_{K-1} = G_{K-1} = dz W_{K-1}^T, the start of the Clenshaw recurrence below.
// gy is the gradient stored as (V, B, F_out) in Acc; yv the output, in its storage dtype Ty.
template <typename T, typename Ty>
void reduce_and_mask(const T* gy, const Ty* yv, bool relu, const Dropout& drop, const T* const* Trows, int64_t V,
                     int64_t B, int64_t Fin, int64_t Fout, int64_t K, const T* W, bool need_w, bool need_b, T* dZ,
                     T* bstart, double* dW, double* db) {
  const int64_t C = B * Fin, Co = B * Fout;
  const int64_t nblocks = (V + kReduceRows - 1) / kReduceRows;
  const int64_t nw = need_w ? K * Fin * Fout : 0, nb = need_b ? Fout : 0, nout = nw + nb;
  const bool masked = relu || drop.on;
  std::vector<double> part(std::max<int64_t>(1, nblocks * nout * kLanes), 0.0);
  const int nt = num_threads(V * (C * K + Co));
#pragma omp parallel num_threads(nt)
  {
    std::vector<T> zbuf(masked && !dZ ? Co : 0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      double* p = part.data() + blk * nout * kLanes;
      const int64_t v1 = std::min(V, (blk + 1) * kReduceRows);
      for (int64_t v = blk * kReduceRows; v < v1; ++v) {
        const T* g = gy + v * Co;
        const T* z = g;  // without ReLU and dropout dz is grad_y itself
        if (masked) {
          T* zw = dZ ? dZ + v * Co : zbuf.data();
          if (relu) {
            const Ty* yr = yv + v * Co;
#pragma omp simd
            for (int64_t c = 0; c < Co; ++c) zw[c] = load_as<T>(yr[c]) > T(0) ? g[c] : T(0);
          } else {
#pragma omp simd
            for (int64_t c = 0; c < Co; ++c) zw[c] = g[c];
          }
          if (drop.on) apply_dropout_row(zw, B, Fout, v, V, drop);
          z = zw;
        }
        if (need_w) {
          for (int64_t k = 0; k < K; ++k) {
            const T* t = Trows[k] + v * C;
            for (int64_t fi = 0; fi < Fin; ++fi)
              for (int64_t fo = 0; fo < Fout; ++fo)
                dot_lanes(t + fi, Fin, z + fo, Fout, B, p + ((k * Fin + fi) * Fout + fo) * kLanes);
          }
        }
        if (need_b) {
          for (int64_t fo = 0; fo < Fout; ++fo) sum_lanes(z + fo, Fout, B, p + (nw + fo) * kLanes);
        }
        if (bstart) pullback_row(z, W + (K - 1) * Fin * Fout, B, Fin, Fout, bstart + v * C);
      }
    }
  }
  if (nout) {
    const std::vector<double> tot = combine_partials(part, nblocks, nout);
    for (int64_t i = 0; i < nw; ++i) dW[i] = tot[i];
    for (int64_t i = 0; i < nb; ++i) db[i] = tot[nw + i];
  }
}

// dx = sum_k T_k(A) G_k with A = L~^T and G_k = dz W_k^T, by Clenshaw (K-1 SpMMs, as many as the forward):
//   b_{K-1} = G_{K-1};  b_k = G_k + 2 A b_{k+1} - b_{k+2} (k = K-2..1);  dx = G_0 + A b_1 - b_2.
// b_k overwrites b_{k+2} in place: row v of b_{k+2} is read only by the task that writes row v of b_k.
template <typename T>
void clenshaw_dx(const Csr<T>& A, const T* dZ, int64_t V, int64_t B, int64_t Fin, int64_t Fout, int64_t K,
                 const T* W, T* b_hi /* b_{K-1}, filled */, T* b_lo /* scratch */, T* dx) {
  const int64_t C = B * Fin, Co = B * Fout;
  const int nt = num_threads((V + A.nnz) * C);
  T* b1 = b_hi;  // b_{k+1}
  T* b2 = nullptr;  // b_{k+2} (zero when null)
  for (int64_t k = K - 2; k >= 0; --k) {
    T* out = k == 0 ? dx : (b2 ? b2 : b_lo);
    const T* Wk = W + k * Fin * Fout;
    const T twice = k == 0 ? T(1) : T(2);
#pragma omp parallel num_threads(nt)
    {
      std::vector<T> acc(C), g(C);
#pragma omp for schedule(dynamic, 16)
      for (int64_t v = 0; v < V; ++v) {
        spmm_row(A, b1, C, v, A.nnz, acc.data());
        pullback_row(dZ + v * Co, Wk, B, Fin, Fout, g.data());
        T* o = out + v * C;
        if (b2) {
          const T* p2 = b2 + v * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) o[c] = g[c] + twice * acc[c] - p2[c];
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) o[c] = g[c] + twice * acc[c];
        }
      }
    }
    b2 = b1;
    b1 = out;
  }
}

std::tuple<Tensor, Tensor, Tensor> cheb_conv_backward(
    const Tensor& grad_y, const Tensor& crow, const Tensor& col, const Tensor& values,
    const c10::optional<Tensor>& crow_t, const c10::optional<Tensor>& col_t, const c10::optional<Tensor>& values_t,
    const Tensor& x, const Tensor& saved, const Tensor& y, const Tensor& weight, bool relu, bool has_bias,
    bool need_x, bool need_w, bool need_b, double dropout_p, int64_t seed) {
  const int64_t B = x.size(0), V = x.size(1), Fin = x.size(2);
  const int64_t K = weight.size(0), Fout = weight.size(2);
  TORCH_CHECK(grad_y.dim() == 3 && grad_y.size(0) == B && grad_y.size(1) == V && grad_y.size(2) == Fout,
              "cheb_conv_backward: grad_y must be (B, V, F_out)");
  TORCH_CHECK(y.dim() == 3 && y.size(0) == B && y.size(1) == V && y.size(2) == Fout,
              "cheb_conv_backward: y must be (B, V, F_out)");
  const at::ScalarType acc = acc_dtype(x, "cheb_conv_backward");
  const at::ScalarType ydt = y.scalar_type();
  TORCH_CHECK(weight.scalar_type() == acc && values.scalar_type() == acc &&
                  (saved.numel() == 0 || saved.scalar_type() == acc),
              "cheb_conv_backward: weight, values and the saved basis must be ", acc);
  TORCH_CHECK(acc == at::kDouble ? ydt == at::kDouble : (ydt == at::kFloat || is_low(ydt)),
              "cheb_conv_backward: y of dtype ", ydt, " does not go with x of dtype ", x.scalar_type());
  TORCH_CHECK(grad_y.is_floating_point(), "cheb_conv_backward: grad_y must be floating point");
  const Dropout drop = Dropout::make(dropout_p, seed);
  const bool x_direct = is_vb(x) && x.scalar_type() == acc;
  const int64_t t0 = x_direct ? 0 : 1;
  TORCH_CHECK(saved.dim() == 3 && saved.size(1) == V && saved.size(2) == B * Fin &&
                  (saved.size(0) == K - 1 + t0 || (!need_w && saved.size(0) == 0)),
              "cheb_conv_backward: the saved basis must be what cheb_conv_forward returned with save_basis=True");
  check_csr(crow, col, values, V, "cheb_conv_backward");
  const bool transposed = crow_t.has_value();
  validate_csr(crow, col, V, "cheb_conv_backward");
  if (transposed) {
    TORCH_CHECK(col_t.has_value() && values_t.has_value(), "cheb_conv_backward: give all three transpose arrays");
    check_csr(*crow_t, *col_t, *values_t, V, "cheb_conv_backward (transpose)");
    validate_csr(*crow_t, *col_t, V, "cheb_conv_backward (transpose)");
  }
  need_b = need_b && has_bias;
  const int64_t C = B * Fin, Co = B * Fout;
  const Tensor Sc = saved.contiguous();
  const Tensor X = (need_w && x_direct) ? vb_layout(x) : Tensor();  // T_0 (a view), when not in saved
  // The text FC hands back a (B, V) gradient: one transposing (and, for bf16, widening) copy.
  const Tensor Gy = vb_layout_as(grad_y, acc);
  const Tensor Y = vb_layout(y);
  const Tensor Wc = weight.contiguous();
  // dx is computed in Acc; for a low-precision x it is narrowed once at the end.
  Tensor dx = need_x ? empty_vb(B, V, Fin, x.options().dtype(acc)) : Tensor();
  Tensor dW = need_w ? at::empty_like(weight, at::MemoryFormat::Contiguous) : Tensor();
  Tensor db = need_b ? at::empty({Fout}, weight.options()) : Tensor();
  // The Clenshaw steps (K >= 2) re-read dz: it gets its own buffer when the ReLU or the dropout makes it
  // differ from grad_y. b_{K-1} starts the recurrence.
  const bool clenshaw = need_x && K >= 2;
  const bool masked = relu || drop.on;
  Tensor dZ = (clenshaw && masked) ? at::empty({V, Co}, x.options().dtype(acc)) : Tensor();
  Tensor b_hi = clenshaw ? at::empty({V, C}, x.options().dtype(acc)) : Tensor();
  Tensor b_lo = (clenshaw && K >= 3) ? at::empty({V, C}, x.options().dtype(acc)) : Tensor();
  const Tensor crow_u = (transposed ? *crow_t : crow).contiguous();
  const Tensor col_u = (transposed ? *col_t : col).contiguous();
  const Tensor val_u = (transposed ? *values_t : values).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "cheb_conv_backward", [&] {
    using T = scalar_t;
    dispatch_storage(ydt, "cheb_conv_backward", [&](auto tag) {
      using Ty = decltype(tag);
      const T* Wp = Wc.data_ptr<T>();
      std::vector<const T*> Trows(K, nullptr);
      if (need_w) {
        T* sp = Sc.data_ptr<T>();
        Trows[0] = x_direct ? X.data_ptr<T>() : sp;
        for (int64_t k = 1; k < K; ++k) Trows[k] = sp + (k - 1 + t0) * V * C;
      }
      std::vector<double> dWd(need_w ? K * Fin * Fout : 0), dbd(need_b ? Fout : 0);
      // With K == 1 there is no recurrence: dx = dz W_0^T is written by the first pass directly.
      T* dz_p = dZ.defined() ? dZ.data_ptr<T>() : nullptr;
      T* bstart = clenshaw ? b_hi.data_ptr<T>() : ((need_x && K == 1) ? dx.data_ptr<T>() : nullptr);
      reduce_and_mask<T, Ty>(Gy.data_ptr<T>(), static_cast<const Ty*>(Y.data_ptr()), relu, drop, Trows.data(), V,
                             B, Fin, Fout, K, Wp, need_w, need_b, dz_p, bstart, dWd.data(), dbd.data());
      if (clenshaw) {
        Csr<T> A{crow_u.data_ptr<int64_t>(), col_u.data_ptr<int64_t>(), val_u.data_ptr<T>(), col_u.numel()};
        const T* dzr = dz_p ? dz_p : Gy.data_ptr<T>();
        clenshaw_dx<T>(A, dzr, V, B, Fin, Fout, K, Wp, b_hi.data_ptr<T>(),
                       b_lo.defined() ? b_lo.data_ptr<T>() : nullptr, dx.data_ptr<T>());
      }
      if (need_w) {
        T* o = dW.data_ptr<T>();
        for (size_t i = 0; i < dWd.size(); ++i) o[i] = T(dWd[i]);
      }
      if (need_b) {
        T* o = db.data_ptr<T>();
        for (size_t i = 0; i < dbd.size(); ++i) o[i] = T(dbd[i]);
      }
    });
  });
  if (need_x && x.scalar_type() != acc) {
    Tensor narrow = empty_vb(B, V, Fin, x.options());
    narrow.copy_(dx);
    dx = narrow;
  }
  return {dx, dW, db};
}

// The keep mask (bool, n elements) that a call with (dropout_p, seed) applies to its (B, V, F_out) output,
// flattened in row-major order: for tests and for anyone who needs to see it.
Tensor dropout_keep_mask(int64_t seed, int64_t n, double p) {
  TORCH_CHECK(n >= 0, "dropout_keep_mask: n must be >= 0");
  const Dropout drop = Dropout::make(p, seed);
  Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kBool));
  bool* o = out.data_ptr<bool>();
  const int nt = num_threads(n);
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < n; ++i) o[i] = !drop.on || drop.keep(uint64_t(i));
  return out;
}

// ---------------------------------------------------------------------------------------- transpose CSR
// Counting sort by column, rows visited in order: the transpose comes out with sorted column indices and is
// the same on every run. O(nnz + V), single-threaded (about a millisecond for 160k non-zeros).
std::tuple<Tensor, Tensor, Tensor> csr_transpose(const Tensor& crow, const Tensor& col, const Tensor& values) {
  TORCH_CHECK(crow.dim() == 1 && crow.numel() >= 1, "csr_transpose: crow must be 1-D with V+1 >= 1 entries");
  const int64_t V = crow.numel() - 1;
  check_csr(crow, col, values, V, "csr_transpose");
  validate_csr(crow, col, V, "csr_transpose");
  const Tensor cr = crow.contiguous(), cl = col.contiguous(), vl = values.contiguous();
  const int64_t nnz = cl.numel();
  Tensor crow_t = at::zeros({V + 1}, crow.options());
  Tensor col_t = at::empty({nnz}, col.options());
  Tensor val_t = at::empty({nnz}, values.options());
  const int64_t* rp = cr.data_ptr<int64_t>();
  const int64_t* cp = cl.data_ptr<int64_t>();
  int64_t* tp = crow_t.data_ptr<int64_t>();
  for (int64_t j = 0; j < nnz; ++j) ++tp[cp[j] + 1];
  for (int64_t i = 0; i < V; ++i) tp[i + 1] += tp[i];
  std::vector<int64_t> next(tp, tp + V);
  int64_t* ct = col_t.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "csr_transpose", [&] {
    const scalar_t* vp = vl.data_ptr<scalar_t>();
    scalar_t* vt = val_t.data_ptr<scalar_t>();
    for (int64_t r = 0; r < V; ++r)
      for (int64_t j = rp[r]; j < rp[r + 1]; ++j) {
        const int64_t dst = next[cp[j]]++;
        ct[dst] = r;
        vt[dst] = vp[j];
      }
  });
  return {crow_t, col_t, val_t};
}

// ------------------------------------------------------------------------------------------ basis cache
// [T_0 x, ..., T_{K-1} x] as one (K, B, V, F) tensor whose storage is (K, V, B, F): basis[k] is a (B, V, F)
// signal in the layout the ops read without a copy. base[0] holds T_0 already.
template <typename T>
void basis_impl(const Csr<T>& A, int64_t V, int64_t C, int64_t K, T* base) {
  const int nt = num_threads((V + A.nnz) * C);
  for (int64_t k = 1; k < K; ++k)
    cheb_step(A, base + (k - 1) * V * C, k >= 2 ? base + (k - 2) * V * C : nullptr, V, C, nt, base + k * V * C);
}

Tensor chebyshev_basis(const Tensor& crow, const Tensor& col, const Tensor& values, const Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 3, "chebyshev_basis: x must be (B, V, F)");
  TORCH_CHECK(K >= 1, "chebyshev_basis: K must be >= 1");
  const int64_t B = x.size(0), V = x.size(1), F = x.size(2), C = B * F;
  check_csr(crow, col, values, V, "chebyshev_basis");
  validate_csr(crow, col, V, "chebyshev_basis");
  TORCH_CHECK(x.device().is_cpu(), "chebyshev_basis: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), "chebyshev_basis: x and values must share one dtype");
  Tensor out = at::empty_strided({K, B, V, F}, {V * C, F, C, 1}, x.options());
  if (is_vb(x)) {
    out.select(0, 0).copy_(x);  // T_0: a plain copy, same storage order
  } else {
    vb_layout(x, out.select(0, 0).permute({1, 0, 2}));  // T_0: a tiled transpose into the (V, B, F) order
  }
  const Tensor crow_c = crow.contiguous(), col_c = col.contiguous(), val_c = values.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "chebyshev_basis", [&] {
    Csr<scalar_t> A{crow_c.data_ptr<int64_t>(), col_c.data_ptr<int64_t>(), val_c.data_ptr<scalar_t>(), col_c.numel()};
    basis_impl<scalar_t>(A, V, C, K, out.data_ptr<scalar_t>());
  });
  return out;
}

// ------------------------------------------------------------------------------------ from a cached basis
// act(sum_k basis[k] W_k + b) from a precomputed basis (K, B, V, F_in): no SpMM at all. Two layouts are read
// in place: "rows", each basis[k] stored as (V, B, F_in) (what chebyshev_basis returns), and "runs", F_in = 1
// with V contiguous (a batch gathered from a per-text cache, basis[:, i] = cache[text_i]); any other layout is
// copied to one of them first.
enum class BasisLayout { kRows, kRuns };

inline BasisLayout basis_layout(Tensor& basis) {
  if (is_vb(basis.select(0, 0))) return BasisLayout::kRows;
  if (basis.size(3) == 1 && basis.stride(2) == 1) return BasisLayout::kRuns;
  if (basis.size(3) == 1) {
    basis = basis.contiguous();
    return BasisLayout::kRuns;
  }
  basis = basis.permute({0, 2, 1, 3}).contiguous().permute({0, 2, 1, 3});
  return BasisLayout::kRows;
}

// The basis the kernels read: (K, B, V, F_in), or rows `index` of a cache (K, N, V, F_in). "runs" read a cache
// in place (signal b starts at boff[b]: no gather of B x K x V numbers per step); other layouts are gathered.
struct BasisView {
  Tensor basis;
  BasisLayout layout;
  std::vector<int64_t> boff;
  int64_t B;
};

BasisView resolve_basis(const Tensor& basis_in, const c10::optional<Tensor>& index, const char* what) {
  BasisView view{basis_in, BasisLayout::kRuns, {}, basis_in.size(1)};
  if (index.has_value()) {
    const Tensor& idx = *index;
    TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong && idx.device().is_cpu(),
                what, ": index must be a 1-D int64 CPU tensor");
    const Tensor ic = idx.contiguous();
    const int64_t* ip = ic.data_ptr<int64_t>();
    const int64_t N = basis_in.size(1);
    for (int64_t b = 0; b < ic.numel(); ++b)
      TORCH_CHECK(ip[b] >= 0 && ip[b] < N, what, ": index ", ip[b], " out of range for ", N, " cached signals");
    view.B = ic.numel();
    if (basis_in.size(3) == 1 && basis_in.stride(2) == 1) {
      view.boff.resize(view.B);
      for (int64_t b = 0; b < view.B; ++b) view.boff[b] = ip[b] * basis_in.stride(1);
      return view;
    }
    view.basis = basis_in.index_select(1, ic);
  }
  view.layout = basis_layout(view.basis);
  view.boff.resize(view.B);
  for (int64_t b = 0; b < view.B; ++b) view.boff[b] = b * view.basis.stride(1);
  return view;
}

// A block reads B * K short runs, each in another row of the basis: too many streams for the hardware
// prefetcher, so each run asks for the same run of the next block (measured 8 -> 4.5 ms forward at B=256,
// V=10k, one thread).
template <typename T>
inline void prefetch_next_run(const T* run, int64_t n) {
  const char* p = reinterpret_cast<const char*>(run + n);
  for (int64_t off = 0; off < n * int64_t(sizeof(T)); off += 64) __builtin_prefetch(p + off);
}

// dst[r] = bias + sum_k basis_k[b, v0 + r] w_k for one (b, f_out) and a run of nv vertices. Forward and backward
// (which recomputes the ReLU mask from it instead of reading y across rows) share it, so both see one value.
template <typename T>
inline void preact_run(const T* basis, const int64_t* bs, const int64_t* boff, int64_t K, int64_t b, int64_t v0,
                       int64_t nv, const T* W, int64_t fo, int64_t Fout, const T* bias, T* dst) {
  const T b0 = bias ? bias[fo] : T(0);
#pragma omp simd
  for (int64_t r = 0; r < nv; ++r) dst[r] = b0;
  for (int64_t k = 0; k < K; ++k) {
    const T* src = basis + k * bs[0] + boff[b] + v0;
    prefetch_next_run(src, nv);
    const T w = W[k * Fout + fo];
#pragma omp simd
    for (int64_t r = 0; r < nv; ++r) dst[r] += src[r] * w;
  }
}

// "runs": s[(b, fo), r] for a block of kRunRows vertices, r innermost like the basis runs, then written out
// as y rows: a transpose through a small scratch (kRunRows x B numbers).
constexpr int64_t kRunRows = 64;

template <typename T>
void from_basis_runs_forward(const T* basis, const int64_t* bs, const int64_t* boff, int64_t K, int64_t B,
                             int64_t V, int64_t Fout, const T* W, const T* bias, bool relu, T* y) {
  const int64_t Co = B * Fout;
  const int64_t nblocks = (V + kRunRows - 1) / kRunRows;
  const int nt = num_threads(V * Co * (K + 1));
#pragma omp parallel num_threads(nt)
  {
    std::vector<T> s(Co * kRunRows);
#pragma omp for schedule(dynamic, 4)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t v0 = blk * kRunRows, nv = std::min(V, v0 + kRunRows) - v0;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t fo = 0; fo < Fout; ++fo)
          preact_run(basis, bs, boff, K, b, v0, nv, W, fo, Fout, bias, s.data() + (b * Fout + fo) * kRunRows);
      T* yo = y + v0 * Co;
      for (int64_t r = 0; r < nv; ++r)
        for (int64_t c = 0; c < Co; ++c) yo[r * Co + c] = activate(s[c * kRunRows + r], relu);
    }
  }
}

// "rows": one vertex at a time, the same epilogue as the last step of cheb_conv's forward.
template <typename T>
void from_basis_rows_forward(const T* basis, const int64_t* bs, int64_t K, int64_t B, int64_t V, int64_t Fin,
                             int64_t Fout, const T* W, const T* bias, bool relu, T* y) {
  const int64_t Co = B * Fout;
  const int nt = num_threads(V * (B * Fin * K + Co));
#pragma omp parallel num_threads(nt)
  {
    std::vector<const T*> rows(K);
#pragma omp for schedule(static)
    for (int64_t v = 0; v < V; ++v) {
      for (int64_t k = 0; k < K; ++k) rows[k] = basis + k * bs[0] + v * bs[2];
      combine_row(rows.data(), Fin, K, W, bias, B, Fin, Fout, relu, y + v * Co, Fout);
    }
  }
}

Tensor cheb_conv_from_basis_forward(const Tensor& basis_in, const Tensor& weight, const c10::optional<Tensor>& bias,
                                    bool relu, const c10::optional<Tensor>& index) {
  TORCH_CHECK(basis_in.dim() == 4 && weight.dim() == 3 && basis_in.size(0) == weight.size(0) &&
                  basis_in.size(3) == weight.size(1),
              "cheb_conv_from_basis: basis (K, B, V, F_in) and weight (K, F_in, F_out) do not match");
  TORCH_CHECK(basis_in.device().is_cpu() && weight.device().is_cpu(), "cheb_conv_from_basis: CPU tensors only");
  TORCH_CHECK(basis_in.scalar_type() == weight.scalar_type(), "cheb_conv_from_basis: one dtype");
  const int64_t K = basis_in.size(0), V = basis_in.size(2), Fin = basis_in.size(3);
  const int64_t Fout = weight.size(2);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == Fout && bias->scalar_type() == weight.scalar_type(),
                "cheb_conv_from_basis: bias must be (F_out,) of the same dtype");
  }
  const BasisView view = resolve_basis(basis_in, index, "cheb_conv_from_basis");
  const int64_t B = view.B;
  Tensor y = empty_vb(B, V, Fout, basis_in.options());
  const Tensor Wc = weight.contiguous();
  const Tensor bc = bias.has_value() ? bias->contiguous() : Tensor();
  const Tensor& basis = view.basis;
  const int64_t bs[4] = {basis.stride(0), basis.stride(1), basis.stride(2), basis.stride(3)};
  AT_DISPATCH_FLOATING_TYPES(basis.scalar_type(), "cheb_conv_from_basis_forward", [&] {
    using T = scalar_t;
    const T* bp = basis.data_ptr<T>();
    const T* Wp = Wc.data_ptr<T>();
    const T* biasp = bc.defined() ? bc.data_ptr<T>() : nullptr;
    T* yp = y.data_ptr<T>();
    if (view.layout == BasisLayout::kRuns) {
      from_basis_runs_forward<T>(bp, bs, view.boff.data(), K, B, V, Fout, Wp, biasp, relu, yp);
    } else {
      from_basis_rows_forward<T>(bp, bs, K, B, V, Fin, Fout, Wp, biasp, relu, yp);
    }
  });
  return y;
}

// "runs" backward: element (b, v, fo) of the gradient is gy[b * gs[0] + v * gs[1] + fo * gs[2]]. With V
// contiguous (gs[1] == 1) a block's dz is runs read in place; otherwise (the next layer's dx comes as (V, B,
// F_out) rows) each block's kReduceRows x B x F_out numbers are first transposed into a small scratch that
// stays in cache: no transposed copy of the whole gradient (a 10 MB copy per Wiki step, as slow as the
// kernel). The ReLU mask is recomputed from the basis runs (read anyway for dW) rather than gathered from y.
template <typename T>
void from_basis_runs_backward(const T* basis, const int64_t* bs, const int64_t* boff, const T* gy,
                              const int64_t* gs, int64_t K, int64_t B, int64_t V, int64_t Fout, const T* W,
                              const T* bias, bool relu, bool need_w, bool need_b, double* dW, double* db) {
  const int64_t nblocks = (V + kReduceRows - 1) / kReduceRows;
  const int64_t nw = need_w ? K * Fout : 0, nb = need_b ? Fout : 0, nout = nw + nb;
  std::vector<double> part(std::max<int64_t>(1, nblocks * nout * kLanes), 0.0);
  const int nt = num_threads(V * B * Fout * (K + 1));
#pragma omp parallel num_threads(nt)
  {
    std::vector<T> pre(kReduceRows), z(kReduceRows);
    const bool runs = gs[1] == 1;
    std::vector<T> gblk(runs ? 0 : B * Fout * kReduceRows);
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t v0 = blk * kReduceRows, nv = std::min(V, v0 + kReduceRows) - v0;
      double* p = part.data() + blk * nout * kLanes;
      if (!runs)
        for (int64_t r = 0; r < nv; ++r) {
          const T* row = gy + (v0 + r) * gs[1];
          for (int64_t b = 0; b < B; ++b)
            for (int64_t fo = 0; fo < Fout; ++fo) gblk[(b * Fout + fo) * kReduceRows + r] = row[b * gs[0] + fo * gs[2]];
        }
      for (int64_t b = 0; b < B; ++b)
        for (int64_t fo = 0; fo < Fout; ++fo) {
          const T* g = runs ? gy + b * gs[0] + fo * gs[2] + v0 : gblk.data() + (b * Fout + fo) * kReduceRows;
          const T* zr = g;
          if (relu) {
            prefetch_next_run(g, nv);
            preact_run(basis, bs, boff, K, b, v0, nv, W, fo, Fout, bias, pre.data());
#pragma omp simd
            for (int64_t r = 0; r < nv; ++r) z[r] = activate(pre[r], true) > T(0) ? g[r] : T(0);
            zr = z.data();
          }
          if (!relu) prefetch_next_run(g, nv);
          if (need_w)
            for (int64_t k = 0; k < K; ++k) {
              const T* run = basis + k * bs[0] + boff[b] + v0;
              if (!relu) prefetch_next_run(run, nv);  // else preact_run did
              dot_lanes(run, 1, zr, 1, nv, p + (k * Fout + fo) * kLanes);
            }
          if (need_b) sum_lanes(zr, 1, nv, p + (nw + fo) * kLanes);
        }
    }
  }
  if (nout) {
    const std::vector<double> tot = combine_partials(part, nblocks, nout);
    for (int64_t i = 0; i < nw; ++i) dW[i] = tot[i];
    for (int64_t i = 0; i < nb; ++i) db[i] = tot[nw + i];
  }
}

std::tuple<Tensor, Tensor> cheb_conv_from_basis_backward(const Tensor& grad_y, const Tensor& basis_in,
                                                         const Tensor& y, const Tensor& weight,
                                                         const c10::optional<Tensor>& bias, bool relu, bool need_w,
                                                         bool need_b, const c10::optional<Tensor>& index) {
  TORCH_CHECK(basis_in.dim() == 4 && weight.dim() == 3 && basis_in.size(0) == weight.size(0) &&
                  basis_in.size(3) == weight.size(1),
              "cheb_conv_from_basis_backward: basis (K, B, V, F_in) and weight (K, F_in, F_out) do not match");
  const int64_t K = basis_in.size(0), V = basis_in.size(2), Fin = basis_in.size(3);
  const int64_t Fout = weight.size(2);
  const BasisView view = resolve_basis(basis_in, index, "cheb_conv_from_basis_backward");
  const int64_t B = view.B;
  TORCH_CHECK(grad_y.dim() == 3 && grad_y.size(0) == B && grad_y.size(1) == V && grad_y.size(2) == Fout &&
                  y.dim() == 3 && y.size(0) == B && y.size(1) == V && y.size(2) == Fout,
              "cheb_conv_from_basis_backward: grad_y and y must be (B, V, F_out)");
  TORCH_CHECK(grad_y.scalar_type() == basis_in.scalar_type() && y.scalar_type() == basis_in.scalar_type() &&
                  weight.scalar_type() == basis_in.scalar_type(),
              "cheb_conv_from_basis_backward: all tensors must share one dtype");
  need_b = need_b && bias.has_value();
  const Tensor& basis = view.basis;
  const Tensor Wc = weight.contiguous();
  const Tensor bc = bias.has_value() ? bias->contiguous() : Tensor();
  Tensor dW = need_w ? at::empty_like(weight, at::MemoryFormat::Contiguous) : Tensor();
  Tensor db = need_b ? at::empty({Fout}, weight.options()) : Tensor();
  const int64_t bs[4] = {basis.stride(0), basis.stride(1), basis.stride(2), basis.stride(3)};
  // "runs" reads the gradient in place, whatever its strides (see from_basis_runs_backward); "rows" reads it as
  // (V, B, F_out) rows (a copy only when it comes another way).
  const bool runs = view.layout == BasisLayout::kRuns;
  const Tensor G = !runs ? vb_layout(grad_y) : grad_y;
  const int64_t gs[3] = {G.stride(0), G.stride(1), G.stride(2)};
  const Tensor Y = !runs ? vb_layout(y) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(basis.scalar_type(), "cheb_conv_from_basis_backward", [&] {
    using T = scalar_t;
    std::vector<double> dWd(need_w ? K * Fin * Fout : 0), dbd(need_b ? Fout : 0);
    if (runs) {
      from_basis_runs_backward<T>(basis.data_ptr<T>(), bs, view.boff.data(), G.data_ptr<T>(), gs, K, B, V, Fout,
                                  Wc.data_ptr<T>(), bc.defined() ? bc.data_ptr<T>() : nullptr, relu, need_w,
                                  need_b, dWd.data(), dbd.data());
    } else {  // "rows": the reduction of cheb_conv's backward, with the basis rows as T_k
      std::vector<const T*> Trows(K);
      for (int64_t k = 0; k < K; ++k) Trows[k] = basis.data_ptr<T>() + k * bs[0];
      reduce_and_mask<T, T>(G.data_ptr<T>(), Y.data_ptr<T>(), relu, Dropout{}, Trows.data(), V, B, Fin, Fout, K,
                         Wc.data_ptr<T>(), need_w, need_b, nullptr, nullptr, dWd.data(), dbd.data());
    }
    if (need_w) {
      T* o = dW.data_ptr<T>();
      for (size_t i = 0; i < dWd.size(); ++i) o[i] = T(dWd[i]);
    }
    if (need_b) {
      T* o = db.data_ptr<T>();
      for (size_t i = 0; i < dbd.size(); ++i) o[i] = T(dbd[i]);
    }
  });
  return {dW, db};
}

std::string build_info() { return scanet_native_build_info; }

}  // namespace

TORCH_LIBRARY(scanet_native, m) {
  m.def("cheb_conv_forward(Tensor crow, Tensor col, Tensor values, Tensor x, Tensor weight, Tensor? bias, "
        "bool relu, bool save_basis, bool symmetric=False, float dropout_p=0.0, int seed=0, "
        "ScalarType? out_dtype=None) -> (Tensor, Tensor)");
  m.def("cheb_conv_backward(Tensor grad_y, Tensor crow, Tensor col, Tensor values, Tensor? crow_t, "
        "Tensor? col_t, Tensor? values_t, Tensor x, Tensor saved, Tensor y, Tensor weight, bool relu, "
        "bool has_bias, bool need_x, bool need_w, bool need_b, float dropout_p=0.0, int seed=0) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("dropout_keep_mask(int seed, int n, float p) -> Tensor", &dropout_keep_mask);
  m.def("csr_transpose(Tensor crow, Tensor col, Tensor values) -> (Tensor, Tensor, Tensor)");
  m.def("chebyshev_basis(Tensor crow, Tensor col, Tensor values, Tensor x, int K) -> Tensor");
  m.def("cheb_conv_from_basis_forward(Tensor basis, Tensor weight, Tensor? bias, bool relu, Tensor? index=None) "
        "-> Tensor");
  m.def("cheb_conv_from_basis_backward(Tensor grad_y, Tensor basis, Tensor y, Tensor weight, Tensor? bias, "
        "bool relu, bool need_w, bool need_b, Tensor? index=None) -> (Tensor, Tensor)");
  m.def("build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(scanet_native, CPU, m) {
  m.impl("cheb_conv_forward", &cheb_conv_forward);
  m.impl("cheb_conv_backward", &cheb_conv_backward);
  m.impl("csr_transpose", &csr_transpose);
  m.impl("chebyshev_basis", &chebyshev_basis);
  m.impl("cheb_conv_from_basis_forward", &cheb_conv_from_basis_forward);
  m.impl("cheb_conv_from_basis_backward", &cheb_conv_from_basis_backward);
}

}  // namespace scanet_native
