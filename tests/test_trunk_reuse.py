"""Shared-trunk reuse: reference log-probs from the policy's layer-k hidden state equal a full reference forward."""

import copy

import pytest
import torch
from conftest import SEQ2SEQ, tiny_hf_model

from lit_vhead import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead
from lit_vhead.reference import ReferenceConfig
from lit_vhead.rollout import Rollout, forward

ARCHS = ["gpt2", "gpt_neo", "gpt_neox", "opt", "llama", "gemma", "t5", "bart"]


def make_rollout(arch: str, batch: int = 3) -> Rollout:
    """A left-padded causal batch (or an encoder/decoder batch) with masked response tails."""
    g = torch.Generator().manual_seed(0)
    query = torch.randint(3, 259, (batch, 6), generator=g)
    query_mask = torch.ones_like(query)
    query_mask[0, :2] = 0  # padding: left for causal, any side works for the encoder
    response = torch.randint(3, 259, (batch, 5), generator=g)
    response_mask = torch.ones_like(response)
    response_mask[1, 3:] = 0
    start = torch.zeros(batch, 1, dtype=torch.long) if arch in SEQ2SEQ else None
    return Rollout(query, query_mask, response, response_mask, start)


def wrap(arch: str):
    cls = AutoModelForSeq2SeqLMWithValueHead if arch in SEQ2SEQ else AutoModelForCausalLMWithValueHead
    return cls(tiny_hf_model(arch)).eval()


def reference_logprobs(reference, policy, rollout):
    with torch.no_grad():
        with reference.capture(policy):
            policy_out = forward(policy, rollout)
        with reference.context():
            return policy_out.logprobs, forward(reference.model, rollout).logprobs


@pytest.mark.parametrize("arch", ARCHS)
def test_reused_trunk_gives_exactly_the_full_reference(arch):
    policy = wrap(arch)
    reuse = ReferenceConfig("shared", num_shared_layers=1).build(policy)
    assert reuse.trunk and reuse.trunk[0].endswith("0")
    rollout = make_rollout(arch)
    policy_logprobs, reused = reference_logprobs(reuse, policy, rollout)
    assert torch.equal(reused, policy_logprobs)  # before any update: the policy's own log-probs, bit for bit
    full = ReferenceConfig("shared", num_shared_layers=1, reuse_trunk=False).build(policy)
    with torch.no_grad():
        assert torch.equal(reused, forward(full.model, rollout).logprobs)


def test_after_updates_the_reused_trunk_matches_a_frozen_copy():
    policy = wrap("gpt2")
    frozen = copy.deepcopy(policy)
    reference = ReferenceConfig("shared", num_shared_layers=1).build(policy)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=0.1)
    rollout = make_rollout("gpt2")
    for _ in range(2):
        out = forward(policy, rollout)
        (out.logprobs.mean() + out.values.mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    policy_logprobs, reused = reference_logprobs(reference, policy, rollout)
    assert not torch.allclose(policy_logprobs, reused)  # the policy moved away...
    with torch.no_grad():
        assert torch.equal(reused, forward(frozen, rollout).logprobs)  # ...the reference did not


def test_reference_without_capture_is_an_error():
    policy = wrap("gpt2")
    reference = ReferenceConfig("shared", num_shared_layers=1).build(policy)
    with pytest.raises(RuntimeError, match="capture"):
        with reference.context():
            pass
    assert "forward" not in vars(reference.model.get_submodule(reference.trunk[0]))
