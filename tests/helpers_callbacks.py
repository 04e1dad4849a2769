"""Callbacks the tests add through Hydra overrides (`+callbacks.x._target_=helpers_callbacks.X`)."""

import hashlib
import json
import os

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
        report = {"rank": trainer.global_rank, "world": trainer.world_size, "param_sum": params,
                  "batches": self.responses, "kl_coef": pl_module.kl_ctl.value,
                  "reference_wrapped": any(n.startswith("reference") for n, _ in trainer.model.named_modules())}
        with open(os.path.join(self.output_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(report, f)
