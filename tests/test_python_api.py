"""PPO from Python: PPOModule + PromptDataModule + a plain lightning.Trainer, with the user's own objects.

Real Trainer runs of real PPO steps on tiny models; every accepted argument form trains, every wrong one fails before
any rollout with an error naming the argument.
"""

import copy
import csv
import json
import os
import re
import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch
import transformers
from conftest import TINY_CONFIGS, tiny_hf_model
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lit_vhead import (
    AutoModelForCausalLMWithValueHead,
    AutoModelForSeq2SeqLMWithValueHead,
    PPOModule,
    PromptDataModule,
    ReferenceModelCallback,
    RewardSource,
)
from lit_vhead.builders import ModelNotFoundError
from lit_vhead.data import collate_prompts
from lit_vhead.generation import HFGeneration
from lit_vhead.rewards import RewardError, RewardModel, reward_inputs

PPO = {"steps": 2, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 2, "learning_rate": 1e-3,
       "generation": {"max_new_tokens": 4}}
PROMPTS = ["Hello there", "The cat sat", "Once upon a time", "I think that"]
TRL_METRICS = ["env/reward_mean", "env/reward_std", "objective/kl", "objective/kl_coef", "objective/entropy",
               "ppo/loss/policy", "ppo/loss/value", "ppo/policy/clipfrac", "ppo/val/var_explained", "time/ppo/total"]


def vowels(prompts, responses, **kw):
    """The README's reward: share of vowels and spaces in each response (x10)."""
    return [10 * sum(c in "aeiou " for c in r) / max(len(r), 1) for r in responses]


def trainer(**kwargs):
    defaults = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                "enable_model_summary": False}
    return L.Trainer(**{**defaults, **kwargs})


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items()}


def changed(before, module):
    after = module.policy.state_dict()
    return [k for k in before if not torch.equal(before[k], after[k])]


def classifier(num_labels=2):
    """A tiny GPT2ForSequenceClassification (byte vocabulary), built from a config."""
    config = transformers.AutoConfig.for_model(**TINY_CONFIGS["gpt2"], num_labels=num_labels)
    return transformers.AutoModelForSequenceClassification.from_config(config)


def read_rows(logger):
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


class InitialWeights(L.Callback):
    """The policy's weights as fit starts (a path is built only then)."""

    def on_fit_start(self, trainer, pl_module):
        self.initial = snapshot(pl_module)


class Batches(L.Callback):
    """Records each PPO step's prompt batch as text."""

    def __init__(self, tokenizer):
        self.tokenizer, self.prompts = tokenizer, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ids = [q[m.bool()].tolist() for q, m in zip(batch["query_ids"], batch["query_mask"])]
        self.prompts.append(self.tokenizer.batch_decode(ids, skip_special_tokens=True))


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def forbid_rollouts(monkeypatch):
    """Any generation from now on fails the test: bad input must be reported before the first rollout."""

    def fail(*args, **kwargs):
        raise AssertionError("a rollout started before the bad input was reported")

    monkeypatch.setattr(HFGeneration, "generate", fail)


@pytest.fixture
def no_rollout(monkeypatch):
    forbid_rollouts(monkeypatch)


# ---------------------------------------------------------------------------------------------- accepted forms
@pytest.mark.parametrize("form", ["value_head_model", "hf_model", "local_path", "t5_model", "t5_path"])
def test_every_policy_form_trains(tmp_path, byt5, form):
    arch = "t5" if form.startswith("t5") else "gpt2"
    hf = tiny_hf_model(arch)
    if form.endswith("path"):
        hf.save_pretrained(tmp_path / arch)
    policy = {"value_head_model": lambda: AutoModelForCausalLMWithValueHead(hf), "hf_model": lambda: hf,
              "local_path": lambda: str(tmp_path / arch), "t5_model": lambda: hf,
              "t5_path": lambda: tmp_path / arch}[form]()
    module = PPOModule(policy, byt5, vowels, ppo=PPO)
    built = InitialWeights()
    fit = trainer(callbacks=[built])
    fit.fit(module, datamodule=PromptDataModule(PROMPTS))
    expected = AutoModelForSeq2SeqLMWithValueHead if arch == "t5" else AutoModelForCausalLMWithValueHead
    assert isinstance(module.policy, expected) and module.policy.config.is_encoder_decoder == (arch == "t5")
    if form in ("hf_model", "t5_model"):
        assert module.policy.pretrained_model is hf  # the user's model object, a value head added
    assert fit.current_epoch == PPO["steps"]
    assert any(not k.startswith("v_head") for k in changed(built.initial, module))  # the LM itself trained
    assert any(k.startswith("v_head") for k in changed(built.initial, module))


