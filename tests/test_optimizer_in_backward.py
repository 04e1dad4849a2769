"""``ppo.optimizer_in_backward``: each parameter stepped as its gradient completes, that gradient dropped at once.

The weights after real PPO steps are bitwise those of the usual ``backward(); step()``, through PPOModule on a
Lightning Trainer and through PPOTrainer; the gradients of the whole model never exist together; and it stays off
wherever it would not be exact.
"""

import lightning as L
import pytest
import torch
from conftest import tiny_hf_model
from test_ppo_core import BATCH, rollout
from test_python_api import PPO, PROMPTS, vowels

from lit_vhead import AutoModelForCausalLMWithValueHead, PPOConfig, PPOModule, PPOTrainer, PromptDataModule
from lit_vhead.ppo.engine import Engine, PPOCore, default_optimizer
from lit_vhead.ppo.optimizer_in_backward import why_not
from lit_vhead.reference import ReferenceConfig


class GradientCensus:
    """The most parameters that held a gradient at once, seen at every gradient accumulation."""

    def __init__(self, params) -> None:
        self.params, self.most = list(params), 0
        for p in self.params:
            p.register_hook(self._count)  # runs before the accumulation: counts the others

    def _count(self, grad):
        self.most = max(self.most, 1 + sum(p.grad is not None for p in self.params))
        return grad


def core_step(in_backward: bool, census: bool = False, **settings):
    """One PPO update of a tiny GPT-2 with TRL's optimizer; returns (weights, stats, census)."""
    torch.manual_seed(0)
    config = PPOConfig(batch_size=BATCH, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3,
                       optimizer_in_backward=in_backward, **settings)
    policy = AutoModelForCausalLMWithValueHead(tiny_hf_model("gpt2"))
    params = [p for p in policy.parameters() if p.requires_grad]
    seen = GradientCensus(params) if census else None
    order = torch.Generator().manual_seed(1)
    engine = Engine(
        model=policy, policy=policy, reference=ReferenceConfig("copy").build(policy),
        optimizer=default_optimizer(config.learning_rate)(params), backward=lambda loss: loss.backward(),
        clip_gradients=lambda max_norm: torch.nn.utils.clip_grad_norm_(params, max_norm),
        order=lambda n: torch.randperm(n, generator=order), local_gradients=True,
    )
    output = PPOCore(config).step(engine, rollout(), torch.linspace(-10, 10, BATCH), eos_token_id=1)
    return {k: v.clone() for k, v in policy.state_dict().items()}, output.stats, seen


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_the_update_is_bitwise_the_usual_one_and_gradients_never_coexist():
    fused, fused_stats, fused_census = core_step(True, census=True)
    usual, usual_stats, usual_census = core_step(False, census=True)
    assert_same_weights(fused, usual)
    assert fused_stats["ppo/loss/total"] == usual_stats["ppo/loss/total"]
    n_params = len(usual_census.params)
    assert usual_census.most == n_params  # the usual step: every gradient held until step()
    assert fused_census.most <= 2  # the one being accumulated, and at most the one whose hook runs next


def test_settings_that_read_every_gradient_keep_the_usual_step():
    """With max_grad_norm the weights differ from an unclipped update, and in-backward would silently skip the clip:
    the setting must fall back, giving the same weights whether it is on or off."""
    clipped_on, *_ = core_step(True, max_grad_norm=1e-3)
    clipped_off, *_ = core_step(False, max_grad_norm=1e-3)
    assert_same_weights(clipped_on, clipped_off)
    unclipped, *_ = core_step(True)
    assert any(not torch.equal(unclipped[k], clipped_on[k]) for k in unclipped)


@pytest.mark.parametrize(
    "case, reason",
    [
        ({"single_process": False}, "reduced across processes"),
        ({"max_grad_norm": 1.0}, "max_grad_norm"),
        ({"gradient_accumulation_steps": 2}, "accumulate"),
        ({"optimizer": "custom"}, "not one of torch.optim's per-parameter optimizers"),
        ({"optimizer": "lbfgs"}, "LBFGS"),
        ({"grads": True}, "already hold gradients"),
        ({}, None),
    ],
)
def test_why_not_names_what_rules_it_out(case, reason):
    params = [torch.nn.Parameter(torch.ones(3))]
    if case.get("grads"):
        params[0].grad = torch.zeros(3)

    class Custom(torch.optim.Adam):
        pass

    optimizer = {"custom": Custom, "lbfgs": torch.optim.LBFGS}.get(case.get("optimizer"), torch.optim.Adam)(params)
    got = why_not(optimizer, case.get("max_grad_norm"), case.get("gradient_accumulation_steps", 1),
                  case.get("single_process", True))
    assert got == reason if reason is None else reason in got


def fit(byt5, in_backward: bool, precision: str = "32-true"):
    torch.manual_seed(0)
    module = PPOModule(tiny_hf_model("gpt2"), byt5, vowels, ppo={**PPO, "optimizer_in_backward": in_backward})
    census = GradientCensus(p for p in module.policy.parameters() if p.requires_grad)
    trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=PromptDataModule(PROMPTS))
    return {k: v.clone() for k, v in module.policy.state_dict().items()}, trainer, census


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_ppo_module_trains_the_same_weights_and_counts_the_same_steps(byt5, precision):
    fused, fused_trainer, fused_census = fit(byt5, True, precision)
    usual, usual_trainer, usual_census = fit(byt5, False, precision)
    assert_same_weights(fused, usual)
    assert fused_census.most <= 2 and usual_census.most == len(usual_census.params)
    assert fused_trainer.global_step == usual_trainer.global_step == PPO["steps"] * PPO["ppo_epochs"] * 2


def test_ppo_trainer_step_gives_the_same_weights(byt5):
    def run(in_backward: bool):
        torch.manual_seed(0)
        model = AutoModelForCausalLMWithValueHead(tiny_hf_model("gpt2"))
        config = PPOConfig(batch_size=4, mini_batch_size=2, learning_rate=1e-3, optimizer_in_backward=in_backward)
        trainer = PPOTrainer(config, model, None, byt5)
        census = GradientCensus(p for p in model.parameters() if p.requires_grad)
        g = torch.Generator().manual_seed(0)
        queries = [torch.randint(3, 200, (5,), generator=g) for _ in range(4)]
        responses = [torch.randint(3, 200, (4,), generator=g) for _ in range(4)]
        trainer.step(queries, responses, [torch.tensor(float(i)) for i in range(4)])
        return {k: v.clone() for k, v in model.state_dict().items()}, census

    (fused, fused_census), (usual, usual_census) = run(True), run(False)
    assert_same_weights(fused, usual)
    assert fused_census.most <= 2 and usual_census.most == len(usual_census.params)
