"""The critic: one switch (head | model | lora) on every path, its controls (warm-up, learning rate, value clipping,
a separate GAE lambda), and saving and resuming it."""

import re
import shutil
import subprocess
import sys
import textwrap
import time

import lightning as L
import pytest
import torch
import transformers
from conftest import FAST, ROOT, compose, tiny_hf_model
from peft import LoraConfig
from transformers import AutoModelForTokenClassification

from lit_vhead import PPOModule, PromptDataModule
from lit_vhead.builders import wrap_policy
from lit_vhead.cli import ConfigKeyError
from lit_vhead.critic import (
    Critic,
    CriticConfig,
    _one_label_config,
    as_critic_config,
    build_critic,
    response_values,
)
from lit_vhead.interfaces import ValueFunction
from lit_vhead.ppo.functional import compute_advantages, masked_whiten, ppo_loss
from lit_vhead.rewards import RewardModel
from lit_vhead.rollout import Rollout
from lit_vhead.run import train


def rollout() -> Rollout:
    return Rollout(
        query_ids=torch.tensor([[0, 5, 6], [7, 8, 9]]),
        query_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
        response_ids=torch.tensor([[3, 4, 2], [5, 1, 0]]),
        response_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
    )


def lora_policy():
    return wrap_policy(tiny_hf_model("gpt2"), peft_config=LoraConfig(r=4, target_modules="all-linear",
                                                                     fan_in_fan_out=True, task_type="CAUSAL_LM"))


# ---------------------------------------------------------------------- the pure functions
def test_critic_lambda_sets_the_returns_and_the_policy_lambda_the_advantages():
    """values V = [1, 2, 0.5], rewards [0, 0, 3], gamma 1. GAE from the end: A2 = 3 - 0.5 = 2.5,
    A1 = (0.5 - 2) + lam * 2.5, A0 = (2 - 1) + lam * A1. lam 0.5: A = [0.875, -0.25, 2.5]; lam 1: A = [2, 1, 2.5],
    so returns A + V = [3, 3, 3] (the Monte-Carlo return)."""
    values, rewards, mask = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.0, 0.0, 3.0]]), torch.ones(1, 3)
    _, advantages, returns = compute_advantages(values, rewards, mask, 1.0, 0.5, critic_lam=1.0)
    assert torch.allclose(returns, torch.tensor([[3.0, 3.0, 3.0]]))
    assert torch.allclose(advantages, masked_whiten(torch.tensor([[0.875, -0.25, 2.5]]), mask))
    _, same_lam_advantages, same_lam_returns = compute_advantages(values, rewards, mask, 1.0, 0.5)  # TRL's math
    assert torch.equal(same_lam_advantages, advantages)  # the policy's advantages do not depend on the critic's lam
    assert torch.allclose(same_lam_returns, torch.tensor([[1.875, 1.75, 3.0]]))
    _, other_advantages, other_returns = compute_advantages(values, rewards, mask, 1.0, 1.0, critic_lam=1.0)
    assert torch.equal(other_returns, returns) and not torch.allclose(other_advantages, advantages)
    assert torch.equal(compute_advantages(values, rewards, mask, 1.0, 0.5, critic_lam=0.5)[2], same_lam_returns)


def test_value_clipping_off_is_the_plain_squared_error():
    old_values, vpreds = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, -2.0]])
    returns, mask, zeros = torch.tensor([[2.0, 1.0]]), torch.ones(1, 2), torch.zeros(1, 2)
    args = (zeros, old_values, zeros, vpreds, mask, torch.tensor([[1.0, -1.0]]), returns, 0.2)
    _, clipped, clipped_stats = ppo_loss(*args, 0.2, 1.0)
    _, plain, plain_stats = ppo_loss(*args, None, 1.0)
    assert torch.allclose(plain, torch.tensor(0.5 * (1.0**2 + 3.0**2) / 2))
    assert not torch.allclose(clipped, plain) and clipped_stats["val/clipfrac"] > 0
    assert plain_stats["val/clipfrac"] == 0


