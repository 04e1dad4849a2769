"""PPO with a value-head model: `python train.py [overrides]` (see configs/train.yaml and the README)."""

import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import hydra
from omegaconf import DictConfig

import lit_vhead.config  # noqa: F401  (registers the config schemas)
from lit_vhead.train import main as run


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
