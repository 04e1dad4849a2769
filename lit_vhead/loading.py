"""Loading the value-head models (``from_pretrained``): a hub id, local directory or model instance; PEFT adapters
(on the ``base_model/`` saved beside them, or the base they record), k-bit preparation, TRL-era quantization flags,
the saved value head, and a reward-modeling adapter."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from lit_vhead.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BASE_MODEL_DIR,
    V_HEAD_PREFIX,
    CheckpointError,
    check_finite,
    check_weight_files,
    fetch_file,
    load_value_head_state,
    read_tensors,
)
from lit_vhead.progress import progress_bars_for_load
from lit_vhead.value_head import check_init_strategy

logger = logging.getLogger("lit_vhead.modeling")  # the value-head models' log, whichever module writes it

HUB_KWARGS = ("token", "revision", "cache_dir", "local_files_only", "force_download", "subfolder")
# ``peft.prepare_model_for_kbit_training``'s keyword arguments (routed there, not to transformers, with peft_config)
KBIT_KWARGS = ("use_gradient_checkpointing", "gradient_checkpointing_kwargs")
# TRL-era loading keywords that transformers 5 removed: False is dropped, True becomes a BitsAndBytesConfig
QUANTIZATION_KWARGS = ("load_in_8bit", "load_in_4bit")


def peft_module() -> Any:
    """peft, imported on first need: the value-head models load without it (TRL's test_no_peft), and a plain model
    never imports it."""
    try:
        import peft
    except ImportError:  # pragma: no cover - exercised only where peft is absent
        return None
    return peft


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a ``peft.PeftModel``, without importing peft (nothing is one before peft is loaded)."""
    peft = sys.modules.get("peft")
    return peft is not None and hasattr(peft, "PeftModel") and isinstance(model, peft.PeftModel)


def quantization_config(hf_kwargs: dict) -> None:
    """Map TRL-era ``load_in_8bit``/``load_in_4bit`` (and their ``bnb_4bit_*`` companions) to transformers 5's
    ``quantization_config``, in place: ``False`` is dropped; ``True`` needs bitsandbytes."""
    flags = {k: bool(hf_kwargs.pop(k)) for k in QUANTIZATION_KWARGS if k in hf_kwargs}
    if not flags:
        return
    bnb = {k: hf_kwargs.pop(k) for k in list(hf_kwargs) if k.startswith(("bnb_4bit_", "llm_int8_"))}
    if not any(flags.values()):
        return
    asked = ", ".join(f"{k}=True" for k, v in flags.items() if v)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(
            f"{asked} needs bitsandbytes, which is not installed: pip install bitsandbytes (and a GPU it supports), "
            "or drop the argument to load the model unquantized."
        )
    if "quantization_config" in hf_kwargs:
        raise ValueError(f"Pass either {asked} or quantization_config=..., not both.")
    from transformers import BitsAndBytesConfig

    hf_kwargs["quantization_config"] = BitsAndBytesConfig(**flags, **bnb)


def load_pretrained(cls: type, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
    """``cls.from_pretrained``: the base model (hub id, local dir or instance), optional PEFT adapters and the saved
    value head, as a ``cls`` (a value-head model class).

    Keyword arguments named in ``supported_args`` configure the head; ``peft_config``, ``is_trainable``,
    ``reward_adapter`` and ``reward_adapter_name`` configure PEFT; the rest go to transformers.
    """
    peft_config = kwargs.pop("peft_config", None)
    reward_adapter = kwargs.pop("reward_adapter", None)
    reward_adapter_name = kwargs.pop("reward_adapter_name", "reward_adapter")
    is_trainable = kwargs.pop("is_trainable", False)
    head_kwargs, hf_kwargs, kbit_kwargs = cls._split_kwargs(kwargs)
    # transformers' Hub kernels stay off unless asked for (`use_kernels=True`): they fetch code from the Hub at
    # run time (offline they cannot), and PPO's grad-enabled passes run in eval mode, where they install
    # inference-only kernels.
    hf_kwargs.setdefault("use_kernels", False)
    check_init_strategy(head_kwargs.get("v_head_init_strategy"))
    quantization_config(hf_kwargs)
    if reward_adapter is not None and not isinstance(reward_adapter, (str, os.PathLike)):
        raise ValueError(
            "The `reward_adapter` argument should be a string representing the name of local path or the Hub "
            f"id to the Reward Modeling adapter; got {type(reward_adapter).__name__}."
        )
    if peft_config is not None and (peft_module() is None or not isinstance(peft_config, peft_module().PeftConfig)):
        raise ValueError(
            f"The `peft_config` argument should be an instance of `peft.PeftConfig` class, got "
            f"{type(peft_config).__name__}."
        )
    hub_kwargs = {k: hf_kwargs[k] for k in HUB_KWARGS if k in hf_kwargs}
    v_head_state = None
    if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
        path = os.fspath(pretrained_model_name_or_path)
        # Read the v_head and the other files' headers first: a truncated or corrupt weights file then raises a
        # CheckpointError naming the file, not whatever transformers/safetensors/peft raise for it.
        v_head_state = load_value_head_state(path, hub_kwargs)
        if os.path.isdir(path):
            check_weight_files(path)
        adapter_config = fetch_file(path, ADAPTER_CONFIG, hub_kwargs) if peft_module() is not None else None
        if adapter_config is not None:
            if peft_config is not None:
                warnings.warn(f"`peft_config` ignored: a peft config file was found in {path}", stacklevel=2)
            base = load_peft_base(cls, path, hub_kwargs, *model_args, **hf_kwargs)
            base = peft_module().PeftModel.from_pretrained(base, path, is_trainable=is_trainable, **hub_kwargs)
        else:
            with _v_head_keys_expected(), progress_bars_for_load(path):
                base = cls.transformers_parent_class.from_pretrained(path, *model_args, **hf_kwargs)
            base = maybe_add_peft(base, peft_config, kbit_kwargs)
        if v_head_state is None:  # the usual start from a plain LM: said at info level (TRL said nothing)
            logger.info(
                "No value-head weights (v_head.*) found in '%s': the value head is freshly initialised. This is "
                "expected when starting PPO from a plain language model, not when resuming.", path,
            )
    elif isinstance(pretrained_model_name_or_path, cls.supported_pretrained_model_architectures) or is_peft_model(
        pretrained_model_name_or_path
    ):
        base = pretrained_model_name_or_path
        if is_peft_model(base) and peft_config is not None:
            warnings.warn("`peft_config` argument ignored since the model is already a PeftModel.", stacklevel=2)
        else:
            base = maybe_add_peft(base, peft_config, kbit_kwargs)
    else:
        raise ValueError(
            "pretrained_model_name_or_path should be a string or a PreTrainedModel, but is "
            f"{type(pretrained_model_name_or_path)}"
        )

    is_peft = is_peft_model(base)
    if is_peft and base.active_peft_config.is_prompt_learning:
        raise ValueError("PromptLearningConfig is not supported for PPO training.")
    score = None
    if reward_adapter is not None:
        if not is_peft:
            raise ValueError(
                f"reward_adapter={os.fspath(reward_adapter)!r} needs a PEFT policy: the reward LoRA is loaded as a "
                "second adapter of the policy's base. Pass peft_config=LoraConfig(...) (CLI: peft=lora)."
            )
        score = cls.add_and_load_reward_modeling_adapter(
            base, os.fspath(reward_adapter), reward_adapter_name, token=hub_kwargs.get("token")
        )
    model = cls(
        base,
        score_module=score,
        supports_rm_adapter=score is not None,
        rm_adapter_name=reward_adapter_name if score is not None else None,
        **head_kwargs,
    )
    if v_head_state is not None:
        model.post_init(v_head_state)
    if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
        check_finite(model.named_parameters(), os.fspath(pretrained_model_name_or_path),
                     base_name(model.pretrained_model))
    return model


def load_peft_base(cls: type, path: str, hub_kwargs: dict, *model_args: Any, **hf_kwargs: Any) -> PreTrainedModel:
    """The base model under the adapters saved in ``path``: the copy saved beside them (``base_model/``, written
    when the base could not be found again) if there is one, else the recorded ``base_model_name_or_path``."""
    base_config = fetch_file(path, f"{BASE_MODEL_DIR}/config.json", hub_kwargs)
    if base_config is not None:
        base_dir = os.path.dirname(base_config)
        if os.path.isdir(path):
            check_weight_files(base_dir)
        if not os.path.isdir(path):  # a hub repo: fetch the whole base_model/ folder
            from huggingface_hub import snapshot_download

            download = {k: v for k, v in hub_kwargs.items() if k != "subfolder"}
            snapshot = snapshot_download(path, allow_patterns=[f"{BASE_MODEL_DIR}/*"], **download)
            base_dir = os.path.join(snapshot, BASE_MODEL_DIR)
        with progress_bars_for_load(base_dir):
            return cls.transformers_parent_class.from_pretrained(base_dir, *model_args, **hf_kwargs)
    base_path = peft_module().PeftConfig.from_pretrained(path, **hub_kwargs).base_model_name_or_path
    if not base_path:
        raise CheckpointError(
            f"The adapters in '{path}' record no base model (base_model_name_or_path is null) and no "
            f"{BASE_MODEL_DIR}/ is saved beside them: load the base yourself and pass it, "
            f"{cls.__name__}.from_pretrained(PeftModel.from_pretrained(base, '{path}')), or re-save with lit_vhead "
            "(which saves such a base with the adapters)."
        )
    if os.path.isdir(base_path):
        check_weight_files(base_path)
    return cls.transformers_parent_class.from_pretrained(base_path, *model_args, **hf_kwargs)


def maybe_add_peft(base: PreTrainedModel, peft_config: Any, kbit_kwargs: dict) -> PreTrainedModel:
    if peft_config is None:
        return base
    if getattr(base, "is_loaded_in_8bit", False) or getattr(base, "is_loaded_in_4bit", False):
        base = peft_module().prepare_model_for_kbit_training(base, **kbit_kwargs)
    return peft_module().get_peft_model(base, peft_config)


def load_reward_adapter(
    cls: type,
    pretrained_model: Any,
    adapter_model_id: str,
    adapter_name: str = "reward_model_adapter",
    token: str | None = None,
) -> nn.Module:
    """The body of ``cls.add_and_load_reward_modeling_adapter`` (documented there)."""
    hub_kwargs = {"token": token} if token else {}
    adapter_base = check_adapter_base(pretrained_model, adapter_model_id, hub_kwargs)
    try:
        pretrained_model.load_adapter(adapter_model_id, adapter_name, is_trainable=False)
    except RuntimeError as err:
        mismatches = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        if not mismatches:
            raise
        raise ValueError(
            f"The reward adapter '{adapter_model_id}' does not fit the policy: {len(mismatches)} tensors differ in "
            f"shape ({mismatches[0].rstrip('.')}). It was trained on base {adapter_base!r}; build the policy from "
            f"that base (CLI: model.name_or_path=<its dir>)."
        ) from None
    weights = None
    for filename in ADAPTER_WEIGHTS:
        weights = fetch_file(adapter_model_id, filename, hub_kwargs)
        if weights is not None:
            break
    if weights is None:
        raise ValueError(
            f"Could not find adapter weights (adapter_model.safetensors or .bin) in '{adapter_model_id}'; "
            "make sure "
            "you have the correct adapter model id or path."
        )
    score_state = read_tensors(weights, lambda key: any(f"{name}." in key for name in cls.supported_rm_modules))
    if "weight" not in {k.rsplit(".", 1)[-1] for k in score_state}:
        raise ValueError(
            f"The adapter '{adapter_model_id}' has no `score` head weights; it must be a sequence-classification "
            "(task_type='SEQ_CLS') adapter."
        )
    score_state = {k.rsplit(".", 1)[-1]: v for k, v in score_state.items()}
    num_labels, hidden_dim = score_state["weight"].shape
    device = next(pretrained_model.parameters()).device
    score = nn.Linear(hidden_dim, num_labels, bias="bias" in score_state).to(device, pretrained_model.dtype)
    score.load_state_dict(score_state)
    score.requires_grad_(False)
    return score


@contextlib.contextmanager
def _v_head_keys_expected() -> Iterator[None]:
    """While transformers loads one of our checkpoints, the ``v_head.*`` tensors in it are expected: they are not
    reported as UNEXPECTED keys (they are read separately, by ``load_value_head_state``). Other keys still are."""
    original = getattr(PreTrainedModel, "_adjust_missing_and_unexpected_keys", None)
    if original is None:  # a transformers without this hook: its report stays as it is
        yield
        return

    def adjust(model: PreTrainedModel, loading_info: Any) -> None:
        original(model, loading_info)
        loading_info.unexpected_keys = {k for k in loading_info.unexpected_keys if not k.startswith(V_HEAD_PREFIX)}

    PreTrainedModel._adjust_missing_and_unexpected_keys = adjust
    try:
        yield
    finally:
        PreTrainedModel._adjust_missing_and_unexpected_keys = original


def base_name(model: Any) -> str | None:
    """What a model records as its source (``config.name_or_path``): a hub id, a path, or None (built from a
    config)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config, "name_or_path", None) or getattr(base.config, "_name_or_path", None) or None


def same_source(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    if os.path.isdir(a) and os.path.isdir(b):
        return os.path.samefile(a, b)
    return a.rstrip("/") == b.rstrip("/")


def check_adapter_base(pretrained_model: Any, adapter_model_id: str, hub_kwargs: dict) -> str | None:
    """Warn unless the reward adapter's recorded base is the policy's base; return the adapter's base name."""
    adapter_base = peft_module().PeftConfig.from_pretrained(adapter_model_id, **hub_kwargs).base_model_name_or_path
    policy_base = base_name(pretrained_model)
    if adapter_base is None:
        warnings.warn(
            f"The reward adapter '{adapter_model_id}' records no base model (base_model_name_or_path is null), so "
            "lit_vhead cannot check that it was trained on the policy's base; its scores are meaningful only there.",
            stacklevel=3,
        )
    elif not same_source(adapter_base, policy_base):
        policy = repr(policy_base) if policy_base else "a model built from a config (random weights)"
        warnings.warn(
            f"The reward adapter '{adapter_model_id}' was trained on base {adapter_base!r}, but the policy's base is "
            f"{policy}: its scores are meaningful only on its own base. Build the policy from it (CLI: "
            f"model.name_or_path={adapter_base}).",
            stacklevel=3,
        )
    return adapter_base
