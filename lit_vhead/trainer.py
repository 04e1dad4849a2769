"""``PPOTrainer``: TRL classic's (0.11.4) loop API on Lightning Fabric, around the one PPO core.

A classic script keeps its loop and changes its imports::

    from lit_vhead import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
    from lit_vhead.core import LengthSampler

    ppo_trainer = PPOTrainer(config, model, ref_model, tokenizer, dataset=dataset, data_collator=collator)
    for batch in ppo_trainer.dataloader:
        responses = ppo_trainer.generate(batch["input_ids"], return_prompt=False, **generation_kwargs)
        rewards = [torch.tensor(score(q, r)) for q, r in zip(batch["query"], responses)]   # any environment
        stats = ppo_trainer.step(batch["input_ids"], responses, rewards)
        ppo_trainer.log_stats(stats, batch, rewards)

``step`` lays the ragged queries and responses out as a :class:`~lit_vhead.rollout.Rollout` and hands it to
:class:`~lit_vhead.ppo.core.PPOCore` (the code ``PPOModule`` runs too); with the same weights and inputs it gives
TRL 0.11.4's updated weights and statistics (``tests/test_ppo_trainer.py``). Devices, precision and DDP come from
Fabric (``PPOConfig.accelerator_kwargs``); under ``torchrun`` every rank trains on its own batch and advantages are
whitened over all ranks. What TRL got wrong and this does not copy:

- left-padded causal batches get ``position_ids`` from the attention mask (trl#469: TRL shifted every left-padded row);
- seq2seq: the first generated token is trained too (TRL's mask dropped it);
- ``use_score_scaling`` works (TRL 0.11.4's ``step`` raised ``AttributeError`` on it); ``max_grad_norm`` clips on
  every update (TRL's parameter filter was exhausted after the first);
- the negative-KL warning names the configured estimator (trl#1161); ``save_pretrained`` writes the value head of PEFT
  models as safetensors (trl#2707); ``save_state``/``load_state`` resume exactly (trl#1643).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.strategies import SingleDeviceStrategy
from torch.utils.data import DataLoader, Dataset

from lit_vhead.atomic import atomic_directory
from lit_vhead.builders import check_tokenizer
from lit_vhead.config import PPOConfig, as_ppo_config
from lit_vhead.core import convert_to_scalar, set_seed
from lit_vhead.data import pad_queries
from lit_vhead.kernels import fast_kernels
from lit_vhead.modeling import PreTrainedModelWrapper
from lit_vhead.ppo.core import Engine, PPOCore, StepOutput, default_optimizer
from lit_vhead.reference import Reference, ReferenceConfig
from lit_vhead.rollout import Rollout

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


@contextlib.contextmanager
def _released_after(tensor: torch.Tensor, timeout: float = 1.0) -> Iterator[None]:
    """Leave the block only once ``tensor`` has as many Python references as on entry (at most ``timeout`` s later):
    gloo's worker thread frees a finished collective's work, and with it its hold on the tensor, a moment after the
    caller's ``wait`` returns."""
    references = sys.getrefcount(tensor)
    yield
    deadline = time.monotonic() + timeout
    while sys.getrefcount(tensor) > references and time.monotonic() < deadline:
        time.sleep(1e-4)


