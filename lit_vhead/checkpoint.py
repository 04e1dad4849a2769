"""Reading value-head tensors from TRL/HF checkpoint files (writing them is ``lit_vhead.atomic``'s).

TRL re-read the whole checkpoint to find two small tensors and could not read local shards (trl#1917). Here only the
``v_head.*`` tensors are read (lazily from safetensors, memory-mapped from pickles with ``weights_only=True``), from
single files or shards, locally or from the HF hub/cache.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

V_HEAD_PREFIX = "v_head."
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
ADAPTER_CONFIG = "adapter_config.json"
# Where a PEFT save puts a base model that cannot be found again from what the adapters record.
BASE_MODEL_DIR = "base_model"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: truncated, corrupt or of another architecture."""


def _read_safetensors(path: str, want: callable) -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys() if want(k)}
    except Exception as err:  # safetensors raises its own error types (SafetensorError, OSError...)
        raise CheckpointError(
            f"Cannot read the checkpoint file '{path}': {err}. It is truncated or corrupt; save or download it again."
        ) from err


def _read_pickle(path: str, want: callable) -> dict[str, torch.Tensor]:
    try:
        # Zip pickles are memory-mapped; a legacy (pre-1.6, non-zip) pickle, which transformers loads too, cannot be.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # pickle, zip and EOF errors all mean the same thing to the user
        unsafe = re.search(r"WeightsUnpickler error: ([^\n]*)", str(err))
        if unsafe:  # torch's message is a page of advice on loading it unsafely: keep the line that says why
            raise CheckpointError(
                f"Cannot read the checkpoint file '{path}': it holds more than tensors ({unsafe[1].strip()}), and "
                "pickles are only loaded with weights_only=True. Save it as safetensors from code you trust."
            ) from err
        raise CheckpointError(
            f"Cannot read the checkpoint file '{path}': {err}. It is truncated, corrupt or holds more than tensors "
            "(only weights_only=True pickles are loaded); save or download it again."
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"'{path}' does not hold a state dict (found {type(state).__name__}).")
    return {k: v for k, v in state.items() if want(k)}


def read_tensors(path: str, want: callable = lambda key: True) -> dict[str, torch.Tensor]:
    """The tensors of one weights file whose keys satisfy ``want``."""
    return _read_safetensors(path, want) if path.endswith(".safetensors") else _read_pickle(path, want)


def weight_files(directory: str | os.PathLike) -> list[str]:
    """The weight files in ``directory`` that a load reads: ``model.safetensors``, ``pytorch_model.bin``, the
    adapters, the shard indexes and the shards they list (plain file names of the index's kind only), in that order."""
    directory = Path(directory)
    names = [name for name in (SAFE_WEIGHTS, SAFE_INDEX, PICKLE_WEIGHTS, PICKLE_INDEX, *ADAPTER_WEIGHTS)
             if (directory / name).is_file()]
    for index, suffix in ((SAFE_INDEX, ".safetensors"), (PICKLE_INDEX, ".bin")):
        if index in names:
            try:
                shards = set(json.loads((directory / index).read_text())["weight_map"].values())
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # a broken index: its shards are unknown (the loader names the index)
            names += sorted(
                s for s in shards
                if isinstance(s, str) and os.path.basename(s) == s and s.endswith(suffix) and (directory / s).is_file()
            )
    return names


def check_weight_files(directory: str | os.PathLike) -> None:
    """Raise ``CheckpointError`` naming the first weights file of ``directory`` that is truncated or corrupt, before a
    library reads it and raises its own error without the file name. Reads headers only: the safetensors header
    (which must cover the whole file) and a zip pickle's central directory."""
    for name in weight_files(directory):
        path = os.path.join(directory, name)
        if name.endswith(".safetensors"):
            _read_safetensors(path, lambda key: False)
        elif name.endswith(".bin"):
            with open(path, "rb") as f:
                is_zip = f.read(2) == b"PK"  # else a legacy pickle: torch.load names nothing wrong before reading
            if is_zip and not zipfile.is_zipfile(path):
                raise CheckpointError(
                    f"Cannot read the checkpoint file '{path}': its zip directory is missing. It is truncated or "
                    "corrupt; save or download it again."
                )


