// GAE on the CPU: OpenMP over rows, one sequential pass over time per row.
//
// Semantics: exactly rlhf_engine.algo.gae.gae_reference (same operation order, in the value dtype).
//   zero mode:  r, V zeroed outside the mask; for every t (reversed):
//       delta_t = m_t r_t + gamma (m_{t+1} V_{t+1} + [t = last] V_boot) - m_t V_t
//       A_t     = delta_t + gamma lam A_{t+1}                                   (A_T = 0)
//   carry mode: masked positions are skipped (A and the "next value" pass through them):
//       delta_t = r_t + gamma V_next - V_t,  A_t = delta_t + gamma lam A_next   (V_next starts at V_boot)
//   advantages = m A, returns = m (A + V).
//
// Backward. The map is linear: A = L delta with L_ts = (gamma lam)^(s - t) over the positions the
// recursion runs through (all of them in zero mode, the valid ones in carry mode). With
// g_t = m_t (dA_t + dR_t), d delta = L^T g is the forward-in-time recursion
//       D_t = g_t + gamma lam D_{t-1}              (carry mode: D passes unchanged through holes)
// and, since delta_t holds +r_t, -V_t and +gamma V_(next valid after t):
//       d r_t = m_t D_t,   d V_t = m_t (dR_t - D_t + gamma D_(previous position)),   d V_boot = gamma D_last.
#include <cstdint>

#include "common.h"
#include "ops.h"

namespace rlhf {
namespace {

template <typename T>
void gae_forward_row(const T* r, const T* v, const uint8_t* m, T lv, T* adv, T* ret, int64_t n, T g, T gl,
                     bool carry) {
  T a = T(0);
  if (!carry) {
    T next_v = T(0);  // m_{t+1} V_{t+1}
    bool seen = false;  // passed the row's last valid token (scanning backwards)
    for (int64_t t = n - 1; t >= 0; --t) {
      const bool valid = m[t] != 0;
      const T rt = valid ? r[t] : T(0), vt = valid ? v[t] : T(0);
      T nv = next_v;
      if (valid && !seen) {
        nv = next_v + lv;  // truncation bootstrap at the last valid token
        seen = true;
      }
      const T delta = rt + g * nv - vt;
      a = delta + gl * a;
      adv[t] = valid ? a : T(0);
      ret[t] = valid ? a + v[t] : T(0);
      next_v = vt;
    }
  } else {
    T next_v = lv;  // V of the next valid token, or the bootstrap value
    for (int64_t t = n - 1; t >= 0; --t) {
      if (m[t] != 0) {
        const T delta = r[t] + g * next_v - v[t];
        a = delta + gl * a;
        next_v = v[t];
        adv[t] = a;
        ret[t] = a + v[t];
      } else {
        adv[t] = T(0);
        ret[t] = T(0);
      }
    }
  }
}

template <typename T>
T gae_backward_row(const uint8_t* m, const T* ga, const T* gr, T* d_r, T* d_v, int64_t n, T g, T gl, bool carry) {
  T d = T(0), d_last = T(0);
  for (int64_t t = 0; t < n; ++t) {
    const bool valid = m[t] != 0;
    const T d_prev = d;
    if (valid) {
      const T grt = gr ? gr[t] : T(0);
      const T gt = (ga ? ga[t] : T(0)) + grt;
      d = gt + gl * d;
      d_r[t] = d;
      d_v[t] = grt - d + g * d_prev;
      d_last = d;
    } else {
      if (!carry) d = gl * d;
      d_r[t] = T(0);
      d_v[t] = T(0);
    }
  }
  return g * d_last;
}

}  // namespace

void gae_forward_cpu(int64_t rewards, int64_t values, int64_t mask, int64_t last_value, int64_t advantages,
                     int64_t returns, int64_t B, int64_t T, double gamma, double lam, bool carry,
                     const std::string& dtype) {
  CHECK_SIZES(B, T);
  if (B == 0 || T == 0) return;
  CHECK_PTR(rewards); CHECK_PTR(values); CHECK_PTR(mask); CHECK_PTR(advantages); CHECK_PTR(returns);
  dispatch_float(dtype, [&](auto tag) {
    using S = decltype(tag);
    const S* r = as_ptr<const S>(rewards);
    const S* v = as_ptr<const S>(values);
    const uint8_t* m = as_ptr<const uint8_t>(mask);
    const S* lv = as_ptr<const S>(last_value);
    S* adv = as_ptr<S>(advantages);
    S* ret = as_ptr<S>(returns);
    const S g = S(gamma), gl = S(gamma * lam);  // as PyTorch casts the Python scalars
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t o = b * T;
      gae_forward_row<S>(r + o, v + o, m + o, lv ? lv[b] : S(0), adv + o, ret + o, T, g, gl, carry);
    }
  });
}

void gae_backward_cpu(int64_t mask, int64_t grad_advantages, int64_t grad_returns, int64_t grad_rewards,
                      int64_t grad_values, int64_t grad_last_value, int64_t B, int64_t T, double gamma, double lam,
                      bool carry, const std::string& dtype) {
  CHECK_SIZES(B, T);
  if (B == 0) return;
  if (T == 0) {  // nothing to differentiate: d last_value = 0
    dispatch_float(dtype, [&](auto tag) {
      using S = decltype(tag);
      S* d_lv = as_ptr<S>(grad_last_value);
      for (int64_t b = 0; d_lv && b < B; ++b) d_lv[b] = S(0);
    });
    return;
  }
  CHECK_PTR(mask); CHECK_PTR(grad_rewards); CHECK_PTR(grad_values);
  dispatch_float(dtype, [&](auto tag) {
    using S = decltype(tag);
    const uint8_t* m = as_ptr<const uint8_t>(mask);
    const S* ga = as_ptr<const S>(grad_advantages);
    const S* gr = as_ptr<const S>(grad_returns);
    S* d_r = as_ptr<S>(grad_rewards);
    S* d_v = as_ptr<S>(grad_values);
    S* d_lv = as_ptr<S>(grad_last_value);
    const S g = S(gamma), gl = S(gamma * lam);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const int64_t o = b * T;
      const S glv = gae_backward_row<S>(m + o, ga ? ga + o : nullptr, gr ? gr + o : nullptr, d_r + o, d_v + o, T,
                                        g, gl, carry);
      if (d_lv) d_lv[b] = glv;
    }
  });
}

}  // namespace rlhf
