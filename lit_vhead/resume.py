"""Resume a run from a checkpoint with the run's own config.

Every checkpoint of ``python train.py`` carries the run's config and command-line overrides (``SaveRunConfig``).
A resume (``ckpt_path=last`` or ``ckpt_path=<file>``) starts from that config, applies the overrides of the resume
command on top (``ppo.steps=200``, ``logger=csv``, ``trainer.devices=2``...), and refuses one that would change the
model, the optimizer or the batch shapes, whose state the checkpoint holds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

RUN_CONFIG_KEY = "run_config"
# What a checkpoint's state depends on: a resume may not change these (prefix match on dotted keys).
FROZEN = {
    "model": "model or PEFT config",
    "head": "model or PEFT config",
    "peft": "model or PEFT config",
    "ref": "reference model",
    "seed": "initial model (and reference)",
    "ppo.seed": "sampling seed",
    "optimizer": "optimizer",
    "scheduler": "optimizer (LR scheduler)",
    "ppo.learning_rate": "optimizer (learning rate)",
    "ppo.batch_size": "batch shape",
    "ppo.mini_batch_size": "batch shape",
    "ppo.gradient_accumulation_steps": "batch shape",
}


def plain(cfg: DictConfig) -> dict[str, Any]:
    """The task config as plain data (interpolations kept, enums as strings, no ``hydra`` node): what a checkpoint
    loaded with ``weights_only=True`` can hold."""
    data = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    data.pop("hydra", None)
    return data


class SaveRunConfig(L.Callback):
    """Stores the run's config and command-line overrides in every checkpoint (``checkpoint["run_config"]``)."""

    def __init__(self, config: dict[str, Any], overrides: list[str]) -> None:
        self.config, self.overrides = config, list(overrides)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RUN_CONFIG_KEY] = {"config": self.config, "overrides": self.overrides}


def _hydra_node(cfg: DictConfig) -> DictConfig | None:
    """The Hydra config of this run: ``cfg.hydra`` (composed with ``return_hydra_config``) or Hydra's own."""
    from hydra.core.hydra_config import HydraConfig

    if "hydra" in cfg:
        return cfg.hydra
    return HydraConfig.get() if HydraConfig.initialized() else None


def command_overrides(cfg: DictConfig) -> list[str]:
    """The task overrides of this command line (``hydra.*`` excluded)."""
    node = _hydra_node(cfg)
    return [] if node is None else list(node.overrides.task)


def _node(cfg: DictConfig, key: str) -> Any:
    """The value at dotted ``key`` as plain data, interpolations kept."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    return OmegaConf.to_container(parent, resolve=False, enum_to_str=True)[leaf]


def _frozen_value(data: DictConfig, key: str) -> Any:
    value = OmegaConf.select(data, key, default=None, throw_on_resolution_failure=False)
    return OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value


def _check_frozen(before: DictConfig, run: DictConfig, key: str, override: str, ckpt_arg: str) -> None:
    """``ValueError`` when the override of ``key`` changed what the checkpoint's state depends on (``FROZEN``)."""
    for frozen, what in FROZEN.items():
        if not (key == frozen or key.startswith(frozen + ".") or frozen.startswith(key + ".")):
            continue
        if _frozen_value(before, frozen) != _frozen_value(run, frozen):
            shown = key if key.startswith(frozen + ".") else frozen
            old = repr(_frozen_value(before, shown))
            old = old if len(old) <= 60 else old[:57] + "..."
            raise ValueError(
                f"Cannot resume with {override}: it would give the run another {what} ({shown}={old} in the run), "
                f"whose state {ckpt_arg} holds. Drop the override, or start a new run."
            )


def resumed_config(cfg: DictConfig, saved: dict[str, Any], ckpt_arg: str) -> tuple[DictConfig, list[str]]:
    """The config a resume runs with: the run's ``saved`` config (from its checkpoint) with this command's overrides
    applied, and the overrides of both commands (the run's, then this one's on top). ``ValueError`` for an override
    that changes what the checkpoint's state depends on, naming it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    run, before = OmegaConf.create(saved["config"]), OmegaConf.create(saved["config"])
    hydra_node = _hydra_node(cfg)
    choices = {} if hydra_node is None else dict(hydra_node.runtime.choices)
    command = command_overrides(cfg)
    for override in OverridesParser.create().parse_overrides(command):
        key = override.key_or_group
        if override.is_delete():
            parent_key, _, leaf = key.rpartition(".")
            parent = OmegaConf.select(run, parent_key) if parent_key else run
            if isinstance(parent, DictConfig) and leaf in parent:
                del parent[leaf]
        elif key in choices and key not in cfg:  # a group of the global package (debug=, experiment=, ...)
            if override.value() is not None:
                raise ValueError(
                    f"{override.input_line} cannot be applied to a resumed run ({ckpt_arg} continues the run with "
                    "its own config); set the keys you want to change instead (e.g. ppo.steps=<n>)."
                )
        else:  # key=value, +key=value, or a group (model=, logger=, ...): this command's value replaces the run's
            OmegaConf.update(run, key, _node(cfg, key), merge=False, force_add=True)
        _check_frozen(before, run, key, override.input_line, ckpt_arg)
    if "hydra" in cfg:
        run.hydra = cfg.hydra
    keys = {o.split("=", 1)[0].lstrip("+~") for o in command}
    overrides = [o for o in saved.get("overrides", []) if o.split("=", 1)[0].lstrip("+~") not in keys] + command
    return run, overrides


def write_run_config(output_dir: str | os.PathLike, config: DictConfig, overrides: list[str]) -> None:
    """``.hydra/config.yaml`` and ``overrides.yaml`` of a resumed run: what it really runs with (atomic writes)."""
    hydra_dir = Path(output_dir) / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    for name, data in (("config.yaml", plain(config)), ("overrides.yaml", overrides)):
        tmp = hydra_dir / f".{name}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(OmegaConf.to_yaml(OmegaConf.create(data)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, hydra_dir / name)