# ---------------------------------------------------------------------- the Critic
@pytest.mark.parametrize("build", ["policy", "lora"])
def test_critic_saves_and_reloads_offline_in_a_fresh_process_with_the_same_values(tmp_path, build, capfd):
    torch.manual_seed(0)
    critic = (Critic.from_policy(wrap_policy(tiny_hf_model("gpt2"))) if build == "policy"
              else Critic.lora_on(lora_policy()))
    with torch.no_grad():  # trained-looking weights: the adapters and head away from their initial values
        for p in critic.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    critic.eval()
    critic.save_pretrained(tmp_path / "critic")
    expected = response_values(critic, rollout()).detach()
    script = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForTokenClassification
        from lit_vhead.critic import Critic, response_values
        from lit_vhead.rollout import Rollout
        r = Rollout(torch.tensor([[0, 5, 6], [7, 8, 9]]), torch.tensor([[0, 1, 1], [1, 1, 1]]),
                    torch.tensor([[3, 4, 2], [5, 1, 0]]), torch.tensor([[1, 1, 1], [1, 1, 0]]))
        critic = Critic.from_pretrained({str(tmp_path / "critic")!r}).eval()
        plain = AutoModelForTokenClassification.from_pretrained({str(tmp_path / "critic")!r}).eval()
        ids, mask = r.full_sequence()
        logits = plain(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
        torch.save((response_values(critic, r).detach(), logits[:, -4:-1, 0].detach()), {str(tmp_path / "out.pt")!r})
    """)
    env = {"PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded, plain = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.allclose(reloaded, expected, atol=1e-6)
    assert torch.allclose(plain, expected, atol=1e-6)  # a plain AutoModelForTokenClassification reads it too
    transformers.utils.logging.enable_progress_bar()
    capfd.readouterr()
    Critic.from_pretrained(tmp_path / "critic")
    assert "Loading weights" not in capfd.readouterr().err  # a small critic loads without transformers' bar


def test_lora_critic_shares_the_policys_frozen_base_and_trains_only_adapters_and_head():
    policy = lora_policy()
    critic = Critic.lora_on(policy)
    base = policy.hf_model.transformer.h[0].attn.c_attn.base_layer.weight
    assert any(p is base for p in critic.parameters())  # the same tensor: no copy of the base
    assert isinstance(critic, ValueFunction)
    trainable = {n for n, p in critic.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".classifier." in n for n in trainable)
    assert not base.requires_grad
    response_values(critic, rollout()).sum().backward()
    assert base.grad is None and all(p.grad is not None for p in critic.trainable_parameters())


def test_critic_defaults_to_the_reward_model_and_starts_from_its_score(byt5):
    """critic=model with a reward model: the reward model's backbone, and the row of its head the reward reads
    (label_index), so the critic's first values are the reward model's per-token scores."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type="gpt2", n_layer=2, n_embd=32, n_head=4, vocab_size=259, num_labels=2,
                                  pad_token_id=0)
    reward_model = AutoModelForSequenceClassification.from_config(config).eval()
    reward = RewardModel(model=reward_model, tokenizer=byt5, label_index=1)
    critic = build_critic(CriticConfig(mode="model"), wrap_policy(tiny_hf_model("gpt2")), reward).eval()
    r = rollout()
    ids, mask = r.full_sequence()
    with torch.no_grad():
        hidden = reward_model.transformer(input_ids=ids, attention_mask=mask,
                                          position_ids=(mask.cumsum(-1) - 1).clamp_min(0))[0]
        assert torch.allclose(response_values(critic, r), reward_model.score(hidden)[:, -4:-1, 1], atol=1e-6)
    assert all(p.requires_grad for p in critic.parameters())  # a trainable copy
    assert all(a is not b for a, b in zip(critic.parameters(), reward_model.parameters()))
    with pytest.raises(ValueError, match="critic.init=reward initialises the critic from the reward model"):
        build_critic(CriticConfig(mode="model", init="reward"), wrap_policy(tiny_hf_model("gpt2")), None)


def test_bad_critic_settings_fail_clearly():
    with pytest.raises(ValueError, match="critic.mode='value'"):
        CriticConfig(mode="value")
    with pytest.raises(ValueError, match="critic.init='reward' only applies to critic.mode=model"):
        CriticConfig(mode="lora", init="reward")
    with pytest.raises(ValueError, match="critic.warmup_steps=-1"):
        CriticConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match="needs adapters too: add peft=lora"):
        Critic.lora_on(wrap_policy(tiny_hf_model("gpt2")))
    with pytest.raises(ValueError, match="has 3 outputs"):
        config = tiny_hf_model("gpt2").config
        config.num_labels = 3
        Critic(AutoModelForTokenClassification.from_config(config))
    with pytest.raises(ValueError, match="its CriticConfig.mode is model or lora, not head"):
        Critic(AutoModelForTokenClassification.from_config(_one_label_config(tiny_hf_model("gpt2").config)),
               CriticConfig(mode="head"))
    assert as_critic_config("model") == CriticConfig(mode="model")
    assert as_critic_config({"mode": "lora", "lam": 0.9}) == CriticConfig(mode="lora", lam=0.9)


# ---------------------------------------------------------------------- PPOModule: the Python path
PPO = {"steps": 2, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 2, "learning_rate": 1e-3,
       "generation": {"max_new_tokens": 4}}
PROMPTS = ["Hello there", "The cat sat", "Once upon a time", "I think that"]


