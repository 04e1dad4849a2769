"""Undoing a PPO update that fails midway (a non-finite loss after some optimizer steps).

A PPO step takes ``ppo_epochs x minibatches`` optimizer steps; a loss that turns NaN/inf in a later minibatch would
leave the earlier ones applied. :class:`UpdateSnapshot` copies what the optimizer changes (its parameters and its
state, e.g. Adam's moments) before the first of them, and puts it back exactly.

The copy is as large as the trainable weights and the optimizer state (a LoRA policy: the adapters'; a full
fine-tune with Adam: three times the weights in fp32), so it is written to an unlinked temporary file
(``ppo.undo_dir``, default the system's temp directory): the operating system's page cache holds it, which it can
write out and reclaim, instead of the process's own memory, and it is only read back when a step fails. Nothing is
left on disk, even after a kill. ``PPOCore`` takes it only when a step has more than one optimizer step to undo,
and not at all with ``ppo.undo_failed_update=false``.
"""

from __future__ import annotations

import copy
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from lit_vhead.ppo.optimizer_in_backward import unwrap

_CHUNK = 1 << 30  # one write/read call moves at most this many bytes (Linux caps a call at ~2 GiB)


@dataclass(eq=False)
class _Stored:
    """A tensor to put back, and where its bytes are in the undo file."""

    tensor: torch.Tensor
    offset: int = -1


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of ``tensor`` (an FSDP2 DTensor's shard), detached."""
    tensor = tensor.detach()
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _bytes(tensor: torch.Tensor) -> memoryview:
    """A view of ``tensor``'s bytes (no copy for a contiguous CPU tensor)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        tensor = tensor.to("cpu").contiguous()
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


class UpdateSnapshot:
    """The parameters, per-parameter state and hyper-parameters of ``optimizer`` (Lightning's/Fabric's wrapper or
    a torch optimizer) at construction, the tensors written in the background to an unlinked file in ``directory``;
    :meth:`wait` for it before the optimizer changes anything, :meth:`restore` puts them back and drops any
    gradients, :meth:`close` frees the file."""

    def __init__(self, optimizer: Any, directory: str | None = None) -> None:
        self.optimizer = unwrap(optimizer)
        self.directory = directory
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.file: BinaryIO = tempfile.TemporaryFile(dir=directory, prefix="lit_vhead-undo-", buffering=0)
        self.weights = [_Stored(p) for p in self.params]
        # The state's tensors are kept (the optimizer updates them in place) and their bytes written.
        self.state = {p: {k: _Stored(v) if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in s.items()}
                      for p, s in self.optimizer.state.items()}
        groups = self.optimizer.param_groups
        self.groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in groups]
        self._error: Exception | None = None
        # The bytes are written while the caller's passes that only read the weights run (the rollout's forward
        # passes); :meth:`wait` must return before anything changes the weights or the optimizer state.
        self._writer = threading.Thread(target=self._write_all, name="lit_vhead-undo-copy", daemon=True)
        self._writer.start()

    def _write_all(self) -> None:
        try:
            for stored in [*self.weights, *(v for s in self.state.values() for v in s.values())]:
                if isinstance(stored, _Stored):
                    self._write(stored)
        except Exception as error:  # re-raised by wait(), in the caller's thread
            self._error = error

    def wait(self) -> None:
        """Return once the copy is whole; a failed write (e.g. a full disk) raises here, before any change."""
        self._writer.join()
        if self._error is not None and not isinstance(self._error, OSError):
            self.close()
            raise self._error
        if self._error is not None:
            written = self.file.seek(0, 2) / 2**20
            self.close()
            raise OSError(
                f"Could not write the copy that undoes a failed PPO update ({written:.0f} MiB written) to "
                f"{self.directory or tempfile.gettempdir()}: {self._error}. Nothing was changed. Free space there, "
                "point ppo.undo_dir at a directory with room, or set ppo.undo_failed_update=false."
            ) from self._error

    def _write(self, stored: _Stored) -> None:
        stored.offset = self.file.tell()
        data = _bytes(_local(stored.tensor))
        for begin in range(0, len(data), _CHUNK):
            chunk = data[begin : begin + _CHUNK]
            while chunk:
                chunk = chunk[self.file.write(chunk) :]

    def _read_back(self, stored: _Stored) -> torch.Tensor:
        """Put ``stored``'s bytes back into its tensor, in place (a parameter stays the same object)."""
        tensor = _local(stored.tensor)
        direct = tensor.device.type == "cpu" and tensor.is_contiguous()
        target = tensor if direct else torch.empty(tensor.shape, dtype=tensor.dtype)
        data = memoryview(target.reshape(-1).view(torch.uint8).numpy())
        self.file.seek(stored.offset)
        done = 0
        while done < len(data):
            read = self.file.readinto(data[done : done + _CHUNK])
            if not read:
                raise OSError(f"the undo file ended early ({done} of {len(data)} bytes of a tensor read)")
            done += read
        if not direct:
            tensor.copy_(target)
        return stored.tensor

    @torch.no_grad()
    def restore(self) -> None:
        self.wait()
        for stored in self.weights:
            self._read_back(stored)
        state = {p: {k: self._read_back(v) if isinstance(v, _Stored) else copy.deepcopy(v) for k, v in s.items()}
                 for p, s in self.state.items()}
        self.optimizer.state.clear()
        self.optimizer.state.update(state)
        for group, saved in zip(self.optimizer.param_groups, self.groups):
            group.update(saved)
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        self._writer.join()
        self.file.close()
