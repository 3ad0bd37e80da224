// GAE on CUDA: one block per row, the recursion over time as a block-wide scan of affine maps.
//
// Math and backward: gae_cpu.cpp. The recursion A_t = a_t A_{t+1} + b_t (reversed time) is a
// composition of affine maps x -> a x + b, which is associative, so a block scans it in
// O(T / THREADS + log THREADS) steps instead of T sequential ones:
//   zero mode:  a_t = gamma lam,                    b_t = delta_t (every position)
//   carry mode: a_t = valid ? gamma lam : 1,        b_t = valid ? delta_t : 0
// In carry mode delta_t needs the value of the next valid token, itself the scan
//   C_t = valid ? V_t : C_{t+1}   (a = valid ? 0 : 1, b = valid ? V_t : 0, C_T = V_boot)
// so a carry-mode tile runs two scans. The backward is the same scan forward in time:
//   D_t = a_t D_{t-1} + g_t  with g_t = m_t (dA_t + dR_t).
//
// Layout: each block walks its row in tiles of THREADS * ITEMS positions in *logical* order
// (reversed time for the forward, time for the backward). Thread i owns the ITEMS consecutive
// logical positions i*ITEMS .. i*ITEMS+ITEMS-1 of a tile: it composes their maps, the block scan
// gives the value entering its first position, and it then replays its positions sequentially.
// The value leaving the tile is the carry into the next one, so any T works.
#include <cuda_runtime.h>

#include <cstdint>

#include "common.h"
#include "cuda_utils.cuh"
#include "ops.h"

namespace rlhf {
namespace {

constexpr int kThreads = 128;
constexpr int kItems = 8;
constexpr int kTile = kThreads * kItems;

template <typename T>
__global__ void __launch_bounds__(kThreads)
gae_forward_kernel(const T* __restrict__ rewards, const T* __restrict__ values, const uint8_t* __restrict__ mask,
                   const T* __restrict__ last_value, T* __restrict__ advantages, T* __restrict__ returns, int n,
                   T g, T gl, bool carry) {
  const int64_t off = int64_t(blockIdx.x) * n;
  const T* r = rewards + off;
  const T* v = values + off;
  const uint8_t* m = mask + off;
  T* adv = advantages + off;
  T* ret = returns + off;
  const T lv = last_value ? last_value[blockIdx.x] : T(0);
  const int last = carry ? -1 : block_last_valid<kThreads>(m, n);

  T carry_a = T(0);  // A_{t+1} entering the tile (A_T = 0)
  T carry_c = lv;    // carry mode: C_{t+1}, the value of the next valid token (or the bootstrap)
  for (int base = 0; base < n; base += kTile) {
    const int p0 = base + threadIdx.x * kItems;  // logical position p <-> time t = n - 1 - p
    T rk[kItems], vk[kItems], ak[kItems], bk[kItems];
    bool mk[kItems];
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int t = n - 1 - (p0 + k);
      mk[k] = t >= 0 && m[t] != 0;
      rk[k] = mk[k] ? r[t] : T(0);
      vk[k] = mk[k] ? v[t] : T(0);
    }
    if (carry) {
      // Scan 1: C_t = valid ? V_t : C_{t+1}; this thread's maps composed in logical order.
      T pa = T(1), pb = T(0);
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        pb = mk[k] ? vk[k] : pb;
        pa = mk[k] ? T(0) : pa;
      }
      T tile_c;
      T c = block_affine_scan<T, kThreads>(pa, pb, carry_c, &tile_c);
      carry_c = tile_c;
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        // delta_t = r_t + gamma C_{t+1} - V_t on valid tokens; the identity map elsewhere.
        bk[k] = mk[k] ? rk[k] + g * c - vk[k] : T(0);
        ak[k] = mk[k] ? gl : T(1);
        c = mk[k] ? vk[k] : c;
      }
    } else {
#pragma unroll
      for (int k = 0; k < kItems; ++k) {
        const int t = n - 1 - (p0 + k);
        // m_{t+1} V_{t+1}: the previous logical item, from registers except for the first one.
        T nv = T(0);
        if (k > 0) {
          nv = vk[k - 1];
        } else if (t >= 0 && t + 1 < n && m[t + 1] != 0) {
          nv = v[t + 1];
        }
        if (t == last) nv = nv + lv;  // truncation bootstrap at the row's last valid token
        bk[k] = t >= 0 ? rk[k] + g * nv - vk[k] : T(0);
        ak[k] = gl;
      }
    }
    // Scan 2: A_t = a_t A_{t+1} + b_t.
    T pa = T(1), pb = T(0);
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      pb = ak[k] * pb + bk[k];
      pa = ak[k] * pa;
    }
    T tile_a;
    T x = block_affine_scan<T, kThreads>(pa, pb, carry_a, &tile_a);
    carry_a = tile_a;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int t = n - 1 - (p0 + k);
      x = ak[k] * x + bk[k];
      if (t >= 0) {
        adv[t] = mk[k] ? x : T(0);
        ret[t] = mk[k] ? x + vk[k] : T(0);
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
gae_backward_kernel(const uint8_t* __restrict__ mask, const T* __restrict__ grad_adv, const T* __restrict__ grad_ret,
                    T* __restrict__ grad_rewards, T* __restrict__ grad_values, T* __restrict__ grad_last_value, int n,
                    T g, T gl, bool carry) {
  const int64_t off = int64_t(blockIdx.x) * n;
  const uint8_t* m = mask + off;
  const T* ga = grad_adv ? grad_adv + off : nullptr;
  const T* gr = grad_ret ? grad_ret + off : nullptr;
  T* d_r = grad_rewards + off;
  T* d_v = grad_values + off;
  const int last = block_last_valid<kThreads>(m, n);
  if (grad_last_value && last < 0 && threadIdx.x == 0) grad_last_value[blockIdx.x] = T(0);

  T carry_d = T(0);  // D_{t-1} entering the tile (D_{-1} = 0)
  for (int base = 0; base < n; base += kTile) {
    const int t0 = base + threadIdx.x * kItems;  // logical position = time
    T gk[kItems], grk[kItems], ak[kItems];
    bool mk[kItems];
    T pa = T(1), pb = T(0);
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int t = t0 + k;
      mk[k] = t < n && m[t] != 0;
      grk[k] = mk[k] && gr ? gr[t] : T(0);
      gk[k] = (mk[k] && ga ? ga[t] : T(0)) + grk[k];
      ak[k] = (mk[k] || !carry) ? gl : T(1);
      pb = ak[k] * pb + gk[k];
      pa = ak[k] * pa;
    }
    T tile_d;
    T d = block_affine_scan<T, kThreads>(pa, pb, carry_d, &tile_d);
    carry_d = tile_d;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int t = t0 + k;
      const T d_prev = d;
      d = ak[k] * d + gk[k];
      if (t < n) {
        d_r[t] = mk[k] ? d : T(0);
        d_v[t] = mk[k] ? grk[k] - d + g * d_prev : T(0);
        if (t == last && grad_last_value) grad_last_value[blockIdx.x] = g * d;
      }
    }
  }
}

}  // namespace

