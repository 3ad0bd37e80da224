// Per-token PPO loss math shared by the CPU and CUDA ops (host and device code).
//
// Semantics: exactly rlhf_engine.algo.losses.ppo_loss_reference. For one valid token:
//   delta = logp - old_logp;  rho = exp(clamp(delta, -20, 20))
//   pg    = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high));   clipped = (second > first)
//   dual clip (c > 1, A < 0, pg > -c A):  pg = -c A, clipped = true
//   vf    = 1/2 max((V - G)^2, (V_clip - G)^2)   (or 1/2 (V - G)^2), V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
//           taken as V itself where |V - V_old| <= eps_v (V_old + (V - V_old) can round away from V)
//   k     = clamp(k1 | k2 | k3 (x = logp - ref_logp), -10, 10)
//   loss  = agg(pg) + vf_coef agg(vf) - ent_coef agg(H) + kl_coef agg(k)
// Every term shares the aggregation weights w_bt = m_bt * c_b (row_weight below), so the ops
// write the *unnormalized* per-token gradients (d loss / d x_bt) / c_b and the backward multiplies
// them by c_b * grad_output.
//
// Gradients follow PyTorch's autograd conventions exactly, so that the fused op equals autograd
// of the reference: clamp passes the gradient where min <= x <= max (inclusive); maximum splits
// the gradient in half on ties (pg1 == pg2 whenever the ratio is inside the clip range).
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace rlhf {

// Row sums kept per row (in double): index into PpoLossArgs::row_partials (B, kNumPartials).
enum PpoPartial : int {
  kPg = 0,       // sum_t m pg
  kClipped,      // sum_t m [clipped]
  kApproxKl,     // sum_t m delta^2 / 2
  kVf,           // sum_t m vf
  kVfClipped,    // sum_t m [value clipped]
  kEntropy,      // sum_t m H
  kKl,           // sum_t m k
  kTokens,       // sum_t m
  kNumPartials,
};

// Metrics output (7,), in this order (the Python wrapper names them).
enum PpoMetric : int { kMPg = 0, kMClipFrac, kMApproxKl, kMVf, kMVfClipFrac, kMEntropy, kMKl, kNumMetrics };

enum Agg : int { kTokenMean = 0, kSeqMeanTokenMean = 1, kSeqMeanTokenSum = 2, kSeqMeanTokenSumNorm = 3 };

// Normalizer modes for num_tokens / num_seqs.
enum NormMode : int { kFromMask = 0, kValue = 1, kPointer = 2 };

// Everything one PPO loss call needs. Pointers are data pointers as integers; 0 = absent.
struct PpoLossArgs {
  // (B, T) contiguous inputs in the value dtype, except mask: uint8 (nonzero = valid token).
  int64_t logp = 0, old_logp = 0, advantages = 0, mask = 0;
  int64_t values = 0, old_values = 0, returns = 0;  // all three or none
  int64_t ref_logp = 0, entropy = 0;                // optional
  // (B, T) outputs in the value dtype: unnormalized gradients (see above); 0 = not needed.
  int64_t grad_logp = 0, grad_values = 0, grad_entropy = 0;
  // Outputs: row_partials (B, kNumPartials) float64 workspace; row_scale (B,) float64 c_b;
  // loss () and metrics (kNumMetrics,) in the value dtype.
  int64_t row_partials = 0, row_scale = 0, loss = 0, metrics = 0;
  int64_t B = 0, T = 0;
  double clip_low = 0.2, clip_high = 0.2;
  double dual_clip = 0.0;   // <= 0: no dual clip
  double value_clip = 0.0;  // <= 0: unclipped value loss
  double vf_coef = 0.5, ent_coef = 0.0, kl_coef = 0.0;
  int kl_kind = 3;          // 1, 2 or 3
  int agg = kTokenMean;
  double max_len = 0.0;     // T_max of seq-mean-token-sum-norm
  int ntok_mode = kFromMask, nseq_mode = kFromMask;
  double ntok_value = 0.0, nseq_value = 0.0;
  int64_t ntok_ptr = 0, nseq_ptr = 0;  // 0-dim tensors in the value dtype (kPointer)
  std::string dtype = "float32";
  int64_t stream = 0;       // cudaStream_t (CUDA ops only)
};

// The hyperparameters cast to the value dtype the way PyTorch casts Python scalars.
template <typename T>
struct PpoConsts {
  T ratio_lo, ratio_hi, neg_dual, vclip_lo, vclip_hi, vf_coef, ent_coef, kl_coef;
  bool dual, vclip, has_values, has_ref, has_entropy;
  int kl_kind;

  explicit PpoConsts(const PpoLossArgs& a)
      : ratio_lo(T(1.0 - a.clip_low)), ratio_hi(T(1.0 + a.clip_high)), neg_dual(T(-a.dual_clip)),
        vclip_lo(T(-a.value_clip)), vclip_hi(T(a.value_clip)), vf_coef(T(a.vf_coef)), ent_coef(T(a.ent_coef)),
        kl_coef(T(a.kl_coef)), dual(a.dual_clip > 0), vclip(a.value_clip > 0), has_values(a.values != 0),
        has_ref(a.ref_logp != 0), has_entropy(a.entropy != 0), kl_kind(a.kl_kind) {}
};

template <typename T>
RLHF_HD T clampv(T x, T lo, T hi) { return x < lo ? lo : (x > hi ? hi : x); }
template <typename T>
RLHF_HD T in_range(T x, T lo, T hi) { return (x >= lo && x <= hi) ? T(1) : T(0); }  // clamp's gradient

// d max(p, q) / d p as autograd computes it: 1, 0, or 1/2 on ties (d / d q = 1 - that).
template <typename T>
RLHF_HD T max_grad_first(T p, T q) { return p > q ? T(1) : (p < q ? T(0) : T(0.5)); }

// One valid token: adds its terms to s[kPg..kKl] and returns the unnormalized gradients.
// Inputs absent from the call (values, ref_logp, entropy) are read only when present.
// Written with selects rather than branches: clip decisions are data-dependent coin flips, and
// mispredicted branches cost more than the arithmetic (the has_* / kind switches are uniform).
template <typename T, typename Acc>
RLHF_HD void ppo_token(const PpoConsts<T>& c, T lp, T olp, T adv, T v, T ov, T ret, T rlp, T ent, Acc* s,
                       T* g_lp, T* g_v, T* g_ent) {
  using std::exp;
  // Policy: rho = exp(clamp(delta, -20, 20)); pg = max(-A rho, -A clip(rho, lo, hi)).
  const T delta = lp - olp;
  const T ratio = exp(clampv(delta, T(-20), T(20)));
  const T pg1 = -adv * ratio;
  const T pg2 = -adv * clampv(ratio, c.ratio_lo, c.ratio_hi);
  const T d1 = max_grad_first(pg1, pg2);
  // d pg / d rho = -A (d1 + d2 [lo <= rho <= hi]); d rho / d logp = rho [-20 <= delta <= 20].
  T dpg = -adv * (d1 + (T(1) - d1) * in_range(ratio, c.ratio_lo, c.ratio_hi));
  T pg = pg1 > pg2 ? pg1 : pg2;
  bool clipped = pg2 > pg1;
  // Dual clip (A < 0): pg = min(pg, -c A); the constant branch has no gradient.
  const T lower = c.neg_dual * adv;
  const bool dual = c.dual && adv < T(0) && pg > lower;
  pg = dual ? lower : pg;
  dpg = dual ? T(0) : dpg;
  clipped = clipped || dual;
  T glp = dpg * ratio * in_range(delta, T(-20), T(20));
  s[kPg] += Acc(pg);
  s[kClipped] += Acc(clipped ? T(1) : T(0));
  s[kApproxKl] += Acc(T(0.5) * delta * delta);

  if (c.has_values) {
    // Value: 1/2 max((V - G)^2, (V_clip - G)^2), V_clip = V where |V - V_old| <= eps, else V_old +- eps;
    // d/dV = (first or second) e.
    const T e1 = v - ret;
    const T err = e1 * e1;
    T vf = T(0.5) * err, dv = e1, vclipped = T(0);
    if (c.vclip) {
      const T dvo = v - ov;
      // in range the clipped value is v itself, not ov + dvo (an ulp away: a clip counted by rounding)
      const T inr = in_range(dvo, c.vclip_lo, c.vclip_hi);
      const T e2 = (inr != T(0) ? v : ov + clampv(dvo, c.vclip_lo, c.vclip_hi)) - ret;
      const T err2 = e2 * e2;
      const T da = max_grad_first(err, err2);
      vf = T(0.5) * (err > err2 ? err : err2);
      vclipped = err2 > err ? T(1) : T(0);
      dv = da * e1 + (T(1) - da) * e2 * inr;
    }
    s[kVf] += Acc(vf);
    s[kVfClipped] += Acc(vclipped);
    *g_v = c.vf_coef * dv;
  }
  if (c.has_entropy) {
    s[kEntropy] += Acc(ent);
    *g_ent = -c.ent_coef;
  }
  if (c.has_ref) {
    // KL estimate with x = logp - ref_logp, clamped to [-10, 10].
    const T x = lp - rlp;
    T k, dk;
    if (c.kl_kind == 1) {
      k = x;
      dk = T(1);
    } else if (c.kl_kind == 2) {
      k = T(0.5) * x * x;
      dk = x;
    } else {
      const T xc = clampv(x, T(-20), T(20));
      const T e = exp(-xc);
      k = e - T(1) + xc;
      dk = (T(1) - e) * in_range(x, T(-20), T(20));
    }
    dk *= in_range(k, T(-10), T(10));
    k = clampv(k, T(-10), T(10));
    s[kKl] += Acc(k);
    glp += c.kl_coef * dk;
  }
  *g_lp = glp;
}

// c_b: the aggregation weight of each valid token of row b (w_bt = m_bt c_b).
RLHF_HD double row_weight(int agg, double row_tokens, double ntok, double nseq, double tmax) {
  switch (agg) {
    case kTokenMean: return 1.0 / ntok;
    case kSeqMeanTokenMean: return 1.0 / ((row_tokens > 1.0 ? row_tokens : 1.0) * nseq);
    case kSeqMeanTokenSum: return 1.0 / nseq;
    default: return 1.0 / (nseq * tmax);
  }
}

// loss = pg + vf_coef vf - ent_coef H + kl_coef k (only the terms whose inputs are present),
// from the weighted sums; writes the loss and the metrics.
template <typename T>
RLHF_HD void ppo_write_outputs(const PpoConsts<T>& c, double vf_coef, double ent_coef, double kl_coef,
                               double pg, double clipped, double approx_kl, double vf, double vclipped, double ent,
                               double kl, double ntok, T* loss, T* metrics) {
  double l = pg;
  if (c.has_values) l += vf_coef * vf;
  if (c.has_entropy) l -= ent_coef * ent;
  if (c.has_ref) l += kl_coef * kl;
  *loss = T(l);
  metrics[kMPg] = T(pg);
  metrics[kMClipFrac] = T(clipped / ntok);
  metrics[kMApproxKl] = T(approx_kl / ntok);
  metrics[kMVf] = T(vf);
  metrics[kMVfClipFrac] = T(vclipped / ntok);
  metrics[kMEntropy] = T(ent);
  metrics[kMKl] = T(kl);
}

}  // namespace rlhf
