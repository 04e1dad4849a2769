"""TRL 0.29.1's bookkeeping around each PPO step of the experimental ``PPOTrainer``: ``state`` (episodes, steps), its
metric names in ``log_history`` and the ``transformers.TrainerCallback``s, checkpoints when they ask, sample
completions."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from transformers import TrainerState

if TYPE_CHECKING:
    from lit_vhead.experimental.ppo.ppo_module import ExperimentalPPOModule
    from lit_vhead.experimental.ppo.ppo_trainer import PPOTrainer


@dataclass
class OnlineTrainerState(TrainerState):
    """``transformers.TrainerState`` with TRL's ``episode`` counter (prompts trained on so far)."""

    episode: int = 0


# TRL 0.29.1's logged metric <- the PPO core's statistic (means over the step's micro-batches, over the trained tokens)
TRL_METRICS = {
    "objective/kl": "objective/kl",
    "objective/entropy": "objective/entropy",
    "objective/scores": "ppo/mean_scores",
    "policy/approxkl_avg": "ppo/policy/approxkl",
    "policy/clipfrac_avg": "ppo/policy/clipfrac",
    "loss/policy_avg": "ppo/loss/policy",
    "loss/value_avg": "ppo/loss/value",
    "val/clipfrac_avg": "ppo/val/clipfrac",
    "policy/entropy_avg": "ppo/policy/entropy",
    "val/ratio": "ppo/policy/ratio_mean",
    "lr": "ppo/learning_rate",
}


def trl_metrics(stats: dict[str, Any], kl_coef: float) -> dict[str, float]:
    """TRL 0.29.1's metrics of one PPO step from the core's statistics (``objective/non_score_reward`` is
    ``-kl_coef * objective/kl`` summed per response, as TRL's)."""
    out = {name: float(stats[key]) for name, key in TRL_METRICS.items() if key in stats}
    out["objective/non_score_reward"] = -kl_coef * out["objective/kl"]
    out["objective/rlhf_reward"] = out["objective/non_score_reward"] + out["objective/scores"]
    return out


class TRLLoop(L.Callback):
    """TRL's per-update bookkeeping around each PPO step: ``state`` (episodes, steps), TRL's metrics in
    ``log_history`` and the callbacks, checkpoints when the callbacks ask (``save_strategy``/``save_steps``), sample
    completions every ``num_total_batches // num_sample_generations`` steps."""

    def __init__(self, owner: PPOTrainer) -> None:
        self.owner = owner

    def on_train_start(self, trainer: L.Trainer, pl_module: ExperimentalPPOModule) -> None:
        o = self.owner
        self.start = time.time()
        o.control = o.callback_handler.on_train_begin(o.args, o.state, o.control)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: ExperimentalPPOModule) -> None:
        o, args = self.owner, self.owner.args
        o.state.episode += args.batch_size
        o.state.global_step += 1
        o.state.epoch = o.state.episode / o.train_dataset_len
        stats = {k: v.item() if torch.is_tensor(v) else v for k, v in trainer.callback_metrics.items()}
        metrics = {"eps": int(o.state.episode / max(time.time() - self.start, 1e-9))}
        metrics.update(trl_metrics(stats, args.kl_coef))
        rollout = pl_module.last_rollout
        eos = o.processing_class.eos_token_id
        metrics["val/num_eos_tokens"] = int(((rollout.response_ids == eos) & rollout.response_mask.bool()).sum())
        metrics["episode"] = o.state.episode
        o.log(metrics)
        o.control = o.callback_handler.on_step_end(args, o.state, o.control)
        if o.control.should_save:
            o._save_checkpoint()
            o.control = o.callback_handler.on_save(args, o.state, o.control)
        if o.control.should_training_stop:
            trainer.should_stop = True
        update = o.state.global_step
        if args.num_sample_generations > 0 and (update - 1) % o.sample_generations_freq == 0:
            o.generate_completions(sampling=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: ExperimentalPPOModule) -> None:
        o = self.owner
        o.control = o.callback_handler.on_train_end(o.args, o.state, o.control)
        if o.control.should_save:
            o._save_checkpoint()
            o.control = o.callback_handler.on_save(o.args, o.state, o.control)



def absolute_steps(value: float | None, total: int) -> int | None:
    """``logging_steps``/``save_steps``: a float below 1 is a fraction of the run, as in TRL."""
    if value is None:
        return None
    return math.ceil(total * value) if value < 1 else int(value)



def show_completions(df: Any, report_to: Sequence[str]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    if Console is not None:
        table = Table(show_lines=True)
        for column in df.columns:
            table.add_column(column)
        for _, row in df.iloc[:5].iterrows():
            table.add_row(*row.astype(str).tolist())
        Console().print(table)
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            wandb.log({"completions": wandb.Table(dataframe=df)})
