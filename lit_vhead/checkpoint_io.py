"""``AtomicCheckpointIO``: Lightning checkpoints written as temp file in the same directory + fsync + rename.

Lightning 2.6's ``TorchCheckpointIO`` saves through an fsspec transaction: the bytes go to a temporary file in the
system temp dir, which is then moved onto the checkpoint path. When that dir is on another filesystem than the run
dir (a tmpfs ``/tmp``, a network run dir), the move is a copy straight into ``last.ckpt``: a kill during it leaves a
torn ``last.ckpt`` (and the temp file leaks), a full disk leaves a truncated checkpoint at its final path, and nothing
is fsynced. This plugin writes local checkpoints with :func:`lit_vhead.atomic.atomic_file` instead, so every
checkpoint path holds a complete checkpoint or none; remote paths (``s3://``...) keep Lightning's own handling.

``python train.py`` uses it (``configs/trainer``); with your own Trainer pass
``lightning.Trainer(plugins=[AtomicCheckpointIO()])``.
"""

from __future__ import annotations

from typing import Any

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

from lit_vhead.atomic import atomic_file


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic and durable (loading and removing are unchanged)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        fs, local_path = url_to_fs(str(path))
        if storage_options is not None or not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        try:
            with atomic_file(local_path) as file:
                torch.save(checkpoint, file)
        except (OSError, RuntimeError) as err:  # torch's zip writer hides a failed write behind its own error
            cause = err if isinstance(err, OSError) else err.__context__
            if not isinstance(cause, OSError):
                raise
            raise OSError(cause.errno, f"Cannot write the checkpoint '{local_path}': {cause.strerror}. Nothing was "
                          "written there; the checkpoints saved before are intact.") from err
        return None
