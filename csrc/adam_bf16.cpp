// One fused Adam / AdamW pass for bf16 training with float32 master weights (scanet/adam_bf16.py drives it).
//
// Per element it reads the bf16 gradient (2 B), the float32 master, exp_avg and exp_avg_sq (12 B) and writes
// the master, exp_avg, exp_avg_sq (12 B) and the bf16 copy of the master that the next forward reads (2 B):
// 28 B per parameter. The unfused path (scanet/master_weights.py) widens the bf16 gradient into a float32
// buffer (2 B read + 4 B written), lets torch's fused AdamW read it back (4 B + 12 B + 12 B) and then rounds
// the master into the copy (4 B + 2 B): 40 B in three passes, each streaming the 18.7 M Wiki FC weights from
// DRAM. Optionally a float32 gradient is added first (the L2 term of l2_mode="loss_fc_only", which autograd
// put on the master itself): +4 B.
//
// Arithmetic: torch's fused CPU Adam kernel (aten/src/ATen/native/cpu/FusedAdamKernel.cpp), operation by
// operation, in float32 with the step-dependent scalars (bias corrections, step size) computed in double and
// rounded once, as there. The kernel's vector body, as torch's build compiles it, uses a fused multiply-add
// in three places (the coupled L2 term g + wd * p, exp_avg.lerp_(g, 1 - beta1), and
// beta2 * v + ((1 - beta2) * g) * g); they are written as std::fma here and everything else is a separate,
// correctly rounded operation (this file is compiled with -ffp-contract=off, so the compiler adds no other
// contraction and the vectorized loop and its scalar remainder compute bit for bit the same).
// tests/test_adam_bf16.py compares it with torch's fused step and with a float64 reference.
//
// Elementwise over fixed chunks: every element's result depends on that element only, so the result does not
// depend on the thread count or the chunking.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>

#include "native_common.h"

namespace scanet_native {
namespace {

using at::Tensor;

// The float32 constants of one step, derived as torch's fused kernel derives them.
struct StepConstants {
  float beta2, grad_sq_coefficient, lerp_coefficient, eps, bias_correction2_sqrt, neg_step_size;
  float weight_decay, decay_factor;
  bool lerp_small;  // |1 - beta1| < 0.5: exp_avg + w (g - exp_avg); else g - (1 - w) (g - exp_avg)
};

enum class Decay { kNone, kDecoupled, kCoupled };

// Blocks of kBlock elements in three loops each, so that every loop holds one element width (GCC 12 does not
// vectorize the whole update with bf16 and float32 accesses mixed in one loop): widen the bf16 gradient into a
// float buffer on the stack, the Adam update in float32, round the new master into the bf16 copy. The block's
// data stays in L1 between the loops; DRAM is streamed once.
constexpr int64_t kBlock = 512;

template <Decay kDecay, bool kExtraGrad>
void adam_chunk(const StepConstants& c, float* __restrict param, const BFloat16* __restrict grad,
                const float* __restrict extra, float* __restrict exp_avg, float* __restrict exp_avg_sq,
                BFloat16* __restrict copy, int64_t n) {
  const float wd = c.weight_decay, decay = c.decay_factor, w = c.lerp_coefficient, b2 = c.beta2;
  const float c2 = c.grad_sq_coefficient, bc2s = c.bias_correction2_sqrt, eps = c.eps, neg_ss = c.neg_step_size;
  const bool small = c.lerp_small;
  alignas(64) float gbuf[kBlock];
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t len = std::min(kBlock, n - b0);
    const BFloat16* gb = grad + b0;
    for (int64_t i = 0; i < len; ++i) gbuf[i] = load_as<float>(gb[i]);
    if constexpr (kExtraGrad) {
      const float* e = extra + b0;
      for (int64_t i = 0; i < len; ++i) gbuf[i] = gbuf[i] + e[i];  // the unfused path's master.grad.add_(bf16)
    }
    float* pp = param + b0;
    float* mm = exp_avg + b0;
    float* vv = exp_avg_sq + b0;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      float g = gbuf[i];
      float p = pp[i];
      if constexpr (kDecay == Decay::kCoupled) {
        g = std::fma(p, wd, g);
      } else if constexpr (kDecay == Decay::kDecoupled) {
        p = p * decay;
      }
      const float m0 = mm[i];
      const float m = std::fma(w, g - m0, small ? m0 : g);
      const float v = std::fma(c2 * g, g, vv[i] * b2);
      const float denom = std::sqrt(v) / bc2s + eps;
      mm[i] = m;
      vv[i] = v;
      pp[i] = p + (neg_ss * m) / denom;
    }
    BFloat16* out = copy + b0;
    for (int64_t i = 0; i < len; ++i) out[i] = store_as<BFloat16, float>(pp[i]);
  }
}

