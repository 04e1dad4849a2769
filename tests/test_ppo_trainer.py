"""``lit_vhead.PPOTrainer``: TRL 0.11.4's classic loop API, exact against TRL, on one or two processes, resumable.

The exactness tests replay ``tests/data/trl_step`` (written once by ``tools/make_trl_fixtures.py`` in a TRL 0.11.4
venv): the same starting weights (TRL's ``save_pretrained``), the same ``(queries, responses, scores)``, two
``step`` calls; weights and statistics must match TRL's to float rounding.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import ROOT, TINY_CONFIGS, tiny_hf_model
from safetensors.torch import load_file

from lit_vhead import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead, PPOConfig, PPOTrainer
from lit_vhead.core import LengthSampler, respond_to_batch, set_seed

FIXTURES = os.path.join(ROOT, "tests", "data", "trl_step")
RECORD = json.load(open(os.path.join(FIXTURES, "trl_step.json")))
WEIGHT_TOL = 1e-5


def byt5() -> transformers.PreTrainedTokenizerBase:
    return transformers.ByT5Tokenizer(extra_ids=0)


def replay(case: str, **trainer_kwargs) -> tuple[PPOTrainer, list[dict], list[dict[str, torch.Tensor]], list]:
    """Two ``step`` calls of lit_vhead's PPOTrainer on a recorded case, from TRL's saved starting weights."""
    record = RECORD["cases"][case]
    model = AutoModelForCausalLMWithValueHead.from_pretrained(os.path.join(FIXTURES, "start"))
    trainer = PPOTrainer(PPOConfig(**record["config"]), model, None, byt5(), **trainer_kwargs)
    queries = [torch.tensor(q) for q in record["queries"]]
    responses = [torch.tensor(r) for r in record["responses"]]
    scores = [torch.tensor(s) for s in record["scores"]]
    permutations, draw = [], np.random.permutation

    def recording(n):
        order = draw(n)
        permutations.append(order.tolist())
        return order

    stats, weights = [], []
    np.random.permutation = recording
    try:
        for _ in range(2):
            stats.append(trainer.step(queries, responses, scores))
            weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    finally:
        np.random.permutation = draw
    return trainer, stats, weights, permutations


def max_weight_diff(ours: dict[str, torch.Tensor], path: str) -> float:
    theirs = load_file(path)
    assert set(theirs) <= set(ours), sorted(set(theirs) - set(ours))
    return max((ours[k] - theirs[k]).abs().max().item() for k in theirs)


def max_stat_diff(ours: dict, theirs: dict[str, float]) -> tuple[float, str]:
    """Largest relative difference over TRL's scalar statistics (all of them must be there, as scalars)."""
    worst, name = 0.0, ""
    for key, value in theirs.items():
        assert key in ours, f"TRL's statistic {key!r} is missing"
        assert isinstance(ours[key], float), (key, type(ours[key]))
        diff = abs(ours[key] - value) / max(1.0, abs(value))
        if diff > worst:
            worst, name = diff, key
    return worst, name


@pytest.mark.parametrize("case", ["equal", "right"])
def test_step_gives_trl_0_11_4_weights_and_statistics(case):
    record = RECORD["cases"][case]
    trainer, stats, weights, permutations = replay(case)
    assert permutations == record["permutations"]  # the same minibatches, in the same order
    for k in (1, 2):
        step = record["steps"][k - 1]
        assert max_weight_diff(weights[k - 1], os.path.join(FIXTURES, f"{case}_step{k}.safetensors")) <= WEIGHT_TOL
        worst, name = max_stat_diff(stats[k - 1], step["stats"])
        assert worst <= 1e-5, (name, stats[k - 1][name], step["stats"][name])
        for key in step["array_shapes"]:  # TRL's histograms are there as arrays
            assert isinstance(stats[k - 1][key], np.ndarray) and stats[k - 1][key].ndim >= 1, key
    # the second step ran with a non-zero KL and the KL coefficient TRL's controller adapted
    assert record["steps"][1]["stats"]["objective/kl"] != 0
    assert stats[1]["objective/kl_coef"] == pytest.approx(record["steps"][0]["kl_coef_after"], rel=1e-6)
    assert trainer.kl_ctl.value == pytest.approx(record["steps"][1]["kl_coef_after"], rel=1e-6)
    assert {k for k in stats[0] if k.startswith("time/ppo/")} >= {
        "time/ppo/forward_pass", "time/ppo/compute_rewards", "time/ppo/compute_advantages",
        "time/ppo/optimize_step", "time/ppo/calc_stats", "time/ppo/total",
    }


