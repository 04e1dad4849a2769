"""PPOStats: running means under TRL's names, reset between PPO steps, reduced across ranks."""

import multiprocessing
import os

import pytest
import torch
import torch.distributed as dist

from lit_vhead.metrics import PPOStats


def test_means_over_updates_and_reset():
    stats = PPOStats()
    stats.update({"ppo/loss/policy": torch.tensor(1.0), "objective/kl": 2.0})
    stats.update({"ppo/loss/policy": torch.tensor(3.0)})
    assert stats.compute() == {"objective/kl": 2.0, "ppo/loss/policy": 2.0}
    stats.reset()
    stats.update({"objective/kl": 5.0})
    assert stats.compute() == {"objective/kl": 5.0}  # names seen before but not this step are not reported


def _worker(rank, store, results):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        stats = PPOStats()
        for value in ([1.0, 2.0] if rank == 0 else [6.0]):
            stats.update({"env/x": value, "env/rank": float(rank)})
        results.put(stats.compute())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compute_reduces_over_all_ranks(tmp_path):
    ctx = multiprocessing.get_context("fork")
    results = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(r, os.fspath(tmp_path / "store"), results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    for _ in procs:
        assert results.get() == {"env/rank": pytest.approx(1 / 3), "env/x": pytest.approx(3.0)}
