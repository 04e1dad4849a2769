"""The stages of one PPO update that a loop may override, with TRL 0.11.4's ``PPOTrainer`` names and signatures.

:class:`~lit_vhead.ppo.engine.PPOCore` runs the update and calls these methods, in TRL's order, on the object its caller
hands it (``Engine.stages``). ``PPOTrainer`` is a ``PPOStages`` and hands itself, so a subclass that overrides
``compute_rewards``, ``loss``, ``batched_forward_pass``... changes what its ``step`` does; ``PPOModule`` uses this class
as it is. Each default is a call of :mod:`lit_vhead.ppo.functional` with the config's settings: the algorithm exists
once, in ``functional`` (math) and ``core`` (the loop).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lit_vhead.critic import response_values
from lit_vhead.kernels import compiled
from lit_vhead.ppo.functional import (
    compute_advantages,
    entropy_from_logits,
    extend_mask,
    kl_penalty,
    kl_rewards,
    masked_mean,
    masked_var,
    ppo_loss,
    world_mean,
    world_size,
)
from lit_vhead.ppo.kl import KLController
from lit_vhead.rollout import Rollout, forward


def kl_kind(value: Any) -> str:
    """The KL estimator's name, from the config's enum or a plain string set on the config later (TRL's tests do)."""
    return getattr(value, "value", value)


def training_compiled(fn: Any, config: Any) -> Any:
    """``fn`` compiled for the training passes (gradients on) when ``PPOConfig.compile`` asks; else ``fn``."""
    return compiled(fn) if config.compile and torch.is_grad_enabled() else fn


def _is_scalar(value: Any) -> bool:
    if isinstance(value, (bool, int, float, np.number)):
        return True
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, np.ndarray) and value.size == 1