class ConstantReward(RewardSource):
    name = "constant"

    def __init__(self):
        self.calls = 0

    def setup(self, policy, tokenizer, device):
        self.ready = True

    def compute(self, inputs):
        self.calls += 1
        return [float(len(r) % 3) for r in inputs.responses]


class Recording(PPOModule):
    """Keeps each step's reward inputs and scores (through the public score_rollout hook)."""

    def score_rollout(self, rollout):
        scores = super().score_rollout(rollout)
        self.seen = [*getattr(self, "seen", []), (reward_inputs(rollout, self.tokenizer), scores)]
        return scores


@pytest.mark.parametrize("form", ["function", "classifier_pair", "classifier_dir", "source"])
def test_every_reward_form_scores_the_rollouts(tmp_path, byt5, form):
    rm = classifier()  # no pad_token_id in its config: PPOModule sets it (GPT-2 classifiers need it to batch)
    seen_kwargs = []

    def function(prompts, responses, query_ids, response_ids):
        seen_kwargs.append((query_ids, response_ids))
        return torch.tensor([float(len(ids)) for ids in response_ids])

    if form == "classifier_dir":
        rm.save_pretrained(tmp_path / "rm")
        byt5.save_pretrained(tmp_path / "rm")
    reward = {"function": lambda: function, "classifier_pair": lambda: (rm, byt5),
              "classifier_dir": lambda: RewardModel(str(tmp_path / "rm"), label_index=1),
              "source": ConstantReward}[form]()
    module = Recording(tiny_hf_model("gpt2"), byt5, reward, ppo=PPO)
    logger = CSVLogger(tmp_path / "logs")
    trainer(logger=logger).fit(module, datamodule=PromptDataModule(PROMPTS))
    logged = [float(row["env/reward_mean"]) for row in read_rows(logger)]
    assert logged == pytest.approx([float(scores.mean()) for _, scores in module.seen], rel=1e-6)
    inputs, scores = module.seen[-1]
    if form == "function":
        assert len(seen_kwargs) == 1 + PPO["steps"]  # the probe in setup, then one call per PPO step
        assert seen_kwargs[-1] == (inputs.query_ids, inputs.response_ids)
        assert scores.tolist() == [float(len(ids)) for ids in inputs.response_ids]
    elif form.startswith("classifier"):
        rm = reward.model if form == "classifier_dir" else rm
        texts = [p + r for p, r in zip(inputs.prompts, inputs.responses)]
        with torch.no_grad():
            logits = rm(**byt5(texts, padding=True, return_tensors="pt")).logits
        assert scores == pytest.approx(logits[:, 1 if form == "classifier_dir" else 0], abs=1e-5)
    else:
        assert reward.ready and reward.calls == PPO["steps"]
        assert scores.tolist() == [float(len(r) % 3) for r in inputs.responses]


