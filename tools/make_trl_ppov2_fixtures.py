"""Write the TRL 0.29.1 experimental ``PPOTrainer`` fixtures (``tests/data/trl_ppov2``): one PPO update of TRL's own
``train()`` on a fixed rollout, from recorded starting weights. Run once, in a venv with trl==0.29.1 (the dev venv)::

    OMP_NUM_THREADS=1 TRL_EXPERIMENTAL_SILENCE=1 HF_HUB_OFFLINE=1 python tools/make_trl_ppov2_fixtures.py

Models (built from configs, nothing from the hub): a tiny GPT-2 policy (2 layers, n_embd 16, ByT5's 259-token
vocabulary, pad 0, eos 1), a reference (the policy's weights plus N(0, 0.02) noise, so the KL terms are not zero;
case ``plain`` uses TRL's own copy instead), and ``GPT2ForSequenceClassification(num_labels=1)`` value and reward models
(different seeds; the reward's ``score`` row is scaled so scores are O(1)). The tokenizer is
``ByT5Tokenizer(extra_ids=0)`` with ``padding_side="left"`` (as TRL's example script).

The rollout is fixed, not sampled: the policy is ``FixedRolloutGPT2``, a GPT-2 whose ``generate`` returns each query's
recorded response and, as the generation scores, ``logits / generation_config.temperature`` of TRL's own ``forward``
over the whole sequence at the starting weights (what a KV-cached sampler computes, up to float rounding; a
reimplementation that takes old log-probs from a no-grad forward gets the same numbers). Everything after that is
TRL's ``train()`` as released: one update (``total_episodes`` = one batch), TRL's ``get_reward`` for values and scores,
its rewards, GAE, whitening, minibatch loop, AdamW (``adamw_torch_fused``, weight decay 0) and logged metrics.

Recorded per case in ``trl_ppov2.json``: the config, the batch in TRL's order (``queries`` left-padded, the full
``query_responses``), the ``np.random.permutation`` draws (numpy seeded with 0 first), TRL's rollout tensors read from
``train()``'s frame when it draws the first permutation (log-probs, values, scores, rewards, advantages, returns,
masks), the per-minibatch statistic tensors, the logged metrics (``eps``, a speed, left out), the optimizer steps taken,
and the weights after the update: ``<case>_policy.safetensors`` (``lm_head.weight`` left out: tied to ``wte``) and
``<case>_value.safetensors``. Starting weights: ``start/{policy,ref,value,reward}`` (``save_pretrained``).

Cases:

- ``plain``: equal-length queries, responses of full length, no stop token, ``ref_model=None`` (TRL's deep copy),
  k1, two minibatches, two PPO epochs;
- ``eos``: left-padded queries, ``stop_token="eos"``: responses end with EOS at various places (then pad, as
  ``generate`` writes it) or run to full length; ``missing_eos_penalty``; explicit reference;
- ``k3_whiten``: as ``eos`` with 16 rows, ``kl_estimator="k3"``, ``whiten_rewards=True``, a small ``cliprange_value``,
  ``vf_coef``, ``gamma`` and ``lam`` off their defaults;
- ``accumulate``: ``gradient_accumulation_steps=2`` with one minibatch (one optimizer step per PPO epoch, the mean of
  the two micro-batch losses); the dataset has two batches so this one is not the loader's last (see ``ga_quirk``);
- ``ga_quirk``: TRL as released with ``gradient_accumulation_steps=2`` and ``num_mini_batches=2``: accelerate counts
  micro-batches across minibatches, so the two minibatches are accumulated into ONE step per epoch, and the statistic
  tensors (shape epochs x minibatches x accumulation steps) keep zeros in the unused slots, which the logged averages
  include. Not behaviour to copy: it documents the bug.

The whole folder stays well under 1 MB; the script is deterministic (one thread, fixed seeds).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np
import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import ByT5Tokenizer, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel
from transformers.generation import GenerateDecoderOnlyOutput
from trl.experimental.ppo import PPOConfig, PPOTrainer
from trl.experimental.ppo import ppo_trainer as trl_ppo

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

MODEL = dict(n_layer=2, n_embd=16, n_head=2, n_positions=32, vocab_size=259, bos_token_id=1, eos_token_id=1,
             pad_token_id=0)
PAD, EOS, FIRST_BYTE = 0, 1, 3
COMMON = dict(learning_rate=1e-3, num_ppo_epochs=2, temperature=0.7, seed=0, bf16=False, use_cpu=True,
              report_to="none", save_strategy="no", num_sample_generations=0, disable_tqdm=True,
              gradient_checkpointing=False)
# Where each row's EOS goes (None: no EOS, the response runs to full length).
EOS_AT = [None, 0, 2, 4, 5, 6, None, 3]
CASES = {
    "plain": dict(config=dict(per_device_train_batch_size=8, num_mini_batches=2, response_length=6),
                  query_lens=[5] * 8, eos_at=[None] * 8, ref=False),
    "eos": dict(config=dict(per_device_train_batch_size=8, num_mini_batches=2, response_length=7, stop_token="eos",
                            missing_eos_penalty=1.0),
                query_lens=[3, 7, 5, 4, 6, 2, 7, 5], eos_at=EOS_AT, ref=True),
    "k3_whiten": dict(config=dict(per_device_train_batch_size=16, num_mini_batches=2, response_length=7,
                                  stop_token="eos", missing_eos_penalty=0.5, kl_estimator="k3", kl_coef=0.2,
                                  whiten_rewards=True, cliprange=0.05, cliprange_value=0.05, vf_coef=0.5, gamma=0.99,
                                  lam=0.9),
                      query_lens=[3, 7, 5, 4, 6, 2, 7, 5] * 2, eos_at=EOS_AT * 2, ref=True),
    "accumulate": dict(config=dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, num_mini_batches=1,
                                   response_length=7, stop_token="eos"),
                       query_lens=[3, 7, 5, 4, 6, 2, 7, 5] * 2, eos_at=EOS_AT * 2, ref=True),
    "ga_quirk": dict(config=dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, num_mini_batches=2,
                                 response_length=7, stop_token="eos"),
                     query_lens=[3, 7, 5, 4, 6, 2, 7, 5] * 2, eos_at=EOS_AT * 2, ref=True),
}
# train()'s locals recorded at the first np.random.permutation (after rewards, GAE and whitening).
ROLLOUT = ("query_responses", "responses", "postprocessed_responses", "logprobs", "ref_logprobs", "values", "scores",
           "sequence_lengths", "contain_eos_token", "padding_mask", "padding_mask_p1", "kl", "non_score_reward",
           "rewards", "actual_end", "advantages", "returns")
STATS = ("approxkl_stats", "pg_clipfrac_stats", "pg_loss_stats", "vf_loss_stats", "vf_clipfrac_stats", "entropy_stats",
         "ratio_stats")


class FixedRolloutGPT2(GPT2LMHeadModel):
    """A GPT-2 whose ``generate`` returns the fixture's response for each query (keyed by its unpadded ids), with
    ``logits / temperature`` of TRL's ``forward`` over the whole sequence as the per-step scores."""

    fixed: dict[tuple[int, ...], list[int]] = {}
    seen: list[list[int]] = []

    def generate(self, input_ids, attention_mask, generation_config, **kwargs):
        width = len(next(iter(self.fixed.values())))
        assert generation_config.max_new_tokens == width and generation_config.do_sample
        rows = [self.fixed[tuple(q[m].tolist())] for q, m in zip(input_ids, attention_mask.bool())]
        sequences = torch.cat([input_ids, torch.tensor(rows, dtype=input_ids.dtype)], 1)
        self.seen.extend(input_ids.tolist())
        context = input_ids.shape[1]
        with torch.no_grad():
            logits = trl_ppo.forward(self, sequences, PAD).logits[:, context - 1 : -1] / generation_config.temperature
        return GenerateDecoderOnlyOutput(sequences=sequences, scores=tuple(logits.unbind(1)))


