"""Pure RL math over (B, T) tensors: the reference for every RL kernel.

Nothing here knows about models or the trainer; every function takes tensors and keyword
hyperparameters and documents its shapes and mask convention.
"""
from .advantages import (broadcast_to_tokens, dr_grpo_advantages, grpo_advantages, reinforce_pp_advantages,
                         reinforce_pp_baseline_advantages, rloo_advantages)
from .gae import discounted_returns, gae, gae_reference, last_valid_index
from .kl import AdaptiveKLController, FixedKLController, kl_estimate, kl_penalized_rewards
from .losses import (AGG_MODES, aggregate, loss_weights, policy_loss_per_token, ppo_loss, ppo_loss_reference,
                     value_loss_per_token)
from .metrics import explained_variance, masked_entropy_mean, sequence_kl
from .normalize import RunningMoments, clip_rewards, masked_mean, masked_sum, masked_var, masked_whiten
from .reward_loss import pairwise_reward_loss

__all__ = [
    "AGG_MODES", "AdaptiveKLController", "FixedKLController", "RunningMoments", "aggregate", "broadcast_to_tokens",
    "clip_rewards", "discounted_returns", "dr_grpo_advantages", "explained_variance", "gae", "gae_reference",
    "grpo_advantages", "kl_estimate", "kl_penalized_rewards", "last_valid_index", "loss_weights",
    "masked_entropy_mean", "masked_mean", "masked_sum", "masked_var", "masked_whiten", "pairwise_reward_loss",
    "policy_loss_per_token", "ppo_loss", "ppo_loss_reference", "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages", "rloo_advantages", "sequence_kl", "value_loss_per_token",
]
