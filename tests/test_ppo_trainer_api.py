"""``PPOTrainer``'s TRL 0.11.4 surface beyond the loop: the ``step`` pipeline's methods with TRL's signatures, each of
which a subclass overrides to change what ``step`` does (through the one PPO core), and what TRL scripts and tests
reach (``set_seed``, ``lr_scheduler.scheduler``, a tokenizer without a pad token, ``load_in_8bit``, ``generate``'s
``remove_padding``, the statistics' types, PEFT adapter configs older peft reads, ``load_state`` all or nothing).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import transformers
from conftest import ROOT, TINY_CONFIGS
from test_ppo_trainer import PROMPTS, byt5, changed, queries_of, quiet_trainer, tiny_policy, weights_of

from lit_vhead import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
from lit_vhead.checkpoint import CheckpointError

# TRL 0.11.4's signatures (trl/trainer/ppo_trainer.py), which subclasses override and TRL's tests call
TRL_SIGNATURES = {
    "prepare_model_inputs": ["queries", "responses"],
    "batched_forward_pass": ["model", "queries", "responses", "model_inputs", "return_logits", "response_masks"],
    "compute_rewards": ["scores", "logprobs", "ref_logprobs", "masks"],
    "_kl_penalty": ["logprob", "ref_logprob"],
    "compute_advantages": ["values", "rewards", "mask"],
    "loss": ["old_logprobs", "values", "logits", "vpreds", "logprobs", "mask", "advantages", "returns"],
    "_step_safety_checker": ["batch_size", "queries", "responses", "scores", "masks"],
    "record_step_stats": ["kl_coef", "data"],
    "gather_stats": ["stats"],
    "_early_stop": ["policykl"],
    "_generate_batched": ["model", "query_tensors", "length_sampler", "batch_size", "return_prompt",
                          "pad_to_multiple_of", "remove_padding", "generation_kwargs"],
    "_filter_kwargs": ["kwargs", "target_func"],
    "_save_pretrained": ["save_directory"],
}
CONFIG = dict(batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3)


@pytest.mark.parametrize("name", sorted(TRL_SIGNATURES))
def test_the_step_pipeline_has_trl_0_11_4_signatures(name):
    parameters = list(inspect.signature(getattr(PPOTrainer, name)).parameters)[1:]
    assert parameters[: len(TRL_SIGNATURES[name])] == TRL_SIGNATURES[name]


def equal_length_batch() -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    queries = [torch.randint(3, 259, (5,), generator=g) for _ in range(4)]
    responses = [torch.randint(3, 259, (6,), generator=g) for _ in range(4)]
    return queries, responses, [torch.tensor(s) for s in (1.0, -1.0, 0.5, 2.0)]


def one_step(cls: type = PPOTrainer, batch=None, ref_seed: int | None = None, trainer_kwargs=None, **config):
    """One ``step`` of a fresh tiny trainer of class ``cls``: (trainer, stats, weights before)."""
    reference = None if ref_seed is None else tiny_policy(ref_seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No dataset is provided")
        trainer = cls(PPOConfig(**{**CONFIG, **config}), tiny_policy(), reference, byt5(), **(trainer_kwargs or {}))
    before = weights_of(trainer.model)
    stats = trainer.step(*(batch or equal_length_batch()))
    return trainer, stats, before


class BonusRewards(PPOTrainer):
    """A per-token reward of +1 on every response token, on top of TRL's rewards."""

    def compute_rewards(self, scores, logprobs, ref_logprobs, masks):
        rewards, non_score, kls = super().compute_rewards(scores, logprobs, ref_logprobs, masks)
        return rewards + masks, non_score, kls


def test_a_subclass_overriding_compute_rewards_changes_step():
    _, base, _ = one_step()
    _, bonus, _ = one_step(BonusRewards)
    # GAE (gamma 1, lambda 0.95) turns +1 per token into sum_k 0.95^k over the tokens left: the returns grow by that
    lam, tokens = 0.95, 6
    expected = np.mean([sum(lam**k for k in range(tokens - t)) for t in range(tokens)])
    assert bonus["ppo/returns/mean"] - base["ppo/returns/mean"] == pytest.approx(expected, rel=1e-4)


class NoValueLoss(PPOTrainer):
    """Trains the policy only: the value loss is dropped."""

    def loss(self, old_logprobs, values, logits, vpreds, logprobs, mask, advantages, returns):
        pg_loss, vf_loss, stats = super().loss(old_logprobs, values, logits, vpreds, logprobs, mask, advantages,
                                               returns)
        return pg_loss, vf_loss * 0.0, stats


