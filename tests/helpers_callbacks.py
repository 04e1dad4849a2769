"""Callbacks the tests add through Hydra overrides (`+callbacks.x._target_=helpers_callbacks.X`)."""

import hashlib
import json
import os
import shutil

import lightning as L


class RankReport(L.Callback):
    """Each rank writes what it trained and sampled to <output_dir>/rank<k>.json, to compare ranks."""

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.responses: list[str] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.responses.append(hashlib.sha1(str(batch["query_ids"].tolist()).encode()).hexdigest())

    def on_train_end(self, trainer, pl_module):
        params = sum(float(p.double().sum()) for p in pl_module.policy.parameters())
        critic = [] if pl_module.critic is None else list(pl_module.critic.parameters())
        report = {"rank": trainer.global_rank, "world": trainer.world_size, "param_sum": params,
                  "critic_sum": sum(float(p.double().sum()) for p in critic),
                  "batches": self.responses, "kl_coef": pl_module.kl_ctl.value,
                  "reference_wrapped": any(n.startswith("reference") for n, _ in trainer.model.named_modules())}
        with open(os.path.join(self.output_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(report, f)


class FillDisk(L.Callback):
    """As PPO step ``at_epoch`` starts, fill ``directory``'s filesystem until half a checkpoint fits: that step's
    checkpoint save runs out of space midway."""

    def __init__(self, directory: str, at_epoch: int) -> None:
        self.directory, self.at_epoch = directory, at_epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.at_epoch:
            checkpoint = os.path.getsize(os.path.join(self.directory, "last.ckpt"))
            room = shutil.disk_usage(self.directory).free - checkpoint // 2
            with open(os.path.join(self.directory, "filler"), "wb") as f:
                f.write(b"\0" * room)
