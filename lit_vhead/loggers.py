"""A CSV logger that survives resume: Lightning's deletes an existing ``metrics.csv`` when a run restarts."""

from __future__ import annotations

import csv
import os

from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment


class CSVLogger(_CSVLogger):
    """Lightning's ``CSVLogger``, except that rows already in ``metrics.csv`` are kept and the run appends to them.

    ``keep_before_step`` (set when resuming from a checkpoint taken after PPO step ``n - 1``) drops rows of steps
    that the resumed run will log again, so every PPO step appears exactly once.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.keep_before_step: int | None = None

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        path = os.path.join(self.log_dir, "metrics.csv")
        keys, rows = [], []
        if os.path.isfile(path):
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                keys = list(reader.fieldnames or [])
                rows = [r for r in reader if self._keep(r)]
        experiment = super().experiment  # Lightning's writer removes the file here
        if rows:
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)
            experiment.metrics_keys = sorted(keys)
        return experiment

    def _keep(self, row: dict[str, str]) -> bool:
        step = row.get("ppo/step") or row.get("step")
        return self.keep_before_step is None or step in (None, "") or float(step) < self.keep_before_step
