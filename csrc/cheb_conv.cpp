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
// The basis cheb_conv_forward saves for backward (T_1..T_{K-1}) is internal: each T_k is stored tile by tile
// (below), tile t's (V, n_t F_in) block contiguous. cheb_conv's dx comes out (B, V, F_in) contiguous: the
// layer below (the cached-basis op, whose basis is V-contiguous) reads it as runs in place, 2-3x faster
// than the (V, B) rows it got before, which it had to transpose block by block.
//
// Work (cheb_conv, K >= 2). The batch is cut into column tiles of nb entries (tile_batch: a multiple of 16,
// from the shapes only), and each tile runs the WHOLE recursion on one thread: T_0's columns copied once into
// a compact (V, nb F_in) tile, then T_1 = L~ T_0, T_k = 2 L~ T_{k-1} - T_{k-2}, each SpMM gathering its
// neighbour rows from the previous compact tile; the last step's epilogue (weights, bias, ReLU, dropout,
// narrowing) writes the tile's part of y. Backward does the same per tile: the mask, the dW / db partials
// and b_{K-1} in one pass, then the Clenshaw recurrence with compact b tiles, ending in the tile's columns
// of dx. Bytes, Wiki (V = 10,055, B = 256, F = 1, nnz = 160,770 with the diagonal): an SpMM over whole
// rows gathers nnz x 1 KB = 165 MB from a 10 MB array that only L3 holds; with nb = 32 a tile is
// 10,055 x 128 B = 1.3 MB, and each of its SpMMs gathers nnz x 128 B = 21 MB from the core's 2 MiB L2 (the
// CSR, 1.9 MB, is streamed once per tile: 8 x 1.9 MB per SpMM). One SpMM over all 8 tiles measured 2.6 ms
// against 7 ms for the whole-row loop, one thread. The tiles' scratch is per thread and kept between calls
// (thread_scratch): the backward allocates nothing of size V x B but its dx (the whole-row version allocated
// 5 such 10 MB buffers per call; fresh pages fault on first touch, ~1.6 us per 4 KB page here).
//
// Determinism. Every output element is computed by exactly one thread in a fixed order (an SpMM sums a
// row's non-zeros in index order, whatever tile it is in). dW / db: one partial per chunk of 16 batch
// entries (lane = entry), summed over all V in vertex order by the tile that holds the chunk, then the
// chunks in order; the cached-basis ops use fixed row blocks summed in block order. So the results are
// bitwise identical for any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/version.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "native_common.h"

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

// Per-thread scratch that outlives the call: OpenMP's pool threads persist between calls, so the tiles'
// buffers are allocated and first touched once per thread, not once per step (a fresh 5 MB allocation
// measured 20 ms of page faults on these VMs against 0.6 ms to refill touched memory). One buffer per
// thread, carved by its user; it only grows (to the largest call's need: for the Wiki shapes about 4 MB).
struct ThreadScratch {
  void* p = nullptr;
  size_t bytes = 0;
  ~ThreadScratch() { std::free(p); }
};

inline void* thread_scratch(size_t bytes) {
  thread_local ThreadScratch s;
  if (s.bytes < bytes) {
    std::free(s.p);
    const size_t rounded = (bytes + 4095) & ~size_t(4095);
    s.p = std::aligned_alloc(64, rounded);
    TORCH_CHECK(s.p != nullptr, "cheb_conv: cannot allocate ", rounded, " bytes of scratch");
    s.bytes = rounded;
  }
  return s.p;
}

// Rounds n up to a multiple of 16 floats (64 bytes), so that every compact tile row starts on a cache line.
inline int64_t round16(int64_t n) { return (n + 15) & ~int64_t(15); }

// Batch entries per column tile of the SpMM kernels. A tile of nb entries owns columns [b0 F, (b0 + nb) F)
// for the WHOLE recursion, so the array each SpMM gathers from is one compact (V, nb F) tile of at most
// kTileBytes, which stays in the core's L2 (2 MiB per core on these Xeons) instead of nnz random rows of a
// 10 MB array in L3 (Wiki: nb = 32, a 1.3 MB tile; a standalone SpMM over all 8 tiles measured 2.6 ms against
// 7 ms for whole 1 KB rows, one thread). A multiple of kLanes (the dW / db lanes are chunks of kLanes batch
// entries), at least kLanes, and small enough for kMinTiles tiles when B allows (work for every thread).
// It depends on the shapes only: the saved basis is stored tile by tile, and backward must find the same tiles.
constexpr int64_t kTileBytes = int64_t(3) << 19;  // 1.5 MiB
constexpr int64_t kMinTiles = 8;
inline int64_t tile_batch(int64_t B, int64_t V, int64_t F, int64_t elem) {
  int64_t nb = kTileBytes / std::max<int64_t>(1, V * F * elem);
  nb = std::max<int64_t>(kLanes, nb / kLanes * kLanes);
  const int64_t share = std::max<int64_t>(kLanes, round16((B + kMinTiles - 1) / kMinTiles));
  return std::max<int64_t>(1, std::min({nb, share, B}));
}