def test_a_subclass_overriding_loss_changes_step():
    base, _, before = one_step()
    assert {"v_head.summary.weight", "v_head.summary.bias"} <= changed(before, weights_of(base.model))
    policy_only, _, before = one_step(NoValueLoss)
    moved = changed(before, weights_of(policy_only.model))
    assert moved and not any(k.startswith("v_head.") for k in moved)  # the head only learns from the value loss


class DoubledKL(PPOTrainer):
    def _kl_penalty(self, logprob, ref_logprob):
        return 2 * super()._kl_penalty(logprob, ref_logprob)


class NoAdvantages(PPOTrainer):
    def compute_advantages(self, values, rewards, mask):
        values, advantages, returns = super().compute_advantages(values, rewards, mask)
        return values, advantages * 0.0, returns


class ExtraStatistic(PPOTrainer):
    def record_step_stats(self, kl_coef, **data):
        stats = super().record_step_stats(kl_coef, **data)
        stats["env/max_score"] = data["scores"].max()
        return stats


def test_subclasses_overriding_kl_penalty_advantages_and_statistics_change_step():
    _, base, _ = one_step(ref_seed=1)  # a reference other than the policy: the KL is not 0 from the start
    _, doubled, _ = one_step(DoubledKL, ref_seed=1)
    assert base["objective/kl"] != 0 and doubled["objective/kl"] == pytest.approx(2 * base["objective/kl"], rel=1e-5)
    assert doubled["ppo/mean_non_score_reward"] == pytest.approx(2 * base["ppo/mean_non_score_reward"], rel=1e-5)
    _, flat, _ = one_step(NoAdvantages)
    assert flat["ppo/policy/advantages_mean"] == 0 and flat["ppo/loss/policy"] == 0
    assert base["ppo/loss/policy"] != 0
    _, extra, _ = one_step(ExtraStatistic)
    assert extra["env/max_score"] == 2.0


class AlwaysStop(PPOTrainer):
    def _early_stop(self, policykl):
        return True


class CountingForwards(PPOTrainer):
    def batched_forward_pass(self, model, queries, responses, model_inputs, return_logits=False,
                             response_masks=None):
        self.calls = getattr(self, "calls", []) + [(len(queries), return_logits)]
        return super().batched_forward_pass(model, queries, responses, model_inputs, return_logits, response_masks)


def test_subclasses_overriding_early_stop_and_batched_forward_pass_change_step():
    counting, _, _ = one_step(CountingForwards, ppo_epochs=3, trainer_kwargs={"num_shared_layers": 1})
    rollout = [(2, False)] * 4  # policy and reference, per chunk of mini_batch_size
    assert counting.calls == rollout + [(2, True)] * 6  # then 3 epochs x 2 minibatches
    assert counting.reference.trunk == ()  # an overridden forward pass: no trunk reuse across it
    plain, _, _ = one_step(ppo_epochs=1, trainer_kwargs={"num_shared_layers": 1})
    assert plain.reference.trunk != ()

    class CountingStop(CountingForwards, AlwaysStop):
        pass

    stopped, _, _ = one_step(CountingStop, ppo_epochs=3, early_stopping=True, target_kl=1e9)
    assert stopped.calls == rollout + [(2, True)] * 2  # one epoch, then _early_stop said stop


class WholeSequenceForwards(PPOTrainer):
    """TRL's layout: outputs over the whole sequence (minus one), the prompt's columns masked out."""

    def batched_forward_pass(self, model, queries, responses, model_inputs, return_logits=False,
                             response_masks=None):
        out = super().batched_forward_pass(model, queries, responses, model_inputs, return_logits, response_masks)
        extra = model_inputs["input_ids"].shape[1] - 1 - out[0].shape[1]
        self.widened = getattr(self, "widened", 0) + (extra > 0)

        def widen(t):
            return None if t is None else torch.cat([t.new_zeros(t.shape[0], extra, *t.shape[2:]), t], 1)

        return tuple(widen(t) for t in out)


class RightPaddedInputs(PPOTrainer):
    """TRL's default collator layout: ``[query | response | padding]`` per row (responses start in other columns)."""

    def prepare_model_inputs(self, queries, responses):
        rows = [torch.cat([q, r]) for q, r in zip(queries, responses)]
        width = max(len(r) for r in rows)
        ids = torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])
        mask = torch.stack([torch.arange(width, device=r.device) < len(r) for r in rows]).long()
        self.widened = 1
        return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("cls", [WholeSequenceForwards, RightPaddedInputs])
