"""``trl.core`` as classic scripts import it: ``LengthSampler``, ``respond_to_batch``, ``set_seed`` and friends.

``from trl.core import LengthSampler`` becomes ``from lit_vhead.core import LengthSampler``, with TRL 0.11.4's
behaviour (``LengthSampler`` draws from numpy's global generator, so ``set_seed`` makes it reproducible). The PPO math
TRL kept here (``masked_mean``, ``masked_whiten``, ``logprobs_from_logits``...) is re-exported from
:mod:`lit_vhead.ppo`, the one implementation; TRL's ``axis=`` keyword is ``dim=`` there.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from lit_vhead.ppo import entropy_from_logits, logprobs_from_logits, masked_mean, masked_var, masked_whiten

WANDB_PADDING = -1


class LengthSampler:
    """Draws a length uniformly from ``range(min_value, max_value)`` (``max_value`` excluded, as in TRL)."""

    def __init__(self, min_value: int, max_value: int) -> None:
        if max_value <= min_value:
            raise ValueError(
                f"LengthSampler({min_value}, {max_value}) has no length to draw: it samples range(min_value, "
                f"max_value), so max_value must exceed min_value (e.g. LengthSampler({min_value}, {min_value + 1}))."
            )
        self.values = list(range(min_value, max_value))

    def __call__(self) -> int:
        return int(np.random.choice(self.values))


def set_seed(seed: int) -> None:
    """Seed ``random``, numpy and torch (all devices), as ``trl.core.set_seed``; ``PPOTrainer`` calls it on creation."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def top_k_top_p_filtering(
    logits: torch.Tensor,
    top_k: int = 0,
    top_p: float = 1.0,
    filter_value: float = -float("inf"),
    min_tokens_to_keep: int = 1,
) -> torch.Tensor:
    """Mask ``[B, V]`` logits outside the top-k tokens and outside the nucleus of mass ``top_p`` (transformers'
    warpers, as TRL)."""
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    if top_k > 0:
        logits = TopKLogitsWarper(top_k=top_k, filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep)(
            None, logits
        )
    if 0 <= top_p <= 1.0:
        logits = TopPLogitsWarper(top_p=top_p, filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep)(
            None, logits
        )
    return logits


@torch.no_grad()
def respond_to_batch(
    model: nn.Module, queries: torch.Tensor, txt_len: int = 20, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Sample ``txt_len`` tokens after each row of ``queries`` ([B, L], no padding) without a KV cache; returns only
    the new tokens ([B, txt_len]). TRL README's first example; ``PPOTrainer.generate`` is the fast path."""
    input_ids = queries
    for _ in range(txt_len):
        next_token_logits = model(input_ids)[0][:, -1, :]
        next_token_logits = top_k_top_p_filtering(next_token_logits, top_k=top_k, top_p=top_p)
        probs = F.softmax(next_token_logits, dim=-1)
        next_token = torch.multinomial(probs, num_samples=1).squeeze(1)
        input_ids = torch.cat([input_ids, next_token.unsqueeze(-1)], dim=-1)
    return input_ids[:, -txt_len:]


def flatten_dict(nested: Mapping, sep: str = "/") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``."""
    flat: dict[str, Any] = {}

    def recurse(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            if sep in key:
                raise ValueError(f"separator '{sep}' not allowed to be in key '{key}'")
            if isinstance(value, Mapping):
                recurse(value, prefix + key + sep)
            else:
                flat[prefix + key] = value

    recurse(nested, "")
    return flat


def stack_dicts(stats_dicts: list[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each key's values flattened and stacked into ``[len(stats_dicts), n]``, padded with ``WANDB_PADDING``."""
    return {
        key: pad_sequence([torch.flatten(d[key]) for d in stats_dicts], batch_first=True, padding_value=WANDB_PADDING)
        for key in stats_dicts[0]
    }


def stats_to_np(stats: Mapping[str, Any]) -> dict[str, Any]:
    """Tensors become numpy arrays (bf16 as fp32), numpy scalars Python floats; the rest is kept (TRL's)."""
    out = {}
    for key, value in stats.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
        out[key] = float(value) if np.isscalar(value) else value
    return out


def convert_to_scalar(stats: Mapping[str, Any]) -> dict[str, Any]:
    """Single-element tensors and arrays become Python numbers (what TRL does for every logger but wandb)."""
    out = {}
    for key, value in stats.items():
        if isinstance(value, (torch.Tensor, np.ndarray)) and (
            value.ndim == 0 or (value.ndim == 1 and value.shape[0] == 1)
        ):
            value = value.item()
        out[key] = value
    return out


__all__ = [
    "WANDB_PADDING",
    "LengthSampler",
    "convert_to_scalar",
    "entropy_from_logits",
    "flatten_dict",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "respond_to_batch",
    "set_seed",
    "stack_dicts",
    "stats_to_np",
    "top_k_top_p_filtering",
]
