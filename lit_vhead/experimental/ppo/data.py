"""The prompts of TRL 0.29.1's experimental ``PPOTrainer`` runs: which rows each PPO step takes (a deterministic
shuffle, so a resumed run needs no loader state) and how they are collated into the PPO module's left-padded batch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from lit_vhead.data import step_seed
from lit_vhead.sequence import pad_sequences


class StepBatches(Sampler[list[int]]):
    """The prompt indices of each PPO step: passes over the data set in a shuffled order (TRL's ``shuffle=True,
    drop_last=True`` loader, repeated), each pass's order drawn from ``(seed, pass, rank)``, so step ``s`` always gets
    the same prompts (an exact resume needs no loader state). Lightning calls ``set_epoch(step)`` before each step."""

    def __init__(self, num_prompts: int, batch_size: int, seed: int, rank: int = 0) -> None:
        if num_prompts < batch_size:
            raise ValueError(
                f"train_dataset has {num_prompts} prompts, fewer than one rollout batch (local_batch_size = "
                f"per_device_train_batch_size * gradient_accumulation_steps = {batch_size}); lower the batch size."
            )
        self.num_prompts, self.batch_size, self.seed, self.rank = num_prompts, batch_size, seed, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self, step: int) -> list[int]:
        """The prompts of PPO step ``step``."""
        per_pass = self.num_prompts // self.batch_size
        passes, within = divmod(step, per_pass)
        generator = torch.Generator().manual_seed(step_seed(self.seed, passes, self.rank))
        order = torch.randperm(self.num_prompts, generator=generator)
        return order[within * self.batch_size : (within + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        yield self.indices(self.epoch)

    def __len__(self) -> int:
        return 1


class QueryCollator:
    """The user's collator (TRL's default: ``DataCollatorWithPadding``), its ``input_ids`` re-padded on the left into
    the ``query_ids``/``query_mask`` the PPO module takes (padding found by ``attention_mask``, else by the pad id)."""

    def __init__(self, collator: Callable, pad_token_id: int) -> None:
        self.collator, self.pad_token_id = collator, pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        missing = [i for i, row in enumerate(rows) if "input_ids" not in row]
        if missing:
            raise ValueError(
                f"train/eval dataset rows need an 'input_ids' column (tokenised prompts), as TRL's PPOTrainer; row "
                f"{missing[0]} has {sorted(rows[missing[0]])}."
            )
        batch = self.collator([{"input_ids": row["input_ids"]} for row in rows])
        ids = torch.as_tensor(batch["input_ids"])
        mask = torch.as_tensor(batch["attention_mask"]) if "attention_mask" in batch else ids != self.pad_token_id
        queries = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        if any(not q for q in queries):
            raise ValueError("A prompt in the data set is empty (no input_ids): every prompt needs a token.")
        ids, mask = pad_sequences(queries, self.pad_token_id, "left")
        return {"query_ids": ids, "query_mask": mask}



def check_dataset(dataset: Any, name: str) -> None:
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__") or len(dataset) == 0:
        raise ValueError(f"{name} must be a non-empty data set of tokenised prompts (rows with 'input_ids').")
    row = dataset[0]
    if not isinstance(row, dict) or "input_ids" not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(
            f"{name} rows need an 'input_ids' column (tokenised prompts, as TRL's PPOTrainer); the first row has "
            f"{keys}. Tokenise it first, e.g. dataset.map(lambda x: tokenizer(x['prompt']), remove_columns=...)."
        )
