"""Token sequences as padded ``[B, T]`` tensors with a 0/1 mask: padding, positions, the last real token."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token-id lists (queries or responses) into ``(ids, mask)``, each ``[B, L]``, on the given side."""
    if side not in ("left", "right"):
        raise ValueError(f"pad side {side!r} must be 'left' or 'right'.")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token (0 at padding before it), so a left-padded row gets the
    positions it has alone (trl#469)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def last_token_index(
    mask: torch.Tensor, error: str = "A row of the mask is all padding: there is no last token to read."
) -> torch.Tensor:
    """Index of the last position with ``mask == 1`` in each row (``[B, T] -> [B]``), for left, right or no padding.
    A row with no real token raises ``ValueError(error)``."""
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).amax(dim=-1)
    if (last < 0).any():
        raise ValueError(error)
    return last


def gather_last(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The value (or score) at each row's last real token: ``[B, T, ...] -> [B, ...]``."""
    index = last_token_index(mask)
    return values[torch.arange(values.shape[0], device=values.device), index]


def mask_values(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the values at padding positions (``mask == 0``) so no caller reads them by accident."""
    if mask is None:
        return values
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match values shape {tuple(values.shape)}.")
    return values.masked_fill(mask == 0, 0.0)
