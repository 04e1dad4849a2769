"""``train(cfg)``: everything ``python train.py`` does, as a plain function that tests call in-process.

Order matters: every check that can fail on bad input (config values, paths, prompts, reference settings, the
output dir) runs before any model is built or any step runs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from lit_vhead.builders import build_tokenizer, resolve_model_source, value_head_class
from lit_vhead.callbacks import SavePretrained
from lit_vhead.checkpoint import CheckpointError
from lit_vhead.cli import check_group_keys
from lit_vhead.config import as_ppo_config
from lit_vhead.layers import shared_parameter_names
from lit_vhead.loggers import CSVLogger, WandbLogger
from lit_vhead.module import PPOModule
from lit_vhead.noise import quiet
from lit_vhead.reference import ReferenceConfig
from lit_vhead.resume import RUN_CONFIG_KEY, SaveRunConfig, command_overrides, plain, resumed_config, write_run_config
from lit_vhead.rewards import RewardAdapter, check_reward_targets
from lit_vhead.rundir import (
    RunDirBusyError,
    check_fresh_start,
    check_writable_dir,
    own_run_dir,
    remove_if_empty,
)
from lit_vhead.summary import RunSummary
from lit_vhead.sweep import ddp_children_of_this_job

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError, OSError)


def _instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, but a user error raised by the target comes out as itself, not wrapped."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, USER_ERRORS):
            raise err.__cause__ from None
        raise


def _instantiate_dict(node: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` entry of a dict-of-nodes group (callbacks, loggers)."""
    if not node:
        return []
    return [_instantiate(v) for v in node.values() if isinstance(v, DictConfig) and "_target_" in v]


def _check_reference(model_cfg: dict, config, ref: ReferenceConfig) -> None:
    """Validate ``num_shared_layers``/``pattern`` on a meta-device copy of the architecture (no weights, no memory)."""
    if ref.mode != "shared":
        return
    with torch.device("meta"):
        skeleton = value_head_class(model_cfg.get("kind", "causal")).transformers_parent_class.from_config(config)
    shared_parameter_names(skeleton, ref.num_shared_layers, ref.pattern)


def _resolve_ckpt_path(cfg: DictConfig, output_dir: Path) -> str | None:
    """The checkpoint to resume from; None for a run from scratch, which must not start over an earlier run."""
    ckpt = cfg.get("ckpt_path")
    if ckpt is None:
        check_fresh_start(output_dir)
        return None
    if ckpt == "last":
        ckpt = str(output_dir / "checkpoints" / "last.ckpt")
        if not Path(ckpt).is_file():
            raise FileNotFoundError(
                f"ckpt_path=last: no checkpoint {ckpt}; give the dir of the run to resume with "
                "hydra.run.dir=<run dir>, or a checkpoint file with ckpt_path=<file>."
            )
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt!r}: no such checkpoint file.")
    return ckpt


def _read_checkpoint(path: str) -> dict:
    """A Lightning checkpoint (memory-mapped, tensors only), or a clear error naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # zip, pickle and EOF errors all mean the file is unusable
        raise CheckpointError(
            f"Cannot read the checkpoint '{path}': {err}. It is truncated or corrupt; resume from another checkpoint "
            "(ckpt_path=<file>) in the same checkpoints/ directory."
        ) from err


def _check_precision(trainer_cfg: DictConfig) -> None:
    """Lightning turns fp16 mixed precision on a CPU into bf16 with a warning, while the saved config keeps saying
    16-mixed: refuse it instead."""
    precision = str(trainer_cfg.get("precision"))
    accelerator = str(trainer_cfg.get("accelerator"))
    on_cpu = accelerator == "cpu" or (accelerator in ("auto", "None") and not torch.cuda.is_available())
    if on_cpu and precision in ("16-mixed", "16"):
        raise ValueError(
            f"trainer.precision={precision} (fp16 autocast) needs a GPU; on a CPU use trainer.precision=bf16-mixed "
            "or 32-true, or run on a GPU with trainer=gpu."
        )


def _finish_wandb(loggers: list, failed: bool) -> None:
    """End the wandb run now, in wandb's quiet mode, rather than at exit (where wandb prints its banner with raw
    ANSI codes), so the summary or error line is the run's last word and the next job of a sweep starts its own."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.finish(failed)