// Prefetch the cache lines of [p, p + bytes): a tile row a few rows ahead (the strided rows of a (V, B F)
// array, one or two lines each, which the hardware prefetcher follows poorly). for_write asks for ownership.
inline void prefetch_span(const void* p, int64_t bytes, bool for_write) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) {
    if (for_write) __builtin_prefetch(c + off, 1);
    else __builtin_prefetch(c + off, 0);
  }
}
constexpr int64_t kRowsAhead = 8;

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
// about 1.3x faster with it; timings on the shared machines are noisy). 8 rather than 4: half a row of the
// k-NN graph ahead, ~1 ms less a bf16 Wiki step (three alternated builds; 16 measured no better).
constexpr int64_t kPrefetchAhead = 8;

// The Chebyshev order the kernels take (K terms T_0 .. T_{K-1}): row pointers live in fixed arrays.
constexpr int64_t kMaxK = 64;

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

// dst[0:n] = src[0:n] for a tile row (a few cache lines): inline, a libc memcpy call costs more than the copy.
template <typename T>
inline void copy_row(const T* src, int64_t n, T* dst) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) dst[c] = src[c];
}

template <typename T>
inline T activate(T s, bool relu) {
  return (relu && s < T(0)) ? T(0) : s;  // s < 0 keeps NaN, as F.relu does
}

// s[j * Fout + fo] *= keep(element (b0 + j, v, fo) of the (B, V, F_out) output) / (1 - p), for one vertex v
// and the nb batch entries b0 .. b0 + nb - 1 (a whole row, or one column tile's part of it).
// One channel (SCANet's text GCN): element b*V + v, a loop the compiler vectorizes (64-bit multiplies).
template <typename T>
inline void apply_dropout_row(T* s, int64_t b0, int64_t nb, int64_t Fout, int64_t v, int64_t V,
                              const Dropout& drop) {
  const T scale = T(drop.scale);
  const uint64_t seed = drop.seed, thr = drop.threshold;
  if (Fout == 1) {
#pragma omp simd
    for (int64_t j = 0; j < nb; ++j) {
      const uint64_t i = uint64_t(b0 + j) * uint64_t(V) + uint64_t(v);
      const bool keep = keep_bit(seed, thr, i);
      s[j] = keep ? s[j] * scale : T(0);
    }
    return;
  }
  for (int64_t j = 0; j < nb; ++j) {
    const uint64_t base = uint64_t(b0 + j) * uint64_t(V * Fout) + uint64_t(v * Fout);
    for (int64_t fo = 0; fo < Fout; ++fo)
      s[j * Fout + fo] = drop.keep(base + fo) ? s[j * Fout + fo] * scale : T(0);
  }
}

// Write one vertex's finished row part: s[j * Fout + fo] (Acc, activation applied) -> dst (Ty), times the
// dropout mask of element (b0 + j, v, fo) of the (B, V, F_out) output.
template <typename T, typename Ty>
inline void finish_row(T* s, int64_t b0, int64_t nb, int64_t Fout, int64_t v, int64_t V, const Dropout& drop,
                       Ty* dst) {
  const int64_t Co = nb * Fout;
  if (drop.on) apply_dropout_row(s, b0, nb, Fout, v, V, drop);
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
  if (K == 1) {
#pragma omp parallel num_threads(nt)
    {
      std::vector<T> ys(Co);
#pragma omp for schedule(static)
      for (int64_t v = 0; v < V; ++v) {
        const T* rows[1] = {X + v * C};
        combine_row(rows, Fin, 1, W, bias, B, Fin, Fout, relu, ys.data(), Fout);
        finish_row(ys.data(), 0, B, Fout, v, V, drop, y + v * Co);
      }
    }
    return;
  }
  // K >= 2: column tiles, each run through the whole recursion by one thread (see the header's "Work").
  // saved (keep_last): T_1 .. T_{K-1}, each stored tile by tile, tile t's (V, n_t F_in) block contiguous at
  // b0 F_in V: exactly the compact tile the next step gathers from, so T_k is written once and never copied.
  const int64_t nb = tile_batch(B, V, Fin, sizeof(T));
  const int64_t ntiles = (B + nb - 1) / nb;
  const int64_t ci_max = nb * Fin;
  // Scratch per thread: the compact T_0 tile, T_1 .. T_{K-2} when not saved, the last row, the output row.
  const int64_t nc = keep_last ? 1 : K - 1;
  const size_t scratch = size_t(nc * V * ci_max + round16(ci_max) + round16(nb * Fout)) * sizeof(T);
#pragma omp parallel for num_threads(int(std::min<int64_t>(nt, ntiles))) schedule(dynamic, 1)
  for (int64_t tile = 0; tile < ntiles; ++tile) {
    const int64_t b0 = tile * nb, n = std::min(nb, B - b0), ci = n * Fin, co = n * Fout;
    T* s = static_cast<T*>(thread_scratch(scratch));
    T* row = s + nc * V * ci;
    T* ys = row + round16(ci);
    auto Tc = [&](int64_t j) -> T* {  // the compact T_j of this tile: rows of ci numbers
      return j == 0 || !keep_last ? s + j * V * ci : basis + (j - 1) * V * C + b0 * Fin * V;
    };
    const T* rows[kMaxK];
    T* t0 = Tc(0);
    for (int64_t v = 0; v < V; ++v) {
      if (v + kRowsAhead < V) prefetch_span(X + (v + kRowsAhead) * C + b0 * Fin, ci * sizeof(T), false);
      copy_row(X + v * C + b0 * Fin, ci, t0 + v * ci);
    }
    for (int64_t k = 1; k < K; ++k) {
      const T* prev = Tc(k - 1);
      const T* prev2 = k >= 2 ? Tc(k - 2) : nullptr;
      const bool final_step = k == K - 1;
      T* out = (!final_step || keep_last) ? Tc(k) : nullptr;
      for (int64_t v = 0; v < V; ++v) {
        T* o = out ? out + v * ci : row;
        spmm_row(A, prev, ci, v, A.nnz, o);
        if (prev2) {
          const T* p2 = prev2 + v * ci;
#pragma omp simd
          for (int64_t c = 0; c < ci; ++c) o[c] = T(2) * o[c] - p2[c];
        }
        if (final_step) {  // fused: weights, bias, activation, dropout, stored in y's dtype
          Ty* yr = y + v * Co + b0 * Fout;
          if (v + kRowsAhead < V) prefetch_span(yr + kRowsAhead * Co, co * sizeof(Ty), true);
          for (int64_t j = 0; j < K - 1; ++j) rows[j] = Tc(j) + v * ci;
          rows[K - 1] = o;
          combine_row(rows, Fin, K, W, bias, n, Fin, Fout, relu, ys, Fout);
          finish_row(ys, b0, n, Fout, v, V, drop, yr);
        }
      }
    }
  }
}

