"""``PPOConfig.cpu_kernels`` and ``PPOConfig.compile`` (``lit_vhead.kernels``): faster passes, the same PPO update to
float rounding, nothing left behind on the models."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import ROOT, SEQ2SEQ, TINY_CONFIGS, tiny_hf_model
from safetensors.torch import load_file

import lit_vhead.kernels as kernels
from lit_vhead import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead, PPOConfig, PPOTrainer
from lit_vhead.kernels import fast_kernels

FIXTURES = os.path.join(ROOT, "tests", "data", "trl_step")


def value_head_model(arch: str):
    cls = AutoModelForSeq2SeqLMWithValueHead if arch in SEQ2SEQ else AutoModelForCausalLMWithValueHead
    return cls.from_pretrained(tiny_hf_model(arch), summary_dropout_prob=0.0).eval()


def loss_and_grads(model, ids):
    model.zero_grad()
    extra = {"decoder_input_ids": ids[:, :4]} if model.config.is_encoder_decoder else {}
    logits, _, values = model(ids, attention_mask=torch.ones_like(ids), **extra)
    loss = logits.log_softmax(-1).mean() + values.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def gemm_calls(monkeypatch):
    """Counts the GEMMs that ran in oneDNN."""
    calls = []
    gemm = kernels._gemm
    monkeypatch.setattr(kernels, "_gemm", lambda *a: calls.append(1) or gemm(*a))
    return calls


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_fast_kernels_give_the_plain_loss_and_gradients_and_set_nothing_on_the_model(arch, gemm_calls):
    model = value_head_model(arch)
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    loss, grads = loss_and_grads(model, ids)
    before = {name: dict(m.__dict__) for name, m in model.named_modules()}
    with fast_kernels(model, enabled=True):
        fast_loss, fast_grads = loss_and_grads(model, ids)
        assert {name: dict(m.__dict__) for name, m in model.named_modules()}.keys() == before.keys()
        assert not [name for name, m in model.named_modules() if "forward" in m.__dict__]
    assert gemm_calls, "no GEMM ran in oneDNN"  # GPT-2's Conv1D and everyone's nn.Linear, forward and backward
    assert torch.allclose(fast_loss, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == fast_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(fast_grads[name], grad, rtol=1e-4, atol=1e-6), name
    gemm_calls.clear()
    loss_and_grads(model, ids)
    assert not gemm_calls, "GEMMs still routed after the block"


def test_other_dtypes_and_autocast_fp16_run_pytorchs_own_gemms(gemm_calls):
    """Only fp32 GEMMs go to oneDNN."""
    model = value_head_model("gpt2").to(torch.bfloat16)
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(ids)[0]
        with fast_kernels(model, enabled=True):
            fast = model(ids)[0]
    assert torch.equal(plain, fast) and not gemm_calls
    model = value_head_model("gpt2")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        plain = model(ids)[0]
        with fast_kernels(model, enabled=True):
            fast = model(ids)[0]
    assert torch.equal(plain, fast)
    assert len(gemm_calls) == 1  # only the value head, which runs in fp32 outside autocast


def test_fast_gemm_gradients_are_right_for_both_weight_layouts_and_expanded_gradients():
    """Weight gradients come out in each weight's own layout (contiguous, nothing to copy), also when the incoming
    gradient is an expanded one (the gradient of a sum)."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layers = [Conv1D(96, 32), torch.nn.Linear(96, 32)]  # [in, out] and [out, in] weights
    x = torch.randn(3, 40, 32, requires_grad=True)
    with fast_kernels(*layers, enabled=True):
        fast = layers[1](torch.tanh(layers[0](x))).sum()
    fast.backward()
    fast_grads = [p.grad.clone() for layer in layers for p in layer.parameters()] + [x.grad.clone()]
    assert all(g.is_contiguous() for g in fast_grads)
    for layer in layers:
        layer.zero_grad()
    x.grad = None
    layers[1](torch.tanh(layers[0](x))).sum().backward()
    plain_grads = [p.grad for layer in layers for p in layer.parameters()] + [x.grad]
    for fast_grad, plain_grad in zip(fast_grads, plain_grads):
        assert torch.allclose(fast_grad, plain_grad, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_casts_weights_once_per_rollout_and_never_reads_stale_copies():
    """Under bf16 autocast the no-grad passes reuse bf16 weight copies; after an optimizer step (which fused Adam does
    without bumping tensor versions) a no-grad pass must see the new weights."""
    model = value_head_model("gpt2")
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)

    def rollout_logits():
        with torch.no_grad():
            return model(ids)[0]

    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        reference_before = rollout_logits()
        with fast_kernels(model, enabled=True, backward=True) as mode:
            before = rollout_logits()
            assert mode.bf16_copies, "the no-grad pass kept no bf16 weight copies"
            loss_and_grads(model, ids)
            optimizer.step()
            after = rollout_logits()
        reference_after = rollout_logits()
    assert torch.allclose(before, reference_before, atol=2e-2)
    assert torch.allclose(after, reference_after, atol=2e-2)
    assert (after - before).abs().max() > 0.1  # the update is visible, far above bf16 rounding


