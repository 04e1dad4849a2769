"""TRL 0.29.1's ``trl.experimental.ppo`` on lit_vhead: change ``from trl.experimental.ppo import PPOConfig,
PPOTrainer`` to ``from lit_vhead.experimental.ppo import PPOConfig, PPOTrainer`` and the script trains on Lightning with
lit_vhead's PPO core. The value-head models TRL exports here are lit_vhead's.

Names load on first use, as in :mod:`lit_vhead`.
"""

import importlib

_EXPORTS = {
    "PPOConfig": "lit_vhead.experimental.ppo.ppo_config",
    "PPOTrainer": "lit_vhead.experimental.ppo.ppo_trainer",
    "AutoModelForCausalLMWithValueHead": "lit_vhead.modeling",
    "AutoModelForSeq2SeqLMWithValueHead": "lit_vhead.modeling",
    "PreTrainedModelWrapper": "lit_vhead.modeling",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lit_vhead.experimental.ppo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
