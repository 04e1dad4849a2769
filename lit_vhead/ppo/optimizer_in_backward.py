"""The optimizer step inside the backward pass (``PPOConfig.optimizer_in_backward``).

Each parameter is stepped as soon as its gradient is complete, and that gradient is dropped at once, so the
gradients of the whole model never exist together: peak memory falls by one copy of the trainable weights
(measured figures: README, "Speed and memory"). For an optimizer whose update of one parameter reads only that
parameter's gradient and state (Adam, AdamW, SGD, ...), the weights after the step are bitwise those of
``backward(); step()``.

It applies only where that holds; :func:`why_not` names what rules it out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

# torch.optim optimizers whose update of a parameter reads nothing but its gradient, its state and the group's
# hyper-parameters (not LBFGS, which needs a closure; not a user class, whose step may read all gradients).
PER_PARAMETER = (
    torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.RMSprop, torch.optim.Adagrad,
    torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam,
)


def unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside Lightning's/Fabric's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def why_not(optimizer: Any, max_grad_norm: float | None, gradient_accumulation_steps: int,
            single_process: bool) -> str | None:
    """Why the step cannot run inside backward here (None: it can)."""
    raw = unwrap(optimizer)
    params = [p for group in raw.param_groups for p in group["params"]]
    if not single_process:
        return "gradients are reduced across processes after backward (DDP/FSDP/DeepSpeed) or scaled (GradScaler)"
    if max_grad_norm is not None:
        return "max_grad_norm clips by the norm of all gradients together"
    if gradient_accumulation_steps != 1:
        return "gradients accumulate over several backward passes"
    if type(raw) not in PER_PARAMETER:
        return f"{type(raw).__name__} is not one of torch.optim's per-parameter optimizers"
    if any(type(p).__name__ == "DTensor" for p in params):
        return "the parameters are sharded (DTensor)"
    if any(p.grad is not None for p in params):
        return "some parameters already hold gradients"
    return None


@contextlib.contextmanager
def optimizer_in_backward(optimizer: Any) -> Iterator[None]:
    """Inside the block, every backward pass steps each parameter of ``optimizer`` when its gradient is complete,
    then sets that gradient to None. The caller's ``optimizer.step()`` after backward then finds no gradients and
    changes nothing (it still runs, so Lightning counts the step and calls its hooks).

    Requires ``why_not(...) is None`` (every gradient None on entry): when a parameter's hook runs it is then the
    only parameter holding a gradient, so ``step()`` updates it alone.
    """
    raw = unwrap(optimizer)

    def step(param: torch.Tensor) -> None:
        raw.step()
        param.grad = None

    handles = [
        p.register_post_accumulate_grad_hook(step)
        for group in raw.param_groups
        for p in group["params"]
        if p.requires_grad
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
