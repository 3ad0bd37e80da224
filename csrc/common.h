// Shared helpers for the native ops: argument checks, dtype dispatch, pointer casts.
//
// The extension never links libtorch: Python hands every op raw data pointers (as integers),
// sizes, scalars and, for CUDA, the current stream. The wrappers in kernels/native.py validate
// dtypes, devices, shapes and contiguity first; the checks here are a last line of defence.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define RLHF_HD __host__ __device__ __forceinline__
#else
#define RLHF_HD inline
#endif

#define RLHF_CHECK(cond, msg)                                                    \
  do {                                                                           \
    if (!(cond)) throw std::invalid_argument(std::string("rlhf_engine._C: ") + (msg)); \
  } while (0)

#define CHECK_PTR(p) RLHF_CHECK((p) != 0, #p ": expected a non-null data pointer")
// T < 2^30: the CUDA kernels walk a row with int counters in tiles (t += 1024 and the like), which must not
// overflow past the row's end.
#define CHECK_SIZES(B, T) RLHF_CHECK((B) >= 0 && (T) >= 0 && (T) < (int64_t(1) << 30), \
                                     "expected 0 <= B and 0 <= T < 2^30")

namespace rlhf {

// A data pointer passed from Python as an integer (0 stands for "absent").
template <typename T>
inline T* as_ptr(int64_t p) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(p));
}

// Runs f.template operator()<scalar_t>() for dtype "float32" or "float64".
template <typename F>
inline void dispatch_float(const std::string& dtype, F&& f) {
  if (dtype == "float32") {
    f(float{});
  } else if (dtype == "float64") {
    f(double{});
  } else {
    throw std::invalid_argument("rlhf_engine._C: dtype: expected 'float32' or 'float64', got '" + dtype + "'");
  }
}

}  // namespace rlhf
