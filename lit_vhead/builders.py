"""Turn what a user gives (a model object, a path, a ``configs/model`` mapping) into a value-head policy and tokenizer.

A model either loads from ``name_or_path`` (a local dir, or a hub id already in the HF cache) or is built from
``config`` (a tiny random model: no download at all). ``tokenizer: byt5`` needs no files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoTokenizer, ByT5Tokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lit_vhead.config import HeadConfig, as_head_config
from lit_vhead.modeling import (
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLMWithValueHead,
    PreTrainedModelWrapper,
)

VALUE_HEAD_CLASSES = {
    "causal": AutoModelForCausalLMWithValueHead,
    "seq2seq": AutoModelForSeq2SeqLMWithValueHead,
}


class ModelNotFoundError(FileNotFoundError):
    """A checkpoint that is neither a local directory nor in the HF cache (and the hub cannot be reached)."""


def to_plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def value_head_class(kind: str):
    if kind not in VALUE_HEAD_CLASSES:
        raise ValueError(f"model.kind={kind!r} is not one of {list(VALUE_HEAD_CLASSES)}.")
    return VALUE_HEAD_CLASSES[kind]


def check_model_source(model_cfg: Mapping, key: str = "model.name_or_path") -> None:
    """Fail fast (before any model is built) when ``name_or_path`` cannot be found: not a local dir, not in the HF
    cache, and the hub offline (``HF_HUB_OFFLINE``) or out of reach (one quick request, instead of transformers'
    retries), or when ``dtype`` is not a torch dtype. ``key`` names the setting in the error."""
    model_dtype(model_cfg)
    source = model_cfg.get("name_or_path")
    if source is None:
        if not model_cfg.get("config"):
            raise ValueError("model.name_or_path is null and model.config is empty: give one of them.")
        return
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"{key} must be a local directory or a hub id (a string), got {type(source).__name__}; "
            "pass model objects to PPOModule(policy=...) directly."
        )
    source = os.fspath(source)
    if os.path.isdir(source):
        return
    if source.startswith((".", "/", "~")) or source.count("/") > 1:  # a path, not a hub id
        raise ModelNotFoundError(f"{key}={source!r}: no such directory.")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json")
    if isinstance(cached, str):
        return
    fix = (
        f"download it once where there is network (hf download {source}) and point at it with {key}=<local dir>; "
        "with HF_HUB_OFFLINE=1 a run never tries the network"
    )
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelNotFoundError(f"{key}={source!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: {fix}.")
    unreachable = _hub_unreachable(source)
    if unreachable:
        raise ModelNotFoundError(
            f"{key}={source!r} is not in the Hugging Face cache and the hub cannot be reached ({unreachable}): {fix}."
        )


def model_dtype(model_cfg: Mapping) -> torch.dtype | None:
    """The torch dtype named by ``model.dtype`` (``bfloat16``, ``torch.float16``...; None: the checkpoint's own)."""
    name = model_cfg.get("dtype")
    if name is None or isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(
            f"model.dtype={name!r} is not a torch dtype: use float32, bfloat16 or float16 (null keeps the "
            "checkpoint's own)."
        )
    return dtype


def _hub_unreachable(repo_id: str, timeout: float = 10.0) -> str | None:
    """Why the hub cannot serve ``repo_id`` (one request, no retries), or None when it can (or answers otherwise)."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    try:
        model_info(repo_id, timeout=timeout)
    except (RepositoryNotFoundError, HFValidationError):
        return "no such model on the hub, or it needs a token: hf auth login"
    except HfHubHTTPError:
        return None  # the hub answered: let transformers report what it says
    except Exception as err:  # DNS, refused, timeout, proxy: whatever the HTTP client raises, the hub is out of reach
        return f"{type(err).__name__}: {err}"
    return None


def model_config_of(model_cfg: Mapping):
    """The transformers config of a ``configs/model`` mapping (read from disk or built), without building the model."""
    model_cfg = to_plain(model_cfg)
    if model_cfg.get("name_or_path"):
        return AutoConfig.from_pretrained(
            model_cfg["name_or_path"], trust_remote_code=bool(model_cfg.get("trust_remote_code"))
        )
    return AutoConfig.for_model(**model_cfg["config"])


@dataclass(frozen=True)
class ModelSource:
    """A ``configs/model`` mapping (or a path) checked once and its transformers config read once: what every later
    step (the PPOModule's checks, the policy's build) uses instead of reading it again."""

    spec: dict  # kind, name_or_path or config, dtype, trust_remote_code
    config: Any  # the transformers config

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.config, "is_encoder_decoder", False))


def resolve_model_source(source: ModelSource | Mapping | str | os.PathLike) -> ModelSource:
    """Check a model source (:func:`check_model_source`) and read its config, once; a ``ModelSource`` is returned as
    it is."""
    if isinstance(source, ModelSource):
        return source
    spec = to_plain(source) if isinstance(source, Mapping) else {"name_or_path": os.fspath(source)}
    check_model_source(spec)
    return ModelSource(spec, model_config_of(spec))


def check_tokenizer(tokenizer: Any) -> PreTrainedTokenizerBase:
    """The tokenizer, or a clear error when it cannot serve PPO (not a tokenizer, or no pad token)."""
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(
            f"tokenizer must be a transformers tokenizer (PreTrainedTokenizerBase), got {type(tokenizer).__name__}."
        )
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"The tokenizer ({type(tokenizer).__name__}) has no pad token; set one before building the module, "
            "e.g. tokenizer.pad_token = tokenizer.eos_token (padding is masked out everywhere)."
        )
    return tokenizer


SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def check_vocabulary(tokenizer: PreTrainedTokenizerBase, policy: Any, config: Any) -> None:
    """Every token id the tokenizer can produce (pad included), and every special token id of the model config
    (bos/eos/pad/decoder start, which generation emits), must have a row in the policy's embedding."""
    embeddings = policy.hf_model.get_input_embeddings() if policy is not None else None
    rows = getattr(embeddings, "num_embeddings", None) or getattr(config.get_text_config(), "vocab_size", None)
    if rows is None:
        return
    if len(tokenizer) > rows:
        raise ValueError(
            f"The tokenizer ({type(tokenizer).__name__}) has {len(tokenizer)} tokens but the policy's embedding has "
            f"{rows} rows: pass the policy's own tokenizer, or resize the model "
            f"(model.resize_token_embeddings(len(tokenizer))) after adding tokens."
        )
    for name in SPECIAL_TOKEN_IDS:
        value = getattr(config, name, None)
        ids = value if isinstance(value, (list, tuple)) else [value]
        if any(i is not None and not 0 <= i < rows for i in ids):
            own = getattr(tokenizer, name, None)
            if own is None and name == "bos_token_id":  # GPT-2-style: the eos token starts texts too
                own = tokenizer.eos_token_id
            fix = "" if own is None else f" (the tokenizer's is {own}; with python train.py: model.config.{name}={own})"
            raise ValueError(
                f"The model config's {name}={value} is outside the policy's vocabulary of {rows} tokens (ids 0-"
                f"{rows - 1}): set it to a token of the vocabulary{fix}."
            )


def build_tokenizer(model_cfg: Mapping) -> PreTrainedTokenizerBase:
    """The tokenizer named by ``model.tokenizer`` (``byt5`` = byte-level, no files) or found at ``name_or_path``."""
    name = model_cfg.get("tokenizer") or model_cfg.get("name_or_path")
    if name == "byt5":
        tokenizer = ByT5Tokenizer(extra_ids=0)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=bool(model_cfg.get("trust_remote_code")))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"The tokenizer of {name!r} has neither a pad nor an eos token; set one (tokenizer.pad_token=...)."
            )
        tokenizer.pad_token = tokenizer.eos_token  # the usual GPT-2 fix; padding is masked out everywhere
    return tokenizer


