"""Callbacks for a ``lightning.Trainer`` running a :class:`~lit_vhead.module.PPOModule`.

- ``ReferenceModelCallback`` picks how the module builds its frozen reference. The reference logic lives in
  :mod:`lit_vhead.reference`; this callback only hands its ``ReferenceConfig`` to the module before
  ``configure_model``, where the module builds the reference right after the policy (so before any checkpoint is
  restored: a resumed run never copies the trained policy). Without the callback the module uses its own ``ref``
  argument (a frozen full copy by default).
- ``SavePretrained`` saves the trained policy (and a separate critic) at the end of ``fit``.
- ``LastCheckpoint`` keeps ``last.ckpt`` current after every PPO step (Lightning's ``save_last`` follows only the
  checkpoints its ``ModelCheckpoint`` writes anyway).
- ``PPOProgress`` is a progress display for PPO steps: plain lines, no escape codes.
"""

from __future__ import annotations

import sys
import time

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks.progress import ProgressBar

from lit_vhead.reference import REFERENCE_MODES, ReferenceConfig

__all__ = ["LastCheckpoint", "PPOProgress", "REFERENCE_MODES", "ReferenceModelCallback", "SavePretrained"]


class ReferenceModelCallback(L.Callback):
    """Builds the frozen reference (``copy``, ``shared`` or ``peft``) for a ``PPOModule``."""

    def __init__(
        self,
        mode: str = "copy",
        num_shared_layers: int | None = None,
        pattern: str | None = None,
        adapter_name: str | None = None,
        adapter_path: str | None = None,
        reuse_trunk: bool = True,
    ) -> None:
        self.config = ReferenceConfig(mode, num_shared_layers, pattern, adapter_name, adapter_path, reuse_trunk)

    @property
    def mode(self) -> str:
        return self.config.mode

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.ref = self.config


class SavePretrained(L.Callback):
    """At the end of ``fit``, while every rank still runs, save the policy (``save_pretrained``, value head included)
    and its tokenizer to ``directory``: sharded (FSDP2) weights are gathered on every rank and written by rank 0.
    A separate critic (``PPOModule.critic``) is saved with the tokenizer to ``critic_directory`` (None: not saved)."""

    def __init__(self, directory: str, critic_directory: str | None = None) -> None:
        self.directory = directory
        self.critic_directory = critic_directory

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.policy.save_pretrained(self.directory, is_main_process=trainer.is_global_zero)
        critic = getattr(pl_module, "critic", None) if self.critic_directory else None
        if critic is not None and trainer.is_global_zero:
            critic.save_pretrained(self.critic_directory)
        if trainer.is_global_zero:
            pl_module.tokenizer.save_pretrained(self.directory)
            if critic is not None:
                pl_module.tokenizer.save_pretrained(self.critic_directory)


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt``, rewritten every ``every_n_epochs`` PPO steps (one PPO step is one epoch): a run killed
    at any step resumes from the step before. Use it next to a periodic ``ModelCheckpoint`` (its own state in the
    checkpoint, whatever that one's settings)."""

    def __init__(self, dirpath: str, every_n_epochs: int = 1) -> None:
        super().__init__(dirpath=dirpath, filename="last", every_n_epochs=every_n_epochs, save_top_k=1,
                         enable_version_counter=False)
        self.every_n = every_n_epochs

    @property
    def state_key(self) -> str:
        return self._generate_state_key(role="last", every_n_epochs=self.every_n)


class PPOProgress(ProgressBar):
    """Progress of a PPO run as plain lines: ``PPO step 10/100: reward 5.123, kl 0.8431 (0.31 s/step)`` every
    ``every_n_steps`` PPO steps and after the last, with the metrics the module logs to the progress bar. No escape
    codes, no ``it/s`` (a PPO step is one batch) and no logger version, so log files and notebooks read as they
    print. In a terminal the line of the current step is also updated in place (carriage return) in between.

    Pass it to the Trainer in place of Lightning's bar: ``L.Trainer(callbacks=[PPOProgress()], ...)``.
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r} must be an int >= 1.")
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._started_at: float | None = None
        self._first_step = 0
        self._width = 0  # of the line shown in place (a terminal), 0 when none

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started_at, self._first_step = time.perf_counter(), trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero) or self._started_at is None:
            return
        step, total = trainer.current_epoch + 1, trainer.max_epochs
        metrics = ", ".join(f"{name} {float(value):.4g}" for name, value in trainer.progress_bar_metrics.items())
        per_step = (time.perf_counter() - self._started_at) / (step - self._first_step)
        line = f"PPO step {step}/{total}" + (f": {metrics}" if metrics else "") + f" ({per_step:.2f} s/step)"
        if step % self.every_n_steps == 0 or step == total:
            print("\r" + line.ljust(self._width) if self._width else line, flush=True)
            self._width = 0
        elif sys.stdout.isatty():
            print("\r" + line.ljust(self._width), end="", flush=True)
            self._width = max(self._width, len(line))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._width:  # end the line shown in place, so the error starts on its own
            print(flush=True)
            self._width = 0