@pytest.mark.parametrize("form", ["list", "txt", "jsonl", "dataset"])
def test_every_prompt_form_feeds_the_rollouts(tmp_path, byt5, form):
    import datasets

    prompts = [f"{form} prompt {i}" for i in range(6)]
    source = {"list": lambda: prompts,
              "txt": lambda: (tmp_path / "p.txt").write_text("\n".join(prompts)) and tmp_path / "p.txt",
              "jsonl": lambda: (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"prompt": p}) for p in prompts))
              and str(tmp_path / "p.jsonl"),
              "dataset": lambda: datasets.Dataset.from_dict({"id": list(range(6)), "text": prompts})}[form]()
    data = PromptDataModule(source)  # tokenizer, batch size and seed follow the module
    batches = Batches(byt5)
    trainer(callbacks=[batches]).fit(PPOModule(tiny_hf_model("gpt2"), byt5, vowels, ppo=PPO), datamodule=data)
    assert data.prompts == prompts and data.batch_size == PPO["batch_size"] and data.padding_side == "left"
    assert len(batches.prompts) == PPO["steps"] and all(len(b) == PPO["batch_size"] for b in batches.prompts)
    assert {p for batch in batches.prompts for p in batch} <= set(prompts)
    assert batches.prompts[0] != batches.prompts[1]  # each PPO step draws its own prompts


# ---------------------------------------------------------------------------------------------- wrong forms
def no_pad_tokenizer():
    tokenizer = transformers.ByT5Tokenizer(extra_ids=0)
    tokenizer.pad_token = None
    return tokenizer


CONSTRUCTOR_ERRORS = {
    "policy is a config": (lambda: {"policy": transformers.AutoConfig.for_model(**TINY_CONFIGS["gpt2"])},
                           TypeError, "policy must be a value-head model"),
    "policy is a model class": (lambda: {"policy": transformers.GPT2LMHeadModel}, TypeError, "got type"),
    "policy has no LM head": (lambda: {"policy": transformers.GPT2Model(
        transformers.AutoConfig.for_model(**TINY_CONFIGS["gpt2"]))}, ValueError, "no language-model head"),
    "policy path missing": (lambda: {"policy": "/nonexistent/model"}, ModelNotFoundError, "/nonexistent/model"),
    "policy path is a model object list": (lambda: {"policy": [tiny_hf_model("gpt2")]}, TypeError, "got list"),
    "head on a value-head model": (lambda: {"policy": AutoModelForCausalLMWithValueHead(tiny_hf_model("gpt2")),
                                            "head": {"init": "normal"}}, ValueError, "already a value-head model"),
    "tokenizer is a name": (lambda: {"tokenizer": "byt5"}, TypeError, "tokenizer must be a transformers tokenizer"),
    "tokenizer without pad": (lambda: {"tokenizer": no_pad_tokenizer()}, ValueError, "has no pad token"),
    "tokenizer larger than the model": (lambda: {"policy": transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**{**TINY_CONFIGS["gpt2"], "vocab_size": 100}))},
        ValueError, "259 tokens but the policy's embedding has 100 rows"),
    "reward not callable": (lambda: {"reward": "vowels"}, TypeError, "reward must be a function"),
    "reward None without own scoring": (lambda: {"reward": None}, TypeError, "reward must be a function"),
    "reward classifier without tokenizer": (lambda: {"reward": classifier()}, TypeError, "reward=(model, "),
    "ppo is a list": (lambda: {"ppo": [1]}, TypeError, "ppo must be a PPOConfig, a dict or None"),
    "ppo unknown field": (lambda: {"ppo": {"stepz": 3}}, TypeError, "did you mean 'steps'"),
    "ppo batch not divisible": (lambda: {"ppo": {"batch_size": 6, "mini_batch_size": 4}}, ValueError,
                                "ppo.batch_size=6 is not divisible"),
    "ref unknown mode": (lambda: {"ref": "frozen"}, ValueError, "ref.mode='frozen'"),
    "ref is a number": (lambda: {"ref": 1}, TypeError, "ref must be None"),
    "ref peft without peft": (lambda: {"ref": "peft"}, ValueError, "ref.mode=peft needs a PEFT policy"),
    "ref shared out of range": (lambda: {"ref": {"mode": "shared", "num_shared_layers": 5}}, ValueError,
                                "num_shared_layers=5 is out of range"),
    "optimizer is a name": (lambda: {"optimizer": "adam"}, TypeError, "optimizer must be None or a function"),
    "sample_table_every negative": (lambda: {"sample_table_every": -1}, ValueError, "sample_table_every=-1"),
}


