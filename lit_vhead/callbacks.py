"""``ReferenceModelCallback``: picks how a :class:`~lit_vhead.module.PPOModule` builds its frozen reference.

The reference logic lives in :mod:`lit_vhead.reference`; this callback only hands its ``ReferenceConfig`` to the module
before ``configure_model``, where the module builds the reference right after the policy (so before any checkpoint is
restored: a resumed run never copies the trained policy). Without the callback the module uses its own ``ref``
argument (a frozen full copy by default).
"""

from __future__ import annotations

import lightning as L

from lit_vhead.reference import REFERENCE_MODES, ReferenceConfig

__all__ = ["REFERENCE_MODES", "ReferenceModelCallback", "SavePretrained"]


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
    and its tokenizer to ``directory``: sharded (FSDP2) weights are gathered on every rank and written by rank 0."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.policy.save_pretrained(self.directory, is_main_process=trainer.is_global_zero)
        if trainer.is_global_zero:
            pl_module.tokenizer.save_pretrained(self.directory)
