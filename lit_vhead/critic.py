"""The critic: which value function PPO trains, and its controls.

Three modes behind one switch (``CriticConfig.mode``; ``critic=`` on the command line, ``PPOModule(critic=...)``):

- ``head``: the value head on the policy's trunk (TRL classic; no :class:`Critic` object, the policy gives values);
- ``model``: a separate value network, a transformers backbone + a scalar head (an
  ``AutoModelFor{Token,Sequence}Classification`` with one label, as TRL's experimental ``PPOTrainer(value_model=)``),
  initialised from the reward model (the default when the reward is a model), the policy's base, or any checkpoint;
- ``lora``: LoRA adapters + a scalar head on the PEFT policy's frozen base, sharing its weights (no second model).

The PPO core reads values only through :meth:`Critic.values` (or the policy's head), so the same update, GAE and
statistics serve every mode; the value loss trains the critic's parameters through the same optimizer (its own
parameter group, ``learning_rate``).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lit_vhead.progress import progress_bars_for_load
from lit_vhead.sequence import position_ids_from_mask

CRITIC_MODES = ("head", "model", "lora")
_HEAD_NAMES = ("score", "classifier")
LORA_NEEDS_PEFT = (
    "critic=lora puts LoRA adapters on the policy's frozen base, so the policy needs adapters too: add peft=lora "
    "(PPOModule(peft=LoraConfig(...))), or use critic=model."
)  # the scalar head of ...ForSequenceClassification / ...ForTokenClassification


@dataclass
class CriticConfig:
    """Which value function PPO trains, and how.

    ``mode``: ``head`` | ``model`` | ``lora`` (see :mod:`lit_vhead.critic`). ``init`` (``model`` only): ``reward``
    (the reward model's checkpoint; the default when the reward is a model), ``policy`` (a copy of the policy's base,
    the default otherwise) or a checkpoint path. ``learning_rate``: the value function's own rate (None: the policy's,
    ``ppo.learning_rate``). ``warmup_steps``: the first PPO steps train the value function only; the policy's
    weights are held fixed. ``lam``: the GAE lambda of the value targets (returns); None: ``ppo.lam`` (TRL's math).
    The policy's advantages always use ``ppo.lam``.
    """

    mode: str = "head"
    init: str | None = None
    learning_rate: float | None = None
    warmup_steps: int = 0
    lam: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in CRITIC_MODES:
            raise ValueError(f"critic.mode={self.mode!r} is not one of {list(CRITIC_MODES)}.")
        if self.init is not None and self.mode != "model":
            raise ValueError(
                f"critic.init={self.init!r} only applies to critic.mode=model (a separate value network); "
                f"critic.mode={self.mode} has no initialisation to choose. Leave critic.init unset."
            )
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"critic.warmup_steps={self.warmup_steps!r} must be an int >= 0.")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise ValueError(f"critic.learning_rate={self.learning_rate!r} must be > 0 (null: ppo.learning_rate).")
        if self.lam is not None and not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"critic.lam={self.lam!r} must be in [0, 1] (null: ppo.lam).")


def as_critic_config(value: Any) -> CriticConfig:
    """A ``CriticConfig`` from a config, a mode string, a dict, a DictConfig or None (``head``)."""
    if value is None:
        return CriticConfig()
    if isinstance(value, CriticConfig):
        return value
    if isinstance(value, str):
        return CriticConfig(mode=value)
    if not isinstance(value, Mapping):
        from omegaconf import DictConfig, OmegaConf

        if not isinstance(value, DictConfig):
            raise TypeError(
                "critic must be None (the policy's value head), a mode 'head'/'model'/'lora', a dict of "
                f"CriticConfig fields, a CriticConfig or a Critic; got {type(value).__name__} {value!r}."
            )
        value = OmegaConf.to_container(value, resolve=True)
    return CriticConfig(**{k: v for k, v in value.items() if not k.startswith("_")})


class Critic(nn.Module):
    """A value function separate from the policy: per-token values ``head(backbone(tokens))``.

    ``model`` is a transformers model with a backbone (``model.base_model_prefix``) and a one-output head named
    ``score`` or ``classifier``: an ``AutoModelForSequenceClassification`` or ``...ForTokenClassification`` built with
    ``num_labels=1`` (TRL's ``value_model``). ``config`` carries the controls (warm-up, learning rate, lambda).
    Build one with :meth:`from_pretrained`, :meth:`from_policy`, :meth:`from_reward_model` or :meth:`lora_on`.
    """

    def __init__(self, model: nn.Module, config: CriticConfig | None = None, shares_policy_base: bool = False) -> None:
        super().__init__()
        head = _head_of(model)
        if head.out_features != 1:
            raise ValueError(
                f"The value model's head ({type(model).__name__}.{_head_name(model)}) has {head.out_features} outputs; "
                "a value model has one: build it with num_labels=1 (or Critic.from_reward_model(path, label_index))."
            )
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(
                f"A separate critic reads a causal (decoder-only) backbone; {type(model).__name__} is an "
                "encoder-decoder model. Use critic=head for seq2seq policies."
            )
        self.model = model
        self.config = config or CriticConfig(mode="lora" if shares_policy_base else "model")
        if self.config.mode == "head":
            raise ValueError(
                "A Critic is a value function separate from the policy: its CriticConfig.mode is model or lora, not "
                "head (for the policy's own value head pass critic=None or critic='head' instead of a Critic)."
            )
        self.shares_policy_base = shares_policy_base

    # ------------------------------------------------------------------ building
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, config: CriticConfig | None = None, **hf_kwargs: Any) -> Critic:
        """A critic from a checkpoint: a saved critic (``...ForTokenClassification``/``...ForSequenceClassification``
        with one label) as it is, any other model of that architecture with a fresh one-output head."""
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=bool(hf_kwargs.get("trust_remote_code")))
        architectures = " ".join(hf_config.architectures or ())
        auto = AutoModelForSequenceClassification if "SequenceClassification" in architectures else (
            AutoModelForTokenClassification)
        if "Classification" in architectures and hf_config.num_labels != 1:
            return cls.from_reward_model(path, config=config, **hf_kwargs)
        with progress_bars_for_load(path):
            return cls(auto.from_pretrained(path, num_labels=1, **hf_kwargs), config)

    @classmethod
    def from_reward_model(cls, path: str | os.PathLike, label_index: int = 0, config: CriticConfig | None = None,
                          **hf_kwargs: Any) -> Critic:
        """A critic initialised from a sequence-classification reward model: its backbone, and its head's row
        ``label_index`` (the logit the reward reads) as the value head, so values start as the reward's scores."""
        from transformers import AutoModelForSequenceClassification

        with progress_bars_for_load(path):
            model = AutoModelForSequenceClassification.from_pretrained(path, **hf_kwargs)
        return cls(_one_label(model, label_index), config)

    @classmethod
    def from_policy(cls, policy: nn.Module, config: CriticConfig | None = None) -> Critic:
        """A separate critic initialised with a copy of the policy's base (its trunk; adapters not merged) and a
        fresh one-output head (``AutoModelForTokenClassification`` of the policy's architecture)."""
        from transformers import AutoModelForTokenClassification

        base = _causal_base(policy)
        model = AutoModelForTokenClassification.from_config(_one_label_config(base.config), dtype=base.dtype)
        missing = _backbone(model).load_state_dict(_trunk_tensors(base), strict=False).missing_keys
        if missing:
            raise ValueError(f"The policy's trunk does not fit a {type(model).__name__}: {missing[:4]} missing.")
        return cls(model.to(base.device), config)

    @classmethod
    def lora_on(cls, policy: nn.Module, config: CriticConfig | None = None) -> Critic:
        """A memory-light critic on a PEFT policy: the policy's frozen base weights (the same tensors, no copy), LoRA
        adapters of the policy's own LoRA settings, and a fresh one-output head. Only adapters and head train."""
        if not getattr(policy, "is_peft_model", False):
            raise ValueError(LORA_NEEDS_PEFT)
        from peft import get_peft_model
        from transformers import AutoModelForTokenClassification

        base = _causal_base(policy)
        with torch.device("meta"):
            model = AutoModelForTokenClassification.from_config(_one_label_config(base.config), dtype=base.dtype)
        backbone, shared = _backbone(model), _trunk_tensors(base, keep_vars=True)
        for name, tensor in [*backbone.named_parameters(), *backbone.named_buffers()]:
            if name not in shared:
                raise ValueError(f"The policy's base has no {name}: it does not fit a {type(model).__name__}.")
            module_name, _, attr = name.rpartition(".")
            module = backbone.get_submodule(module_name)
            if isinstance(tensor, nn.Parameter):
                module._parameters[attr] = shared[name]  # the policy's frozen Parameter itself: shared, not copied
            else:
                module._buffers[attr] = shared[name]
        old = _head_of(model)
        setattr(model, _head_name(model), nn.Linear(old.in_features, 1, bias=old.bias is not None,
                                                      device=base.device))
        lora = copy.deepcopy(policy.pretrained_model.peft_config[policy.pretrained_model.active_adapter])
        lora.task_type, lora.inference_mode, lora.modules_to_save = None, False, None
        if not isinstance(lora.target_modules, str):  # names in the policy (``transformer.h.0...``): in its trunk
            prefix = f"{base.base_model_prefix}."
            lora.target_modules = {name.removeprefix(prefix) for name in lora.target_modules}
        setattr(model, model.base_model_prefix, get_peft_model(backbone, lora))
        return cls(model, config or CriticConfig(mode="lora"), shares_policy_base=True)

    # ------------------------------------------------------------------ the value function
    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **model_inputs: Any) -> torch.Tensor:
        """Values ``[B, T]`` (fp32) of every position, zero where ``attention_mask`` is 0 (the
        :class:`~lit_vhead.interfaces.ValueFunction` interface). ``position_ids`` default to the positions counted
        from each row's first real token (left padding); other model inputs are ignored."""
        position_ids = model_inputs.get("position_ids")
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        hidden = _backbone(self.model)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        head = _head_of(self.model)
        values = head(hidden.to(head.weight.dtype)).squeeze(-1).float()
        return values.masked_fill(attention_mask == 0, 0.0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **model_inputs: Any) -> torch.Tensor:
        return self.values(input_ids, attention_mask, **model_inputs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def vocab_size(self) -> int:
        return _backbone(self.model).get_input_embeddings().num_embeddings

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the critic in transformers' format (safetensors): reload it with
        ``Critic.from_pretrained(directory)`` or ``AutoModelFor{Token,Sequence}Classification.from_pretrained``.
        A ``lora`` critic is saved with its adapters merged into a copy of the base (a full model). Atomic, as the
        policy's save (:func:`lit_vhead.atomic.atomic_directory`)."""
        from lit_vhead.atomic import atomic_directory
        from lit_vhead.progress import progress_bars_for_save

        model = self.model
        if self.shares_policy_base:
            model = copy.deepcopy(model)
            setattr(model, model.base_model_prefix, _backbone(model).merge_and_unload())
        with atomic_directory(directory) as tmp, progress_bars_for_save(model):  # a failed save changes nothing
            model.save_pretrained(tmp, **kwargs)


def response_values(critic: Any, rollout: Any) -> torch.Tensor:
    """``[B, T]`` values of the state before each of the rollout's response tokens (causal layout: prompt +
    response), the window that the policy's value head gives in :func:`lit_vhead.rollout.forward`."""
    input_ids, attention_mask = rollout.full_sequence()
    width = rollout.response_ids.shape[1]
    return critic.values(input_ids, attention_mask)[:, -width - 1 : -1]


def critic_parameters(policy: nn.Module, critic: Critic | None) -> list[nn.Parameter]:
    """The parameters the value loss trains: the critic's trainable ones, or the policy's value head."""
    if critic is not None:
        return critic.trainable_parameters()
    return [p for p in policy.v_head.parameters() if p.requires_grad]


def parameter_groups(policy: nn.Module, critic: Critic | None, policy_lr: float,
                     critic_lr: float | None) -> list[nn.Parameter] | list[dict[str, Any]]:
    """What the optimizer updates. ``head`` mode without a value learning rate: the policy's trainable parameters,
    as a plain list (TRL's). Otherwise two parameter groups: the policy's (without its value head, which idles
    beside a separate critic), then the value function's at ``critic_lr`` (None: ``policy_lr``)."""
    if critic is None and critic_lr is None:
        return [p for p in policy.parameters() if p.requires_grad]
    value = critic_parameters(policy, critic)
    skip = {id(p) for p in (value if critic is None else policy.v_head.parameters())}
    trunk = [p for p in policy.parameters() if p.requires_grad and id(p) not in skip]
    return [{"params": trunk}, {"params": value, "lr": policy_lr if critic_lr is None else critic_lr}]


def policy_parameters(policy: nn.Module, critic: Critic | None) -> list[nn.Parameter]:
    """The policy's parameters that a critic warm-up holds fixed: all but the value head in ``head`` mode."""
    value = {id(p) for p in critic_parameters(policy, critic)}
    return [p for p in policy.parameters() if id(p) not in value]


@contextlib.contextmanager
def frozen(parameters: Iterable[nn.Parameter]) -> Iterator[None]:
    """Hold ``parameters`` fixed in the block (``requires_grad`` off: no gradient, no optimizer step), then restore."""
    changed = [p for p in parameters if p.requires_grad]
    for p in changed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)


def build_critic(config: CriticConfig, policy: nn.Module, reward: Any = None) -> Critic | None:
    """The critic ``config`` asks for, next to ``policy`` (built) and ``reward`` (a reward source); None for
    ``head``. ``init`` None: the reward model's checkpoint when the reward is a model, else the policy's base."""
    if config.mode == "head":
        return None
    if config.mode == "lora":
        return Critic.lora_on(policy, config)
    init = check_critic_source(config, reward)
    if init == "policy":
        return Critic.from_policy(policy, config)
    if init == "reward":
        source = _reward_model_source(reward)
        label_index = getattr(reward, "label_index", 0)
        if isinstance(source, nn.Module):  # a reward model object: its copy (the reward itself stays frozen)
            critic = Critic(_one_label(copy.deepcopy(source), label_index), config)
            critic.requires_grad_(True)
            return critic
        return Critic.from_reward_model(source, label_index, config)
    return Critic.from_pretrained(init, config)


def check_critic_source(config: CriticConfig, reward: Any = None) -> str | None:
    """Where a ``model`` critic starts (``reward``, ``policy`` or a checkpoint path; None for other modes), or a clear
    error before any model is built: ``init=reward`` without a reward model, a path that cannot be found."""
    if config.mode != "model":
        return None
    init = config.init or ("reward" if _reward_model_source(reward) is not None else "policy")
    if init == "reward" and _reward_model_source(reward) is None:
        raise ValueError(
            "critic.init=reward initialises the critic from the reward model, but the reward is not a model "
            f"({type(reward).__name__}): use reward=model, or critic.init=policy or critic.init=<checkpoint dir>."
        )
    if init not in ("reward", "policy"):
        from lit_vhead.builders import check_model_source

        check_model_source({"name_or_path": init}, key="critic.init")
    return init


def check_critic_vocabulary(critic: Critic | None, tokenizer: Any) -> None:
    """The critic reads the policy's token ids: each must have a row in its embedding."""
    if critic is not None and len(tokenizer) > critic.vocab_size:
        raise ValueError(
            f"The critic's embedding has {critic.vocab_size} rows but the policy's tokenizer has {len(tokenizer)} "
            "tokens: the critic reads the policy's tokens, so initialise it from a model with the policy's tokenizer "
            "(critic.init=policy, or a reward model trained on the policy's tokenizer)."
        )


# ---------------------------------------------------------------------- helpers
def _reward_model_source(reward: Any) -> Any:
    """The reward model's checkpoint path or object when the reward is a ``RewardModel``; else None."""
    from lit_vhead.rewards import RewardModel

    if not isinstance(reward, RewardModel):
        return None
    return reward.name_or_path if reward.name_or_path is not None else reward.model


def _head_name(model: nn.Module) -> str:
    for name in _HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Linear):
            return name
    raise ValueError(
        f"{type(model).__name__} has no scalar head (an nn.Linear named {' or '.join(_HEAD_NAMES)}): pass an "
        "AutoModelForSequenceClassification or AutoModelForTokenClassification built with num_labels=1."
    )


