"""Prompts for PPO rollouts: one batch of prompts per PPO step, drawn deterministically from (seed, step, rank).

A PPO step is one Lightning epoch of one batch, so checkpoints fall on PPO-step boundaries and a resumed run draws
exactly the prompts the uninterrupted run would have drawn; each rank draws its own prompts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from lit_vhead.sequence import pad_sequences

BUILTIN_PROMPTS = [
    "The movie was",
    "I think that",
    "Once upon a time",
    "The weather today",
    "My favourite food is",
    "In the morning we",
    "The best thing about",
    "She opened the door and",
    "This book is",
    "When I was young",
    "The city at night",
    "He said that the",
    "Our team will",
    "The little robot",
    "After the rain",
    "Every summer we",
]


def step_seed(seed: int, step: int, rank: int) -> int:
    """A distinct, reproducible seed for each (run seed, PPO step, rank)."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a UTF-8 ``.txt`` (one per line) or ``.jsonl`` (``{"prompt": ...}`` per line) file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r}: no such file (expected .txt or .jsonl prompts).")
    data = file.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # UTF-8, with or without a byte-order mark
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(f"prompts file {str(path)!r}, line {line}: byte 0x{data[err.start]:02x} is not UTF-8; save "
                         "the file as UTF-8.") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"prompts file {str(path)!r} holds no prompts (it is empty or blank); one prompt per line.")
    if file.suffix == ".jsonl":
        try:
            return [json.loads(line)["prompt"] for line in lines]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"prompts file {str(path)!r}: every line must be a JSON object with a 'prompt' key "
                             f"({type(err).__name__}: {err}).") from None
    return lines


def _dataset_prompts(dataset: Any, text_column: str | None) -> list[str]:
    """The prompt column of a ``datasets.Dataset``."""
    columns = list(dataset.column_names)
    column = text_column or next((c for c in ("prompt", "query", "text") if c in columns), None)
    if column not in columns:
        raise ValueError(
            f"The dataset has no {text_column or 'prompt/query/text'!r} column (columns: {columns}); pass "
            "text_column=<the column with the prompt text>."
        )
    return list(dataset[column])


def as_prompts(prompts: Any, text_column: str | None = None) -> list[str]:
    """A list of prompt strings from a list, a .txt/.jsonl path, a ``datasets.Dataset``, or None (built-ins)."""
    if prompts is None:
        return list(BUILTIN_PROMPTS)
    if isinstance(prompts, (str, os.PathLike)):
        return load_prompts(prompts)
    if hasattr(prompts, "column_names"):
        return _dataset_prompts(prompts, text_column)
    if isinstance(prompts, Sequence) and all(isinstance(p, str) for p in prompts):
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is an empty list; give at least one prompt.")
        return prompts
    raise TypeError(
        "prompts must be a list of strings, a .txt/.jsonl path or a datasets.Dataset with a text column; got "
        f"{type(prompts).__name__}."
    )


class PPOStepSampler(DistributedSampler):
    """The prompt indices of one PPO step on one rank (= one epoch of one batch), drawn from (seed, epoch, rank).

    Lightning calls ``set_epoch`` before every epoch, so each PPO step gets its own draw. It is a
    ``DistributedSampler`` (each rank draws its own prompts), so Lightning does not wrap it in another.
    """

    def __init__(self, num_prompts: int, batch_size: int, seed: int = 0, rank: int = 0) -> None:  # noqa: D107
        self.num_prompts, self.batch_size, self.seed, self.rank = num_prompts, batch_size, seed, rank
        self.epoch = 0

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(step_seed(self.seed, self.epoch, self.rank))
        yield from torch.randint(self.num_prompts, (self.batch_size,), generator=generator).tolist()

    def __len__(self) -> int:
        return self.batch_size


