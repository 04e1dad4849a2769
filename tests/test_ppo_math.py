"""PPO math against TRL classic (0.11.4) oracle vectors and hand-computed values."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lit_vhead.ppo import (
    KL_PENALTY_KINDS,
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    compute_advantages,
    compute_rewards,
    entropy_from_logits,
    kl_penalty,
    logprobs_from_logits,
    make_kl_controller,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_loss,
)

# TRL 0.11.4 oracle vectors (its classic PPO math on random, padded inputs), vendored with the tests.
ORACLE_PATH = Path(__file__).resolve().parent / "data" / "trl-classic-ppo-vectors.json"
ORACLE = json.loads(ORACLE_PATH.read_text())
PPO_CASES = ORACLE["ppo_cases"]
CASE_IDS = [
    f"{i}-{c['config']['kl_penalty']}-whiten{int(c['config']['whiten_rewards'])}" for i, c in enumerate(PPO_CASES)
]
ATOL = 1e-5


def _tensors(d: dict) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in d.items() if k != "stats"}


def _rewards_for(case: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg, inp = case["config"], _tensors(case["inputs"])
    if cfg["kl_penalty"] == "full":
        # The oracle gives [B, T, V] distributions; the per-token log-probs are unused by "full".
        full, ref_full = inp["logprobs"], inp["ref_logprobs"]
        labels = full.argmax(-1, keepdim=True)
        return compute_rewards(
            inp["scores"], full.gather(-1, labels).squeeze(-1), ref_full.gather(-1, labels).squeeze(-1),
            inp["mask"], cfg["kl_coef"], "full", full, ref_full,
        )  # fmt: skip
    return compute_rewards(
        inp["scores"], inp["logprobs"], inp["ref_logprobs"], inp["mask"], cfg["kl_coef"], cfg["kl_penalty"]
    )


# --------------------------------------------------------------------------------------------- oracle


def test_oracle_covers_every_kl_kind_of_trl() -> None:
    assert {c["config"]["kl_penalty"] for c in PPO_CASES} == {"kl", "abs", "mse", "full"}


@pytest.mark.parametrize("case", PPO_CASES, ids=CASE_IDS)
def test_compute_rewards_matches_trl(case: dict) -> None:
    out = _tensors(case["outputs"])
    rewards, non_score_rewards, kls = _rewards_for(case)
    torch.testing.assert_close(kls, out["kls"], atol=ATOL, rtol=0)
    torch.testing.assert_close(non_score_rewards, out["non_score_rewards"], atol=ATOL, rtol=0)
    torch.testing.assert_close(rewards, out["rewards"], atol=ATOL, rtol=0)


def _gae(values: torch.Tensor, rewards: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Plain GAE from the end (TRL's loop), for the whitened-reward cases below."""
    advantages, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_values = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        last = rewards[:, t] + gamma * next_values - values[:, t] + gamma * lam * last
        advantages[:, t] = last
    return advantages


@pytest.mark.parametrize("case", PPO_CASES, ids=CASE_IDS)
def test_compute_advantages_matches_trl(case: dict) -> None:
    cfg, inp, out = case["config"], _tensors(case["inputs"]), _tensors(case["outputs"])
    rewards, _, _ = _rewards_for(case)
    values, advantages, returns = compute_advantages(
        inp["values"], rewards, inp["mask"], cfg["gamma"], cfg["lam"], whiten_rewards=cfg["whiten_rewards"]
    )
    torch.testing.assert_close(values, out["masked_values"], atol=ATOL, rtol=0)
    if not cfg["whiten_rewards"]:
        torch.testing.assert_close(advantages, out["advantages"], atol=ATOL, rtol=0)
        torch.testing.assert_close(returns, out["returns"], atol=ATOL, rtol=0)
        return
    # TRL 0.11.4 whitens the rewards but leaves the padding positions non-zero, and its GAE carries them into the
    # real tokens before them. The oracle is exactly that leak...
    mask = inp["mask"].float()
    whitened = masked_whiten(rewards * mask, mask, shift_mean=False)
    leaked = _gae(values, whitened, cfg["gamma"], cfg["lam"])
    torch.testing.assert_close(leaked + values, out["returns"], atol=ATOL, rtol=0)
    # ...which is not copied: here the padding stays zero, so real tokens see only real rewards.
    fixed = _gae(values, whitened * mask, cfg["gamma"], cfg["lam"])
    torch.testing.assert_close(returns, fixed + values, atol=ATOL, rtol=0)
    torch.testing.assert_close(advantages, masked_whiten(fixed, mask), atol=ATOL, rtol=0)
    assert not torch.allclose(returns * mask, out["returns"] * mask, atol=1e-3)  # the leak reached real tokens


