"""Prompts for PPO rollouts: one batch of prompts per PPO step, drawn deterministically from (seed, step, rank).

A PPO step is one Lightning epoch of one batch, so checkpoints fall on PPO-step boundaries and a resumed run draws
exactly the prompts the uninterrupted run would have drawn; each rank draws its own prompts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

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


def load_prompts(path: str) -> list[str]:
    """Prompts from a ``.txt`` (one per line) or ``.jsonl`` (``{"prompt": ...}`` per line) file."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"data.path={path!r}: no such file (expected .txt or .jsonl prompts).")
    lines = [line for line in file.read_text().splitlines() if line.strip()]
    if file.suffix == ".jsonl":
        return [json.loads(line)["prompt"] for line in lines]
    return lines


class PPOStepSampler(Sampler[int]):
    """The prompt indices of one PPO step (= one epoch of one batch), drawn from (seed, epoch, rank).

    Lightning calls ``set_epoch`` on a DataLoader's ``sampler`` before every epoch, so each PPO step gets its own draw.
    """

    def __init__(self, num_prompts: int, batch_size: int, seed: int = 0, rank: int = 0) -> None:
        self.num_prompts, self.batch_size, self.seed, self.rank = num_prompts, batch_size, seed, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(step_seed(self.seed, self.epoch, self.rank))
        yield from torch.randint(self.num_prompts, (self.batch_size,), generator=generator).tolist()

    def __len__(self) -> int:
        return self.batch_size


class PromptDataModule(L.LightningDataModule):
    """Tokenised prompts, collated into padded ``query_ids``/``query_mask`` batches on the tokenizer's padding side."""

    def __init__(
        self,
        prompts: Sequence[str] | None = None,
        path: str | None = None,
        batch_size: int = 32,
        max_prompt_tokens: int = 64,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.prompts = list(prompts) if prompts else (load_prompts(path) if path else list(BUILTIN_PROMPTS))
        if not self.prompts or any(not p.strip() for p in self.prompts):
            raise ValueError("data: the prompt list is empty or has an empty prompt; every prompt needs text.")
        self.batch_size, self.max_prompt_tokens, self.seed = batch_size, max_prompt_tokens, seed
        self.tokenizer = None
        self.query_ids: list[list[int]] = []

    def attach_tokenizer(self, tokenizer, max_context: int | None = None) -> None:
        """Tokenise the prompts now, so over-long or empty prompts fail before any model runs."""
        if max_context is not None and max_context < 1:
            raise ValueError(
                "ppo.generation.max_new_tokens leaves no room for a prompt in the model's context "
                f"({max_context} tokens left); lower it."
            )
        self.tokenizer = tokenizer
        add_special = tokenizer.padding_side == "right"  # seq2seq encoders expect their eos; causal prompts don't
        self.query_ids = [tokenizer(p, add_special_tokens=add_special)["input_ids"] for p in self.prompts]
        for prompt, ids in zip(self.prompts, self.query_ids):
            if not ids:
                raise ValueError(f"data: the prompt {prompt!r} tokenises to nothing.")
            limit = self.max_prompt_tokens if max_context is None else min(self.max_prompt_tokens, max_context)
            if len(ids) > limit:
                raise ValueError(
                    f"data: the prompt {prompt[:40]!r}... has {len(ids)} tokens, more than the limit {limit} "
                    "(data.max_prompt_tokens or the model's context minus the response length); shorten it."
                )

    def collate(self, batch: list[list[int]]) -> dict[str, torch.Tensor]:
        return pad_queries(batch, self.tokenizer.pad_token_id, self.tokenizer.padding_side)

    def train_dataloader(self) -> DataLoader:
        if self.tokenizer is None:
            raise RuntimeError("PromptDataModule.attach_tokenizer(...) must be called before training.")
        rank = self.trainer.global_rank if self.trainer is not None else 0
        sampler = PPOStepSampler(len(self.query_ids), self.batch_size, self.seed, rank)
        return DataLoader(self.query_ids, sampler=sampler, batch_size=self.batch_size, collate_fn=self.collate)


def pad_queries(queries: Sequence[Sequence[int]], pad_id: int, side: str) -> dict[str, torch.Tensor]:
    """Pad token-id lists into ``query_ids`` and ``query_mask`` [B, L] on the given side."""
    width = max(len(q) for q in queries)
    ids = torch.full((len(queries), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(queries), width), dtype=torch.long)
    for row, query in enumerate(queries):
        span = slice(width - len(query), width) if side == "left" else slice(0, len(query))
        ids[row, span] = torch.as_tensor(query, dtype=torch.long)
        mask[row, span] = 1
    return {"query_ids": ids, "query_mask": mask}
