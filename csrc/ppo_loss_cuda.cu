// PPO loss on CUDA, fused forward + backward, two launches, no floating-point atomics:
//   1. ppo_rows_kernel: one block per row; each thread walks the row with a stride of THREADS
//      (coalesced), writes the unnormalized per-token gradients and accumulates the row's partial
//      sums in double; a fixed-order block reduction writes row_partials[b] (B, kNumPartials).
//   2. ppo_finalize_kernel: one block; reduces the token / sequence counts (unless given), the
//      aggregation weight c_b of every row (-> row_scale), the weighted sums, the loss and metrics.
// The backward (ppo_scale_kernel) multiplies the saved gradients by row_scale[b] * grad_output.
// ppo_loss_grads_cuda (the loss and its final gradients, no autograd) replaces 2. by
// ppo_finalize_grads_kernel: up to 264 blocks over the rows, each reducing the counts itself and scaling its rows
// of gradients in place by c_b * grad_scale; block 0 also writes the loss and the metrics. Two launches in all.
// Math: ppo_math.h. Results are deterministic (no atomics, fixed reduction order).
#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"
#include "cuda_utils.cuh"
#include "ops.h"
#include "ppo_math.h"

namespace rlhf {
namespace {

constexpr int kRowThreads = 256;
constexpr int kFinalThreads = 512;
constexpr int64_t kMaxGradBlocks = 264;  // 2 per SM on an H100

template <typename T>
struct PpoPtrs {
  const T *lp, *olp, *adv, *v, *ov, *ret, *rlp, *ent;
  const uint8_t* m;
  T *g_lp, *g_v, *g_ent;
  double* partials;
};

template <typename T>
__global__ void __launch_bounds__(kRowThreads) ppo_rows_kernel(PpoPtrs<T> p, PpoConsts<T> c, int n) {
  const int64_t off = int64_t(blockIdx.x) * n;
  double s[kNumPartials];
#pragma unroll
  for (int k = 0; k < kNumPartials; ++k) s[k] = 0.0;
  for (int t = threadIdx.x; t < n; t += kRowThreads) {
    const int64_t i = off + t;
    T glp = T(0), gv = T(0), gent = T(0);
    if (p.m[i] != 0) {
      ppo_token<T, double>(c, p.lp[i], p.olp[i], p.adv[i], p.v ? p.v[i] : T(0), p.ov ? p.ov[i] : T(0),
                           p.ret ? p.ret[i] : T(0), p.rlp ? p.rlp[i] : T(0), p.ent ? p.ent[i] : T(0), s, &glp, &gv,
                           &gent);
      s[kTokens] += 1.0;
    }
    if (p.g_lp) p.g_lp[i] = glp;
    if (p.g_v) p.g_v[i] = gv;
    if (p.g_ent) p.g_ent[i] = gent;
  }
  block_sum<kNumPartials, kRowThreads>(s);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < kNumPartials; ++k) p.partials[int64_t(blockIdx.x) * kNumPartials + k] = s[k];
  }
}

struct FinalArgs {
  int64_t B;
  int agg;
  double max_len, vf_coef, ent_coef, kl_coef;
  int ntok_mode, nseq_mode;
  double ntok_value, nseq_value;
};