def test_other_layouts_of_the_forward_passes_give_the_same_update(cls):
    batch = (queries_of(PROMPTS), queries_of(["a reply", "ok", "no thanks", "yes!"]), [torch.tensor(1.0)] * 4)
    base, base_stats, _ = one_step(batch=batch)
    other, other_stats, _ = one_step(cls, batch=batch)
    assert other.widened  # the subclass's layout was used
    ours, theirs = weights_of(base.model), weights_of(other.model)
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-5
    for key in ("ppo/loss/total", "objective/kl", "ppo/returns/mean", "ppo/val/vpred", "ppo/policy/approxkl"):
        assert other_stats[key] == pytest.approx(base_stats[key], rel=1e-4, abs=1e-6), key


def test_trl_pipeline_methods_called_directly():
    """What TRL's own tests do: prepare_model_inputs -> batched_forward_pass -> compute_rewards -> compute_advantages
    -> loss, with masks, as separate calls."""
    trainer = quiet_trainer(PPOConfig(**CONFIG), tiny_policy(), None, byt5())
    queries, responses = [torch.tensor([3, 4, 5, 6]), torch.tensor([3, 4, 5, 6, 7, 8, 9])], [
        torch.tensor([10, 11, 12, 13, 14]), torch.tensor([15, 16, 17, 18, 19, 20])]
    inputs = trainer.prepare_model_inputs(queries, responses)
    logprobs, logits, values, masks = trainer.batched_forward_pass(trainer.model, queries, responses, inputs,
                                                                   return_logits=True)
    assert masks.sum(1).tolist() == [5, 6] and logits.shape[:2] == logprobs.shape == values.shape == masks.shape
    alone, _, _, mask0 = trainer.batched_forward_pass(trainer.model, queries[:1], responses[:1],
                                                      trainer.prepare_model_inputs(queries[:1], responses[:1]))
    torch.testing.assert_close(alone[mask0.bool()], logprobs[:1][masks[:1].bool()])  # padding changes nothing
    rewards, non_score, kls = trainer.compute_rewards(torch.tensor([1.0, 2.0]), logprobs, logprobs + 1, masks)
    assert torch.allclose(kls[masks.bool()], torch.tensor(-1.0)) and rewards[1, masks[1].nonzero()[-1]] == 2.2
    values, advantages, returns = trainer.compute_advantages(values, rewards, masks)
    assert returns.shape == masks.shape and abs(advantages[masks.bool()].mean()) < 1e-6
    pg_loss, vf_loss, stats = trainer.loss(logprobs, values, logits, values + 0.1, logprobs, masks, advantages,
                                           values)  # ratio 1, value error 0.1 everywhere
    assert abs(pg_loss.item()) < 1e-6 and vf_loss.item() == pytest.approx(0.1 * 0.5 * 0.01, rel=1e-4)
    assert stats["policy/ratio"].shape == masks.shape  # TRL's stats, the ratio array included
    with_masks = trainer.batched_forward_pass(trainer.model, queries, responses, inputs,
                                              response_masks=[torch.tensor([1, 0, 0, 1, 1]), torch.ones(6)])
    torch.testing.assert_close(with_masks[0], logprobs)  # masked tokens are still attended to (only not trained)
    assert with_masks[3].sum(1).tolist() == [3, 6]


def test_step_checks_inputs_and_says_which_in_trl_types():
    trainer = quiet_trainer(PPOConfig(**CONFIG), tiny_policy(), None, byt5())
    queries, responses, scores, masks = trainer._step_safety_checker(
        4, queries_of(PROMPTS), queries_of(PROMPTS), [torch.tensor([1.0])] * 4)
    assert [s.shape for s in scores] == [torch.Size([])] * 4 and masks is None
    assert trainer._filter_kwargs({"a": 3, "bogus": 1}, lambda a, b=1: a) == {"a": 3}