class Accelerator:
    """The parts of accelerate's ``Accelerator`` that classic scripts touch, answered by Lightning Fabric."""

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
    def is_local_main_process(self) -> bool:
        return self.fabric.local_rank == 0

    @property
    def num_processes(self) -> int:
        return self.fabric.world_size

    @property
    def process_index(self) -> int:
        return self.fabric.global_rank

    @property
    def local_process_index(self) -> int:
        return self.fabric.local_rank

    @property
    def use_distributed(self) -> bool:
        return self.fabric.world_size > 1

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
            with _released_after(self._barrier_tensor):
                torch.distributed.all_reduce(self._barrier_tensor)
        else:
            self.fabric.barrier()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` concatenated along dim 0 (0-d tensors become one entry each)."""
        tensor = torch.as_tensor(tensor, device=self.device)
        if self.fabric.world_size == 1:
            return tensor.reshape(-1) if tensor.ndim == 0 else tensor
        tensor = tensor.reshape(1) if tensor.ndim == 0 else tensor
        with _released_after(tensor) if self._gloo() else contextlib.nullcontext():  # see wait_for_everyone
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

    def autocast(self):
        return self.fabric.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.fabric.backward(loss)

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


class PPOTrainer:
    """TRL 0.11.4's ``PPOTrainer`` API on Lightning Fabric; everything after the rollout is :class:`PPOCore`.

    Args (TRL's):
        config: a :class:`~lit_vhead.config.PPOConfig` (TRL's field names).
        model: the policy, a value-head model (``AutoModelFor{CausalLM,Seq2SeqLM}WithValueHead``, PEFT or not).
        ref_model: the frozen reference; None makes a frozen copy (with ``num_shared_layers`` lower layers shared)
            or, for a PEFT policy, uses the policy with its adapters disabled (no second model).
        tokenizer: the policy's tokenizer (it needs a pad token).
        dataset: a torch or ``datasets`` dataset; ``.dataloader`` then draws ``batch_size`` rows per batch.
        optimizer: default ``Adam(lr=config.learning_rate)`` over the trainable parameters.
        data_collator: the ``collate_fn`` of ``.dataloader``.
        num_shared_layers: layers the default reference shares with the policy (frozen in both).
        lr_scheduler: stepped once per ``step``.
        training_data_collator: accepted for TRL compatibility; not needed (queries are padded left, responses right,
            with ``position_ids`` from the mask).
    """

    def __init__(
        self,
        config: PPOConfig | None = None,
        model: PreTrainedModelWrapper | None = None,
        ref_model: PreTrainedModelWrapper | None = None,
        tokenizer: Any = None,
        dataset: Dataset | Any | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        data_collator: Callable | None = None,
        num_shared_layers: int | None = None,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        training_data_collator: Callable | None = None,
    ) -> None:
        self.config = config = as_ppo_config(config)
        set_seed(config.seed)  # as TRL: minibatch permutations and LengthSampler draw from numpy's global generator
        self.tokenizer = check_tokenizer(tokenizer)
        policy = unwrap(model)
        if not isinstance(policy, PreTrainedModelWrapper):
            raise TypeError(
                "model must be a lit_vhead value-head model (AutoModelForCausalLMWithValueHead or "
                f"AutoModelForSeq2SeqLMWithValueHead), got {type(model).__name__}; load it with "
                "lit_vhead.AutoModelForCausalLMWithValueHead.from_pretrained(...) (TRL checkpoints load unchanged)."
            )
        if ref_model is not None and unwrap(ref_model) is policy:
            raise ValueError("ref_model is the policy itself; pass None for a frozen copy, or a separate model.")
        if ref_model is not None and not isinstance(unwrap(ref_model), PreTrainedModelWrapper):
            raise TypeError(
                f"ref_model must be a lit_vhead value-head model like the policy, got {type(ref_model).__name__}; "
                "or pass None for a frozen copy of the policy."
            )
        if lr_scheduler is not None and not isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler):
            raise TypeError(f"lr_scheduler must be a torch LRScheduler, got {type(lr_scheduler).__name__}.")
        if training_data_collator is not None:
            warnings.warn(
                "training_data_collator is not used: PPOTrainer pads queries on the left and responses on the right "
                "itself, with position_ids from the attention mask.",
                stacklevel=2,
            )
        self.fabric = L.Fabric(**fabric_arguments(config.accelerator_kwargs), loggers=build_loggers(config))
        self.fabric.launch()
        self.accelerator = Accelerator(self.fabric)
        config.set_world_size(self.fabric.world_size)
        self.is_distributed = self.fabric.world_size > 1
        self.is_encoder_decoder = bool(getattr(policy.config, "is_encoder_decoder", False))
        self.is_peft_model = bool(policy.is_peft_model)
        config.is_encoder_decoder, config.is_peft_model = self.is_encoder_decoder, self.is_peft_model

        self.reference = self._build_reference(policy, ref_model, num_shared_layers)
        self.ref_model = None if self.reference.mode == "peft" else self.reference.model
        if config.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
        if optimizer is None:
            optimizer = default_optimizer(config.learning_rate)([p for p in policy.parameters() if p.requires_grad])
        self._wrapped, self.optimizer = self.fabric.setup(policy, optimizer)
        self._wrapped.mark_forward_method("forward_with_values")  # DDP's gradient hooks see the PPO forward
        self.model = policy
        policy.v_head.float()  # values and losses in fp32 under any precision
        self.reference.follow(policy)
        self.lr_scheduler = lr_scheduler
        self.core = PPOCore(config)
        self.core.stats.to(self.fabric.device)
        self.current_device = self.fabric.device
        self.current_step = 0  # log_stats calls (TRL's name); the loggers' step
        self.steps_done = 0  # PPO steps taken

        self.dataset = dataset
        self._signature_columns: list[str] | None = None
        if dataset is not None:
            self.dataloader = self.prepare_dataloader(dataset, data_collator)
        else:
            warnings.warn(
                "No dataset is provided. Make sure to set config.batch_size to the correct value before training.",
                UserWarning,
                stacklevel=2,
            )
            self.dataloader = None
        self._log_config()

    # ------------------------------------------------------------------ set-up
    def _build_reference(self, policy: PreTrainedModelWrapper, ref_model: Any, num_shared_layers: int | None):
        if ref_model is not None:
            if num_shared_layers is not None:
                warnings.warn(
                    "num_shared_layers is ignored when ref_model is provided: the two models share no layers.",
                    UserWarning,
                    stacklevel=3,
                )
            return Reference.from_model(unwrap(ref_model))
        if policy.is_peft_model:
            return ReferenceConfig(mode="peft").build(policy)
        mode = "copy" if num_shared_layers is None else "shared"
        return ReferenceConfig(mode=mode, num_shared_layers=num_shared_layers).build(policy)

    def _log_config(self) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in self.fabric.loggers:
            flat = self.config.to_dict()
            logger.log_hyperparams(flat if isinstance(logger, TensorBoardLogger) else {"trl_ppo_trainer_config": flat})

    def prepare_dataloader(self, dataset: Any, data_collator: Callable | None = None) -> Any:
        """A shuffled loader of ``batch_size`` rows (last partial batch dropped), distributed over the processes."""
        try:
            import datasets
        except ImportError:  # pragma: no cover - datasets is optional
            datasets = None
        if datasets is not None and isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset)
        loader = DataLoader(
            dataset, batch_size=self.config.batch_size, collate_fn=data_collator, shuffle=True, drop_last=True
        )
        return self.fabric.setup_dataloaders(loader)

    def _remove_unused_columns(self, dataset: Any) -> Any:
        """TRL's column filter: keep the model's forward arguments plus ``label``, ``query`` and ``response``."""
        if not self.config.remove_unused_columns:
            return dataset
        if self._signature_columns is None:
            self._signature_columns = [*inspect.signature(self.model.forward).parameters, "label", "query", "response"]
        return dataset.remove_columns([c for c in dataset.column_names if c not in self._signature_columns])

    @property
    def kl_ctl(self):
        """The KL controller (``kl_ctl.value`` is the current KL coefficient)."""
        return self.core.kl_ctl

    @property
    def running(self):
        """The running score moments of ``use_score_scaling`` (TRL's name)."""
        return self.core.score_moments

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        query_tensor: torch.Tensor | list[torch.Tensor],
        length_sampler: Callable[[], int] | None = None,
        batch_size: int = 4,
        return_prompt: bool = True,
        generate_ref_response: bool = False,
        **generation_kwargs: Any,
    ):
        """Sample responses, as TRL: one 1-D query gives a ``[1, L]`` tensor; a list of queries gives a list of 1-D
        tensors, generated ``batch_size`` at a time (left-padded), each cut after its first EOS (kept). With
        ``return_prompt=False`` causal outputs hold only the new tokens; seq2seq outputs are the decoder tokens,
        starting with the decoder start token (what ``step`` expects). ``generate_ref_response=True`` also returns
        the reference model's responses. Dropout is off while sampling."""
        if isinstance(query_tensor, list):
            run = lambda model: self._generate_batched(  # noqa: E731
                model, query_tensor, length_sampler, batch_size, return_prompt, **generation_kwargs
            )
        else:
            if query_tensor.ndim != 1:
                raise ValueError(
                    "query_tensor must be a tensor of shape (seq_len) or a list of such tensors, got shape "
                    f"{tuple(query_tensor.shape)}."
                )
            if length_sampler is not None:
                generation_kwargs["max_new_tokens"] = length_sampler()
            run = lambda model: self._generate_one(model, query_tensor, return_prompt, **generation_kwargs)  # noqa: E731
        response = self._sampling(self.model, run)
        if not generate_ref_response:
            return response
        if self.reference.mode == "peft":
            with self.reference.context():
                return response, self._sampling(self.model, run)
        return response, self._sampling(self.reference.model, run)

    def _sampling(self, model: torch.nn.Module, run: Callable) -> Any:
        was_training = model.training
        model.eval()
        try:
            with self.fabric.autocast(), fast_kernels(unwrap(model), enabled=self.config.cpu_kernels):
                return run(model)
        finally:
            model.train(was_training)

    def _generate_one(self, model: Any, query: torch.Tensor, return_prompt: bool, **kwargs: Any) -> torch.Tensor:
        input_ids = query.to(self.current_device).unsqueeze(0)
        response = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        if not return_prompt and not self.is_encoder_decoder:
            response = response[:, query.shape[0] :]
        return response

    def _generate_batched(self, model: Any, queries: list[torch.Tensor], length_sampler: Callable | None,
                          batch_size: int, return_prompt: bool, **kwargs: Any) -> list[torch.Tensor]:
        outputs = []
        eos = self.tokenizer.eos_token_id
        side = "right" if self.is_encoder_decoder else "left"
        batch_size = min(len(queries), batch_size)
        for begin in range(0, len(queries), batch_size):
            if length_sampler is not None:
                kwargs["max_new_tokens"] = length_sampler()
            batch = [q.tolist() for q in queries[begin : begin + batch_size]]
            padded = pad_queries(batch, self.tokenizer.pad_token_id, side)
            input_ids = padded["query_ids"].to(self.current_device)
            mask = padded["query_mask"].to(self.current_device)
            generations = model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
            width = input_ids.shape[1]
            for query, generation in zip(batch, generations):
                if self.is_encoder_decoder:
                    prompt, new = generation[:0], generation
                else:
                    prompt, new = generation[width - len(query) : width], generation[width:]
                if eos is not None and (new == eos).any():
                    new = new[: int((new == eos).nonzero()[0, 0]) + 1]  # keep the EOS
                outputs.append(torch.cat([prompt, new]) if return_prompt else new)
        return outputs

    # ------------------------------------------------------------------ one PPO step
    def step(
        self,
        queries: list[torch.Tensor],
        responses: list[torch.Tensor],
        scores: list[torch.Tensor],
        response_masks: list[torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """One PPO update on ``batch_size`` (query, response, score) triples; returns TRL's statistics.

        ``queries``/``responses``: lists of 1-D token tensors (no padding; seq2seq responses start with the decoder
        start token, as ``generate`` returns them); ``scores``: one 0-d tensor (or float) per sample;
        ``response_masks``: optional 1-D 0/1 tensors, 0 on response tokens that must not be trained (e.g. tool
        output). Everything after this layout is :meth:`PPOCore.step`.
        """
        rollout, raw_scores = self._rollout(queries, responses, scores, response_masks)
        engine = Engine(
            model=self._wrapped,
            policy=self.model,
            reference=self.reference,
            optimizer=self.optimizer,
            backward=self.fabric.backward,
            clip_gradients=lambda max_norm: self.fabric.clip_gradients(self._wrapped, self.optimizer,
                                                                       max_norm=max_norm),
            order=lambda n: np.random.permutation(n),  # TRL's draw: same seed, same minibatches
            scheduler=self.lr_scheduler,
            temperature=1.0,  # TRL classic scores the sampled tokens under the untempered policy
            local_gradients=isinstance(self.fabric.strategy, SingleDeviceStrategy)
            and getattr(self.fabric.strategy.precision, "scaler", None) is None,
        )
        with self.fabric.autocast():
            output = self.core.step(engine, rollout, raw_scores, self.tokenizer.eos_token_id, self.steps_done)
        self.model.train()  # as TRL leaves it
        self.steps_done += 1
        stats = self._trl_stats(output, queries, responses)
        return stats if self.config.log_with == "wandb" else convert_to_scalar(stats)

    def _rollout(self, queries: Sequence, responses: Sequence, scores: Sequence,
                 response_masks: Sequence | None) -> tuple[Rollout, torch.Tensor]:
        """Check the inputs (TRL's rules, clearer errors) and lay them out: queries left-padded (right for an
        encoder), responses right-padded."""
        batch_size = self.config.batch_size
        named = [("queries", queries), ("responses", responses), ("scores", scores)]
        if response_masks is not None:
            named.append(("response_masks", response_masks))
        for name, values in named:
            if not isinstance(values, (list, tuple)):
                raise ValueError(f"{name} must be a list of tensors, got {type(values).__name__}.")
            if len(values) != batch_size:
                raise ValueError(
                    f"{name} has {len(values)} entries but PPOConfig.batch_size={batch_size}: pass exactly "
                    "batch_size samples to step(), or set PPOConfig(batch_size=...) to your batch size."
                )
        for name, values in named[:2]:
            for i, value in enumerate(values):
                if not isinstance(value, torch.Tensor) or value.ndim != 1 or value.numel() == 0:
                    raise ValueError(f"{name}[{i}] must be a non-empty 1-D tensor of token ids, got {value!r}.")
        score_list = []
        for i, score in enumerate(scores):
            score = torch.as_tensor(score, dtype=torch.float32)
            if score.numel() != 1 or score.ndim > 1:
                raise ValueError(f"scores[{i}] must be one number per sample, got shape {tuple(score.shape)}.")
            score_list.append(score.reshape(()))
        pad_id = self.tokenizer.pad_token_id
        response_lists = [r.tolist() for r in responses]
        decoder_start = None
        if self.is_encoder_decoder:
            start_id = self.model.config.decoder_start_token_id
            for i, response in enumerate(response_lists):
                if len(response) < 2 or (start_id is not None and response[0] != start_id):
                    raise ValueError(
                        f"responses[{i}] of a seq2seq policy must start with the decoder start token (id {start_id}) "
                        "and hold at least one generated token, as PPOTrainer.generate/model.generate return them; "
                        f"got {response[:4]}..."
                    )
            decoder_start = torch.tensor([[r[0]] for r in response_lists])
            response_lists = [r[1:] for r in response_lists]
        query = pad_queries([q.tolist() for q in queries], pad_id, "right" if self.is_encoder_decoder else "left")
        response = pad_queries(response_lists, pad_id, "right")
        mask = response["query_mask"]
        if response_masks is not None:
            for i, (given, length) in enumerate(zip(response_masks, map(len, responses))):
                if torch.as_tensor(given).numel() != length:
                    raise ValueError(f"response_masks[{i}] has {torch.as_tensor(given).numel()} entries and "
                                     f"responses[{i}] {length}: give one mask value per response token.")
            given = [torch.as_tensor(m).long().tolist()[1 if self.is_encoder_decoder else 0 :] for m in response_masks]
            mask = mask * pad_queries(given, 0, "right")["query_ids"]
        device = self.current_device
        rollout = Rollout(
            query["query_ids"].to(device), query["query_mask"].to(device), response["query_ids"].to(device),
            mask.to(device), None if decoder_start is None else decoder_start.to(device),
        )
        return rollout, torch.stack(score_list).to(device)

    def _trl_stats(self, output: StepOutput, queries: Sequence, responses: Sequence) -> dict[str, Any]:
        """The core's statistics (reduced over processes) plus TRL's per-sample arrays and ``tokens/*_len_std`` (this
        process's batch, as in TRL; the arrays become histograms in wandb)."""
        stats: dict[str, Any] = dict(output.stats)
        rollout = output.rollout
        mask = rollout.response_mask.bool()
        query_lens = torch.tensor([len(q) for q in queries], dtype=torch.float)
        response_lens = torch.tensor([len(r) for r in responses], dtype=torch.float)
        arrays = {
            "objective/kl_dist": (output.kls * mask).sum(1),
            "objective/logprobs": rollout.logprobs[mask],
            "objective/ref_logprobs": rollout.ref_logprobs[mask],
            "ppo/policy/advantages": output.advantages[mask],
            "ppo/policy/ratio": output.ratios,
            "tokens/queries_dist": query_lens,
            "tokens/responses_dist": response_lens,
        }
        stats.update({key: value.detach().float().cpu().numpy() for key, value in arrays.items()})
        stats["tokens/queries_len_std"] = float(query_lens.std())
        stats["tokens/responses_len_std"] = float(response_lens.std())
        return stats

    # ------------------------------------------------------------------ logging
    def log_stats(
        self,
        stats: dict[str, Any],
        batch: dict[str, Any],
        rewards: Sequence[torch.Tensor] | torch.Tensor,
        columns_to_log: Iterable[str] = ("query", "response"),
    ) -> None:
        """Log ``stats`` plus ``env/reward_{mean,std,dist}`` of every process's ``rewards``; with wandb also a
        ``game_log`` table of ``columns_to_log`` and the rewards. Call it on every process."""
        columns_to_log = list(columns_to_log)
        if not isinstance(rewards, torch.Tensor):
            rewards = torch.tensor([float(r) for r in rewards])
        rewards = self.accelerator.gather(rewards.float().to(self.current_device)).flatten()
        rows = None
        if self.config.log_with == "wandb":
            missing = [c for c in columns_to_log if c not in batch]
            if missing:
                raise ValueError(f"Columns to log {columns_to_log} are not present in the batch {list(batch)}.")
            columns = [list(batch[c]) for c in columns_to_log]
            if self.is_distributed:
                columns = [_gather_objects(c) for c in columns]
            rows = [[*row, reward] for row, reward in zip(zip(*columns), rewards.cpu().tolist())]
        if self.accelerator.is_main_process:
            logs: dict[str, Any] = {}
            if "query" not in batch and "response" not in batch:
                warnings.warn(
                    "The game logs will not be logged because the batch does not contain the keys 'query' and "
                    "'response'.",
                    stacklevel=2,
                )
            elif rows is not None:
                import wandb

                logs["game_log"] = wandb.Table(columns=[*columns_to_log, "reward"], rows=rows)
            logs.update(stats)
            logs["env/reward_mean"] = float(rewards.mean())
            logs["env/reward_std"] = float(rewards.std()) if rewards.numel() > 1 else math.nan
            logs["env/reward_dist"] = rewards.cpu().numpy()
            self.accelerator.log(logs, step=self.current_step)
        self.current_step += 1

    # ------------------------------------------------------------------ saving and resuming
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """The policy (value head included, also for PEFT) and the tokenizer, written atomically by the main
        process."""
        if self.accelerator.is_main_process:
            self.model.save_pretrained(save_directory, **kwargs)
            self.tokenizer.save_pretrained(save_directory)
        self.accelerator.wait_for_everyone()

    def save_state(self, directory: str | os.PathLike) -> None:
        """Everything ``step`` needs to continue exactly: trainable weights (safetensors), optimizer, scheduler, KL
        coefficient, running score moments, step counters and every process's random generators (trl#1643)."""
        self._check_state_support()
        from safetensors.torch import save_file

        rng = _gather_objects([_rng_state()])
        if self.accelerator.is_main_process:
            with atomic_directory(directory) as tmp:
                weights = {name: p.detach().contiguous().cpu() for name, p in self._trainable()}
                save_file(weights, os.path.join(tmp, STATE_WEIGHTS), metadata={"format": "pt"})
                torch.save(
                    {
                        "optimizer": self.optimizer.state_dict(),
                        "lr_scheduler": None if self.lr_scheduler is None else self.lr_scheduler.state_dict(),
                        "core": self.core.state_dict(),
                        "current_step": self.current_step,
                        "steps_done": self.steps_done,
                        "rng": rng,
                    },
                    os.path.join(tmp, STATE_FILE),
                )
        self.accelerator.wait_for_everyone()

    def load_state(self, directory: str | os.PathLike) -> None:
        """Restore what :meth:`save_state` wrote into this trainer (same model, optimizer and PEFT settings)."""
        self._check_state_support()
        from safetensors.torch import load_file

        weights_path, state_path = os.path.join(directory, STATE_WEIGHTS), os.path.join(directory, STATE_FILE)
        if not (os.path.isfile(weights_path) and os.path.isfile(state_path)):
            raise FileNotFoundError(f"{directory} holds no PPOTrainer state ({STATE_WEIGHTS}, {STATE_FILE}); write one "
                                    "with PPOTrainer.save_state(dir).")
        weights = load_file(weights_path)
        own = dict(self._trainable())
        if set(weights) != set(own) or any(weights[k].shape != own[k].shape for k in own):
            differ = sorted(set(weights) ^ set(own)) or [k for k in own if weights[k].shape != own[k].shape]
            raise ValueError(
                f"The state in {directory} was saved from another model or PEFT config ({differ[:3]} differ): load it "
                "into a trainer built the same way as the one that saved it."
            )
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for name, param in own.items():
                param.copy_(weights[name])
        self.optimizer.load_state_dict(state["optimizer"])
        if (state["lr_scheduler"] is None) != (self.lr_scheduler is None):
            raise ValueError("The saved state and this trainer disagree on having an lr_scheduler.")
        if self.lr_scheduler is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.core.load_state_dict(state["core"])
        self.current_step, self.steps_done = state["current_step"], state["steps_done"]
        rng = state["rng"]
        if len(rng) == self.fabric.world_size:
            _set_rng_state(rng[self.fabric.global_rank])
        else:
            warnings.warn(
                f"The state was saved by {len(rng)} processes and is loaded by {self.fabric.world_size}: random "
                "generators are not restored, so sampling will not continue the saved run's sequence.",
                stacklevel=2,
            )

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    def _check_state_support(self) -> None:
        strategy = type(self.fabric.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            raise NotImplementedError(
                f"save_state/load_state support single-device and DDP runs, not {strategy} (sharded states)."
            )


def _gather_objects(values: list) -> list:
    """The concatenation of every process's list (``accelerate.utils.gather_object``)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(values)
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, list(values))
    return [item for part in gathered for item in part]


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


__all__ = ["Accelerator", "PPOTrainer", "fabric_arguments"]
