"""transformers' progress bars during one load or save, shown for big models only."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# transformers' per-tensor progress bars ("Loading weights", "Writing model shards") are shown for big models only.
PROGRESS_BAR_MIN_BYTES = 2**30


def weights_bytes(path: str) -> float:
    """Bytes of the weight files in a local dir; infinite for a hub id (a download worth a progress bar)."""
    if not os.path.isdir(path):
        return float("inf")
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.suffix in (".safetensors", ".bin"))


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' progress bars on or off for the duration of one load or save."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if was_enabled and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled and not enabled:
            hf_logging.enable_progress_bar()


def progress_bars_for_load(path: str | os.PathLike) -> contextlib.AbstractContextManager[None]:
    """transformers' progress bars for a load from ``path``: shown for big models (or a download) only."""
    return progress_bars(weights_bytes(str(path)) > PROGRESS_BAR_MIN_BYTES)


def progress_bars_for_save(model: Any) -> contextlib.AbstractContextManager[None]:
    """transformers' progress bars for a save of ``model``'s parameters: shown for big models only."""
    return progress_bars(sum(p.numel() * p.element_size() for p in model.parameters()) > PROGRESS_BAR_MIN_BYTES)
