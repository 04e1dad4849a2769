"""Multi-process DDP through the CLI, and mixed precision on CPU."""

import json
import math

import lightning as L
import pytest
import torch
from conftest import FAST, compose
from test_train import fit_with, read_csv, run_cli


class Capture(L.Callback):
    def on_train_end(self, trainer, pl_module):
        self.module = pl_module


@pytest.mark.slow
@pytest.mark.parametrize("critic", ["head", "model"])
def test_ddp_on_two_cpu_processes(tmp_path, critic):
    """Real DDP (gloo): ranks stay in sync, sample their own prompts, only rank 0 logs and saves (with the oneDNN
    GEMM routing on: it lives in a dispatch mode, not in DDP's wrapped module). A separate critic trains beside the
    policy, whose own value head idles (DDP must not wait for its gradients), after a one-step warm-up that holds the
    policy's parameters unused."""
    warmup = ["critic.warmup_steps=1"] if critic == "model" else []
    args = [f"critic={critic}", *warmup, "trainer=ddp", "trainer.devices=2", "ppo.steps=3", "ppo.cpu_kernels=true",
            "ppo.batch_size=8", "ppo.mini_batch_size=4", "logger=csv",
            "+callbacks.report._target_=helpers_callbacks.RankReport",
            f"+callbacks.report.output_dir={tmp_path}", f"hydra.run.dir={tmp_path}"]
    result = run_cli(args, cwd=tmp_path, env_extra={"PYTHONPATH": str(__import__("pathlib").Path(__file__).parent)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["param_sum"] == pytest.approx(ranks[1]["param_sum"], rel=1e-6)  # gradients were all-reduced
    assert ranks[0]["critic_sum"] == pytest.approx(ranks[1]["critic_sum"], rel=1e-6)  # the critic's too
    assert ranks[0]["kl_coef"] == ranks[1]["kl_coef"]  # the KL controller saw the global KL
    assert all(a != b for a, b in zip(ranks[0]["batches"], ranks[1]["batches"]))  # distinct prompts per rank
    assert not ranks[0]["reference_wrapped"]  # the frozen reference is not inside the DDP-wrapped module
    assert len(read_csv(tmp_path)) == 3  # one row per PPO step: rank 0 logs, metrics already reduced
    assert (tmp_path / "policy" / "model.safetensors").is_file()
    assert (tmp_path / "critic").is_dir() == (critic == "model")


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_on_cpu_keeps_value_head_and_losses_in_fp32(tmp_path, precision):
    capture = Capture()
    metrics = fit_with(compose(FAST + [f"trainer.precision={precision}", "ppo.cpu_kernels=true"], tmp_path), [capture])
    policy = capture.module.policy
    assert policy.v_head.summary.weight.dtype == torch.float32
    expected_base = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert policy.pretrained_model.transformer.h[0].attn.c_attn.weight.dtype == expected_base
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if k.startswith("ppo/loss"))
    ids = torch.randint(3, 259, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _, values = policy(ids)
    assert values.dtype == torch.float32 and logits.dtype == torch.float32


def test_gradient_checkpointing_trains(tmp_path):
    capture = Capture()
    overrides = ["ppo.gradient_checkpointing=true", "ppo.cpu_kernels=true"]  # recomputation under the GEMM routing
    metrics = fit_with(compose(FAST + overrides, tmp_path), [capture])
    assert capture.module.policy.pretrained_model.is_gradient_checkpointing
    assert torch.isfinite(torch.tensor(metrics["ppo/loss/total"]))


@pytest.mark.parametrize("trainer", ["gpu", "ddp", "fsdp", "deepspeed", "deepspeed3"])
def test_multi_gpu_trainer_configs_compose(tmp_path, trainer):
    import hydra

    cfg = compose([f"trainer={trainer}"], tmp_path)
    assert cfg.trainer.max_epochs == cfg.ppo.steps
    if trainer == "fsdp":
        strategy = hydra.utils.instantiate(cfg.trainer.strategy)
        assert type(strategy).__name__ == "ModelParallelStrategy"


def test_fsdp2_config_trains_with_a_sharded_policy(tmp_path):
    """`trainer=fsdp` (FSDP2) runs real PPO steps (on the CPU here, gloo): the policy's weights are sharded DTensors,
    the reference a plain frozen copy, and the run learns the same way as unsharded."""
    from lit_vhead.run import train

    capture = Capture()
    overrides = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.precision=32-true", "ppo.max_grad_norm=1.0",
                 "ppo.cpu_kernels=true"]
    metrics = fit_with(compose(FAST + overrides, tmp_path / "fsdp"), [capture])
    params = list(capture.module.policy.parameters())
    assert params and all(type(p).__name__ == "DTensor" for p in params)
    assert not any(type(p).__name__ == "DTensor" for p in capture.module.reference.model.parameters())
    train(compose(FAST + ["ppo.cpu_kernels=true"], tmp_path / "plain"))
    sharded, plain = read_csv(tmp_path / "fsdp"), read_csv(tmp_path / "plain")
    assert len(sharded) == len(plain) == 4 and all(math.isfinite(float(r["ppo/loss/total"])) for r in sharded)
    # The first rollout comes from the same weights and seed: the same responses, the same rewards.
    assert float(sharded[0]["env/reward_mean"]) == pytest.approx(float(plain[0]["env/reward_mean"]), abs=1e-6)
    assert math.isfinite(metrics["objective/kl"])
    # The saved policy holds the trained (gathered) weights: on one device each shard is the whole tensor.
    from lit_vhead import AutoModelForCausalLMWithValueHead

    saved = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "fsdp" / "policy").state_dict()
    trained = capture.module.policy.state_dict()
    assert set(saved) <= set(trained) and len(saved) >= len(trained) - 1  # the tied lm_head may be dropped
    assert all(torch.equal(saved[k], trained[k].to_local()) for k in saved)
    with pytest.raises(ValueError, match="ref.mode=shared cannot share storage"):
        train(compose(FAST + overrides + ["ref=shared"], tmp_path / "shared"))


def test_zero3_refuses_a_copied_reference_before_building(tmp_path):
    from lit_vhead.run import train

    with pytest.raises(ValueError, match="ZeRO-3"):
        train(compose(FAST + ["trainer=deepspeed3", "ref=copy"], tmp_path))