// The compute dtype of a call: float64 for float64 x, else float32 (x float32, bfloat16 or float16).
inline at::ScalarType acc_dtype(const Tensor& x, const char* what) {
  const at::ScalarType st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || is_low(st), what,
              ": x must be float32, float64, bfloat16 or float16, got ", st);
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

// Returns (y, saved). saved is what backward needs for dW, in Acc: T_1..T_{K-1}, preceded by T_0 when x is not
// stored as (V, B, F) in Acc (its tiled, converted copy, so that backward need not transpose x again):
// (K-1 or K, V, B*F_in), or (0, V, B*F_in) without save_basis (backward then takes dW from the adjoint
// recursion, see backward_tiled). y is written in out_dtype (default x's dtype).
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
  TORCH_CHECK(K <= kMaxK, "cheb_conv_forward: K = ", K, " is above the supported ", kMaxK);
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
  const Dropout drop = Dropout::make(dropout_p, seed, "cheb_conv");
  const int64_t C = B * Fin;
  const bool x_direct = is_vb(x) && x.scalar_type() == acc;  // T_0 read in place
  const int64_t t0 = x_direct ? 0 : 1;  // T_0 copy at the front of the buffer
  const int64_t nsaved = save_basis ? K - 1 + t0 : 0;
  // Without save_basis the buffer holds T_0's copy only (the recursion runs in per-thread tile scratch).
  const int64_t nbuf = save_basis ? nsaved : t0;
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
          if (drop.on) apply_dropout_row(zw, 0, B, Fout, v, V, drop);
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

