"""What ``PPOTrainer`` is given, checked and laid out: its models (constructor); ``step``'s inputs, TRL classic's
lists of unpadded token tensors, as padded model inputs, response windows and the core's
:class:`~lit_vhead.rollout.Rollout`; and ``generate``'s outputs in TRL's form."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_vhead.accelerator import unwrap
from lit_vhead.modeling import PreTrainedModelWrapper
from lit_vhead.rollout import Rollout, forward_window
from lit_vhead.sequence import pad_sequences, position_ids_from_mask


def check_trainer_models(model: Any, ref_model: Any, tokenizer: Any, lr_scheduler: Any) -> Any:
    """``PPOTrainer``'s models, tokenizer and scheduler checked before any work; returns the bare policy."""
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}.")
    policy = unwrap(model)
    if not isinstance(policy, PreTrainedModelWrapper):
        raise TypeError(
            "model must be a lit_vhead value-head model (AutoModelForCausalLMWithValueHead or "
            f"AutoModelForSeq2SeqLMWithValueHead), got {type(model).__name__}; load it with "
            "lit_vhead.AutoModelForCausalLMWithValueHead.from_pretrained(...) (TRL checkpoints load unchanged)."
        )
    if ref_model is not None and unwrap(ref_model) is policy:
        raise ValueError("ref_model is the policy itself; pass None for a frozen copy, or a separate model.")
    if ref_model is not None and not isinstance(unwrap(ref_model), PreTrainedModelWrapper):
        raise TypeError(
            f"ref_model must be a lit_vhead value-head model like the policy, got {type(ref_model).__name__}; "
            "or pass None for a frozen copy of the policy."
        )
    if lr_scheduler is not None and not isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise TypeError(f"lr_scheduler must be a torch LRScheduler, got {type(lr_scheduler).__name__}.")
    return policy


def drop_unused_columns(dataset: Any, model: nn.Module) -> Any:
    """TRL's column filter of a ``datasets.Dataset``: keep the model's forward arguments plus ``label``, ``query`` and
    ``response``; other datasets are returned as they are."""
    datasets = sys.modules.get("datasets")  # a datasets.Dataset exists only once the package is loaded
    if datasets is None or not isinstance(dataset, datasets.Dataset):
        return dataset
    keep = [*inspect.signature(model.forward).parameters, "label", "query", "response"]
    return dataset.remove_columns([c for c in dataset.column_names if c not in keep])


def pad_token_id(tokenizer: Any, *groups: Sequence[Sequence], extra: int = 0) -> int:
    """The tokenizer's pad id, read when padding happens (TRL's tests set it after building the trainer);
    ``groups`` are padded to their longest member, plus ``extra`` columns."""
    pad = tokenizer.pad_token_id
    if pad is not None:
        return pad
    if not extra and all(len({len(x) for x in group}) <= 1 for group in groups):
        return 0  # nothing gets padded
    raise ValueError(
        f"The tokenizer ({type(tokenizer).__name__}) has no pad token, and these sequences need padding: "
        "set tokenizer.pad_token = tokenizer.eos_token (as TRL's examples do); padding is masked out everywhere."
    )


