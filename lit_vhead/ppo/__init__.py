"""PPO math for value-head models: pure tensor functions, KL controllers and running score moments."""

from lit_vhead.ppo.functional import (
    KL_PENALTY_KINDS,
    compute_advantages,
    compute_rewards,
    entropy_from_logits,
    extend_mask,
    kl_penalty,
    kl_rewards,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_loss,
)
from lit_vhead.ppo.kl import AdaptiveKLController, FixedKLController, KLController, make_kl_controller
from lit_vhead.ppo.running_moments import RunningMoments

__all__ = [
    "KL_PENALTY_KINDS",
    "AdaptiveKLController",
    "FixedKLController",
    "KLController",
    "RunningMoments",
    "compute_advantages",
    "compute_rewards",
    "entropy_from_logits",
    "extend_mask",
    "kl_penalty",
    "kl_rewards",
    "logprobs_from_logits",
    "make_kl_controller",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "ppo_loss",
]