def test_left_padding_matches_trl_with_position_ids_not_trl_as_released():
    """trl#469: TRL 0.11.4 passes no position_ids, so a left-padded row is run at shifted positions. lit_vhead passes
    position_ids from the mask: it equals TRL patched to do the same, and differs from TRL as released."""
    trainer, stats, weights, permutations = replay("left")
    patched, released = RECORD["cases"]["left_patched"], RECORD["cases"]["left"]
    assert permutations == patched["permutations"]
    for k in (1, 2):
        path = os.path.join(FIXTURES, f"left_patched_step{k}.safetensors")
        assert max_weight_diff(weights[k - 1], path) <= WEIGHT_TOL
        worst, name = max_stat_diff(stats[k - 1], patched["steps"][k - 1]["stats"])
        assert worst <= 1e-5, name
        # TRL as released (trl#469) is measurably elsewhere: weights and statistics
        assert max_weight_diff(weights[k - 1], os.path.join(FIXTURES, f"left_step{k}.safetensors")) > 100 * WEIGHT_TOL
        assert max_stat_diff(stats[k - 1], released["steps"][k - 1]["stats"])[0] > 1e-2


# ---------------------------------------------------------------------------------------------------------------------
# Tiny models and loops


def tiny_policy(seed: int = 0, peft_config=None) -> AutoModelForCausalLMWithValueHead:
    """A tiny GPT-2 with a value head; ByT5 ids (pad 0, eos 1)."""
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(**TINY_CONFIGS["gpt2"], eos_token_id=1, bos_token_id=1, pad_token_id=0)
    base = transformers.AutoModelForCausalLM.from_config(config)
    return AutoModelForCausalLMWithValueHead.from_pretrained(base, peft_config=peft_config)


def queries_of(texts: list[str]) -> list[torch.Tensor]:
    tokenizer = byt5()
    return [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


SAMPLING = {"do_sample": True, "top_k": 0, "top_p": 1.0, "pad_token_id": 0, "eos_token_id": 1}
PROMPTS = ["2+2=", "the cat", "Hello there, ", "x"]


def quiet_trainer(*args, **kwargs) -> PPOTrainer:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No dataset is provided")
        return PPOTrainer(*args, **kwargs)


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.fixture(scope="module")
def sentiment_standins(tmp_path_factory):
    """Local stand-ins for the notebook's hub names: a tiny GPT-2 policy with a saved (ByT5) tokenizer, a tiny
    DistilBERT sentiment classifier (NEGATIVE/POSITIVE) for ``pipeline("sentiment-analysis")``, and an IMDB-like
    JSON-lines dataset with ``text``/``label``."""
    root = tmp_path_factory.mktemp("sentiment")
    tokenizer = byt5()
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**TINY_CONFIGS["gpt2"], eos_token_id=1, bos_token_id=1)
    ).save_pretrained(root / "gpt2-imdb")
    tokenizer.save_pretrained(root / "gpt2-imdb")
    classifier = transformers.DistilBertConfig(
        vocab_size=259, dim=32, hidden_dim=64, n_layers=2, n_heads=4, pad_token_id=0,
        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )
    transformers.DistilBertForSequenceClassification(classifier).save_pretrained(root / "distilbert-imdb")
    tokenizer.save_pretrained(root / "distilbert-imdb")
    words = "good bad great awful film movie plot actor boring brilliant scene story the a was and".split()
    generator = np.random.default_rng(0)
    (root / "imdb").mkdir()
    with open(root / "imdb" / "train.jsonl", "w") as f:
        for i in range(300):  # 270 reviews pass the notebook's 200-character filter: two PPO steps of 128
            text = " ".join(generator.choice(words, 60))
            f.write(json.dumps({"text": text if i % 10 else text[:100], "label": i % 2}) + "\n")
    return {"lvwerra/gpt2-imdb": root / "gpt2-imdb", "lvwerra/distilbert-imdb": root / "distilbert-imdb",
            "stanfordnlp/imdb": root / "imdb"}


def readme_loop() -> str:
    blocks = re.findall(r"```python\n(.*?)```", open(os.path.join(ROOT, "README.md")).read(), flags=re.S)
    return next(b for b in blocks if "ppo_trainer.step(" in b)


def wandb_run_file(directory) -> bytes:
    runs = sorted((directory / "wandb").glob("offline-run-*/run-*.wandb"))
    assert runs, "no offline wandb run was written"
    return runs[-1].read_bytes()