def check_step_inputs(
    batch_size: int | None,
    queries: Sequence[torch.Tensor],
    responses: Sequence[torch.Tensor],
    scores: Sequence[torch.Tensor | float],
    masks: Sequence[torch.Tensor] | None,
    vocab: int,
    encoder_decoder: bool,
    start_id: int | None,
    device: torch.device,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
    """``PPOTrainer._step_safety_checker`` (documented there): the inputs on ``device``, each score 0-d."""
    named = [("queries", queries), ("responses", responses), ("scores", scores)]
    if masks is not None:
        named.append(("response_masks", masks))
    for name, values in named:
        if not isinstance(values, (list, tuple)):
            raise ValueError(f"{name} must be a list of tensors, got {type(values).__name__}.")
        if batch_size is not None and len(values) != batch_size:
            raise ValueError(
                f"{name} has {len(values)} entries but PPOConfig.batch_size={batch_size}: pass exactly "
                "batch_size samples to step(), or set PPOConfig(batch_size=...) to your batch size."
            )
    for name, values in named[:2]:
        check_token_ids(name, values, vocab)
    checked = []
    for i, score in enumerate(scores):
        score = torch.as_tensor(score)
        if score.ndim > 1 or score.numel() != 1:
            raise ValueError(f"scores[{i}] must be one number per sample, got shape {tuple(score.shape)}.")
        checked.append(score.reshape(()).float())
    finite = torch.isfinite(torch.stack(checked))
    if not finite.all():
        bad = int((~finite).nonzero()[0, 0])
        raise ValueError(
            f"scores[{bad}] is {checked[bad].item()}: PPO needs finite scores (a NaN or inf would enter the "
            "running score moments for good); fix or drop that sample. Nothing was changed."
        )
    if masks is not None:
        for i, (mask, response) in enumerate(zip(masks, responses)):
            if torch.as_tensor(mask).numel() != len(response):
                raise ValueError(f"response_masks[{i}] has {torch.as_tensor(mask).numel()} entries and "
                                 f"responses[{i}] {len(response)}: give one mask value per response token.")
    if encoder_decoder:
        for i, response in enumerate(responses):
            if len(response) < 2 or (start_id is not None and int(response[0]) != start_id):
                raise ValueError(
                    f"responses[{i}] of a seq2seq policy must start with the decoder start token (id {start_id}) "
                    "and hold at least one generated token, as PPOTrainer.generate/model.generate return them; "
                    f"got {response[:4].tolist()}..."
                )
    return (
        [q.to(device) for q in queries],
        [r.to(device) for r in responses],
        [s.to(device) for s in checked],
        None if masks is None else [torch.as_tensor(m).to(device) for m in masks],
    )


def check_token_ids(name: str, values: Sequence, vocab: int) -> None:
    """One line naming the first bad entry: not a non-empty 1-D integer tensor, or an id outside ``0..vocab-1``."""
    for i, value in enumerate(values):
        if not isinstance(value, torch.Tensor) or value.ndim != 1 or value.numel() == 0:
            raise ValueError(f"{name}[{i}] must be a non-empty 1-D tensor of token ids, got {value!r}.")
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(
                f"{name}[{i}] holds {value.dtype} values ({[round(float(v), 4) for v in value[:4]]}...), not token "
                "ids: pass integer tensors (torch.long, as the tokenizer returns them); floats would be cut (65.7 "
                "becomes 65)."
            )
    ids = torch.cat([value.reshape(-1).to(torch.long).cpu() for value in values])
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        row = next(i for i, value in enumerate(values) if bool((value == bad).any()))
        raise ValueError(
            f"{name}[{row}] holds token id {bad}, outside the policy's vocabulary (0..{vocab - 1}): encode with the "
            "policy's own tokenizer, or resize the model's embeddings after adding tokens."
        )


def model_inputs(queries: Sequence[torch.Tensor], responses: Sequence[torch.Tensor], pad: int,
                 encoder_decoder: bool) -> dict[str, torch.Tensor]:
    """``PPOTrainer.prepare_model_inputs`` (documented there), on the CPU."""
    query_side = "right" if encoder_decoder else "left"
    query_ids, query_mask = pad_sequences([q.tolist() for q in queries], pad, query_side)
    response_ids, response_mask = pad_sequences([r.tolist() for r in responses], pad, "right")
    if encoder_decoder:
        inputs = {"input_ids": query_ids, "attention_mask": query_mask,
                  "decoder_input_ids": response_ids, "decoder_attention_mask": response_mask}
    else:
        inputs = {"input_ids": torch.cat([query_ids, response_ids], 1),
                  "attention_mask": torch.cat([query_mask, response_mask], 1)}
    return inputs


def forward_in_chunks(
    model: Any,
    queries: Sequence[torch.Tensor],
    responses: Sequence[torch.Tensor],
    model_inputs: dict[str, torch.Tensor],
    encoder_decoder: bool,
    chunk: int,
    forward: Callable = forward_window,
    return_logits: bool = False,
    response_masks: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``PPOTrainer.batched_forward_pass`` (documented there), ``chunk`` rows at a time through ``forward``."""
    if model.training:  # dropout off, as TRL (the core has set it already: skip the walk over every module)
        model.eval()
    batch = len(queries)
    if encoder_decoder:
        width = model_inputs["decoder_input_ids"].shape[1] - 1
        starts, lengths, skip = [0] * batch, [len(r) - 1 for r in responses], 1  # the start token is no label
    else:
        first = model_inputs["attention_mask"].argmax(1).tolist()  # left padding of each row
        starts = [f + len(q) for f, q in zip(first, queries)]
        width = model_inputs["input_ids"].shape[1] - min(starts)
        starts = [s - min(starts) for s in starts]
        lengths, skip = [len(r) for r in responses], 0
    begin, end = torch.tensor(starts)[:, None], torch.tensor(starts)[:, None] + torch.tensor(lengths)[:, None]
    columns = torch.arange(width)
    masks = ((columns >= begin) & (columns < end)).long()
    for row, given in enumerate(response_masks or []):
        masks[row, starts[row] : starts[row] + lengths[row]] *= torch.as_tensor(given)[skip:].long().cpu()
    parts = []
    for begin in range(0, batch, chunk):
        inputs = {key: value[begin : begin + chunk] for key, value in model_inputs.items()}
        if encoder_decoder:
            labels = inputs["decoder_input_ids"][:, 1:]
            for key in ("decoder_input_ids", "decoder_attention_mask"):
                if key in inputs:
                    inputs[key] = inputs[key][:, :-1]
        else:
            labels = inputs["input_ids"][:, -width:]
            if "position_ids" not in inputs:
                inputs["position_ids"] = position_ids_from_mask(inputs["attention_mask"])
            inputs["logits_to_keep"] = width + 1
        out = forward(model, inputs, labels, encoder_decoder)
        parts.append((out.logprobs, out.logits if return_logits else None, out.values))
    logprobs, logits, values = (None if column[0] is None else torch.cat(column) for column in zip(*parts))
    return logprobs, logits, values, masks.to(logprobs.device)


def step_rollout(queries: Sequence[torch.Tensor], responses: Sequence[torch.Tensor], pad: int, encoder_decoder: bool,
                 device: torch.device) -> Rollout:
    """The step's samples as the core's :class:`Rollout`: queries left-padded (right for an encoder), responses
    right-padded, ``rows`` numbering them."""
    decoder_start = None
    if encoder_decoder:
        decoder_start = torch.stack([r[:1] for r in responses])
        responses = [r[1:] for r in responses]
    query_side = "right" if encoder_decoder else "left"
    query_ids, query_mask = pad_sequences([q.tolist() for q in queries], pad, query_side)
    response_ids, response_mask = pad_sequences([r.tolist() for r in responses], pad, "right")
    return Rollout(
        query_ids.to(device), query_mask.to(device), response_ids.to(device), response_mask.to(device),
        decoder_start, rows=torch.arange(len(queries), device=device),
    )


def generated_tokens(rollout: Rollout, with_prompt: bool) -> list[torch.Tensor]:
    """What TRL's ``generate`` returns per row: causal ``[query | response]`` (or the response alone), seq2seq
    ``[decoder start | response]``; each response up to its ``response_mask``'s end."""
    outputs = []
    for row in range(rollout.response_ids.shape[0]):
        response = rollout.response_ids[row, : int(rollout.response_mask[row].sum())]
        if rollout.is_encoder_decoder:
            response = torch.cat([rollout.decoder_start[row], response])
        elif with_prompt:
            response = torch.cat([rollout.query_ids[row][rollout.query_mask[row].bool()], response])
        outputs.append(response)
    return outputs