def test_set_seed_at_the_top_level_and_a_light_import():
    code = (
        "import sys; import lit_vhead; assert 'torch' not in sys.modules, 'import lit_vhead loads torch'\n"
        "from lit_vhead import AutoModelForCausalLMWithValueHead, PPOConfig, set_seed\n"
        "heavy = [m for m in ('lightning', 'hydra', 'omegaconf', 'peft', 'torchmetrics') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "import lit_vhead.core; assert set_seed is lit_vhead.core.set_seed"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr[-2000:]


def test_lr_scheduler_is_wrapped_as_accelerate_does():
    model = tiny_policy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.5)
    trainer = quiet_trainer(PPOConfig(**CONFIG), model, None, byt5(), optimizer=optimizer, lr_scheduler=scheduler)
    assert trainer.lr_scheduler.scheduler is scheduler and trainer.optimizer.optimizer is optimizer
    first = trainer.step(*equal_length_batch())
    second = trainer.step(*equal_length_batch())
    assert (first["ppo/learning_rate"], second["ppo/learning_rate"]) == (0.01, 0.005)
    assert trainer.lr_scheduler.get_last_lr() == [0.0025]


def test_a_tokenizer_without_pad_token_is_accepted_until_padding_is_needed():
    tokenizer = transformers.GPT2TokenizerFast(tokenizer_object=_word_tokenizer(), eos_token="<eos>")
    assert tokenizer.pad_token is None
    trainer = quiet_trainer(PPOConfig(**CONFIG), tiny_policy(), None, tokenizer)  # TRL's tests set pad later
    queries, responses, scores = equal_length_batch()
    trainer.step(queries, responses, scores)  # nothing to pad
    with pytest.raises(ValueError, match=r"no pad token.*tokenizer.pad_token = tokenizer.eos_token"):
        trainer.step(queries_of(PROMPTS), responses, scores)
    tokenizer.pad_token = tokenizer.eos_token
    assert math.isfinite(trainer.step(queries_of(PROMPTS), responses, scores)["ppo/loss/total"])


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"<eos>": 1, "<unk>": 2, "hello": 3, "world": 4}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def test_generate_takes_remove_padding_and_pad_to_multiple_of():
    tokenizer = byt5()
    trainer = quiet_trainer(PPOConfig(**CONFIG), tiny_policy(), None, tokenizer)
    queries = queries_of(PROMPTS)
    greedy = {"do_sample": False, "max_new_tokens": 6, "min_new_tokens": 6, "pad_token_id": 0, "eos_token_id": None}
    full = trainer.generate(queries, return_prompt=False, **greedy)
    assert [len(r) for r in full] == [6] * 4  # ByT5's EOS (id 1) is not among them: nothing cut
    tokenizer.eos_token = chr(int(full[0][2]) - 3)  # make row 0's third token the EOS (ByT5: id = byte + 3)
    assert tokenizer.eos_token_id == int(full[0][2])
    cut = trainer.generate(queries, return_prompt=False, **greedy)
    assert torch.equal(cut[0], full[0][: int((full[0] == full[0][2]).nonzero()[0, 0]) + 1])  # cut after the EOS
    kept = trainer.generate(queries, return_prompt=False, remove_padding=False, pad_to_multiple_of=8, **greedy)
    assert [torch.equal(a, b) for a, b in zip(kept, full)] == [True] * 4  # uncut; extra padding changes nothing
    one = trainer.generate(queries[0], remove_padding=False, **greedy)  # one query: nothing to remove, accepted
    assert one.shape == (1, len(queries[0]) + 6)


def test_statistics_have_trl_types():
    queries, responses, scores = equal_length_batch()
    trainer = quiet_trainer(PPOConfig(**CONFIG), tiny_policy(), None, byt5())
    plain = trainer.step(queries, responses, scores)
    assert isinstance(plain["ppo/loss/total"], float) and isinstance(plain["objective/kl"], float)
    assert isinstance(plain["objective/kl_dist"], np.ndarray) and plain["objective/kl_dist"].shape == (4,)
    assert plain["tokens/responses_dist"].tolist() == [6.0] * 4 and plain["tokens/queries_len_std"] == 0.0
    trainer.config.log_with = "wandb"  # TRL keeps numpy arrays for wandb: ppo/* means of shape [1], 0-d tensors
    arrays = trainer.step(queries, responses, scores)
    assert arrays["ppo/loss/total"].shape == (1,) and arrays["ppo/loss/total"][0] == arrays["ppo/loss/total"].item()
    assert isinstance(arrays["objective/kl"], np.ndarray) and arrays["objective/kl"].shape == ()
    assert isinstance(arrays["objective/kl_coef"], float) and isinstance(arrays["tokens/queries_len_mean"], float)