def test_readme_gpt2_sentiment_loop_runs_as_written(sentiment_standins, tmp_path, monkeypatch):
    """The README's TRL gpt2-sentiment loop, only its imports changed, with the hub names swapped for local dirs."""
    code = readme_loop()
    assert "# from trl import PPOTrainer, PPOConfig, AutoModelForCausalLMWithValueHead" in code
    assert "from lit_vhead import PPOTrainer, PPOConfig, AutoModelForCausalLMWithValueHead" in code
    for name, path in sentiment_standins.items():
        assert f'"{name}"' in code
        code = code.replace(f'"{name}"', repr(str(path)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    start = {k: v.clone() for k, v in load_file(sentiment_standins["lvwerra/gpt2-imdb"] / "model.safetensors").items()}
    scope: dict = {"__name__": "__main__"}
    import wandb

    try:
        exec(compile(code, "README.md", "exec"), scope)
    finally:
        wandb.finish()
    assert scope["epoch"] == 1  # two PPO steps of 128 (270 reviews, drop_last)
    stats = scope["stats"]
    for key in ("objective/kl", "objective/kl_coef", "ppo/loss/total", "ppo/policy/approxkl", "ppo/mean_scores",
                "ppo/val/var_explained", "time/ppo/total", "ppo/learning_rate", "tokens/responses_len_mean"):
        assert isinstance(stats[key], np.ndarray | float) and np.isfinite(stats[key]), key
    assert stats["objective/kl"] != 0 and stats["objective/kl_coef"] != 0.2  # second step: KL term and adapted β
    trained = scope["model"].pretrained_model.state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start if k in trained)  # the policy learned
    reference = scope["ref_model"].pretrained_model.state_dict()
    assert all(torch.equal(reference[k], start[k]) for k in start if k in reference)  # the reference did not
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the saved policy has its value head
        saved = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "gpt2-imdb-pos-v2")
    assert torch.equal(saved.v_head.summary.weight, scope["model"].v_head.summary.weight)
    log = wandb_run_file(tmp_path)  # the offline wandb run holds TRL's statistics, histograms and game logs
    for key in (b"env/reward_mean", b"objective/kl", b"ppo/policy/ratio", b"trl_ppo_trainer_config", b"game_log"):
        assert key in log, key
    tables = list((tmp_path / "wandb").glob("offline-run-*/files/media/table/game_log_*.table.json"))
    assert len(tables) == 2
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["query", "response", "reward"] and len(table["data"]) == 128


def test_generate_follows_trl_api():
    trainer = quiet_trainer(PPOConfig(batch_size=4, mini_batch_size=2), tiny_policy(), None, byt5())
    queries = queries_of(PROMPTS)
    one = trainer.generate(queries[0], max_new_tokens=5, **SAMPLING)
    assert one.shape[0] == 1 and torch.equal(one[0, : len(queries[0])], queries[0])  # [1, L] with the prompt
    assert trainer.generate(queries[0], return_prompt=False, max_new_tokens=5, **SAMPLING).shape[1] <= 5
    with_prompt = trainer.generate(queries, batch_size=3, max_new_tokens=6, **SAMPLING)
    assert [torch.equal(r[: len(q)], q) for q, r in zip(queries, with_prompt)] == [True] * 4  # padding removed
    responses, ref_responses = trainer.generate(
        queries, return_prompt=False, generate_ref_response=True, length_sampler=LengthSampler(3, 5), **SAMPLING
    )
    for response in responses + ref_responses:
        eos = (response == 1).nonzero()
        assert 1 <= len(response) <= 4 and (len(eos) == 0 or eos[0, 0] == len(response) - 1)  # cut after 1st EOS
    with pytest.raises(ValueError, match="shape"):
        trainer.generate(torch.stack(queries[:1]), max_new_tokens=2)
    assert trainer.model.training  # the mode is restored after sampling (dropout was off while sampling)


def tool_environment(tokenizer, response_ids: list[torch.Tensor]) -> tuple[list, list, list]:
    """A calculator tool: the model's text is parsed for digits, the tool's answer is appended to the response as
    observation tokens (mask 0: not the model's to learn), and the reward is computed from the parsed call."""
    responses, masks, rewards = [], [], []
    for ids in response_ids:
        text = tokenizer.decode(ids, skip_special_tokens=True)
        digits = [int(d) for d in re.findall(r"\d", text)]
        observation = torch.tensor(tokenizer(f"<{sum(digits)}>", add_special_tokens=False)["input_ids"])
        responses.append(torch.cat([ids, observation]))
        masks.append(torch.cat([torch.ones_like(ids), torch.zeros_like(observation)]))
        rewards.append(torch.tensor(float(len(digits)) - 0.1 * len(ids)))
    return responses, masks, rewards