def _head_of(model: nn.Module) -> nn.Linear:
    return getattr(model, _head_name(model))


def _backbone(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def _causal_base(policy: nn.Module) -> nn.Module:
    """The policy's transformers model (under any PEFT wrapping); a clear error for seq2seq policies."""
    base = getattr(policy, "hf_model", policy)
    if getattr(base.config, "is_encoder_decoder", False):
        raise ValueError("A separate critic (critic=model/lora) needs a causal policy; use critic=head for seq2seq.")
    return base


def _trunk_tensors(base: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """The policy's trunk (``base.<base_model_prefix>``) under plain names: PEFT's ``base_layer`` wrappers dropped,
    its adapters left out."""
    trunk = _backbone(base)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in [*trunk.named_parameters(), *trunk.named_buffers()]:
        if "lora_" in name or ".modules_to_save." in name:
            continue
        out[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = (
            tensor if keep_vars else tensor.detach()
        )
    return out


def _one_label_config(config: Any) -> Any:
    config = copy.deepcopy(config)
    config.num_labels = 1
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = config.eos_token_id if isinstance(config.eos_token_id, int) else 0
    return config


def _one_label(model: nn.Module, label_index: int) -> nn.Module:
    """``model`` with its head cut to the one row ``label_index`` (a no-op for a one-label model)."""
    head = _head_of(model)
    if head.out_features == 1:
        return model
    if not 0 <= label_index < head.out_features:
        raise ValueError(f"label_index={label_index} is out of range for a head of {head.out_features} outputs.")
    new = nn.Linear(head.in_features, 1, bias=head.bias is not None, device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(head.weight[label_index : label_index + 1])
        if head.bias is not None:
            new.bias.copy_(head.bias[label_index : label_index + 1])
    setattr(model, _head_name(model), new)
    model.config.num_labels = 1
    return model
