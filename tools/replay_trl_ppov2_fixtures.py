"""Replay ``tests/data/trl_ppov2`` without TRL: the PPO update of TRL 0.29.1's experimental ``PPOTrainer``, written
from its spec in plain torch + transformers, checked against what TRL recorded (rollout tensors, per-minibatch
statistics, logged metrics, policy and value weights after the update). It shows that the fixtures carry every input
an implementation needs, and what agreement to expect::

    OMP_NUM_THREADS=1 python tools/replay_trl_ppov2_fixtures.py [tests/data/trl_ppov2]

Each case's inputs: the start weights (``start/``), its config, ``batch_queries`` (TRL's batch order, left-padded),
``responses_by_query`` and the recorded ``permutations``. The old log-probs are a no-grad forward of the policy (what
the fixture's fixed rollout gave TRL as generation scores). ``ga_quirk`` is replayed with TRL's accumulation as
released (accelerate's counter runs across minibatches); every other case steps the optimizer once per minibatch.
Prints the largest differences per case and exits non-zero when one is over its tolerance. Measured (one thread):
rollout tensors within 1.5e-6, logged metrics within 6e-7 (relative), weights within 1.8e-6 of TRL's. With TRL's own
log-prob formula (``gather(logits) - logsumexp(logits)`` row by row, ``selective_log_softmax``) instead of
``log_softmax().gather()`` four cases are bitwise equal and ``k3_whiten`` is within 5e-7: the rest is float rounding.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import load_file
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

PAD, EOS, INVALID_LOGPROB = 0, 1, 1.0
TOL = {"rollout": 1e-5, "weights": 1e-5, "logged": 1e-5}


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum()


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the mask, variance with Bessel's correction (TRL's ``masked_whiten``)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return out + mean if not shift_mean else out


def first_true(b: torch.Tensor) -> torch.Tensor:
    """Index of the first True per row, the row length when there is none."""
    n = b.size(-1)
    return torch.where(b.any(-1), b.int().argmax(-1), torch.full(b.shape[:-1], n, dtype=torch.long))


def backbone_out(model, query_responses: torch.Tensor):
    """TRL's forward convention: pad ids masked (and replaced by 0), position ids = exclusive cumsum of the mask."""
    mask = query_responses != PAD
    return model(input_ids=query_responses.masked_fill(~mask, 0), attention_mask=mask,
                 position_ids=mask.cumsum(1) - mask.long(), output_hidden_states=True, return_dict=True)


