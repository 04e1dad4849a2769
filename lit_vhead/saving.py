"""Saving the value-head models (``save_pretrained``, ``push_to_hub``): one atomic directory that reloads offline,
value head included (PEFT too), the adapters' base recorded or saved beside them."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lit_vhead.atomic import atomic_directory
from lit_vhead.checkpoint import (
    ADAPTER_CONFIG,
    BASE_MODEL_DIR,
    PICKLE_WEIGHTS,
    SAFE_WEIGHTS,
    V_HEAD_PREFIX,
    is_findable_offline,
)
from lit_vhead.loading import base_name, peft_module, same_source
from lit_vhead.progress import progress_bars_for_save


def full_tensors(state_dict: dict) -> dict:
    """The state dict with FSDP2-sharded ``DTensor`` values gathered into full tensors (a collective when sharded)."""
    return {k: v.full_tensor() if type(v).__name__ == "DTensor" else v for k, v in state_dict.items()}


def save_pretrained(model: Any, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
    """The body of ``PreTrainedModelWrapper.save_pretrained`` (:mod:`lit_vhead.modeling`)
    (what it writes, and where, is documented there)."""
    state_dict = full_tensors(kwargs.pop("state_dict", None) or model.state_dict())
    if not kwargs.pop("is_main_process", True):  # FSDP/DDP: every rank gathers, one writes
        return
    safe = kwargs.get("safe_serialization", True)
    check_not_into_own_base(model, save_directory)
    with atomic_directory(save_directory) as tmp, progress_bars_for_save(model.hf_model):
        if model.is_peft_model:
            card = Path(save_directory, "README.md")
            if card.is_file():  # peft updates the model card it finds, as when it saves in place
                shutil.copy2(card, tmp)
            heads = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if k.startswith(V_HEAD_PREFIX)}
            if safe:
                from safetensors.torch import save_file

                save_file(heads, os.path.join(tmp, SAFE_WEIGHTS), metadata={"format": "pt"})
            else:
                torch.save(heads, os.path.join(tmp, PICKLE_WEIGHTS))
            kwargs.pop("safe_serialization", None)
            model.pretrained_model.save_pretrained(tmp, *args, **kwargs)
            record_peft_base(model, tmp, os.path.abspath(save_directory), safe)
        else:
            model.pretrained_model.save_pretrained(tmp, *args, state_dict=state_dict, **kwargs)

def check_not_into_own_base(model: Any, save_directory: str | os.PathLike) -> None:
    """Adapters saved into the directory of the base they load from would replace its weights with the value
    head's: refuse before writing anything."""
    base = base_name(model.pretrained_model) if model.is_peft_model else None
    if base is not None and os.path.isdir(base) and same_source(os.path.realpath(base),
                                                                  os.path.realpath(save_directory)):
        raise ValueError(
            f"save_pretrained('{save_directory}') would write the adapters and value head over the weights of "
            "their own base model, which is loaded from that directory: save into another directory."
        )

def record_peft_base(model: Any, tmp: str, final_directory: str, safe: bool) -> None:
    """Make the adapters' ``base_model_name_or_path`` findable offline: an absolute path for a local base, or the
    base itself saved into ``base_model/`` when nothing on disk holds it."""
    recorded = base_name(model.pretrained_model)
    if recorded is not None and os.path.isdir(recorded):
        recorded = os.path.abspath(recorded)
    elif not is_findable_offline(recorded):
        adapter_names = set(model.pretrained_model.peft_config)
        base_state = {}
        for key, value in model.hf_model.state_dict().items():
            parts = key.split(".")
            if any(part in adapter_names for part in parts):
                continue  # an adapter's own tensor (lora_A.default..., modules_to_save.default...)
            key = ".".join(p for p in parts if p not in ("base_layer", "original_module"))
            base_state[key] = value
        model.hf_model.save_pretrained(
            os.path.join(tmp, BASE_MODEL_DIR), state_dict=base_state, safe_serialization=safe
        )
        recorded = os.path.join(final_directory, BASE_MODEL_DIR)
    for config_file in Path(tmp).rglob(ADAPTER_CONFIG):
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = recorded
        config_file.write_text(json.dumps(portable_adapter_config(config), indent=2, sort_keys=True))

def push_to_hub(model: Any, repo_id: str, commit_message: str = "Upload model with value head", **kwargs: Any) -> Any:
    """``model.push_to_hub``: upload what ``save_pretrained`` writes (value head included, also for PEFT models)
    to the hub.

    Unlike TRL, the base model is not mutated (TRL attached ``v_head`` to it for good).
    """
    from huggingface_hub import HfApi

    hub_args = {k: kwargs.pop(k) for k in ("token", "private", "revision", "create_pr") if k in kwargs}
    api = HfApi(token=hub_args.get("token"))
    repo = api.create_repo(repo_id, private=hub_args.get("private"), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(os.path.join(tmp, "model"), **kwargs)
        return api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=os.path.join(tmp, "model"),
            commit_message=commit_message,
            revision=hub_args.get("revision"),
            create_pr=hub_args.get("create_pr", False),
        )


def portable_adapter_config(config: dict) -> dict:
    """The adapter config without ``peft_version`` and the entries that still hold their defaults: older peft (TRL
    0.11.4's peft 0.13) rejects every field it does not know, and newer peft fills the defaults back in."""
    import dataclasses

    config_class = peft_module().mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(config.get("peft_type"))
    if config_class is None:
        return config
    defaults = {}
    for f in dataclasses.fields(config_class):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()

    def as_json(value: Any) -> Any:
        return json.loads(json.dumps(value, sort_keys=True, default=lambda v: (
            dataclasses.asdict(v) if dataclasses.is_dataclass(v) else sorted(v) if isinstance(v, set) else str(v))))

    return {
        key: value for key, value in config.items()
        if key != "peft_version" and (key not in defaults or as_json(value) != as_json(defaults[key]))
    }
