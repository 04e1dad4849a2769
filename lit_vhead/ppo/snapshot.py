"""Undoing a PPO update that fails midway (a non-finite loss after some optimizer steps).

A PPO step takes ``ppo_epochs x minibatches`` optimizer steps; a loss that turns NaN/inf in a later minibatch would
leave the earlier ones applied. :class:`UpdateSnapshot` copies what the optimizer changes (its parameters and its
state, e.g. Adam's moments) before the first of them, and puts it back exactly.

The copy is as large as the trainable weights and the optimizer state (a LoRA policy: the adapters'; a full
fine-tune with Adam: three times the weights in fp32), so it goes to an unlinked temporary file (``ppo.undo_dir``,
default the system's temp directory), written with direct I/O where the filesystem has it: past the page cache, so it
takes neither the process's memory nor the kernel's (a buffered write of GBs under memory pressure costs seconds of
CPU in page reclaim). It is only read back when a step fails. Nothing is left on disk, even after a kill.
``PPOCore`` takes it only when a step has more than one optimizer step to undo, and not at all with
``ppo.undo_failed_update=false``.
"""

from __future__ import annotations

import copy
import errno
import mmap
import os
import tempfile
import threading
from typing import Any, BinaryIO

import torch

from lit_vhead.ppo.optimizer_in_backward import unwrap

_BUFFER = 16 << 20  # bytes per write/read call; a multiple of the 4 KiB alignment that direct I/O needs


def open_undo_file(directory: str | None) -> BinaryIO:
    """An unlinked file in ``directory`` (default: the system's temp directory), opened for direct I/O where the
    filesystem allows it (else buffered)."""
    directory = directory or tempfile.gettempdir()
    if hasattr(os, "O_TMPFILE") and hasattr(os, "O_DIRECT"):
        try:
            return os.fdopen(os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_DIRECT, 0o600), "r+b", buffering=0)
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.EISDIR):
                raise
    return tempfile.TemporaryFile(dir=directory, prefix="lit_vhead-undo-", buffering=0)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of ``tensor`` (an FSDP2 DTensor's shard), detached."""
    tensor = tensor.detach()
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``'s bytes as a flat uint8 CPU tensor (a view for a contiguous CPU tensor, else a copy)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        tensor = tensor.to("cpu").contiguous()
    return tensor.reshape(-1).view(torch.uint8)


def _staging_buffer() -> tuple[mmap.mmap, torch.Tensor]:
    """A page-aligned buffer (as direct I/O needs) and a uint8 tensor over it: copies into and out of it run in
    torch, without the GIL, so the writer thread does not stall the caller's Python."""
    buffer = mmap.mmap(-1, _BUFFER)
    return buffer, torch.frombuffer(buffer, dtype=torch.uint8)


class UpdateSnapshot:
    """The parameters, per-parameter state and hyper-parameters of ``optimizer`` (Lightning's/Fabric's wrapper or
    a torch optimizer) at construction, the tensors' bytes written in the background to an unlinked file in
    ``directory``; :meth:`wait` for it before the optimizer changes anything, :meth:`restore` puts them back and drops
    any gradients, :meth:`close` frees the file."""

    def __init__(self, optimizer: Any, directory: str | None = None) -> None:
        self.optimizer = unwrap(optimizer)
        self.directory = directory or tempfile.gettempdir()
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.file = open_undo_file(directory)
        # The state's tensors are kept (the optimizer updates them in place) and their bytes written.
        self.state = {p: {k: v if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in s.items()}
                      for p, s in self.optimizer.state.items()}
        self.tensors = [*self.params, *(v for s in self.state.values() for v in s.values()
                                        if isinstance(v, torch.Tensor))]  # in the file's order
        groups = self.optimizer.param_groups
        self.groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in groups]
        self._error: Exception | None = None
        self._closing = False
        # The bytes are written while the caller's passes that only read the weights run (generation, the rollout's
        # forward passes); :meth:`wait` must return before anything changes the weights or the optimizer state.
        self._writer = threading.Thread(target=self._write_all, name="lit_vhead-undo-copy", daemon=True)
        self._writer.start()

    def _write_all(self) -> None:
        """The tensors' bytes back to back, through an aligned buffer written in whole blocks."""
        try:
            buffer, staging = _staging_buffer()
            filled = offset = 0
            for tensor in self.tensors:
                data, begin = _flat_bytes(_local(tensor)), 0
                while begin < len(data) and not self._closing:
                    n = min(len(data) - begin, _BUFFER - filled)
                    staging[filled : filled + n].copy_(data[begin : begin + n])
                    filled, begin = filled + n, begin + n
                    if filled == _BUFFER:
                        offset += self._write(buffer, offset)
                        filled = 0
            if filled:
                self._write(memoryview(buffer)[: -(-filled // mmap.PAGESIZE) * mmap.PAGESIZE], offset)
        except Exception as error:  # re-raised by wait(), in the caller's thread
            self._error = error

    def _write(self, block: Any, offset: int) -> int:
        written = os.pwrite(self.file.fileno(), block, offset)
        if written < len(block):  # a regular file takes fewer bytes than asked only when its disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return written

    def wait(self) -> None:
        """Return once the copy is whole; a failed write (e.g. a full disk) raises here, before any change."""
        self._writer.join()
        if self._error is not None and not isinstance(self._error, OSError):
            self.close()
            raise self._error
        if self._error is not None:
            written = os.fstat(self.file.fileno()).st_size / 2**20
            self.close()
            raise OSError(
                f"Could not write the copy that undoes a failed PPO update ({written:.0f} MiB written) to "
                f"{self.directory}: {self._error}. Nothing was changed. Free space there, "
                "point ppo.undo_dir at a directory with room, or set ppo.undo_failed_update=false."
            ) from self._error

    def _read_all(self) -> None:
        """Put the file's bytes back into the tensors, in place and in the order written (a parameter stays the
        same object)."""
        buffer, staging = _staging_buffer()
        loaded = used = offset = 0
        for tensor in self.tensors:
            tensor = _local(tensor)
            direct = tensor.device.type == "cpu" and tensor.is_contiguous()
            target = tensor if direct else torch.empty(tensor.shape, dtype=tensor.dtype)
            data, begin = target.reshape(-1).view(torch.uint8), 0
            while begin < len(data):
                if used == loaded:
                    loaded, used = os.preadv(self.file.fileno(), [buffer], offset), 0
                    if not loaded:
                        raise OSError("the undo file ended before every tensor was read back")
                    offset += loaded
                n = min(len(data) - begin, loaded - used)
                data[begin : begin + n].copy_(staging[used : used + n])
                used, begin = used + n, begin + n
            if not direct:
                tensor.copy_(target)

    @torch.no_grad()
    def restore(self) -> None:
        self.wait()
        self._read_all()
        state = {p: {k: v if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in s.items()}
                 for p, s in self.state.items()}
        self.optimizer.state.clear()
        self.optimizer.state.update(state)
        for group, saved in zip(self.optimizer.param_groups, self.groups):
            group.update(saved)
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Stop the write if it is still going (the step ended early, e.g. on an error) and free the file."""
        self._closing = True
        self._writer.join()
        self.file.close()