// Whether a and b (same sizes) put every element at the same memory offset: equal strides in every dimension
// of size > 1 (a size-1 dimension's stride is never used).
bool same_layout(const Tensor& a, const Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

// Elementwise over raw memory: every tensor must be dense (no gaps, no overlap) and laid out as the master
// (same sizes and strides), so that memory position i is the same element in all of them. A transposed
// (column-major) master, as scanet.master_weights stores the FC weights for bf16 training, qualifies with its
// moments, copy and grad.
void check(const Tensor& t, const char* name, at::ScalarType dtype, const Tensor& param) {
  TORCH_CHECK(t.device().is_cpu(), "adam_bf16_step: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "adam_bf16_step: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == param.sizes(), "adam_bf16_step: ", name, " has shape ", t.sizes(), ", the master ",
              param.sizes());
  TORCH_CHECK(t.is_non_overlapping_and_dense(), "adam_bf16_step: ", name, " must be dense (no gaps or overlap)");
  TORCH_CHECK(same_layout(t, param), "adam_bf16_step: ", name, " has strides ",
              t.strides(), ", the master ", param.strides(), " (the pass is elementwise over memory)");
}

// One parameter's step, in place on param, exp_avg, exp_avg_sq and param_bf16. `step` is the optimizer's
// step count AFTER its increment (torch's state["step"] as the kernel reads it), >= 1.
void adam_bf16_step(const Tensor& param, const Tensor& grad, const std::optional<Tensor>& extra_grad,
                    const Tensor& exp_avg, const Tensor& exp_avg_sq, const Tensor& param_bf16, double step,
                    double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled) {
  const int64_t n = param.numel();
  check(param, "param", at::kFloat, param);
  check(grad, "grad", at::kBFloat16, param);
  if (extra_grad.has_value()) check(*extra_grad, "extra_grad", at::kFloat, param);
  check(exp_avg, "exp_avg", at::kFloat, param);
  check(exp_avg_sq, "exp_avg_sq", at::kFloat, param);
  check(param_bf16, "param_bf16", at::kBFloat16, param);
  TORCH_CHECK(step >= 1, "adam_bf16_step: step must be >= 1 (the count after this step's increment), got ", step);

  const double bias_correction1 = 1 - std::pow(beta1, step);
  const double bias_correction2 = 1 - std::pow(beta2, step);
  StepConstants c;
  c.beta2 = float(beta2);
  c.grad_sq_coefficient = float(1 - beta2);
  const float w = float(1 - beta1);
  c.lerp_small = std::abs(w) < 0.5f;
  c.lerp_coefficient = c.lerp_small ? w : w - 1.0f;
  c.eps = float(eps);
  c.bias_correction2_sqrt = float(std::sqrt(bias_correction2));
  c.neg_step_size = float(-(lr / bias_correction1));
  c.weight_decay = float(weight_decay);
  c.decay_factor = float(1 - lr * weight_decay);
  const Decay decay = weight_decay == 0 ? Decay::kNone : (decoupled ? Decay::kDecoupled : Decay::kCoupled);

  float* p = param.data_ptr<float>();
  const BFloat16* g = grad.data_ptr<at::BFloat16>();
  const float* e = extra_grad.has_value() ? extra_grad->data_ptr<float>() : nullptr;
  float* m = exp_avg.data_ptr<float>();
  float* v = exp_avg_sq.data_ptr<float>();
  BFloat16* out = param_bf16.data_ptr<at::BFloat16>();

  // 32 K elements a task (~0.9 MB of traffic): large enough to amortize the task, small enough to balance.
  constexpr int64_t kGrain = 1 << 15;
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    const int64_t len = end - begin;
    auto run = [&](auto decay_tag, auto extra_tag) {
      constexpr Decay kD = decltype(decay_tag)::value;
      constexpr bool kE = decltype(extra_tag)::value;
      adam_chunk<kD, kE>(c, p + begin, g + begin, kE ? e + begin : nullptr, m + begin, v + begin, out + begin, len);
    };
    auto with_extra = [&](auto decay_tag) {
      if (e != nullptr) {
        run(decay_tag, std::true_type{});
      } else {
        run(decay_tag, std::false_type{});
      }
    };
    switch (decay) {
      case Decay::kNone: with_extra(std::integral_constant<Decay, Decay::kNone>{}); break;
      case Decay::kDecoupled: with_extra(std::integral_constant<Decay, Decay::kDecoupled>{}); break;
      case Decay::kCoupled: with_extra(std::integral_constant<Decay, Decay::kCoupled>{}); break;
    }
  });
}

}  // namespace

// A fragment: the library itself (and its other ops) is defined in csrc/cheb_conv.cpp.
TORCH_LIBRARY_FRAGMENT(scanet_native, m) {
  m.def("adam_bf16_step(Tensor(a!) param, Tensor grad, Tensor? extra_grad, Tensor(b!) exp_avg, "
        "Tensor(c!) exp_avg_sq, Tensor(d!) param_bf16, float step, float lr, float beta1, float beta2, "
        "float eps, float weight_decay, bool decoupled) -> ()");
}

TORCH_LIBRARY_IMPL(scanet_native, CPU, m) { m.impl("adam_bf16_step", &adam_bf16_step); }

}  // namespace scanet_native
