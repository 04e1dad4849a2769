"""PPO with a value-head model: `python train.py [overrides]` (see configs/train.yaml and the README)."""

import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import hydra
from omegaconf import DictConfig

from lit_vhead.config import register_configs
from lit_vhead.train import main as run

register_configs()  # the schemas that validate ppo.*, head.*


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