def vowels(prompts, responses, **kw):
    return [10 * sum(c in "aeiou " for c in r) / max(len(r), 1) for r in responses]


class Record(L.Callback):
    """The policy's and the critic's weights before the run, after every PPO step, and the value losses."""

    def __init__(self):
        self.policy, self.critic, self.value_losses = [], [], []

    @staticmethod
    def weights(module):
        return {k: v.detach().clone() for k, v in module.named_parameters()}  # (a PEFT wrapper's state_dict: head)

    def on_train_start(self, trainer, module):
        self.policy.append(self.weights(module.policy))
        self.critic.append(self.weights(module.critic) if module.critic is not None else None)

    def on_train_epoch_end(self, trainer, module):
        self.on_train_start(trainer, module)
        self.value_losses.append(float(trainer.callback_metrics["ppo/loss/value"]))


def fit(critic, byt5, peft=None, ppo=None, **kwargs):
    torch.manual_seed(0)
    module = PPOModule(tiny_hf_model("gpt2"), byt5, vowels, ppo={**PPO, **(ppo or {})}, critic=critic, peft=peft,
                       sample_table_every=0, **kwargs)
    record = Record()
    L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[record]).fit(module, datamodule=PromptDataModule(PROMPTS, byt5))
    return module, record


def test_ppo_module_writes_the_undo_copy_while_it_generates_and_frees_it_whatever_happens(byt5, tmpfs):
    """PPOModule starts the copy that undoes a failed update before generation (which only reads the weights), so
    that the write overlaps it; the file is gone after each step, and after a step that fails midway."""
    undo_dir = tmpfs("16m")
    empty = shutil.disk_usage(undo_dir).used

    class Watching(PPOModule):
        fail_at = None

        def generate_rollout(self, batch):
            groups = self.optimizers().optimizer.param_groups
            weights = sum(p.numel() * p.element_size() for g in groups for p in g["params"])
            deadline = time.monotonic() + 30
            while shutil.disk_usage(undo_dir).used - empty < weights:  # the policy's and the critic's weights
                assert time.monotonic() < deadline, "no undo copy was being written during generation"
                time.sleep(0.01)
            if self.current_epoch == self.fail_at:
                raise RuntimeError("generation failed")
            return super().generate_rollout(batch)

    def run(fail_at=None):
        module = Watching(tiny_hf_model("gpt2"), byt5, vowels, critic="model", sample_table_every=0,
                          ppo={**PPO, "undo_dir": str(undo_dir)})
        module.fail_at = fail_at
        L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False).fit(module, datamodule=PromptDataModule(PROMPTS, byt5))
        return module

    assert run().current_epoch == PPO["steps"] and shutil.disk_usage(undo_dir).used == empty
    with pytest.raises(RuntimeError, match="generation failed"):
        run(fail_at=1)
    assert shutil.disk_usage(undo_dir).used == empty


def changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


LORA = LoraConfig(r=4, target_modules="all-linear")


@pytest.mark.parametrize("mode", ["head", "model", "lora"])
def test_each_critic_mode_trains_its_value_function_through_the_same_ppo_update(byt5, mode):
    module, record = fit(mode, byt5, peft=LORA if mode == "lora" else None)
    policy_changed = changed(record.policy[0], record.policy[-1])
    assert any("lora_" in k or ".h.0." in k for k in policy_changed)  # the policy trained
    if mode == "head":
        assert module.critic is None and any(k.startswith("v_head.") for k in policy_changed)
        return
    assert isinstance(module.critic, Critic) and module.critic.config.mode == mode
    assert not any(k.startswith("v_head.") for k in policy_changed)  # a separate critic: the policy's head idles
    critic_changed = changed(record.critic[0], record.critic[-1])
    assert any("classifier" in k for k in critic_changed)  # the value loss trained the critic's head ...
    assert any(("lora_" in k) if mode == "lora" else (".h.0." in k) for k in critic_changed)  # ... and its body
    if mode == "lora":  # the shared base is the policy's frozen base
        assert not any("lora_" not in k and "classifier" not in k for k in critic_changed)
    groups = module.optimizers().optimizer.param_groups
    assert [len(g["params"]) for g in groups][1] == len(module.critic.trainable_parameters())


def test_a_transformers_value_model_is_a_critic_and_trains(byt5):
    """TRL's ``value_model`` (a sequence-classification model with one label) passed as it is."""
    value_model = AutoModelForTokenClassification.from_config(_one_label_config(tiny_hf_model("gpt2").config))
    before = {k: v.clone() for k, v in value_model.state_dict().items()}
    module, _ = fit(value_model, byt5)
    assert module.critic.model is value_model
    assert changed(before, value_model.state_dict())


