"""TRL 0.29.1's experimental PPOTrainer API on lit_vhead (``lit_vhead.experimental.ppo``): the README's script written
as for TRL, the command-line flags, saving, exact resume and one-line errors for bad input. Tiny stand-in models and
data sets come from tools/make_trl_ppov2_standins.py (TRL's own example and tests are run against lit_vhead from a TRL
clone, as the README says; nothing of TRL's is stored here)."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _standins_module():
    path = ROOT / "tools" / "make_trl_ppov2_standins.py"
    spec = importlib.util.spec_from_file_location("make_trl_ppov2_standins", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("standins")
    tools = _standins_module()
    tools.save_models(str(out), only_example=True)
    tools.save_datasets(str(out), only_example=True)
    return out


def paths(standins: Path) -> dict[str, str]:
    models = standins / "models" / "trl-internal-testing"
    return {
        "policy": str(models / "tiny-Qwen2ForCausalLM-2.5"),
        "reward": str(models / "tiny-Qwen2ForSequenceClassification-2.5"),
        "dataset": str(standins / "datasets" / "trl-internal-testing" / "descriptiveness-sentiment-trl-style"),
    }


def readme_script() -> str:
    """The README's experimental-PPO script (its python block that builds a ``PPOTrainer(args=...``)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    (code,) = [b for b in blocks if "PPOTrainer(\n    args=args," in b]
    return code