class PPOStages:
    """The overridable stages; they read ``self.config`` (a ``PPOConfig``), ``self.kl_ctl`` (the KL controller) and
    ``self.critic_lam`` (the value targets' GAE lambda; None: ``config.lam``)."""

    critic_lam: float | None = None

    def __init__(self, config: Any, kl_ctl: KLController) -> None:
        self.config = config
        self.kl_ctl = kl_ctl

    # ------------------------------------------------------------------ forward passes
    def rollout_forward(self, model: Any, rollout: Rollout, temperature: float = 1.0,
                        return_logits: bool = False) -> tuple:
        """``(logprobs, logits or None, values, masks)`` of the rollout's responses under ``model`` (``[B, T]``;
        logits ``[B, T, V]``); ``masks`` are the tokens PPO trains on. ``PPOTrainer`` answers it with TRL's
        ``batched_forward_pass``."""
        out = training_compiled(forward, self.config)(model, rollout, temperature)
        mask = rollout.train_mask if rollout.train_mask is not None else rollout.response_mask
        return out.logprobs, out.logits if return_logits else None, out.values, mask

    def critic_values(self, critic: Any, rollout: Rollout) -> torch.Tensor:
        """Values ``[B, T]`` of a separate critic over the rollout's responses (the window of ``rollout_forward``)."""
        return training_compiled(response_values, self.config)(critic, rollout)

    # ------------------------------------------------------------------ rewards and advantages
    def _kl_penalty(self, logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
        """Per-token KL of the configured estimator (``kl_penalty="full"``: ``[B, T, V]`` log-prob inputs)."""
        kind = kl_kind(self.config.kl_penalty)
        if kind == "full":
            return kl_penalty(None, None, kind, logprob, ref_logprob)
        return kl_penalty(logprob, ref_logprob, kind)

    def value_mask(self, mask: torch.Tensor) -> torch.Tensor | None:
        """The tokens whose state has a value, reward and value loss: with ``score_token="next"`` the response and
        the position after it (:func:`extend_mask`); None (the response, ``mask``) with ``"last"``."""
        return extend_mask(mask) if self.config.score_token == "next" else None

    def compute_rewards(self, scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                        masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rewards, non_score_rewards, kls)``: ``-kl_coef * _kl_penalty`` per token, the score on the last one
        (``score_token="next"``: on the position after the response, the KL kept to the response's tokens)."""
        kls = self._kl_penalty(logprobs, ref_logprobs)
        value_mask = self.value_mask(masks)
        if value_mask is None:
            return kl_rewards(scores, kls, masks, self.kl_ctl.value)
        return kl_rewards(scores, kls * masks, value_mask, self.kl_ctl.value)

    def compute_advantages(self, values: torch.Tensor, rewards: torch.Tensor,
                           mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(masked values, whitened advantages, returns)`` by GAE (whitened over every process's batch); the returns
        use ``critic_lam`` when set."""
        c = self.config
        return compute_advantages(values, rewards, mask, c.gamma, c.lam, c.whiten_rewards, distributed=True,
                                  critic_lam=self.critic_lam, advantage_mask=self.value_mask(mask))

    # ------------------------------------------------------------------ the minibatch loss
    def loss(self, old_logprobs: torch.Tensor, values: torch.Tensor, logits: torch.Tensor, vpreds: torch.Tensor,
             logprobs: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
             returns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(policy loss, vf_coef * value loss, stats)`` of one minibatch; both losses are zero (with a warning) when
        the mean ratio exceeds ``ratio_threshold`` (TRL's guard)."""
        c = self.config
        with torch.no_grad():
            entropy = entropy_from_logits(logits)
        pg_loss, vf_loss, stats = ppo_loss(old_logprobs, values, logprobs, vpreds, mask, advantages, returns,
                                           c.cliprange, c.cliprange_value, c.vf_coef, entropy,
                                           value_mask=self.value_mask(mask))
        if stats["policy/ratio_mean"] > c.ratio_threshold:
            warnings.warn(
                f"The average ratio of batch ({stats['policy/ratio_mean']:.2f}) exceeds threshold "
                f"{c.ratio_threshold:.2f}. Skipping batch.",
                stacklevel=2,
            )
            pg_loss, vf_loss = pg_loss * 0.0, vf_loss * 0.0
            for key in ("loss/policy", "loss/value", "loss/total"):
                stats[key] = stats[key] * 0.0
        stats["policy/advantages"] = advantages.detach()
        stats["policy/ratio"] = torch.exp(logprobs.detach() - old_logprobs)
        return pg_loss, vf_loss, stats

    def _early_stop(self, policykl: torch.Tensor) -> bool:
        """Stop the PPO epochs when the last minibatch's policy KL (averaged over processes) exceeds
        ``1.5 * target_kl`` (with ``early_stopping``)."""
        c = self.config
        return bool(c.early_stopping and world_mean(torch.as_tensor(policykl)) > 1.5 * c.target_kl)

    # ------------------------------------------------------------------ statistics
    def record_step_stats(self, kl_coef: float, **data: Any) -> dict[str, Any]:
        """TRL's step statistics from the step's tensors (``data``: ``scores``, ``logprobs``, ``ref_logprobs``,
        ``non_score_reward``, ``train_stats``, ``masks``, ``queries``, ``responses``, ``kls``, plus ``raw_scores``
        and ``skipped_batches``): 0-d tensors, ``[1]`` tensors (means over minibatches) and floats, as in TRL, with
        means instead of TRL's arrays for ``objective/logprobs``/``ref_logprobs``."""
        w = data["masks"].to(data["logprobs"].dtype)
        logprobs, ref_logprobs, scores = data["logprobs"], data["ref_logprobs"], data["scores"]
        log_ratio = ref_logprobs - logprobs
        ones = torch.ones_like(scores)
        raw_scores = data["raw_scores"]
        stats: dict[str, Any] = {
            "objective/kl": (data["kls"] * w).sum(-1).mean(),
            "objective/kl_k3": ((torch.expm1(log_ratio) - log_ratio) * w).sum(-1).mean(),
            "objective/logprobs": masked_mean(logprobs, w),
            "objective/ref_logprobs": masked_mean(ref_logprobs, w),
            "objective/kl_coef": kl_coef,
            "objective/entropy": (-logprobs * w).sum(-1).mean(),
            "ppo/mean_non_score_reward": masked_mean(data["non_score_reward"], w),
            "ppo/mean_scores": scores.mean(),
            "ppo/std_scores": masked_var(scores, ones, distributed=True).sqrt(),  # over every process's batch
            "tokens/queries_len_mean": float(np.mean([len(q) for q in data["queries"]])),
            "tokens/responses_len_mean": float(np.mean([len(r) for r in data["responses"]])),
            "env/reward_mean": masked_mean(raw_scores, ones, distributed=True),
            "env/reward_std": masked_var(raw_scores, ones, distributed=True).sqrt(),
            "ppo/skipped_batches": float(data["skipped_batches"]),
        }
        for key, value in data["train_stats"].items():
            stats[f"ppo/{key}"] = torch.mean(value, dim=0)
        stats["ppo/val/var_explained"] = 1 - stats["ppo/val/error"] / stats["ppo/returns/var"].clamp_min(1e-8)
        return stats

    def gather_stats(self, stats: dict[str, Any]) -> dict[str, Any]:
        """The statistics with every scalar averaged over the processes, in one collective (TRL: one per tensor);
        arrays stay this process's."""
        keys = [key for key, value in stats.items() if _is_scalar(value)]
        if not keys or world_size() == 1:
            return stats
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        values = torch.stack([torch.as_tensor(stats[k], dtype=torch.float64, device=device).reshape(()) for k in keys])
        dist.all_reduce(values)
        values /= world_size()
        out = dict(stats)
        for key, value in zip(keys, values.tolist()):
            old = stats[key]
            is_tensor = isinstance(old, torch.Tensor)
            out[key] = torch.tensor(value, dtype=old.dtype).reshape(old.shape) if is_tensor else value
        return out
