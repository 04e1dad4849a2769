"""Running mean/std of the reward-model scores, for TRL's ``use_score_scaling`` / ``use_score_norm``."""

from __future__ import annotations

import math
from typing import Any

import torch

from lit_vhead.ppo.functional import _masked_moments


class RunningMoments:
    """Running mean and std of a stream of scores, merged batch by batch (Chan et al.'s parallel update), as TRL 0.11.4.

    The state starts at ``mean=0, var=1, std=1, count=1e-24`` (the tiny count makes the first batch's moments win).
    ``var`` is the population variance of everything seen; ``std`` is its Bessel-corrected square root. When
    ``distributed`` and ``torch.distributed`` runs with more than one rank, each batch's moments cover all ranks,
    so every rank holds the same state. TRL's use: ``scores / (std + eps)`` for score scaling, and
    ``(scores − mean) / (std + eps)`` when ``use_score_norm`` is also set.
    """

    def __init__(self, distributed: bool = True) -> None:
        self.distributed = distributed
        self.mean = 0.0
        self.std = 1.0
        self.var = 1.0
        self.count = 1e-24

    @torch.no_grad()
    def update(self, xs: torch.Tensor) -> tuple[float, float]:
        """Fold the batch ``xs`` (any shape, usually the ``[B]`` scores) in; return its mean and unbiased std.

        With a single score the batch std is NaN, and so is the running ``std`` while only one score has been
        seen (TRL gives ``inf`` there).
        """
        xs = xs.detach().float()
        batch_mean_t, batch_var_t, batch_count_t = _masked_moments(xs, torch.ones_like(xs), self.distributed)
        batch_mean, batch_var, batch_count = batch_mean_t.item(), batch_var_t.item(), batch_count_t.item()

        delta = batch_mean - self.mean
        tot_count = self.count + batch_count
        old_sum = self.var * self.count + delta**2 * self.count * batch_count / tot_count
        new_var = (old_sum + batch_var * batch_count) / tot_count

        self.mean += delta * batch_count / tot_count
        self.std = math.sqrt(new_var * tot_count / (tot_count - 1)) if tot_count > 1 else math.nan
        self.var = new_var
        self.count = tot_count
        batch_std = math.sqrt(batch_var * batch_count / (batch_count - 1)) if batch_count > 1 else math.nan
        return batch_mean, batch_std

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "var": self.var, "count": self.count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.mean = float(state_dict["mean"])
        self.std = float(state_dict["std"])
        self.var = float(state_dict["var"])
        self.count = float(state_dict["count"])
