"""The PPO update after a rollout, ONE implementation for every loop (``PPOModule`` on Lightning, ``PPOTrainer`` on
Fabric): score transform, old/reference log-probs and values, per-token KL rewards, GAE, ``ppo_epochs`` x minibatches
of clipped losses, the KL controller and the statistics (TRL classic's names).

The caller's loop makes the rollout and the scores, and says how to run a backward pass and clip gradients
(``manual_backward``/``clip_gradients`` in Lightning, ``fabric.backward``/``fabric.clip_gradients`` in Fabric), in
which order to visit the samples (TRL draws ``np.random.permutation``), which model to run the training forward
through (a DDP wrapper or the bare policy), and which object answers the stages of the update
(:class:`~lit_vhead.ppo.stages.PPOStages`: forward passes, rewards, advantages, loss, early stop, statistics).
``PPOTrainer`` answers them itself, so its subclasses' overrides take effect here.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lit_vhead.config import PPOConfig
from lit_vhead.core import stack_dicts
from lit_vhead.interfaces import ValueFunction
from lit_vhead.kernels import fast_kernels
from lit_vhead.ppo.functional import world_size
from lit_vhead.ppo.kl import make_kl_controller
from lit_vhead.ppo.optimizer_in_backward import optimizer_in_backward, why_not
from lit_vhead.ppo.running_moments import RunningMoments
from lit_vhead.ppo.snapshot import UpdateSnapshot
from lit_vhead.ppo.stages import PPOStages, kl_kind
from lit_vhead.reference import Reference
from lit_vhead.rollout import Rollout


def default_optimizer(learning_rate: float) -> Callable[[Any], torch.optim.Optimizer]:
    """TRL's optimizer: Adam over the trainable parameters at ``learning_rate``, fused (one kernel per step) unless
    the parameters are sharded DTensors (FSDP2)."""

    def build(params: Any) -> torch.optim.Optimizer:
        params = list(params)  # parameters, or parameter groups (dicts with "params")
        flat = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
        sharded = any(type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor" for p in flat)
        return torch.optim.Adam(params, lr=learning_rate, fused=not sharded)

    return build


def prepare_models(policy: torch.nn.Module, reference: Reference) -> None:
    """Once the loop has placed the policy (device, precision): the value head in fp32 (values and losses stay fp32
    under bf16-true/16-true), the reference on the policy's device and dtype."""
    policy.v_head.float()
    reference.follow(policy)


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
    stages: PPOStages | None = None  # who answers the update's stages; None: the core's defaults
    critic: ValueFunction | None = None  # a separate value function (lit_vhead.critic.Critic); None: the policy's head
    train_policy: bool = True  # False: the value loss only (critic warm-up); the caller holds the policy fixed
    samples: tuple[Sequence, Sequence] | None = None  # the loop's own unpadded (queries, responses), for the stats


@dataclass
class StepOutput:
    """One PPO update: its statistics and the rollout behind them."""

    stats: dict[str, float]  # the scalar statistics as floats, reduced over ranks
    raw_stats: dict[str, Any]  # what the stages' record_step_stats (+ gather_stats) returned, timings added
    rollout: Rollout  # with logprobs, ref_logprobs, (masked) values and train_mask filled in
    scores: torch.Tensor  # [B] after scaling/clipping


