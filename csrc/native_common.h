// Small pieces shared by the native CPU ops (csrc/*.cpp): storage-dtype conversions, the counter-based dropout
// hash, and the dispatch over storage dtypes. Header-only, in the ops' anonymous namespace of each file.
#pragma once

#include <ATen/ATen.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace scanet_native {
namespace {

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

inline bool is_low(at::ScalarType st) { return st == at::kBFloat16 || st == at::kHalf; }

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

// The same for the low-precision-or-float32 storage dtypes only (float64 refused with `what`'s name).
template <typename F>
inline void dispatch_float_storage(at::ScalarType st, const char* what, F&& f) {
  TORCH_CHECK(st == at::kFloat || is_low(st), what, ": float32, bfloat16 or float16 only, got ", st);
  dispatch_storage(st, what, [&](auto tag) {
    if constexpr (!std::is_same_v<decltype(tag), double>) f(tag);
  });
}

// -------------------------------------------------------------------------------------- dropout mask
// keep(i) = splitmix64(seed + (i + 1) * golden) >> 32 >= p * 2^32: SplitMix64's output function on a counter,
// so element i's bit needs no state (backward and any thread recompute it) and P(keep) = 1 - p to 2^-32.
// The seed is drawn per call from torch's default generator by the Python side (torch.manual_seed and a
// saved RNG state reproduce it). Two 64-bit multiplies per element: far less than a stored bernoulli_ mask.
inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;
inline bool keep_bit(uint64_t seed, uint64_t threshold, uint64_t i) {
  return (splitmix64(seed + (i + 1) * kGolden) >> 32) >= threshold;
}

struct Dropout {
  bool on = false;
  uint64_t seed = 0;
  uint64_t threshold = 0;  // keep iff hash >> 32 >= threshold; 2^32 keeps nothing (p = 1)
  double scale = 1.0;      // 1 / (1 - p); 0 for p = 1

  static Dropout make(double p, int64_t seed, const char* what = "dropout") {
    TORCH_CHECK(p >= 0.0 && p <= 1.0, what, ": dropout_p must be in [0, 1], got ", p);
    Dropout d;
    d.on = p > 0.0;
    d.seed = uint64_t(seed);
    d.threshold = p >= 1.0 ? (uint64_t(1) << 32) : uint64_t(p * 4294967296.0);
    d.scale = p >= 1.0 ? 0.0 : 1.0 / (1.0 - p);
    return d;
  }
  inline bool keep(uint64_t i) const { return keep_bit(seed, threshold, i); }
};

}  // namespace
}  // namespace scanet_native