def scalar_head(model: GPT2ForSequenceClassification, query_responses: torch.Tensor) -> torch.Tensor:
    """``model.score`` on the last hidden state of ``model.transformer``: one number per position."""
    return model.score(backbone_out(model.transformer, query_responses).hidden_states[-1]).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def replay(root: str, name: str, case: dict) -> dict[str, float]:
    cfg = case["config"]
    start = os.path.join(root, "start")
    policy = GPT2LMHeadModel.from_pretrained(os.path.join(start, "policy"))
    ref = GPT2LMHeadModel.from_pretrained(os.path.join(start, "ref" if case["ref"] == "start/ref" else "policy"))
    value_model = GPT2ForSequenceClassification.from_pretrained(os.path.join(start, "value"))
    reward_model = GPT2ForSequenceClassification.from_pretrained(os.path.join(start, "reward"))
    for m in (policy, ref, value_model, reward_model):  # TRL sets every dropout's p to 0; train() keeps train mode
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    policy.train(), value_model.train()
    temperature = cfg["temperature"] + 1e-7
    responses_of = {tuple(q): r for q, r in zip(case["dataset_queries"], case["responses_by_query"])}
    queries = torch.tensor(case["batch_queries"])
    responses = torch.tensor([responses_of[tuple(t for t in q if t != PAD)] for q in case["batch_queries"]])
    B, C, L = queries.shape[0], queries.shape[1], responses.shape[1]
    query_responses = torch.cat([queries, responses], 1)

    # ---- rollout (no grad)
    with torch.no_grad():
        logprobs = token_logprobs(backbone_out(policy, query_responses).logits[:, C - 1 : -1] / temperature, responses)
        ref_logprobs = token_logprobs(backbone_out(ref, query_responses).logits[:, C - 1 : -1] / temperature, responses)
        post = responses
        if cfg.get("stop_token") == "eos":  # everything after the first stop token becomes pad
            cut = first_true(responses == EOS).unsqueeze(1)
            post = responses.masked_fill(torch.arange(L) > cut, PAD)
        seq_len = first_true(post == PAD) - 1  # last real response index (-1: empty)
        values = scalar_head(value_model, query_responses)[:, C - 1 : -1]
        scores = scalar_head(reward_model, torch.cat([queries, post], 1))[torch.arange(B), seq_len + C]
        if cfg.get("missing_eos_penalty") is not None:
            scores = scores - cfg["missing_eos_penalty"] * (~(post == EOS).any(1)).float()
        idx = torch.arange(L).expand(B, L)
        pad_mask = idx > seq_len.unsqueeze(1)  # after the last real token
        pad_mask_p1 = idx > (seq_len + 1).unsqueeze(1)  # values keep one slot more: the state after the last token
        logprobs = logprobs.masked_fill(pad_mask, INVALID_LOGPROB)
        ref_logprobs = ref_logprobs.masked_fill(pad_mask, INVALID_LOGPROB)
        values = values.masked_fill(pad_mask_p1, 0.0)
        logr = ref_logprobs - logprobs
        kl = -logr if cfg.get("kl_estimator", "k1") == "k1" else (logr.exp() - 1) - logr
        non_score_reward = -cfg.get("kl_coef", 0.05) * kl
        end = torch.where(seq_len + 1 < L, seq_len + 1, seq_len)  # the score goes one past the last real token
        rewards = non_score_reward.clone()
        rewards[torch.arange(B), end] += scores
        if cfg.get("whiten_rewards"):
            rewards = masked_whiten(rewards, ~pad_mask_p1, shift_mean=False).masked_fill(pad_mask_p1, 0.0)
        gamma, lam = cfg.get("gamma", 1.0), cfg.get("lam", 0.95)
        adv, last = torch.zeros_like(rewards), torch.zeros(B)
        for t in reversed(range(L)):
            next_value = values[:, t + 1] if t < L - 1 else 0.0
            last = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last
            adv[:, t] = last
        returns = adv + values
        adv = masked_whiten(adv, ~pad_mask).masked_fill(pad_mask, 0.0)
    rec = case["rollout"]
    ours = {"logprobs": logprobs, "ref_logprobs": ref_logprobs, "values": values, "scores": scores, "kl": kl,
            "rewards": rewards, "advantages": adv, "returns": returns}
    diffs = {"rollout": max((v - torch.tensor(rec[k])).abs().max().item() for k, v in ours.items())}
    assert torch.equal(seq_len, torch.tensor(rec["sequence_lengths"]))
    assert torch.equal(end, torch.tensor(rec["actual_end"]))

    # ---- PPO epochs
    params = list(policy.parameters()) + list(value_model.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg["learning_rate"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                  fused=True)
    ga, micro = cfg.get("gradient_accumulation_steps", 1), cfg["per_device_train_batch_size"]
    n_mb = cfg["num_mini_batches"]
    mini = B // n_mb
    stats = {k: torch.zeros(cfg["num_ppo_epochs"], n_mb, ga) for k in ("approxkl", "clipfrac", "pg", "vf", "vfclip",
                                                                         "entropy", "ratio")}
    counter, steps = 0, 0
    for epoch, perm in enumerate(case["permutations"]):
        perm = torch.tensor(perm)
        for mb, m0 in enumerate(range(0, B, mini)):
            mb_inds = perm[m0 : m0 + mini]
            for g, u0 in enumerate(range(0, mini, micro)):
                i = mb_inds[u0 : u0 + micro]
                out = backbone_out(policy, query_responses[i])
                logits = out.logits[:, C - 1 : -1] / temperature
                new_logprobs = token_logprobs(logits, responses[i]).masked_fill(pad_mask[i], INVALID_LOGPROB)
                vpred = scalar_head(value_model, query_responses[i])[:, C - 1 : -1].masked_fill(pad_mask_p1[i], 0.0)
                cv = cfg.get("cliprange_value", 0.2)
                vclip = torch.clamp(vpred, values[i] - cv, values[i] + cv)
                vf1, vf2 = (vpred - returns[i]) ** 2, (vclip - returns[i]) ** 2
                vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), ~pad_mask_p1[i])
                diff = new_logprobs - logprobs[i]
                ratio = diff.exp()
                cr = cfg.get("cliprange", 0.2)
                pg1, pg2 = -adv[i] * ratio, -adv[i] * ratio.clamp(1 - cr, 1 + cr)
                pg_loss = masked_mean(torch.max(pg1, pg2), ~pad_mask[i])
                loss = pg_loss + cfg.get("vf_coef", 0.1) * vf_loss
                (loss / ga).backward()
                counter += 1
                if counter % ga == 0:  # accelerate's counter, across minibatches (the ga_quirk case shows it)
                    optimizer.step()
                    optimizer.zero_grad()
                    steps += 1
                with torch.no_grad():
                    p = logits.softmax(-1)
                    entropy = torch.logsumexp(logits, -1) - (p * logits).sum(-1)
                    for k, v in (("approxkl", 0.5 * (diff**2).mean()),
                                 ("clipfrac", masked_mean((pg2 > pg1).float(), ~pad_mask[i])), ("pg", pg_loss),
                                 ("vf", vf_loss), ("vfclip", masked_mean((vf2 > vf1).float(), ~pad_mask_p1[i])),
                                 ("entropy", entropy.mean()), ("ratio", ratio.mean())):
                        stats[k][epoch, mb, g] = v
    assert steps == case["optimizer_steps"], (steps, case["optimizer_steps"])
    logged = {
        "objective/kl": kl.sum(1).mean(), "objective/entropy": (-logprobs).sum(1).mean(),
        "objective/non_score_reward": non_score_reward.sum(1).mean(),
        "objective/rlhf_reward": non_score_reward.sum(1).mean() + scores.mean(), "objective/scores": scores.mean(),
        "policy/approxkl_avg": stats["approxkl"].mean(), "policy/clipfrac_avg": stats["clipfrac"].mean(),
        "loss/policy_avg": stats["pg"].mean(), "loss/value_avg": stats["vf"].mean(),
        "val/clipfrac_avg": stats["vfclip"].mean(), "policy/entropy_avg": stats["entropy"].mean(),
        "val/ratio": stats["ratio"].mean(), "val/ratio_var": stats["ratio"].var(),
        "val/num_eos_tokens": (responses == EOS).sum(),
    }
    diffs["logged"] = max(abs(float(v) - case["logged"][k]) / max(1.0, abs(case["logged"][k]))
                          for k, v in logged.items())
    weights = 0.0
    for model, part, drop in ((policy, "policy", "lm_head.weight"), (value_model, "value", None)):
        theirs = load_file(os.path.join(root, f"{name}_{part}.safetensors"))
        mine = {k: v for k, v in model.state_dict().items() if k != drop and v.is_floating_point()}
        assert set(mine) == set(theirs), set(mine) ^ set(theirs)
        weights = max(weights, max((mine[k] - theirs[k]).abs().max().item() for k in theirs))
    diffs["weights"] = weights
    return diffs


def main(root: str) -> int:
    torch.set_num_threads(1)
    record = json.load(open(os.path.join(root, "trl_ppov2.json")))
    failed = False
    for name, case in record["cases"].items():
        diffs = replay(root, name, case)
        bad = [k for k, v in diffs.items() if v > TOL[k]]
        failed |= bool(bad)
        print(f"{name:11s} " + "  ".join(f"{k} {v:.2e}" for k, v in diffs.items()) + (f"  OVER: {bad}" if bad else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/trl_ppov2"))
