"""The cost of the copy that undoes a failed PPO update (``ppo.undo_failed_update``), written as lit_vhead writes it
(``UpdateSnapshot``: direct I/O to an unlinked file, past the page cache) and as a buffered write through the page
cache, for an Adam optimizer over ``--gb`` GB of copy (weights + two moments), optionally with ``--hold-gb`` GB of
other memory held and touched first (as other processes or a big model would), which is where buffered writes pay
for page reclaim.

    python bench/undo_copy.py --gb 3 --hold-gb 14     # GPT-2 small + critic=model's copy, a machine short of memory
"""

from __future__ import annotations

import argparse
import fcntl
import os
import tempfile
import time

import torch

from lit_vhead.kernels import cpu_name
from lit_vhead.ppo.snapshot import UpdateSnapshot, open_undo_file


def direct(optimizer: torch.optim.Optimizer, directory: str | None) -> None:
    snapshot = UpdateSnapshot(optimizer, directory)
    snapshot.wait()
    snapshot.close()


def buffered(optimizer: torch.optim.Optimizer, directory: str | None) -> None:
    tensors = [p for g in optimizer.param_groups for p in g["params"]]
    tensors += [v for s in optimizer.state.values() for v in s.values() if v.dim()]
    with tempfile.TemporaryFile(dir=directory, buffering=0) as file:
        for tensor in tensors:
            data = memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy())
            while data:
                data = data[file.write(data[: 1 << 30]) :]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=3.0, help="size of the copy: weights + Adam's two moments")
    parser.add_argument("--hold-gb", type=float, default=0.0, help="other memory to hold (touched) while writing")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where the file goes (default: the system's temp directory)")
    args = parser.parse_args()
    held = torch.ones(int(args.hold_gb * 2**30 / 4)) if args.hold_gb else None
    params = [torch.nn.Parameter(torch.randn(int(args.gb * 2**30 / 12 / 8))) for _ in range(8)]
    optimizer = torch.optim.Adam(params)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    file = open_undo_file(args.dir)
    kind = "direct I/O" if fcntl.fcntl(file.fileno(), fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0) else "buffered"
    file.close()
    print(f"CPU: {cpu_name()}; copy {args.gb:g} GB, {args.hold_gb:g} GB held; lit_vhead's file: {kind}")
    for _ in range(args.repeats):
        for name, write in (("lit_vhead (UpdateSnapshot)", direct), ("buffered write", buffered)):
            wall, cpu = time.perf_counter(), time.process_time()
            write(optimizer, args.dir)
            print(f"{name:28s} {time.perf_counter() - wall:6.2f} s wall {time.process_time() - cpu:6.2f} s CPU")
    del held


if __name__ == "__main__":
    main()
