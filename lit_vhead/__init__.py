"""lit_vhead: TRL's value-head models and PPO, maintained, on transformers 5 and PyTorch Lightning.

Every name loads on first use (as ``trl``'s): ``import lit_vhead`` imports nothing heavy, the value-head models and
``PPOConfig`` bring transformers (not Lightning, Hydra, omegaconf or peft: ``tests/test_imports.py``), and the PPO
classes bring Lightning. No import changes warning filters or logging; :func:`quiet` hides third-party noise on
request (``python train.py`` runs under it).
"""

import importlib

_EXPORTS = {
    "AutoModelForCausalLMWithValueHead": "lit_vhead.modeling",
    "AutoModelForSeq2SeqLMWithValueHead": "lit_vhead.modeling",
    "PreTrainedModelWrapper": "lit_vhead.modeling",
    "PPOConfig": "lit_vhead.config",
    "LAYER_PATTERNS": "lit_vhead.layers",
    "ReferenceConfig": "lit_vhead.reference",
    "create_reference_model": "lit_vhead.reference",
    "ValueHead": "lit_vhead.value_head",
    "gather_last": "lit_vhead.sequence",
    "mask_values": "lit_vhead.sequence",
    "set_seed": "lit_vhead.core",
    "AtomicCheckpointIO": "lit_vhead.checkpoint_io",
    "Critic": "lit_vhead.critic",
    "CriticConfig": "lit_vhead.critic",
    "PPOModule": "lit_vhead.module",
    "PPOTrainer": "lit_vhead.ppo_trainer",
    "PromptDataModule": "lit_vhead.data",
    "ReferenceModelCallback": "lit_vhead.callbacks",
    "RewardSource": "lit_vhead.rewards",
    "quiet": "lit_vhead.noise",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'lit_vhead' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"
