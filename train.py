"""PPO with a value-head model: `python train.py [overrides]` (see configs/train.yaml and the README)."""

import os
import sys

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import hydra
from omegaconf import DictConfig

from lit_vhead.cli import check_command_line, register_configs
from lit_vhead.run import main as run

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    # The directory a run starts from is on the import path (as with `python -m`), so `_target_`s such as
    # reward.fn._target_=my_reward.score find the user's own modules there.
    if os.getcwd() not in sys.path:
        sys.path.insert(1, os.getcwd())
    register_configs()
    error = check_command_line(sys.argv[1:], CONFIG_DIR)
    if error:
        print(f"Error: {error}", flush=True)
        sys.exit(1)
    main()
