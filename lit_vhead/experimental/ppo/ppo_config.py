"""``PPOConfig`` of TRL 0.29.1's experimental ``PPOTrainer``: ``transformers.TrainingArguments`` plus TRL's PPO fields,
with TRL's names, defaults and ``HfArgumentParser`` flags (TRL's ``BaseConfig`` defaults included: ``logging_steps=10``,
``gradient_checkpointing=True``, ``bf16`` on unless ``fp16``).

:meth:`PPOConfig.to_ppo` translates it into lit_vhead's own :class:`lit_vhead.config.PPOConfig`, the one the PPO core
reads: TRL's batch sizes, a fixed KL coefficient, no ratio guard, and the score on the token after the response
(``score_token="next"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import TrainingArguments

KL_ESTIMATORS = {"k1": "kl", "k3": "k3"}  # TRL's name -> lit_vhead's kl_penalty


@dataclass
class PPOConfig(TrainingArguments):
    """TRL 0.29.1's ``trl.experimental.ppo.PPOConfig``: same fields, defaults and command-line flags.

    The batch sizes follow TRL: one rollout per process holds ``local_batch_size = per_device_train_batch_size *
    gradient_accumulation_steps`` prompts, split into ``num_mini_batches`` minibatches of ``local_mini_batch_size``,
    each trained in micro-batches of ``per_device_train_batch_size`` (``local_mini_batch_size /
    per_device_train_batch_size`` of them accumulated into one optimizer step). ``total_episodes`` (default
    ``num_train_epochs`` passes over the data set) makes ``num_total_batches = ceil(total_episodes / batch_size)`` PPO
    steps. The derived fields (``world_size``, ``batch_size``, ...) are filled in by the trainer, as in TRL.
    """

    # TRL's BaseConfig overrides of TrainingArguments
    logging_steps: float = field(default=10, metadata={"help": "Log every X updates steps."})
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "Enable gradient checkpointing to trade compute for memory."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; if not set, True unless fp16 is set (as in TRL)."}
    )
    lr_scheduler_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Additional parameters for the lr_scheduler."}
    )
    # TRL's PPOConfig
    learning_rate: float = field(default=3e-6, metadata={"help": "The initial learning rate for AdamW."})
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Number of processes to use for processing the dataset."}
    )
    num_mini_batches: int = field(default=1, metadata={"help": "Number of minibatches to split a batch into."})
    total_episodes: int | None = field(default=None, metadata={"help": "Total number of episodes in the dataset."})
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Per rank no grad forward pass in the rollout phase."}
    )
    num_sample_generations: int = field(
        default=10, metadata={"help": "Number of debugging samples generations (generate_completions calls)."}
    )
    response_length: int = field(default=53, metadata={"help": "Length of the response."})
    stop_token: Literal["eos"] | None = field(
        default=None, metadata={"help": "The stop token ('eos' or None); exclusive with stop_token_id."}
    )
    stop_token_id: int | None = field(
        default=None, metadata={"help": "The stop token's id; exclusive with stop_token."}
    )
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of a response without EOS."}
    )
    sft_model_path: str = field(default="EleutherAI/pythia-160m", metadata={"help": "Path to the SFT model."})
    world_size: int | None = field(default=None, metadata={"help": "Number of processes (derived)."})
    num_total_batches: int | None = field(default=None, metadata={"help": "Number of PPO steps (derived)."})
    micro_batch_size: int | None = field(default=None, metadata={"help": "Micro batch size across devices (derived)."})
    local_batch_size: int | None = field(default=None, metadata={"help": "Rollout batch size per process (derived)."})
    batch_size: int | None = field(default=None, metadata={"help": "Rollout batch size across devices (derived)."})
    local_mini_batch_size: int | None = field(default=None, metadata={"help": "Mini batch size per process (derived)."})
    mini_batch_size: int | None = field(default=None, metadata={"help": "Mini batch size across devices (derived)."})
    push_to_hub: bool = field(default=False, metadata={"help": "Whether to push the model to the Hub after training."})
    reward_model_path: str = field(default="EleutherAI/pythia-160m", metadata={"help": "Path to the reward model."})
    model_adapter_name: str | None = field(
        default=None, metadata={"help": "Name of the trained PEFT adapter, with several adapters."}
    )
    ref_adapter_name: str | None = field(
        default=None, metadata={"help": "Name of the reference PEFT adapter, with several adapters."}
    )
    num_ppo_epochs: int = field(default=4, metadata={"help": "Number of PPO epochs per batch."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whether to whiten the rewards."})
    kl_coef: float = field(default=0.05, metadata={"help": "KL coefficient."})
    kl_estimator: Literal["k1", "k3"] = field(default="k1", metadata={"help": "KL estimator: 'k1' or 'k3'."})
    cliprange: float = field(default=0.2, metadata={"help": "Clip range."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value function coefficient."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range for the value function."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "Lambda value for GAE."})
    ds3_gather_for_generation: bool = field(
        default=True, metadata={"help": "DeepSpeed ZeRO-3: gather the policy's weights for generation."}
    )

    def __post_init__(self) -> None:
        self.bf16 = not self.fp16 if self.bf16 is None else self.bf16
        super().__post_init__()
        self.check()

    def check(self) -> None:
        """One clear error for a setting TRL would fail on later (or never): checked before any model is built."""
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r} must be 'k1' or 'k3' (as in TRL).")
        if self.stop_token is not None and self.stop_token_id is not None:
            raise ValueError("You cannot set both `stop_token` and `stop_token_id`.")
        if self.stop_token not in (None, "eos"):
            raise ValueError(f"Unknown `stop_token` {self.stop_token!r}. Allowed values are: 'eos' and None.")
        for name in ("num_mini_batches", "num_ppo_epochs", "response_length", "per_device_train_batch_size",
                     "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        if self.total_episodes is not None and self.total_episodes < 1:
            raise ValueError(f"total_episodes={self.total_episodes} must be >= 1 (or None: num_train_epochs passes).")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (PPO samples its responses).")
        local = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if local % self.num_mini_batches:
            raise ValueError(
                f"local_batch_size = per_device_train_batch_size * gradient_accumulation_steps = {local} is not a "
                f"multiple of num_mini_batches={self.num_mini_batches}; pick sizes that divide."
            )
        mini = local // self.num_mini_batches
        if mini > self.per_device_train_batch_size and mini % self.per_device_train_batch_size:
            raise ValueError(
                f"A minibatch of {mini} prompts (local_batch_size / num_mini_batches) does not split into "
                f"micro-batches of per_device_train_batch_size={self.per_device_train_batch_size}; pick sizes that "
                "divide."
            )

    def derive(self, world_size: int, dataset_len: int) -> None:
        """Fill TRL's derived batch fields for ``world_size`` processes and a data set of ``dataset_len`` prompts."""
        self.check()
        if self.total_episodes is None:
            self.total_episodes = int(self.num_train_epochs * dataset_len)
        self.world_size = world_size
        self.local_batch_size = self.per_device_train_batch_size * self.gradient_accumulation_steps
        self.micro_batch_size = self.per_device_train_batch_size * world_size
        self.batch_size = self.local_batch_size * world_size
        self.mini_batch_size = self.batch_size // self.num_mini_batches
        self.local_mini_batch_size = self.local_batch_size // self.num_mini_batches
        if self.whiten_rewards and self.local_mini_batch_size < 8:
            raise ValueError(
                f"whiten_rewards needs at least 8 prompts per minibatch and process, got local_mini_batch_size="
                f"{self.local_mini_batch_size}; raise per_device_train_batch_size or gradient_accumulation_steps."
            )
        self.num_total_batches = math.ceil(self.total_episodes / self.batch_size)

    def to_ppo(self, eos_token_id: int | None) -> Any:
        """lit_vhead's :class:`~lit_vhead.config.PPOConfig` for the core: the same update as TRL's (``derive`` first).

        Micro-batches of ``per_device_train_batch_size`` (at most a minibatch) accumulate into one optimizer step per
        minibatch of ``local_mini_batch_size`` (TRL's accelerate counted micro-batches across minibatches instead);
        TRL's fixed ``kl_coef``; gradients clipped to ``max_grad_norm`` (TrainingArguments' 1.0; TRL ignored it, 0 turns
        it off); no ratio guard or early stopping (TRL has none); the score on the token after each
        response (``score_token="next"``); sampling at ``temperature + 1e-7`` with no top-k
        or top-p, stopping at EOS when ``stop_token="eos"`` (or ``stop_token_id`` is the EOS id).
        """
        from lit_vhead.config import PPOConfig as CorePPOConfig
        from lit_vhead.config import SamplingConfig

        if self.local_batch_size is None:
            raise RuntimeError("PPOConfig.derive(world_size, dataset_len) fills the batch sizes first.")
        stop = self.stop_token_id if self.stop_token is None else eos_token_id
        if stop is not None and stop != eos_token_id:
            raise ValueError(
                f"stop_token_id={stop} is not the tokenizer's EOS id ({eos_token_id}): lit_vhead's rollouts stop at "
                "EOS only. Use stop_token='eos', or make your stop token the tokenizer's eos_token."
            )
        micro = min(self.per_device_train_batch_size, self.local_mini_batch_size)
        return CorePPOConfig(
            seed=self.seed,
            steps=self.num_total_batches,
            learning_rate=self.learning_rate,
            adap_kl_ctrl=False,
            init_kl_coef=self.kl_coef,
            kl_penalty=KL_ESTIMATORS[self.kl_estimator],
            gamma=self.gamma,
            lam=self.lam,
            cliprange=self.cliprange,
            cliprange_value=self.cliprange_value,
            vf_coef=self.vf_coef,
            batch_size=self.local_batch_size,
            mini_batch_size=micro,
            gradient_accumulation_steps=self.local_mini_batch_size // micro,
            ppo_epochs=self.num_ppo_epochs,
            max_grad_norm=self.max_grad_norm or None,  # TRL 0.29.1 never clips (its bug); 0 turns it off
            ratio_threshold=math.inf,
            whiten_rewards=self.whiten_rewards,
            missing_eos_penalty=self.missing_eos_penalty,
            gradient_checkpointing=self.gradient_checkpointing,
            score_token="next",
            generation=SamplingConfig(
                max_new_tokens=self.response_length,
                do_sample=True,
                temperature=self.temperature + 1e-7,
                top_k=0,
                top_p=1.0,
                stop_at_eos=stop is not None,
            ),
        )