// cheb_conv's backward, by the column tiles of the forward. dx = sum_k T_k(A) G_k with A = L~^T and
// G_k = dz W_k^T, by Clenshaw (K-1 SpMMs, as many as the forward):
//   b_{K-1} = G_{K-1};  b_k = G_k + 2 A b_{k+1} - b_{k+2} (k = K-2..1);  dx = G_0 + A b_1 - b_2.
// Each tile runs the mask, its dW / db partials and the whole recurrence in its own compact (V, n F)
// scratch, so the gradient is read in whatever layout and dtype it comes (no transposed, widened copy of
// it) and no (V, B F) intermediate is allocated: as (V, B, F_out) rows (the bf16 text FC's gradient in the
// Wiki step) each tile's piece of a row is read in place; otherwise, per tile and block of kGradRows
// vertices, it is first transposed into a small scratch (read along V when V is its contiguous dimension,
// see kGradRows). b_k overwrites b_{k+2} in place: row v of b_{k+2} is read only where row v of b_k
// is written. dW / db: one partial per chunk of kLanes batch entries (lane = entry), summed over all V in
// vertex order by the one tile holding the chunk, then over chunks in order: bitwise the same for any thread
// count. gy[b gs0 + v gs1 + fo gs2] is element (b, v, fo) of grad_y in its own dtype Tg; yv the output as
// (V, B, F_out) rows; X is T_0 as (V, B F_in) rows and saved holds T_1 .. T_{K-1} tile by tile (as
// forward_impl wrote them); dx is written (B, V, F_in) contiguous.
// Without a saved basis (saved == nullptr, dW wanted, K >= 2): the adjoint recursion instead of Clenshaw.
// dW_k = <T_k(L~) x, dz> = <x, T_k(A) dz>, so each tile runs U_0 = dz, U_1 = A U_0, U_k = 2 A U_{k-1} - U_{k-2}
// (K-1 SpMMs over its n F_out columns, as many as Clenshaw's over n F_in) and sums dW_k = <T_0, U_k> and
// dx = sum_k U_k W_k^T on the way. The forward then writes no basis: for the Wiki layer 2 (K = 3, F = 1) that
// is 2 x 10 MB less written a step and read back, for T_0's columns copied once per tile (layer 2 alone, operands
// from DRAM: forward 7.6 against 9.8 ms, backward 14.6 against 15.4 ms; the bf16 step 1.1-1.3 ms faster).
// Used where x requires grad and F_out <= F_in (scanet.native.cheb_conv decides what the forward saves).
// Vertices per block of the gradient's transposition: a (B, V) gradient is read as runs of kGradRows along V
// (512 B of bf16 per batch entry: whole lines the next block's prefetch fetches ahead, where 64-vertex runs
// left the loads waiting on memory), into a kGradRows x n F_out scratch that stays in L1 (32 KB at n = 32).
constexpr int64_t kGradRows = 256;
// Rows of dx finished per block before they are stored as (B, V, F_in) runs of kDxRows numbers per entry
// (scattered single stores, one line per entry and row, measured slower in the step).
constexpr int64_t kDxRows = 64;

