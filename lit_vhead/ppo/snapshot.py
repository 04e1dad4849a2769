"""Undoing a PPO update that fails midway (a non-finite loss after some optimizer steps).

A PPO step takes ``ppo_epochs x minibatches`` optimizer steps; a loss that turns NaN/inf in a later minibatch would
leave the earlier ones applied. :class:`UpdateSnapshot` copies what the optimizer changes (its parameters and its
state, e.g. Adam's moments) before the first of them, and puts it back exactly. It costs one copy of the trainable
weights and the optimizer state while the update runs (a LoRA policy: the adapters'; a full fine-tune with Adam:
three times the weights in fp32), freed when the step ends; ``PPOCore`` takes it only when a step has more than one
optimizer step to undo, and not at all with ``ppo.undo_failed_update=false``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from lit_vhead.ppo.optimizer_in_backward import unwrap


def _clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


class UpdateSnapshot:
    """The parameters, per-parameter state and hyper-parameters of ``optimizer`` (Lightning's/Fabric's wrapper or
    a torch optimizer) at construction; :meth:`restore` puts them back and drops any gradients."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = unwrap(optimizer)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.weights = [p.detach().clone() for p in self.params]
        self.state = {p: {k: _clone(v) for k, v in s.items()} for p, s in self.optimizer.state.items()}
        self.groups = [{k: _clone(v) for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]

    @torch.no_grad()
    def restore(self) -> None:
        for param, weight in zip(self.params, self.weights):
            param.copy_(weight)
        self.optimizer.state.clear()
        self.optimizer.state.update(self.state)
        for group, saved in zip(self.optimizer.param_groups, self.groups):
            group.update(saved)
        self.optimizer.zero_grad(set_to_none=True)
