"""The PPO update after a rollout, ONE implementation for every loop (``PPOModule`` on Lightning, ``PPOTrainer`` on
Fabric): score transform, old/reference log-probs and values, per-token KL rewards, GAE, ``ppo_epochs`` x minibatches
of clipped losses, the KL controller and the statistics (TRL classic's names).

The caller's loop makes the rollout and the scores, and says how to run a backward pass and clip gradients
(``manual_backward``/``clip_gradients`` in Lightning, ``fabric.backward``/``fabric.clip_gradients`` in Fabric), in
which order to visit the samples (TRL draws ``np.random.permutation``), and which model to run the training forward
through (a DDP wrapper or the bare policy).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lit_vhead.config import PPOConfig
from lit_vhead.kernels import compiled, fast_kernels
from lit_vhead.metrics import PPOStats
from lit_vhead.ppo.functional import (
    compute_advantages,
    compute_rewards,
    entropy_from_logits,
    masked_mean,
    masked_var,
    ppo_loss,
)
from lit_vhead.ppo.kl import make_kl_controller
from lit_vhead.ppo.optimizer_in_backward import optimizer_in_backward, why_not
from lit_vhead.ppo.running_moments import RunningMoments
from lit_vhead.reference import Reference
from lit_vhead.rollout import Rollout, forward


def default_optimizer(learning_rate: float) -> Callable[[Any], torch.optim.Optimizer]:
    """TRL's optimizer: Adam over the trainable parameters at ``learning_rate``, fused (one kernel per step) unless
    the parameters are sharded DTensors (FSDP2)."""

    def build(params: Any) -> torch.optim.Optimizer:
        params = list(params)
        sharded = any(type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor" for p in params)
        return torch.optim.Adam(params, lr=learning_rate, fused=not sharded)

    return build


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def world_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a scalar over all ranks."""
    if world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world_size()
    return value


@dataclass
class Engine:
    """What the caller's loop provides to one PPO update."""

    model: Any  # what the training forward runs through: the policy, or a (DDP/Fabric) wrapper of it
    policy: torch.nn.Module  # the bare value-head policy
    reference: Reference
    optimizer: Any  # step() / zero_grad() / param_groups
    backward: Callable[[torch.Tensor], None]
    clip_gradients: Callable[[float], Any]
    order: Callable[[int], torch.Tensor]  # a permutation of range(batch size), drawn once per PPO epoch
    scheduler: Any = None  # stepped once per PPO step
    temperature: float = 1.0  # logits are divided by it in every pass (the rollout's sampling temperature)
    local_gradients: bool = False  # gradients are final when backward returns: one process, no GradScaler


@dataclass
class StepOutput:
    """One PPO update: the statistics (floats, reduced over ranks) and the per-sample tensors behind them."""

    stats: dict[str, float]
    rollout: Rollout  # with logprobs, ref_logprobs and (masked) values filled in
    scores: torch.Tensor  # [B] after scaling/clipping
    kls: torch.Tensor  # [B, T] per-token KL (the configured estimator)
    advantages: torch.Tensor  # [B, T]
    ratios: torch.Tensor  # [N] π/π_old at every response token of every minibatch update (TRL's ratio histogram)