void gae_forward_cuda(int64_t rewards, int64_t values, int64_t mask, int64_t last_value, int64_t advantages,
                      int64_t returns, int64_t B, int64_t T, double gamma, double lam, bool carry,
                      const std::string& dtype, int64_t stream) {
  CHECK_SIZES(B, T);
  RLHF_CHECK(B < (int64_t(1) << 31), "B: expected < 2^31");
  if (B == 0 || T == 0) return;
  CHECK_PTR(rewards); CHECK_PTR(values); CHECK_PTR(mask); CHECK_PTR(advantages); CHECK_PTR(returns);
  auto s = reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(stream));
  dispatch_float(dtype, [&](auto tag) {
    using S = decltype(tag);
    gae_forward_kernel<S><<<unsigned(B), kThreads, 0, s>>>(
        as_ptr<const S>(rewards), as_ptr<const S>(values), as_ptr<const uint8_t>(mask), as_ptr<const S>(last_value),
        as_ptr<S>(advantages), as_ptr<S>(returns), int(T), S(gamma), S(gamma * lam), carry);
  });
  CUDA_CHECK_LAUNCH("gae_forward_cuda");
}

void gae_backward_cuda(int64_t mask, int64_t grad_advantages, int64_t grad_returns, int64_t grad_rewards,
                       int64_t grad_values, int64_t grad_last_value, int64_t B, int64_t T, double gamma, double lam,
                       bool carry, const std::string& dtype, int64_t stream) {
  CHECK_SIZES(B, T);
  RLHF_CHECK(B < (int64_t(1) << 31), "B: expected < 2^31");
  if (B == 0) return;
  if (T > 0) {  // with T == 0 the kernel only writes d last_value = 0
    CHECK_PTR(mask); CHECK_PTR(grad_rewards); CHECK_PTR(grad_values);
  }
  auto s = reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(stream));
  dispatch_float(dtype, [&](auto tag) {
    using S = decltype(tag);
    gae_backward_kernel<S><<<unsigned(B), kThreads, 0, s>>>(
        as_ptr<const uint8_t>(mask), as_ptr<const S>(grad_advantages), as_ptr<const S>(grad_returns),
        as_ptr<S>(grad_rewards), as_ptr<S>(grad_values), as_ptr<S>(grad_last_value), int(T), S(gamma),
        S(gamma * lam), carry);
  });
  CUDA_CHECK_LAUNCH("gae_backward_cuda");
}

}  // namespace rlhf
