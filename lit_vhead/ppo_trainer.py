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

``step`` checks its inputs (``_step_safety_checker``), lays them out (``prepare_model_inputs``) and hands them to
:class:`~lit_vhead.ppo.engine.PPOCore` (the code ``PPOModule`` runs too), with this trainer as the core's
:class:`~lit_vhead.ppo.stages.PPOStages`: the core calls back ``batched_forward_pass``, ``compute_rewards``
(``_kl_penalty``), ``compute_advantages``, ``loss``, ``_early_stop``, ``record_step_stats`` and ``gather_stats``, so a
subclass that overrides one changes what ``step`` does, as in TRL. With the same weights and inputs it gives TRL
0.11.4's updated weights and statistics (``tests/test_ppo_trainer.py``). Devices, precision and DDP come from Fabric
(``PPOConfig.accelerator_kwargs``); under ``torchrun`` every rank trains on its own batch and advantages are whitened
over all ranks. What TRL got wrong and this does not copy:

- left-padded causal batches get ``position_ids`` from the attention mask (trl#469: TRL shifted every left-padded row);
- seq2seq: the first generated token is trained too (TRL's mask dropped it);
- ``use_score_scaling`` works (TRL 0.11.4's ``step`` raised ``AttributeError`` on it); ``max_grad_norm`` clips on
  every update (TRL's parameter filter was exhausted after the first); ``whiten_rewards`` with ``response_masks``
  keeps masked tokens at zero reward (TRL's whitened rewards leaked into them, and GAE carried them on);
- the negative-KL warning names the configured estimator (trl#1161); ``save_pretrained`` writes the value head of PEFT
  models as safetensors (trl#2707); ``save_state``/``load_state`` resume exactly (trl#1643).
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.strategies import SingleDeviceStrategy
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lit_vhead.accelerator import (
    AcceleratedScheduler,
    Accelerator,
    build_loggers,
    fabric_arguments,
    gather_objects,
    unwrap,
)
from lit_vhead.config import PPOConfig, as_ppo_config
from lit_vhead.core import convert_to_scalar, set_seed, stats_to_np
from lit_vhead.kernels import fast_kernels
from lit_vhead.modeling import PreTrainedModelWrapper
from lit_vhead.ppo.engine import Engine, PPOCore, default_optimizer
from lit_vhead.ppo.stages import PPOStages, training_compiled
from lit_vhead.reference import Reference, ReferenceConfig
from lit_vhead.rollout import Rollout, forward_window
from lit_vhead.sequence import pad_sequences, position_ids_from_mask
from lit_vhead.trainer_state import load_trainer_state, save_trainer_state


class PPOTrainer(PPOStages):
    """TRL 0.11.4's ``PPOTrainer`` API on Lightning Fabric; everything after the rollout is :class:`PPOCore`.

    Args (TRL's):
        config: a :class:`~lit_vhead.config.PPOConfig` (TRL's field names).
        model: the policy, a value-head model (``AutoModelFor{CausalLM,Seq2SeqLM}WithValueHead``, PEFT or not).
        ref_model: the frozen reference; None makes a frozen copy (with ``num_shared_layers`` lower layers shared)
            or, for a PEFT policy, uses the policy with its adapters disabled (no second model).
        tokenizer: the policy's tokenizer. As in TRL it may get its pad token later (``tokenizer.pad_token =
            tokenizer.eos_token``); it needs one by the time sequences of different lengths are padded.
        dataset: a torch or ``datasets`` dataset; ``.dataloader`` then draws ``batch_size`` rows per batch.
        optimizer: default ``Adam(lr=config.learning_rate)`` over the trainable parameters.
        data_collator: the ``collate_fn`` of ``.dataloader``.
        num_shared_layers: layers the default reference shares with the policy (frozen in both).
        lr_scheduler: stepped once per ``step``; ``.lr_scheduler.scheduler`` is it (accelerate's wrapper).
        training_data_collator: accepted for TRL compatibility; not needed (``prepare_model_inputs`` pads).
    """

    def __init__(
        self,
        config: PPOConfig | None = None,
        model: PreTrainedModelWrapper | None = None,
        ref_model: PreTrainedModelWrapper | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        dataset: Dataset | Any | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        data_collator: Callable | None = None,
        num_shared_layers: int | None = None,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        training_data_collator: Callable | None = None,
    ) -> None:
        self.config = config = as_ppo_config(config)
        set_seed(config.seed)  # as TRL: minibatch permutations and LengthSampler draw from numpy's global generator
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}.")
        self.tokenizer = tokenizer
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
                "training_data_collator is not used: prepare_model_inputs pads queries on the left and responses on "
                "the right, with position_ids from the attention mask.",
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

        # Trunk reuse hands the policy pass's hidden states to the reference pass; a batched_forward_pass of a
        # subclass may run other passes in between, so the reference then runs in full.
        reuse_trunk = type(self).batched_forward_pass is PPOTrainer.batched_forward_pass
        self.reference = self._build_reference(policy, ref_model, num_shared_layers, reuse_trunk)
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
        self.lr_scheduler = None if lr_scheduler is None else AcceleratedScheduler(lr_scheduler)
        self.core = PPOCore(config)
        self.current_device = self.fabric.device
        self.current_step = 0  # log_stats calls (TRL's name); the loggers' step
        self.steps_done = 0  # PPO steps taken
        self._batch: tuple | None = None  # step's (queries, responses, model_inputs, response_masks) while it runs

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
    def _build_reference(self, policy: PreTrainedModelWrapper, ref_model: Any, num_shared_layers: int | None,
                         reuse_trunk: bool) -> Reference:
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
        return ReferenceConfig(mode=mode, num_shared_layers=num_shared_layers, reuse_trunk=reuse_trunk).build(policy)

    def _log_config(self) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in self.fabric.loggers:
            flat = self.config.to_dict()
            logger.log_hyperparams(flat if isinstance(logger, TensorBoardLogger) else {"trl_ppo_trainer_config": flat})

    def _filter_kwargs(self, kwargs: dict[str, Any], target_func: Callable) -> dict[str, Any]:
        """The entries of ``kwargs`` that ``target_func`` takes (TRL's helper)."""
        return {k: v for k, v in kwargs.items() if k in inspect.signature(target_func).parameters}

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

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = [*inspect.signature(self.model.forward).parameters, "label", "query", "response"]

    def _remove_unused_columns(self, dataset: Any) -> Any:
        """TRL's column filter: keep the model's forward arguments plus ``label``, ``query`` and ``response``."""
        if not self.config.remove_unused_columns:
            return dataset
        self._set_signature_columns_if_needed()
        return dataset.remove_columns([c for c in dataset.column_names if c not in self._signature_columns])

    @property
    def kl_ctl(self):
        """The KL controller (``kl_ctl.value`` is the current KL coefficient)."""
        return self.core.kl_ctl

    @property
    def running(self):
        """The running score moments of ``use_score_scaling`` (TRL's name)."""
        return self.core.score_moments

    def _pad_token_id(self, *groups: Sequence[Sequence], extra: int = 0) -> int:
        """The tokenizer's pad id, read when padding happens (TRL's tests set it after building the trainer);
        ``groups`` are padded to their longest member, plus ``extra`` columns."""
        pad = self.tokenizer.pad_token_id
        if pad is not None:
            return pad
        if not extra and all(len({len(x) for x in group}) <= 1 for group in groups):
            return 0  # nothing gets padded
        raise ValueError(
            f"The tokenizer ({type(self.tokenizer).__name__}) has no pad token, and these sequences need padding: "
            "set tokenizer.pad_token = tokenizer.eos_token (as TRL's examples do); padding is masked out everywhere."
        )

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
        tensors, generated ``batch_size`` at a time (left-padded; ``pad_to_multiple_of``), each cut after its first
        EOS (kept) unless ``remove_padding=False``. With ``return_prompt=False`` causal outputs hold only the new
        tokens; seq2seq outputs are the decoder tokens, starting with the decoder start token (what ``step``
        expects). ``generate_ref_response=True`` also returns the reference model's responses. Dropout is off while
        sampling."""
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
            for unpadded in ("remove_padding", "pad_to_multiple_of"):  # one unpadded query: nothing to remove
                generation_kwargs.pop(unpadded, None)
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

    def _generate_batched(self, model: Any, query_tensors: list[torch.Tensor], length_sampler: Callable | None = None,
                          batch_size: int = 4, return_prompt: bool = True, pad_to_multiple_of: int | None = None,
                          remove_padding: bool = True, **generation_kwargs: Any) -> list[torch.Tensor]:
        """TRL's batched sampling: ``batch_size`` queries at a time, padded (to a multiple of
        ``pad_to_multiple_of``), each output cut after its first generated EOS when ``remove_padding``."""
        outputs = []
        eos = self.tokenizer.eos_token_id
        side = "right" if self.is_encoder_decoder else "left"
        batch_size = min(len(query_tensors), batch_size)
        for begin in range(0, len(query_tensors), batch_size):
            if length_sampler is not None:
                generation_kwargs["max_new_tokens"] = length_sampler()
            batch = [q.tolist() for q in query_tensors[begin : begin + batch_size]]
            extra = (-max(map(len, batch))) % pad_to_multiple_of if pad_to_multiple_of else 0
            pad = self._pad_token_id(batch, extra=extra)
            ids, mask = pad_sequences(batch, pad, side)
            sides = (extra, 0) if side == "left" else (0, extra)
            input_ids = torch.nn.functional.pad(ids, sides, value=pad).to(self.current_device)
            mask = torch.nn.functional.pad(mask, sides, value=0).to(self.current_device)
            generations = model.generate(input_ids=input_ids, attention_mask=mask, **generation_kwargs)
            width = input_ids.shape[1]
            for query, generation in zip(batch, generations):
                if self.is_encoder_decoder:
                    prompt, new = generation[:0], generation
                else:
                    prompt, new = generation[width - len(query) : width], generation[width:]
                if remove_padding and eos is not None and (new == eos).any():
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
        """One PPO update on ``batch_size`` (query, response, score) triples; returns TRL's statistics (numpy arrays
        and floats with ``log_with="wandb"``, else floats and the histogram arrays, as TRL).

        ``queries``/``responses``: lists of 1-D token tensors (no padding; seq2seq responses start with the decoder
        start token, as ``generate`` returns them); ``scores``: one 0-d tensor (or float) per sample;
        ``response_masks``: optional 1-D 0/1 tensors, 0 on response tokens that must not be trained (e.g. tool
        output). Everything after the checks and the layout is :meth:`PPOCore.step`, which calls back this
        trainer's stages.
        """
        queries, responses, scores, response_masks = self._step_safety_checker(
            self.config.batch_size, queries, responses, scores, response_masks
        )
        model_inputs = self.prepare_model_inputs(queries, responses)
        rollout = self._rollout(queries, responses)
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
            stages=self,
            samples=(queries, responses),
        )
        self._batch = (queries, responses, model_inputs, response_masks)
        try:
            with self.fabric.autocast():
                output = self.core.step(engine, rollout, torch.stack(scores), self.tokenizer.eos_token_id,
                                        self.steps_done)
        finally:
            self._batch = None
        self.model.train()  # as TRL leaves it
        self.steps_done += 1
        stats = stats_to_np(output.raw_stats)
        return stats if self.config.log_with == "wandb" else convert_to_scalar(stats)

    def _step_safety_checker(
        self,
        batch_size: int | None,
        queries: Sequence[torch.Tensor],
        responses: Sequence[torch.Tensor],
        scores: Sequence[torch.Tensor | float],
        masks: Sequence[torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
        """TRL's input check, stricter, before any work: ``batch_size`` samples; token ids that are integers inside
        the policy's vocabulary; one finite number per score (a NaN would stay in the running score moments for
        good); one mask value per response token. Returns them on the trainer's device, each score 0-d."""
        named = [("queries", queries), ("responses", responses), ("scores", scores)]
        if masks is not None:
            named.append(("response_masks", masks))
        for name, values in named:
            if not isinstance(values, (list, tuple)):
                raise ValueError(f"{name} must be a list of tensors, got {type(values).__name__}.")
            if batch_size is not None and len(values) != batch_size:
                raise ValueError(
                    f"{name} has {len(values)} entries but PPOConfig.batch_size={batch_size}: pass exactly "
                    "batch_size samples to step(), or set PPOConfig(batch_size=...) to your batch size."
                )
        vocab = self.model.hf_model.get_input_embeddings().num_embeddings
        for name, values in named[:2]:
            _check_token_ids(name, values, vocab)
        checked = []
        for i, score in enumerate(scores):
            score = torch.as_tensor(score)
            if score.ndim > 1 or score.numel() != 1:
                raise ValueError(f"scores[{i}] must be one number per sample, got shape {tuple(score.shape)}.")
            checked.append(score.reshape(()).float())
        finite = torch.isfinite(torch.stack(checked))
        if not finite.all():
            bad = int((~finite).nonzero()[0, 0])
            raise ValueError(
                f"scores[{bad}] is {checked[bad].item()}: PPO needs finite scores (a NaN or inf would enter the "
                "running score moments for good); fix or drop that sample. Nothing was changed."
            )
        if masks is not None:
            for i, (mask, response) in enumerate(zip(masks, responses)):
                if torch.as_tensor(mask).numel() != len(response):
                    raise ValueError(f"response_masks[{i}] has {torch.as_tensor(mask).numel()} entries and "
                                     f"responses[{i}] {len(response)}: give one mask value per response token.")
        if self.is_encoder_decoder:
            start_id = self.model.config.decoder_start_token_id
            for i, response in enumerate(responses):
                if len(response) < 2 or (start_id is not None and int(response[0]) != start_id):
                    raise ValueError(
                        f"responses[{i}] of a seq2seq policy must start with the decoder start token (id {start_id}) "
                        "and hold at least one generated token, as PPOTrainer.generate/model.generate return them; "
                        f"got {response[:4].tolist()}..."
                    )
        device = self.current_device
        return (
            [q.to(device) for q in queries],
            [r.to(device) for r in responses],
            [s.to(device) for s in checked],
            None if masks is None else [torch.as_tensor(m).to(device) for m in masks],
        )

    def prepare_model_inputs(self, queries: Sequence[torch.Tensor],
                             responses: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """TRL's: the padded inputs of ``step``'s forward passes. Causal: ``input_ids``/``attention_mask`` of
        ``[query, left-padded | response, right-padded]`` (whatever the tokenizer's padding side: the responses of all
        rows then start in one column); seq2seq: the queries for the encoder and the responses for the decoder
        (``decoder_input_ids``/``decoder_attention_mask``), right-padded."""
        pad = self._pad_token_id(queries, responses)
        query_side = "right" if self.is_encoder_decoder else "left"
        query_ids, query_mask = pad_sequences([q.tolist() for q in queries], pad, query_side)
        response_ids, response_mask = pad_sequences([r.tolist() for r in responses], pad, "right")
        if self.is_encoder_decoder:
            inputs = {"input_ids": query_ids, "attention_mask": query_mask,
                      "decoder_input_ids": response_ids, "decoder_attention_mask": response_mask}
        else:
            inputs = {"input_ids": torch.cat([query_ids, response_ids], 1),
                      "attention_mask": torch.cat([query_mask, response_mask], 1)}
        return {key: value.to(self.current_device) for key, value in inputs.items()}

    def batched_forward_pass(
        self,
        model: Any,
        queries: Sequence[torch.Tensor],
        responses: Sequence[torch.Tensor],
        model_inputs: dict[str, torch.Tensor],
        return_logits: bool = False,
        response_masks: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """TRL's: ``(logprobs, logits or None, values, masks)`` of ``responses`` under ``model``, in chunks of
        ``mini_batch_size``. The tensors span the columns from the earliest response token to the end (``[B, W]``;
        TRL's spanned the whole sequence, whose other columns are masked out), so the LM head skips the prompt;
        ``masks`` is 1 on each row's response tokens (times ``response_masks``). Causal inputs without
        ``position_ids`` get them from ``attention_mask`` (trl#469)."""
        if model.training:  # dropout off, as TRL (the core has set it already: skip the walk over every module)
            model.eval()
        batch, fbs = len(queries), self.config.mini_batch_size
        if self.is_encoder_decoder:
            width = model_inputs["decoder_input_ids"].shape[1] - 1
            starts, lengths, skip = [0] * batch, [len(r) - 1 for r in responses], 1  # the start token is no label
        else:
            first = model_inputs["attention_mask"].argmax(1).tolist()  # left padding of each row
            starts = [f + len(q) for f, q in zip(first, queries)]
            width = model_inputs["input_ids"].shape[1] - min(starts)
            starts = [s - min(starts) for s in starts]
            lengths, skip = [len(r) for r in responses], 0
        begin, end = torch.tensor(starts)[:, None], torch.tensor(starts)[:, None] + torch.tensor(lengths)[:, None]
        columns = torch.arange(width)
        masks = ((columns >= begin) & (columns < end)).long()
        for row, given in enumerate(response_masks or []):
            masks[row, starts[row] : starts[row] + lengths[row]] *= torch.as_tensor(given)[skip:].long().cpu()
        parts = []
        for begin in range(0, batch, fbs):
            inputs = {key: value[begin : begin + fbs] for key, value in model_inputs.items()}
            if self.is_encoder_decoder:
                labels = inputs["decoder_input_ids"][:, 1:]
                for key in ("decoder_input_ids", "decoder_attention_mask"):
                    if key in inputs:
                        inputs[key] = inputs[key][:, :-1]
            else:
                labels = inputs["input_ids"][:, -width:]
                if "position_ids" not in inputs:
                    inputs["position_ids"] = position_ids_from_mask(inputs["attention_mask"])
                inputs["logits_to_keep"] = width + 1
            out = training_compiled(forward_window, self.config)(model, inputs, labels, self.is_encoder_decoder)
            parts.append((out.logprobs, out.logits if return_logits else None, out.values))
        logprobs, logits, values = (None if column[0] is None else torch.cat(column) for column in zip(*parts))
        return logprobs, logits, values, masks.to(logprobs.device)

    def rollout_forward(self, model: Any, rollout: Rollout, temperature: float = 1.0,
                        return_logits: bool = False) -> tuple:
        """The core's forward stage on the step's rows in ``rollout``, answered by :meth:`batched_forward_pass`
        on :meth:`prepare_model_inputs`'s inputs (so overriding either changes every PPO pass)."""
        queries, responses, model_inputs, masks = self._batch
        rows = rollout.rows.tolist()
        return self.batched_forward_pass(
            model, [queries[i] for i in rows], [responses[i] for i in rows],
            {key: value[rollout.rows] for key, value in model_inputs.items()}, return_logits=return_logits,
            response_masks=None if masks is None else [masks[i] for i in rows],
        )

    def record_step_stats(self, kl_coef: float, **data: Any) -> dict[str, Any]:
        """TRL's step statistics: the core's, with TRL's arrays (``objective/kl_dist``, ``objective/logprobs``,
        ``objective/ref_logprobs`` at the trained tokens, ``tokens/*_dist``) and ``tokens/*_len_std``; ``tokens/*``
        count the whole query and response as passed to ``step``."""
        stats = super().record_step_stats(kl_coef, **data)
        mask = data["masks"].bool()
        stats["objective/kl_dist"] = (data["kls"] * mask).sum(-1)
        stats["objective/logprobs"] = data["logprobs"][mask]
        stats["objective/ref_logprobs"] = data["ref_logprobs"][mask]
        for name in ("queries", "responses"):
            lengths = torch.tensor([len(x) for x in data[name]], dtype=torch.float)
            stats[f"tokens/{name}_len_std"] = torch.std(lengths).item()
            stats[f"tokens/{name}_dist"] = lengths.numpy()
        return stats

    def _rollout(self, queries: Sequence[torch.Tensor], responses: Sequence[torch.Tensor]) -> Rollout:
        """The step's samples as the core's :class:`Rollout`: queries left-padded (right for an encoder), responses
        right-padded, ``rows`` numbering them."""
        pad = self._pad_token_id(queries, responses)
        decoder_start = None
        if self.is_encoder_decoder:
            decoder_start = torch.stack([r[:1] for r in responses])
            responses = [r[1:] for r in responses]
        query_side = "right" if self.is_encoder_decoder else "left"
        query_ids, query_mask = pad_sequences([q.tolist() for q in queries], pad, query_side)
        response_ids, response_mask = pad_sequences([r.tolist() for r in responses], pad, "right")
        device = self.current_device
        return Rollout(
            query_ids.to(device), query_mask.to(device), response_ids.to(device), response_mask.to(device),
            decoder_start, rows=torch.arange(len(queries), device=device),
        )

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
                columns = [gather_objects(c) for c in columns]
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
        process through :meth:`_save_pretrained` (TRL's hook)."""
        if self.accelerator.is_main_process:
            self._save_pretrained(save_directory, **kwargs)
        self.accelerator.wait_for_everyone()

    def _save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        self.model.save_pretrained(save_directory, **kwargs)
        self.tokenizer.save_pretrained(save_directory)

    def save_state(self, directory: str | os.PathLike) -> None:
        """Everything ``step`` needs to continue exactly: trainable weights (safetensors), optimizer, scheduler, KL
        coefficient, running score moments, step counters and every process's random generators (trl#1643)."""
        save_trainer_state(self, directory)

    def load_state(self, directory: str | os.PathLike) -> None:
        """Restore what :meth:`save_state` wrote into this trainer (same model, optimizer and PEFT settings); all of
        it is read and checked before anything changes."""
        load_trainer_state(self, directory)


def _check_token_ids(name: str, values: Sequence, vocab: int) -> None:
    """One line naming the first bad entry: not a non-empty 1-D integer tensor, or an id outside ``0..vocab-1``."""
    for i, value in enumerate(values):
        if not isinstance(value, torch.Tensor) or value.ndim != 1 or value.numel() == 0:
            raise ValueError(f"{name}[{i}] must be a non-empty 1-D tensor of token ids, got {value!r}.")
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(
                f"{name}[{i}] holds {value.dtype} values ({[round(float(v), 4) for v in value[:4]]}...), not token "
                "ids: pass integer tensors (torch.long, as the tokenizer returns them); floats would be cut (65.7 "
                "becomes 65)."
            )
    ids = torch.cat([value.reshape(-1).to(torch.long).cpu() for value in values])
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        row = next(i for i, value in enumerate(values) if bool((value == bad).any()))
        raise ValueError(
            f"{name}[{row}] holds token id {bad}, outside the policy's vocabulary (0..{vocab - 1}): encode with the "
            "policy's own tokenizer, or resize the model's embeddings after adding tokens."
        )


__all__ = ["PPOTrainer"]