// The global normalizers (N_tokens, N_seqs) from the per-row token counts, or as given; the same values in
// every thread, and in every block that calls it (fixed reduction order).
template <typename T>
__device__ __forceinline__ void reduce_norms(const double* __restrict__ partials, const T* ntok_ptr,
                                             const T* nseq_ptr, const FinalArgs& f, double* ntok, double* nseq) {
  __shared__ double s_norm[2];
  // Counts: sum_b n_b and #{b : n_b > 0}.
  double cnt[2] = {0.0, 0.0};
  for (int64_t b = threadIdx.x; b < f.B; b += kFinalThreads) {
    const double nb = partials[b * kNumPartials + kTokens];
    cnt[0] += nb;
    cnt[1] += nb > 0.0 ? 1.0 : 0.0;
  }
  block_sum<2, kFinalThreads>(cnt);
  if (threadIdx.x == 0) {
    const double tokens = cnt[0] > 1.0 ? cnt[0] : 1.0, seqs = cnt[1] > 1.0 ? cnt[1] : 1.0;
    s_norm[0] = f.ntok_mode == kValue ? f.ntok_value : (f.ntok_mode == kPointer ? double(*ntok_ptr) : tokens);
    s_norm[1] = f.nseq_mode == kValue ? f.nseq_value : (f.nseq_mode == kPointer ? double(*nseq_ptr) : seqs);
  }
  __syncthreads();
  *ntok = s_norm[0];
  *nseq = s_norm[1];
}

// Weighted sums over the rows (the loss terms with c_b, the metric counts plain, divided by N_tokens in
// ppo_write_outputs), then the loss and the metrics; row_scale (may be null) gets every c_b.
template <typename T>
__device__ __forceinline__ void reduce_outputs(const double* __restrict__ partials, double* row_scale, T* loss,
                                               T* metrics, const FinalArgs& f, const PpoConsts<T>& c, double ntok,
                                               double nseq) {
  double tot[kNumPartials];
#pragma unroll
  for (int k = 0; k < kNumPartials; ++k) tot[k] = 0.0;
  for (int64_t b = threadIdx.x; b < f.B; b += kFinalThreads) {
    const double* pb = partials + b * kNumPartials;
    const double cb = row_weight(f.agg, pb[kTokens], ntok, nseq, f.max_len);
    if (row_scale) row_scale[b] = cb;
    tot[kPg] += cb * pb[kPg];
    tot[kVf] += cb * pb[kVf];
    tot[kEntropy] += cb * pb[kEntropy];
    tot[kKl] += cb * pb[kKl];
    tot[kClipped] += pb[kClipped];
    tot[kApproxKl] += pb[kApproxKl];
    tot[kVfClipped] += pb[kVfClipped];
  }
  block_sum<kNumPartials, kFinalThreads>(tot);
  if (threadIdx.x == 0) {
    ppo_write_outputs<T>(c, f.vf_coef, f.ent_coef, f.kl_coef, tot[kPg], tot[kClipped], tot[kApproxKl], tot[kVf],
                         tot[kVfClipped], tot[kEntropy], tot[kKl], ntok, loss, metrics);
  }
}

template <typename T>
__global__ void __launch_bounds__(kFinalThreads)
ppo_finalize_kernel(const double* __restrict__ partials, double* __restrict__ row_scale, T* __restrict__ loss,
                    T* __restrict__ metrics, const T* ntok_ptr, const T* nseq_ptr, FinalArgs f, PpoConsts<T> c) {
  double ntok, nseq;
  reduce_norms<T>(partials, ntok_ptr, nseq_ptr, f, &ntok, &nseq);
  reduce_outputs<T>(partials, row_scale, loss, metrics, f, c, ntok, nseq);
}

// ppo_loss_grads_cuda's second launch, min(B, kMaxGradBlocks) blocks (at least one): every block reduces the
// counts itself (the same N everywhere; B reads each, so the grid is capped), then turns the unnormalized
// gradients of rows b = blockIdx.x, + gridDim.x, ... into the final ones in place, g <- g * c_b * grad_scale (the
// rounding of ppo_scale_kernel); block 0 also writes the loss and the metrics. No third launch, no atomics.
template <typename T>
__global__ void __launch_bounds__(kFinalThreads)
ppo_finalize_grads_kernel(const double* __restrict__ partials, T* __restrict__ loss, T* __restrict__ metrics,
                          const T* ntok_ptr, const T* nseq_ptr, FinalArgs f, PpoConsts<T> c, T* g0, T* g1, T* g2,
                          int n, double grad_scale) {
  double ntok, nseq;
  reduce_norms<T>(partials, ntok_ptr, nseq_ptr, f, &ntok, &nseq);
  if (blockIdx.x == 0) reduce_outputs<T>(partials, nullptr, loss, metrics, f, c, ntok, nseq);
  for (int64_t b = blockIdx.x; b < f.B; b += gridDim.x) {
    const int64_t off = b * n;
    const double s = row_weight(f.agg, partials[b * kNumPartials + kTokens], ntok, nseq, f.max_len) * grad_scale;
    for (int t = threadIdx.x; t < n; t += kFinalThreads) {
      const int64_t i = off + t;
      if (g0) g0[i] = T(double(g0[i]) * s);
      if (g1) g1[i] = T(double(g1[i]) * s);
      if (g2) g2[i] = T(double(g2[i]) * s);
    }
  }
}