def _peft_for(peft_config: Any, model: Any) -> Any:
    """A PEFT config whose unset settings follow the model (a transformers model or its meta-device skeleton):
    ``task_type`` (CAUSAL_LM or SEQ_2_SEQ_LM), and ``fan_in_fan_out`` (true for GPT-2-style ``Conv1D`` layers,
    whose weights are stored transposed; peft would otherwise warn and set it itself)."""
    if peft_config is None:
        return None
    if getattr(peft_config, "task_type", "unset") is None:
        is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        peft_config.task_type = "SEQ_2_SEQ_LM" if is_encoder_decoder else "CAUSAL_LM"
    if getattr(peft_config, "fan_in_fan_out", "unset") is None:
        from transformers.pytorch_utils import Conv1D

        peft_config.fan_in_fan_out = any(isinstance(m, Conv1D) for m in model.modules())
    return peft_config


def wrap_policy(
    model: Any, head: HeadConfig | Mapping | None = None, peft_config: Any = None, reward_adapter: str | None = None
) -> PreTrainedModelWrapper:
    """A value-head policy from a model object: a value-head model as it is, or a transformers/PEFT model with a
    value head added (set by ``head``, defaults if None) and ``peft_config`` applied."""
    if isinstance(model, PreTrainedModelWrapper):
        if peft_config is not None or reward_adapter is not None or head is not None:
            raise ValueError(
                "policy is already a value-head model, so head/peft/reward-adapter settings cannot be applied here: "
                "build it with AutoModelFor...WithValueHead.from_pretrained(model, peft_config=..., "
                "reward_adapter=..., v_head_init_strategy=...), or pass the plain transformers model as policy."
            )
        return model
    from peft import PeftModel

    if not isinstance(model, (PreTrainedModel, PeftModel)):
        raise TypeError(
            "policy must be a value-head model (AutoModelForCausalLMWithValueHead, ...), a transformers model with "
            "an LM head, a local checkpoint path or hub id, or a model config mapping; got "
            f"{type(model).__name__}."
        )
    is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    cls = VALUE_HEAD_CLASSES["seq2seq" if is_encoder_decoder else "causal"]
    extra = {"reward_adapter": reward_adapter} if reward_adapter else {}
    peft_config = _peft_for(peft_config, model)
    return cls.from_pretrained(model, peft_config=peft_config, **as_head_config(head).as_model_kwargs(), **extra)