def test_whitened_rewards_ignore_padding() -> None:
    """Extra padding columns must not change any real token's advantage (TRL's whiten_rewards leak)."""
    g = torch.Generator().manual_seed(0)
    values, rewards = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    pad = lambda x: torch.cat([x, torch.zeros(3, 2)], 1)  # noqa: E731
    _, advantages, returns = compute_advantages(values, rewards, mask, 1.0, 0.95, whiten_rewards=True)
    _, padded_adv, padded_ret = compute_advantages(pad(values), pad(rewards), pad(mask), 1.0, 0.95, whiten_rewards=True)
    torch.testing.assert_close(padded_adv[:, :4] * mask, advantages * mask)
    torch.testing.assert_close(padded_ret[:, :4] * mask, returns * mask)


@pytest.mark.parametrize("case", PPO_CASES, ids=CASE_IDS)
def test_ppo_loss_matches_trl(case: dict) -> None:
    cfg, inp, out = case["config"], _tensors(case["inputs"]), _tensors(case["outputs"])
    pg_loss, scaled_vf_loss, stats = ppo_loss(
        inp["old_logprobs"], out["masked_values"], inp["new_logprobs"], inp["vpreds"], inp["mask"],
        out["advantages"], out["returns"], cfg["cliprange"], cfg["cliprange_value"], cfg["vf_coef"],
        entropy=entropy_from_logits(inp["logits"]),
    )  # fmt: skip
    assert pg_loss.item() == pytest.approx(case["outputs"]["pg_loss"], abs=ATOL)
    assert scaled_vf_loss.item() == pytest.approx(case["outputs"]["scaled_vf_loss"], abs=ATOL)
    oracle_stats = case["outputs"]["stats"]
    for key, expected in oracle_stats.items():
        assert key in stats, key
        assert stats[key].item() == pytest.approx(expected, abs=ATOL), key
    # Extras beyond the oracle: TRL's var_explained (computed at logging time) and the ratio mean.
    expected_ve = 1 - oracle_stats["val/error"] / oracle_stats["returns/var"]
    assert stats["val/var_explained"].item() == pytest.approx(expected_ve, rel=1e-5)
    ratio = torch.exp(inp["new_logprobs"] - inp["old_logprobs"])
    assert stats["policy/ratio_mean"].item() == pytest.approx(masked_mean(ratio, inp["mask"]).item(), abs=1e-6)
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


@pytest.mark.parametrize("case", ORACLE["adaptive_kl_cases"])
def test_adaptive_kl_matches_trl(case: dict) -> None:
    ctl = AdaptiveKLController(case["init_kl_coef"], case["target"], case["horizon"])
    ctl.update(case["current_kl"], case["n_steps"])
    assert ctl.value == pytest.approx(case["new_kl_coef"], rel=1e-12)


# --------------------------------------------------------------------------------------------- hand-computed