@pytest.mark.parametrize("case", CONSTRUCTOR_ERRORS)
def test_wrong_argument_fails_in_the_constructor(byt5, case):
    make, error, words = CONSTRUCTOR_ERRORS[case]
    kwargs = {"policy": tiny_hf_model("gpt2"), "tokenizer": byt5, "reward": vowels, "ppo": PPO, **make()}
    with pytest.raises(error) as info:
        PPOModule(**kwargs)
    assert words in str(info.value)


@pytest.mark.parametrize("case", ["prompts", "tokenizer", "batch_size"])
def test_wrong_prompt_data_fails_in_its_constructor(case):
    kwargs = {"prompts": {"prompts": 3}, "tokenizer": {"tokenizer": "byt5"}, "batch_size": {"batch_size": 0}}[case]
    words = {"prompts": "prompts must be a list of strings", "tokenizer": "tokenizer must be a transformers",
             "batch_size": "batch_size=0 must be an int >= 1"}[case]
    with pytest.raises((TypeError, ValueError), match=re.escape(words)):
        PromptDataModule(**{"prompts": PROMPTS, **kwargs})


def right_padded_loader(tokenizer, batch_size=PPO["batch_size"]):
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    pad = tokenizer.pad_token_id
    return DataLoader(ids, batch_size=batch_size, collate_fn=lambda b: collate_prompts(b, pad, "right"))


SETUP_ERRORS = {  # case: (what to change, given the tokenizer; error; words in the message)
    "Trainer max_steps": (lambda tok: {"trainer": {"max_steps": 5}}, ValueError, "Trainer(max_steps=5)"),
    "Trainer max_epochs disagrees": (lambda tok: {"trainer": {"max_epochs": 3}}, ValueError,
                                     "Trainer(max_epochs=3) disagrees with ppo.steps=2"),
    "Trainer limit_train_batches": (lambda tok: {"trainer": {"limit_train_batches": 2}}, ValueError,
                                    "Trainer(limit_train_batches=2)"),
    "data batch_size disagrees": (lambda tok: {"data": PromptDataModule(PROMPTS, batch_size=8)}, ValueError,
                                  "PromptDataModule(batch_size=8) disagrees with ppo.batch_size=4"),
    "reward returns one score": (lambda tok: {"reward": lambda p, r: [1.0]}, RewardError, "shape (1,)"),
    "reward returns text": (lambda tok: {"reward": lambda p, r: ["good"] * len(r)}, RewardError, "not numbers"),
    "reward returns NaN": (lambda tok: {"reward": lambda p, r: [float("nan")] * len(r)}, RewardError, "NaN"),
    "reward takes one argument": (lambda tok: {"reward": lambda p: [1.0] * len(p)}, RewardError,
                                  "takes 1 positional"),
    "reward pair is a causal LM": (lambda tok: {"reward": (tiny_hf_model("gpt2"), tok)}, RewardError,
                                   "returned shape (2, 259)"),
    "reward label out of range": (lambda tok: {"reward": RewardModel(model=classifier(), tokenizer=tok,
                                                                     label_index=2)},
                                  ValueError, "reward.label_index=2 is out of range"),
    "own DataLoader right-padded": (lambda tok: {"loader": right_padded_loader(tok)}, ValueError, "right-padded"),
    "own DataLoader batch size": (lambda tok: {"loader": right_padded_loader(tok, 2)}, ValueError,
                                  "holds 2 prompts but ppo.batch_size=4"),
    "own DataLoader of lists": (lambda tok: {"loader": DataLoader([[5, 6, 7]] * 4, batch_size=4)}, TypeError,
                                "must be a dict with 'query_ids' and 'query_mask'"),
}


@pytest.mark.parametrize("case", SETUP_ERRORS)
def test_wrong_setting_fails_before_any_rollout(byt5, no_rollout, case):
    make, error, words = SETUP_ERRORS[case]
    spec = make(byt5)
    module = PPOModule(tiny_hf_model("gpt2"), byt5, spec.get("reward", vowels), ppo=PPO)
    fit = trainer(**spec.get("trainer", {}))
    with pytest.raises(error) as info:
        if "loader" in spec:
            fit.fit(module, train_dataloaders=spec["loader"])
        else:
            fit.fit(module, datamodule=spec.get("data", PromptDataModule(PROMPTS)))
    assert words in str(info.value)


