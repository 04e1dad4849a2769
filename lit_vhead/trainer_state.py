"""``PPOTrainer.save_state``/``load_state``: everything a classic loop needs to continue exactly (trl#1643).

A state directory holds ``policy.safetensors`` (the trainable weights) and ``trainer_state.pt`` (optimizer, scheduler,
KL coefficient, running score moments, step counters, every process's random generators; read with
``weights_only=True``). Loading is all or nothing: both files are read and checked against the trainer before any of
it is applied, so a truncated file or another run's state leaves the trainer as it was.
"""

from __future__ import annotations

import os
import random
import warnings
from typing import Any

import numpy as np
import torch

from lit_vhead.accelerator import gather_objects
from lit_vhead.atomic import atomic_directory
from lit_vhead.checkpoint import CheckpointError, read_tensors

STATE_WEIGHTS = "policy.safetensors"
STATE_FILE = "trainer_state.pt"
_STATE_KEYS = {"optimizer", "lr_scheduler", "core", "current_step", "steps_done", "rng"}


def save_trainer_state(trainer: Any, directory: str | os.PathLike) -> None:
    """Write ``trainer``'s state into ``directory`` atomically (the main process writes; all must call it)."""
    _check_state_support(trainer)
    from safetensors.torch import save_file

    rng = gather_objects([_rng_state()])
    if trainer.accelerator.is_main_process:
        with atomic_directory(directory) as tmp:
            weights = {name: p.detach().contiguous().cpu() for name, p in _trainable(trainer)}
            save_file(weights, os.path.join(tmp, STATE_WEIGHTS), metadata={"format": "pt"})
            torch.save(
                {
                    "optimizer": trainer.optimizer.state_dict(),
                    "lr_scheduler": None if trainer.lr_scheduler is None else trainer.lr_scheduler.state_dict(),
                    "core": trainer.core.state_dict(),
                    "current_step": trainer.current_step,
                    "steps_done": trainer.steps_done,
                    "rng": rng,
                },
                os.path.join(tmp, STATE_FILE),
            )
    trainer.accelerator.wait_for_everyone()


def load_trainer_state(trainer: Any, directory: str | os.PathLike) -> None:
    """Read and check the state in ``directory``, then apply all of it to ``trainer``."""
    _check_state_support(trainer)
    weights_path, state_path = os.path.join(directory, STATE_WEIGHTS), os.path.join(directory, STATE_FILE)
    if not (os.path.isfile(weights_path) and os.path.isfile(state_path)):
        raise FileNotFoundError(f"{directory} holds no PPOTrainer state ({STATE_WEIGHTS}, {STATE_FILE}); write one "
                                "with PPOTrainer.save_state(dir).")
    weights = read_tensors(weights_path)  # a CheckpointError naming the file if it is truncated or corrupt
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, bad pickle, OS errors: one line naming the file
        raise CheckpointError(
            f"Cannot read the trainer state '{state_path}': {err}. It is truncated or corrupt; nothing was loaded."
        ) from err
    own = dict(_trainable(trainer))
    _check_state(trainer, directory, state_path, weights, own, state)

    with torch.no_grad():
        for name, param in own.items():
            param.copy_(weights[name])
    trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.lr_scheduler is not None:
        trainer.lr_scheduler.load_state_dict(state["lr_scheduler"])
    trainer.core.load_state_dict(state["core"])
    trainer.current_step, trainer.steps_done = state["current_step"], state["steps_done"]
    rng = state["rng"]
    if len(rng) == trainer.fabric.world_size:
        _set_rng_state(rng[trainer.fabric.global_rank])
    else:
        warnings.warn(
            f"The state was saved by {len(rng)} processes and is loaded by {trainer.fabric.world_size}: random "
            "generators are not restored, so sampling will not continue the saved run's sequence.",
            stacklevel=3,
        )


def _check_state(trainer: Any, directory: Any, state_path: str, weights: dict, own: dict, state: Any) -> None:
    """Everything ``load_trainer_state`` applies fits this trainer (what ``load_state_dict`` would find too late)."""
    if not isinstance(state, dict) or not _STATE_KEYS <= set(state):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"'{state_path}' is not a PPOTrainer state (found {found}); nothing was loaded.")
    if set(weights) != set(own) or any(weights[k].shape != own[k].shape for k in own):
        differ = sorted(set(weights) ^ set(own)) or [k for k in own if weights[k].shape != own[k].shape]
        raise ValueError(
            f"The state in {directory} was saved from another model or PEFT config ({differ[:3]} differ): load it "
            "into a trainer built the same way as the one that saved it. Nothing was loaded."
        )
    if (state["lr_scheduler"] is None) != (trainer.lr_scheduler is None):
        saved = "no lr_scheduler" if state["lr_scheduler"] is None else "an lr_scheduler"
        raise ValueError(
            f"The state in {directory} was saved with {saved} and this trainer has "
            f"{'one' if trainer.lr_scheduler is not None else 'none'}: build it with the same lr_scheduler setting. "
            "Nothing was loaded."
        )
    groups, saved_groups = trainer.optimizer.param_groups, state["optimizer"].get("param_groups", [])
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in saved_groups]:
        raise ValueError(
            f"The optimizer state in {directory} has parameter groups of sizes "
            f"{[len(g['params']) for g in saved_groups]}, this trainer's optimizer "
            f"{[len(g['params']) for g in groups]}: build it with the same optimizer. Nothing was loaded."
        )


def _trainable(trainer: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in trainer.model.named_parameters() if p.requires_grad]


def _check_state_support(trainer: Any) -> None:
    strategy = type(trainer.fabric.strategy).__name__
    if "FSDP" in strategy or "DeepSpeed" in strategy:
        raise NotImplementedError(
            f"save_state/load_state support single-device and DDP runs, not {strategy} (sharded states)."
        )


def _rng_state() -> dict[str, Any]:
    """Python, numpy and torch generator states in types ``torch.load(weights_only=True)`` reads back."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    """``random.setstate`` needs tuples all the way down (a round trip may hand back lists)."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
