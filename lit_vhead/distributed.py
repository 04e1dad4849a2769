"""Multi-device set-up shared by both loops: FSDP2 sharding of a value-head policy, whether a loop's gradients are
final when ``backward`` returns (what ``ppo.optimizer_in_backward`` needs), and waiting out gloo's hold on a
collective's tensor."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lit_vhead.layers import find_layer_pattern, layer_module_names


def gradients_are_local(strategy: Any, precision: Any) -> bool:
    """True for one process without a wrapper that syncs gradients (Lightning's or Fabric's
    ``SingleDeviceStrategy``) and no ``GradScaler`` in ``precision`` (the plugin): gradients are final when
    ``backward`` returns, so an optimizer step may run inside it."""
    from lightning.fabric.strategies import SingleDeviceStrategy as FabricSingleDevice
    from lightning.pytorch.strategies import SingleDeviceStrategy

    single = isinstance(strategy, (SingleDeviceStrategy, FabricSingleDevice))
    return single and getattr(precision, "scaler", None) is None


def shard_policy(policy: nn.Module, mesh: Any) -> None:
    """FSDP2 (``fully_shard``) over ``mesh``: each decoder layer, the base model and the value head, in place.

    The hooks fire on ``__call__``, so generation, ``forward_with_values`` and the head all gather their weights.
    The reference is built before this, from the plain (unsharded) policy.
    """
    from torch.distributed.fsdp import fully_shard

    _, num_layers = find_layer_pattern(policy)
    for path in layer_module_names(policy, num_layers):
        fully_shard(policy.get_submodule(path), mesh=mesh)
    fully_shard(policy.pretrained_model, mesh=mesh)
    fully_shard(policy.v_head, mesh=mesh)


@contextlib.contextmanager
def released_after(tensor: torch.Tensor, timeout: float = 1.0) -> Iterator[None]:
    """Leave the block only once ``tensor`` has as many Python references as on entry (at most ``timeout`` s later):
    gloo's worker thread frees a finished collective's work, and with it its hold on the tensor, a moment after the
    caller's ``wait`` returns (the gloo workaround of ``PPOTrainer``'s ``accelerator.wait_for_everyone``/``gather``)."""
    references = sys.getrefcount(tensor)
    yield
    deadline = time.monotonic() + timeout
    while sys.getrefcount(tensor) > references and time.monotonic() < deadline:
        time.sleep(1e-4)