@pytest.mark.parametrize("mode", ["head", "model"])
def test_critic_warmup_trains_the_value_function_and_holds_the_policy_fixed(byt5, mode):
    module, record = fit(CriticConfig(mode=mode, warmup_steps=1), byt5)
    head = {k for k in record.policy[0] if k.startswith("v_head.")}
    during = changed(record.policy[0], record.policy[1])
    if mode == "head":
        assert during == head  # only the value head moved in the warm-up step
    else:
        assert during == set() and changed(record.critic[0], record.critic[1])
    assert changed(record.policy[1], record.policy[2]) - head  # then the policy trains
    assert all(p.requires_grad for p in module.policy.pretrained_model.parameters())  # restored after the warm-up


def test_critic_learning_rate_is_its_own_parameter_group(byt5):
    module, _ = fit(CriticConfig(mode="model", learning_rate=3e-4), byt5)
    policy_group, critic_group = module.optimizers().optimizer.param_groups
    assert policy_group["lr"] == PPO["learning_rate"] and critic_group["lr"] == 3e-4
    assert {id(p) for p in critic_group["params"]} == {id(p) for p in module.critic.parameters()}
    head_module, _ = fit(CriticConfig(mode="head", learning_rate=3e-4), byt5)
    _, head_group = head_module.optimizers().optimizer.param_groups
    assert {id(p) for p in head_group["params"]} == {id(p) for p in head_module.policy.v_head.parameters()}


def test_a_critic_that_cannot_be_built_fails_before_any_model_is_built(byt5):
    with pytest.raises(ValueError, match="critic=lora puts LoRA adapters on the policy's frozen base"):
        PPOModule(tiny_hf_model("gpt2"), byt5, vowels, ppo=PPO, critic="lora")
    with pytest.raises(ValueError, match="seq2seq policies train with critic=head"):
        PPOModule(tiny_hf_model("t5"), byt5, vowels, ppo=PPO, critic="model")


# ---------------------------------------------------------------------- the CLI
@pytest.mark.parametrize("overrides", [["critic=model"], ["critic=lora", "peft=lora", "ref=peft"],
                                       ["critic=model", "critic.init=policy", "critic.lam=0.9",
                                        "ppo.cliprange_value=null", "critic.warmup_steps=1"]])
def test_each_critic_mode_runs_from_the_cli_and_saves_critic_beside_policy(tmp_path, capsys, overrides):
    metrics = train(compose(FAST + overrides + ["callbacks=default", "callbacks.progress_bar=null"], tmp_path))
    assert metrics["ppo/loss/value"] > 0
    assert (tmp_path / "policy").is_dir() and (tmp_path / "critic" / "config.json").is_file()
    assert (tmp_path / "critic" / "tokenizer_config.json").is_file()
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    critic_keys = [k for k in checkpoint["state_dict"] if k.startswith("critic.")]
    assert critic_keys and len(checkpoint["optimizer_states"][0]["param_groups"]) == 2
    reloaded = Critic.from_pretrained(tmp_path / "critic").eval()
    head = [k for k in critic_keys if k.endswith("classifier.weight")][0]
    assert torch.equal(reloaded.model.classifier.weight, checkpoint["state_dict"][head])
    captured = capsys.readouterr()
    assert "Outputs in" in (summary := captured.out.splitlines()[-1]) and ": policy/, critic/," in summary
    assert "Writing model shards" not in captured.err  # a small critic saves without transformers' progress bar


def test_cli_critic_errors_are_one_line_before_any_model_is_built(tmp_path):
    with pytest.raises(ValueError, match="critic=lora puts LoRA adapters"):
        train(compose(FAST + ["critic=lora"], tmp_path / "a"))
    with pytest.raises(ValueError, match="critic.init=reward initialises the critic from the reward model"):
        train(compose(FAST + ["critic=model", "critic.init=reward"], tmp_path / "b"))
    with pytest.raises(ConfigKeyError, match="critic.warmup is not a setting of critic: did you mean "
                                             "critic.warmup_steps"):
        train(compose(FAST + ["+critic.warmup=2"], tmp_path / "c"))
    with pytest.raises(ValueError, match="critic.mode='value'"):
        train(compose(FAST + ["critic.mode=value"], tmp_path / "d"))


def test_readme_critic_example_runs_as_written(tmp_path, monkeypatch):
    from test_readme import README

    monkeypatch.chdir(tmp_path)
    section = README.split("\n## Critic\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    scope = {}
    exec(code, scope)
    module = scope["module"]
    assert module.critic is scope["critic"] and scope["trainer"].current_epoch == 4
    assert [g["lr"] for g in module.optimizers().optimizer.param_groups] == [1.41e-5, 3e-4]
    reloaded = Critic.from_pretrained(tmp_path / "ppo-critic").eval()
    ids, mask = torch.randint(3, 259, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(reloaded.values(ids, mask), module.critic.eval().values(ids, mask))
