"""PPO for value-head models: the math as pure tensor functions, KL controllers and running score moments, and the
engine that runs a PPO step with them (``PPOCore``, ``Engine``: loaded on first use, as ``lit_vhead``'s names are,
so the math imports with torch alone).
"""

import importlib

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

_ENGINE = ("Engine", "PPOCore", "StepOutput", "default_optimizer")


def __getattr__(name: str):
    if name in _ENGINE:
        value = getattr(importlib.import_module("lit_vhead.ppo.engine"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lit_vhead.ppo' has no attribute {name!r}")


__all__ = [
    "KL_PENALTY_KINDS",
    "AdaptiveKLController",
    "Engine",
    "PPOCore",
    "StepOutput",
    "default_optimizer",
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
