"""Typed schemas for the Hydra config groups whose values must be validated at the command line.

Registered in Hydra's ConfigStore, so ``head.init=bogus`` or ``ppo.learning_rate=abc`` fail before anything runs, and
unknown keys are rejected (configs are in struct mode).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from hydra.core.config_store import ConfigStore


class HeadInit(str, Enum):
    """``v_head_init_strategy``: ``null`` keeps ``nn.Linear``'s init, ``normal`` draws N(0, initializer_range)."""

    normal = "normal"


class KLPenalty(str, Enum):
    """Per-token KL estimator used in the reward (and logged as ``objective/kl``)."""

    kl = "kl"
    abs = "abs"
    mse = "mse"
    full = "full"
    k3 = "k3"


@dataclass
class HeadConfig:
    init: HeadInit | None = None
    dropout: float = 0.1  # summary_dropout_prob; PPO runs with dropout off, this matters for other uses
    initializer_range: float = 0.2


@dataclass
class GenerationConfig:
    """Sampling settings of the rollouts (TRL's usual PPO settings: pure sampling, no top-k/top-p)."""

    max_new_tokens: int = 32
    min_new_tokens: int = 0  # set equal to max_new_tokens for fixed-length responses
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_at_eos: bool = True


@dataclass
class PPOConfig:
    """TRL classic's PPO knobs with TRL 0.11.4's defaults, except where noted; ``steps`` counts PPO steps."""

    steps: int = 100  # PPO steps (rollout + optimisation); TRL: `steps`
    batch_size: int = 32  # prompts per PPO step and process (TRL default 128)
    mini_batch_size: int = 8  # TRL default 128
    gradient_accumulation_steps: int = 1
    ppo_epochs: int = 4
    learning_rate: float = 1.41e-5
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    adap_kl_ctrl: bool = True
    init_kl_coef: float = 0.2
    kl_penalty: KLPenalty = KLPenalty.kl
    target: float = 6.0
    horizon: float = 10000.0
    early_stopping: bool = False
    target_kl: float = 1.0
    ratio_threshold: float = 10.0
    use_score_scaling: bool = False
    use_score_norm: bool = False
    score_clip: float | None = None
    whiten_rewards: bool = False
    max_grad_norm: float | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def validate(self, world_size: int = 1) -> None:
        """Raise a clear error for inconsistent sizes, before any model is built."""
        backward_batch = self.mini_batch_size * self.gradient_accumulation_steps
        for name in ("steps", "batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"ppo.{name}={getattr(self, name)} must be >= 1.")
        if self.batch_size % backward_batch:
            raise ValueError(
                f"ppo.batch_size={self.batch_size} is not divisible by ppo.mini_batch_size * "
                f"ppo.gradient_accumulation_steps = {self.mini_batch_size} * {self.gradient_accumulation_steps}; "
                f"pick a batch size that is a multiple of {backward_batch}."
            )
        if self.generation.max_new_tokens < 1:
            raise ValueError(f"ppo.generation.max_new_tokens={self.generation.max_new_tokens} must be >= 1.")
        if self.generation.min_new_tokens > self.generation.max_new_tokens:
            raise ValueError(
                f"ppo.generation.min_new_tokens={self.generation.min_new_tokens} exceeds max_new_tokens="
                f"{self.generation.max_new_tokens}."
            )
        if self.use_score_norm and not self.use_score_scaling:
            raise ValueError("ppo.use_score_norm=true needs ppo.use_score_scaling=true (as in TRL).")


def register_configs() -> None:
    """Make the schemas available to ``configs/`` (``defaults: [head_schema]`` etc.)."""
    cs = ConfigStore.instance()
    cs.store(group="head", name="head_schema", node=HeadConfig)
    cs.store(group="ppo", name="ppo_schema", node=PPOConfig)


register_configs()
