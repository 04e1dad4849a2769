"""PPO statistics as one torchmetrics ``Metric``: running means of named scalars, reduced across ranks on ``compute``.

All names share two state vectors (sums and counts), so a PPO step's ~40 statistics cost one collective per state
under DDP instead of one per statistic. Every rank records the same names in the same order (same code path).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class PPOStats(Metric):
    """Means of named scalars over one PPO step (TRL classic's names); ``compute()`` syncs, then ``reset()``."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.index: dict[str, int] = {}
        self.add_state("total", torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")

    def _apply(self, fn, exclude_state=()):
        """Follow the module's device, but keep the sums in float64 (``bf16-true`` would convert them)."""
        this = super()._apply(fn, exclude_state=("total", "count", *exclude_state))
        device = fn(torch.zeros(1, device=self.total.device)).device
        this.total, this.count = this.total.to(device), this.count.to(device)
        this._defaults = {key: value.to(device) for key, value in this._defaults.items()}
        return this

    def update(self, values: dict[str, torch.Tensor | float]) -> None:
        for name in values:
            self.index.setdefault(name, len(self.index))
        missing = len(self.index) - self.total.numel()
        if missing > 0:  # new names, or the first update after a reset
            self.total = torch.cat([self.total, self.total.new_zeros(missing)])
            self.count = torch.cat([self.count, self.count.new_zeros(missing)])
        slots = torch.tensor([self.index[name] for name in values], device=self.total.device)
        numbers = torch.stack(
            [torch.as_tensor(v, dtype=torch.float64, device=self.total.device).detach() for v in values.values()]
        )
        self.total.index_add_(0, slots, numbers)
        self.count.index_add_(0, slots, torch.ones_like(numbers))

    def compute(self) -> dict[str, float]:
        means = (self.total / self.count.clamp_min(1)).tolist()
        counts = self.count.tolist()
        return {name: means[i] for name, i in sorted(self.index.items()) if counts[i] > 0}
