"""Does ``trainer.precision=bf16-mixed`` learn like fp32? The default run (``python train.py``: tiny GPT-2, built-in
even-token reward, 100 PPO steps) for each seed and precision, through the real CLI.

Each run is ``python train.py seed=S trainer.precision=P logger=csv callbacks=none plot=false
save_pretrained_dir=null`` in a temporary run dir (no checkpoints or plots, the same PPO). Printed per run: the mean
``env/reward_mean`` of the first and last 10 PPO steps and the mean PPO-step time (``time/ppo/total`` +
``time/ppo/generation``); then per precision the mean and seed-to-seed standard deviation of the last-10 means. bf16
is within the run-to-run noise of fp32 when the two means differ by less than that spread.

    OMP_NUM_THREADS=1 python bench/precision_rewards.py                          # seeds 0 1 2, 32-true and bf16-mixed
    OMP_NUM_THREADS=1 python bench/precision_rewards.py --seeds 0 --steps 20     # a quick look

Prints a table, then ONE JSON line (``{"bench": "precision_rewards", ...}``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(seed: int, precision: str, steps: int, out: Path) -> dict:
    command = [
        sys.executable, str(ROOT / "train.py"), f"seed={seed}", f"trainer.precision={precision}", f"ppo.steps={steps}",
        "logger=csv", "callbacks=none", "plot=false", "save_pretrained_dir=null", f"hydra.run.dir={out}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1")
    tic = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tic
    if done.returncode:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-5000:])
        raise SystemExit(f"train.py failed (exit {done.returncode}): {' '.join(command)}")
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    rewards = [float(r["env/reward_mean"]) for r in rows if r.get("env/reward_mean")]
    step_times = [float(r["time/ppo/total"]) + float(r["time/ppo/generation"]) for r in rows if r.get("time/ppo/total")]
    if len(rewards) != steps:
        raise SystemExit(f"expected {steps} logged PPO steps in {out}, found {len(rewards)}")
    n = min(10, steps)
    return {
        "seed": seed,
        "precision": precision,
        "first10": statistics.mean(rewards[:n]),
        "last10": statistics.mean(rewards[-n:]),
        "step_s": statistics.median(step_times),
        "run_s": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    p.add_argument("--steps", type=int, default=100, help="PPO steps per run (the default run takes 100)")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="precision_rewards_") as tmp:
        for seed in args.seeds:  # precisions alternate, so the machine's load hits both alike
            for precision in args.precisions:
                results.append(run(seed, precision, args.steps, Path(tmp) / f"{precision}_seed{seed}"))
                r = results[-1]
                print(f"# seed {seed} {precision:10s} first10 {r['first10']:.3f} last10 {r['last10']:.3f} "
                      f"step {r['step_s']:.3f} s", file=sys.stderr, flush=True)
    print(f"\nDefault run (python train.py), {args.steps} PPO steps, env/reward_mean: first and last 10 steps")
    print(f"{'precision':11s} {'seed':>4s} {'first10':>8s} {'last10':>8s} {'gain':>7s} {'step s':>7s}")
    for r in results:
        print(f"{r['precision']:11s} {r['seed']:4d} {r['first10']:8.3f} {r['last10']:8.3f} "
              f"{r['last10'] - r['first10']:7.3f} {r['step_s']:7.3f}")
    summary = {}
    for precision in args.precisions:
        last = [r["last10"] for r in results if r["precision"] == precision]
        steps = [r["step_s"] for r in results if r["precision"] == precision]
        summary[precision] = {
            "last10_mean": statistics.mean(last),
            "last10_seed_std": statistics.stdev(last) if len(last) > 1 else float("nan"),
            "step_s_median": statistics.median(steps),
        }
        s = summary[precision]
        print(f"{precision:11s} last10 mean {s['last10_mean']:.3f} (seed-to-seed std {s['last10_seed_std']:.3f}), "
              f"median PPO step {s['step_s_median']:.3f} s")
    base, *others = args.precisions
    for other in others:
        diff = summary[other]["last10_mean"] - summary[base]["last10_mean"]
        noise = max(summary[base]["last10_seed_std"], summary[other]["last10_seed_std"])
        speed = summary[base]["step_s_median"] / summary[other]["step_s_median"]
        verdict = "within" if abs(diff) <= noise else "OUTSIDE"
        if noise != noise:
            verdict = "one seed, no spread to compare with:"
        print(f"{other} - {base}: last10 mean {diff:+.3f} vs seed-to-seed std {noise:.3f} "
              f"({verdict} the run-to-run noise); "
              f"PPO step speed {speed:.2f}x {base}'s (sequential runs, not interleaved)")
    print(json.dumps({"bench": "precision_rewards", "steps": args.steps, "runs": results, "summary": summary}))


if __name__ == "__main__":
    main()
