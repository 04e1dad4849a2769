"""The reference-model callback: how PPO's frozen reference is built, placed and kept out of checkpoints.

Modes (``configs/ref``):
- ``copy``: a frozen full copy of the policy;
- ``shared``: a frozen copy whose lower ``num_shared_layers`` layers are the policy's own (frozen) storage;
- ``peft``: no second model: the policy with its adapters disabled, or a named frozen adapter.

The reference is built from the policy as ``configure_model`` creates it, i.e. before a checkpoint is restored, so a
resumed run never copies the already-trained policy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning as L
from torch import nn

from lit_vhead.reference import (
    create_reference_model,
    layer_module_names,
    shared_parameter_names,
    tie_shared_parameters,
)

REFERENCE_MODES = ("copy", "shared", "peft")


@dataclass
class Reference:
    """What computes the reference log-probs: ``model`` (a value-head wrapper) run inside ``context()``.

    Trunk reuse (``trunk``: the module paths of the shared layers 0..k-1): the policy's rollout forward, run inside
    ``capture(policy)``, keeps the output of its layer k-1; the reference forward then skips its layers 0..k-1 and
    starts from that output. The shared layers are the same frozen storage and see the same inputs, so the result is
    exactly what a full reference forward gives, for k/L less work.
    """

    model: nn.Module
    mode: str
    adapter_name: str | None = None
    trunk: tuple[str, ...] = ()
    captured: Any = field(default=None, repr=False)

    @contextlib.contextmanager
    def capture(self, policy: nn.Module) -> Iterator[None]:
        """Keep the output of the policy's last shared layer during the forward run inside this block."""
        if not self.trunk:
            yield
            return

        def keep(module: nn.Module, inputs: Any, output: Any) -> None:
            self.captured = output

        handle = policy.get_submodule(self.trunk[-1]).register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        if self.trunk:
            with self._skip_trunk():
                yield
            return
        if self.mode != "peft":
            yield
            return
        peft_model = self.model.pretrained_model
        if self.adapter_name is None:
            with peft_model.disable_adapter():
                yield
            return
        previous = peft_model.active_adapter
        peft_model.set_adapter(self.adapter_name)
        try:
            yield
        finally:
            peft_model.set_adapter(previous)

    @contextlib.contextmanager
    def _skip_trunk(self) -> Iterator[None]:
        if self.captured is None:
            raise RuntimeError("Trunk reuse: run the policy's forward inside `reference.capture(policy)` first.")
        captured, self.captured = self.captured, None
        layers = [self.model.get_submodule(path) for path in self.trunk]
        for layer in layers:  # an instance attribute shadows the class's forward until deleted
            layer.forward = lambda *args, **kwargs: captured
        try:
            yield
        finally:
            for layer in layers:
                del layer.forward


class ReferenceModelCallback(L.Callback):
    """Builds the frozen reference for a :class:`~lit_vhead.module.PPOModule`."""

    def __init__(
        self,
        mode: str = "copy",
        num_shared_layers: int | None = None,
        pattern: str | None = None,
        adapter_name: str | None = None,
        adapter_path: str | None = None,
        reuse_trunk: bool = True,
    ) -> None:
        if mode not in REFERENCE_MODES:
            raise ValueError(f"ref.mode={mode!r} is not one of {list(REFERENCE_MODES)}.")
        if mode == "shared" and num_shared_layers is None:
            raise ValueError("ref.mode=shared needs ref.num_shared_layers (how many lower layers to share).")
        if mode != "shared" and num_shared_layers is not None:
            raise ValueError(f"ref.num_shared_layers is only used with ref.mode=shared, not {mode!r}.")
        if adapter_path is not None and adapter_name is None:
            raise ValueError("ref.adapter_path needs ref.adapter_name (the name to load the reference adapter as).")
        self.mode, self.num_shared_layers, self.pattern = mode, num_shared_layers, pattern
        self.adapter_name, self.adapter_path = adapter_name, adapter_path
        self.reuse_trunk = reuse_trunk and mode == "shared"

    def validate(self, policy: nn.Module) -> None:
        """Check the settings against the policy before anything is copied or frozen."""
        if self.mode == "peft" and not getattr(policy, "is_peft_model", False):
            raise ValueError("ref.mode=peft needs a PEFT policy: set peft=lora (or load an adapter checkpoint).")
        if self.mode == "shared":
            shared_parameter_names(policy, self.num_shared_layers, self.pattern)  # raises on a bad k or pattern

    def build(self, policy: nn.Module) -> Reference:
        """Called by the module right after it builds the policy (before any checkpoint restore)."""
        self.validate(policy)
        if self.mode == "peft":
            if self.adapter_path is not None:
                policy.pretrained_model.load_adapter(self.adapter_path, self.adapter_name, is_trainable=False)
            return Reference(policy, "peft", self.adapter_name)
        layers = self.num_shared_layers if self.mode == "shared" else None
        reference = create_reference_model(policy, layers, self.pattern)
        trunk = tuple(layer_module_names(policy, layers, self.pattern)) if self.reuse_trunk else ()
        return Reference(reference, self.mode, trunk=trunk)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.reference_builder = self.build

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Follow the policy to its device and dtype, then re-share the storage that the move un-shared."""
        reference = pl_module.reference
        if reference.mode == "peft":
            return
        policy = pl_module.policy
        reference.model.to(device=policy.device, dtype=policy.dtype)
        reference.model.v_head.to(policy.v_head.summary.weight.dtype)
        if reference.mode == "shared":
            tie_shared_parameters(reference.model, policy)
