"""``PPOCore.step``'s branches, each checked by its effect on a tiny GPT-2 with a real optimizer: scores clipped and
normalised, early stopping, the ratio threshold, gradient accumulation and gradient clipping."""

import os
import shutil

import pytest
import torch
from conftest import VOCAB, tiny_hf_model

from lit_vhead import AutoModelForCausalLMWithValueHead, PPOConfig, ReferenceConfig
from lit_vhead.ppo.engine import Engine, PPOCore
from lit_vhead.ppo.snapshot import UpdateSnapshot
from lit_vhead.rollout import Rollout

BATCH = 8


class RecordingAdam(torch.optim.Adam):
    """Adam that records the gradient norm it steps with (so the number of steps too)."""

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.grad_norms: list[float] = []

    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.grad_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return super().step(closure)


def rollout() -> Rollout:
    """Left-padded prompts and right-padded responses of varied lengths (EOS is 1; none is generated here)."""
    g = torch.Generator().manual_seed(0)
    query = torch.randint(3, VOCAB, (BATCH, 5), generator=g)
    query_mask = torch.ones_like(query)
    query_mask[::2, :2] = 0
    query = query.masked_fill(query_mask == 0, 0)
    response = torch.randint(3, VOCAB, (BATCH, 6), generator=g)
    response_mask = torch.ones_like(response)
    response_mask[1::3, 4:] = 0
    return Rollout(query, query_mask, response.masked_fill(response_mask == 0, 0), response_mask)


def run_step(scores=None, **settings):
    """One PPO update; returns (step output, optimizer, weights before, policy)."""
    config = PPOConfig(**{"batch_size": BATCH, "mini_batch_size": 2, "ppo_epochs": 2, "learning_rate": 1e-3,
                          **settings})
    policy = AutoModelForCausalLMWithValueHead(tiny_hf_model("gpt2"))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = RecordingAdam(params, lr=config.learning_rate)
    order = torch.Generator().manual_seed(1)
    engine = Engine(
        model=policy, policy=policy, reference=ReferenceConfig("copy").build(policy), optimizer=optimizer,
        backward=lambda loss: loss.backward(),
        clip_gradients=lambda max_norm: torch.nn.utils.clip_grad_norm_(params, max_norm),
        order=lambda n: torch.randperm(n, generator=order),
    )
    scores = torch.linspace(-10, 10, BATCH) if scores is None else scores
    output = PPOCore(config).step(engine, rollout(), scores, eos_token_id=1)
    return output, optimizer, before, policy


def changed(before: dict, policy) -> bool:
    return any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())


def test_the_step_logs_the_policy_entropy():
    """``ppo_loss`` gets the entropy of the minibatch logits from the core (TRL's ``ppo/policy/entropy``)."""
    output, *_ = run_step()
    assert 0 < output.stats["ppo/policy/entropy"] <= torch.log(torch.tensor(float(VOCAB))).item()


def test_score_clip_clips_the_scores_the_rewards_use():
    output, *_ = run_step(score_clip=2.5)
    assert torch.equal(output.scores, torch.linspace(-10, 10, BATCH).clamp(-2.5, 2.5))
    unclipped, *_ = run_step()
    assert unclipped.scores.abs().max() == 10


def test_score_scaling_and_normalisation():
    raw = torch.linspace(0, 14, BATCH)
    scaled, *_ = run_step(raw, use_score_scaling=True)
    assert scaled.scores.std().item() == pytest.approx(1.0, rel=0.15)
    assert scaled.scores.mean().item() == pytest.approx(raw.mean().item() / raw.std().item(), rel=0.15)
    normed, *_ = run_step(raw, use_score_scaling=True, use_score_norm=True)
    assert normed.scores.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert normed.scores.std().item() == pytest.approx(1.0, rel=0.15)
    torch.testing.assert_close(normed.scores, scaled.scores - scaled.scores.mean())


def test_early_stopping_stops_after_the_first_epoch():
    minibatches = BATCH // 2
    # policykl > 1.5 * target_kl holds for any KL when target_kl < 0: the loop must stop after epoch 1 of 4
    _, stopped, *_ = run_step(ppo_epochs=4, early_stopping=True, target_kl=-1.0)
    assert len(stopped.grad_norms) == minibatches
    _, full, *_ = run_step(ppo_epochs=4, early_stopping=True, target_kl=1e9)
    assert len(full.grad_norms) == 4 * minibatches
    _, off, *_ = run_step(ppo_epochs=4, early_stopping=False, target_kl=-1.0)
    assert len(off.grad_norms) == 4 * minibatches