template <typename T, typename Ty, typename Tg>
void backward_tiled(const Csr<T>& A, const Tg* gy, const int64_t* gs, const Ty* yv, bool relu, const Dropout& drop,
                    const T* X, const T* saved, int64_t V, int64_t B, int64_t Fin, int64_t Fout, int64_t K,
                    const T* W, bool need_x, bool need_w, bool need_b, T* dx, double* dW, double* db) {
  const int64_t C = B * Fin, Co = B * Fout;
  const int nt = num_threads((V + A.nnz) * (C + Co));
  const int64_t nb = tile_batch(B, V, Fin, sizeof(T));
  const int64_t ntiles = (B + nb - 1) / nb;
  const int64_t nw = need_w ? K * Fin * Fout : 0, nbias = need_b ? Fout : 0, nout = nw + nbias;
  const int64_t nchunks = (B + kLanes - 1) / kLanes;
  std::vector<double> part(std::max<int64_t>(1, nchunks * nout * kLanes), 0.0);
  // Without a saved basis, dW comes from the adjoint recursion U_k = T_k(A) dz (see the comment above).
  const bool adjoint = need_w && saved == nullptr && K >= 2;
  const bool clenshaw = need_x && K >= 2 && !adjoint;
  const bool recur = clenshaw || adjoint;  // dz kept whole, as a compact (V, n F_out) tile
  const int64_t ci_max = nb * Fin, co_max = nb * Fout, cm = round16(std::max(ci_max, co_max));
  // The gradient as (V, B, F_out) rows (what the bf16 text FC hands back in the Wiki step: strides (1, B, B)
  // for F_out = 1): each tile's piece of a row is contiguous and read in place, no transposition.
  const bool grad_rows = (gs[0] == Fout || B == 1) && (gs[2] == 1 || Fout == 1) && (gs[1] == Co || V == 1);
  // Scratch per thread: dz (V x n F_out; a row without the recurrence), b_{k+1} and b_{k+2} tiles (V x n F_in),
  // the transposed gradient block, and two rows.
  // adjoint: U_1's tile, the tile's T_0 columns (compact) and, for K >= 4 with dx, dx's partial sums.
  const int64_t ndz = recur ? V * co_max : round16(co_max);
  const int64_t nbt = clenshaw  ? (K >= 3 ? 2 : 1) * V * ci_max
                      : adjoint ? V * co_max + V * ci_max + (need_x && K >= 4 ? V * ci_max : 0)
                                : 0;
  const size_t scratch =
      size_t(ndz + nbt + kGradRows * co_max + cm * 2 + round16(co_max) + kDxRows * ci_max) * sizeof(T);
#pragma omp parallel for num_threads(int(std::min<int64_t>(nt, ntiles))) schedule(dynamic, 1)
  for (int64_t tile = 0; tile < ntiles; ++tile) {
    const int64_t b0 = tile * nb, n = std::min(nb, B - b0), ci = n * Fin, co = n * Fout;
    T* s = static_cast<T*>(thread_scratch(scratch));
    T* dz = s;
    T* bt = dz + ndz;
    T* gblk = bt + nbt;
    T* acc = gblk + kGradRows * co_max;
    T* g = acc + cm;
    T* zrow = g + cm;
    T* dxblk = zrow + round16(co_max);
    T* b_hi = clenshaw ? bt : nullptr;
    const T* tk[kMaxK];
    for (int64_t k = 0; k < K; ++k)  // T_k of this tile: T_0 strided rows of X, T_k >= 1 its compact saved block
      tk[k] = !need_w    ? nullptr
              : k == 0   ? X + b0 * Fin
              : adjoint  ? nullptr
                         : saved + (k - 1) * V * C + b0 * Fin * V;
    T* xc = adjoint ? bt + V * co_max : nullptr;  // adjoint: T_0's columns of this tile, compact (read K times)
    // dx as (B, V, F_in) contiguous: entry j's row v at (b0 + j) V F_in + v F_in, one run per entry along V
    // (the layout the cached-basis backward reads in place: measured 2-3x faster there than (V, B) rows).
    auto store_dx = [&](const T* row, int64_t v) {
      T* d = dx + b0 * V * Fin + v * Fin;
      for (int64_t j = 0; j < n; ++j)
        for (int64_t fi = 0; fi < Fin; ++fi) d[j * V * Fin + fi] = row[j * Fin + fi];
    };
    // dx rows finished into dxblk (row v at (v % kDxRows) ci) are stored as (B, V, F_in) runs per entry, a block
    // of kDxRows rows at a time (scattered single stores, one line per entry and row, measured slower).
    auto dx_row = [&](int64_t v) { return dxblk + (v % kDxRows) * ci; };
    auto dx_row_done = [&](int64_t v) {
      if (v % kDxRows != kDxRows - 1 && v != V - 1) return;
      const int64_t r0 = v - v % kDxRows, nr = v - r0 + 1;
      for (int64_t j = 0; j < n; ++j)
        for (int64_t fi = 0; fi < Fin; ++fi) {
          T* d = dx + (b0 + j) * V * Fin + r0 * Fin + fi;
          const T* src = dxblk + j * Fin + fi;
          for (int64_t r = 0; r < nr; ++r) d[r * Fin] = src[r * ci];
        }
    };
    const int64_t c0 = b0 / kLanes;  // this tile's first chunk (b0 is a multiple of kLanes, or 0)
    // One channel: the tile's lane sums as nout rows of n doubles, folded into `part` after the tile.
    const bool one = Fin == 1 && Fout == 1;
    std::vector<double> tacc_buf(one ? nout * nb : 0, 0.0);
    double* tacc = tacc_buf.data();
    const int64_t kdots = !need_w ? 0 : adjoint ? 1 : K;  // the terms whose dW the mask pass sums
    // dW_k's partials for one row: t (the row of T_k, or of T_0 for the adjoint) against z (the row of dz, or of
    // U_k), entry j's products in lane j of its chunk; each accumulator sums over v in vertex order.
    auto add_dw_row = [&](int64_t k, const T* t, const T* z) {
      if (one) {  // one channel: lane (chunk q, l) is entry j = q kLanes + l, a plain loop over the row
        double* a = tacc + k * nb;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) a[j] += double(t[j]) * double(z[j]);
        return;
      }
      for (int64_t j0 = 0; j0 < n; j0 += kLanes) {  // one chunk of kLanes batch entries
        const int64_t len = std::min<int64_t>(kLanes, n - j0);
        double* p = part.data() + (c0 + j0 / kLanes) * nout * kLanes;
        for (int64_t fi = 0; fi < Fin; ++fi)
          for (int64_t fo = 0; fo < Fout; ++fo)
            dot_lanes(t + j0 * Fin + fi, Fin, z + j0 * Fout + fo, Fout, len,
                      p + ((k * Fin + fi) * Fout + fo) * kLanes);
      }
    };
    for (int64_t v0 = 0; v0 < V; v0 += kGradRows) {
      const int64_t nv = std::min(V, v0 + kGradRows) - v0;
      if (grad_rows) {
        // read in place in the mask loop below
      } else if (gs[1] == 1) {  // V contiguous (the FC's (B, V) gradient): runs along V, the next block's prefetched
        if (v0 + 2 * kGradRows <= V)
          for (int64_t j = 0; j < n; ++j)
            for (int64_t fo = 0; fo < Fout; ++fo)
              prefetch_span(gy + (b0 + j) * gs[0] + fo * gs[2] + v0 + kGradRows, kGradRows * sizeof(Tg), false);
        // gblk row by row: its stores contiguous, the loads from the n F_out runs' lines, which stay in L1
        const Tg* src = gy + b0 * gs[0] + v0;
        for (int64_t r = 0; r < nv; ++r)
          for (int64_t j = 0; j < n; ++j)
            for (int64_t fo = 0; fo < Fout; ++fo) gblk[r * co + j * Fout + fo] = load_as<T>(src[j * gs[0] + fo * gs[2] + r]);
      } else if (!grad_rows) {
        for (int64_t r = 0; r < nv; ++r)
          for (int64_t j = 0; j < n; ++j)
            for (int64_t fo = 0; fo < Fout; ++fo)
              gblk[r * co + j * Fout + fo] = load_as<T>(gy[(b0 + j) * gs[0] + (v0 + r) * gs[1] + fo * gs[2]]);
      }
      for (int64_t r = 0; r < nv; ++r) {
        const int64_t v = v0 + r;
        T* z = recur ? dz + v * co : zrow;
        const Ty* yr = yv + v * Co + b0 * Fout;
        if (v + kRowsAhead < V) {
          if (relu) prefetch_span(yr + kRowsAhead * Co, co * sizeof(Ty), false);
          if (need_w) prefetch_span(tk[0] + (v + kRowsAhead) * C, ci * sizeof(T), false);
          if (grad_rows) prefetch_span(gy + (v + kRowsAhead) * gs[1] + b0 * Fout, co * sizeof(Tg), false);
        }
        if (grad_rows) {  // the gradient as (V, B, F_out) rows: the tile's piece of row v, widened on the way
          const Tg* gr = gy + v * gs[1] + b0 * Fout;
          if (relu) {
#pragma omp simd
            for (int64_t c = 0; c < co; ++c) z[c] = load_as<T>(yr[c]) > T(0) ? load_as<T>(gr[c]) : T(0);
          } else {
#pragma omp simd
            for (int64_t c = 0; c < co; ++c) z[c] = load_as<T>(gr[c]);
          }
        } else {
          const T* gr = gblk + (r * co);
          if (relu) {
#pragma omp simd
            for (int64_t c = 0; c < co; ++c) z[c] = load_as<T>(yr[c]) > T(0) ? gr[c] : T(0);
          } else {
            copy_row(gr, co, z);
          }
        }
        if (drop.on) apply_dropout_row(z, b0, n, Fout, v, V, drop);
        for (int64_t k = 0; k < kdots; ++k) add_dw_row(k, k == 0 ? tk[0] + v * C : tk[k] + v * ci, z);
        if (need_b && one) {
          double* a = tacc + nw * nb;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) a[j] += double(z[j]);
        } else if (need_b) {
          for (int64_t j0 = 0; j0 < n; j0 += kLanes) {
            const int64_t len = std::min<int64_t>(kLanes, n - j0);
            double* p = part.data() + (c0 + j0 / kLanes) * nout * kLanes;
            for (int64_t fo = 0; fo < Fout; ++fo) sum_lanes(z + j0 * Fout + fo, Fout, len, p + (nw + fo) * kLanes);
          }
        }
        if (adjoint) copy_row(tk[0] + v * C, ci, xc + v * ci);
        if (clenshaw) {
          pullback_row(z, W + (K - 1) * Fin * Fout, n, Fin, Fout, b_hi + v * ci);  // b_{K-1} = G_{K-1}
        } else if (need_x && !adjoint) {  // K == 1: dx = dz W_0^T
          pullback_row(z, W, n, Fin, Fout, g);
          store_dx(g, v);
        }
      }
    }
    if (adjoint) {
      // U_k = T_k(A) dz in the tile (U_0 = dz, U_1 = A dz, U_k = 2 A U_{k-1} - U_{k-2}, each overwriting U_{k-2}
      // row by row); dW_k = <T_0, U_k> and dx = sum_k U_k W_k^T, U_{k-2}'s share taken before it is overwritten.
      T* u_prev2 = nullptr;
      T* u_prev = dz;
      T* dsum = need_x && K >= 4 ? xc + V * ci_max : nullptr;
      // o (a row of dx, or of its partial sums) = (fresh) or += U_kk's row pulled back through W_kk
      auto add_pullback = [&](T* o, const T* urow, int64_t kk, bool fresh) {
        pullback_row(urow, W + kk * Fin * Fout, n, Fin, Fout, fresh ? o : g);
        if (fresh) return;
#pragma omp simd
        for (int64_t c = 0; c < ci; ++c) o[c] += g[c];
      };
      for (int64_t k = 1; k < K; ++k) {
        T* out = k == 1 ? bt : u_prev2;
        const bool last = k == K - 1;
        for (int64_t v = 0; v < V; ++v) {
          T* u = out + v * co;
          spmm_row(A, u_prev, co, v, A.nnz, acc);
          if (need_x && k >= 2) {  // U_{k-2}'s share of dx, taken before its row is overwritten (u is that row)
            T* o = last ? dx_row(v) : dsum + v * ci;
            if (last && dsum) copy_row(dsum + v * ci, ci, o);
            add_pullback(o, u, k - 2, last ? !dsum : k == 2);
          }
          if (k == 1) {
            copy_row(acc, co, u);
          } else {
#pragma omp simd
            for (int64_t c = 0; c < co; ++c) u[c] = T(2) * acc[c] - u[c];
          }
          add_dw_row(k, xc + v * ci, u);
          if (need_x && last) {  // the last two terms' shares (with K == 2, U_0's is the first written)
            add_pullback(dx_row(v), u_prev + v * co, k - 1, k == 1);
            add_pullback(dx_row(v), u, k, false);
            dx_row_done(v);
          }
        }
        u_prev2 = u_prev;
        u_prev = out;
      }
    }
    if (one)
      for (int64_t i = 0; i < nout; ++i)
        for (int64_t j = 0; j < n; ++j) part[((c0 + j / kLanes) * nout + i) * kLanes + j % kLanes] = tacc[i * nb + j];
    if (!clenshaw) continue;
    // Clenshaw, in the tile: b_k = G_k + 2 A b_{k+1} - b_{k+2} (k = K-2 .. 1), dx = G_0 + A b_1 - b_2.
    T* b1 = b_hi;
    T* b2 = nullptr;
    T* spare = K >= 3 ? bt + V * ci : nullptr;
    for (int64_t k = K - 2; k >= 0; --k) {
      T* out = k == 0 ? nullptr : (b2 ? b2 : spare);  // b_k overwrites b_{k+2} row by row
      const T* Wk = W + k * Fin * Fout;
      const T twice = k == 0 ? T(1) : T(2);
      for (int64_t v = 0; v < V; ++v) {
        spmm_row(A, b1, ci, v, A.nnz, acc);
        pullback_row(dz + v * co, Wk, n, Fin, Fout, g);
        T* o = out ? out + v * ci : dx_row(v);  // dx: a block of rows, then stored as runs
        if (b2) {
          const T* p2 = b2 + v * ci;
#pragma omp simd
          for (int64_t c = 0; c < ci; ++c) o[c] = g[c] + twice * acc[c] - p2[c];
        } else {
#pragma omp simd
          for (int64_t c = 0; c < ci; ++c) o[c] = g[c] + twice * acc[c];
        }
        if (!out) dx_row_done(v);
      }
      b2 = b1;
      b1 = out;
    }
  }
  for (int64_t q = 0; q < nchunks; ++q)  // dW, db: zeroed by the caller; chunks in order
    for (int64_t i = 0; i < nout; ++i) {
      const double* p = part.data() + (q * nout + i) * kLanes;
      double sum = 0.0;
      for (int l = 0; l < kLanes; ++l) sum += p[l];
      if (i < nw) dW[i] += sum;
      else db[i - nw] += sum;
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
  const Dropout drop = Dropout::make(dropout_p, seed, "cheb_conv");
  const bool x_direct = is_vb(x) && x.scalar_type() == acc;
  const int64_t t0 = x_direct ? 0 : 1;
  TORCH_CHECK(saved.dim() == 3 && saved.size(1) == V && saved.size(2) == B * Fin &&
                  (saved.size(0) == K - 1 + t0 || saved.size(0) == 0),
              "cheb_conv_backward: the saved basis must be what cheb_conv_forward returned");
  check_csr(crow, col, values, V, "cheb_conv_backward");
  const bool transposed = crow_t.has_value();
  validate_csr(crow, col, V, "cheb_conv_backward");
  if (transposed) {
    TORCH_CHECK(col_t.has_value() && values_t.has_value(), "cheb_conv_backward: give all three transpose arrays");
    check_csr(*crow_t, *col_t, *values_t, V, "cheb_conv_backward (transpose)");
    validate_csr(*crow_t, *col_t, V, "cheb_conv_backward (transpose)");
  }
  need_b = need_b && has_bias;
  const Tensor Sc = saved.contiguous();
  // Without a saved basis (save_basis=False) dW comes from the adjoint recursion (backward_tiled), which reads
  // T_0 only: x itself.
  const bool from_x = need_w && saved.size(0) == 0;
  // T_0: x itself when stored as (V, B, F_in) in Acc (a view), else its copy at the front of saved, or, without
  // one, x transposed and converted here.
  Tensor X;
  if (need_w && x_direct) {
    X = vb_layout(x);
  } else if (from_x) {
    X = at::empty({V, B, Fin}, x.options().dtype(acc));
    X.copy_(x.permute({1, 0, 2}));
  }
  // The gradient is read in place, in its own strides, as Acc or as y's dtype (the text FC hands back a bf16
  // (B, V) gradient: no transposed, widened copy); another dtype is converted first.
  const Tensor G = (grad_y.scalar_type() == ydt || grad_y.scalar_type() == acc) ? grad_y : grad_y.to(acc);
  const int64_t gs[3] = {G.stride(0), G.stride(1), G.stride(2)};
  const Tensor Y = vb_layout(y);
  const Tensor Wc = weight.contiguous();
  // dx is computed in Acc; for a low-precision x it is narrowed once at the end.
  // dx comes out (B, V, F_in) contiguous (see backward_tiled's store_dx), whatever x's layout.
  Tensor dx = need_x ? at::empty({B, V, Fin}, x.options().dtype(acc)) : Tensor();
  Tensor dW = need_w ? at::empty_like(weight, at::MemoryFormat::Contiguous) : Tensor();
  Tensor db = need_b ? at::empty({Fout}, weight.options()) : Tensor();
  const Tensor crow_u = (transposed ? *crow_t : crow).contiguous();
  const Tensor col_u = (transposed ? *col_t : col).contiguous();
  const Tensor val_u = (transposed ? *values_t : values).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "cheb_conv_backward", [&] {
    using T = scalar_t;
    dispatch_storage(ydt, "cheb_conv_backward", [&](auto tag) {
      using Ty = decltype(tag);
      Csr<T> A{crow_u.data_ptr<int64_t>(), col_u.data_ptr<int64_t>(), val_u.data_ptr<T>(), col_u.numel()};
      const T* sp = need_w && !from_x ? Sc.data_ptr<T>() : nullptr;
      const T* X0 = !need_w ? nullptr : X.defined() ? X.data_ptr<T>() : sp;
      const T* basis = sp ? sp + t0 * V * B * Fin : nullptr;
      std::vector<double> dWd(need_w ? K * Fin * Fout : 0), dbd(need_b ? Fout : 0);
      auto run = [&](auto gtag) {
        using Tg = decltype(gtag);
        backward_tiled<T, Ty, Tg>(A, static_cast<const Tg*>(G.data_ptr()), gs, static_cast<const Ty*>(Y.data_ptr()),
                                  relu, drop, X0, basis, V, B, Fin, Fout, K, Wc.data_ptr<T>(), need_x, need_w, need_b,
                                  need_x ? dx.data_ptr<T>() : nullptr, dWd.data(), dbd.data());
      };
      if (G.scalar_type() == ydt) run(Ty{});
      else run(T{});
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
    Tensor narrow = at::empty({B, V, Fin}, x.options());
    narrow.copy_(dx);
    dx = narrow;
  }
  return {dx, dW, db};
}

// The keep mask (bool, n elements) that a call with (dropout_p, seed) applies to its (B, V, F_out) output,
// flattened in row-major order: for tests and for anyone who needs to see it.
// The revision of these sources that the Python side was written against (scanet/native_library.py's
// CSRC_REVISION): bumped when an op's behaviour changes under an unchanged schema, so that a library built from
// older csrc/ is refused with a reason instead of failing inside a call. 1: cheb_conv_backward takes dW from the
// adjoint recursion when no basis was saved (before, that was an error). 2: adam_bf16_step takes dense tensors
// laid out as the master (a transposed FC weight), not only contiguous ones.
int64_t csrc_revision() { return 2; }

Tensor dropout_keep_mask(int64_t seed, int64_t n, double p) {
  TORCH_CHECK(n >= 0, "dropout_keep_mask: n must be >= 0");
  const Dropout drop = Dropout::make(p, seed, "dropout_keep_mask");
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
// Vertices per block of the runs backward: each (text, block) pair costs a mask recomputation, K dot products and
// their loop overheads, so longer runs pay (1 KB of float32 per run and term; the Wiki step's layer-1 backward,
// operands from DRAM as in a step: 4.4 ms at 256 against 6.5 ms at 64; 512 measured the same as 256). Fixed:
// dW's partial sums are per block, summed in block order, so the result does not depend on the thread count.
constexpr int64_t kBasisGradRows = 256;

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
// F_out) rows) each block's kBasisGradRows x B x F_out numbers are first transposed into a small scratch that
// stays in cache: no transposed copy of the whole gradient (a 10 MB copy per Wiki step, as slow as the
// kernel). The ReLU mask is recomputed from the basis runs (read anyway for dW) rather than gathered from y.
template <typename T>
void from_basis_runs_backward(const T* basis, const int64_t* bs, const int64_t* boff, const T* gy,
                              const int64_t* gs, int64_t K, int64_t B, int64_t V, int64_t Fout, const T* W,
                              const T* bias, bool relu, bool need_w, bool need_b, double* dW, double* db) {
  const int64_t nblocks = (V + kBasisGradRows - 1) / kBasisGradRows;
  const int64_t nw = need_w ? K * Fout : 0, nb = need_b ? Fout : 0, nout = nw + nb;
  std::vector<double> part(std::max<int64_t>(1, nblocks * nout * kLanes), 0.0);
  const int nt = num_threads(V * B * Fout * (K + 1));
#pragma omp parallel num_threads(nt)
  {
    std::vector<T> pre(kBasisGradRows), z(kBasisGradRows);
    const bool runs = gs[1] == 1;
    std::vector<T> gblk(runs ? 0 : B * Fout * kBasisGradRows);
#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t v0 = blk * kBasisGradRows, nv = std::min(V, v0 + kBasisGradRows) - v0;
      double* p = part.data() + blk * nout * kLanes;
      if (!runs)
        for (int64_t r = 0; r < nv; ++r) {
          const T* row = gy + (v0 + r) * gs[1];
          for (int64_t b = 0; b < B; ++b)
            for (int64_t fo = 0; fo < Fout; ++fo) gblk[(b * Fout + fo) * kBasisGradRows + r] = row[b * gs[0] + fo * gs[2]];
        }
      for (int64_t b = 0; b < B; ++b)
        for (int64_t fo = 0; fo < Fout; ++fo) {
          const T* g = runs ? gy + b * gs[0] + fo * gs[2] + v0 : gblk.data() + (b * Fout + fo) * kBasisGradRows;
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
  m.def("csrc_revision() -> int", &csrc_revision);
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
