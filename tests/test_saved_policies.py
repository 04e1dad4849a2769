"""Every way a trained policy is saved (``python train.py``/``PPOModule``, ``PPOTrainer``) gives a directory that
reloads offline, in a fresh process, with the same logits and values, also for PEFT on a base that exists nowhere on
disk. (Users' own ``save_pretrained`` calls: tests/test_modeling.py.)"""

import json

import lightning as L
import torch
import transformers
from conftest import FAST, VOCAB, compose, tiny_hf_model
from peft import LoraConfig
from test_modeling import reload_in_fresh_process
from test_train import fit_with

from lit_vhead import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer


def inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(3, VOCAB, (2, 9), generator=g)}


class KeepModule(L.Callback):
    def on_train_end(self, trainer, pl_module):
        self.module = pl_module


def test_cli_peft_run_on_a_built_base_saves_a_policy_that_reloads(tmp_path):
    """`python train.py peft=lora ref=peft`: the tiny default base is built from a config, so it is saved too."""
    keep = KeepModule()
    fit_with(compose(FAST + ["peft=lora", "ref=peft"], tmp_path / "run"), [keep])
    policy_dir = tmp_path / "run" / "policy"
    adapter_config = json.loads((policy_dir / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(policy_dir / "base_model")
    policy = keep.module.policy.eval()
    with torch.no_grad():
        logits, _, values = policy(**inputs())
    out = reload_in_fresh_process(AutoModelForCausalLMWithValueHead, policy_dir, inputs(), tmp_path)
    assert torch.equal(out["logits"], logits) and torch.equal(out["values"], values)
    assert (policy_dir / "tokenizer_config.json").is_file()


def test_cli_full_run_saves_a_policy_that_reloads(tmp_path):
    keep = KeepModule()
    fit_with(compose(FAST, tmp_path / "run"), [keep])
    policy = keep.module.policy.eval()
    with torch.no_grad():
        logits, _, values = policy(**inputs())
    out = reload_in_fresh_process(AutoModelForCausalLMWithValueHead, tmp_path / "run" / "policy", inputs(), tmp_path)
    assert torch.equal(out["logits"], logits) and torch.equal(out["values"], values)


def test_ppo_trainer_peft_policy_on_a_built_base_reloads(tmp_path):
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        tiny_hf_model("gpt2"), peft_config=LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["c_attn"])
    )
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-2), model, None,
                         transformers.ByT5Tokenizer(extra_ids=0))
    g = torch.Generator().manual_seed(1)
    queries = [torch.randint(3, VOCAB, (5,), generator=g) for _ in range(4)]
    responses = [torch.randint(3, VOCAB, (4,), generator=g) for _ in range(4)]
    trainer.step(queries, responses, [torch.tensor(float(i)) for i in range(4)])
    trainer.save_pretrained(tmp_path / "policy")
    assert (tmp_path / "policy" / "base_model" / "model.safetensors").is_file()
    model.eval()
    with torch.no_grad():
        logits, _, values = model(**inputs())
    out = reload_in_fresh_process(AutoModelForCausalLMWithValueHead, tmp_path / "policy", inputs(), tmp_path)
    assert torch.equal(out["logits"], logits) and torch.equal(out["values"], values)