def test_ratio_threshold_skips_batches_whose_ratio_exploded():
    output, optimizer, before, policy = run_step(ratio_threshold=0.0)  # every ratio (about 1) exceeds 0
    assert output.stats["ppo/skipped_batches"] == 2 * (BATCH // 2)
    assert all(norm == 0 for norm in optimizer.grad_norms) and not changed(before, policy)
    output, optimizer, before, policy = run_step()  # TRL's 10.0
    assert output.stats["ppo/skipped_batches"] == 0
    assert all(norm > 0 for norm in optimizer.grad_norms) and changed(before, policy)


def test_gradient_accumulation_steps_the_optimizer_once_per_backward_batch():
    _, plain, *_ = run_step(gradient_accumulation_steps=1)
    _, accumulated, *_ = run_step(gradient_accumulation_steps=2)
    assert len(plain.grad_norms) == 2 * BATCH // 2  # ppo_epochs x minibatches
    assert len(accumulated.grad_norms) == 2 * BATCH // 4  # ppo_epochs x backward batches (2 minibatches each)


def test_max_grad_norm_clips_every_step():
    _, unclipped, *_ = run_step()
    assert min(unclipped.grad_norms) > 1e-2
    _, clipped, *_ = run_step(max_grad_norm=1e-2)
    assert len(clipped.grad_norms) == len(unclipped.grad_norms)
    assert all(norm <= 1e-2 * (1 + 1e-4) for norm in clipped.grad_norms)
    assert max(clipped.grad_norms) == pytest.approx(1e-2, rel=1e-4)


def test_missing_eos_penalty_lowers_the_score_of_responses_without_eos():
    """TRL PPOv2's ``missing_eos_penalty``: reward models score responses that end with EOS."""
    data = rollout()
    data.response_ids[0, 2] = 1  # row 0 ends with EOS at position 2
    data.response_mask[0, 3:] = 0
    data.response_ids[3, 5] = 1  # row 3's EOS is its last token
    scores = torch.zeros(BATCH)
    transformed = PPOCore(PPOConfig(batch_size=BATCH, mini_batch_size=2, missing_eos_penalty=2.0)).transform_scores(
        scores, data, eos_token_id=1)
    expected = torch.full((BATCH,), -2.0)
    expected[[0, 3]] = 0.0
    assert torch.equal(transformed, expected)
    off = PPOCore(PPOConfig(batch_size=BATCH, mini_batch_size=2)).transform_scores(scores, data, eos_token_id=1)
    assert torch.equal(off, scores)


class FreshWeightsCheck(torch.nn.Module):
    """The training forward of the policy, checked against the same forward with autocast's weight cache off."""

    def __init__(self, policy) -> None:
        super().__init__()
        self.policy, self.diffs = policy, []

    def forward_with_values(self, **inputs):
        output, values = self.policy.forward_with_values(**inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            fresh, _ = self.policy.forward_with_values(**inputs)
        self.diffs.append((output.logits.float() - fresh.logits.float()).abs().max().item())
        return output, values


def test_every_minibatch_under_autocast_runs_on_the_updated_weights():
    """Lightning and Fabric run the whole PPO step inside one autocast region, whose cache would keep serving the
    weights cast before the first update to every later minibatch."""
    policy = AutoModelForCausalLMWithValueHead(tiny_hf_model("gpt2"))
    check = FreshWeightsCheck(policy)
    params = [p for p in policy.parameters() if p.requires_grad]
    order = torch.Generator().manual_seed(1)
    engine = Engine(
        model=check, policy=policy, reference=ReferenceConfig("copy").build(policy),
        optimizer=torch.optim.Adam(params, lr=1e-2), backward=lambda loss: loss.backward(),
        clip_gradients=lambda max_norm: None, order=lambda n: torch.randperm(n, generator=order),
    )
    config = PPOConfig(batch_size=BATCH, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        PPOCore(config).step(engine, rollout(), torch.linspace(-10, 10, BATCH), eos_token_id=1)
    assert len(check.diffs) == 2 * BATCH // 2 and max(check.diffs) == 0.0


def engine_for(policy, optimizer) -> Engine:
    """An engine that visits the samples in order (the same minibatches in every run)."""
    params = [p for p in policy.parameters() if p.requires_grad]
    return Engine(
        model=policy, policy=policy, reference=ReferenceConfig("copy").build(policy), optimizer=optimizer,
        backward=lambda loss: loss.backward(),
        clip_gradients=lambda max_norm: torch.nn.utils.clip_grad_norm_(params, max_norm),
        order=lambda n: torch.arange(n), local_gradients=True,
    )


@pytest.mark.parametrize("in_backward", [False, True])
def test_a_loss_that_turns_nan_midway_undoes_the_steps_already_taken(in_backward):
    """A huge learning rate makes the weights overflow after the first optimizer step: the error says which
    minibatch failed and what was undone, and the next step continues as if the failed one had never run."""
    config = PPOConfig(batch_size=BATCH, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3, use_score_scaling=True,
                       optimizer_in_backward=in_backward)
    scores = torch.linspace(-10, 10, BATCH)
    runs = []
    for fail in (True, False):
        policy = AutoModelForCausalLMWithValueHead(tiny_hf_model("gpt2"))
        optimizer = RecordingAdam([p for p in policy.parameters() if p.requires_grad], lr=config.learning_rate)
        core, engine = PPOCore(config), engine_for(policy, optimizer)
        core.step(engine, rollout(), scores, eos_token_id=1)
        if fail:
            weights = {k: v.clone() for k, v in policy.state_dict().items()}
            moments = {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
            ppo_state = core.state_dict()
            optimizer.param_groups[0]["lr"] = 1e35
            with pytest.raises(FloatingPointError, match=r"PPO step 1 \(PPO epoch 1 of 2, minibatch 2 of 4\); the 1 "
                               r"optimizer step\(s\) it had taken were undone.*last checkpoint is intact"):
                core.step(engine, rollout(), scores, eos_token_id=1, step_index=1)
            assert not changed(weights, policy) and core.state_dict() == ppo_state
            assert all(torch.equal(v, moments[p][k]) for p, s in optimizer.state.items() for k, v in s.items())
            assert all(p.grad is None for p in policy.parameters())
            optimizer.param_groups[0]["lr"] = config.learning_rate
        output = core.step(engine, rollout(), scores * 2, eos_token_id=1, step_index=2)
        runs.append((policy.state_dict(), core.state_dict(), output.stats["ppo/loss/total"]))
    (failed_weights, failed_state, failed_loss), (clean_weights, clean_state, clean_loss) = runs
    assert all(torch.equal(failed_weights[k], v) for k, v in clean_weights.items())
    assert failed_state == clean_state and failed_loss == clean_loss


def test_nan_in_the_update_inputs_stops_before_any_step_and_keeps_the_ppo_state():
    config = PPOConfig(batch_size=BATCH, mini_batch_size=2, ppo_epochs=2, use_score_scaling=True)
    policy = AutoModelForCausalLMWithValueHead(tiny_hf_model("gpt2"))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    optimizer = RecordingAdam([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    core = PPOCore(config)
    ppo_state = core.state_dict()
    scores = torch.linspace(-10, 10, BATCH)
    scores[7] = float("nan")
    with pytest.raises(FloatingPointError, match=r"PPO step 0 would train on NaN/inf: the scores of samples \[7\] "
                       r"are not finite.*No update was applied"):
        core.step(engine_for(policy, optimizer), rollout(), scores, eos_token_id=1)
    assert optimizer.grad_norms == [] and not changed(before, policy)
    assert core.state_dict() == ppo_state  # the running score moments did not take the NaN in


def test_without_undo_failed_update_the_error_says_which_steps_were_kept():
    """``ppo.undo_failed_update=false`` takes no copy: the steps taken stay, and the error says how many."""
    config = PPOConfig(batch_size=BATCH, mini_batch_size=2, ppo_epochs=2, use_score_scaling=True,
                       undo_failed_update=False)
    policy = AutoModelForCausalLMWithValueHead(tiny_hf_model("gpt2"))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    optimizer = RecordingAdam([p for p in policy.parameters() if p.requires_grad], lr=1e35)
    core = PPOCore(config)
    ppo_state = core.state_dict()
    with pytest.raises(FloatingPointError, match=r"minibatch 2 of 4\); the model and the optimizer keep the 1 "
                       r"optimizer step\(s\) it had taken \(ppo.undo_failed_update=false\)"):
        core.step(engine_for(policy, optimizer), rollout(), torch.linspace(-10, 10, BATCH), eos_token_id=1)
    assert len(optimizer.grad_norms) == 1 and changed(before, policy) and core.state_dict() == ppo_state


def test_the_undo_copy_is_an_unlinked_file_in_undo_dir_freed_when_the_step_ends(tmpfs):
    """The copy of the weights and Adam's moments lives in ``ppo.undo_dir`` (not in the process's memory) while
    the update runs, under no name, and is gone when the PPO step ends."""
    undo_dir = tmpfs("16m")
    config = PPOConfig(batch_size=BATCH, mini_batch_size=2, ppo_epochs=2, undo_dir=str(undo_dir))
    policy = AutoModelForCausalLMWithValueHead(tiny_hf_model("gpt2"))
    params = [p for p in policy.parameters() if p.requires_grad]
    seen = []

    class WatchingAdam(RecordingAdam):  # a step pre-hook would fire twice once Adam.step is profiled too
        def step(self, closure=None):
            seen.append((shutil.disk_usage(undo_dir).used, os.listdir(undo_dir)))
            return super().step(closure)

    optimizer = WatchingAdam(params, lr=1e-4)
    empty = shutil.disk_usage(undo_dir).used
    core, weights = PPOCore(config), sum(p.numel() * p.element_size() for p in params)
    for step in range(2):
        seen.clear()
        core.step(engine_for(policy, optimizer), rollout(), torch.linspace(-10, 10, BATCH), eos_token_id=1)
        copies = 1 if step == 0 else 3  # Adam's moments exist from its first step on
        assert len(seen) == 8 and all(used - empty >= copies * weights and names == [] for used, names in seen)
        assert shutil.disk_usage(undo_dir).used == empty


def test_an_undo_dir_without_room_fails_before_anything_changes(tmpfs):
    """A full ``ppo.undo_dir`` stops the step before its first optimizer step, names the directory and the fixes,
    and leaves the model, the optimizer and the PPO state as they were."""
    undo_dir = tmpfs("64k")  # the tiny policy's weights alone are 148 kB
    config = PPOConfig(batch_size=BATCH, mini_batch_size=2, ppo_epochs=2, use_score_scaling=True,
                       undo_dir=str(undo_dir))
    policy = AutoModelForCausalLMWithValueHead(tiny_hf_model("gpt2"))
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    optimizer = RecordingAdam([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    core = PPOCore(config)
    ppo_state = core.state_dict()
    with pytest.raises(OSError, match=rf"Could not write the copy that undoes a failed PPO update \(\d+ MiB written\) "
                       rf"to {undo_dir}: .*No space left on device.*Nothing was changed. Free space there, point "
                       r"ppo.undo_dir at a directory with room, or set ppo.undo_failed_update=false."):
        core.step(engine_for(policy, optimizer), rollout(), torch.linspace(-10, 10, BATCH), eos_token_id=1)
    assert optimizer.grad_norms == [] and not changed(before, policy) and core.state_dict() == ppo_state
    assert os.listdir(undo_dir) == []
    config.undo_failed_update = False  # the way out the error names
    core.step(engine_for(policy, optimizer), rollout(), torch.linspace(-10, 10, BATCH), eos_token_id=1)
    assert len(optimizer.grad_norms) == 8 and changed(before, policy)


@pytest.mark.parametrize("make", [
    lambda params: torch.optim.Adam(params, lr=0.1),
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True),
])
def test_the_undo_copy_restores_every_kind_of_tensor_bitwise(make):
    """bf16 and non-contiguous parameters, one larger than the file's 16 MiB write/read buffer, and the optimizer's
    tensor and non-tensor state come back bit for bit, into the same objects (a parameter stays the one the model
    and optimizer hold)."""
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3, 4).t()),
              torch.nn.Parameter(torch.randn(7, dtype=torch.bfloat16)), torch.nn.Parameter(torch.tensor(2.5)),
              torch.nn.Parameter(torch.randn(4_500_001))]
    assert not params[1].is_contiguous()
    optimizer = make(params)

    def train(steps: int) -> None:
        for _ in range(steps):
            sum((p.float() ** 2).sum() for p in params).backward()
            optimizer.step()
            optimizer.zero_grad()

    train(2)
    weights = [p.detach().clone() for p in params]
    state = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
             for i, p in enumerate(params)}
    snapshot = UpdateSnapshot(optimizer)
    snapshot.wait()  # the copy is written in the background: whole before anything steps
    train(3)
    optimizer.param_groups[0]["lr"] = 7.0
    assert not torch.equal(params[0], weights[0])
    snapshot.restore()
    snapshot.close()
    assert all(torch.equal(p, w) and p.dtype == w.dtype for p, w in zip(params, weights))
    assert optimizer.param_groups[0]["lr"] == 0.1 and all(p.grad is None for p in params)
    for i, p in enumerate(params):
        assert optimizer.state[p].keys() == state[i].keys()
        assert all(torch.equal(v, state[i][k]) if torch.is_tensor(v) else v == state[i][k]
                   for k, v in optimizer.state[p].items())
    train(1)  # the optimizer goes on from the restored state