def test_readme_experimental_ppo_script_runs_as_written(standins, tmp_path, monkeypatch):
    """The README's script, written as for TRL's experimental PPOTrainer with only the import changed, trains offline
    with the hub ids pointed at the stand-ins: TRL's metrics are logged, and save_model writes the trained policy and
    critic/, which reload with the trainer's outputs."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    code = readme_script()
    assert "# from trl.experimental.ppo import PPOConfig, PPOTrainer" in code
    assert "\nfrom lit_vhead.experimental.ppo import PPOConfig, PPOTrainer\n" in code
    p = paths(standins)
    hub = {"trl-internal-testing/tiny-Qwen2ForCausalLM-2.5": p["policy"],
           "trl-internal-testing/tiny-Qwen2ForSequenceClassification-2.5": p["reward"],
           "trl-internal-testing/descriptiveness-sentiment-trl-style": p["dataset"]}
    for name, path in hub.items():
        assert f'"{name}"' in code, name
        code = code.replace(f'"{name}"', repr(path))
    monkeypatch.chdir(tmp_path)  # "ppo-out" is written here
    scope: dict = {"__name__": "__main__"}
    exec(compile(code, "README.md", "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.state.global_step == 4 and trainer.state.episode == 16  # 16 episodes, 4 prompts a step
    assert len(trainer.state.log_history) == 4
    for logged in trainer.state.log_history:
        for key in ("objective/kl", "objective/scores", "objective/rlhf_reward", "loss/policy_avg", "loss/value_avg",
                    "policy/approxkl_avg", "val/num_eos_tokens", "lr", "episode"):
            assert key in logged and torch.isfinite(torch.tensor(float(logged[key]))), key
    out = tmp_path / "ppo-out"
    policy = AutoModelForCausalLM.from_pretrained(out)
    critic = AutoModelForSequenceClassification.from_pretrained(out / "critic")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(policy(ids).logits, trainer.model.policy(ids).logits)
        assert torch.equal(critic(ids).logits, trainer.model.value_model(ids).logits)
    start_policy = load_file(Path(p["policy"]) / "model.safetensors")
    saved_policy = load_file(out / "model.safetensors")
    assert any(not torch.equal(saved_policy[k], v) for k, v in start_policy.items() if k in saved_policy)  # trained
    start_critic = AutoModelForSequenceClassification.from_pretrained(p["reward"])
    assert not torch.equal(critic.score.weight, start_critic.score.weight)  # the critic trained (from the reward model)


def test_peft_policy_trains_its_adapters_against_its_base(standins, tmp_path):
    """peft_config with ref_model=None (TRL's LoRA recipe): the adapters and the value model train, the base stays
    and serves as the reference; save_model writes the adapters and critic/."""
    from peft import LoraConfig

    trainer = make_trainer(standins, tmp_path, ref_model=None, args={"total_episodes": 4, "save_strategy": "no"},
                           peft_config=LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM"))
    base = {k: v.clone() for k, v in trainer.model.policy.state_dict().items() if "lora_" not in k}
    trainer.train()
    after = trainer.model.policy.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items())
    lora_b = [v for k, v in after.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # LoRA's B starts at zero
    assert trainer.module.reference.mode == "peft"
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "saved" / "critic" / "model.safetensors").is_file()


def make_trainer(standins: Path, tmp_path: Path, **overrides):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from lit_vhead.experimental.ppo import PPOConfig, PPOTrainer

    p = paths(standins)
    tokenizer = AutoTokenizer.from_pretrained(p["policy"], padding_side="left")
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    prompts = ["the movie was", "a quiet night in the city", "she walked", "old house by the river", "he said",
               "a bright day", "they found the garden", "the story"]
    args = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, num_mini_batches=2,
                total_episodes=12, response_length=6, num_ppo_epochs=2, use_cpu=True, bf16=False,
                num_sample_generations=0, report_to="none", learning_rate=1e-3, stop_token="eos",
                gradient_checkpointing=False, save_steps=1, disable_tqdm=True)
    args.update(overrides.pop("args", {}))
    kwargs = dict(
        args=PPOConfig(**args), processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(p["policy"]),
        ref_model=AutoModelForCausalLM.from_pretrained(p["policy"]),
        reward_model=AutoModelForSequenceClassification.from_pretrained(p["reward"]),
        value_model=AutoModelForSequenceClassification.from_pretrained(p["reward"]),
        train_dataset=Dataset.from_dict({"input_ids": [tokenizer(t)["input_ids"] for t in prompts]}),
    )
    kwargs.update(overrides)
    return PPOTrainer(**kwargs)


def state(trainer) -> dict[str, torch.Tensor]:
    policy = {f"policy.{k}": v.clone() for k, v in trainer.model.policy.state_dict().items()}
    return policy | {f"value.{k}": v.clone() for k, v in trainer.model.value_model.state_dict().items()}


def test_resume_continues_exactly(standins, tmp_path):
    """3 PPO steps in one go equal 1 step, a new trainer resumed from checkpoint-1, and 2 more: the policy, the
    value model and the logged metrics (the optimizer and scheduler, numpy's minibatch orders and the data order are
    in the checkpoint)."""
    full = make_trainer(standins, tmp_path / "full", args={"save_total_limit": 2})
    full.train()
    assert full.state.global_step == 3
    from transformers import TrainerCallback

    class StopAfterOne(TrainerCallback):  # a user's callback, as TRL calls it: the run ends after checkpoint-1
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 1

    first = make_trainer(standins, tmp_path / "parts", callbacks=[StopAfterOne()])
    first.train()
    assert first.state.global_step == 1
    assert (tmp_path / "parts" / "run" / "checkpoint-1" / "ppo.ckpt").is_file()
    assert sorted(p.name for p in (tmp_path / "full" / "run").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    resumed = make_trainer(standins, tmp_path / "parts")
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3
    a, b = state(full), state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [row["objective/kl"] for row in resumed.state.log_history] == [
        row["objective/kl"] for row in full.state.log_history]


def test_save_model_writes_policy_and_critic_atomically(standins, tmp_path):
    from transformers import AutoModelForSequenceClassification

    trainer = make_trainer(standins, tmp_path, args={"total_episodes": 4, "save_strategy": "no"})
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "critic"} <= names
    assert not [n for n in names if n.startswith(".")]  # no staging dirs left behind
    critic = AutoModelForSequenceClassification.from_pretrained(out / "critic")
    assert torch.equal(critic.score.weight, trainer.model.value_model.score.weight)

    class Full(Exception):
        pass

    def failing_save(*args, **kwargs):
        raise Full("disk full")

    before = (out / "model.safetensors").read_bytes()
    with torch.no_grad():
        trainer.model.policy.lm_head.weight.add_(1.0)
    trainer.processing_class.save_pretrained = failing_save  # our own tokenizer object, not a library class
    with pytest.raises(Full):
        trainer.save_model(str(out))
    assert (out / "model.safetensors").read_bytes() == before  # the failed save left the old one in place


def test_flags_parse_with_hf_argument_parser(tmp_path, capsys):
    from transformers import HfArgumentParser

    from lit_vhead.experimental.ppo import PPOConfig

    parser = HfArgumentParser(PPOConfig)
    (args,) = parser.parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--num_ppo_epochs", "2", "--kl_estimator", "k3", "--stop_token", "eos",
        "--missing_eos_penalty", "1.0", "--whiten_rewards", "--use_cpu", "--total_episodes", "16",
    ])
    assert (args.num_ppo_epochs, args.kl_estimator, args.stop_token, args.missing_eos_penalty) == (2, "k3", "eos", 1.0)
    assert args.whiten_rewards and args.bf16  # TRL's default: bf16 unless fp16
    assert (args.learning_rate, args.kl_coef, args.response_length, args.logging_steps) == (3e-6, 0.05, 53, 10)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--help"])
    assert "--num_mini_batches" in capsys.readouterr().out


@pytest.mark.parametrize(("change", "message"), [
    ({"ref_model": "same"}, "`model` and `ref_model` cannot be the same object"),
    ({"train_dataset": "text"}, "'input_ids' column"),
    ({"train_dataset": "tiny"}, "fewer than one rollout batch"),
    ({"reward_model": "string"}, "reward_model must be a transformers model"),
    ({"args": {"per_device_train_batch_size": 3}}, "is not a multiple of num_mini_batches=2"),
    ({"args": {"stop_token": None, "stop_token_id": 7}}, "stop_token_id=7 is not the tokenizer's EOS id"),
])
def test_bad_input_fails_in_one_line(standins, tmp_path, change, message):
    from datasets import Dataset

    overrides = dict(change)
    if overrides.get("train_dataset") == "text":
        overrides["train_dataset"] = Dataset.from_dict({"prompt": ["hello", "world"]})
    elif overrides.get("train_dataset") == "tiny":
        overrides["train_dataset"] = Dataset.from_dict({"input_ids": [[5, 6], [7, 8]]})
    if overrides.get("reward_model") == "string":
        overrides["reward_model"] = "path/to/model"
    if overrides.get("ref_model") == "same":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(paths(standins)["policy"])
        overrides.update(model=model, ref_model=model)
    with pytest.raises((ValueError, TypeError)) as info:
        make_trainer(standins, tmp_path, **overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("kl_estimator", "k2", "kl_estimator='k2' must be 'k1' or 'k3'"),
    ("stop_token", "eot", "Unknown `stop_token` 'eot'"),
    ("temperature", 0.0, "temperature=0.0 must be > 0"),
])
def test_bad_config_fails_in_one_line(tmp_path, field, value, message):
    from lit_vhead.experimental.ppo import PPOConfig

    with pytest.raises(ValueError) as info:
        PPOConfig(output_dir=str(tmp_path), use_cpu=True, **{field: value})
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_saved_policy_and_critic_reload_in_a_fresh_process(standins, tmp_path):
    """save_model's policy and critic/ load offline in a new process (plain transformers) with the same outputs."""
    import json
    import os
    import subprocess

    trainer = make_trainer(standins, tmp_path, args={"total_episodes": 4, "save_strategy": "no"})
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        here = [trainer.model.policy(ids).logits.tolist(), trainer.model.value_model(ids).logits.tolist()]
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification\n"
        "ids = torch.tensor([[5, 6, 7, 8, 9]])\n"
        "policy = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "critic = AutoModelForSequenceClassification.from_pretrained(sys.argv[1] + '/critic')\n"
        "with torch.no_grad():\n"
        "    print(json.dumps([policy(ids).logits.tolist(), critic(ids).logits.tolist()]))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env,
                            check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == here


def test_report_to_wandb_logs_trls_metrics_and_completions_offline(standins, tmp_path, monkeypatch):
    """``report_to="wandb"`` goes through transformers' own WandbCallback, as in TRL: the offline run holds TRL
    0.29.1's metric names, the sample-completions table and the run's config, and the run is closed at the end."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "lit-vhead-test")
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths(standins)["policy"])
    prompts = Dataset.from_dict({"input_ids": [tokenizer(t)["input_ids"] for t in ("a long day", "the river")]})
    trainer = make_trainer(standins, tmp_path, eval_dataset=prompts,
                           args={"report_to": "wandb", "num_sample_generations": 1, "save_strategy": "no",
                                 "run_name": "ppo-wandb", "per_device_eval_batch_size": 2})
    try:
        trainer.train()
    finally:
        wandb.finish()
    assert trainer.state.global_step == 3
    runs = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    log = runs[0].read_bytes()
    for key in (b"objective/kl", b"objective/rlhf_reward", b"loss/value_avg", b"val/clipfrac_avg", b"val/ratio",
                b"val/num_eos_tokens", b"episode", b"completions", b"ppo-wandb", b"num_ppo_epochs"):
        assert key in log, key
