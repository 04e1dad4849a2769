"""What ``python train.py`` accepts: the schemas of the ``ppo`` and ``head`` groups (only the settings the CLI
honours), and one-line errors for unknown keys under ``ppo``, ``head``, ``ref`` and ``reward``.

``PPOConfig`` keeps TRL's ``PPOTrainer`` fields (``model_name``, ``log_with``, ...) and its run-time fields
(``world_size``, ...) for Python users; the CLI has its own groups for the former and derives the latter, so the
``ppo`` schema of the CLI leaves both out and a command line that sets one is told what to use instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig

from lit_vhead.config import HeadConfig, PPOConfig, SamplingConfig
from lit_vhead.critic import CriticConfig

# PPOTrainer (TRL) settings the CLI does not read, and what to use instead.
TRAINER_ONLY = {
    "exp_name": "task_name=<name>",
    "task_name": "task_name=<name> (top level)",
    "log_with": "logger=<default|csv|wandb|tensorboard|none>",
    "model_name": "model=<option> or model.name_or_path=<dir>",
    "query_dataset": "data.prompts=<.txt or .jsonl file>",
    "reward_model": "reward=model reward.name_or_path=<dir>",
    "remove_unused_columns": "data.prompts (prompts are read as text, there are no dataset columns)",
    "tracker_kwargs": "logger.wandb.<key>=<value>",
    "tracker_project_name": "logger.wandb.project=<name>",
    "accelerator_kwargs": "trainer=<option> and trainer.<key>=<value>",
    "project_kwargs": "hydra.run.dir=<dir>",
    "push_to_hub_if_best_kwargs": "save_pretrained_dir=<dir> (push-to-hub-if-best is not implemented)",
    "compare_steps": "save_pretrained_dir=<dir> (push-to-hub-if-best is not implemented)",
    "optimize_cuda_cache": "nothing: PyTorch and Lightning handle device caches",
    "optimize_device_cache": "nothing: PyTorch and Lightning handle device caches",
    "dataset_num_proc": "nothing: prompts are not preprocessed",
    "forward_batch_size": "ppo.mini_batch_size=<n> (forward_batch_size is TRL's deprecated alias)",
}
# Fields PPOConfig fills at run time, and where they come from.
DERIVED = {
    "world_size": "trainer.devices",
    "backward_batch_size": "ppo.mini_batch_size x ppo.gradient_accumulation_steps",
    "global_backward_batch_size": "ppo.mini_batch_size x ppo.gradient_accumulation_steps x trainer.devices",
    "global_batch_size": "ppo.batch_size x trainer.devices",
    "is_encoder_decoder": "model.kind",
    "is_peft_model": "peft=<none|lora>",
}
# Hydra's keys of an instantiated node: not settings of its target.
_HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


def _cli_schema(cls: type, name: str, doc: str) -> type:
    """A dataclass with ``cls``'s fields (types, defaults) minus those the CLI does not take."""
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        if f.name in TRAINER_ONLY or f.name in DERIVED:
            continue
        default = (
            dataclasses.field(default_factory=f.default_factory)
            if f.default is dataclasses.MISSING
            else dataclasses.field(default=f.default)
        )
        specs.append((f.name, hints[f.name], default))
    schema = dataclasses.make_dataclass(name, specs, namespace={"__doc__": doc})
    schema.__module__ = __name__
    return schema


PPOSettings = _cli_schema(
    PPOConfig,
    "PPOSettings",
    "The ``ppo`` group of ``python train.py``: ``PPOConfig`` without TRL's PPOTrainer-only and run-time fields.",
)


