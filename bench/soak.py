"""Soak test: a few hundred PPO steps on the tiny default model, reporting RSS over time.

Memory must not grow after warm-up (no leak in rollouts, metrics, logging or checkpointing). Runs the real product
(`train(cfg)` with the CSV logger and checkpoints on) and samples the process RSS after every PPO step.

    OMP_NUM_THREADS=1 python bench/soak.py --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning as L
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


class RSSProbe(L.Callback):
    def __init__(self) -> None:
        self.rss_mb: list[float] = []
        self.process = psutil.Process()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.rss_mb.append(self.process.memory_info().rss / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50, help="steps ignored before judging growth")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--logger", default="default", help="logger group (default: csv + offline wandb)")
    args = parser.parse_args()

    from conftest import compose  # the same composition the tests use

    import lit_vhead.run as lt

    probe = RSSProbe()
    original = lt._instantiate_dict
    lt._instantiate_dict = lambda node: original(node) + ([probe] if node is cfg.get("callbacks") else [])
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose([f"ppo.steps={args.steps}", f"ppo.batch_size={args.batch_size}", "ppo.mini_batch_size=8",
                       f"logger={args.logger}", "callbacks.progress_bar=null", "plot=false",
                       "sample_table_every=10"], tmp)
        lt.train(cfg)
    rss = probe.rss_mb
    after = rss[args.warmup:]
    half = len(after) // 2
    early, late = sum(after[:half]) / half, sum(after[half:]) / (len(after) - half)
    print("step  rss_MB")
    for step in range(0, len(rss), max(1, len(rss) // 12)):
        print(f"{step:4d}  {rss[step]:7.1f}")
    print(f"{len(rss) - 1:4d}  {rss[-1]:7.1f}")
    result = {"steps": len(rss), "rss_mb_at_warmup": round(after[0], 1), "rss_mb_final": round(rss[-1], 1),
              "rss_mb_max": round(max(rss), 1), "mean_first_half_after_warmup": round(early, 1),
              "mean_second_half_after_warmup": round(late, 1), "growth_mb": round(late - early, 1)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