def build_policy(
    source: ModelSource | Mapping | str,
    head: HeadConfig | Mapping | None = None,
    peft_config: Any = None,
    reward_adapter: str | None = None,
) -> PreTrainedModelWrapper:
    """The value-head policy of a local path / hub id or of a ``configs/model`` mapping (``kind``, ``name_or_path``
    or ``config``, ``dtype``, ``trust_remote_code``)."""
    source = resolve_model_source(source)
    model_cfg, config = source.spec, source.config
    kind = model_cfg.get("kind") or ("seq2seq" if source.is_encoder_decoder else "causal")
    cls = value_head_class(kind)
    head_kwargs = as_head_config(head).as_model_kwargs()
    if peft_config is not None:
        with torch.device("meta"):
            skeleton = cls.transformers_parent_class.from_config(
                config, trust_remote_code=bool(model_cfg.get("trust_remote_code", False))
            )
        peft_config = _peft_for(peft_config, skeleton)
    dtype = model_dtype(model_cfg)
    hf_kwargs = {"dtype": dtype} if dtype else {}
    extra = {"reward_adapter": reward_adapter} if reward_adapter else {}
    if model_cfg.get("name_or_path") is not None:
        hf_kwargs["trust_remote_code"] = bool(model_cfg.get("trust_remote_code", False))
        return cls.from_pretrained(model_cfg["name_or_path"], peft_config=peft_config, **head_kwargs, **hf_kwargs,
                                   **extra)
    base = cls.transformers_parent_class.from_config(config, **hf_kwargs)
    return cls.from_pretrained(base, peft_config=peft_config, **head_kwargs, **extra)
