"""lit_vhead: TRL's value-head models and PPO, maintained, on transformers 5 and PyTorch Lightning."""

from lit_vhead.modeling import (
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLMWithValueHead,
    PreTrainedModelWrapper,
)
from lit_vhead.reference import LAYER_PATTERNS, create_reference_model
from lit_vhead.value_head import ValueHead, gather_last, mask_values

__all__ = [
    "AutoModelForCausalLMWithValueHead",
    "AutoModelForSeq2SeqLMWithValueHead",
    "LAYER_PATTERNS",
    "PreTrainedModelWrapper",
    "ValueHead",
    "create_reference_model",
    "gather_last",
    "mask_values",
]
__version__ = "0.1.0"