class PromptDataModule(L.LightningDataModule):
    """The prompts of PPO's rollouts: one batch per PPO step, padded for the policy (left for causal models).

    Args:
        prompts: a list of strings, a ``.txt``/``.jsonl`` path, a ``datasets.Dataset`` (``text_column``), or None for
            built-in short English prompts.
        tokenizer: the policy's tokenizer; None uses the ``PPOModule``'s.
        batch_size: prompts per PPO step and process; None follows ``ppo.batch_size``.
        max_prompt_tokens: longer prompts are an error (also bounded by the model's context minus the response).
        seed: None follows ``ppo.seed``.
    """

    def __init__(
        self,
        prompts: Any = None,
        tokenizer: Any = None,
        batch_size: int | None = None,
        max_prompt_tokens: int = 64,
        seed: int | None = None,
        text_column: str | None = None,
    ) -> None:
        super().__init__()
        self.prompts = as_prompts(prompts, text_column)
        for prompt in self.prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompts: {prompt!r} is not a non-empty string; every prompt needs text.")
        if batch_size is not None and (type(batch_size) is not int or batch_size < 1):
            raise ValueError(f"batch_size={batch_size!r} must be an int >= 1, or None to follow ppo.batch_size.")
        if tokenizer is not None:
            from lit_vhead.builders import check_tokenizer

            check_tokenizer(tokenizer)
        self.given = {"tokenizer": tokenizer, "batch_size": batch_size, "seed": seed}  # None: follow the PPOModule
        self.tokenizer, self.batch_size, self.seed = tokenizer, batch_size, seed
        self.max_prompt_tokens = max_prompt_tokens
        self.padding_side = "left"
        self.query_ids: list[list[int]] = []

    def setup(self, stage: str) -> None:
        self.prepare_for(self.trainer.lightning_module if self.trainer is not None else None)

    def prepare_for(self, module: Any) -> None:
        """Follow the PPO module (tokenizer, batch size, seed, padding side), then tokenise and check every prompt."""
        ppo, given = getattr(module, "ppo", None), self.given
        self.tokenizer = given["tokenizer"] if given["tokenizer"] is not None else getattr(module, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError("PromptDataModule needs a tokenizer: PromptDataModule(prompts, tokenizer).")
        if ppo is not None and given["batch_size"] not in (None, ppo.batch_size):
            raise ValueError(
                f"PromptDataModule(batch_size={given['batch_size']}) disagrees with ppo.batch_size={ppo.batch_size} "
                "(one batch is one PPO step); leave batch_size unset to follow ppo.batch_size."
            )
        self.batch_size = given["batch_size"] or (ppo.batch_size if ppo is not None else 32)
        self.seed = given["seed"] if given["seed"] is not None else (ppo.seed if ppo is not None else 0)
        is_encoder_decoder = bool(getattr(module, "is_encoder_decoder", False))
        self.padding_side = "right" if is_encoder_decoder else "left"
        limit = getattr(module, "prompt_limit", lambda: None)()
        self.tokenize(add_special_tokens=is_encoder_decoder, max_context=limit)

    def tokenize(self, add_special_tokens: bool = False, max_context: int | None = None) -> None:
        """Tokenise the prompts now, so over-long or empty prompts fail before any model runs.

        Seq2seq encoders expect their special tokens (T5's eos); causal prompts get none (the response follows).
        """
        if max_context is not None and max_context < 1:
            raise ValueError(
                "ppo.generation.max_new_tokens leaves no room for a prompt in the model's context "
                f"({max_context} tokens left); lower it."
            )
        limit = self.max_prompt_tokens if max_context is None else min(self.max_prompt_tokens, max_context)
        self.query_ids = [self.tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in self.prompts]
        for prompt, ids in zip(self.prompts, self.query_ids):
            if not ids:
                raise ValueError(f"prompts: {prompt!r} tokenises to nothing.")
            if len(ids) > limit:
                raise ValueError(
                    f"prompts: {prompt[:40]!r}... has {len(ids)} tokens, more than the limit {limit} "
                    "(data.max_prompt_tokens, or the model's context minus ppo.generation.max_new_tokens); shorten "
                    "it or raise the limit."
                )

    def collate(self, batch: list[list[int]]) -> dict[str, torch.Tensor]:
        return collate_prompts(batch, self.tokenizer.pad_token_id, self.padding_side)

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        sampler = PPOStepSampler(len(self.query_ids), self.batch_size, self.seed, rank)
        return DataLoader(self.query_ids, sampler=sampler, batch_size=self.batch_size, collate_fn=self.collate)


def check_prompt_batch(batch: Any, batch_size: int, left_padded: bool) -> None:
    """A clear error for a prompt batch PPO cannot use (e.g. from a user's own DataLoader): it must be a dict of
    ``query_ids`` and ``query_mask`` tensors [B, L], B = ``ppo.batch_size``, padded on the left for causal policies."""
    if not isinstance(batch, Mapping) or not {"query_ids", "query_mask"} <= set(batch):
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise TypeError(
            f"A prompt batch must be a dict with 'query_ids' and 'query_mask' tensors [batch, tokens]; got {keys}. "
            "Use lit_vhead.PromptDataModule, or lit_vhead.data.collate_prompts in your DataLoader's collate_fn."
        )
    ids, mask = batch["query_ids"], batch["query_mask"]
    if not (torch.is_tensor(ids) and torch.is_tensor(mask)) or ids.dim() != 2 or ids.shape != mask.shape:
        raise TypeError(
            "A prompt batch's 'query_ids' and 'query_mask' must be 2-d tensors of the same shape [batch, tokens]; got "
            f"{getattr(ids, 'shape', type(ids).__name__)} and {getattr(mask, 'shape', type(mask).__name__)}."
        )
    if ids.shape[0] != batch_size:
        raise ValueError(
            f"The prompt batch holds {ids.shape[0]} prompts but ppo.batch_size={batch_size}: one batch is one PPO "
            "step, so build the DataLoader with batch_size=ppo.batch_size (PromptDataModule does)."
        )
    if left_padded and bool((mask[:, -1] == 0).any()):
        raise ValueError(
            "The prompt batch is right-padded (query_mask ends in 0); causal policies need left-padded prompts. "
            "Use lit_vhead.PromptDataModule, or collate_prompts(..., side='left') in your collate function."
        )


def collate_prompts(queries: Sequence[Sequence[int]], pad_id: int, side: str) -> dict[str, torch.Tensor]:
    """A prompt batch from token-id lists: ``query_ids`` and ``query_mask`` [B, L], padded on ``side`` (a
    ``collate_fn`` for your own DataLoader; causal policies need ``side="left"``)."""
    ids, mask = pad_sequences(queries, pad_id, side)
    return {"query_ids": ids, "query_mask": mask}
