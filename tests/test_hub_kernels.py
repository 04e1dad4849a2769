"""transformers' Hub kernels (5.25+: applied in ``from_pretrained`` and again on every ``train()``/``eval()``) beside
lit_vhead's own fast paths: PPO runs with them on or off, gives the same result either way, and leaves every module's
``forward`` its class's own."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import transformers
from conftest import SEQ2SEQ

import lit_vhead.kernels as kernels
from lit_vhead import (
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLMWithValueHead,
    PPOConfig,
    PPOModule,
    PPOTrainer,
    PromptDataModule,
)
from lit_vhead.reference import instance_forward

ARCHS = ["gpt2", "gpt_neo", "llama", "t5"]  # gpt2: gelu_new, a module transformers' kernels replace
PPO = dict(batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3, cpu_kernels=True)


def load_as_a_user_would(tiny_dirs, arch: str, hub_kernels: bool, monkeypatch):
    """transformers' own ``from_pretrained``, with its Hub kernels on (its default) or off (``USE_HUB_KERNELS=0``)."""
    monkeypatch.setenv("USE_HUB_KERNELS", "1" if hub_kernels else "0")
    auto = transformers.AutoModelForSeq2SeqLM if arch in SEQ2SEQ else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(tiny_dirs[arch])
    assert model.use_kernels == hub_kernels
    return model


def foreign_forwards(model: torch.nn.Module) -> list[str]:
    """Modules whose ``forward`` is not their class's own."""
    return [name for name, m in model.named_modules() if getattr(m.forward, "__func__", None) is not type(m).forward]


def trainer_steps(tiny_dirs, arch: str, hub_kernels: bool, monkeypatch, byt5) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    hf_model = load_as_a_user_would(tiny_dirs, arch, hub_kernels, monkeypatch)
    cls = AutoModelForSeq2SeqLMWithValueHead if arch in SEQ2SEQ else AutoModelForCausalLMWithValueHead
    model = cls(hf_model)
    with pytest.warns(UserWarning, match="No dataset"):
        trainer = PPOTrainer(PPOConfig(**PPO), model, None, byt5)
    queries = [torch.tensor(byt5(text)["input_ids"][:-1]) for text in ("Hi", "The cat", "A dog ran", "Yes")]
    for step in range(3):
        torch.manual_seed(step)
        responses = trainer.generate(queries, return_prompt=False, max_new_tokens=4, do_sample=True, top_k=0)
        scores = [torch.tensor(float(len(r))) for r in responses]
        trainer.step(queries, responses, scores)
        assert not foreign_forwards(model), f"step {step}"
        assert not foreign_forwards(trainer.ref_model), f"step {step}"
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_ppo_trainer_steps_the_same_with_transformers_kernels_on_and_off(tiny_dirs, arch, monkeypatch, byt5):
    """TRL's loop on a model transformers kernelized: no crash (the GELU `del forward` of old), nothing left bound,
    and the same weights as without kernels."""
    on = trainer_steps(tiny_dirs, arch, True, monkeypatch, byt5)
    off = trainer_steps(tiny_dirs, arch, False, monkeypatch, byt5)
    assert on.keys() == off.keys()
    assert all(torch.equal(on[k], off[k]) for k in on)


