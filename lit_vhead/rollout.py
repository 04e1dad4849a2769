"""Rollouts: the batch PPO trains on, and the log-prob/value pass over it (sampling: :mod:`lit_vhead.generation`).

One code path serves causal and seq2seq models; only how prompt and response are laid out differs:
- causal: ``[left-padded prompt | response]`` in one sequence, ``position_ids`` from the attention mask (trl#469);
- seq2seq: the prompt goes to the encoder, ``[start | response[:-1]]`` to the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from lit_vhead.ppo import logprobs_from_logits
from lit_vhead.sequence import position_ids_from_mask


@dataclass
class Rollout:
    """A batch of generated responses and everything PPO computes about them, all [B, ...] tensors."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    decoder_start: torch.Tensor | None = None  # seq2seq only: [B, 1]
    logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    train_mask: torch.Tensor | None = None  # the tokens PPO trains on, in the log-prob layout (set by the PPO update)
    rows: torch.Tensor | None = None  # [B] each row's place in the step's batch (a loop's key to its per-sample data)

    def select(self, index: torch.Tensor) -> Rollout:
        """The rows in ``index`` (a minibatch)."""
        return Rollout(**{f.name: None if (v := getattr(self, f.name)) is None else v[index] for f in fields(self)})

    @property
    def is_encoder_decoder(self) -> bool:
        return self.decoder_start is not None

    def full_sequence(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt + response ids and mask (causal layout; for seq2seq the decoder side is dropped)."""
        if self.is_encoder_decoder:
            return self.query_ids, self.query_mask
        return torch.cat([self.query_ids, self.response_ids], 1), torch.cat([self.query_mask, self.response_mask], 1)


def _model_inputs(rollout: Rollout) -> dict[str, torch.Tensor]:
    if rollout.is_encoder_decoder:
        return {
            "input_ids": rollout.query_ids,
            "attention_mask": rollout.query_mask,
            "decoder_input_ids": torch.cat([rollout.decoder_start, rollout.response_ids[:, :-1]], 1),
            "decoder_attention_mask": torch.cat(
                [torch.ones_like(rollout.decoder_start), rollout.response_mask[:, :-1]], 1
            ),
        }
    input_ids, attention_mask = rollout.full_sequence()
    position_ids = position_ids_from_mask(attention_mask)
    # Only the positions that predict response tokens need logits: skip the LM head over the prompt.
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "logits_to_keep": rollout.response_ids.shape[1] + 1,
    }


@dataclass
class ForwardOutput:
    logprobs: torch.Tensor  # [B, T] log-prob of each response token
    values: torch.Tensor  # [B, T] value of the state before each response token
    logits: torch.Tensor  # [B, T, V] (temperature applied)


def forward(model, rollout: Rollout, temperature: float = 1.0) -> ForwardOutput:
    """One pass of ``model`` (a value-head wrapper, or a wrapper of one) over the rollout's responses."""
    return forward_window(model, _model_inputs(rollout), rollout.response_ids, rollout.is_encoder_decoder, temperature)


def forward_window(model, inputs: dict[str, torch.Tensor], labels: torch.Tensor, encoder_decoder: bool,
                   temperature: float = 1.0) -> ForwardOutput:
    """``model.forward_with_values(**inputs)``; the log-probs of ``labels`` ([B, W]) and the values before them.

    Causal: ``labels`` are the last W columns of ``input_ids`` (the LM head may skip the earlier ones:
    ``logits_to_keep``). Seq2seq: ``labels`` are the decoder's next tokens, one per decoder input.
    """
    output, values = model.forward_with_values(**inputs, use_cache=False)
    logits = output.logits
    if not encoder_decoder:
        width = labels.shape[1]
        logits = logits[:, -width - 1 : -1]
        values = values[:, -width - 1 : -1]
    if temperature != 1.0:
        logits = logits / temperature
    return ForwardOutput(logprobs_from_logits(logits, labels), values.float(), logits)
