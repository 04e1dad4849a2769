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
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lit_vhead.accelerator import (
    AcceleratedScheduler,
    Accelerator,
    build_loggers,
    fabric_arguments,
    unwrap,
)
from lit_vhead.config import PPOConfig, as_ppo_config
from lit_vhead.core import convert_to_scalar, set_seed, stats_to_np
from lit_vhead.distributed import gradients_are_local
from lit_vhead.generation import HFGeneration
from lit_vhead.interfaces import GenerationBackend, trainable_parameters
from lit_vhead.modeling import PreTrainedModelWrapper
from lit_vhead.ppo.engine import Engine, PPOCore, default_optimizer, prepare_models
from lit_vhead.ppo.stages import PPOStages, training_compiled
from lit_vhead.reference import Reference, ReferenceConfig
from lit_vhead.rollout import Rollout, forward_window
from lit_vhead.sequence import pad_sequences
from lit_vhead.trainer_inputs import (
    check_step_inputs,
    check_trainer_models,
    drop_unused_columns,
    forward_in_chunks,
    generated_tokens,
    model_inputs,
    pad_token_id,
    step_rollout,
)
from lit_vhead.trainer_logging import log_config, log_stats
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
        generation (lit_vhead's): the :class:`~lit_vhead.interfaces.GenerationBackend` of ``generate``; default
            :class:`~lit_vhead.generation.HFGeneration`. Its ``sync_weights`` runs after each ``step``.
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
        *,
        generation: GenerationBackend | None = None,
    ) -> None:
        self.config = config = as_ppo_config(config)
        set_seed(config.seed)  # as TRL: minibatch permutations and LengthSampler draw from numpy's global generator
        self.tokenizer = tokenizer
        policy = check_trainer_models(model, ref_model, tokenizer, lr_scheduler)
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
            optimizer = default_optimizer(config.learning_rate)(trainable_parameters(policy))
        self._wrapped, self.optimizer = self.fabric.setup(policy, optimizer)
        self._wrapped.mark_forward_method("forward_with_values")  # DDP's gradient hooks see the PPO forward
        self.model = policy
        prepare_models(policy, self.reference)
        self.lr_scheduler = None if lr_scheduler is None else AcceleratedScheduler(lr_scheduler)
        self.core = PPOCore(config)
        self.generation = generation or HFGeneration(config.cpu_kernels)
        self.current_device = self.fabric.device
        self.current_step = 0  # log_stats calls (TRL's name); the loggers' step
        self.steps_done = 0  # PPO steps taken
        self._batch: tuple | None = None  # step's (queries, responses, model_inputs, response_masks) while it runs

        self.dataset = dataset
        if dataset is not None:
            self.dataloader = self.prepare_dataloader(dataset, data_collator)
        else:
            warnings.warn(
                "No dataset is provided. Make sure to set config.batch_size to the correct value before training.",
                UserWarning,
                stacklevel=2,
            )
            self.dataloader = None
        log_config(self.fabric.loggers, self.config)

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
        return ReferenceConfig.default_for(policy, num_shared_layers, reuse_trunk).build(policy)

    def _filter_kwargs(self, kwargs: dict[str, Any], target_func: Callable) -> dict[str, Any]:
        """The entries of ``kwargs`` that ``target_func`` takes (TRL's helper)."""
        return {k: v for k, v in kwargs.items() if k in inspect.signature(target_func).parameters}

    def prepare_dataloader(self, dataset: Any, data_collator: Callable | None = None) -> Any:
        """A shuffled loader of ``batch_size`` rows (last partial batch dropped), distributed over the processes."""
        loader = DataLoader(self._remove_unused_columns(dataset), batch_size=self.config.batch_size,
                            collate_fn=data_collator, shuffle=True, drop_last=True)
        return self.fabric.setup_dataloaders(loader)

    def _remove_unused_columns(self, dataset: Any) -> Any:
        """TRL's column filter (``remove_unused_columns``): see :func:`lit_vhead.trainer_inputs.drop_unused_columns`."""
        return drop_unused_columns(dataset, self.model) if self.config.remove_unused_columns else dataset

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
        with self.fabric.autocast():
            return run(model)

    def _generate_one(self, model: Any, query: torch.Tensor, return_prompt: bool, **kwargs: Any) -> torch.Tensor:
        input_ids = query.to(self.current_device).unsqueeze(0)
        rollout = self.generation.generate(model, input_ids, torch.ones_like(input_ids), **kwargs)
        return generated_tokens(rollout, return_prompt)[0].unsqueeze(0)

    def _generate_batched(self, model: Any, query_tensors: list[torch.Tensor], length_sampler: Callable | None = None,
                          batch_size: int = 4, return_prompt: bool = True, pad_to_multiple_of: int | None = None,
                          remove_padding: bool = True, **generation_kwargs: Any) -> list[torch.Tensor]:
        """TRL's batched sampling: ``batch_size`` queries at a time, padded (to a multiple of
        ``pad_to_multiple_of``), each output cut after its first EOS (the tokenizer's) when ``remove_padding``."""
        outputs = []
        side = "right" if self.is_encoder_decoder else "left"
        batch_size = min(len(query_tensors), batch_size)
        end = self.tokenizer.eos_token_id if remove_padding else None
        for begin in range(0, len(query_tensors), batch_size):
            if length_sampler is not None:
                generation_kwargs["max_new_tokens"] = length_sampler()
            batch = [q.tolist() for q in query_tensors[begin : begin + batch_size]]
            extra = (-max(map(len, batch))) % pad_to_multiple_of if pad_to_multiple_of else 0
            pad = pad_token_id(self.tokenizer, batch, extra=extra)
            ids, mask = pad_sequences(batch, pad, side)
            sides = (extra, 0) if side == "left" else (0, extra)
            input_ids = torch.nn.functional.pad(ids, sides, value=pad).to(self.current_device)
            mask = torch.nn.functional.pad(mask, sides, value=0).to(self.current_device)
            rollout = self.generation.generate(model, input_ids, mask, end, **generation_kwargs)
            outputs.extend(generated_tokens(rollout, return_prompt))
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
            local_gradients=gradients_are_local(self.fabric.strategy, self.fabric.strategy.precision),
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
        self.generation.sync_weights(self.model)
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
        start_id = self.model.config.decoder_start_token_id if self.is_encoder_decoder else None
        vocab = self.model.hf_model.get_input_embeddings().num_embeddings
        return check_step_inputs(batch_size, queries, responses, scores, masks, vocab, self.is_encoder_decoder,
                                 start_id, self.current_device)

    def prepare_model_inputs(self, queries: Sequence[torch.Tensor],
                             responses: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """TRL's: the padded inputs of ``step``'s forward passes. Causal: ``input_ids``/``attention_mask`` of
        ``[query, left-padded | response, right-padded]`` (whatever the tokenizer's padding side: the responses of all
        rows then start in one column); seq2seq: the queries for the encoder and the responses for the decoder
        (``decoder_input_ids``/``decoder_attention_mask``), right-padded."""
        pad = pad_token_id(self.tokenizer, queries, responses)
        inputs = model_inputs(queries, responses, pad, self.is_encoder_decoder)
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
        return forward_in_chunks(
            model, queries, responses, model_inputs, self.is_encoder_decoder, self.config.mini_batch_size,
            training_compiled(forward_window, self.config), return_logits, response_masks,
        )

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
        pad = pad_token_id(self.tokenizer, queries, responses)
        return step_rollout(queries, responses, pad, self.is_encoder_decoder, self.current_device)

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
        log_stats(self.accelerator, self.config.log_with, self.is_distributed, self.current_step, stats, batch, rewards,
                  columns_to_log)
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


__all__ = ["PPOTrainer"]
