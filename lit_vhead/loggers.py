"""Loggers without surprises: a CSV logger that survives resume (Lightning's deletes an existing ``metrics.csv`` and
says so), and a wandb logger without wandb's console noise."""

from __future__ import annotations

import csv
import io
import os
import warnings

from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import WandbLogger as _WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment


class CSVLogger(_CSVLogger):
    """Lightning's ``CSVLogger``, except that rows already in ``metrics.csv`` are kept and the run appends to them
    (a last row torn by a kill is dropped).

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
            with open(path, newline="", encoding="utf-8") as f:
                text = f.read()
            if not text.endswith("\n"):  # a kill tore the last row (rows are written whole, newline last): drop it
                text = text[: text.rfind("\n") + 1]
            reader = csv.DictReader(io.StringIO(text, newline=""))
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if self._keep(r)]
        with warnings.catch_warnings():  # "Previous log files ... will be deleted": not here, they are written back
            warnings.filterwarnings("ignore", message=r".*Previous log files in this directory will be deleted")
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


class WandbLogger(_WandbLogger):
    """Lightning's ``WandbLogger`` in wandb's quiet mode, without the ``anonymous`` setting Lightning always passes
    (wandb warns that it has no effect). Quiet mode drops wandb's end-of-run banner, whose raw ANSI colour codes
    end up in log files; wandb still says where the run is saved."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous", None)
        settings = self._wandb_init.get("settings")
        if settings is None or isinstance(settings, dict):
            self._wandb_init["settings"] = {"quiet": True, **(settings or {})}
