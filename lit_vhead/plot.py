"""Plots of PPO runs from their CSV logs: ``python -m lit_vhead.plot RUN_DIR [RUN_DIR ...]``.

One run: reward, KL and value-loss curves (``curves.png`` in the run dir). Several runs: their reward curves side by
side (``--out`` names the PNG).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

CURVES = ("env/reward_mean", "objective/kl", "ppo/loss/value")


def read_metrics(run_dir: str | Path) -> dict[str, list[tuple[float, float]]]:
    """``{metric: [(ppo_step, value), ...]}`` from ``<run_dir>/csv/metrics.csv``."""
    path = Path(run_dir) / "csv" / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a lit_vhead run dir with the CSV logger on?")
    series: dict[str, list[tuple[float, float]]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            step = row.get("ppo/step") or row.get("step")
            for key, value in row.items():
                if value not in ("", None) and step not in ("", None):
                    series.setdefault(key, []).append((float(step), float(value)))
    return series


def _figure(ncols: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(1, ncols, figsize=(5 * ncols, 3.6), squeeze=False)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Reward, KL and value-loss curves of one run; returns the PNG's path."""
    series = read_metrics(run_dir)
    plt, fig, axes = _figure(len(CURVES))
    for ax, name in zip(axes[0], CURVES):
        points = series.get(name, [])
        ax.plot([s for s, _ in points], [v for _, v in points])
        ax.set_title(name)
        ax.set_xlabel("PPO step")
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def plot_runs(run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    """The reward curves of several runs on one plot."""
    plt, fig, axes = _figure(1)
    ax = axes[0][0]
    for i, run_dir in enumerate(run_dirs):
        points = read_metrics(run_dir).get("env/reward_mean", [])
        ax.plot([s for s, _ in points], [v for _, v in points], label=labels[i] if labels else str(run_dir))
    ax.set_title("env/reward_mean")
    ax.set_xlabel("PPO step")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--out", default=None, help="PNG path (default: <run>/curves.png, or ./runs.png for several)")
    args = parser.parse_args(argv)
    if len(args.run_dirs) == 1:
        print(plot_run(args.run_dirs[0], args.out))
    else:
        print(plot_runs(args.run_dirs, args.out or "runs.png"))


if __name__ == "__main__":
    main()