def test_gae_by_hand_gamma1_lam1_and_padding_does_not_leak() -> None:
    # Real tokens 0..2, a padded slot 3 carrying garbage that must be ignored.
    values = torch.tensor([[0.5, 0.25, 0.75, 5.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    masked_values, advantages, returns = compute_advantages(values, rewards, mask, gamma=1.0, lam=1.0)
    # With γ=λ=1: A_t = Σ_{k≥t} r_k − V_t = [1−0.5, 1−0.25, 1−0.75]; returns = reward-to-go = 1.
    # Whitening: mean 0.5, unbiased var (0 + 0.0625 + 0.0625)/2 = 0.0625, std 0.25 -> [0, 1, −1].
    torch.testing.assert_close(masked_values, torch.tensor([[0.5, 0.25, 0.75, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    torch.testing.assert_close(advantages[:, :3], torch.tensor([[0.0, 1.0, -1.0]]), atol=1e-6, rtol=0)


def test_gae_by_hand_discounted() -> None:
    values = torch.tensor([[1.0, 2.0]])
    rewards = torch.tensor([[0.5, 1.0]])
    gamma, lam = 0.9, 0.5
    _, advantages, returns = compute_advantages(values, rewards, torch.ones(1, 2), gamma, lam)
    a1 = 1.0 - 2.0
    a0 = (0.5 + gamma * 2.0 - 1.0) + gamma * lam * a1
    torch.testing.assert_close(returns, torch.tensor([[a0 + 1.0, a1 + 2.0]]))
    assert advantages[0, 0] > advantages[0, 1]  # whitening keeps the order


def test_ppo_loss_ratio_and_value_clipping_by_hand() -> None:
    # ratio = e on both tokens; A = +1 is clipped to 1.2, A = −1 keeps the pessimistic unclipped e.
    old = torch.zeros(1, 2)
    new = torch.ones(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    values = torch.zeros(1, 2)
    vpreds = torch.ones(1, 2)
    returns = torch.full((1, 2), 2.0)
    mask = torch.ones(1, 2)
    pg_loss, vf_loss, stats = ppo_loss(old, values, new, vpreds, mask, adv, returns, 0.2, 0.2, vf_coef=0.1)
    assert pg_loss.item() == pytest.approx((-1.2 + math.e) / 2)
    assert stats["policy/clipfrac"].item() == pytest.approx(0.5)
    assert stats["policy/ratio_mean"].item() == pytest.approx(math.e)
    assert stats["policy/policykl"].item() == pytest.approx(-1.0)
    assert stats["policy/approxkl"].item() == pytest.approx(0.5)
    # vpred 1 is clipped to 0.2: max((1−2)², (0.2−2)²) = 3.24, halved = 1.62.
    assert stats["loss/value"].item() == pytest.approx(1.62)
    assert vf_loss.item() == pytest.approx(0.162)
    assert stats["val/clipfrac"].item() == pytest.approx(1.0)
    assert stats["loss/total"].item() == pytest.approx(pg_loss.item() + 0.162)
    assert "policy/entropy" not in stats


def test_ppo_loss_gradients_flow_to_logprobs_and_vpreds() -> None:
    new = torch.zeros(2, 3, requires_grad=True)
    vpreds = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    pg, vf, _ = ppo_loss(torch.zeros(2, 3), torch.zeros(2, 3), new, vpreds, mask, torch.ones(2, 3),
                         torch.ones(2, 3), 0.2, 0.2, 0.1)  # fmt: skip
    (pg + vf).backward()
    assert new.grad[0, 2] == 0 and vpreds.grad[0, 2] == 0
    assert new.grad[0, 0] < 0 and vpreds.grad[0, 0] < 0


@pytest.mark.parametrize(
    ("mask", "expected_index"),
    [
        ([1, 1, 1, 0, 0], 2),  # right padding
        ([0, 0, 1, 1, 1], 4),  # left padding
        ([0, 1, 1, 0, 0], 2),  # both sides
        ([1, 0, 1, 0, 0], 2),  # a hole
        ([1, 1, 1, 1, 1], 4),  # no padding
    ],
)
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool])
def test_score_lands_on_last_unmasked_token(mask: list[int], expected_index: int, mask_dtype: torch.dtype) -> None:
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -1.5, -0.1]])
    ref = logprobs - 0.1
    m = torch.tensor([mask]).to(mask_dtype)
    rewards, non_score, kls = compute_rewards(torch.tensor([3.0]), logprobs, ref, m, kl_coef=0.5)
    torch.testing.assert_close(kls, torch.full((1, 5), 0.1))
    torch.testing.assert_close(non_score, torch.full((1, 5), -0.05))
    expected = non_score.clone()
    expected[0, expected_index] += 3.0
    torch.testing.assert_close(rewards, expected)


def test_compute_rewards_batch_with_mixed_masks() -> None:
    mask = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 1, 0]])
    rewards, _, _ = compute_rewards(torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3, 3), torch.zeros(3, 3), mask, 0.2)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [0.0, 3.0, 0.0]]))


def test_compute_rewards_rejects_row_without_response() -> None:
    with pytest.raises(ValueError, match="at least one response token"):
        compute_rewards(torch.ones(2), torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]), 0.1)