def test_tool_environment_loop_trains_only_on_the_model_tokens():
    tokenizer = byt5()
    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3)
    trainer = quiet_trainer(config, tiny_policy(), None, tokenizer)
    before = weights_of(trainer.model)
    queries = queries_of(PROMPTS)
    for _ in range(3):
        generated = trainer.generate(queries, return_prompt=False, max_new_tokens=8, **SAMPLING)
        responses, masks, rewards = tool_environment(tokenizer, generated)
        stats = trainer.step(queries, responses, rewards, response_masks=masks)
        trainer.log_stats(stats, {"query": PROMPTS, "response": tokenizer.batch_decode(responses)}, rewards)
        # TRL's meaning: the whole response as passed to step, masked observation tokens included
        assert stats["tokens/responses_len_mean"] == pytest.approx(np.mean([len(r) for r in responses]))
    assert changed(before, weights_of(trainer.model)) and math.isfinite(stats["ppo/loss/total"])

    # Masked observation tokens after the model's tokens change nothing: same update as without them.
    results = []
    for with_observation in (True, False):
        trainer = quiet_trainer(config, tiny_policy(), None, tokenizer)
        chosen = responses if with_observation else generated
        stats = trainer.step(queries, chosen, rewards, response_masks=masks if with_observation else None)
        results.append((stats, weights_of(trainer.model)))
    (masked, w_masked), (plain, w_plain) = results
    assert max((w_masked[k] - w_plain[k]).abs().max().item() for k in w_plain) <= WEIGHT_TOL
    for key, value in plain.items():
        if isinstance(value, float) and not key.startswith(("time/", "tokens/responses_len")):
            assert masked[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_seq2seq_loop_trains_the_first_generated_token():
    """TRL's seq2seq mask dropped the first generated token; here a one-token response is trained."""
    policy = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(tiny_hf_model("t5"))
    trainer = quiet_trainer(PPOConfig(batch_size=4, mini_batch_size=2, learning_rate=1e-3), policy, None, byt5())
    assert trainer.is_encoder_decoder and trainer.ref_model is not None
    queries = queries_of(PROMPTS)
    before = weights_of(policy)
    responses = trainer.generate(queries, return_prompt=False, max_new_tokens=6, **SAMPLING)
    assert all(int(r[0]) == policy.config.decoder_start_token_id for r in responses)
    stats = trainer.step(queries, responses, [torch.tensor(float(len(r))) for r in responses])
    assert math.isfinite(stats["ppo/loss/total"]) and changed(before, weights_of(policy))
    one_token = trainer.generate(queries, return_prompt=False, max_new_tokens=1, **SAMPLING)
    assert all(len(r) == 2 for r in one_token)  # start token + one generated token
    stats = trainer.step(queries, one_token, [torch.tensor(1.0)] * 4)
    assert stats["tokens/responses_len_mean"] == 2.0  # TRL counts the response as passed: start token + 1
    assert math.isfinite(stats["ppo/loss/value"])
    with pytest.raises(ValueError, match="decoder start token"):
        trainer.step(queries, [r[1:] for r in responses], [torch.tensor(1.0)] * 4)


def test_peft_policy_with_no_ref_model_uses_its_disabled_adapters(tmp_path):
    from peft import LoraConfig

    policy = tiny_policy(peft_config=LoraConfig(r=4, target_modules=["c_attn"], task_type="CAUSAL_LM"))
    trainer = quiet_trainer(PPOConfig(batch_size=4, mini_batch_size=2, learning_rate=1e-2), policy, None, byt5())
    assert trainer.ref_model is None and trainer.is_peft_model
    before = weights_of(policy)
    queries = queries_of(PROMPTS)
    responses = trainer.generate(queries, return_prompt=False, max_new_tokens=6, **SAMPLING)
    scores = [torch.tensor(float(len(r))) for r in responses]
    first = trainer.step(queries, responses, scores)
    second = trainer.step(queries, responses, scores)
    assert first["objective/kl"] == 0.0  # LoRA starts as the identity: policy == adapters-disabled reference
    assert second["objective/kl"] != 0.0  # after an update the adapters make the difference
    moved = changed(before, weights_of(policy))
    assert moved and all("lora_" in k or k.startswith("v_head.") for k in moved)  # the base stays frozen
    _, ref_responses = trainer.generate(queries, generate_ref_response=True, max_new_tokens=3, **SAMPLING)
    assert len(ref_responses) == 4
    trainer.save_pretrained(tmp_path / "policy")  # trl#2707: the value head is saved with the adapters
    assert (tmp_path / "policy" / "adapter_model.safetensors").is_file()
    heads = load_file(tmp_path / "policy" / "model.safetensors")
    assert torch.equal(heads["v_head.summary.weight"], policy.v_head.summary.weight.detach())
    assert (tmp_path / "policy" / "tokenizer_config.json").is_file()


def test_negative_kl_warning_names_the_configured_estimator():
    """trl#1161: TRL's warning did not say which estimator went negative."""
    policy, reference = tiny_policy(0), tiny_policy(1)
    with torch.no_grad():
        reference.pretrained_model.lm_head.weight.mul_(50.0)  # a very peaked reference
    trainer = quiet_trainer(PPOConfig(batch_size=4, mini_batch_size=2), policy, reference, byt5())
    queries = queries_of(PROMPTS)
    greedy = {**SAMPLING, "do_sample": False}
    _, ref_responses = trainer.generate(queries, return_prompt=False, generate_ref_response=True, max_new_tokens=8,
                                        min_new_tokens=8, **greedy)
    with pytest.warns(UserWarning, match=r"The KL \(kl estimator\) is negative"):
        trainer.step(queries, ref_responses, [torch.tensor(0.0)] * 4)


def test_max_grad_norm_clips_every_update():
    """TRL clipped through a one-shot parameter filter: only its first update was clipped."""
    config = PPOConfig(batch_size=4, mini_batch_size=1, ppo_epochs=2, max_grad_norm=1e-3, learning_rate=1e-3)
    trainer = quiet_trainer(config, tiny_policy(), None, byt5())
    norms, clip = [], trainer.fabric.clip_gradients

    def recording(*args, **kwargs):
        out = clip(*args, **kwargs)
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return out

    trainer.fabric.clip_gradients = recording
    queries = queries_of(PROMPTS)
    trainer.step(queries, queries_of(["abc", "de", "fgh", "ij"]), [torch.tensor(s) for s in (3.0, -2.0, 1.0, 5.0)])
    assert len(norms) == 8 and max(norms) <= 1e-3 * (1 + 1e-4)


def test_a_step_whose_loss_turns_nan_midway_leaves_the_trainer_as_it_was():
    """After its first optimizer step the weights overflow (a huge learning rate): the step is undone whole."""
    trainer = quiet_trainer(PPOConfig(batch_size=4, mini_batch_size=1, ppo_epochs=2, learning_rate=1e-3,
                                      use_score_scaling=True), tiny_policy(), None, byt5())
    queries, responses = queries_of(PROMPTS), queries_of(["abc", "de", "fgh", "ij"])
    scores = [torch.tensor(s) for s in (3.0, -2.0, 1.0, 5.0)]
    trainer.step(queries, responses, scores)
    weights, optimizer = weights_of(trainer.model), trainer.optimizer.state_dict()
    moments, ppo_state = {k: v.clone() for k, v in optimizer["state"][0].items()}, trainer.core.state_dict()
    trainer.optimizer.param_groups[0]["lr"] = 1e35
    with pytest.raises(FloatingPointError, match=r"minibatch 2 of 4\); the 1 optimizer step\(s\) it had taken"):
        trainer.step(queries, responses, scores)
    assert all(torch.equal(weights[k], v) for k, v in weights_of(trainer.model).items())
    assert all(torch.equal(moments[k], v) for k, v in trainer.optimizer.state_dict()["state"][0].items())
    assert trainer.core.state_dict() == ppo_state and trainer.steps_done == 1


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda t, q: t.step(q[:3], q[:3], [torch.tensor(1.0)] * 3), "PPOConfig.batch_size=4"),
        (lambda t, q: t.step(q, q, [torch.ones(2)] * 4), r"scores\[0\] must be one number"),
        (lambda t, q: t.step(q, [torch.tensor([], dtype=torch.long)] * 4, [1.0] * 4), r"responses\[0\] must be"),
        (lambda t, q: t.step(q, q, [1.0] * 4, response_masks=[torch.ones(1)] * 4), r"response_masks\[0\] has 1"),
        (lambda t, q: t.step(torch.stack(q[:1]), q, [1.0] * 4), "queries must be a list"),
        # issue 20, item 15: float ids were cut (65.7 -> 65); out-of-vocabulary and negative ids gave an IndexError
        (lambda t, q: t.step([q[0] + 0.7, *q[1:]], q, [1.0] * 4), r"queries\[0\] holds torch.float32 values \(\[100.7"),
        (lambda t, q: t.step(q, [q[0], torch.tensor([5, 259]), *q[2:]], [1.0] * 4),
         r"responses\[1\] holds token id 259, outside the policy's vocabulary \(0..258\)"),
        (lambda t, q: t.step([*q[:2], torch.tensor([-3, 4]), q[3]], q, [1.0] * 4), r"queries\[2\] holds token id -3"),
        # issue 20, item 5: a NaN score would enter the running score moments for good
        (lambda t, q: t.step(q, q, [1.0, float("nan"), 1.0, 1.0]), r"scores\[1\] is nan"),
    ],
)
def test_bad_step_input_fails_before_any_work(call, error):
    config = PPOConfig(batch_size=4, mini_batch_size=2, use_score_scaling=True, use_score_norm=True)
    trainer = quiet_trainer(config, tiny_policy(), None, byt5())
    before, moments = weights_of(trainer.model), trainer.running.state_dict()
    with pytest.raises(ValueError, match=error):
        call(trainer, queries_of(["abc", "de", "fgh", "ij"]))
    assert not changed(before, weights_of(trainer.model))
    assert trainer.running.state_dict() == moments and trainer.steps_done == 0  # nothing was changed
    queries = queries_of(["abc", "de", "fgh", "ij"])
    stats = trainer.step(queries, queries, [1.0, 2.0, 3.0, 4.0])  # the trainer is still fine
    assert math.isfinite(stats["ppo/loss/total"]) and trainer.running.count == 4