def _end_distributed(environ: dict[str, str]) -> None:
    """Leave the process as it was before fit (no process group, no DDP variables), so the next job of a sweep in
    this same process starts its own DDP world instead of joining the finished one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key in set(os.environ) - set(environ):
        del os.environ[key]
    os.environ.update(environ)


def train(cfg: DictConfig) -> dict[str, float]:
    """Run PPO as configured; returns the final metrics (``env/reward_mean``, ``objective/kl``, ...). The run holds
    its dir (``rundir.own_run_dir``) from start to end."""
    output_dir = Path(cfg.paths.output_dir)
    with own_run_dir(output_dir):
        return _train(cfg, output_dir)


def _resume(cfg: DictConfig, ckpt_path: str, output_dir: Path) -> tuple[DictConfig, list[str], int]:
    """The config of a resume (the run's own, from its checkpoint, with this command's overrides on top), all the
    overrides behind it, and the PPO step it resumes at."""
    checkpoint = _read_checkpoint(ckpt_path)
    saved, resume_step = checkpoint.get(RUN_CONFIG_KEY), int(checkpoint["epoch"]) + 1
    del checkpoint  # memory-mapped: Lightning reads it again in fit
    if saved is None:  # not written by python train.py: the command line's config is all there is
        return cfg, command_overrides(cfg), resume_step
    cfg, overrides = resumed_config(cfg, saved, f"ckpt_path={cfg.ckpt_path}")
    return cfg, overrides, resume_step


def _finished_metrics(output_dir: Path) -> dict[str, float]:
    """The final metrics a finished run wrote (read only), {} when it wrote none."""
    try:
        return json.loads((output_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def _train(cfg: DictConfig, output_dir: Path) -> dict[str, float]:
    ckpt_path = _resolve_ckpt_path(cfg, output_dir)
    overrides, resume_step = command_overrides(cfg), None
    if ckpt_path is not None:
        cfg, overrides, resume_step = _resume(cfg, ckpt_path, output_dir)
        if resume_step >= cfg.ppo.steps:
            print(f"Nothing to do: {ckpt_path} ends at PPO step {resume_step} of ppo.steps={cfg.ppo.steps} (raise "
                  f"ppo.steps to train on); {output_dir} is unchanged.", flush=True)
            return _finished_metrics(output_dir)
    check_group_keys(cfg)
    ppo = as_ppo_config(cfg.ppo)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    source = resolve_model_source(model_cfg)  # checked and its config read once for the whole run
    ref = _instantiate(cfg.ref)
    if "stage_3" in str(cfg.trainer.get("strategy")) and ref.mode != "peft":
        raise ValueError(
            f"ref.mode={ref.mode} cannot be built under DeepSpeed ZeRO-3 (the policy's weights are sharded); "
            "use ref=peft with peft=lora, or trainer=deepspeed (ZeRO-2)."
        )
    _check_reference(model_cfg, source.config, ref)
    _check_precision(cfg.trainer)
    for key in ("save_pretrained_dir", "save_critic_dir"):
        if cfg.get(key):
            check_writable_dir(cfg[key], key)
    check_reward_targets(cfg.reward)
    reward = _instantiate(cfg.reward)
    if isinstance(reward, RewardAdapter) and not cfg.peft:
        raise ValueError(
            "reward=adapter loads the reward LoRA as a second adapter of the policy, so the policy needs adapters "
            "too: add peft=lora (and ref=peft to use the bare base as the reference)."
        )
    tokenizer = build_tokenizer(model_cfg)
    module = PPOModule(
        policy=source,
        tokenizer=tokenizer,
        reward=reward,
        ppo=ppo,
        head=cfg.head,
        critic=cfg.critic,
        peft=_instantiate(cfg.peft) if cfg.peft else None,
        ref=ref,
        optimizer=_instantiate(cfg.optimizer) if cfg.get("optimizer") else None,
        scheduler=_instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        sample_table_every=cfg.sample_table_every,
    )
    datamodule = _instantiate(cfg.data, tokenizer=tokenizer)
    datamodule.prepare_for(module)  # over-long or empty prompts fail here, before any model is built
    module.check_reward(datamodule.prompts)

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    loggers = _instantiate_dict(cfg.get("logger"))
    if resume_step is not None:
        for logger in loggers:
            if isinstance(logger, CSVLogger):
                logger.keep_before_step = resume_step
    summary = RunSummary()
    callbacks = _instantiate_dict(cfg.get("callbacks")) + [summary, SaveRunConfig(plain(cfg), overrides)]
    if cfg.get("save_pretrained_dir"):
        callbacks.append(SavePretrained(cfg.save_pretrained_dir, cfg.get("save_critic_dir")))
    trainer_cfg = cfg.trainer
    if cfg.critic.get("warmup_steps") and trainer_cfg.get("strategy") == "ddp":
        # a warm-up step trains the value function only: DDP must let the held policy's parameters go unused
        trainer_cfg = OmegaConf.merge(trainer_cfg, {"strategy": "ddp_find_unused_parameters_true"})
    trainer: L.Trainer = _instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:  # written with the first PPO step's metrics (lit_vhead.loggers)
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    if resume_step is not None and trainer.is_global_zero:
        write_run_config(output_dir, cfg, overrides)

    environ, failed = dict(os.environ), True
    try:
        with warnings.catch_warnings(), ddp_children_of_this_job():
            if ckpt_path is not None:  # resuming into the run's own checkpoints/ is the point, not a mistake
                warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        failed = False
    finally:
        _end_distributed(environ)
        _finish_wandb(loggers, failed)

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if trainer.is_global_zero:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
        if cfg.get("save_pretrained_dir"):
            if not Path(cfg.save_pretrained_dir).is_relative_to(output_dir):
                print(f"Saved the trained policy (value head included) to {cfg.save_pretrained_dir}")
        if cfg.get("plot") and (output_dir / "csv" / "metrics.csv").is_file():
            from lit_vhead.plot import plot_run

            plot_run(output_dir)
        print(summary.line(output_dir), flush=True)
    return metrics


def metric_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The value Hydra sweepers optimise (``optimized_metric``)."""
    if not name:
        return None
    if name not in metrics:
        raise ValueError(f"optimized_metric={name!r} was not logged; logged metrics: {sorted(metrics)}.")
    return metrics[name]


def _print_library_log() -> None:
    """lit_vhead's own info lines (e.g. which GEMM path ``cpu_kernels=auto`` chose) go to the console, once: on the
    first process of the machine."""
    logger = logging.getLogger("lit_vhead")
    if logger.handlers or int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # printed here, not again by a root handler


def main(cfg: DictConfig) -> float | None:
    """The CLI: run ``train``; a user error prints one line (``LIT_VHEAD_TRACEBACK=1`` shows the traceback) and
    leaves no empty run dir behind (nor touches one that another run holds). A resume with nothing to do returns
    the finished run's metric (None if it has none) and exits 0."""
    _print_library_log()
    try:
        with quiet():
            metrics = train(cfg)
        return metric_value(metrics, cfg.get("optimized_metric")) if metrics else None
    except USER_ERRORS as err:
        if not isinstance(err, RunDirBusyError):
            remove_if_empty(cfg.paths.output_dir)
        if os.environ.get("LIT_VHEAD_TRACEBACK"):
            raise
        print(f"Error: {err}", flush=True)
        raise SystemExit(1) from None