# ---------------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("peft", [False, True])
def test_default_reference_is_the_frozen_initial_policy(byt5, peft):
    from peft import LoraConfig

    hf = tiny_hf_model("gpt2")
    initial = copy.deepcopy(hf.state_dict())
    lora = LoraConfig(r=4, target_modules=["c_attn"]) if peft else None
    module = PPOModule(hf, byt5, vowels, ppo=PPO, peft=lora)
    trainer().fit(module, datamodule=PromptDataModule(PROMPTS))  # no ReferenceModelCallback
    reference = module.reference
    ids = torch.randint(3, 259, (2, 6))
    if peft:  # no second model: the policy with its adapters disabled
        assert reference.mode == "peft" and reference.model is module.policy
        with torch.no_grad(), reference.context():
            ref_logits = module.policy(ids)[0]
        assert torch.allclose(ref_logits, tiny_hf_model("gpt2")(ids).logits, atol=1e-5)  # = the initial weights
        assert not torch.allclose(ref_logits, module.policy(ids)[0], atol=1e-4)  # ... and the policy moved
        return
    assert reference.mode == "copy" and reference.model is not module.policy
    ref_lm = {k: v for k, v in reference.model.state_dict().items() if not k.startswith("v_head.")}
    assert ref_lm.keys() == initial.keys() and all(torch.equal(ref_lm[k], initial[k]) for k in initial)
    assert not any(p.requires_grad for p in reference.model.parameters())
    assert not any(torch.equal(hf.state_dict()[k], initial[k]) for k in initial if k.endswith("c_attn.weight"))
    assert all(m is not reference.model for m in module.modules())  # not a submodule: not trained, not saved
    assert not any(k.startswith("reference") for k in module.state_dict())


def test_reference_callback_still_picks_the_mode(byt5):
    module = PPOModule(tiny_hf_model("gpt2"), byt5, vowels, ppo=PPO)
    trainer(callbacks=[ReferenceModelCallback("shared", num_shared_layers=1)]).fit(
        module, datamodule=PromptDataModule(PROMPTS))
    shared = module.reference.model.pretrained_model.transformer.h[0].attn.c_attn.weight
    assert module.reference.mode == "shared"
    assert shared.data_ptr() == module.policy.pretrained_model.transformer.h[0].attn.c_attn.weight.data_ptr()


class TargetByteEnvironment:
    """A user's own environment: it scores raw token ids (how often the response hits a target byte) and counts
    the episodes it has seen."""

    def __init__(self, target_id):
        self.target_id, self.episodes, self.scores = target_id, 0, []

    def step(self, response_ids, response_mask):
        self.episodes += len(response_ids)
        hits = ((response_ids == self.target_id) & response_mask.bool()).sum(1).float()
        self.scores.append(hits / response_mask.sum(1).clamp_min(1))
        return self.scores[-1]


def test_subclass_scores_rollouts_with_its_own_environment(tmp_path, byt5):
    class EnvPPO(PPOModule):
        def __init__(self, *args, environment, **kwargs):
            super().__init__(*args, **kwargs)
            self.environment = environment

        def score_rollout(self, rollout):
            return self.environment.step(rollout.response_ids, rollout.response_mask)

    environment = TargetByteEnvironment(byt5.convert_tokens_to_ids("e"))
    module = EnvPPO(tiny_hf_model("gpt2"), byt5, None, ppo={**PPO, "steps": 3}, environment=environment)
    logger = CSVLogger(tmp_path)
    trainer(logger=logger).fit(module, datamodule=PromptDataModule(PROMPTS))
    assert environment.episodes == 3 * PPO["batch_size"]
    logged = [float(row["env/reward_mean"]) for row in read_rows(logger)]
    assert logged == pytest.approx([float(s.mean()) for s in environment.scores], abs=1e-7)


