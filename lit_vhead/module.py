"""``PPOModule``: PPO for causal and seq2seq value-head models as a LightningModule (manual optimisation).

One ``training_step`` is one PPO step (TRL classic's ``step``): rollout, scores, per-token KL rewards, GAE, then
``ppo_epochs`` x minibatches of clipped policy + value loss. A PPO step is one Lightning epoch of one batch, so
``max_epochs`` = PPO steps, checkpoints fall between PPO steps, and loggers' x-axis counts PPO steps.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from lit_vhead.builders import build_policy, to_plain
from lit_vhead.config import PPOConfig
from lit_vhead.data import step_seed
from lit_vhead.metrics import PPOStats
from lit_vhead.ppo import (
    RunningMoments,
    compute_advantages,
    compute_rewards,
    make_kl_controller,
    masked_mean,
    masked_var,
    ppo_loss,
)
from lit_vhead.rewards import RewardInputs, RewardSource
from lit_vhead.rollout import Rollout, forward, generate


def ppo_config(node: Any) -> PPOConfig:
    """A validated ``PPOConfig`` from a dataclass, a dict or a DictConfig."""
    if isinstance(node, PPOConfig):
        return node
    merged = OmegaConf.merge(OmegaConf.structured(PPOConfig), node or {})
    return OmegaConf.to_object(merged)


def _world_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a scalar over all ranks."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


class PPOModule(L.LightningModule):
    """Trains a value-head policy with PPO. Needs a :class:`~lit_vhead.callbacks.ReferenceModelCallback`."""

    def __init__(
        self,
        model: Mapping,
        reward: RewardSource,
        tokenizer: Any,
        ppo: Any = None,
        head: Mapping | None = None,
        peft: Any = None,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        seed: int = 0,
        sample_table_every: int = 10,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model_cfg, self.head_cfg, self.peft_cfg = to_plain(model), to_plain(head) or {}, peft
        self.ppo = ppo_config(ppo)
        self.ppo.validate()
        self.reward, self.tokenizer, self.seed = reward, tokenizer, seed
        self.optimizer_factory = optimizer or functools.partial(torch.optim.Adam, lr=self.ppo.learning_rate, fused=True)
        self.scheduler_factory = scheduler
        self.sample_table_every = sample_table_every
        self.policy = None
        self.reference_builder: Callable | None = None  # set by ReferenceModelCallback.setup
        self.__dict__["reference"] = None  # not a submodule: never in checkpoints, never wrapped by DDP
        self.kl_ctl = make_kl_controller(
            self.ppo.adap_kl_ctrl, self.ppo.init_kl_coef, self.ppo.target, self.ppo.horizon
        )
        self.score_moments = RunningMoments()
        self.stats = PPOStats()

    # ------------------------------------------------------------------ set-up
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        if self.reference_builder is None:
            raise RuntimeError("PPOModule needs a ReferenceModelCallback in the Trainer's callbacks (configs/ref).")
        self.policy = build_policy(
            self.model_cfg, self.head_cfg, self.peft_cfg, getattr(self.reward, "adapter_path", None)
        )
        self.policy.train()
        self.__dict__["reference"] = self.reference_builder(self.policy)

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    def on_fit_start(self) -> None:
        self.policy.v_head.float()  # the head stays fp32 under bf16-true/16-true (values and losses are fp32)
        self.reward.setup(self.policy, self.tokenizer, self.device)

    # ------------------------------------------------------------------ one PPO step
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ppo, step = self.ppo, self.current_epoch
        torch.manual_seed(step_seed(self.seed, step, self.global_rank))  # rollouts reproducible per (step, rank)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        self.policy.eval()  # dropout off everywhere in PPO (TRL classic's forward passes and PPOv2 do the same)

        rollout = generate(self.policy, batch, ppo.generation, self.tokenizer)
        timings["time/ppo/generation"] = time.perf_counter() - start

        tic = time.perf_counter()
        full = self._old_and_reference_logprobs(rollout, timings)
        timings["time/ppo/forward_pass"] = time.perf_counter() - tic

        tic = time.perf_counter()
        raw_scores = self._score(rollout)
        scores = self._transform_scores(raw_scores)
        mask = rollout.response_mask.float()
        rewards, non_score_rewards, kls = compute_rewards(
            scores, rollout.logprobs, rollout.ref_logprobs, mask, self.kl_ctl.value, ppo.kl_penalty.value, *full
        )
        values, advantages, returns = compute_advantages(
            rollout.values, rewards, mask, ppo.gamma, ppo.lam, ppo.whiten_rewards, distributed=True
        )
        rollout.values = values
        timings["time/ppo/compute_rewards"] = time.perf_counter() - tic

        tic = time.perf_counter()
        self._optimize(rollout, advantages, returns, step)
        timings["time/ppo/optimize_step"] = time.perf_counter() - tic

        kl_per_sample = (kls * mask).sum(1)
        mean_kl = _world_mean(kl_per_sample.mean())
        kl_coef = self.kl_ctl.value
        self.kl_ctl.update(mean_kl.item(), ppo.batch_size * self.trainer.world_size)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        timings["time/ppo/total"] = time.perf_counter() - start
        self._log_step(rollout, raw_scores, scores, kl_per_sample, non_score_rewards, kl_coef, timings)

    @torch.no_grad()
    def _old_and_reference_logprobs(self, rollout: Rollout, timings: dict[str, float]) -> tuple:
        """Fill the rollout's log-probs, values and reference log-probs, in chunks of ``mini_batch_size``.

        Chunks (TRL's forward batch size) bound the activations and logits held at once, whatever the rollout batch.
        Returns the full log-prob distributions when ``kl_penalty=full`` needs them.
        """
        ppo, size = self.ppo, self.ppo.mini_batch_size
        parts: list[tuple] = []
        timings["time/ppo/reference_forward"] = 0.0
        for begin in range(0, rollout.response_ids.shape[0], size):
            chunk = rollout.select(slice(begin, begin + size))
            with self.reference.capture(self.policy):
                policy_out = forward(self.policy, chunk, with_values=True, temperature=ppo.generation.temperature)
            tic = time.perf_counter()
            with self.reference.context():
                ref_out = forward(self.reference.model, chunk, False, ppo.generation.temperature)
            timings["time/ppo/reference_forward"] += time.perf_counter() - tic
            part = (policy_out.logprobs, policy_out.values, ref_out.logprobs)
            if ppo.kl_penalty == "full":
                part += (policy_out.logits.log_softmax(-1), ref_out.logits.log_softmax(-1))
            parts.append(part)
        columns = [torch.cat(column) for column in zip(*parts)]
        rollout.logprobs, rollout.values, rollout.ref_logprobs = columns[:3]
        return tuple(columns[3:]) or (None, None)

    def _score(self, rollout: Rollout) -> torch.Tensor:
        tok = self.tokenizer
        mask = rollout.response_mask.bool()
        query_ids = [q[m.bool()].tolist() for q, m in zip(rollout.query_ids, rollout.query_mask)]
        response_ids = [r[m].tolist() for r, m in zip(rollout.response_ids, mask)]
        input_ids, attention_mask = rollout.full_sequence()
        inputs = RewardInputs(
            prompts=tok.batch_decode(query_ids, skip_special_tokens=True),
            responses=tok.batch_decode(response_ids, skip_special_tokens=True),
            query_ids=query_ids,
            response_ids=response_ids,
            input_ids=input_ids,
            attention_mask=attention_mask,
        )
        self._last_texts = (inputs.prompts, inputs.responses)
        return self.reward(inputs).to(self.device)

    def _transform_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """TRL's optional running score scaling / normalisation and clipping (moments over all ranks)."""
        ppo = self.ppo
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

    def _optimize(self, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor, step: int) -> None:
        """``ppo_epochs`` passes of shuffled minibatches, one optimizer step per backward batch."""
        ppo = self.ppo
        optimizer = self.optimizers()
        generator = torch.Generator().manual_seed(step_seed(self.seed, step, self.global_rank) + 1)
        batch_size = rollout.response_ids.shape[0]
        skipped = 0
        for _ in range(ppo.ppo_epochs):
            order = torch.randperm(batch_size, generator=generator).to(self.device)
            stats = {}
            for i, begin in enumerate(range(0, batch_size, ppo.mini_batch_size)):
                index = order[begin : begin + ppo.mini_batch_size]
                mini = rollout.select(index)
                out = forward(self.policy, mini, with_values=True, temperature=ppo.generation.temperature)
                pg_loss, vf_loss, stats = ppo_loss(
                    mini.logprobs, mini.values, out.logprobs, out.values, mini.response_mask.float(),
                    advantages[index], returns[index], ppo.cliprange, ppo.cliprange_value, ppo.vf_coef,
                )
                loss = pg_loss + vf_loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"The PPO loss is {loss.item()} at PPO step {step}: training stopped before the update; the "
                        "last checkpoint is intact. Lower ppo.learning_rate, set ppo.max_grad_norm, or check the "
                        "reward for extreme values."
                    )
                if stats["policy/ratio_mean"] > ppo.ratio_threshold:  # TRL: skip a batch whose ratio exploded
                    loss = loss * 0.0
                    skipped += 1
                self.manual_backward(loss / ppo.gradient_accumulation_steps)
                if (i + 1) % ppo.gradient_accumulation_steps == 0:
                    if ppo.max_grad_norm is not None:
                        self.clip_gradients(optimizer, ppo.max_grad_norm, "norm")
                    optimizer.step()
                    optimizer.zero_grad()
                self.stats.update({f"ppo/{k}": v for k, v in stats.items()})
            if ppo.early_stopping and _world_mean(stats["policy/policykl"]) > 1.5 * ppo.target_kl:
                optimizer.zero_grad()
                break
        self.stats.update({"ppo/skipped_batches": float(skipped)})

    # ------------------------------------------------------------------ logging
    def _log_step(self, rollout, raw_scores, scores, kl_per_sample, non_score_rewards, kl_coef, timings) -> None:
        mask = rollout.response_mask.float()
        ones = torch.ones_like(raw_scores)
        log_ratio = rollout.ref_logprobs - rollout.logprobs
        self.stats.update(
            {
                "objective/kl": kl_per_sample.mean(),
                "objective/kl_k3": ((torch.expm1(log_ratio) - log_ratio) * mask).sum(1).mean(),
                "objective/entropy": (-rollout.logprobs * mask).sum(1).mean(),
                "objective/logprobs": masked_mean(rollout.logprobs, mask),
                "objective/ref_logprobs": masked_mean(rollout.ref_logprobs, mask),
                "ppo/mean_non_score_reward": (non_score_rewards * mask).sum(1).mean(),
                "ppo/mean_scores": scores.mean(),
                "tokens/queries_len_mean": rollout.query_mask.sum(1).float().mean(),
                "tokens/responses_len_mean": mask.sum(1).mean(),
                **timings,
            }
        )
        metrics = self.stats.compute()
        self.stats.reset()
        metrics["ppo/val/var_explained"] = 1 - metrics["ppo/val/error"] / max(metrics["ppo/returns/var"], 1e-8)
        metrics["env/reward_mean"] = float(masked_mean(raw_scores, ones, distributed=True))
        metrics["env/reward_std"] = float(masked_var(raw_scores, ones, distributed=True).sqrt())
        metrics["ppo/std_scores"] = float(masked_var(scores, ones, distributed=True).sqrt())
        metrics["objective/kl_coef"] = kl_coef
        metrics["ppo/learning_rate"] = self.optimizers().param_groups[0]["lr"]
        metrics["ppo/step"] = float(self.current_epoch)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(raw_scores))
        self.log("reward", metrics["env/reward_mean"], prog_bar=True, logger=False)
        self.log("kl", metrics["objective/kl"], prog_bar=True, logger=False)
        if self.sample_table_every and self.current_epoch % self.sample_table_every == 0:
            self._log_samples(raw_scores)

    def _log_samples(self, scores: torch.Tensor, rows: int = 8) -> None:
        """A table of prompts, responses and rewards (wandb's ``game_log``, as in TRL)."""
        from lightning.pytorch.loggers import WandbLogger

        prompts, responses = self._last_texts
        data = [[self.current_epoch, p, r, float(s)] for p, r, s in zip(prompts, responses, scores)][:rows]
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="game_log", columns=["step", "prompt", "response", "reward"], data=data)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the PPO state that is not a weight: KL coefficient and running score moments."""
        checkpoint["ppo_state"] = {
            "kl_ctl": self.kl_ctl.state_dict(),
            "score_moments": self.score_moments.state_dict(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("ppo_state")
        if state is None:
            raise ValueError("This checkpoint has no PPO state (ppo_state); it was not written by PPOModule.")
        own = self.state_dict()
        for key, value in checkpoint["state_dict"].items():
            if key not in own or own[key].shape != value.shape:
                here = "missing here" if key not in own else f"{tuple(own[key].shape)} here"
                raise ValueError(
                    f"The checkpoint was trained with another model or PEFT config: {key} is {tuple(value.shape)} "
                    f"in it but {here}. Resume with the same model.*/peft settings as the run that wrote it."
                )
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_moments.load_state_dict(state["score_moments"])
