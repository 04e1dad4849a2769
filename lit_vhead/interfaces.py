"""What the PPO core consumes, as ``typing.Protocol``s: a policy, a reference, a value function and a generation
backend. The value-head models (``lit_vhead.modeling``) are a :class:`Policy` and a :class:`ValueFunction` at once;
a separate critic implements :class:`ValueFunction`, another sampler (e.g. a vLLM-class server) implements
:class:`GenerationBackend`, and neither touches the core.

Shapes: ``B`` batch, ``T`` tokens. Masks are 0/1 ``[B, T]`` tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from lit_vhead.rollout import Rollout


@runtime_checkable
class Policy(Protocol):
    """The model PPO trains: a language model whose one forward also gives a value per token.

    ``forward_with_values(**model_inputs)`` takes the base model's inputs (``input_ids``, ``attention_mask``,
    ``position_ids``, ``logits_to_keep``, ``decoder_*`` for seq2seq) and returns ``(output, values)``: the base
    model's output (``output.logits`` ``[B, T, V]``) and ``values`` ``[B, T]``, zero at padding.
    """

    config: Any  # the base model's config (``is_encoder_decoder``, vocabulary size, ...)

    def forward_with_values(self, **model_inputs: Any) -> tuple[Any, torch.Tensor]: ...

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor: ...

    def trainable_parameters(self) -> Iterator[nn.Parameter]: ...


@runtime_checkable
class ValueFunction(Protocol):
    """A critic: a value per token of each sequence. The value-head policies are one; a separate critic model is
    another, trained by the same PPO value loss."""

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **model_inputs: Any) -> torch.Tensor:
        """``[B, T]`` values (the head's dtype), zero where ``attention_mask`` is 0."""
        ...

    def trainable_parameters(self) -> Iterator[nn.Parameter]: ...


@runtime_checkable
class ReferenceModel(Protocol):
    """What gives the reference log-probs of the KL penalty (:class:`lit_vhead.reference.Reference`): ``model``
    (run through ``forward_with_values``; its values are ignored) inside ``context()``, after the policy's own pass
    ran inside ``capture(policy)`` (trunk reuse keeps what the reference can skip)."""

    model: Any

    def capture(self, policy: nn.Module) -> AbstractContextManager[None]: ...

    def context(self) -> AbstractContextManager[None]: ...

    def follow(self, policy: nn.Module) -> None:
        """Move to the policy's device and dtype (after the loop placed the policy)."""
        ...


@runtime_checkable
class GenerationBackend(Protocol):
    """Samples the responses of a rollout (:mod:`lit_vhead.generation`).

    ``generate`` samples one response per prompt (``query_ids``/``query_mask`` ``[B, L]``, left-padded for causal
    models) with the ``sampling`` keyword arguments of transformers' ``generate``, and returns a
    :class:`~lit_vhead.rollout.Rollout` whose responses end at (and keep) their first ``end_token_id``, the tokens
    after it masked out (``response_mask`` 0). A backend that samples from its own copy of the weights (a
    vLLM-class server) updates that copy in ``sync_weights(policy)``, which both loops call after each PPO update;
    an in-process backend that samples from ``model`` itself has nothing to do there.
    """

    def generate(self, model: Any, query_ids: torch.Tensor, query_mask: torch.Tensor,
                 end_token_id: int | None = None, **sampling: Any) -> Rollout: ...

    def sync_weights(self, policy: nn.Module) -> None: ...


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should update: the module's own ``trainable_parameters()`` where it declares
    them, else every parameter with ``requires_grad`` (frozen base weights of a PEFT model are left out)."""
    declared = getattr(module, "trainable_parameters", None)
    if callable(declared):
        return list(declared())
    return [p for p in module.parameters() if p.requires_grad]