def test_kl_penalty_kinds_by_hand() -> None:
    lp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    torch.testing.assert_close(kl_penalty(lp, ref, "kl"), torch.tensor([[0.5, -1.0]]))
    torch.testing.assert_close(kl_penalty(lp, ref, "abs"), torch.tensor([[0.5, 1.0]]))
    torch.testing.assert_close(kl_penalty(lp, ref, "mse"), torch.tensor([[0.125, 0.5]]))
    r = torch.tensor([[-0.5, 1.0]])
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), torch.exp(r) - 1 - r)


def test_k3_is_nonnegative_and_zero_on_equal_policies() -> None:
    gen = torch.Generator().manual_seed(0)
    lp, ref = -torch.rand(64, 16, generator=gen) * 5, -torch.rand(64, 16, generator=gen) * 5
    assert (kl_penalty(lp, ref, "k3") >= 0).all()
    assert kl_penalty(lp, lp, "k3").abs().max() == 0


def test_full_kl_is_exact_kl_and_needs_distributions() -> None:
    gen = torch.Generator().manual_seed(1)
    full = torch.log_softmax(torch.randn(2, 3, 7, generator=gen), -1)
    ref_full = torch.log_softmax(torch.randn(2, 3, 7, generator=gen), -1)
    got = kl_penalty(full[..., 0], ref_full[..., 0], "full", full, ref_full)
    expected = F.kl_div(ref_full, full, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(got, expected)
    assert (got >= -1e-6).all()
    with pytest.raises(ValueError, match="logprobs_full"):
        kl_penalty(full[..., 0], ref_full[..., 0], "full")


def test_unknown_kl_kind_names_it_and_lists_valid_kinds() -> None:
    with pytest.raises(ValueError, match="'bogus'") as err:
        kl_penalty(torch.zeros(1, 2), torch.zeros(1, 2), "bogus")
    for kind in KL_PENALTY_KINDS:
        assert repr(kind) in str(err.value)


def test_masked_stats_by_hand() -> None:
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 4.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    assert masked_mean(x, mask).item() == pytest.approx(2.5)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.5]))
    assert masked_var(x, mask).item() == pytest.approx(5.0 / 3)  # Σ(x−2.5)² = 5, n−1 = 3
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(1.25)
    whitened = masked_whiten(x, mask)
    assert masked_mean(whitened, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert masked_var(whitened, mask).item() == pytest.approx(1.0, rel=1e-6)
    unshifted = masked_whiten(x, mask, shift_mean=False)
    assert masked_mean(unshifted, mask).item() == pytest.approx(2.5, rel=1e-6)


@pytest.mark.parametrize("fn", [masked_whiten, masked_mean, masked_var])
def test_zero_mask_raises(fn) -> None:
    with pytest.raises(ValueError, match=r"mask.sum\(\) == 0"):
        fn(torch.ones(2, 3), torch.zeros(2, 3))


def test_whiten_single_element_raises_instead_of_nan() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        masked_whiten(torch.ones(1, 3), torch.tensor([[0.0, 1.0, 0.0]]))


def test_masked_mean_distributed_needs_full_reduction() -> None:
    with pytest.raises(ValueError, match="dim=None"):
        masked_mean(torch.ones(2, 2), torch.ones(2, 2), dim=1, distributed=True)


def test_ppo_loss_zero_mask_raises() -> None:
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"mask.sum\(\) == 0"):
        ppo_loss(z, z, z, z, z, z, z, 0.2, 0.2, 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_logprobs_and_entropy_from_logits(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(3, 4, 9, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, 9, (3, 4), generator=gen)
    ref_logits = logits.double()
    expected_lp = torch.log_softmax(ref_logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    expected_ent = torch.distributions.Categorical(logits=ref_logits).entropy()
    lp, ent = logprobs_from_logits(logits, labels), entropy_from_logits(logits)
    assert lp.shape == ent.shape == (3, 4)
    assert lp.dtype == ent.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(lp.double(), expected_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), expected_ent, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_error_is_clipped_and_state_round_trips() -> None:
    ctl = make_kl_controller(True, 0.2, target=6.0, horizon=10.0)
    assert isinstance(ctl, AdaptiveKLController)
    ctl.update(1000.0, n_steps=5)  # error clipped to +0.2 -> ×1.1
    assert ctl.value == pytest.approx(0.22)
    ctl.update(0.0, n_steps=5)  # error clipped to −0.2 -> ×0.9
    assert ctl.value == pytest.approx(0.198)
    fresh = make_kl_controller(True, 0.2, target=6.0, horizon=10.0)
    fresh.load_state_dict(ctl.state_dict())
    assert fresh.value == ctl.value
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.2, target=0.0, horizon=1.0)


def test_fixed_kl_controller() -> None:
    ctl = make_kl_controller(False, 0.05, target=6.0, horizon=10000.0)
    assert isinstance(ctl, FixedKLController)
    ctl.update(100.0, n_steps=128)
    assert ctl.value == 0.05
    assert ctl.state_dict() == {"value": 0.05}
    ctl.load_state_dict({"value": 0.07})
    assert ctl.value == 0.07


# --------------------------------------------------------------------------------------------- running moments


def test_running_moments_track_the_whole_stream() -> None:
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, generator=gen) * 2 + 1 for n in (4, 7, 5)]
    rm = RunningMoments(distributed=False)
    for b in batches:
        batch_mean, batch_std = rm.update(b)
        assert batch_mean == pytest.approx(b.mean().item(), abs=1e-6)
        assert batch_std == pytest.approx(b.std().item(), rel=1e-5)
    seen = torch.cat(batches).double()
    assert rm.mean == pytest.approx(seen.mean().item(), abs=1e-6)
    assert rm.var == pytest.approx(seen.var(unbiased=False).item(), rel=1e-5)
    assert rm.std == pytest.approx(seen.std().item(), rel=1e-5)
    assert rm.count == pytest.approx(16)
    restored = RunningMoments(distributed=False)
    restored.load_state_dict(rm.state_dict())
    assert restored.state_dict() == rm.state_dict()


