"""TRL 0.29.1's ``trl.experimental.ppo`` on lit_vhead: change ``from trl.experimental.ppo import PPOConfig,
PPOTrainer`` to ``from lit_vhead.experimental.ppo import PPOConfig, PPOTrainer`` and the script trains on Lightning with
lit_vhead's PPO core. The value-head models TRL exports here are lit_vhead's."""

from lit_vhead.experimental.ppo.ppo_config import PPOConfig
from lit_vhead.experimental.ppo.ppo_trainer import PPOTrainer
from lit_vhead.modeling import (
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLMWithValueHead,
    PreTrainedModelWrapper,
)

__all__ = [
    "AutoModelForCausalLMWithValueHead",
    "AutoModelForSeq2SeqLMWithValueHead",
    "PPOConfig",
    "PPOTrainer",
    "PreTrainedModelWrapper",
]