def test_load_in_8bit_false_is_dropped_and_true_needs_bitsandbytes(tmp_path):
    transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**TINY_CONFIGS["gpt2"])).save_pretrained(tmp_path)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, load_in_8bit=False, load_in_4bit=False)
    assert not model.is_loaded_in_8bit
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here: load_in_8bit=True would quantize (needs a GPU)")
    with pytest.raises(ImportError, match=r"load_in_8bit=True needs bitsandbytes.*pip install bitsandbytes"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path, load_in_8bit=True)


def test_a_fresh_value_head_is_an_info_message_not_a_warning(tmp_path, caplog, recwarn):
    transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**TINY_CONFIGS["gpt2"])).save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="lit_vhead.modeling"):
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    assert not [w for w in recwarn if "value-head" in str(w.message)]
    assert any("No value-head weights" in r.message and r.levelno == logging.INFO for r in caplog.records)


def test_peft_adapter_config_holds_only_what_older_peft_reads(tmp_path):
    from peft import LoraConfig

    policy = tiny_policy(peft_config=LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn"], task_type="CAUSAL_LM"))
    policy.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # TRL 0.11.4's peft (0.13) rejects every key it does not know, e.g. newer peft's defaults and peft_version
    assert "peft_version" not in config and "alora_invocation_tokens" not in config and "use_dora" not in config
    assert {config[k] for k in ("peft_type", "r", "lora_alpha", "task_type")} == {"LORA", 4, 16, "CAUSAL_LM"}
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path).pretrained_model.peft_config["default"]
    original = policy.pretrained_model.peft_config["default"]
    assert reloaded.to_dict() | {"base_model_name_or_path": None, "inference_mode": None} == original.to_dict() | {
        "base_model_name_or_path": None, "inference_mode": None}


class SaveHook(PPOTrainer):
    def _save_pretrained(self, save_directory):
        self.saved = save_directory


def test_save_pretrained_goes_through_the_save_pretrained_hook(tmp_path):
    trainer, _, _ = one_step(SaveHook)
    trainer.save_pretrained(tmp_path / "x")
    assert trainer.saved == tmp_path / "x" and not (tmp_path / "x").exists()


def state_trainer(scheduler: bool) -> PPOTrainer:
    model = tiny_policy()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    lr = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9) if scheduler else None
    return quiet_trainer(PPOConfig(**CONFIG), model, None, byt5(), optimizer=optimizer, lr_scheduler=lr)


def test_load_state_is_all_or_nothing(tmp_path):
    """Issue 20, item 7: a mismatch or a truncated file used to surface after weights and optimizer were overwritten,
    or as an unnamed OSError/SafetensorError."""
    saved = state_trainer(scheduler=True)
    saved.step(*equal_length_batch())
    saved.save_state(tmp_path / "state")
    target = state_trainer(scheduler=False)
    target.step(*equal_length_batch())
    before, optimizer = weights_of(target.model), target.optimizer.state_dict()
    with pytest.raises(ValueError, match="saved with an lr_scheduler and this trainer has none.*Nothing was loaded"):
        target.load_state(tmp_path / "state")
    for name in ("trainer_state.pt", "policy.safetensors"):
        broken = tmp_path / f"broken-{name}"
        broken.mkdir()
        for file in ("trainer_state.pt", "policy.safetensors"):
            data = (tmp_path / "state" / file).read_bytes()
            (broken / file).write_bytes(data[: len(data) // 2] if file == name else data)
        with pytest.raises(CheckpointError, match=rf"'{broken / name}'"):
            state_trainer(scheduler=True).load_state(broken)
    assert not changed(before, weights_of(target.model))
    assert torch.equal(target.optimizer.state_dict()["state"][0]["step"], optimizer["state"][0]["step"])
    assert target.steps_done == 1


def test_transformers_argument_parser_reads_ppo_config():
    """TRL's ``examples/scripts/ppo.py`` builds its command line with ``HfArgumentParser((ScriptArguments,
    PPOConfig))``: every field must be one it can parse (``cpu_kernels`` typed ``Any`` was not)."""
    parser = transformers.HfArgumentParser(PPOConfig)
    (default,) = parser.parse_args_into_dataclasses(args=[])
    assert default.cpu_kernels == "auto" and default.kl_penalty == "kl"
    (config,) = parser.parse_args_into_dataclasses(
        args=["--cpu_kernels", "false", "--batch_size", "8", "--mini_batch_size", "4", "--kl_penalty", "abs"])
    assert config.cpu_kernels is False and config.batch_size == 8 and config.kl_penalty == "abs"
