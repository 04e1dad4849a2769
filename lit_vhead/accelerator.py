"""accelerate's ``Accelerator``, as far as TRL classic scripts use it, answered by Lightning Fabric.

``PPOTrainer`` builds its Fabric from ``PPOConfig.accelerator_kwargs`` (accelerate's names or Fabric's) and exposes
it as ``ppo_trainer.accelerator``; ``AcceleratedScheduler`` is accelerate's wrapper of the LR scheduler (TRL code reads
``ppo_trainer.lr_scheduler.scheduler``).
"""

from __future__ import annotations

import contextlib
import os
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from lit_vhead.config import PPOConfig
from lit_vhead.distributed import released_after

# accelerate's ``mixed_precision`` values -> Fabric's ``precision``
_MIXED_PRECISION = {"no": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}
_FABRIC_ARGS = ("accelerator", "strategy", "devices", "num_nodes", "precision", "plugins")
STATE_WEIGHTS = "policy.safetensors"
STATE_FILE = "trainer_state.pt"


def fabric_arguments(accelerator_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Fabric's arguments from ``PPOConfig.accelerator_kwargs``: Fabric's own names, or accelerate's ``cpu`` and
    ``mixed_precision``. Under ``torchrun`` the process layout comes from the launcher (as with ``accelerate``);
    otherwise one device, never every visible GPU."""
    kwargs = dict(accelerator_kwargs)
    args: dict[str, Any] = {}
    if "mixed_precision" in kwargs:
        value = kwargs.pop("mixed_precision")
        if value not in _MIXED_PRECISION:
            raise ValueError(
                f"accelerator_kwargs['mixed_precision']={value!r} is not one of {list(_MIXED_PRECISION)}; or pass "
                "Fabric's precision=... ('32-true', 'bf16-mixed', 'bf16-true', '16-mixed')."
            )
        args["precision"] = _MIXED_PRECISION[value]
    if kwargs.pop("cpu", False):
        args["accelerator"] = "cpu"
    unknown = sorted(set(kwargs) - set(_FABRIC_ARGS))
    if unknown:
        raise ValueError(
            f"accelerator_kwargs has {unknown}, which lit_vhead cannot map to Lightning Fabric. Supported: "
            f"{list(_FABRIC_ARGS)} (Fabric's arguments) and accelerate's 'cpu' and 'mixed_precision'."
        )
    args.update(kwargs)
    if torch.distributed.is_available() and torch.distributed.is_torchelastic_launched():
        world, local = int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
        args.setdefault("devices", local)
        args.setdefault("num_nodes", world // local)
        if world > 1:
            args.setdefault("strategy", "ddp")
    args.setdefault("devices", 1)
    return args


def build_loggers(config: PPOConfig) -> list:
    """The Lightning logger ``log_with`` names (the classes ``configs/logger`` uses), writing under
    ``project_kwargs['logging_dir']`` (or ``project_dir``, else the working directory)."""
    if config.log_with is None:
        return []
    save_dir = config.project_kwargs.get("logging_dir") or config.project_kwargs.get("project_dir") or "."
    options = dict(config.tracker_kwargs.get(config.log_with, {}))
    if config.log_with == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        options.setdefault("project", config.tracker_project_name)
        return [WandbLogger(save_dir=save_dir, log_model=False, **options)]
    if config.log_with == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return [TensorBoardLogger(save_dir=save_dir, name=config.tracker_project_name, **options)]
    from lit_vhead.loggers import CSVLogger

    options.setdefault("flush_logs_every_n_steps", 1)
    return [CSVLogger(save_dir=save_dir, name=config.tracker_project_name, **options)]


def unwrap(model: Any) -> Any:
    """The module inside Fabric and DDP wrappers (``accelerator.unwrap_model``)."""
    while hasattr(model, "module") and isinstance(model, torch.nn.Module) and model is not model.module:
        model = model.module
    return model


class Accelerator:
    """The parts of accelerate's ``Accelerator`` that TRL 0.11.4's scripts and examples touch (the README lists them),
    answered by Lightning Fabric; ``fabric`` is the Fabric itself, for anything else."""

    def __init__(self, fabric: L.Fabric) -> None:
        self.fabric = fabric
        self._barrier_tensor = torch.zeros(1)  # see wait_for_everyone

    @property
    def device(self) -> torch.device:
        return self.fabric.device

    @property
    def is_main_process(self) -> bool:
        return self.fabric.is_global_zero

    @property
    def num_processes(self) -> int:
        return self.fabric.world_size

    @property
    def process_index(self) -> int:
        return self.fabric.global_rank

    @property
    def state(self) -> SimpleNamespace:
        """What scripts read from ``accelerator.state`` (TRL's ``ppo.py`` checks ``deepspeed_plugin``)."""
        return SimpleNamespace(deepspeed_plugin=None, num_processes=self.num_processes,
                               process_index=self.process_index, device=self.device)

    def unwrap_model(self, model: Any, keep_fp32_wrapper: bool = True) -> Any:
        return unwrap(model)

    def print(self, *args: Any, **kwargs: Any) -> None:
        """Print once (on the main process)."""
        self.fabric.print(*args, **kwargs)

    def _gloo(self) -> bool:
        return self.fabric.world_size > 1 and torch.distributed.get_backend() == "gloo"

    def wait_for_everyone(self) -> None:
        """Wait for every process.

        Under gloo this is an ``all_reduce`` of a tensor this object keeps, not gloo's barrier: that barrier holds the
        collectives still in flight when it starts (e.g. the step's last gather) until its own work is freed on gloo's
        worker thread. As a script's last collective (``save_pretrained``), that can fall into interpreter shutdown,
        where Python 3.11-3.13 end the thread inside a C++ destructor and the process aborts after its work is done.
        The same holds for any gloo work whose tensors Python sees, so this returns only once gloo has let go of its
        tensor.
        """
        if self._gloo():
            with released_after(self._barrier_tensor):
                torch.distributed.all_reduce(self._barrier_tensor)
        else:
            self.fabric.barrier()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` concatenated along dim 0 (0-d tensors become one entry each)."""
        tensor = torch.as_tensor(tensor, device=self.device)
        if self.fabric.world_size == 1:
            return tensor.reshape(-1) if tensor.ndim == 0 else tensor
        tensor = tensor.reshape(1) if tensor.ndim == 0 else tensor
        with released_after(tensor) if self._gloo() else contextlib.nullcontext():  # see wait_for_everyone
            gathered = self.fabric.all_gather(tensor)
        return gathered.reshape(-1, *gathered.shape[2:])

    def prepare(self, *objects: Any) -> Any:
        """Distribute data loaders (``DistributedSampler`` under DDP, batches moved to the device)."""
        for obj in objects:
            if not isinstance(obj, DataLoader):
                raise TypeError(
                    f"PPOTrainer.accelerator.prepare takes data loaders, got {type(obj).__name__}: PPOTrainer already "
                    "set up its model and optimizer (pass them to PPOTrainer)."
                )
        return self.fabric.setup_dataloaders(*objects)

    def log(self, values: dict[str, Any], step: int | None = None) -> None:
        """Log to every logger on the main process: scalars everywhere; arrays as histograms and tables to wandb only
        (TRL's tensorboard tracker dropped them too)."""
        if not self.fabric.is_global_zero:
            return
        for logger in self.fabric.loggers:
            logger.log_metrics(_for_logger(logger, values), step=step)
            logger.save()  # flushed at every step: a classic loop has no end hook that would flush it

    def end_training(self) -> None:
        """Close the loggers (accelerate's ``end_training``)."""
        for logger in self.fabric.loggers:
            logger.finalize("success")


def _for_logger(logger: Any, values: dict[str, Any]) -> dict[str, Any]:
    from lightning.pytorch.loggers import WandbLogger

    rich = isinstance(logger, WandbLogger)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().float().cpu().numpy()
        if isinstance(value, np.ndarray) and value.size == 1:
            value = value.item()
        if isinstance(value, (bool, int, float, np.number)):
            out[key] = float(value)
        elif rich:
            import wandb

            out[key] = wandb.Histogram(value) if isinstance(value, np.ndarray) else value
    return out


class AcceleratedScheduler:
    """accelerate's wrapper of an LR scheduler: ``.scheduler`` is the user's; everything else is passed to it."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.scheduler = scheduler

    def step(self, *args: Any, **kwargs: Any) -> None:
        self.scheduler.step(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state_dict)

    def get_last_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["scheduler"], name)


def gather_objects(values: list) -> list:
    """The concatenation of every process's list (``accelerate.utils.gather_object``)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(values)
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, list(values))
    return [item for part in gathered for item in part]


__all__ = ["AcceleratedScheduler", "Accelerator", "build_loggers", "fabric_arguments", "gather_objects", "unwrap"]
