"""The command line's answers to a misspelt or foreign key: one line naming the closest key (or what to use
instead), whichever way the key is written, and no run dir."""

import pytest
from conftest import CONFIG_DIR, FAST, compose
from test_train import run_cli

from lit_vhead.cli import PPOSettings, check_command_line, check_group_keys
from lit_vhead.config import PPOConfig


@pytest.mark.slow
@pytest.mark.parametrize("override", ["ppo.learnig_rate=1", "+ppo.learnig_rate=1"])
def test_a_misspelt_key_is_one_line_with_the_closest_name_and_no_run_dir(tmp_path, override):
    """Hydra alone answers the first with a hint to add `+`, and the second with a 19-line traceback and a run dir."""
    result = run_cli([override], cwd=tmp_path)
    assert result.returncode == 1
    assert (result.stdout + result.stderr).strip().splitlines() == [
        "Error: ppo.learnig_rate is not a setting of ppo: did you mean ppo.learning_rate?"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, line",
    [
        (["head.int=normal"], "head.int is not a setting of head: did you mean head.init?"),
        (["ppo.generation.max_new_token=3"],
         "ppo.generation.max_new_token is not a setting of ppo.generation: did you mean "
         "ppo.generation.max_new_tokens?"),
        (["ref=shared", "ref.num_shared_layer=1"], "ref.num_shared_layer is not a setting of ref: did you mean "
                                                   "ref.num_shared_layers?"),
        (["+ref.num_shared_layer=1"], "ref.num_shared_layer is not a setting of ref: did you mean "
                                      "ref.num_shared_layers?"),
        (["+reward.scal=2"], "reward.scal is not a setting of reward: did you mean reward.scale?"),
        (["reward=model", "reward.label=1"], "reward.label is not a setting of reward: did you mean "
                                             "reward.label_index?"),
        (["-m", "ppo.learnig_rate=1e-5,3e-5"], "ppo.learnig_rate is not a setting of ppo: did you mean "
                                               "ppo.learning_rate?"),
        (["ppo.model_name=gpt2"], "ppo.model_name is a setting of PPOTrainer (TRL's loop in Python) that python "
                                  "train.py does not read; use model=<option> or model.name_or_path=<dir>."),
        (["ppo.query_dataset=imdb"], "ppo.query_dataset is a setting of PPOTrainer (TRL's loop in Python) that python "
                                     "train.py does not read; use data.prompts=<.txt or .jsonl file>."),
        (["ppo.world_size=2"], "ppo.world_size is derived at run time (from trainer.devices) and cannot be set."),
        (["+ppo.is_peft_model=true"], "ppo.is_peft_model is derived at run time (from peft=<none|lora>) and cannot be "
                                      "set."),
    ],
)
def test_unknown_keys_under_the_checked_groups(args, line):
    assert check_command_line(args, CONFIG_DIR) == line


@pytest.mark.parametrize(
    "args",
    [["ppo.learning_rate=1e-5"], ["ref=shared", "ref.num_shared_layers=1"], ["+ref.pattern=transformer.h.{layer}"],
     ["+reward.fn.characters=xyz"], ["reward.fn._target_=my_reward.score", "+reward.fn.weight=2"],
     ["--help"], ["model=no_such_option", "ppo.steps=2"], ["ppo.steps=2", "hydra.run.dir=/tmp/x"]],
)
def test_known_keys_and_what_hydra_judges_pass_through(args):
    """Real keys, a target's own arguments, a user function's arguments, and commands Hydra reports itself."""
    assert check_command_line(args, CONFIG_DIR) is None


def test_a_key_added_in_process_is_refused_like_on_the_command_line(tmp_path):
    cfg = compose(FAST + ["+head.int=normal"], tmp_path)
    with pytest.raises(ValueError, match=r"^head.int is not a setting of head: did you mean head.init\?$"):
        check_group_keys(cfg)


def test_the_cli_schema_is_ppo_config_without_trainer_only_and_derived_fields():
    from dataclasses import fields

    from lit_vhead.cli import DERIVED, TRAINER_ONLY

    all_fields = {f.name for f in fields(PPOConfig)}
    assert set(TRAINER_ONLY) | set(DERIVED) <= all_fields  # every name refers to a real PPOConfig field
    assert {f.name for f in fields(PPOSettings)} == all_fields - set(TRAINER_ONLY) - set(DERIVED)
    defaults = PPOConfig()
    assert all(getattr(PPOSettings(), f.name) == getattr(defaults, f.name) for f in fields(PPOSettings))