// out[b, t] = g[b, t] * row_scale[b] * grad_output, for up to three (g, out) pairs.
template <typename T>
__global__ void ppo_scale_kernel(const double* __restrict__ row_scale, const T* __restrict__ grad_output,
                                 const T* g0, T* o0, const T* g1, T* o1, const T* g2, T* o2, int n) {
  const int64_t off = int64_t(blockIdx.x) * n;
  const double s = row_scale[blockIdx.x] * double(*grad_output);
  for (int t = threadIdx.x; t < n; t += blockDim.x) {
    const int64_t i = off + t;
    if (o0) o0[i] = T(double(g0[i]) * s);
    if (o1) o1[i] = T(double(g1[i]) * s);
    if (o2) o2[i] = T(double(g2[i]) * s);
  }
}

// final_grads false: rows kernel + ppo_finalize_kernel (unnormalized gradients and row_scale, for autograd);
// true: rows kernel + ppo_finalize_grads_kernel (the final gradients of grad_scale * loss, in place).
template <typename T>
void ppo_launch(const PpoLossArgs& a, bool final_grads, double grad_scale) {
  auto stream = reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(a.stream));
  const PpoConsts<T> c(a);
  if (a.B > 0) {
    PpoPtrs<T> p{as_ptr<const T>(a.logp),     as_ptr<const T>(a.old_logp), as_ptr<const T>(a.advantages),
                 as_ptr<const T>(a.values),   as_ptr<const T>(a.old_values), as_ptr<const T>(a.returns),
                 as_ptr<const T>(a.ref_logp), as_ptr<const T>(a.entropy),   as_ptr<const uint8_t>(a.mask),
                 as_ptr<T>(a.grad_logp),      as_ptr<T>(a.grad_values),     as_ptr<T>(a.grad_entropy),
                 as_ptr<double>(a.row_partials)};
    ppo_rows_kernel<T><<<unsigned(a.B), kRowThreads, 0, stream>>>(p, c, int(a.T));
    CUDA_CHECK_LAUNCH("ppo_loss_forward_cuda (rows)");
  }
  FinalArgs f{a.B, a.agg, a.max_len, a.vf_coef, a.ent_coef, a.kl_coef, a.ntok_mode, a.nseq_mode, a.ntok_value,
              a.nseq_value};
  if (!final_grads) {
    ppo_finalize_kernel<T><<<1, kFinalThreads, 0, stream>>>(
        as_ptr<const double>(a.row_partials), as_ptr<double>(a.row_scale), as_ptr<T>(a.loss), as_ptr<T>(a.metrics),
        as_ptr<const T>(a.ntok_ptr), as_ptr<const T>(a.nseq_ptr), f, c);
    CUDA_CHECK_LAUNCH("ppo_loss_forward_cuda (finalize)");
    return;
  }
  const int64_t blocks = a.B < 1 ? 1 : (a.B < kMaxGradBlocks ? a.B : kMaxGradBlocks);
  ppo_finalize_grads_kernel<T><<<unsigned(blocks), kFinalThreads, 0, stream>>>(
      as_ptr<const double>(a.row_partials), as_ptr<T>(a.loss), as_ptr<T>(a.metrics), as_ptr<const T>(a.ntok_ptr),
      as_ptr<const T>(a.nseq_ptr), f, c, as_ptr<T>(a.grad_logp), as_ptr<T>(a.grad_values), as_ptr<T>(a.grad_entropy),
      int(a.T), grad_scale);
  CUDA_CHECK_LAUNCH("ppo_loss_grads_cuda (finalize + gradients)");
}