def test_running_moments_single_score_has_undefined_std() -> None:
    rm = RunningMoments(distributed=False)
    batch_mean, batch_std = rm.update(torch.tensor([2.0]))
    assert batch_mean == 2.0 and math.isnan(batch_std) and math.isnan(rm.std)
    rm.update(torch.tensor([4.0]))
    assert rm.mean == pytest.approx(3.0) and rm.std == pytest.approx(math.sqrt(2.0))


# --------------------------------------------------------------------------------------------- distributed


def _distributed_worker(rank: int, store: str, results: multiprocessing.SimpleQueue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        gen = torch.Generator().manual_seed(4)
        x = torch.randn(4, 5, generator=gen)
        mask = torch.rand(4, 5, generator=gen) > 0.3
        mask[:, 0] = True
        shard = slice(2 * rank, 2 * rank + 2)
        diffs = {
            "mean": (masked_mean(x[shard], mask[shard], distributed=True) - masked_mean(x, mask)).abs().item(),
            "var": (masked_var(x[shard], mask[shard], distributed=True) - masked_var(x, mask)).abs().item(),
            "whiten": (masked_whiten(x[shard], mask[shard], distributed=True) - masked_whiten(x, mask)[shard])
            .abs()
            .max()
            .item(),
        }
        x_shard = x[shard].clone().requires_grad_(True)
        masked_mean(x_shard, mask[shard], distributed=True).backward()
        diffs["mean_grad"] = (x_shard.grad - mask[shard].float() / mask.sum()).abs().max().item()
        _, adv, _ = compute_advantages(x[shard], x[shard].flip(1), mask[shard], 1.0, 0.95, True, distributed=True)
        _, adv_all, _ = compute_advantages(x, x.flip(1), mask, 1.0, 0.95, True)
        diffs["advantages"] = (adv - adv_all[shard]).abs().max().item()
        rm, rm_all = RunningMoments(), RunningMoments(distributed=False)
        scores = x[:, 0]
        rm.update(scores[shard])
        rm_all.update(scores)
        diffs["running_mean"] = abs(rm.mean - rm_all.mean)
        diffs["running_std"] = abs(rm.std - rm_all.std)
        results.put((rank, diffs))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_statistics_cover_all_ranks(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    results = ctx.SimpleQueue()
    store = os.fspath(tmp_path / "store")
    procs = [ctx.Process(target=_distributed_worker, args=(rank, store, results)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    for _ in procs:
        rank, diffs = results.get()
        for name, diff in diffs.items():
            assert diff < 1e-5, (rank, name, diff)