class CheckForwards(L.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        assert not foreign_forwards(pl_module.policy), f"step {self.steps}"
        assert not foreign_forwards(pl_module.reference.model), f"step {self.steps}"
        self.steps += 1


def module_steps(tiny_dirs, arch: str, hub_kernels: bool, monkeypatch, byt5, ref=None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    hf_model = load_as_a_user_would(tiny_dirs, arch, hub_kernels, monkeypatch)
    module = PPOModule(hf_model, byt5, lambda prompts, responses, **kw: [float(len(r)) for r in responses],
                       ppo={**PPO, "steps": 3, "generation": {"max_new_tokens": 4}}, ref=ref)
    check = CheckForwards()
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[check])
    trainer.fit(module, datamodule=PromptDataModule(["Hello", "The cat", "Once upon", "I think"]))
    assert check.steps == 3
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_ppo_module_trains_the_same_with_transformers_kernels_on_and_off(tiny_dirs, arch, monkeypatch, byt5):
    on = module_steps(tiny_dirs, arch, True, monkeypatch, byt5)
    off = module_steps(tiny_dirs, arch, False, monkeypatch, byt5)
    assert all(torch.equal(on[k], off[k]) for k in on)


def test_trunk_reuse_under_transformers_kernels_restores_every_forward(tiny_dirs, monkeypatch, byt5):
    """ref=shared skips the reference's shared layers by shadowing their forwards for one pass; with a kernelized
    policy (train()/eval() re-kernelize its copy) everything is its class's own after each step."""
    ref = {"mode": "shared", "num_shared_layers": 1}
    on = module_steps(tiny_dirs, "gpt2", True, monkeypatch, byt5, ref=ref)
    off = module_steps(tiny_dirs, "gpt2", False, monkeypatch, byt5, ref=ref)
    assert all(torch.equal(on[k], off[k]) for k in on)


def test_a_shadowed_forward_restores_what_was_there_and_leaves_a_rebinding_alone():
    layer = torch.nn.Linear(2, 2)
    theirs = lambda x: x  # noqa: E731
    with instance_forward(layer, lambda x: 0):
        assert layer(torch.ones(2)) == 0
    assert "forward" not in layer.__dict__
    layer.forward = theirs
    with instance_forward(layer, lambda x: 0):
        pass
    assert layer.forward is theirs  # an instance forward that was there before comes back
    with instance_forward(layer, lambda x: 0):
        layer.forward = rebound = lambda x: 1  # another party (e.g. transformers' kernels) re-binds meanwhile
    assert layer.forward is rebound


def test_lit_vhead_loads_with_transformers_hub_kernels_off_unless_asked(tiny_dirs, monkeypatch):
    monkeypatch.setenv("USE_HUB_KERNELS", "1")
    assert not AutoModelForCausalLMWithValueHead.from_pretrained(tiny_dirs["gpt2"]).pretrained_model.use_kernels
    asked = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_dirs["gpt2"], use_kernels=True)
    assert asked.pretrained_model.use_kernels


@pytest.mark.parametrize("setting", ["auto", True, False])
def test_the_fast_path_runs_in_a_ppo_update_exactly_where_chosen(tiny_dirs, setting, monkeypatch, byt5):
    """A counter, not a timing: oneDNN GEMMs run in the update where the setting (for "auto": the probe measured on
    this machine) chose them, and nowhere else."""
    calls = []
    gemm = kernels._gemm
    monkeypatch.setattr(kernels, "_gemm", lambda *a: calls.append(1) or gemm(*a))
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_dirs["gpt2"])
    probe = kernels.probe_gemms(kernels.gemm_shapes(model))
    chosen = kernels.onednn_available() and (setting is True or (setting == "auto" and probe.use_onednn))
    assert kernels.use_cpu_kernels(setting, model) == chosen
    with pytest.warns(UserWarning, match="No dataset"):
        trainer = PPOTrainer(PPOConfig(**{**PPO, "cpu_kernels": setting}), model, None, byt5)
    queries = [torch.tensor([72, 105]), torch.tensor([84, 104, 101]), torch.tensor([65]), torch.tensor([89, 101])]
    responses = [torch.tensor([101, 115, 1]), torch.tensor([32, 99]), torch.tensor([98, 99, 100]), torch.tensor([3])]
    trainer.step(queries, responses, [torch.tensor(1.0)] * 4)
    assert bool(calls) == chosen


def test_the_auto_rule_takes_onednn_only_where_it_is_clearly_faster():
    shapes = ((64, 256),)
    assert not kernels.GemmProbe(shapes, 1, pytorch_gflops=100.0, onednn_gflops=110.0).use_onednn
    assert kernels.GemmProbe(shapes, 1, pytorch_gflops=100.0, onednn_gflops=125.0).use_onednn
    probe = kernels.probe_gemms(shapes)
    assert probe.pytorch_gflops > 0 and probe.onednn_gflops > 0 and probe.threads == torch.get_num_threads()
    assert kernels.probe_gemms(shapes) is probe  # measured once per process
