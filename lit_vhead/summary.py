"""The line a run ends with: did it learn (reward over the first and last PPO steps), the final KL, and where its
outputs are."""

from __future__ import annotations

from pathlib import Path

import lightning as L

REWARD, KL = "env/reward_mean", "objective/kl"
# Outputs a run may leave in its run dir, named in the summary when present.
OUTPUTS = ("policy", "critic", "csv/metrics.csv", "curves.png", "checkpoints", "wandb", "tensorboard", "metrics.json")


class RunSummary(L.Callback):
    """Records the reward and KL of every PPO step this process runs (the values all ranks agreed on)."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.rewards: list[float] = []
        self.kls: list[float] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = trainer.callback_metrics
        if REWARD in metrics and KL in metrics:
            self.steps.append(trainer.current_epoch)
            self.rewards.append(float(metrics[REWARD]))
            self.kls.append(float(metrics[KL]))

    def line(self, output_dir: str | Path) -> str:
        """``Done: ... reward a -> b (mean of the first/last k PPO steps), final KL c. Outputs in <dir>: ...``."""
        output_dir = Path(output_dir)
        found = [name + ("/" if (output_dir / name).is_dir() else "") for name in OUTPUTS
                 if (output_dir / name).exists()]
        outputs = f"Outputs in {output_dir}" + (f": {', '.join(found)}" if found else "")
        if not self.steps:
            return f"Done: no PPO step ran. {outputs}"
        n = len(self.steps)
        k = max(1, min(10, n // 4))
        first, last = sum(self.rewards[:k]) / k, sum(self.rewards[-k:]) / k
        steps = f"{n} PPO steps" if self.steps[0] == 0 else f"PPO steps {self.steps[0]}-{self.steps[-1]}"
        return (
            f"Done: {steps}, {REWARD} {first:.4g} -> {last:.4g} (mean of the first/last {k}), final {KL} "
            f"{self.kls[-1]:.4g}. {outputs}"
        )