void check_forward_args(const PpoLossArgs& a) {
  CHECK_SIZES(a.B, a.T);
  RLHF_CHECK(a.B < (int64_t(1) << 31), "B: expected < 2^31");
  CHECK_PTR(a.row_partials); CHECK_PTR(a.loss); CHECK_PTR(a.metrics);
  if (a.B > 0 && a.T > 0) {
    CHECK_PTR(a.logp); CHECK_PTR(a.old_logp); CHECK_PTR(a.advantages); CHECK_PTR(a.mask);
  }
  RLHF_CHECK((a.values != 0) == (a.old_values != 0) && (a.values != 0) == (a.returns != 0),
             "values, old_values, returns: expected all three or none");
  RLHF_CHECK(a.kl_kind >= 1 && a.kl_kind <= 3, "kl_kind: expected 1, 2 or 3");
  RLHF_CHECK(a.agg >= 0 && a.agg <= 3, "agg: expected 0..3");
  RLHF_CHECK(a.ntok_mode != kPointer || a.ntok_ptr != 0, "ntok_ptr: expected a pointer");
  RLHF_CHECK(a.nseq_mode != kPointer || a.nseq_ptr != 0, "nseq_ptr: expected a pointer");
}

}  // namespace

void ppo_loss_forward_cuda(const PpoLossArgs& a) {
  check_forward_args(a);
  CHECK_PTR(a.row_scale);
  dispatch_float(a.dtype, [&](auto tag) { ppo_launch<decltype(tag)>(a, false, 1.0); });
}

void ppo_loss_grads_cuda(const PpoLossArgs& a, double grad_scale) {
  check_forward_args(a);
  RLHF_CHECK(a.values == 0 || a.grad_values != 0, "grad_values: expected a pointer when values are given");
  RLHF_CHECK(a.B == 0 || a.T == 0 || a.grad_logp != 0, "grad_logp: expected a pointer");
  dispatch_float(a.dtype, [&](auto tag) { ppo_launch<decltype(tag)>(a, true, grad_scale); });
}

void ppo_loss_backward_cuda(int64_t row_scale, int64_t grad_output, int64_t g_logp, int64_t grad_logp,
                            int64_t g_values, int64_t grad_values, int64_t g_entropy, int64_t grad_entropy,
                            int64_t B, int64_t T, const std::string& dtype, int64_t stream) {
  CHECK_SIZES(B, T);
  RLHF_CHECK(B < (int64_t(1) << 31), "B: expected < 2^31");
  if (B == 0 || T == 0) return;
  CHECK_PTR(row_scale); CHECK_PTR(grad_output);
  auto s = reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(stream));
  dispatch_float(dtype, [&](auto tag) {
    using S = decltype(tag);
    const S* g0 = as_ptr<const S>(g_logp);
    const S* g1 = as_ptr<const S>(g_values);
    const S* g2 = as_ptr<const S>(g_entropy);
    ppo_scale_kernel<S><<<unsigned(B), 256, 0, s>>>(
        as_ptr<const double>(row_scale), as_ptr<const S>(grad_output), g0, g0 ? as_ptr<S>(grad_logp) : nullptr, g1,
        g1 ? as_ptr<S>(grad_values) : nullptr, g2, g2 ? as_ptr<S>(grad_entropy) : nullptr, int(T));
  });
  CUDA_CHECK_LAUNCH("ppo_loss_backward_cuda");
}

}  // namespace rlhf
