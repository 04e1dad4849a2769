"""Sampling the responses of a rollout: ONE generation path for both loops (``PPOModule`` and ``PPOTrainer``).

A :class:`~lit_vhead.interfaces.GenerationBackend` turns padded prompts into a :class:`~lit_vhead.rollout.Rollout`;
both loops call its ``sync_weights(policy)`` after each PPO update. :class:`HFGeneration` samples with the model's
own ``generate`` (KV-cached), in eval mode, inside :func:`lit_vhead.kernels.fast_kernels`; a backend that samples
from its own copy of the weights (a vLLM-class server) plugs in with ``generate`` and ``sync_weights``.

Layouts: causal models return ``[prompt | response]`` (the prompt is the input, left-padded); seq2seq models return
``[decoder start | response]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lit_vhead.kernels import fast_kernels
from lit_vhead.rollout import Rollout

if TYPE_CHECKING:
    from lit_vhead.config import SamplingConfig


def response_mask_from_eos(response_ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """1 up to and including the first EOS of each row (TRL keeps the EOS), 0 after it; all 1 without an EOS id."""
    if eos_token_id is None:
        return torch.ones_like(response_ids)
    is_eos = (response_ids == eos_token_id).long()
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos  # EOS tokens strictly before each position
    return (eos_before == 0).long()


def sampling_kwargs(settings: SamplingConfig, tokenizer: Any) -> dict[str, Any]:
    """``generate`` keyword arguments of ``ppo.generation`` (the responses stop at the tokenizer's EOS when
    ``stop_at_eos``)."""
    sample = settings.do_sample
    return {
        "max_new_tokens": settings.max_new_tokens,
        "min_new_tokens": settings.min_new_tokens or None,
        "do_sample": sample,
        "temperature": settings.temperature if sample else None,
        "top_k": settings.top_k if sample else None,
        "top_p": settings.top_p if sample else None,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id if settings.stop_at_eos else None,
    }


@contextlib.contextmanager
def sampling_mode(model: nn.Module, cpu_kernels: bool | str) -> Iterator[None]:
    """Dropout off and the CPU kernels of ``ppo.cpu_kernels`` on while sampling; the training flag comes back."""
    was_training = model.training
    model.eval()
    try:
        with fast_kernels(model, enabled=cpu_kernels):
            yield
    finally:
        model.train(was_training)


class HFGeneration:
    """The ``GenerationBackend`` on transformers' ``generate``: samples from the very model it is given, so
    ``sync_weights`` has nothing to copy.

    Args:
        cpu_kernels: ``PPOConfig.cpu_kernels`` (oneDNN GEMMs on CPU while sampling: :mod:`lit_vhead.kernels`).
    """

    def __init__(self, cpu_kernels: bool | str = False) -> None:
        self.cpu_kernels = cpu_kernels

    @torch.no_grad()
    def generate(self, model: Any, query_ids: torch.Tensor, query_mask: torch.Tensor,
                 end_token_id: int | None = None, **sampling: Any) -> Rollout:
        """One response per prompt, ``sampling`` passed to ``model.generate`` (``use_cache`` on). Each response
        ends at (and keeps) its first ``end_token_id``; ``response_mask`` is 0 after it (None: every generated
        token counts)."""
        with sampling_mode(model, self.cpu_kernels):
            output = model.generate(input_ids=query_ids, attention_mask=query_mask, **{"use_cache": True, **sampling})
        if model.config.is_encoder_decoder:
            decoder_start, response = output[:, :1], output[:, 1:]
        else:
            decoder_start, response = None, output[:, query_ids.shape[1] :]
        return Rollout(query_ids, query_mask, response, response_mask_from_eos(response, end_token_id), decoder_start)

    def sync_weights(self, policy: nn.Module) -> None:
        """Nothing to do: the next ``generate`` runs the updated policy itself."""