def test_bad_construction_is_named():
    with pytest.raises(TypeError, match="lit_vhead value-head model"):
        PPOTrainer(PPOConfig(), tiny_hf_model("gpt2"), None, byt5())
    with pytest.raises(ValueError, match=r"\['kwargs_handlers'\].*Supported"):
        PPOTrainer(PPOConfig(accelerator_kwargs={"kwargs_handlers": []}), tiny_policy(), None, byt5())
    with pytest.raises(ValueError, match="mixed_precision.*'fp8'"):
        PPOTrainer(PPOConfig(accelerator_kwargs={"mixed_precision": "fp8"}), tiny_policy(), None, byt5())
    model = tiny_policy()
    with pytest.raises(ValueError, match="ref_model is the policy itself"):
        PPOTrainer(PPOConfig(), model, model, byt5())
    with pytest.raises(TypeError, match="ref_model must be a lit_vhead value-head model"):
        PPOTrainer(PPOConfig(), model, tiny_hf_model("gpt2"), byt5())


def test_mixed_precision_comes_from_accelerator_kwargs():
    config = PPOConfig(batch_size=4, mini_batch_size=2, accelerator_kwargs={"mixed_precision": "bf16"})
    trainer = quiet_trainer(config, tiny_policy(), None, byt5())
    assert type(trainer.fabric.strategy.precision).__name__ == "MixedPrecision"
    seen = []
    hook = trainer.model.pretrained_model.transformer.h[0].mlp.c_fc.register_forward_hook(
        lambda module, inputs, output: seen.append(output.dtype)
    )
    queries = queries_of(PROMPTS)
    responses = trainer.generate(queries, return_prompt=False, max_new_tokens=4, **SAMPLING)
    stats = trainer.step(queries, responses, [torch.tensor(float(len(r))) for r in responses])
    hook.remove()
    assert torch.bfloat16 in seen and math.isfinite(stats["ppo/loss/total"])  # autocast in sampling and PPO passes
    assert trainer.model.v_head.summary.weight.dtype == torch.float32
    assert trainer.accelerator.state.deepspeed_plugin is None  # TRL's examples/scripts/ppo.py reads it


