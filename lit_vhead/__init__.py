"""lit_vhead: TRL's value-head models and PPO, maintained, on transformers 5 and PyTorch Lightning.

The value-head models import light; the PPO classes (Lightning, torchmetrics) load on first use.
"""

from lit_vhead.config import PPOConfig
from lit_vhead.modeling import (
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLMWithValueHead,
    PreTrainedModelWrapper,
)
from lit_vhead.reference import LAYER_PATTERNS, ReferenceConfig, create_reference_model
from lit_vhead.value_head import ValueHead, gather_last, mask_values

_LAZY = {
    "AtomicCheckpointIO": "lit_vhead.checkpoint_io",
    "PPOModule": "lit_vhead.module",
    "PPOTrainer": "lit_vhead.trainer",
    "PromptDataModule": "lit_vhead.data",
    "ReferenceModelCallback": "lit_vhead.callbacks",
    "RewardSource": "lit_vhead.rewards",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lit_vhead' has no attribute {name!r}")


__all__ = [
    "AtomicCheckpointIO",
    "AutoModelForCausalLMWithValueHead",
    "AutoModelForSeq2SeqLMWithValueHead",
    "LAYER_PATTERNS",
    "PPOConfig",
    "PPOModule",
    "PPOTrainer",
    "PreTrainedModelWrapper",
    "PromptDataModule",
    "ReferenceConfig",
    "ReferenceModelCallback",
    "RewardSource",
    "ValueHead",
    "create_reference_model",
    "gather_last",
    "mask_values",
]
__version__ = "0.1.0"
