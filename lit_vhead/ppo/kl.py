"""KL-coefficient controllers (TRL classic's adaptive and fixed ``β``), checkpointable through ``state_dict``."""

from __future__ import annotations

from typing import Any


class KLController:
    """Holds the KL coefficient ``value`` used in :func:`lit_vhead.ppo.functional.compute_rewards`."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adapt ``value`` after a PPO step that measured ``current_kl`` over ``n_steps`` samples."""

    def state_dict(self) -> dict[str, Any]:
        """The coefficient, so a resumed run continues from the adapted ``β`` rather than the initial one."""
        return {"value": self.value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.value = float(state_dict["value"])


class FixedKLController(KLController):
    """A constant ``β``: ``update`` does nothing."""


class AdaptiveKLController(KLController):
    """Proportional controller from Ziegler et al. 2019 (arXiv:1909.08593), as in TRL.

    ``e = clip(current_kl / target − 1, −0.2, 0.2)`` and ``value ← value · (1 + e · n_steps / horizon)``, where TRL
    passes ``n_steps = batch_size · num_processes`` and ``current_kl`` is the batch mean of the summed per-token KL.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got {target=}, {horizon=}.")
        super().__init__(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


def make_kl_controller(adaptive: bool, init_kl_coef: float, target: float, horizon: float) -> KLController:
    """TRL's choice: adaptive when ``adaptive`` (``adap_kl_ctrl``), otherwise fixed at ``init_kl_coef``."""
    if adaptive:
        return AdaptiveKLController(init_kl_coef, target, horizon)
    return FixedKLController(init_kl_coef)