def float_state(model: torch.nn.Module, drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
            if v.is_floating_point() and k not in drop}


def save_start(out: str) -> None:
    """The starting weights every case loads: policy, reference, value model, reward model."""
    torch.manual_seed(0)
    policy = GPT2LMHeadModel(GPT2Config(**MODEL))
    ref = GPT2LMHeadModel(GPT2Config(**MODEL))
    ref.load_state_dict(policy.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    torch.manual_seed(1)
    value = GPT2ForSequenceClassification(GPT2Config(**MODEL, num_labels=1))
    torch.manual_seed(2)
    reward = GPT2ForSequenceClassification(GPT2Config(**MODEL, num_labels=1))
    with torch.no_grad():
        reward.score.weight.normal_(0.0, 0.5)
    for name, model in (("policy", policy), ("ref", ref), ("value", value), ("reward", reward)):
        path = os.path.join(out, "start", name)
        model.save_pretrained(path)
        generation_config = os.path.join(path, "generation_config.json")
        if os.path.exists(generation_config):
            os.remove(generation_config)


def make_rollout(name: str, case: dict) -> tuple[list[list[int]], dict[tuple[int, ...], list[int]]]:
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    width = case["config"]["response_length"]
    queries, fixed = [], {}
    for n, eos_at in zip(case["query_lens"], case["eos_at"]):
        query = torch.randint(FIRST_BYTE, 259, (n,), generator=generator).tolist()
        response = torch.randint(FIRST_BYTE, 259, (width,), generator=generator).tolist()
        if eos_at is not None:  # what generate writes once a row stopped: EOS, then the pad id
            response = response[:eos_at] + [EOS] + [PAD] * (width - eos_at - 1)
        queries.append(query)
        fixed[tuple(query)] = response
    return queries, fixed


def tensor_json(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    return value


def run_case(name: str, case: dict, out: str) -> dict:
    start = os.path.join(out, "start")
    queries, fixed = make_rollout(name, case)
    policy = FixedRolloutGPT2.from_pretrained(os.path.join(start, "policy"))
    FixedRolloutGPT2.fixed, FixedRolloutGPT2.seen = fixed, []
    ref = GPT2LMHeadModel.from_pretrained(os.path.join(start, "ref")) if case["ref"] else None
    value = GPT2ForSequenceClassification.from_pretrained(os.path.join(start, "value"))
    reward = GPT2ForSequenceClassification.from_pretrained(os.path.join(start, "reward"))
    tokenizer = ByT5Tokenizer(extra_ids=0)
    tokenizer.padding_side = "left"
    settings = {**COMMON, **case["config"]}
    batch = settings["per_device_train_batch_size"] * settings.get("gradient_accumulation_steps", 1)
    with tempfile.TemporaryDirectory() as tmp:
        args = PPOConfig(output_dir=tmp, total_episodes=batch, **settings)
        trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                             train_dataset=Dataset.from_dict({"input_ids": queries}), value_model=value)

        permutations, rollout, stats = [], {}, {}
        draw = np.random.permutation

        def recording(n):
            if not permutations:  # train()'s frame: the rollout is complete, the minibatch loop starts
                local = sys._getframe(1).f_locals
                rollout.update({k: tensor_json(local[k]) for k in ROLLOUT})
                rollout["context_length"] = int(local["context_length"])
                stats.update({k: local[k] for k in STATS})  # filled in place by the loop
            order = draw(n)
            permutations.append(order.tolist())
            return order

        np.random.seed(0)
        np.random.permutation = recording
        try:
            trainer.train()
        finally:
            np.random.permutation = draw
        optimizer = trainer.optimizer.optimizer
        steps = {int(s["step"]) for s in optimizer.state.values()}
        assert len(steps) == 1, steps
        logged = {k: v for k, v in trainer.state.log_history[0].items() if k != "eps"}
        policy_state = float_state(trainer.model.policy, drop=("lm_head.weight",))
        save_file(policy_state, os.path.join(out, f"{name}_policy.safetensors"))
        save_file(float_state(trainer.model.value_model), os.path.join(out, f"{name}_value.safetensors"))
    derived = {k: getattr(args, k) for k in ("batch_size", "local_batch_size", "mini_batch_size",
                                             "local_mini_batch_size", "micro_batch_size", "num_total_batches",
                                             "world_size")}
    return {
        "config": settings,
        "derived": derived,
        "ref": "start/ref" if case["ref"] else "copy of start/policy (ref_model=None)",
        "dataset_queries": queries,
        "responses_by_query": [fixed[tuple(q)] for q in queries],
        "batch_queries": FixedRolloutGPT2.seen,
        "permutations": permutations,
        "rollout": rollout,
        "minibatch_stats": {k: tensor_json(v) for k, v in stats.items()},
        "optimizer_steps": steps.pop(),
        "logged": logged,
    }


def main(out: str) -> None:
    import accelerate
    import transformers
    import trl

    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    save_start(out)
    record = {
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                     "accelerate": accelerate.__version__},
        "model": MODEL,
        "tokenizer": "ByT5Tokenizer(extra_ids=0), padding_side='left' (pad 0, eos 1)",
        "common": COMMON,
        "cases": {name: run_case(name, case, out) for name, case in CASES.items()},
    }
    with open(os.path.join(out, "trl_ppov2.json"), "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"wrote {out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/trl_ppov2")
