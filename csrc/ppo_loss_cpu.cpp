// PPO loss on the CPU, fused forward + backward: OpenMP over rows, one pass over each row that
// writes the unnormalized per-token gradients and the row's partial sums (in double), then a
// sequential, deterministic reduction over rows that applies the aggregation weights.
// Math: ppo_math.h (the semantics of rlhf_engine.algo.losses.ppo_loss_reference).
#include <cstdint>

#include "common.h"
#include "ops.h"
#include "ppo_math.h"

namespace rlhf {
namespace {

template <typename T>
double read_norm(int mode, double value, int64_t ptr, double from_mask) {
  if (mode == kValue) return value;
  if (mode == kPointer) return double(*as_ptr<const T>(ptr));
  return from_mask;
}

template <typename T>
void ppo_forward_impl(const PpoLossArgs& a) {
  const PpoConsts<T> c(a);
  const int64_t B = a.B, n = a.T;
  const T* lp = as_ptr<const T>(a.logp);
  const T* olp = as_ptr<const T>(a.old_logp);
  const T* adv = as_ptr<const T>(a.advantages);
  const uint8_t* m = as_ptr<const uint8_t>(a.mask);
  const T* v = as_ptr<const T>(a.values);
  const T* ov = as_ptr<const T>(a.old_values);
  const T* ret = as_ptr<const T>(a.returns);
  const T* rlp = as_ptr<const T>(a.ref_logp);
  const T* ent = as_ptr<const T>(a.entropy);
  T* g_lp = as_ptr<T>(a.grad_logp);
  T* g_v = as_ptr<T>(a.grad_values);
  T* g_ent = as_ptr<T>(a.grad_entropy);
  double* partials = as_ptr<double>(a.row_partials);
  double* row_scale = as_ptr<double>(a.row_scale);

#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    double s[kNumPartials] = {0.0};
    for (int64_t i = b * n; i < (b + 1) * n; ++i) {
      T glp = T(0), gv = T(0), gent = T(0);
      if (m[i] != 0) {
        ppo_token<T, double>(c, lp[i], olp[i], adv[i], v ? v[i] : T(0), ov ? ov[i] : T(0), ret ? ret[i] : T(0),
                             rlp ? rlp[i] : T(0), ent ? ent[i] : T(0), s, &glp, &gv, &gent);
        s[kTokens] += 1.0;
      }
      if (g_lp) g_lp[i] = glp;
      if (g_v) g_v[i] = gv;
      if (g_ent) g_ent[i] = gent;
    }
    for (int k = 0; k < kNumPartials; ++k) partials[b * kNumPartials + k] = s[k];
  }

  // Normalizers: N_tokens = max(sum m, 1) and N_seqs = max(#non-empty rows, 1) unless given.
  double tokens = 0.0, seqs = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    tokens += partials[b * kNumPartials + kTokens];
    seqs += partials[b * kNumPartials + kTokens] > 0.0 ? 1.0 : 0.0;
  }
  const double ntok = read_norm<T>(a.ntok_mode, a.ntok_value, a.ntok_ptr, tokens > 1.0 ? tokens : 1.0);
  const double nseq = read_norm<T>(a.nseq_mode, a.nseq_value, a.nseq_ptr, seqs > 1.0 ? seqs : 1.0);

  double tot[kNumPartials] = {0.0};
  for (int64_t b = 0; b < B; ++b) {
    const double* p = partials + b * kNumPartials;
    const double cb = row_weight(a.agg, p[kTokens], ntok, nseq, a.max_len);
    row_scale[b] = cb;
    for (int k : {kPg, kVf, kEntropy, kKl}) tot[k] += cb * p[k];
    for (int k : {kClipped, kApproxKl, kVfClipped}) tot[k] += p[k];
  }
  ppo_write_outputs<T>(c, a.vf_coef, a.ent_coef, a.kl_coef, tot[kPg], tot[kClipped], tot[kApproxKl], tot[kVf],
                       tot[kVfClipped], tot[kEntropy], tot[kKl], ntok, as_ptr<T>(a.loss), as_ptr<T>(a.metrics));
}

template <typename T>
void scale_rows(const double* row_scale, double go, const T* g, T* out, int64_t B, int64_t n) {
  if (!g || !out) return;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < B; ++b) {
    const double s = row_scale[b] * go;
    for (int64_t i = b * n; i < (b + 1) * n; ++i) out[i] = T(double(g[i]) * s);
  }
}

}  // namespace

void ppo_loss_forward_cpu(const PpoLossArgs& a) {
  CHECK_SIZES(a.B, a.T);
  CHECK_PTR(a.row_partials); CHECK_PTR(a.row_scale); CHECK_PTR(a.loss); CHECK_PTR(a.metrics);
  if (a.B > 0 && a.T > 0) {
    CHECK_PTR(a.logp); CHECK_PTR(a.old_logp); CHECK_PTR(a.advantages); CHECK_PTR(a.mask);
  }
  RLHF_CHECK((a.values != 0) == (a.old_values != 0) && (a.values != 0) == (a.returns != 0),
             "values, old_values, returns: expected all three or none");
  RLHF_CHECK(a.kl_kind >= 1 && a.kl_kind <= 3, "kl_kind: expected 1, 2 or 3");
  RLHF_CHECK(a.agg >= 0 && a.agg <= 3, "agg: expected 0..3");
  dispatch_float(a.dtype, [&](auto tag) { ppo_forward_impl<decltype(tag)>(a); });
}

void ppo_loss_grads_cpu(const PpoLossArgs& a, double grad_scale) {
  RLHF_CHECK(a.values == 0 || a.grad_values != 0, "grad_values: expected a pointer when values are given");
  RLHF_CHECK(a.B == 0 || a.T == 0 || a.grad_logp != 0, "grad_logp: expected a pointer");
  ppo_loss_forward_cpu(a);
  dispatch_float(a.dtype, [&](auto tag) {
    using S = decltype(tag);
    const double* rs = as_ptr<const double>(a.row_scale);
    for (int64_t g : {a.grad_logp, a.grad_values, a.grad_entropy})  // in place: g <- g * c_b * grad_scale
      scale_rows<S>(rs, grad_scale, as_ptr<const S>(g), as_ptr<S>(g), a.B, a.T);
  });
}

void ppo_loss_backward_cpu(int64_t row_scale, int64_t grad_output, int64_t g_logp, int64_t grad_logp,
                           int64_t g_values, int64_t grad_values, int64_t g_entropy, int64_t grad_entropy,
                           int64_t B, int64_t T, const std::string& dtype) {
  CHECK_SIZES(B, T);
  CHECK_PTR(row_scale); CHECK_PTR(grad_output);
  dispatch_float(dtype, [&](auto tag) {
    using S = decltype(tag);
    const double* rs = as_ptr<const double>(row_scale);
    const double go = double(*as_ptr<const S>(grad_output));
    scale_rows<S>(rs, go, as_ptr<const S>(g_logp), as_ptr<S>(grad_logp), B, T);
    scale_rows<S>(rs, go, as_ptr<const S>(g_values), as_ptr<S>(grad_values), B, T);
    scale_rows<S>(rs, go, as_ptr<const S>(g_entropy), as_ptr<S>(grad_entropy), B, T);
  });
}

}  // namespace rlhf