def register_configs() -> None:
    """Make the schemas available to ``configs/`` (``defaults: [/ppo_schema@_here_]``). They are stored outside any
    config group, so ``--help`` does not offer them as options of the ``head`` and ``ppo`` groups. Called by the
    entry points (``train.py``, and tests or notebooks that compose the configs)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="head_schema", node=HeadConfig)
    cs.store(name="critic_schema", node=CriticConfig)
    cs.store(name="ppo_schema", node=PPOSettings)


class ConfigKeyError(ValueError):
    """A command line sets a key that its group does not have."""


def unknown_key_message(group: str, name: str, known: Iterable[str]) -> str:
    """One line: ``<group>.<name>`` is not a setting, with the closest known name (or the ones there are)."""
    path = f"{group}.{name}"
    if group == "ppo" and name in TRAINER_ONLY:
        return (f"{path} is a setting of PPOTrainer (TRL's loop in Python) that python train.py does not read; "
                f"use {TRAINER_ONLY[name]}.")
    if group == "ppo" and name in DERIVED:
        return f"{path} is derived at run time (from {DERIVED[name]}) and cannot be set."
    known = sorted(set(known) - _HYDRA_KEYS)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {group}.{close[0]}?" if close else f"its keys are {', '.join(known)}."
    return f"{path} is not a setting of {group}: {hint}"


def _target_parameters(node: DictConfig) -> set[str] | None:
    """The keyword arguments the node's ``_target_`` takes; None when it takes any (``**kwargs``) or cannot be
    imported (its own error comes later, naming it)."""
    target = node.get("_target_")
    if not isinstance(target, str):
        return None
    try:
        from hydra.utils import get_object

        parameters = inspect.signature(get_object(target)).parameters.values()
    except Exception:  # an import error of the target, or no signature: not this check's business
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL}


def _known_keys(group: str, node: Any) -> set[str] | None:
    """The keys ``node`` (the config at ``group``) may hold; None when anything goes."""
    if not isinstance(node, DictConfig):
        return None
    schemas = {"ppo": PPOSettings, "ppo.generation": SamplingConfig, "head": HeadConfig, "critic": CriticConfig}
    if group in schemas:
        return {f.name for f in dataclasses.fields(schemas[group])}
    if group in ("ref", "reward"):  # instantiated: its target's arguments
        return _target_parameters(node)
    return None


def check_group_keys(cfg: DictConfig) -> None:
    """Raise ``ConfigKeyError`` for a key under ``ppo``, ``head``, ``ref`` or ``reward`` that is not a setting there
    (a ``+key=value`` override adds one without complaint from Hydra)."""
    for group in ("ppo", "ppo.generation", "head", "critic", "ref", "reward"):
        node = _select(cfg, group)
        known = _known_keys(group, node)
        if known is None:
            continue
        for name in node.keys():
            if name not in known and name not in _HYDRA_KEYS:
                raise ConfigKeyError(unknown_key_message(group, name, known))


def _select(cfg: DictConfig, path: str) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, path, throw_on_resolution_failure=False)


def check_command_line(args: list[str], config_dir: str, config_name: str = "train") -> str | None:
    """The one-line error for a command-line override of an unknown key under ``ppo``, ``head``, ``ref`` or
    ``reward``, written with or without ``+``, or None. Hydra would stop on the first with a hint to add ``+``,
    which then fails later; this names the closest key instead, before Hydra makes a run dir. Anything this check
    cannot judge (flags, sweeps of groups, a command that does not compose) is left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return None
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except Exception:  # Hydra reports its own syntax errors
        return None
    checked = ("ppo", "head", "critic", "ref", "reward")
    keyed = [o for o in overrides if "." in o.key_or_group and o.key_or_group.split(".")[0] in checked]
    if not keyed:
        return None
    retargeted = {o.key_or_group.rsplit(".", 1)[0] for o in keyed if o.key_or_group.endswith("._target_")}
    base = [o.input_line for o in overrides
            if o not in keyed and not o.is_sweep_override() and not o.key_or_group.startswith("hydra")]
    from hydra import compose, initialize_config_dir

    register_configs()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose(config_name, overrides=base)
    except Exception:  # Hydra reports it, with its own message
        return None
    for override in keyed:
        if override.is_delete():
            continue
        error = _unknown_key(cfg, override.key_or_group, retargeted)
        if error:
            return error
    return None


def _unknown_key(cfg: DictConfig, key: str, retargeted: set[str]) -> str | None:
    parts = key.split(".")
    for depth in range(1, len(parts)):
        group = ".".join(parts[:depth])
        if group in retargeted:  # the command line picks another target: its arguments are its own
            return None
        known = _known_keys(group, _select(cfg, group))
        if known is None:
            return None
        if parts[depth] not in known:
            return unknown_key_message(group, parts[depth], known)
    return None