def test_accelerator_shim_answers_what_classic_scripts_ask():
    trainer = quiet_trainer(PPOConfig(batch_size=4, mini_batch_size=2, accelerator_kwargs={"cpu": True}),
                            tiny_policy(), None, byt5())
    accelerator = trainer.accelerator
    assert accelerator.device == trainer.current_device == torch.device("cpu")
    assert accelerator.is_main_process and accelerator.num_processes == 1 and not trainer.is_distributed
    assert accelerator.process_index == 0  # TRL's examples/research_projects/tools/triviaqa.py seeds by it
    assert accelerator.unwrap_model(trainer._wrapped) is trainer.model
    assert accelerator.gather(torch.tensor(3.0)).tolist() == [3.0]
    accelerator.wait_for_everyone()
    accelerator.print("printed once")
    loader = accelerator.prepare(torch.utils.data.DataLoader(list(range(8)), batch_size=4))
    assert [b.tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert trainer.config.world_size == 1 and trainer.config.global_batch_size == 4


def test_the_accelerator_shim_has_what_the_readme_lists():
    from lit_vhead.accelerator import Accelerator

    readme = open(os.path.join(ROOT, "README.md")).read()
    listed = re.search(r"`ppo_trainer.accelerator` answers (.*?)\(None\)", readme, re.S).group(1)
    names = {name.split("(")[0].split(".")[0] for name in re.findall(r"`([\w.()]+)`", listed)}
    public = {name for name in dir(Accelerator) if not name.startswith("_")}
    assert public == names


def test_trl_core_helpers():
    set_seed(3)
    first = [LengthSampler(4, 7)() for _ in range(50)]
    set_seed(3)
    assert first == [LengthSampler(4, 7)() for _ in range(50)] and set(first) == {4, 5, 6}
    with pytest.raises(ValueError, match="max_value must exceed"):
        LengthSampler(4, 4)
    response = respond_to_batch(tiny_policy(), torch.stack(queries_of(["abcd", "efgh"])), txt_len=5)
    assert response.shape == (2, 5) and response.dtype == torch.long


def two_logged_steps(log_with: str, logging_dir) -> tuple[PPOTrainer, dict, list[torch.Tensor]]:
    """Two classic generate/step/log_stats iterations logging with ``log_with``; the trainer and the last stats."""
    config = PPOConfig(batch_size=4, mini_batch_size=2, log_with=log_with,
                       project_kwargs={"logging_dir": str(logging_dir)})
    trainer = quiet_trainer(config, tiny_policy(), None, byt5())
    queries = queries_of(PROMPTS)
    for _ in range(2):
        responses = trainer.generate(queries, return_prompt=False, max_new_tokens=4, **SAMPLING)
        rewards = [torch.tensor(float(len(r))) for r in responses]
        stats = trainer.step(queries, responses, rewards)
        trainer.log_stats(stats, {"query": PROMPTS, "response": ["x"] * 4}, rewards)
    return trainer, stats, rewards


def test_log_stats_writes_csv_rows(tmp_path):
    _, stats, rewards = two_logged_steps("csv", tmp_path)
    import csv

    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    assert [int(r["step"]) for r in rows] == [0, 1]
    assert float(rows[1]["env/reward_mean"]) == pytest.approx(float(np.mean([float(r) for r in rewards])))
    assert float(rows[1]["objective/kl"]) == pytest.approx(stats["objective/kl"])
    assert "objective/kl_dist" not in rows[0]  # arrays go to wandb only


def read_tensorboard_scalars(directory) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` from the TensorBoard event files under ``directory`` (TFRecord framing)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(directory).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_log_with_tensorboard_writes_the_step_scalars(tmp_path):
    trainer, stats, rewards = two_logged_steps("tensorboard", tmp_path)
    scalars = read_tensorboard_scalars(tmp_path)  # flushed at every step, before any end_training()
    assert [step for step, _ in scalars["env/reward_mean"]] == [0, 1]
    assert scalars["env/reward_mean"][1][1] == pytest.approx(float(np.mean([float(r) for r in rewards])))
    assert scalars["objective/kl"][1][1] == pytest.approx(stats["objective/kl"], rel=1e-6)
    trainer.accelerator.end_training()


def resumable_run(state_dir=None, steps=2, save_to=None) -> tuple[list[dict], dict]:
    """A classic loop with everything resume must keep: sampling (torch RNG), LengthSampler and minibatch order
    (numpy RNG), score scaling (running moments), the adaptive KL coefficient, Adam and an LR schedule."""
    model = tiny_policy()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.1, total_iters=8)
    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=2, use_score_scaling=True, use_score_norm=True,
                       target=0.01, horizon=50)
    trainer = quiet_trainer(config, model, None, byt5(), optimizer=optimizer, lr_scheduler=scheduler)
    if state_dir is not None:
        trainer.load_state(state_dir)
    sampler, queries, history = LengthSampler(3, 9), queries_of(PROMPTS), []
    for _ in range(steps):
        responses = trainer.generate(queries, return_prompt=False, length_sampler=sampler, **SAMPLING)
        scores = [torch.tensor(float(len(r)) + 0.5 * float((r > 128).sum())) for r in responses]
        stats = trainer.step(queries, responses, scores)
        history.append({k: v for k, v in stats.items() if isinstance(v, float) and not k.startswith("time/")})
    if save_to is not None:
        trainer.save_state(save_to)
    return history, weights_of(model)


def test_save_state_then_load_state_continues_exactly(tmp_path):
    """trl#1643: N steps, save_state, a new trainer, load_state, M steps == N+M steps without a break."""
    straight, straight_weights = resumable_run(steps=4)
    resumable_run(steps=2, save_to=tmp_path / "state")
    np.random.rand(7), torch.rand(3)  # the process's generators moved on meanwhile
    resumed, resumed_weights = resumable_run(state_dir=tmp_path / "state", steps=2)
    assert resumed == straight[2:]
    assert not changed(straight_weights, resumed_weights)
    fresh, _ = resumable_run(steps=2)  # without load_state the third step is not reproduced
    assert fresh[0] != straight[2]
    with pytest.raises(FileNotFoundError, match="save_state"):
        resumable_run(state_dir=tmp_path / "nothing-here", steps=0)


DDP_SCRIPT = textwrap.dedent(
    '''
    import json, os, sys
    import torch, torch.distributed as dist, transformers
    from safetensors.torch import save_file
    from lit_vhead import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    torch.set_num_threads(1)
    out = sys.argv[1]
    dist.init_process_group("gloo")  # the user's own process group and DDP wrapper are fine too
    rank = dist.get_rank()
    torch.manual_seed(rank)  # each rank starts from different random weights: rank 0's are broadcast
    config = transformers.AutoConfig.for_model(model_type="gpt2", n_layer=2, n_embd=32, n_head=4, vocab_size=259,
                                               n_positions=128, eos_token_id=1, bos_token_id=1, pad_token_id=0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(transformers.AutoModelForCausalLM.from_config(config))
    model = torch.nn.parallel.DistributedDataParallel(model)
    tokenizer = transformers.ByT5Tokenizer(extra_ids=0)
    data = [{"input_ids": torch.tensor([3 + i, 40 + i, 90 + (i % 5)][: 2 + i % 2]), "row": i} for i in range(24)]
    collate = lambda rows: {key: [row[key] for row in rows] for key in rows[0]}
    trainer = PPOTrainer(PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3,
                                   accelerator_kwargs={"cpu": True}),
                         model, None, tokenizer, dataset=data, data_collator=collate)
    start = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    record = {"rows": [], "steps": []}

    def ppo_step(batch):
        responses = trainer.generate(batch["input_ids"], return_prompt=False, max_new_tokens=5, do_sample=True,
                                     pad_token_id=0, eos_token_id=None)
        scores = [torch.tensor(10.0 * rank + float(len(r))) for r in responses]  # rank 1 scores far higher
        stats = trainer.step(batch["input_ids"], responses, scores)
        trainer.log_stats(stats, {}, scores)
        return {
            "scalars": {k: v for k, v in stats.items() if isinstance(v, float) and not k.startswith("time/")},
            "advantages": stats["ppo/policy/advantages"].tolist(),
            "gathered": trainer.accelerator.gather(torch.stack(scores)).tolist(),
            "kl_coef": trainer.kl_ctl.value,
        }

    batches = iter(trainer.dataloader)
    for _ in range(2):
        batch = next(batches)
        record["rows"] += [int(r) for r in batch["row"]]
        record["steps"].append(ppo_step(batch))
    trainer.save_state(os.path.join(out, "state"))  # resume on two processes: the third step, twice
    batch = next(batches)
    third = (ppo_step(batch), {k: v.clone() for k, v in trainer.model.state_dict().items()})
    trainer.load_state(os.path.join(out, "state"))
    again = (ppo_step(batch), trainer.model.state_dict())
    record["resumed_equal"] = third[0] == again[0] and all(torch.equal(third[1][k], again[1][k]) for k in again[1])
    trainer.save_pretrained(os.path.join(out, "saved"))
    record["world_size"] = trainer.accelerator.num_processes
    record["main"] = trainer.accelerator.is_main_process
    record["trained"] = any(not torch.equal(v, start[k]) for k, v in trainer.model.state_dict().items())
    state = trainer.model.state_dict()
    state.pop("lm_head.weight", None)  # tied to the embeddings
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, f"weights{rank}.safetensors"))
    json.dump(record, open(os.path.join(out, f"rank{rank}.json"), "w"))
    '''
)


@pytest.mark.slow
def test_torchrun_two_processes_train_in_lockstep_and_whiten_over_both(tmp_path):
    script = tmp_path / "ppo_ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["main"] for r in ranks] == [True, False]
    assert not set(ranks[0]["rows"]) & set(ranks[1]["rows"])  # each rank drew its own rows
    assert ranks[0]["trained"] and ranks[1]["trained"]
    assert ranks[0]["resumed_equal"] and ranks[1]["resumed_equal"]  # save_state/load_state under DDP
    weights = [load_file(tmp_path / f"weights{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # in lockstep
    for step0, step1 in zip(ranks[0]["steps"], ranks[1]["steps"]):
        local_keys = ("tokens/queries_len_std", "tokens/responses_len_std")  # this process's batch, as in TRL
        reduced = [{k: v for k, v in step["scalars"].items() if k not in local_keys} for step in (step0, step1)]
        assert reduced[0] == reduced[1] and step0["kl_coef"] == step1["kl_coef"]  # reduced over ranks
        assert len(step0["gathered"]) == 8 and step0["gathered"] == step1["gathered"]
        local = [np.asarray(step0["advantages"]), np.asarray(step1["advantages"])]
        both = np.concatenate(local)
        assert abs(both.mean()) < 1e-4 and both.std(ddof=1) == pytest.approx(1.0, abs=1e-3)  # whitened over both
        assert local[0].mean() < -0.3 and local[1].mean() > 0.3  # ... not per rank
    saved = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "saved")
    assert torch.equal(saved.v_head.summary.weight, weights[0]["v_head.summary.weight"])


def test_gloo_waits_return_once_the_worker_thread_lets_go_of_their_tensor():
    """What keeps a torchrun rank from aborting at exit: ``wait_for_everyone``/``gather`` under gloo return only when
    gloo's worker thread (here: a timer thread's reference) has dropped its hold on their tensor, capped at 1 s."""
    import threading
    import time

    from lit_vhead.distributed import released_after

    tensor, held = torch.zeros(1), []
    tic = time.monotonic()
    with released_after(tensor):  # nothing holds it: no wait
        pass
    assert time.monotonic() - tic < 0.05
    with released_after(tensor):
        held.append(tensor)  # the collective's work takes a reference ...
        threading.Timer(0.2, held.clear).start()  # ... and the worker drops it 0.2 s later
    assert 0.15 < time.monotonic() - tic < 0.9 and not held
    tic = time.monotonic()
    with released_after(tensor, timeout=0.1):
        held.append(tensor)  # never dropped: give up after the timeout instead of hanging
    assert 0.1 <= time.monotonic() - tic < 0.5


def test_num_shared_layers_reference_shares_and_freezes_the_lower_layers():
    policy = tiny_policy()
    trainer = quiet_trainer(PPOConfig(batch_size=4, mini_batch_size=2, learning_rate=1e-3), policy, None, byt5(),
                            num_shared_layers=1)
    lower = policy.pretrained_model.transformer.h[0].mlp.c_fc.weight
    assert trainer.ref_model.pretrained_model.transformer.h[0].mlp.c_fc.weight.data_ptr() == lower.data_ptr()
    before = weights_of(policy)
    queries = queries_of(PROMPTS)
    for _ in range(2):
        responses = trainer.generate(queries, return_prompt=False, max_new_tokens=5, **SAMPLING)
        stats = trainer.step(queries, responses, [torch.tensor(float(len(r))) for r in responses])
    moved = changed(before, weights_of(policy))
    assert moved and not any(".h.0." in k or ".wte." in k for k in moved)  # shared layers stay frozen
    assert stats["objective/kl"] != 0.0  # the upper layers moved away from the reference's