def _find_non_finite(directories: list[str | os.PathLike]) -> tuple[str, str] | None:
    """``(file, tensor name)`` of the first tensor holding NaN or inf in the weight files of ``directories``."""
    for directory in directories:
        for name in weight_files(directory):
            if name.endswith(".json"):
                continue
            path = os.path.join(directory, name)
            for key, tensor in read_tensors(path).items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    return path, key
    return None


def fetch_file(name_or_path: str, filename: str, hub_kwargs: dict) -> str | None:
    """Local path of ``filename`` in a local dir, or in a hub repo (cache first); None if it does not exist."""
    if os.path.isdir(name_or_path):
        candidate = os.path.join(name_or_path, filename)
        return candidate if os.path.isfile(candidate) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return hf_hub_download(name_or_path, filename, **hub_kwargs)
    except (EntryNotFoundError, LocalEntryNotFoundError, HFValidationError, RepositoryNotFoundError, OSError):
        return None


def is_findable_offline(name_or_path: str | None) -> bool:
    """Whether ``from_pretrained(name_or_path)`` can find a model without the network: a local dir, or a hub id whose
    files are in the HF cache. None (a model built from a config) is found nowhere."""
    if not name_or_path:
        return False
    if os.path.isdir(name_or_path):
        return True
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name_or_path, "config.json"), str)
    except ValueError:  # not a valid repo id either
        return False


def load_value_head_state(name_or_path: str, hub_kwargs: dict | None = None) -> dict[str, torch.Tensor] | None:
    """The ``v_head.*`` tensors (prefix stripped) saved with a checkpoint, or None when it has none.

    Looks at ``model.safetensors``, its shard index, ``pytorch_model.bin`` and its shard index, in that order, and reads
    only the shards that hold value-head keys.
    """
    hub_kwargs = hub_kwargs or {}
    is_v_head = lambda key: key.startswith(V_HEAD_PREFIX)  # noqa: E731
    for single, index in ((SAFE_WEIGHTS, SAFE_INDEX), (PICKLE_WEIGHTS, PICKLE_INDEX)):
        found: dict[str, torch.Tensor] = {}
        file = fetch_file(name_or_path, single, hub_kwargs)
        if file is not None:
            found = read_tensors(file, is_v_head)
        else:
            index_file = fetch_file(name_or_path, index, hub_kwargs)
            if index_file is None:
                continue
            try:
                weight_map = json.loads(Path(index_file).read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"Cannot read the shard index '{index_file}': {err}.") from err
            for shard in sorted({f for k, f in weight_map.items() if is_v_head(k)}):
                shard_file = fetch_file(name_or_path, shard, hub_kwargs)
                if shard_file is None:
                    raise CheckpointError(f"The shard '{shard}' listed in '{index_file}' is missing.")
                found.update(read_tensors(shard_file, is_v_head))
        if found:
            return {k[len(V_HEAD_PREFIX) :]: v for k, v in found.items()}
    return None


def check_finite(named_parameters: Iterable[tuple[str, torch.Tensor]], path: str, base: str | None = None) -> None:
    """Raise ``CheckpointError`` if a weight loaded from ``path`` (adapters: or their ``base``) holds NaN or inf,
    naming the file and tensor that hold it: a file with overwritten bytes loads without any error otherwise. One pass
    over the weights; the files are read again only when something is wrong."""
    for name, param in named_parameters:
        if param.device.type == "meta" or bool(torch.isfinite(param).all()):
            continue
        directories = [d for d in (path, os.path.join(path, BASE_MODEL_DIR), base) if d and os.path.isdir(d)]
        found = _find_non_finite(directories)
        if found is None:
            why = "no weights file there does, so" if directories else "the downloaded file is corrupt, or"
            raise CheckpointError(
                f"The weight '{name}' loaded from '{path}' holds NaN or inf: {why} its values do not fit the dtype it "
                f"was loaded in ({param.dtype}); load it in float32 or bfloat16, or download it again."
            )
        raise CheckpointError(
            f"The checkpoint file '{found[0]}' holds NaN or inf in tensor '{found[1]}': it is corrupt (overwritten "
            "bytes) or was saved from a diverged run; save or download it again."
        )
