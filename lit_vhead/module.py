"""``PPOModule``: PPO for causal and seq2seq value-head models as a LightningModule (manual optimisation).

One ``training_step`` is one PPO step (TRL classic's ``step``): a rollout (:meth:`PPOModule.generate_rollout`), its
scores (:meth:`PPOModule.score_rollout`), then the update of :class:`lit_vhead.ppo.engine.PPOCore`, the same code that
``lit_vhead.PPOTrainer.step`` runs. A PPO step is one Lightning epoch of one batch, so ``max_epochs`` = PPO steps,
checkpoints fall between PPO steps, and loggers' x-axis counts PPO steps.

Python users build it from objects::

    module = PPOModule(policy, tokenizer, reward_fn, ppo=PPOConfig(steps=20, batch_size=16, mini_batch_size=4))
    lightning.Trainer(accelerator="cpu").fit(module, datamodule=PromptDataModule(prompts, tokenizer))

and ``python train.py`` builds it from the Hydra config through the same constructor.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch

from lit_vhead.builders import (
    ModelSource,
    build_policy,
    check_tokenizer,
    check_vocabulary,
    resolve_model_source,
    wrap_policy,
)
from lit_vhead.config import HeadConfig, PPOConfig, as_head_config, as_ppo_config
from lit_vhead.critic import (
    LORA_NEEDS_PEFT,
    Critic,
    as_critic_config,
    build_critic,
    check_critic_source,
    check_critic_vocabulary,
    frozen,
    parameter_groups,
    policy_parameters,
)
from lit_vhead.data import check_prompt_batch, step_seed
from lit_vhead.distributed import gradients_are_local, shard_policy
from lit_vhead.generation import HFGeneration, sampling_kwargs
from lit_vhead.interfaces import GenerationBackend
from lit_vhead.modeling import PreTrainedModelWrapper
from lit_vhead.ppo.engine import Engine, PPOCore, default_optimizer, prepare_models
from lit_vhead.reference import Reference, ReferenceConfig, as_reference_config, reference_fingerprint
from lit_vhead.rewards import RewardSource, as_reward_source, check_scores, reward_inputs
from lit_vhead.rollout import Rollout

_LIGHTNING_DEFAULT_MAX_EPOCHS = 1000
_LIGHTNING_DEFAULT_LOG_EVERY = 50


class PPOModule(L.LightningModule):
    """Trains a value-head policy with PPO under any ``lightning.Trainer``.

    Args:
        policy: a value-head model (``AutoModelFor{CausalLM,Seq2SeqLM}WithValueHead``), a plain transformers model
            with an LM head (a value head is added, set by ``head``), a local checkpoint path or hub id in the HF
            cache, or a model config mapping as in ``configs/model`` (built in ``configure_model``).
        tokenizer: the policy's tokenizer (it needs a pad token).
        reward: a function ``fn(prompts, responses, **kw) -> list[float] | Tensor`` (one score per sample; it also
            gets ``query_ids``/``response_ids`` if it accepts them), a ``(sequence-classification model, tokenizer)``
            pair (score = logit 0; ``lit_vhead.rewards.RewardModel`` picks another ``label_index``), or a
            :class:`~lit_vhead.rewards.RewardSource`. None in a subclass that overrides :meth:`score_rollout`.
        ppo: a :class:`~lit_vhead.config.PPOConfig`, a dict of its fields, or None (TRL 0.11.4's defaults).
        head: value-head settings (``HeadConfig`` or dict) used when a value head is added here.
        peft: a ``peft.PeftConfig`` applied to the policy when it is built or wrapped here.
        ref: the reference (``ReferenceConfig``, a dict of its fields, or its mode ``"copy"``/``"shared"``/``"peft"``);
            None gives a frozen copy, or the adapters-disabled base for a PEFT policy. A ``ReferenceModelCallback``
            overrides it.
        critic: the value function PPO trains (:mod:`lit_vhead.critic`): None or ``"head"`` (the policy's value head,
            TRL classic), ``"model"`` / ``"lora"``, a ``CriticConfig`` (or a dict of its fields: mode, init,
            learning_rate, warmup_steps, lam), a built :class:`~lit_vhead.critic.Critic`, or a transformers value
            model (``AutoModelFor{Token,Sequence}Classification`` with ``num_labels=1``, TRL's ``value_model``).
        optimizer: ``fn(params) -> Optimizer``; default TRL's Adam at ``ppo.learning_rate``. ``params`` are parameter
            groups (policy, then value function at ``critic.learning_rate``) unless the critic is the policy's
            head at the policy's rate.
        scheduler: ``fn(optimizer) -> LRScheduler``, stepped once per PPO step.
        sample_table_every: log a table of prompts/responses/rewards every N PPO steps (0: never).
        generation: the :class:`~lit_vhead.interfaces.GenerationBackend` that samples the rollouts; default
            :class:`~lit_vhead.generation.HFGeneration` (the policy's own ``generate``). Its ``sync_weights`` runs
            after each PPO update.
    """

    def __init__(
        self,
        policy: Any,
        tokenizer: Any,
        reward: Any,
        ppo: PPOConfig | Mapping | None = None,
        head: HeadConfig | Mapping | None = None,
        peft: Any = None,
        ref: ReferenceConfig | str | Mapping | None = None,
        critic: Any = None,
        optimizer: Callable | None = None,
        scheduler: Callable | None = None,
        sample_table_every: int = 10,
        generation: GenerationBackend | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.ppo = as_ppo_config(ppo)
        self.head = as_head_config(head)
        self.tokenizer = check_tokenizer(tokenizer)
        own_scoring = type(self).score_rollout is not PPOModule.score_rollout
        self.reward: RewardSource | None = None if reward is None and own_scoring else as_reward_source(reward)
        self.ref: ReferenceConfig | None = as_reference_config(ref)
        examples = {"optimizer": "partial(torch.optim.AdamW, lr=1e-5)", "scheduler": "partial(LinearLR, ...)"}
        for name, value in (("optimizer", optimizer), ("scheduler", scheduler)):
            if value is not None and not callable(value):
                raise TypeError(
                    f"{name} must be None or a function that builds it (e.g. {examples[name]}); got "
                    f"{type(value).__name__} {value!r}."
                )
        if isinstance(sample_table_every, bool) or not isinstance(sample_table_every, int) or sample_table_every < 0:
            raise ValueError(f"sample_table_every={sample_table_every!r} must be an int >= 0 (0: never).")
        self.peft_config = peft
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.sample_table_every = sample_table_every
        self.generation = generation or HFGeneration(self.ppo.cpu_kernels)
        self._reward_checked = False
        if self.ppo.log_with is not None:
            warnings.warn(
                f"PPOConfig.log_with={self.ppo.log_with!r} is for PPOTrainer; PPOModule logs through the Trainer's "
                "loggers (Trainer(logger=...)).",
                stacklevel=2,
            )
        self.policy: PreTrainedModelWrapper | None = None
        self.policy_source: ModelSource | None = None
        if isinstance(policy, (str, os.PathLike, Mapping, ModelSource)):
            self.policy_source = resolve_model_source(policy)  # built in configure_model
            self.model_config = self.policy_source.config
        else:
            self.policy = wrap_policy(policy, head, peft, self._reward_adapter)
            self.model_config = self.policy.config
        self.is_encoder_decoder = bool(getattr(self.model_config, "is_encoder_decoder", False))
        check_vocabulary(self.tokenizer, self.policy, self.model_config)
        if self.ref is not None and self.policy is not None:
            self.ref.validate(self.policy)  # e.g. ref="peft" without a PEFT policy, or a bad num_shared_layers
        self.__dict__["reference"] = None  # not a submodule: never in checkpoints, never wrapped by DDP
        self._reference_sum: float | None = None  # its fingerprint, checked on resume
        self.critic: Critic | None = None  # a separate value function (a submodule: in checkpoints); None: the head
        if isinstance(critic, torch.nn.Module) and not isinstance(critic, Critic):
            critic = Critic(critic)  # a transformers value model (TRL's value_model)
        if isinstance(critic, Critic):
            self.critic, self.critic_config = critic, critic.config
        else:
            self.critic_config = as_critic_config(critic)
        self._check_critic()
        self.core = PPOCore(self.ppo, critic_lam=self.critic_config.lam)

    def _check_critic(self) -> None:
        """A critic that cannot be built here fails now, before any model is built."""
        mode = self.critic_config.mode
        if mode == "head":
            return
        if self.is_encoder_decoder:
            raise ValueError(f"critic={mode} needs a causal policy; seq2seq policies train with critic=head.")
        is_peft = self.peft_config is not None or (self.policy is not None and self.policy.is_peft_model)
        if mode == "lora" and self.critic is None and not is_peft:
            raise ValueError(LORA_NEEDS_PEFT)
        if self.critic is None:
            check_critic_source(self.critic_config, self.reward)

    @property
    def _reward_adapter(self) -> str | None:
        return getattr(self.reward, "adapter_path", None)

    @property
    def kl_ctl(self):
        """The KL controller (its ``value`` is the current KL coefficient)."""
        return self.core.kl_ctl

    # ------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        """Checks that need the Trainer, before any model is built: PPO-step budget (one batch per epoch), logging
        rate, reward shape."""
        if stage != "fit":
            return
        trainer = self.trainer
        if not trainer.fast_dev_run:  # Lightning's smoke test (max_steps=1) runs one PPO step
            self._check_step_budget(trainer)
        if trainer.log_every_n_steps == _LIGHTNING_DEFAULT_LOG_EVERY:  # not chosen: log every PPO step
            trainer.log_every_n_steps = 1
        self.check_reward(getattr(trainer.datamodule, "prompts", None) or ["Hello", "World"])

    def _check_step_budget(self, trainer: L.Trainer) -> None:
        """The run takes ppo.steps PPO steps, one Lightning epoch of one batch each; a conflicting setting fails."""
        if trainer.max_steps != -1:
            raise ValueError(
                f"Trainer(max_steps={trainer.max_steps}) counts optimizer steps, and a PPO step takes several. Leave "
                f"max_steps unset: the run takes ppo.steps={self.ppo.steps} PPO steps (or set max_epochs)."
            )
        if trainer.fit_loop.max_epochs == _LIGHTNING_DEFAULT_MAX_EPOCHS:  # not set by the user
            trainer.fit_loop.max_epochs = self.ppo.steps
        elif trainer.fit_loop.max_epochs != self.ppo.steps:
            raise ValueError(
                f"Trainer(max_epochs={trainer.fit_loop.max_epochs}) disagrees with ppo.steps={self.ppo.steps}: one "
                "PPO step is one Lightning epoch. Leave max_epochs unset (the run takes ppo.steps PPO steps) or set "
                "them equal."
            )
        if trainer.limit_train_batches not in (1, 1.0):
            raise ValueError(
                f"Trainer(limit_train_batches={trainer.limit_train_batches}) is not supported: a PPO step is one batch "
                "of prompts (one Lightning epoch). Leave it unset."
            )
        trainer.limit_train_batches = 1  # one batch per epoch, whatever the length of the user's DataLoader

    def check_reward(self, prompts: list[str]) -> None:
        """A dry run of the reward (prompts as stand-in responses): a wrong output shape fails before any rollout."""
        if self._reward_checked or self.reward is None:
            return
        prompts = list(prompts[:2])
        self.reward.probe(prompts, [self.tokenizer(p)["input_ids"] for p in prompts])
        self._reward_checked = True

    def prompt_limit(self) -> int | None:
        """How many prompt tokens fit in the model's context next to a full-length response (causal models)."""
        if self.is_encoder_decoder:
            return None
        config = self.model_config
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        return None if context is None else context - self.ppo.generation.max_new_tokens

    def configure_model(self) -> None:
        """Build the policy (if given as a path or config) and the reference, before any checkpoint is restored."""
        if self.reference is not None:
            return
        if self.policy is None:
            self.policy = build_policy(self.policy_source, self.head, self.peft_config, self._reward_adapter)
        if self.ppo.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        self.policy.train()
        if self.critic is None:
            self.critic = build_critic(self.critic_config, self.policy, self.reward)
        if self.critic is not None:  # the policy's own head idles beside a separate critic: DDP must not wait for it
            self.policy.v_head.requires_grad_(False)
        check_critic_vocabulary(self.critic, self.tokenizer)
        ref = self.ref or ReferenceConfig.default_for(self.policy)
        self.__dict__["reference"] = ref.build(self.policy)
        self._reference_sum = reference_fingerprint(self.reference)
        if self.device_mesh is not None:  # ModelParallelStrategy (FSDP2): shard the policy, after the copy
            if ref.mode == "shared":
                raise ValueError("ref.mode=shared cannot share storage with an FSDP-sharded policy; use ref=copy.")
            shard_policy(self.policy, self.device_mesh["data_parallel"])

    def configure_optimizers(self):
        params = parameter_groups(self.policy, self.critic, self.ppo.learning_rate, self.critic_config.learning_rate)
        optimizer = (self.optimizer_factory or default_optimizer(self.ppo.learning_rate))(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    def on_fit_start(self) -> None:
        prepare_models(self.policy, self.reference)
        if self.reward is not None:
            self.reward.setup(self.policy, self.tokenizer, self.device)

    def teardown(self, stage: str) -> None:
        """Lightning moves the module back to the CPU after fit; the reference (not a submodule) follows it."""
        if self.reference is not None and self.policy is not None:
            self.reference.follow(self.policy)

    @property
    def reference(self) -> Reference | None:
        return self.__dict__["reference"]

    # ------------------------------------------------------------------ one PPO step
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        step = self.current_epoch
        torch.manual_seed(step_seed(self.ppo.seed, step, self.global_rank))  # rollouts reproducible per (step, rank)
        # The copy that undoes a failed update is written in the background from here: generation and the
        # rollout's passes only read the weights.
        undo_copy = self.core.start_undo_copy(self.optimizers(), self.ppo.batch_size)
        try:
            start = time.perf_counter()
            rollout = self.generate_rollout(batch)
            generation_time = time.perf_counter() - start
            scores = self.score_rollout(rollout)
            where = f"{type(self).__name__}.score_rollout"
            scores = check_scores(scores, len(rollout.query_ids), where).to(self.device)
            engine = Engine(
                model=self.policy,
                policy=self.policy,
                reference=self.reference,
                optimizer=self.optimizers(),
                backward=self.manual_backward,
                clip_gradients=lambda max_norm: self.clip_gradients(self.optimizers(), max_norm, "norm"),
                order=self.sample_order(step),
                scheduler=self.lr_schedulers(),
                temperature=self.ppo.generation.temperature,
                local_gradients=gradients_are_local(self.trainer.strategy, self.trainer.precision_plugin),
                critic=self.critic,
                train_policy=step >= self.critic_config.warmup_steps,
            )
            # Critic warm-up: the value function trains alone, the policy's weights are held fixed.
            with frozen([] if engine.train_policy else policy_parameters(self.policy, self.critic)):
                output = self.core.step(engine, rollout, scores, self.tokenizer.eos_token_id, step, undo_copy)
        finally:
            if undo_copy is not None:
                undo_copy.close()
        self.generation.sync_weights(self.policy)
        metrics = output.stats
        metrics["time/ppo/generation"] = generation_time
        metrics["ppo/step"] = float(step)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(scores))
        self.log("reward", metrics["env/reward_mean"], prog_bar=True, logger=False)
        self.log("kl", metrics["objective/kl"], prog_bar=True, logger=False)
        if self.sample_table_every and step % self.sample_table_every == 0:
            self._log_samples(scores)

    def sample_order(self, step: int) -> Callable[[int], torch.Tensor]:
        """How PPO step ``step`` orders its samples into minibatches: a function drawing a permutation of ``range(n)``
        once per PPO epoch (default: from a generator seeded by (seed, step, rank), so a resumed run draws the same)."""
        generator = torch.Generator().manual_seed(step_seed(self.ppo.seed, step, self.global_rank) + 1)
        return lambda n: torch.randperm(n, generator=generator)

    def generate_rollout(self, batch: dict[str, torch.Tensor]) -> Rollout:
        """Sample one response per prompt (``batch``: ``query_ids``/``query_mask``). Override for your own sampling."""
        check_prompt_batch(batch, self.ppo.batch_size, left_padded=not self.is_encoder_decoder)
        sampling = sampling_kwargs(self.ppo.generation, self.tokenizer)
        return self.generation.generate(self.policy, batch["query_ids"], batch["query_mask"],
                                        sampling["eos_token_id"], **sampling)

    def score_rollout(self, rollout: Rollout) -> torch.Tensor:
        """One score per sample ([B] tensor, or a list of B floats). Override to score with your own environment
        (then ``reward`` may be None); the default decodes the prompts and responses and calls the ``reward`` source."""
        inputs = reward_inputs(rollout, self.tokenizer)
        self._last_texts = (inputs.prompts, inputs.responses)
        return self.reward(inputs).to(self.device)

    # ------------------------------------------------------------------ logging
    def _log_samples(self, scores: torch.Tensor, rows: int = 8) -> None:
        """A table of prompts, responses and rewards (wandb's ``game_log``, as in TRL)."""
        from lightning.pytorch.loggers import WandbLogger

        texts = getattr(self, "_last_texts", None)
        if texts is None:
            return
        data = [[self.current_epoch, p, r, float(s)] for p, r, s in zip(*texts, scores)][:rows]
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="game_log", columns=["step", "prompt", "response", "reward"], data=data)

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep the PPO state that is not a weight: KL coefficient, running score moments, and a fingerprint of the
        reference (which is rebuilt, never saved)."""
        checkpoint["ppo_state"] = self.core.state_dict()
        checkpoint["reference_fingerprint"] = self._reference_sum

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("ppo_state")
        if state is None:
            raise ValueError("This checkpoint has no PPO state (ppo_state); it was not written by PPOModule.")
        own = self.state_dict()
        for key, value in checkpoint["state_dict"].items():
            if key not in own or own[key].shape != value.shape:
                here = "missing here" if key not in own else f"{tuple(own[key].shape)} here"
                raise ValueError(
                    f"The checkpoint was trained with another model or PEFT config: {key} is {tuple(value.shape)} "
                    f"in it but {here}. Resume with the same model.*/peft settings as the run that wrote it."
                )
        saved, here = checkpoint.get("reference_fingerprint"), self._reference_sum
        if saved is not None and here is not None and abs(saved - here) > 1e-6 * max(1.0, abs(saved)):
            raise ValueError(
                "The reference built for this run differs from the one the checkpoint was trained against (their "
                f"weights sum to {here!r} and {saved!r}): it is made from the initial policy, so resume with the same "
                "initial model (the same checkpoint, or torch.manual_seed(...) before building a random one)."
            )
        self.core.load_state_dict(state)
