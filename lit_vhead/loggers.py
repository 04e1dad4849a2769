"""Loggers without surprises: a CSV logger that survives resume (Lightning's deletes an existing ``metrics.csv`` and
says so), and a wandb logger without wandb's console noise. Both write nothing until the first metrics arrive, so a
run that fails before its first PPO step leaves no logger output (no ``csv/``, no wandb run dir)."""

from __future__ import annotations

import csv
import io
import os
import uuid
import warnings

from lightning.pytorch.loggers import CSVLogger as _CSVLogger
from lightning.pytorch.loggers import WandbLogger as _WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only


class StartsWithFirstMetrics:
    """Mixin for a Lightning logger: nothing is created or written before the first metrics (Lightning creates every
    logger's experiment as ``fit`` sets up, and logs hyper-parameters then): until then ``experiment`` is a stand-in
    that starts the real one when anything of it is used."""

    _started = False
    _pending: tuple = ()

    @property
    def started(self) -> bool:
        """Whether this logger has started (its first metrics arrived, or its experiment was used)."""
        return self._started

    def start(self) -> None:
        """Start now: create the experiment and log the hyper-parameters that waited."""
        if self._started:
            return
        self._started = True
        for params, args, kwargs in self._pending:
            super().log_hyperparams(params, *args, **kwargs)
        self._pending = ()

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        if self._started:
            super().log_hyperparams(params, *args, **kwargs)
        else:
            self._pending = (*self._pending, (params, args, kwargs))

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        self.start()
        super().log_metrics(metrics, step)

    def log_graph(self, *args, **kwargs) -> None:
        if self._started:
            super().log_graph(*args, **kwargs)

    def save(self) -> None:
        if self._started:
            super().save()

    def finalize(self, status: str) -> None:
        if self._started:
            super().finalize(status)


class _NotStarted:
    """A logger's experiment before its first metrics: using it starts the logger."""

    def __init__(self, logger: StartsWithFirstMetrics) -> None:
        object.__setattr__(self, "_logger", logger)

    def _real(self):
        self._logger.start()
        return self._logger.experiment

    def __getattr__(self, name: str):
        return getattr(self._real(), name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._real(), name, value)


class CSVLogger(StartsWithFirstMetrics, _CSVLogger):
    """Lightning's ``CSVLogger``, except that rows already in ``metrics.csv`` are kept and the run appends to them
    (a last row torn by a kill is dropped).

    ``keep_before_step`` (set when resuming from a checkpoint taken after PPO step ``n - 1``) drops rows of steps
    that the resumed run will log again, so every PPO step appears exactly once.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.keep_before_step: int | None = None
        self._writer = None  # Lightning's experiment, once made and given back its rows

    @property
    @rank_zero_experiment
    def experiment(self):
        if not self.started:
            return _NotStarted(self)
        if self._writer is not None:
            return self._writer
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
        self._writer = experiment
        return experiment

    def _keep(self, row: dict[str, str]) -> bool:
        step = row.get("ppo/step") or row.get("step")
        return self.keep_before_step is None or step in (None, "") or float(step) < self.keep_before_step


class WandbLogger(StartsWithFirstMetrics, _WandbLogger):
    """Lightning's ``WandbLogger`` in wandb's quiet mode, without the ``anonymous`` setting Lightning always passes
    (wandb warns that it has no effect). Quiet mode drops wandb's end-of-run banner, whose raw ANSI colour codes
    end up in log files; wandb still says where the run is saved."""

    def __init__(self, *args, id: str | None = None, version: str | None = None, settings=None, **kwargs) -> None:
        if settings is None or isinstance(settings, dict):
            settings = {"quiet": True, **(settings or {})}
        # the run's id from the start: its version is known before the run starts
        super().__init__(*args, id=version or id or uuid.uuid4().hex[:8], settings=settings, **kwargs)
        # Lightning always passes `anonymous` to wandb.init, and Lightning has no public way to leave it out; wandb
        # then warns that the setting has no effect. The one private attribute of Lightning this project writes.
        self._wandb_init.pop("anonymous", None)

    @property
    @rank_zero_experiment
    def experiment(self):
        return super().experiment if self.started else _NotStarted(self)

    def finish(self, failed: bool = False) -> None:
        """End the wandb run now (if it started), in wandb's quiet mode, rather than at exit, where wandb prints its
        banner with raw ANSI colour codes whatever quiet says."""
        if self._started:
            self.experiment.finish(exit_code=1 if failed else 0)
