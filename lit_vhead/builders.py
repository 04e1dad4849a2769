"""Build the tokenizer and the value-head policy from the ``model``/``head``/``peft`` config nodes.

A model either loads from ``name_or_path`` (a local dir, or a hub id already in the HF cache) or is built from
``config`` (a tiny random model: no download at all). ``tokenizer: byt5`` needs no files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase

from lit_vhead.modeling import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead

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


def check_model_source(model_cfg: Mapping) -> None:
    """Fail fast (before any model is built) when ``name_or_path`` cannot be found offline."""
    source = model_cfg.get("name_or_path")
    if source is None:
        if not model_cfg.get("config"):
            raise ValueError("model.name_or_path is null and model.config is empty: give one of them.")
        return
    if os.path.isdir(source):
        return
    if source.startswith((".", "/", "~")) or source.count("/") > 1:  # a path, not a hub id
        raise ModelNotFoundError(f"model.name_or_path={source!r}: no such directory.")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json")
    if isinstance(cached, str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelNotFoundError(
            f"model.name_or_path={source!r} is not in the Hugging Face cache and the hub is offline: download it "
            f"once (huggingface-cli download {source}) or point at a local checkpoint with model.name_or_path=<dir>."
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
    tokenizer.padding_side = "left" if model_cfg.get("kind", "causal") == "causal" else "right"
    return tokenizer


def build_policy(
    model_cfg: Mapping,
    head_cfg: Mapping | None = None,
    peft_cfg: Any = None,
    reward_adapter: str | None = None,
):
    """The value-head policy described by the ``model``, ``head`` and ``peft`` config nodes."""
    model_cfg, head_cfg = to_plain(model_cfg), to_plain(head_cfg) or {}
    cls = value_head_class(model_cfg.get("kind", "causal"))
    init = head_cfg.get("init")
    head_kwargs = {
        "v_head_init_strategy": getattr(init, "value", init),
        "v_head_initializer_range": head_cfg.get("initializer_range", 0.2),
        "summary_dropout_prob": head_cfg.get("dropout", 0.1),
    }
    peft_config = hydra.utils.instantiate(peft_cfg) if peft_cfg else None
    dtype = model_cfg.get("dtype")
    hf_kwargs = {"dtype": getattr(torch, dtype)} if dtype else {}
    extra = {"reward_adapter": reward_adapter} if reward_adapter else {}
    check_model_source(model_cfg)
    source = model_cfg.get("name_or_path")
    if source is not None:
        hf_kwargs["trust_remote_code"] = bool(model_cfg.get("trust_remote_code", False))
        policy = cls.from_pretrained(source, peft_config=peft_config, **head_kwargs, **hf_kwargs, **extra)
    else:
        config = AutoConfig.for_model(**model_cfg["config"])
        base = cls.transformers_parent_class.from_config(config, **hf_kwargs)
        policy = cls.from_pretrained(base, peft_config=peft_config, **head_kwargs, **extra)
    if model_cfg.get("gradient_checkpointing"):
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if policy.is_peft_model:
            policy.enable_input_require_grads()
    return policy