def test_environment_scores_of_the_wrong_shape_name_the_subclass(byt5, no_rollout, monkeypatch):
    class Bad(PPOModule):
        def score_rollout(self, rollout):
            return torch.zeros(len(rollout.query_ids), 2)

    from lit_vhead.rollout import Rollout

    class Echo(HFGeneration):  # responses = the prompts: scoring is what this test is about
        def generate(self, model, query_ids, query_mask, *args, **kwargs):
            return Rollout(query_ids, query_mask, query_ids, query_mask)

    module = Bad(tiny_hf_model("gpt2"), byt5, None, ppo=PPO, generation=Echo())
    with pytest.raises(RewardError, match=r"Bad.score_rollout returned shape \(4, 2\)"):
        trainer().fit(module, datamodule=PromptDataModule(PROMPTS))


def test_plain_trainer_runs_ppo_steps_and_logs_every_step(tmp_path, byt5):
    """Trainer() with no max_epochs/log_every_n_steps: exactly ppo.steps PPO steps, each one logged (TRL names)."""
    steps = 3
    batches = Batches(byt5)
    logger = CSVLogger(tmp_path)
    fit = L.Trainer(accelerator="cpu", logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                    callbacks=[batches])
    fit.fit(PPOModule(tiny_hf_model("gpt2"), byt5, vowels, ppo={**PPO, "steps": steps}),
            datamodule=PromptDataModule(PROMPTS))
    assert fit.current_epoch == steps and len(batches.prompts) == steps
    rows = read_rows(logger)
    assert [int(float(r["ppo/step"])) for r in rows] == list(range(steps))
    for name in TRL_METRICS:
        assert all(r[name] != "" for r in rows), name


def test_fast_dev_run_takes_one_ppo_step(byt5):
    batches = Batches(byt5)
    fit = trainer(fast_dev_run=True, callbacks=[batches])
    fit.fit(PPOModule(tiny_hf_model("gpt2"), byt5, vowels, ppo=PPO), datamodule=PromptDataModule(PROMPTS))
    assert len(batches.prompts) == 1 and fit.global_step == PPO["ppo_epochs"] * 2  # a whole PPO step: 2 minibatches


def test_own_dataloader_of_many_batches_still_takes_ppo_steps(byt5):
    """A user's DataLoader with several batches: each PPO step (epoch) takes one batch, ppo.steps in all."""
    ids = [byt5(f"prompt number {i}", add_special_tokens=False)["input_ids"] for i in range(16)]
    loader = DataLoader(ids, batch_size=4, shuffle=True, collate_fn=lambda b: collate_prompts(b, 0, "left"))
    batches = Batches(byt5)
    fit = trainer(callbacks=[batches])
    fit.fit(PPOModule(tiny_hf_model("gpt2"), byt5, vowels, ppo={**PPO, "steps": 3}), train_dataloaders=loader)
    assert fit.current_epoch == 3 and len(batches.prompts) == 3


def test_save_pretrained_after_fit_reloads_with_the_same_outputs(tmp_path, byt5):
    module = PPOModule(tiny_hf_model("gpt2"), byt5, vowels, ppo=PPO)
    trainer().fit(module, datamodule=PromptDataModule(PROMPTS))
    module.policy.save_pretrained(tmp_path / "policy")
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "policy").eval()
    ids = torch.randint(3, 259, (2, 7))
    with torch.no_grad():
        logits, _, values = module.policy.eval()(ids)
        new_logits, _, new_values = reloaded(ids)
    assert torch.equal(logits, new_logits) and torch.equal(values, new_values)
    fresh = tiny_hf_model("gpt2")(ids).logits
    assert not torch.allclose(new_logits, fresh, atol=1e-4)  # the trained weights, not the initial ones


