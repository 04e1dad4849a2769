"""The code's structure as a maintainer relies on it: modules of a readable size, one generation path for both loops
(a backend of our own sees every rollout and every weight sync), and the model interfaces the PPO core consumes
satisfied by the value-head models."""


import ast
from pathlib import Path

import lightning as L
import torch
from conftest import FAST, ROOT, compose, tiny_hf_model

import lit_vhead
from lit_vhead import (
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLMWithValueHead,
    PPOConfig,
    PPOModule,
    PPOTrainer,
    PromptDataModule,
)
from lit_vhead.generation import HFGeneration
from lit_vhead.interfaces import GenerationBackend, Policy, ReferenceModel, ValueFunction, trainable_parameters
from lit_vhead.reference import ReferenceConfig

MAX_LINES = 450
PROMPTS = ["Hello there", "The cat sat", "Once upon a time", "I think that"]
PPO = {"steps": 2, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "learning_rate": 1e-3,
       "generation": {"max_new_tokens": 4}}


class CountingGeneration(HFGeneration):
    """The HF backend, counting what each loop asks of it (a real backend of our own, not a mock)."""

    def __init__(self) -> None:
        super().__init__()
        self.rollouts: list[int] = []  # batch size of each generate call
        self.syncs = 0

    def generate(self, model, query_ids, query_mask, end_token_id=None, **sampling):
        rollout = super().generate(model, query_ids, query_mask, end_token_id, **sampling)
        self.rollouts.append(len(rollout.response_ids))
        return rollout

    def sync_weights(self, policy) -> None:
        assert isinstance(policy, Policy)
        self.syncs += 1


def test_no_module_is_over_450_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in Path(ROOT, "lit_vhead").rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def generate_calls(path: Path) -> list[str]:
    """The ``<x>.generate(...)`` calls of a module, by the object they are made on (``ast.unparse``)."""
    tree = ast.parse(path.read_text())
    return [ast.unparse(node.func.value) for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "generate"]


def test_only_the_generation_module_samples_from_a_model():
    """Both loops sample through their backend (``self.generation``); a model's ``generate`` runs in generation.py
    (and in the value-head wrapper's own ``generate``, which hands over to the base model)."""
    calls = {}
    for path in Path(ROOT, "lit_vhead").rglob("*.py"):
        others = [c for c in generate_calls(path) if c != "self.generation"]
        if others:
            calls[str(path.relative_to(ROOT))] = others
    assert calls == {"lit_vhead/generation.py": ["model"], "lit_vhead/modeling.py": ["self.pretrained_model"]}


def test_ppo_module_samples_through_its_backend_and_syncs_after_each_update(byt5):
    backend = CountingGeneration()
    assert isinstance(backend, GenerationBackend)
    module = PPOModule(tiny_hf_model("gpt2"), byt5, lambda prompts, responses, **kw: [1.0] * len(responses),
                       ppo=PPO, generation=backend)
    L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, datamodule=PromptDataModule(PROMPTS))
    assert backend.rollouts == [4, 4] and backend.syncs == 2


def test_ppo_trainer_samples_through_its_backend_and_syncs_after_each_step(byt5):
    backend = CountingGeneration()
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_hf_model("gpt2"))
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1), policy, None, byt5,
                         generation=backend)
    queries = [torch.tensor(byt5(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    for _ in range(2):
        responses = trainer.generate(queries, return_prompt=False, max_new_tokens=4, do_sample=True,
                                     pad_token_id=byt5.pad_token_id)
        one = trainer.generate(queries[0], max_new_tokens=2, min_new_tokens=2, do_sample=False,
                               pad_token_id=byt5.pad_token_id)
        assert one.shape == (1, len(queries[0]) + 2)
        trainer.step(queries, responses, [torch.tensor(1.0)] * 4)
    assert backend.rollouts == [4, 1, 4, 1] and backend.syncs == 2


def test_value_head_models_are_what_the_core_consumes():
    for cls, arch in ((AutoModelForCausalLMWithValueHead, "gpt2"), (AutoModelForSeq2SeqLMWithValueHead, "t5")):
        model = cls.from_pretrained(tiny_hf_model(arch))
        assert isinstance(model, Policy) and isinstance(model, ValueFunction)
        assert isinstance(ReferenceConfig().build(model), ReferenceModel)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_hf_model("gpt2"))
    model.pretrained_model.transformer.wte.requires_grad_(False)
    params = {id(p) for p in trainable_parameters(model)}
    assert id(model.v_head.summary.weight) in params
    assert id(model.pretrained_model.transformer.wte.weight) not in params
    ids = torch.tensor([[0, 5, 6, 7]])
    mask = torch.tensor([[0, 1, 1, 1]])
    values = model.values(ids, mask)
    assert values.shape == (1, 4) and values[0, 0] == 0
    assert torch.equal(values, model.forward_with_values(input_ids=ids, attention_mask=mask)[1])


def test_interfaces_import_light():
    """``lit_vhead.interfaces`` is what a critic or backend author imports: torch only."""
    import subprocess
    import sys

    code = "import sys, lit_vhead.interfaces; print(sorted(m for m in ('lightning', 'transformers', 'hydra') " \
           "if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert lit_vhead.interfaces.GenerationBackend is GenerationBackend


def test_the_cli_path_checks_and_reads_the_model_source_once(tmp_path, monkeypatch):
    """``python train.py``: the model source is checked and its config read once (``resolve_model_source``), then
    handed on, not looked up again by PPOModule and build_policy."""
    import lit_vhead.builders as builders
    from lit_vhead.run import train

    calls = {"check_model_source": 0, "model_config_of": 0}
    for name in calls:
        original = getattr(builders, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(builders, name, counted)
    train(compose(FAST + ["ppo.steps=1"], tmp_path))
    assert calls == {"check_model_source": 1, "model_config_of": 1}
