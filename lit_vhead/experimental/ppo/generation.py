"""TRL 0.29.1's ``batch_generation`` helper (its tests import it from ``ppo_trainer``), sampling through lit_vhead's
generation backend."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lit_vhead.generation import HFGeneration
from lit_vhead.interfaces import GenerationBackend
from lit_vhead.sequence import position_ids_from_mask


class BatchGeneration:
    """``batch_generation(model, queries, local_rollout_forward_batch_size, pad_token_id, generation_config)``, TRL's
    signature, over a :class:`~lit_vhead.interfaces.GenerationBackend` (default :class:`HFGeneration`)."""

    def __init__(self, generation: GenerationBackend | None = None) -> None:
        self.generation = generation or HFGeneration()

    @torch.no_grad()
    def __call__(self, model: nn.Module, queries: torch.Tensor, local_rollout_forward_batch_size: int,
                 pad_token_id: int, generation_config: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample for left-padded ``queries`` in chunks; returns ``(query_responses, logits)``: the responses
        right-padded with ``pad_token_id`` to one width, and the logits ``[B, T, V]`` that predicted each response
        position (divided by the sampling temperature, as TRL's generation scores), zeros past a chunk's width."""
        context = queries.shape[1]
        temperature = getattr(generation_config, "temperature", None) or 1.0
        responses, logits = [], []
        for begin in range(0, queries.shape[0], local_rollout_forward_batch_size):
            query = queries[begin : begin + local_rollout_forward_batch_size]
            mask = (query != pad_token_id).long()
            rollout = self.generation.generate(model, query.masked_fill(mask == 0, 0), mask,
                                               generation_config=generation_config)
            ids = torch.cat([rollout.query_ids, rollout.response_ids], 1)
            full = torch.cat([mask, torch.ones_like(rollout.response_ids)], 1)
            out = model(input_ids=ids, attention_mask=full, position_ids=position_ids_from_mask(full))
            responses.append(rollout.response_ids)
            logits.append(out.logits[:, context - 1 : -1] / temperature)
        width = max(r.shape[1] for r in responses)
        responses = [nn.functional.pad(r, (0, width - r.shape[1]), value=pad_token_id) for r in responses]
        logits = [nn.functional.pad(g, (0, 0, 0, width - g.shape[1])) for g in logits]
        return torch.cat([queries, torch.cat(responses)], 1), torch.cat(logits)


batch_generation = BatchGeneration()
