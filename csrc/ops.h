// Declarations of the native ops bound in bindings.cpp. Pointers are data pointers passed as
// integers (0 = absent); every (B, T) array is contiguous; masks are uint8 (nonzero = valid).
// dtype is "float32" or "float64" (the dtype of every floating-point array of the call).
#pragma once

#include <cstdint>
#include <string>

#include "ppo_math.h"

namespace rlhf {

// GAE forward: advantages and returns (B, T) from rewards, values (B, T), mask (B, T) uint8 and
// last_value (B,) (0 = zeros). carry selects the "carry" mask mode (else "zero").
void gae_forward_cpu(int64_t rewards, int64_t values, int64_t mask, int64_t last_value, int64_t advantages,
                     int64_t returns, int64_t B, int64_t T, double gamma, double lam, bool carry,
                     const std::string& dtype);
// GAE backward: d rewards, d values (B, T) and d last_value (B,) (0 = not needed) from
// d advantages and d returns (B, T) (0 = zeros).
void gae_backward_cpu(int64_t mask, int64_t grad_advantages, int64_t grad_returns, int64_t grad_rewards,
                      int64_t grad_values, int64_t grad_last_value, int64_t B, int64_t T, double gamma, double lam,
                      bool carry, const std::string& dtype);

// PPO loss, fused forward + backward (see ppo_math.h for the math and PpoLossArgs for the fields).
void ppo_loss_forward_cpu(const PpoLossArgs& args);
// The loss, the metrics and the final gradients of grad_scale * loss (ppo_loss_with_grads): the forward
// above, then grad_x <- grad_x * row_scale[b] * grad_scale in place.
void ppo_loss_grads_cpu(const PpoLossArgs& args, double grad_scale);
// grad_x = g_x * row_scale[b] * grad_output for each (g_x, grad_x) pair given (0 = skip).
void ppo_loss_backward_cpu(int64_t row_scale, int64_t grad_output, int64_t g_logp, int64_t grad_logp,
                           int64_t g_values, int64_t grad_values, int64_t g_entropy, int64_t grad_entropy,
                           int64_t B, int64_t T, const std::string& dtype);

#ifdef RLHF_WITH_CUDA
void gae_forward_cuda(int64_t rewards, int64_t values, int64_t mask, int64_t last_value, int64_t advantages,
                      int64_t returns, int64_t B, int64_t T, double gamma, double lam, bool carry,
                      const std::string& dtype, int64_t stream);
void gae_backward_cuda(int64_t mask, int64_t grad_advantages, int64_t grad_returns, int64_t grad_rewards,
                       int64_t grad_values, int64_t grad_last_value, int64_t B, int64_t T, double gamma, double lam,
                       bool carry, const std::string& dtype, int64_t stream);
void ppo_loss_forward_cuda(const PpoLossArgs& args);
// As ppo_loss_grads_cpu, in two launches on args.stream on the current device (row_scale unused).
void ppo_loss_grads_cuda(const PpoLossArgs& args, double grad_scale);
void ppo_loss_backward_cuda(int64_t row_scale, int64_t grad_output, int64_t g_logp, int64_t grad_logp,
                            int64_t g_values, int64_t grad_values, int64_t g_entropy, int64_t grad_entropy,
                            int64_t B, int64_t T, const std::string& dtype, int64_t stream);
#endif

}  // namespace rlhf
