"""Critic modes side by side on the default run (``python train.py``: tiny GPT-2, rule reward, 100 PPO steps):
``critic=head`` (the value head on the policy's trunk) vs ``critic=model`` (a separate value network, a copy of the
policy's base) on the full fine-tune, and ``critic=head`` vs ``critic=lora`` (LoRA adapters + head on the policy's
frozen base) on the LoRA policy (``peft=lora ref=peft``, which ``critic=lora`` needs).

Each run is ``python train.py`` in its own process (one at a time; the configurations interleaved seed by seed, so
the machine's noise hits them alike), ``OMP_NUM_THREADS=1``. Reported per configuration, over the seeds: the PPO step
time (median over the run's steps of the logged ``time/ppo/total + time/ppo/generation``), the process's peak RSS
(``wait4``), and the reward (``env/reward_mean``, the mean of the last 10 PPO steps; the first 10 for reference).

    OMP_NUM_THREADS=1 python bench/critic_modes.py                 # 3 seeds, 100 PPO steps
    OMP_NUM_THREADS=1 python bench/critic_modes.py --seeds 0 --steps 20

Prints the machine, a table, then ONE JSON line (``{"bench": "critic_modes", ...}``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "head": [],
    "model": ["critic=model"],
    "lora-policy head": ["peft=lora", "ref=peft"],
    "lora-policy lora": ["peft=lora", "ref=peft", "critic=lora"],
}
QUIET = ["logger=csv", "callbacks=none", "plot=false", "save_pretrained_dir=null", "save_critic_dir=null",
         "sample_table_every=0"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(overrides: list[str], seed: int, steps: int, run_dir: Path) -> dict:
    """One ``python train.py`` run; its step time, peak RSS and rewards."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, str(ROOT / "train.py"), *overrides, *QUIET, f"seed={seed}", f"ppo.steps={steps}",
               f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(command, cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{output[-3000:]}")
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    step_s = [float(r["time/ppo/total"]) + float(r["time/ppo/generation"]) for r in rows[1:]]  # first: warm-up
    rewards = [float(r["env/reward_mean"]) for r in rows]
    k = min(10, len(rewards))
    return {"step_s": statistics.median(step_s), "peak_rss_mib": usage.ru_maxrss / 1024,
            "reward_first": sum(rewards[:k]) / k, "reward_last": sum(rewards[-k:]) / k}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n for n in args.configs.split(",") if n]
    results: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="critic_modes_") as tmp:
        for seed in seeds:
            for name in names:
                run_dir = Path(tmp) / f"{name.replace(' ', '_')}_{seed}"
                results[name].append(run(CONFIGS[name], seed, args.steps, run_dir))
                r = results[name][-1]
                print(f"# {name} seed {seed}: {r['step_s']:.3f} s/step, {r['peak_rss_mib']:.0f} MiB, reward "
                      f"{r['reward_first']:.2f} -> {r['reward_last']:.2f}", file=sys.stderr, flush=True)
    load = os.getloadavg()
    print(f"\nMachine: {cpu_name()}, {os.cpu_count()} CPU(s), shared (load average {load[0]:.1f} at the end), "
          f"1 thread per run, one run at a time")
    print(f"Default run (tiny GPT-2 2x64, rule reward), {args.steps} PPO steps, seeds {seeds}; mean over seeds "
          "(min-max)")
    header = f"{'config':18s} {'overrides':38s} {'s/step':>14s} {'peak RSS MiB':>16s} {'reward last 10':>20s}"
    print(header)
    print("-" * len(header))
    summary = {}
    for name in names:
        rs = results[name]

        def cell(key: str, fmt: str, rs: list[dict] = rs) -> str:
            values = [r[key] for r in rs]
            return f"{statistics.mean(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"

        summary[name] = {key: [r[key] for r in rs] for key in rs[0]}
        print(f"{name:18s} {' '.join(CONFIGS[name]) or '(default)':38s} {cell('step_s', '.3f'):>14s} "
              f"{cell('peak_rss_mib', '.0f'):>16s} {cell('reward_last', '.2f'):>20s}")
    print(json.dumps({"bench": "critic_modes", "cpu": cpu_name(), "cpus": os.cpu_count(), "steps": args.steps,
                      "seeds": seeds, "configs": {n: CONFIGS[n] for n in names}, "results": summary}))


if __name__ == "__main__":
    main()
