// Block-level building blocks for the CUDA ops: an exclusive scan of affine maps (the linear
// recurrence x_p = a_p x_{p-1} + b_p), the last valid index of a mask row, and a deterministic
// block sum of a few doubles. All assume blockDim.x == THREADS, a multiple of 32, <= 1024.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#define CUDA_CHECK_LAUNCH(what)                                                              \
  do {                                                                                       \
    cudaError_t err_ = cudaGetLastError();                                                   \
    if (err_ != cudaSuccess)                                                                 \
      throw std::runtime_error(std::string("rlhf_engine._C: ") + (what) + ": " + cudaGetErrorString(err_)); \
  } while (0)

namespace rlhf {

constexpr unsigned kFullMask = 0xffffffffu;

// Affine map f(x) = a x + b. Composition "f after g": (a_f a_g, a_f b_g + b_f).
//
// Each thread holds the composition F_i of its own consecutive maps (in logical order); this
// returns x_in for thread i:  (F_{i-1} o ... o F_0)(carry), and sets *block_out to
// (F_{n-1} o ... o F_0)(carry), the value leaving the block (the carry of the next tile).
// Warp-level inclusive scan with shuffles, then a scan over the warp totals in shared memory.
template <typename T, int THREADS>
__device__ __forceinline__ T block_affine_scan(T a, T b, T carry, T* block_out) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "THREADS must be a multiple of 32, <= 1024");
  constexpr int kWarps = THREADS / 32;
  __shared__ T s_a[kWarps], s_b[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const T pa = __shfl_up_sync(kFullMask, a, off);
    const T pb = __shfl_up_sync(kFullMask, b, off);
    if (lane >= off) {  // (a, b) <- (a, b) o (pa, pb)
      b = a * pb + b;
      a = a * pa;
    }
  }
  if (lane == 31) {
    s_a[warp] = a;
    s_b[warp] = b;
  }
  __syncthreads();
  T y = carry;  // value entering this warp: warps 0 .. warp-1 applied to the carry
  for (int w = 0; w < warp; ++w) y = s_a[w] * y + s_b[w];
  T out = y;
  for (int w = warp; w < kWarps; ++w) out = s_a[w] * out + s_b[w];
  const T ea = __shfl_up_sync(kFullMask, a, 1);  // exclusive: lanes 0 .. lane-1 of this warp
  const T eb = __shfl_up_sync(kFullMask, b, 1);
  *block_out = out;
  __syncthreads();  // s_a / s_b may be rewritten by the next call
  return lane == 0 ? y : ea * y + eb;
}

// Largest t < n with m[t] != 0, or -1 (the same value in every thread of the block).
template <int THREADS>
__device__ __forceinline__ int block_last_valid(const uint8_t* m, int n) {
  __shared__ int s_last;
  if (threadIdx.x == 0) s_last = -1;
  __syncthreads();
  int last = -1;
  for (int t = threadIdx.x; t < n; t += THREADS)
    if (m[t]) last = t;
  last = __reduce_max_sync(kFullMask, last);
  if ((threadIdx.x & 31) == 0) atomicMax(&s_last, last);  // integer max: order does not matter
  __syncthreads();
  const int out = s_last;
  __syncthreads();
  return out;
}

// Sums v[0..K) over the block in a fixed order (deterministic); the result is valid in thread 0.
template <int K, int THREADS>
__device__ __forceinline__ void block_sum(double (&v)[K]) {
  constexpr int kWarps = THREADS / 32;
  __shared__ double s[K][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_down_sync(kFullMask, v[k], off);
    if (lane == 0) s[k][warp] = v[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      double acc = 0.0;
      for (int w = 0; w < kWarps; ++w) acc += s[k][w];
      v[k] = acc;
    }
  }
  __syncthreads();
}

}  // namespace rlhf