class PPOCore:
    """PPO state that outlives a step (KL coefficient, running score moments, statistics) and the update itself."""

    def __init__(self, config: PPOConfig) -> None:
        self.config = config
        self.kl_ctl = make_kl_controller(config.adap_kl_ctrl, config.init_kl_coef, config.target, config.horizon)
        self.score_moments = RunningMoments()
        self.stats = PPOStats()

    # ------------------------------------------------------------------ checkpointed state
    def state_dict(self) -> dict[str, Any]:
        return {"kl_ctl": self.kl_ctl.state_dict(), "score_moments": self.score_moments.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_moments.load_state_dict(state["score_moments"])

    # ------------------------------------------------------------------ one update
    def step(self, engine: Engine, rollout: Rollout, raw_scores: torch.Tensor, eos_token_id: int | None = None,
             step_index: int = 0) -> StepOutput:
        """Update the policy on ``rollout`` scored ``raw_scores`` ([B]); returns the step's statistics."""
        ppo = self.config
        with fast_kernels(engine.policy, engine.reference.model, enabled=ppo.cpu_kernels, backward=True):
            return self._step(engine, rollout, raw_scores, eos_token_id, step_index)

    def _step(self, engine: Engine, rollout: Rollout, raw_scores: torch.Tensor, eos_token_id: int | None,
              step_index: int) -> StepOutput:
        ppo, timings = self.config, {}
        start = time.perf_counter()
        scores = self.transform_scores(raw_scores, rollout, eos_token_id)

        full = self._old_and_reference_logprobs(engine, rollout, timings)
        timings["time/ppo/forward_pass"] = time.perf_counter() - start

        tic = time.perf_counter()
        mask = rollout.response_mask.to(rollout.logprobs.dtype)
        rewards, non_score_rewards, kls = compute_rewards(
            scores, rollout.logprobs, rollout.ref_logprobs, mask, self.kl_ctl.value, ppo.kl_penalty.value, *full
        )
        timings["time/ppo/compute_rewards"] = time.perf_counter() - tic
        tic = time.perf_counter()
        values, advantages, returns = compute_advantages(
            rollout.values, rewards, mask, ppo.gamma, ppo.lam, ppo.whiten_rewards, distributed=True
        )
        rollout.values = values
        timings["time/ppo/compute_advantages"] = time.perf_counter() - tic

        tic = time.perf_counter()
        ratios = self._optimize(engine, rollout, advantages, returns, step_index)
        timings["time/ppo/optimize_step"] = time.perf_counter() - tic

        tic = time.perf_counter()
        kl_per_sample = (kls * mask).sum(1)
        mean_kl = world_mean(kl_per_sample.mean())
        if mean_kl.item() < -1.0:
            warnings.warn(
                f"The KL ({ppo.kl_penalty.value} estimator) is negative: {mean_kl.item():.2f}. This can precede a "
                "failed run; it often means the generation settings differ from the ones the log-probs assume "
                "(e.g. top_k/top_p/min_new_tokens), or that the learning rate is too high.",
                stacklevel=2,
            )
        kl_coef = self.kl_ctl.value
        self.kl_ctl.update(mean_kl.item(), ppo.batch_size * world_size())
        stats = self._statistics(engine, rollout, raw_scores, scores, kl_per_sample, non_score_rewards, kl_coef)
        if engine.scheduler is not None:
            engine.scheduler.step()
        timings["time/ppo/calc_stats"] = time.perf_counter() - tic
        timings["time/ppo/total"] = time.perf_counter() - start
        stats.update(timings)
        return StepOutput(stats, rollout, scores, kls, advantages, ratios)

    def transform_scores(self, scores: torch.Tensor, rollout: Rollout, eos_token_id: int | None) -> torch.Tensor:
        """PPOv2's ``missing_eos_penalty``, then TRL's running score scaling/normalisation and clipping."""
        ppo = self.config
        if ppo.missing_eos_penalty is not None and eos_token_id is not None:
            has_eos = ((rollout.response_ids == eos_token_id) & rollout.response_mask.bool()).any(1)
            scores = torch.where(has_eos, scores, scores - ppo.missing_eos_penalty)
        if ppo.use_score_scaling:
            self.score_moments.update(scores)
            eps = torch.finfo(scores.dtype).eps
            std = float(self.score_moments.std)
            scale = (std if std == std else 1.0) + eps  # std is NaN until two scores were seen
            if ppo.use_score_norm:
                scores = (scores - float(self.score_moments.mean)) / scale
            else:
                scores = scores / scale
        if ppo.score_clip is not None:
            scores = scores.clamp(-ppo.score_clip, ppo.score_clip)
        return scores

    @torch.no_grad()
    def _old_and_reference_logprobs(self, engine: Engine, rollout: Rollout, timings: dict[str, float]) -> tuple:
        """Fill the rollout's log-probs, values and reference log-probs, in chunks of ``mini_batch_size``.

        Chunks (TRL's forward batch size) bound the activations and logits held at once, whatever the rollout batch.
        Returns the full log-prob distributions when ``kl_penalty=full`` needs them.
        """
        ppo, size, reference = self.config, self.config.mini_batch_size, engine.reference
        engine.policy.eval()  # dropout off in every PPO pass (as TRL classic's passes and PPOv2)
        parts: list[tuple] = []
        timings["time/ppo/reference_forward"] = 0.0
        for begin in range(0, rollout.response_ids.shape[0], size):
            chunk = rollout.select(slice(begin, begin + size))
            with reference.capture(engine.policy):
                policy_out = forward(engine.policy, chunk, engine.temperature)
            tic = time.perf_counter()
            with reference.context():
                ref_out = forward(reference.model, chunk, engine.temperature)
            timings["time/ppo/reference_forward"] += time.perf_counter() - tic
            part = (policy_out.logprobs, policy_out.values, ref_out.logprobs)
            if ppo.kl_penalty == "full":
                part += (policy_out.logits.float().log_softmax(-1), ref_out.logits.float().log_softmax(-1))
            parts.append(part)
        columns = [torch.cat(column) for column in zip(*parts)]
        rollout.logprobs, rollout.values, rollout.ref_logprobs = columns[:3]
        return tuple(columns[3:]) or (None, None)

    def _optimize(self, engine: Engine, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor,
                  step_index: int) -> torch.Tensor:
        """``ppo_epochs`` passes of shuffled minibatches, one optimizer step per backward batch (TRL's loop), the
        step inside backward where that is exact (``ppo.optimizer_in_backward``).

        Returns the probability ratios seen at the response tokens of every minibatch (for TRL's histogram)."""
        ppo, ratios = self.config, []
        in_backward = ppo.optimizer_in_backward and why_not(
            engine.optimizer, ppo.max_grad_norm, ppo.gradient_accumulation_steps, engine.local_gradients
        ) is None
        with optimizer_in_backward(engine.optimizer) if in_backward else contextlib.nullcontext():
            skipped = self._epochs(engine, rollout, advantages, returns, step_index, ratios)
        self.stats.update({"ppo/skipped_batches": float(skipped)})
        return torch.cat(ratios)

    def _epochs(self, engine: Engine, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor,
                step_index: int, ratios: list[torch.Tensor]) -> int:
        """The minibatch loop of :meth:`_optimize`; appends to ``ratios``, returns the number of skipped batches."""
        ppo, optimizer = self.config, engine.optimizer
        batch_size = rollout.response_ids.shape[0]
        training_forward = compiled(forward) if ppo.compile else forward
        skipped = 0
        for _ in range(ppo.ppo_epochs):
            order = torch.as_tensor(engine.order(batch_size), device=rollout.response_ids.device)
            stats = {}
            for i, begin in enumerate(range(0, batch_size, ppo.mini_batch_size)):
                index = order[begin : begin + ppo.mini_batch_size]
                mini = rollout.select(index)
                out = training_forward(engine.model, mini, engine.temperature)
                with torch.no_grad():
                    entropy = entropy_from_logits(out.logits)
                pg_loss, vf_loss, stats = ppo_loss(
                    mini.logprobs, mini.values, out.logprobs, out.values, mini.response_mask.to(out.values.dtype),
                    advantages[index], returns[index], ppo.cliprange, ppo.cliprange_value, ppo.vf_coef, entropy,
                )
                loss = pg_loss + vf_loss
                ratios.append((out.logprobs.detach() - mini.logprobs).exp()[mini.response_mask.bool()])
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"The PPO loss is {loss.item()} at PPO step {step_index}: training stopped before the "
                        "update; the last checkpoint is intact. Lower ppo.learning_rate, set ppo.max_grad_norm, or "
                        "check the reward for extreme values."
                    )
                if stats["policy/ratio_mean"] > ppo.ratio_threshold:  # TRL: skip a batch whose ratio exploded
                    warnings.warn(
                        f"The average ratio of batch ({stats['policy/ratio_mean']:.2f}) exceeds threshold "
                        f"{ppo.ratio_threshold:.2f}. Skipping batch.",
                        stacklevel=2,
                    )
                    loss = loss * 0.0
                    for key in ("loss/policy", "loss/value", "loss/total"):
                        stats[key] = stats[key] * 0.0
                    skipped += 1
                engine.backward(loss / ppo.gradient_accumulation_steps)
                if (i + 1) % ppo.gradient_accumulation_steps == 0:
                    if ppo.max_grad_norm is not None:
                        engine.clip_gradients(ppo.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                # Autocast caches the low-precision copy of each weight for its whole region (Fabric's and a user's
                # own cover the PPO step; Lightning's has the cache off): drop it, or the next minibatch runs on the
                # weights before this update.
                torch.clear_autocast_cache()
                self.stats.update({f"ppo/{k}": v for k, v in stats.items()})
            if ppo.early_stopping and world_mean(stats["policy/policykl"]) > 1.5 * ppo.target_kl:
                optimizer.zero_grad()
                break
        return skipped

    def _statistics(self, engine: Engine, rollout: Rollout, raw_scores: torch.Tensor, scores: torch.Tensor,
                    kl_per_sample: torch.Tensor, non_score_rewards: torch.Tensor, kl_coef: float) -> dict[str, float]:
        """TRL classic's step statistics (means over minibatches and ranks), plus ``env/reward_*`` of the raw scores."""
        mask = rollout.response_mask.to(rollout.logprobs.dtype)
        ones = torch.ones_like(raw_scores)
        log_ratio = rollout.ref_logprobs - rollout.logprobs
        query_lens, response_lens = rollout.query_mask.sum(1).float(), mask.sum(1)
        self.stats.update(
            {
                "objective/kl": kl_per_sample.mean(),
                "objective/kl_k3": ((torch.expm1(log_ratio) - log_ratio) * mask).sum(1).mean(),
                "objective/entropy": (-rollout.logprobs * mask).sum(1).mean(),
                "objective/logprobs": masked_mean(rollout.logprobs, mask),
                "objective/ref_logprobs": masked_mean(rollout.ref_logprobs, mask),
                "ppo/mean_non_score_reward": masked_mean(non_score_rewards, mask),
                "ppo/mean_scores": scores.mean(),
                "tokens/queries_len_mean": query_lens.mean(),
                "tokens/responses_len_mean": response_lens.mean(),
            }
        )
        stats = self.stats.compute()
        self.stats.reset()
        stats["ppo/val/var_explained"] = 1 - stats["ppo/val/error"] / max(stats["ppo/returns/var"], 1e-8)
        stats["env/reward_mean"] = float(masked_mean(raw_scores, ones, distributed=True))
        stats["env/reward_std"] = float(masked_var(raw_scores, ones, distributed=True).sqrt())
        stats["ppo/std_scores"] = float(masked_var(scores, ones, distributed=True).sqrt())
        stats["objective/kl_coef"] = kl_coef
        stats["ppo/learning_rate"] = engine.optimizer.param_groups[0]["lr"]
        return stats