def replay_fixture(case: str, **settings) -> list[dict[str, torch.Tensor]]:
    """Two ``PPOTrainer.step`` calls on a recorded TRL 0.11.4 case (``tests/data/trl_step``), weights after each."""
    record = json.load(open(os.path.join(FIXTURES, "trl_step.json")))["cases"][case]
    model = AutoModelForCausalLMWithValueHead.from_pretrained(os.path.join(FIXTURES, "start"))
    import transformers

    trainer = PPOTrainer(PPOConfig(**record["config"], **settings), model, None,
                         transformers.ByT5Tokenizer(extra_ids=0))
    queries, responses = [torch.tensor(q) for q in record["queries"]], [torch.tensor(r) for r in record["responses"]]
    scores = [torch.tensor(s) for s in record["scores"]]
    weights = []
    for _ in range(2):
        trainer.step(queries, responses, scores)
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return weights


def max_diff_to_trl(weights: list[dict[str, torch.Tensor]], case: str) -> float:
    worst = 0.0
    for k, ours in enumerate(weights, start=1):
        theirs = load_file(os.path.join(FIXTURES, f"{case}_step{k}.safetensors"))
        worst = max(worst, max((ours[n] - theirs[n]).abs().max().item() for n in theirs))
    return worst


@pytest.mark.parametrize("cpu_kernels", [False, True, "auto"])
def test_the_update_equals_trl_0_11_4_with_and_without_cpu_kernels(cpu_kernels, gemm_calls):
    """The update is TRL 0.11.4's within 1e-5 under every setting, the default ("auto") included, whatever the
    probe decides on this CPU; the oneDNN path runs exactly where the setting (or the probe) chose it."""
    with pytest.warns(UserWarning, match="No dataset"):
        weights = replay_fixture("equal", cpu_kernels=cpu_kernels)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(os.path.join(FIXTURES, "start"))
    assert bool(gemm_calls) == kernels.use_cpu_kernels(cpu_kernels, model)
    assert max_diff_to_trl(weights, "equal") <= 1e-5


def test_compile_gives_trl_0_11_4_weights_and_sets_nothing_on_the_model():
    import torch._dynamo

    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="No dataset"):
        weights = replay_fixture("equal", compile=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the forward really was compiled
    assert max_diff_to_trl(weights, "equal") <= 1e-5


@pytest.mark.parametrize("setting", [True, "auto"])
def test_a_model_without_fp32_cpu_weights_runs_none_of_it_whatever_the_setting(setting, gemm_calls):
    """As on a GPU: no routing mode, no glibc setting, even with ``cpu_kernels=true``."""
    model = value_head_model("gpt2").to(torch.bfloat16)
    calls = kernels.keep_freed_memory.cache_info()
    with fast_kernels(model, enabled=setting) as mode:
        model(torch.tensor([[5, 6, 7]]))
    after = kernels.keep_freed_memory.cache_info()
    assert mode is None and not gemm_calls
    assert after.hits + after.misses == calls.hits + calls.misses
    assert not kernels.use_cpu_kernels(setting, model)