class PPOCore:
    """PPO state that outlives a step (KL coefficient, running score moments) and the update itself."""

    def __init__(self, config: PPOConfig, critic_lam: float | None = None) -> None:
        self.config = config
        self.kl_ctl = make_kl_controller(config.adap_kl_ctrl, config.init_kl_coef, config.target, config.horizon)
        self.score_moments = RunningMoments()
        self.stages = PPOStages(config, self.kl_ctl)
        self.stages.critic_lam = critic_lam  # the value targets' GAE lambda (None: config.lam)
        self._state_before = self.state_dict()  # the PPO state as the current step found it (see _undo)

    # ------------------------------------------------------------------ checkpointed state
    def state_dict(self) -> dict[str, Any]:
        return {"kl_ctl": self.kl_ctl.state_dict(), "score_moments": self.score_moments.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_moments.load_state_dict(state["score_moments"])

    # ------------------------------------------------------------------ one update
    def step(self, engine: Engine, rollout: Rollout, raw_scores: torch.Tensor, eos_token_id: int | None = None,
             step_index: int = 0, undo_copy: UpdateSnapshot | None = None) -> StepOutput:
        """Update the policy on ``rollout`` scored ``raw_scores`` ([B]); returns the step's statistics.

        ``undo_copy``: the copy from :meth:`start_undo_copy`, started by a caller that can start it earlier (before
        generation); without it the step starts its own when it needs one.
        """
        ppo = self.config
        with fast_kernels(engine.policy, engine.reference.model, engine.critic, enabled=ppo.cpu_kernels,
                          backward=True):
            return self._step(engine, engine.stages or self.stages, rollout, raw_scores, eos_token_id, step_index,
                              undo_copy)

    def start_undo_copy(self, optimizer: Any, batch_size: int) -> UpdateSnapshot | None:
        """Start writing the copy that undoes a PPO step on ``batch_size`` samples (:class:`UpdateSnapshot`), or
        None when the step takes one optimizer step or ``ppo.undo_failed_update`` is off. It is written in the
        background while passes that only read the weights run; the caller closes it."""
        ppo = self.config
        updates = ppo.ppo_epochs * (-(-batch_size // ppo.mini_batch_size) // ppo.gradient_accumulation_steps)
        return UpdateSnapshot(optimizer, ppo.undo_dir) if updates > 1 and ppo.undo_failed_update else None

    def _step(self, engine: Engine, stages: PPOStages, rollout: Rollout, raw_scores: torch.Tensor,
              eos_token_id: int | None, step_index: int, undo_copy: UpdateSnapshot | None) -> StepOutput:
        """The update, with the copy that undoes it (:meth:`start_undo_copy`), freed when the step ends."""
        snapshot = undo_copy if undo_copy is not None else self.start_undo_copy(engine.optimizer,
                                                                                 rollout.response_ids.shape[0])
        try:
            return self._update(engine, stages, rollout, raw_scores, eos_token_id, step_index, snapshot)
        finally:
            if snapshot is not None:
                snapshot.close()  # frees the file now, not when a traceback holding this frame goes

    def _update(self, engine: Engine, stages: PPOStages, rollout: Rollout, raw_scores: torch.Tensor,
                eos_token_id: int | None, step_index: int, snapshot: UpdateSnapshot | None) -> StepOutput:
        ppo, timings = self.config, {}
        self._state_before = self.state_dict()
        start = time.perf_counter()
        scores = self.transform_scores(raw_scores, rollout, eos_token_id)

        full = self._old_and_reference_logprobs(engine, stages, rollout, timings)
        timings["time/ppo/forward_pass"] = time.perf_counter() - start

        tic = time.perf_counter()
        with torch.no_grad():
            mask = rollout.train_mask
            if full is None:
                rewards, non_score_rewards, kls = stages.compute_rewards(
                    scores, rollout.logprobs, rollout.ref_logprobs, mask)
            else:
                rewards, non_score_rewards, kls = stages.compute_rewards(scores, *full, mask)
            timings["time/ppo/compute_rewards"] = time.perf_counter() - tic
            tic = time.perf_counter()
            values, advantages, returns = stages.compute_advantages(rollout.values, rewards, mask)
            rollout.values = values.float()
            self._check_finite(engine, step_index, scores, rollout, advantages, returns)
            timings["time/ppo/compute_advantages"] = time.perf_counter() - tic

        tic = time.perf_counter()
        train_stats, skipped = self._optimize(engine, stages, rollout, advantages, returns, step_index, snapshot)
        timings["time/ppo/optimize_step"] = time.perf_counter() - tic

        tic = time.perf_counter()
        kl_coef = self.kl_ctl.value
        queries, responses = engine.samples or _unpadded(rollout)
        stats = stages.record_step_stats(
            kl_coef, scores=scores, logprobs=rollout.logprobs, ref_logprobs=rollout.ref_logprobs,
            non_score_reward=non_score_rewards, train_stats=train_stats, masks=mask, queries=queries,
            responses=responses, kls=kls, raw_scores=raw_scores, skipped_batches=skipped,
        )
        if world_size() > 1:
            stats = stages.gather_stats(stats)
        mean_kl = float(stats["objective/kl"])
        if mean_kl < -1.0:
            warnings.warn(
                f"The KL ({kl_kind(ppo.kl_penalty)} estimator) is negative: {mean_kl:.2f}. This can precede a "
                "failed run; it often means the generation settings differ from the ones the log-probs assume "
                "(e.g. top_k/top_p/min_new_tokens), or that the learning rate is too high.",
                stacklevel=2,
            )
        stats["ppo/learning_rate"] = engine.optimizer.param_groups[0]["lr"]
        self.kl_ctl.update(mean_kl, ppo.batch_size * world_size())
        if engine.scheduler is not None:
            engine.scheduler.step()
        timings["time/ppo/calc_stats"] = time.perf_counter() - tic
        timings["time/ppo/total"] = time.perf_counter() - start
        stats.update(timings)
        return StepOutput(scalar_stats(stats), stats, rollout, scores)

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
    def _old_and_reference_logprobs(self, engine: Engine, stages: PPOStages, rollout: Rollout,
                                    timings: dict[str, float]) -> tuple | None:
        """Fill the rollout's log-probs, values, reference log-probs and train mask, in chunks of ``mini_batch_size``.

        Chunks (TRL's forward batch size) bound the activations and logits held at once, whatever the rollout batch.
        Returns the full log-prob distributions when ``kl_penalty=full`` needs them.
        """
        ppo, size, reference = self.config, self.config.mini_batch_size, engine.reference
        full = kl_kind(ppo.kl_penalty) == "full"
        engine.policy.eval()  # dropout off in every PPO pass (as TRL classic's passes and PPOv2)
        if engine.critic is not None:
            engine.critic.eval()
        parts: list[tuple] = []
        timings["time/ppo/reference_forward"] = 0.0
        for begin in range(0, rollout.response_ids.shape[0], size):
            chunk = rollout.select(slice(begin, begin + size))
            with reference.capture(engine.policy):
                logprobs, logits, values, mask = stages.rollout_forward(engine.policy, chunk, engine.temperature, full)
            if engine.critic is not None:
                values = stages.critic_values(engine.critic, chunk)
            tic = time.perf_counter()
            with reference.context():
                ref_logprobs, ref_logits, _, _ = stages.rollout_forward(reference.model, chunk, engine.temperature,
                                                                        full)
            timings["time/ppo/reference_forward"] += time.perf_counter() - tic
            part = (logprobs, values, ref_logprobs, mask)
            if full:
                part += (logits.float().log_softmax(-1), ref_logits.float().log_softmax(-1))
            parts.append(part)
        columns = [_cat_right_aligned(column) for column in zip(*parts)]
        rollout.logprobs, rollout.values, rollout.ref_logprobs, rollout.train_mask = columns[:4]
        rollout.values = rollout.values.float()
        return tuple(columns[4:]) or None

    def _optimize(self, engine: Engine, stages: PPOStages, rollout: Rollout, advantages: torch.Tensor,
                  returns: torch.Tensor, step_index: int,
                  snapshot: UpdateSnapshot | None) -> tuple[dict[str, torch.Tensor], int]:
        """``ppo_epochs`` passes of shuffled minibatches, one optimizer step per backward batch (TRL's loop), the
        step inside backward where that is exact (``ppo.optimizer_in_backward``).

        Returns TRL's ``train_stats`` (the minibatches' statistics stacked; ``policy/advantages`` and ``policy/ratio``
        at the trained tokens, for TRL's histograms) and the number of minibatches skipped by the ratio guard."""
        ppo, ratios, all_stats = self.config, [], []
        in_backward = ppo.optimizer_in_backward and why_not(
            engine.optimizer, ppo.max_grad_norm, ppo.gradient_accumulation_steps, engine.local_gradients
        ) is None
        with optimizer_in_backward(engine.optimizer) if in_backward else contextlib.nullcontext():
            skipped = self._epochs(engine, stages, rollout, advantages, returns, step_index, ratios, all_stats,
                                   snapshot)
        mask = rollout.train_mask.bool()
        train_stats = stack_dicts(all_stats)
        train_stats["policy/advantages"] = advantages[mask].unsqueeze(0)
        train_stats["policy/ratio"] = torch.cat(ratios).unsqueeze(0)
        return train_stats, skipped

    def _check_finite(self, engine: Engine, step_index: int, scores: torch.Tensor, rollout: Rollout,
                      advantages: torch.Tensor, returns: torch.Tensor) -> None:
        """Stop before the first optimizer step if what the update trains on holds NaN/inf (one device sync)."""
        mask = rollout.train_mask.bool()
        per_token = {"policy log-probs": rollout.logprobs, "reference log-probs": rollout.ref_logprobs,
                     "values": rollout.values, "advantages": advantages, "returns": returns}
        per_sample = [(torch.isfinite(x) | ~mask).all(1) for x in per_token.values()]
        finite = torch.stack([torch.isfinite(scores), *per_sample]).cpu()
        if bool(finite.all()):
            return
        names = ["scores", *per_token]
        row = int((~finite).any(1).nonzero()[0, 0])
        samples = (~finite[row]).nonzero().flatten().tolist()
        why = {
            "scores": "the reward gave extreme values, or score scaling divided by a zero std",
            "policy log-probs": "the policy's forward pass gives NaN/inf: check its weights and dtype",
            "reference log-probs": "the reference model's forward pass gives NaN/inf: check its weights and dtype",
            "values": "the value function (the policy's value head or the critic) gives NaN/inf: check its weights",
        }.get(names[row], "extreme rewards or values overflow GAE (whitening spreads one rank's NaN to every rank)")
        self._undo(None, engine.optimizer)
        raise FloatingPointError(
            f"The PPO update at PPO step {step_index} would train on NaN/inf: the {names[row]} of samples "
            f"{samples[:8]} are not finite ({why}). No update was applied: the model, the optimizer and the PPO state "
            "are as they were before this PPO step, and the last checkpoint is intact."
        )

    def _undo(self, snapshot: UpdateSnapshot | None, optimizer: Any) -> None:
        """Put the model, the optimizer and the PPO state (KL coefficient, score moments) back as this PPO step found
        them: from ``snapshot`` if optimizer steps were taken, else by dropping accumulated gradients."""
        if snapshot is not None:
            snapshot.restore()
        else:
            optimizer.zero_grad()
        self.load_state_dict(self._state_before)

    def _failed(self, loss: torch.Tensor, where: str, applied: int, snapshot: UpdateSnapshot | None,
                optimizer: Any) -> FloatingPointError:
        """Undo what can be undone (:meth:`_undo`); the error says exactly what the model and optimizer now hold."""
        self._undo(snapshot if applied else None, optimizer)
        as_before = "the model, the optimizer and the PPO state are as they were before this PPO step"
        if not applied:
            kept = f"no optimizer step had been taken: {as_before}"
        elif snapshot is not None:
            kept = f"the {applied} optimizer step(s) it had taken were undone: {as_before}"
        else:
            kept = (f"the model and the optimizer keep the {applied} optimizer step(s) it had taken "
                    "(ppo.undo_failed_update=false), the PPO state is as it was before this PPO step")
        return FloatingPointError(
            f"The PPO loss is {loss.item()} at {where}; {kept}, and the last checkpoint is intact. Lower "
            "ppo.learning_rate, set ppo.max_grad_norm, or check the reward for extreme values."
        )

    def _epochs(self, engine: Engine, stages: PPOStages, rollout: Rollout, advantages: torch.Tensor,
                returns: torch.Tensor, step_index: int, ratios: list[torch.Tensor], all_stats: list[dict],
                snapshot: UpdateSnapshot | None) -> int:
        """The minibatch loop of :meth:`_optimize`; appends to ``ratios`` and ``all_stats``, returns the number of
        skipped batches.

        A loss that is NaN/inf undoes the optimizer steps this PPO step took, from ``snapshot`` (see :meth:`_step`),
        whose copy must be whole before the first backward.
        """
        ppo, optimizer = self.config, engine.optimizer
        batch_size = rollout.response_ids.shape[0]
        minibatches = -(-batch_size // ppo.mini_batch_size)
        skipped, applied, waited = 0, 0, False
        for epoch in range(ppo.ppo_epochs):
            order = torch.as_tensor(engine.order(batch_size), device=rollout.response_ids.device)
            stats = {}
            for i, begin in enumerate(range(0, batch_size, ppo.mini_batch_size)):
                index = order[begin : begin + ppo.mini_batch_size]
                mini = rollout.select(index)
                logprobs, logits, vpreds, _ = stages.rollout_forward(engine.model, mini, engine.temperature, True)
                if engine.critic is not None:
                    vpreds = stages.critic_values(engine.critic, mini)
                width = mini.logprobs.shape[1]
                logprobs, logits, vpreds = (_right_align(t, width) for t in (logprobs, logits, vpreds))
                pg_loss, vf_loss, stats = stages.loss(
                    mini.logprobs, mini.values, logits, vpreds.float(), logprobs, mini.train_mask,
                    advantages[index], returns[index],
                )
                loss = pg_loss + vf_loss if engine.train_policy else vf_loss
                ratios.append((logprobs.detach() - mini.logprobs).exp()[mini.train_mask.bool()])
                if not torch.isfinite(loss):
                    where = f"PPO step {step_index} (PPO epoch {epoch + 1} of {ppo.ppo_epochs}, "
                    where += f"minibatch {i + 1} of {minibatches})"
                    raise self._failed(loss, where, applied, snapshot, optimizer)
                if snapshot is not None and not waited:  # before the first backward: it may step (in backward)
                    try:
                        snapshot.wait()
                    except OSError:
                        self._undo(None, optimizer)  # its error says nothing was changed: the PPO state too
                        raise
                    waited = True
                skipped += int(float(stats.get("policy/ratio_mean", 0.0)) > ppo.ratio_threshold)
                engine.backward(loss / ppo.gradient_accumulation_steps)
                if (i + 1) % ppo.gradient_accumulation_steps == 0:
                    if ppo.max_grad_norm is not None:
                        engine.clip_gradients(ppo.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                    applied += 1
                # Autocast caches the low-precision copy of each weight for its whole region (Fabric's and a
                # user's own cover the PPO step; Lightning's has the cache off): drop it, or the next minibatch
                # runs on the weights before this update.
                torch.clear_autocast_cache()
                all_stats.append({k: v for k, v in stats.items() if v.numel() == 1})  # arrays: not kept
            if ppo.early_stopping and stages._early_stop(stats["policy/policykl"]):
                optimizer.zero_grad()
                break
        return skipped


def _cat_right_aligned(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``[b, w_i, ...]`` tensors along dim 0, left-padding the narrower ones with zeros: every forward
    window ends at the last token, so columns line up from the right (all widths are equal unless a subclass lays
    the inputs out otherwise)."""
    width = max(t.shape[1] for t in tensors)
    return torch.cat([_right_align(t, width) for t in tensors])


def _right_align(tensor: torch.Tensor | None, width: int) -> torch.Tensor | None:
    if tensor is None or tensor.shape[1] == width:
        return tensor
    pad = torch.zeros(tensor.shape[0], width - tensor.shape[1], *tensor.shape[2:], dtype=tensor.dtype,
                      device=tensor.device)
    return torch.cat([pad, tensor], 1)


def _unpadded(rollout: Rollout) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each row's query and response tokens without padding (responses: every generated token, EOS included)."""
    out = []
    for ids, mask in ((rollout.query_ids, rollout.query_mask), (rollout.response_ids, rollout.response_mask)):
        present = mask.bool()
        out.append(list(torch.split(ids[present], present.sum(1).tolist())))
    return out[0], out[1]


def scalar_stats(stats: dict[str, Any]) -> dict[str, float]:
    """The one-number statistics as floats (one device sync for all tensors); arrays are left out."""
    tensors = {k: v for k, v in stats.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
    out = {k: float(np.asarray(v).item()) for k, v in stats.items() if k not in tensors and _is_number(v)}
    if tensors:
        values = torch.stack([v.detach().reshape(()).double() for v in tensors.values()]).tolist()
        out.update(zip(tensors, values))
    return dict(sorted(out.items()))


def _is_number(value: Any) -> bool:
    return isinstance(value, (bool, int, float, np.number)) or (isinstance(value, np.ndarray) and value.size == 1)
