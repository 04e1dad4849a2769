"""Where a model's transformer layers are: the layer patterns of the supported architectures, the parameters
below layer k (what a ``shared`` reference shares), and the module path of each layer (trunk reuse, FSDP2)."""

from __future__ import annotations

import re

from torch import nn

# TRL's patterns, then the seq2seq decoders (T5, BART). Matched against full parameter names, so the
# ``pretrained_model.`` prefix of a value-head model or a PEFT wrapper does not matter.
LAYER_PATTERNS = [
    "transformer.h.{layer}",
    "model.decoder.layers.{layer}",
    "gpt_neox.layers.{layer}",
    "model.layers.{layer}",
    "decoder.block.{layer}",
]


def _layer_regex(pattern: str) -> re.Pattern:
    if "{layer}" not in pattern:
        raise ValueError(f"pattern={pattern!r} must contain '{{layer}}', e.g. 'transformer.h.{{layer}}'.")
    head, tail = pattern.split("{layer}", 1)
    return re.compile(rf"(?:^|\.){re.escape(head)}(\d+){re.escape(tail)}\.")


def _layer_of(name: str, regex: re.Pattern) -> int | None:
    match = regex.search(name)
    return int(match.group(1)) if match else None


def find_layer_pattern(model: nn.Module, pattern: str | None = None) -> tuple[str, int]:
    """The layer pattern that matches ``model`` (``pattern`` if given) and the number of layers it matches."""
    names = [name for name, _ in model.named_parameters()]
    for candidate in [pattern] if pattern is not None else LAYER_PATTERNS:
        regex = _layer_regex(candidate)
        layers = {layer for name in names if (layer := _layer_of(name, regex)) is not None}
        if layers:
            return candidate, max(layers) + 1
    if pattern is not None:
        raise ValueError(
            f"pattern={pattern!r} matches no parameter of {type(model).__name__} (a typo?); parameter names look "
            f"like {names[min(2, len(names) - 1)]!r}. Nothing was changed."
        )
    raise ValueError(
        f"Layer pattern could not be matched for {type(model).__name__}: none of {LAYER_PATTERNS} fits its parameter "
        "names. Pass `pattern=` with '{layer}' where the layer index goes."
    )


def shared_parameter_names(model: nn.Module, num_shared_layers: int, pattern: str | None = None) -> list[str]:
    """Names of the parameters below layer ``num_shared_layers`` (embeddings included), in TRL's order semantics."""
    pattern, num_layers = find_layer_pattern(model, pattern)
    if isinstance(num_shared_layers, bool) or not isinstance(num_shared_layers, int):
        raise ValueError(f"num_shared_layers must be an int or None, got {num_shared_layers!r}.")
    if not 0 <= num_shared_layers < num_layers:
        raise ValueError(
            f"num_shared_layers={num_shared_layers} is out of range for a model with {num_layers} layers matching "
            f"{pattern!r}: use 0..{num_layers - 1}, or None for a full frozen copy."
        )
    regex = _layer_regex(pattern)
    shared = []
    for name, _ in model.named_parameters():
        layer = _layer_of(name, regex)
        if layer is not None and layer >= num_shared_layers:
            break  # everything from the first unshared layer on is unshared
        shared.append(name)
    return shared


def layer_module_names(model: nn.Module, num_shared_layers: int, pattern: str | None = None) -> list[str]:
    """Module paths of layers ``0..num_shared_layers-1`` (e.g. ``pretrained_model.transformer.h.0``)."""
    pattern, _ = find_layer_pattern(model, pattern)
    regex = _layer_regex(pattern)
    paths: dict[int, str] = {}
    for name, _ in model.named_parameters():
        match = regex.search(name)
        if match and int(match.group(1)) < num_shared_layers:
            paths.setdefault(int(match.group(1)), name[: match.end() - 1].lstrip("."))
    return [paths[layer] for layer in sorted(paths)]
