"""``PPOTrainer``'s logging (TRL's): its config as hyperparameters, and ``log_stats``: the step statistics with every
process's reward statistics and, with wandb, a ``game_log`` table."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from lit_vhead.accelerator import gather_objects


def log_config(loggers: Sequence[Any], config: Any) -> None:
    """The PPO config as hyperparameters: flat for TensorBoard, under ``trl_ppo_trainer_config`` elsewhere (TRL's)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in loggers:
        flat = config.to_dict()
        logger.log_hyperparams(flat if isinstance(logger, TensorBoardLogger) else {"trl_ppo_trainer_config": flat})


def log_stats(accelerator: Any, log_with: str | None, distributed: bool, step: int, stats: dict[str, Any],
              batch: dict[str, Any], rewards: Sequence[torch.Tensor] | torch.Tensor,
              columns_to_log: Iterable[str]) -> None:
    """``PPOTrainer.log_stats`` (documented there) at logger step ``step``."""
    columns_to_log = list(columns_to_log)
    if not isinstance(rewards, torch.Tensor):
        rewards = torch.tensor([float(r) for r in rewards])
    rewards = accelerator.gather(rewards.float().to(accelerator.device)).flatten()
    rows = None
    if log_with == "wandb":
        missing = [c for c in columns_to_log if c not in batch]
        if missing:
            raise ValueError(f"Columns to log {columns_to_log} are not present in the batch {list(batch)}.")
        columns = [list(batch[c]) for c in columns_to_log]
        if distributed:
            columns = [gather_objects(c) for c in columns]
        rows = [[*row, reward] for row, reward in zip(zip(*columns), rewards.cpu().tolist())]
    if accelerator.is_main_process:
        logs: dict[str, Any] = {}
        if "query" not in batch and "response" not in batch:
            warnings.warn(
                "The game logs will not be logged because the batch does not contain the keys 'query' and "
                "'response'.",
                stacklevel=2,
            )
        elif rows is not None:
            import wandb

            logs["game_log"] = wandb.Table(columns=[*columns_to_log, "reward"], rows=rows)
        logs.update(stats)
        logs["env/reward_mean"] = float(rewards.mean())
        logs["env/reward_std"] = float(rewards.std()) if rewards.numel() > 1 else math.nan
        logs["env/reward_dist"] = rewards.cpu().numpy()
        accelerator.log(logs, step=step)
