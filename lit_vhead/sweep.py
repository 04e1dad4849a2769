"""Sweeps: a summary table (CSV + printed) and a reward-curve comparison when a Hydra multirun ends, and the fix
for Lightning's DDP child processes starting a second sweep (Lightning-AI/pytorch-lightning#11300), confined to the
``fit`` that starts them (:func:`ddp_children_of_this_job`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

SUMMARY_COLUMNS = ("job", "overrides", "env/reward_mean", "objective/kl", "run_dir")


def summarize_sweep(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per finished job of a sweep dir: its overrides, final reward and KL, and run dir."""
    rows = []
    for job_dir in sorted(Path(sweep_dir).iterdir(), key=lambda p: (len(p.name), p.name)):
        metrics_file = job_dir / "metrics.json"
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        if not metrics_file.is_file():
            continue
        metrics = json.loads(metrics_file.read_text())
        overrides = OmegaConf.load(overrides_file) if overrides_file.is_file() else []
        rows.append({
            "job": job_dir.name,
            "overrides": " ".join(str(o) for o in overrides),
            "env/reward_mean": metrics.get("env/reward_mean"),
            "objective/kl": metrics.get("objective/kl"),
            "run_dir": str(job_dir),
        })
    return rows


class SweepSummary(Callback):
    """Hydra callback: at the end of a multirun, write ``summary.csv`` and ``rewards.png`` into the sweep dir."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = summarize_sweep(sweep_dir)
        if not rows:
            return
        with (sweep_dir / "summary.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        print(format_table(rows))
        print(f"Sweep summary: {sweep_dir / 'summary.csv'}")
        runs = [r["run_dir"] for r in rows if (Path(r["run_dir"]) / "csv" / "metrics.csv").is_file()]
        if runs:
            from lit_vhead.plot import plot_runs

            labels = [label for r, label in zip(rows, varying_overrides(rows)) if r["run_dir"] in runs]
            print(f"Reward curves: {plot_runs(runs, sweep_dir / 'rewards.png', labels)}")


def varying_overrides(rows: list[dict[str, Any]]) -> list[str]:
    """Each row's overrides restricted to those that differ between jobs (short plot labels)."""
    parsed = [dict(o.split("=", 1) for o in r["overrides"].split() if "=" in o) for r in rows]
    keys = [k for k in dict.fromkeys(k for p in parsed for k in p) if len({p.get(k) for p in parsed}) > 1]
    return [" ".join(f"{k}={p.get(k)}" for k in keys) or r["job"] for p, r in zip(parsed, rows)]


def format_table(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    widths = {c: max(len(c), *(len(cell(r[c])) for r in rows)) for c in SUMMARY_COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in SUMMARY_COLUMNS)]
    lines += ["  ".join(cell(r[c]).ljust(widths[c]) for c in SUMMARY_COLUMNS) for r in rows]
    return "\n".join(lines)


def _job_subprocess_cmd(local_rank: int) -> tuple[list[str], str]:
    """Lightning's DDP child command for one job of a sweep: this job's overrides, no ``-m``, this job's dir."""
    from hydra.utils import get_original_cwd, to_absolute_path

    hydra_cfg = HydraConfig.get()
    command = [sys.executable, to_absolute_path(sys.argv[0]), *hydra_cfg.overrides.task]
    command += [
        f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"',
        f"hydra.job.name=train_ddp_process_{local_rank}",
        "hydra.output_subdir=null",
    ]
    return command, get_original_cwd()


@contextlib.contextmanager
def ddp_children_of_this_job() -> Iterator[None]:
    """In a multirun, Lightning starts DDP children as plain runs of the current job, not as a new sweep, while the
    block runs (the ``Trainer.fit`` that launches them). Lightning has no public hook for the command it builds, so
    its private ``_hydra_subprocess_cmd`` is replaced for the block only and restored on exit; outside a multirun
    nothing is replaced."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    import lightning.fabric.strategies.launchers.subprocess_script as fabric_launcher
    import lightning.pytorch.strategies.launchers.subprocess_script as pytorch_launcher

    launchers = (fabric_launcher, pytorch_launcher)
    originals = [launcher._hydra_subprocess_cmd for launcher in launchers]
    for launcher in launchers:
        launcher._hydra_subprocess_cmd = _job_subprocess_cmd
    try:
        yield
    finally:
        for launcher, original in zip(launchers, originals):
            launcher._hydra_subprocess_cmd = original
