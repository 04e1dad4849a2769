"""PPO statistics as torchmetrics ``MeanMetric``s under TRL classic's names, reduced across ranks on ``compute``."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MeanMetric


class PPOStats(nn.Module):
    """Running means of named scalars over one PPO step; ``compute()`` syncs across ranks and resets."""

    def __init__(self) -> None:
        super().__init__()
        self._metrics: dict[str, MeanMetric] = {}

    def update(self, values: dict[str, torch.Tensor | float], weight: float = 1.0) -> None:
        for name, value in values.items():
            metric = self._metrics.get(name)
            if metric is None:
                device = value.device if isinstance(value, torch.Tensor) else "cpu"
                metric = self._metrics[name] = MeanMetric().to(device)
            metric.update(torch.as_tensor(value, dtype=torch.float32).detach(), weight)

    def compute(self) -> dict[str, float]:
        """The means of this step over all ranks (every rank must call it with the same names), then reset."""
        result = {}
        for name in sorted(self._metrics):
            result[name] = float(self._metrics[name].compute())
            self._metrics[name].reset()
        return result