def test_checkpoints_and_exact_resume(tmp_path, byt5):
    """ModelCheckpoint + trainer.fit(ckpt_path=...): steps 2-3 of a resumed run equal the uninterrupted run's."""

    def run(name, steps, ckpt_path=None):
        torch.manual_seed(0)  # the same initial policy (and so the same reference) in every run
        module = PPOModule(tiny_hf_model("gpt2"), byt5, vowels, ppo={**PPO, "steps": steps})
        logger = CSVLogger(tmp_path / name)
        checkpoints = ModelCheckpoint(dirpath=tmp_path / name / "ckpt", every_n_epochs=1, save_top_k=-1,
                                      save_last=True)
        fit = trainer(logger=logger, enable_checkpointing=True, callbacks=[checkpoints])
        fit.fit(module, datamodule=PromptDataModule(PROMPTS), ckpt_path=ckpt_path)
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in read_rows(logger)], module

    full, full_module = run("full", 4)
    first, _ = run("killed", 2)
    names = sorted(p.name for p in (tmp_path / "killed" / "ckpt").iterdir())
    assert [n.split("-")[0] for n in names] == ["epoch=0", "epoch=1", "last.ckpt"]  # one per PPO step, plus last
    resumed, resumed_module = run("resumed", 4, ckpt_path=tmp_path / "killed" / "ckpt" / "last.ckpt")
    assert first == full[:2] and resumed == full[2:]  # every metric of every step, as CSV text
    trained = resumed_module.policy.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in full_module.policy.state_dict().items())
    assert resumed_module.kl_ctl.value == full_module.kl_ctl.value


def test_resume_with_another_initial_model_is_a_clear_error(tmp_path, byt5, monkeypatch):
    """The reference is rebuilt from the initial policy, never saved: resuming from a differently initialised model
    object would silently change the KL target, so it fails before any rollout."""
    first = PPOModule(tiny_hf_model("gpt2", seed=0), byt5, vowels, ppo=PPO)
    trainer(enable_checkpointing=True, default_root_dir=tmp_path).fit(first, datamodule=PromptDataModule(PROMPTS))
    ckpt = next(tmp_path.rglob("*.ckpt"))
    forbid_rollouts(monkeypatch)
    resumed = PPOModule(tiny_hf_model("gpt2", seed=1), byt5, vowels, ppo={**PPO, "steps": 4})
    with pytest.raises(ValueError, match="resume with the same initial model"):
        trainer().fit(resumed, datamodule=PromptDataModule(PROMPTS), ckpt_path=ckpt)


# ---------------------------------------------------------------------------------------------- multi-process
DDP_PRELUDE = textwrap.dedent('''
    import json, os, sys
    import lightning as L
    import torch

    class RankReport(L.Callback):
        """Each rank writes what it did: PPO steps, prompts seen, a checksum of the trained policy."""
        prompts = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.prompts.append(batch["query_ids"].tolist())

        def on_train_end(self, trainer, pl_module):
            params = [float(p.double().sum()) for p in pl_module.policy.parameters()]
            report = {"rank": trainer.global_rank, "world": trainer.world_size, "steps": len(self.prompts),
                      "prompts": self.prompts, "params": params}
            with open(f"rank{trainer.global_rank}.json", "w") as f:
                json.dump(report, f)
''')


@pytest.mark.slow
def test_readme_script_trains_on_two_ddp_ranks(tmp_path):
    """The README's Python script with Trainer(strategy="ddp", devices=2), run as a standalone script (real ddp
    re-executes it for rank 1): both ranks take every PPO step on their own prompts and end with equal weights."""
    from test_readme import python_from_python_section

    script, _ = python_from_python_section()
    trainer_line = next(line for line in script.splitlines() if line.startswith("trainer = L.Trainer("))
    ddp_line = trainer_line.replace("L.Trainer(", 'L.Trainer(strategy="ddp", devices=2, ', 1)
    script = script.replace(trainer_line, ddp_line).replace("steps=30,", "steps=8,")  # fewer steps, same script
    script = script.replace("callbacks=[", "callbacks=[RankReport(), ", 1)
    (tmp_path / "ppo_ddp.py").write_text(DDP_PRELUDE + script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "ppo_ddp.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    steps = 8
    assert [r["world"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [steps, steps]
    assert ranks[0]["params"] == ranks[1]["params"]  # DDP kept the replicas identical
    assert all(a != b for a, b in zip(ranks[0]["prompts"], ranks[1]["prompts"]))  # each rank drew its own prompts
    assert "reward:" in result.stdout and (tmp_path / "ppo-policy" / "model.safetensors").is_file()
