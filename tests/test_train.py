"""PPO through train(cfg) and the CLI: real Lightning runs of real steps on tiny models."""

import copy
import csv
import os
import re
import subprocess
import sys
import warnings

import lightning as L
import pytest
import torch
from conftest import FAST, ROOT, compose, tiny_hf_model
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

import lit_vhead.module
from lit_vhead import AutoModelForCausalLMWithValueHead
from lit_vhead.builders import ModelNotFoundError
from lit_vhead.ppo import KL_PENALTY_KINDS
from lit_vhead.rewards import RewardError
from lit_vhead.run import main, train

TRL_METRICS = [
    "env/reward_mean", "env/reward_std", "objective/kl", "objective/kl_coef", "objective/entropy",
    "ppo/loss/policy", "ppo/loss/value", "ppo/policy/clipfrac", "ppo/policy/approxkl", "ppo/val/var_explained",
    "ppo/returns/mean", "tokens/responses_len_mean", "time/ppo/total",
]


def read_csv(run_dir):
    with open(os.path.join(run_dir, "csv", "metrics.csv")) as f:
        return list(csv.DictReader(f))


def run_cli(args, cwd, env_extra=None, timeout=300, unset=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    env = {k: v for k, v in env.items() if k not in unset}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "train.py"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


class RecordInitialPolicy(L.Callback):
    """Keeps a copy of the policy's weights as fit starts, and the reference object the module holds."""

    def on_fit_start(self, trainer, pl_module):
        self.initial = copy.deepcopy({k: v.detach().clone() for k, v in pl_module.policy.state_dict().items()})


def fit_with(cfg, extra_callbacks):
    """train() with extra callbacks appended (the config's callbacks group is a dict of _target_ nodes)."""
    original = lit_vhead.run._instantiate_dict

    def instantiate(node):
        made = original(node)
        return made + extra_callbacks if node is cfg.get("callbacks") else made

    lit_vhead.run._instantiate_dict = instantiate
    try:
        return train(cfg)
    finally:
        lit_vhead.run._instantiate_dict = original


# Third-party console output that tells a user of `python train.py` nothing (issue 11, item 6).
NOISE = ["litlogger", "anonymous setting", "LeafSpec", "Writing model shards", "Loading weights", "LOAD REPORT",
         "Previous log files", "\x1b[", "v_num", "it/s", "\r"]


@pytest.mark.slow
def test_default_cli_learns_and_saves_a_loadable_policy(tmp_path):
    """`python train.py`, as the README runs it: offline, PPO visibly learns, the policy is saved with its head, and
    the run ends with one line saying so, with no third-party noise."""
    result = run_cli([f"hydra.run.dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rewards = [float(r["env/reward_mean"]) for r in read_csv(tmp_path)]
    assert len(rewards) == 100
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.5, (first, last)
    summary = result.stdout.strip().splitlines()[-1]
    final_kl = float(read_csv(tmp_path)[-1]["objective/kl"])
    assert summary == (
        f"Done: 100 PPO steps, env/reward_mean {first:.4g} -> {last:.4g} (mean of the first/last 10), final "
        f"objective/kl {final_kl:.4g}. Outputs in {tmp_path}: policy/, csv/metrics.csv, curves.png, checkpoints/, "
        "wandb/, metrics.json"
    )
    output = result.stdout + result.stderr
    assert [noise for noise in NOISE if noise in output] == []
    progress = [line for line in result.stdout.splitlines() if line.startswith("PPO step ")]
    assert [line.split(":")[0] for line in progress] == [f"PPO step {k}/100" for k in range(10, 101, 10)]
    assert all(re.fullmatch(r"PPO step \d+/100: reward [\d.]+, kl -?[\d.e-]+ \([\d.]+ s/step\)", p) for p in progress)
    readme_line = re.search(r"```text\n(Done: .*)\n```", open(os.path.join(ROOT, "README.md")).read()).group(1)
    assert summary.replace(str(tmp_path), "outputs/ppo/runs/<date>_<time>") == readme_line  # the README's figures
    assert not (tmp_path / "train.log").exists()  # Hydra's job log stayed empty: not written at all
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "policy")
    assert policy.v_head.summary.weight.shape == (1, 64)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_seq2seq_ppo_runs_from_the_cli(tmp_path):
    args = ["model=tiny-t5", "ppo.steps=3", "ppo.batch_size=8", "ppo.mini_batch_size=4", "logger=csv",
            f"hydra.run.dir={tmp_path}"]
    result = run_cli(args, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_csv(tmp_path)
    assert len(rows) == 3 and all(float(r["tokens/responses_len_mean"]) > 0 for r in rows)
    from lit_vhead import AutoModelForSeq2SeqLMWithValueHead

    assert AutoModelForSeq2SeqLMWithValueHead.from_pretrained(tmp_path / "policy").is_encoder_decoder


@pytest.mark.slow
def test_missing_real_checkpoint_without_network_gives_one_error_line(tmp_path):
    """`python train.py model=gpt2 head.init=normal` on a machine without network and WITHOUT HF_HUB_OFFLINE: one
    `Error:` line naming the fixes, no traceback, no retry logs, and no run dir left behind. HF_ENDPOINT points at
    a closed local port, so the hub is out of reach on any machine."""
    result = run_cli(["model=gpt2", "head.init=normal", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                     env_extra={"HF_HOME": str(tmp_path / "empty_hf_home"), "HF_ENDPOINT": "http://127.0.0.1:9"},
                     unset=("HF_HUB_OFFLINE",))
    assert result.returncode == 1
    output = (result.stdout + result.stderr).strip().splitlines()
    assert "Traceback" not in "\n".join(output) and len(output) <= 15, output
    error_lines = [line for line in output if line.startswith("Error:")]
    assert len(error_lines) == 1, output
    assert "model.name_or_path=<local dir>" in error_lines[0] and "HF_HUB_OFFLINE" in error_lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_command_that_fails_validation_leaves_no_run_dir(tmp_path):
    result = run_cli(["ppo.batch_size=10", "ppo.mini_batch_size=4"], cwd=tmp_path)
    assert result.returncode == 1 and "Error: ppo.batch_size=10" in result.stdout
    assert list(tmp_path.iterdir()) == []  # not even outputs/ppo/runs/


@pytest.mark.slow
def test_help_describes_the_project_and_offers_only_real_options(tmp_path):
    result = run_cli(["--help"], cwd=tmp_path)
    assert result.returncode == 0
    assert "TRL's value-head models and TRL-classic PPO" in result.stdout
    groups = result.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    assert "head: default\n" in groups and "ppo: default\n" in groups and "schema" not in groups
    ppo = result.stdout.split("\nppo:\n")[1].split("\ndata:\n")[0]  # the ppo group's keys, as --help lists them
    assert "learning_rate: 0.0001" in ppo and "generation:" in ppo
    trl_only = ("model_name", "query_dataset", "reward_model", "log_with", "tracker_project_name", "world_size",
                "backward_batch_size", "is_encoder_decoder", "is_peft_model", "accelerator_kwargs")
    assert [name for name in trl_only if f"  {name}:" in ppo] == []


def test_logs_trl_metric_names_every_ppo_step(tmp_path):
    train(compose(FAST, tmp_path))
    rows = read_csv(tmp_path)
    assert [int(float(r["ppo/step"])) for r in rows] == [0, 1, 2, 3]
    for name in TRL_METRICS:
        assert all(r[name] != "" for r in rows), name


@pytest.mark.parametrize("mode", ["copy", "shared", "peft"])
def test_reference_modes_stay_frozen_at_the_initial_policy(tmp_path, mode):
    overrides = {"copy": ["ref=copy"], "shared": ["ref=shared", "ref.num_shared_layers=1"],
                 "peft": ["ref=peft", "peft=lora"]}[mode]
    cfg = compose(FAST + overrides, tmp_path)
    recorder = RecordInitialPolicy()
    captured = {}
    original = lit_vhead.module.PPOModule.on_train_end

    def keep(module):
        captured["module"] = module

    lit_vhead.module.PPOModule.on_train_end = keep
    try:
        fit_with(cfg, [recorder])
    finally:
        lit_vhead.module.PPOModule.on_train_end = original
    module = captured["module"]
    policy, reference = module.policy, module.reference
    trained = policy.state_dict()
    assert any(not torch.equal(trained[k], recorder.initial[k]) for k in trained if "v_head" not in k) or mode == "peft"
    if mode == "peft":
        assert reference.model is policy  # no second model at all
        ids = torch.randint(3, 259, (2, 6))
        with reference.context():
            ref_logits = policy(ids)[0]
        assert not torch.equal(ref_logits, policy(ids)[0])  # the trained adapters change the policy...
        base = {k: v for k, v in policy.pretrained_model.state_dict().items() if "lora" not in k}
        assert all(torch.equal(v, policy.pretrained_model.state_dict()[k]) for k, v in base.items())
        return
    ref_state = {k: v for k, v in reference.model.state_dict().items()}
    assert ref_state.keys() == recorder.initial.keys()
    assert all(torch.equal(ref_state[k], recorder.initial[k]) for k in ref_state)
    assert not any(p.requires_grad for p in reference.model.parameters())
    if mode == "shared":
        ref_h0 = reference.model.pretrained_model.transformer.h[0].attn.c_attn.weight
        pol_h0 = policy.pretrained_model.transformer.h[0].attn.c_attn.weight
        assert ref_h0.data_ptr() == pol_h0.data_ptr() and not pol_h0.requires_grad


def test_resume_restores_policy_and_never_rebuilds_the_reference_from_it(tmp_path):
    first = compose(FAST + ["callbacks=default", "callbacks.model_checkpoint.every_n_epochs=1"], tmp_path)
    recorder = RecordInitialPolicy()
    fit_with(first, [recorder])
    captured = {}
    original = lit_vhead.module.PPOModule.on_train_end
    lit_vhead.module.PPOModule.on_train_end = lambda module: captured.setdefault("module", module)
    try:
        resumed = compose(FAST + ["callbacks=default", "ppo.steps=6", "ckpt_path=last"], tmp_path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(resumed)
    finally:
        lit_vhead.module.PPOModule.on_train_end = original
    module = captured["module"]
    reference = module.reference.model.state_dict()
    assert all(torch.equal(reference[k], recorder.initial[k]) for k in reference)
    assert [int(float(r["ppo/step"])) for r in read_csv(tmp_path)] == [0, 1, 2, 3, 4, 5]  # history kept on resume
    false_alarms = ("Previous log files", "exists and is not empty")  # nothing is deleted on resume
    assert not [str(w.message) for w in caught if any(alarm in str(w.message) for alarm in false_alarms)]


@pytest.mark.parametrize("kind", KL_PENALTY_KINDS)
def test_every_kl_estimator_trains(tmp_path, kind):
    metrics = train(compose(FAST + [f"ppo.kl_penalty={kind}", "ppo.steps=2"], tmp_path))
    assert torch.isfinite(torch.tensor(metrics["objective/kl"]))
    if kind in ("abs", "mse", "full", "k3"):
        assert metrics["objective/kl"] >= 0


def test_reward_model_from_a_local_dir(tmp_path, byt5):
    from conftest import TINY_CONFIGS
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(**TINY_CONFIGS["gpt2"], num_labels=2, pad_token_id=0)
    rm_dir = tmp_path / "rm"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(rm_dir)
    byt5.save_pretrained(rm_dir)
    metrics = train(compose(FAST + ["reward=model", f"reward.name_or_path={rm_dir}", "reward.label_index=1"],
                            tmp_path / "run"))
    assert metrics["env/reward_std"] > 0


def save_reward_adapter(base_dir, adapter_dir) -> None:
    """A sequence-classification LoRA trained (here: initialised) on the base saved in ``base_dir``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
    get_peft_model(rm, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["c_attn"])).save_pretrained(adapter_dir)


def test_reward_adapter_on_the_same_base(tmp_path, recwarn):
    """The README recipe: the policy is built from the base the reward adapter was trained on."""
    from lit_vhead.builders import build_policy

    default_model = compose(FAST, tmp_path / "probe").model  # the default tiny-gpt2's architecture
    build_policy(default_model).pretrained_model.save_pretrained(tmp_path / "base")
    save_reward_adapter(tmp_path / "base", tmp_path / "reward_adapter")
    metrics = train(compose(FAST + ["peft=lora", "peft.target_modules=[c_attn]", "reward=adapter",
                                    f"reward.adapter_path={tmp_path / 'reward_adapter'}",
                                    f"model.name_or_path={tmp_path / 'base'}"], tmp_path / "run"))
    assert metrics["env/reward_std"] > 0
    assert not [w for w in recwarn if "reward adapter" in str(w.message)]  # its own base: nothing to warn about


def test_reward_adapter_of_another_base_warns_and_one_that_does_not_fit_fails(tmp_path):
    """The README recipe without model.name_or_path: the adapter would land on a random tiny model."""
    from conftest import TINY_CONFIGS
    from transformers import AutoConfig, AutoModelForCausalLM

    default_model = compose(FAST, tmp_path / "probe").model
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**default_model.config)).save_pretrained(tmp_path / "base")
    save_reward_adapter(tmp_path / "base", tmp_path / "same_shapes")
    adapter = ["peft=lora", "peft.target_modules=[c_attn]", "reward=adapter"]
    with pytest.warns(UserWarning, match=r"trained on base .*/base'.*built from a config.*model.name_or_path="):
        train(compose(FAST + adapter + [f"reward.adapter_path={tmp_path / 'same_shapes'}"], tmp_path / "run1"))
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_CONFIGS["gpt2"])).save_pretrained(tmp_path / "other")
    save_reward_adapter(tmp_path / "other", tmp_path / "other_shapes")  # hidden 32, the policy's is 64
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="does not fit the policy.*size mismatch"):
        train(compose(FAST + adapter + [f"reward.adapter_path={tmp_path / 'other_shapes'}"], tmp_path / "run2"))


@pytest.mark.parametrize("model, task_type",
                         [("tiny-gpt2", "CAUSAL_LM"), ("tiny-llama", "CAUSAL_LM"), ("tiny-t5", "SEQ_2_SEQ_LM")])
def test_lora_task_type_and_fan_in_fan_out_follow_the_model(tmp_path, model, task_type):
    """configs/peft/lora.yaml leaves task_type and fan_in_fan_out null: each policy gets its own, and peft has
    nothing to warn about (it warned "fan_in_fan_out is set to False but the target module is Conv1D" on GPT-2)."""
    import hydra

    from lit_vhead.builders import build_policy

    cfg = compose([f"model={model}", "peft=lora"], tmp_path)
    assert cfg.peft.task_type is None and cfg.peft.fan_in_fan_out is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy = build_policy(cfg.model, peft_config=hydra.utils.instantiate(cfg.peft))
    lora = policy.pretrained_model.peft_config["default"]
    assert lora.task_type == task_type
    assert lora.fan_in_fan_out == (model == "tiny-gpt2")  # GPT-2's Conv1D layers store their weights transposed
    assert not [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)]


@pytest.mark.parametrize("choice, optimizer_class", [("default", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_optimizer_default_is_trls_adam_at_the_ppo_learning_rate(tmp_path, choice, optimizer_class):
    """configs/optimizer/default.yaml sets nothing: the one default is the core's (TRL's Adam at ppo.learning_rate)."""
    class Keep(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.optimizer = trainer.optimizers[0]

    keep = Keep()
    fit_with(compose(FAST + ["ppo.steps=1", f"optimizer={choice}", "ppo.learning_rate=3e-4"], tmp_path), [keep])
    assert type(keep.optimizer) is optimizer_class and keep.optimizer.param_groups[0]["lr"] == 3e-4


def test_missing_eos_penalty_reaches_the_scores(tmp_path):
    """Most tiny rollouts hit max_new_tokens without EOS: their scores drop by the penalty."""
    metrics = train(compose(FAST + ["ppo.steps=1", "ppo.missing_eos_penalty=5.0"], tmp_path))
    assert metrics["ppo/mean_scores"] < metrics["env/reward_mean"] - 2.5


@pytest.fixture
def no_model_built(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model was built before the bad input was reported")

    monkeypatch.setattr(lit_vhead.module, "build_policy", fail)


@pytest.mark.parametrize(
    "overrides, error, words",
    [
        (["ref=shared", "ref.num_shared_layers=2"], ValueError, "num_shared_layers=2 is out of range"),
        (["ref=shared", "ref.pattern='transformer.blocks.{layer}'"], ValueError, "transformer.blocks.{layer}"),
        (["ppo.batch_size=10", "ppo.mini_batch_size=4"], ValueError, "ppo.batch_size=10 is not divisible"),
        (["model.name_or_path=/nonexistent/ckpt"], ModelNotFoundError, "/nonexistent/ckpt"),
        (["reward.fn._target_=builtins.len"], RewardError, "builtins.len"),
        (["data.max_prompt_tokens=4"], ValueError, "data.max_prompt_tokens"),
        (["ckpt_path=/nonexistent.ckpt"], FileNotFoundError, "/nonexistent.ckpt"),
        (["trainer.precision=16-mixed"], ValueError, "trainer.precision=16-mixed (fp16 autocast) needs a GPU"),
        (["model.dtype=foo"], ValueError, "model.dtype='foo' is not a torch dtype: use float32, bfloat16"),
        (["ppo.undo_dir={tmp}/a_file"], ValueError, "ppo.undo_dir='{tmp}/a_file' is not a directory"),
        (["~model.config.bos_token_id", "~model.config.eos_token_id"], ValueError,
         "The model config's bos_token_id=50256 is outside the policy's vocabulary of 259 tokens (ids 0-258): set it "
         "to a token of the vocabulary (the tokenizer's is 1; with python train.py: model.config.bos_token_id=1)."),
        (["save_pretrained_dir={tmp}/a_file/policy"], NotADirectoryError,
         "save_pretrained_dir={tmp}/a_file/policy lies under the file {tmp}/a_file: pick a directory path"),
        (["reward=function", "reward.fn._target_=no_such_module.score"], RewardError,
         "reward.fn._target_='no_such_module.score' cannot be imported (ModuleNotFoundError: No module named "
         "'no_such_module'). Its module must be importable"),
        (["+ref.num_shared_layer=1"], ValueError, "ref.num_shared_layer is not a setting of ref: did you mean "
         "ref.num_shared_layers?"),
        (["+ppo.model_name=gpt2"], ValueError, "ppo.model_name is a setting of PPOTrainer (TRL's loop in Python) "
         "that python train.py does not read; use model=<option> or model.name_or_path=<dir>."),
    ],
)
def test_bad_input_fails_before_any_model_is_built(tmp_path, no_model_built, overrides, error, words):
    (tmp_path / "a_file").write_text("not a directory")
    with pytest.raises(error, match=None) as info:
        train(compose(FAST + [o.replace("{tmp}", str(tmp_path)) for o in overrides], tmp_path))
    assert words.replace("{tmp}", str(tmp_path)) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "csv").exists()  # nothing written: no step ran


def test_a_reward_target_that_does_not_import_is_one_line_and_leaves_no_run_dir(tmp_path, capsys):
    run_dir = tmp_path / "outputs" / "run"
    (run_dir / ".hydra").mkdir(parents=True)  # as Hydra leaves it before the run starts
    with pytest.raises(SystemExit) as info:
        main(compose(FAST + ["reward=function", "reward.fn._target_=my_reward.score"], run_dir))
    assert info.value.code == 1
    assert capsys.readouterr().out.strip().splitlines() == [
        "Error: reward.fn._target_='my_reward.score' cannot be imported (ModuleNotFoundError: No module named "
        "'my_reward'). Its module must be importable: a .py file in the directory you run python train.py from, or a "
        "package on PYTHONPATH."]
    assert not run_dir.exists()


def test_a_model_config_with_special_ids_outside_its_vocabulary_fails_in_python(byt5):
    """A default GPT2Config with a smaller vocabulary keeps bos/eos 50256: PPOModule refuses it by name."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from lit_vhead import PPOModule

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=len(byt5)))
    with pytest.raises(ValueError, match=r"model config's bos_token_id=50256 is outside .* 259 tokens"):
        PPOModule(model, byt5, lambda prompts, responses, **kw: [0.0] * len(prompts))


def test_debug_fast_writes_no_checkpoint_logger_plot_or_policy(tmp_path):
    train(compose(["debug=fast"], tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "metrics.json"]


def test_progress_is_plain_lines_every_n_steps(tmp_path, capfd):
    """Not a terminal: one line per N PPO steps (and the last), no escape codes, no it/s, no logger version."""
    train(compose(FAST + ["callbacks=default", "callbacks.progress_bar.every_n_steps=3"], tmp_path))
    out = capfd.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("PPO step")]
    assert [line.split(":")[0] for line in lines] == ["PPO step 3/4", "PPO step 4/4"]
    assert all(re.fullmatch(r"PPO step \d/4: reward [\d.]+, kl -?[\d.e-]+ \([\d.]+ s/step\)", line) for line in lines)
    assert not [bad for bad in ("\x1b[", "\r", "v_num", "it/s", "Epoch ") if bad in out]


def test_progress_in_a_terminal_shows_the_current_step_in_place(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # capsys's stand-in for stdout, as a terminal
    train(compose(FAST + ["callbacks=default", "callbacks.progress_bar.every_n_steps=3"], tmp_path))
    out = capsys.readouterr().out
    assert re.search(r"^\rPPO step 1/4: [^\n]*\rPPO step 2/4: [^\n]*\rPPO step 3/4: [^\r\n]*\n", out, flags=re.M)
    assert re.search(r"^PPO step 4/4: [^\r\n]*\n", out, flags=re.M) and "\x1b[" not in out


def test_reward_adapter_without_peft_fails_before_any_model_is_built(tmp_path, no_model_built):
    save_reward_adapter_stub = tmp_path / "adapter"
    save_reward_adapter_stub.mkdir()
    (save_reward_adapter_stub / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="reward=adapter .* add peft=lora"):
        train(compose(FAST + ["reward=adapter", f"reward.adapter_path={save_reward_adapter_stub}"], tmp_path / "run"))


def test_reward_returning_wrong_shape_names_the_source(tmp_path):
    cfg = compose(FAST + ["reward=function", "reward.fn._target_=helpers_rewards.two_scores_each"], tmp_path)
    with pytest.raises(RewardError, match="helpers_rewards.two_scores_each.*shape"):
        train(cfg)


def test_existing_checkpoints_are_never_overwritten(tmp_path, no_model_built):
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="ckpt_path=last"):
        train(compose(FAST, tmp_path))
    assert ckpt.read_bytes() == b"precious"


@pytest.mark.parametrize(
    "override, message",
    [("head.init=bogus", "bogus"), ("ppo.learning_rate=abc", "abc"), ("ppo.no_such_knob=1", "no_such_knob"),
     ("ppo.kl_penalty=kl2", "kl2")],
)
def test_bad_config_values_fail_at_composition(tmp_path, override, message):
    with pytest.raises((ConfigCompositionException, ValidationError)) as info:
        compose([override], tmp_path)
    assert message in str(info.value) + str(info.value.__cause__)


def test_experiment_gpt2_imdb_on_local_stand_ins(tmp_path, byt5):
    """TRL's gpt2-imdb recipe with tiny local checkpoints in place of gpt2-imdb and distilbert-imdb."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, DistilBertConfig

    policy_dir, rm_dir = tmp_path / "gpt2-imdb", tmp_path / "distilbert-imdb"
    tiny_hf_model("gpt2").save_pretrained(policy_dir)
    byt5.save_pretrained(policy_dir)
    rm_config = DistilBertConfig(vocab_size=259, dim=32, hidden_dim=64, n_layers=1, n_heads=2, num_labels=2)
    AutoModelForSequenceClassification.from_config(rm_config).save_pretrained(rm_dir)
    byt5.save_pretrained(rm_dir)
    cfg = compose(["experiment=gpt2-imdb", f"model.name_or_path={policy_dir}", f"reward.name_or_path={rm_dir}",
                   "trainer=cpu", "ppo.steps=2", "ppo.batch_size=8", "ppo.mini_batch_size=8",
                   "data.max_prompt_tokens=64", "logger=csv", "callbacks=none", "plot=false"], tmp_path / "run")
    assert cfg.ppo.learning_rate == 1.41e-5 and cfg.reward.label_index == 1
    assert AutoConfig.from_pretrained(policy_dir).model_type == "gpt2"
    metrics = train(cfg)
    rows = read_csv(tmp_path / "run")
    assert len(rows) == 2 and all(4 <= float(r["tokens/responses_len_mean"]) <= 16 for r in rows)
    assert metrics["objective/kl_coef"] != 0.2  # the adaptive controller moved


def test_every_ppo_step_draws_its_own_prompts(tmp_path):
    from lit_vhead.data import BUILTIN_PROMPTS

    class Batches(L.Callback):
        seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append(batch["query_ids"].tolist())

    recorder = Batches()
    fit_with(compose(FAST + ["ppo.steps=3"], tmp_path), [recorder])
    assert len(recorder.seen) == 3 and len({str(b) for b in recorder.seen}) == 3
    assert all(len(b) == 8 for b in recorder.seen) and len(BUILTIN_PROMPTS) > 8


def test_peft_reference_can_be_a_named_frozen_adapter(tmp_path):
    """trl#495/#536: with an SFT adapter, the reference is that frozen adapter, not the bare base."""
    from peft import LoraConfig, get_peft_model

    from lit_vhead.builders import build_policy

    cfg = compose(FAST, tmp_path / "probe")
    torch.manual_seed(1)
    sft = get_peft_model(build_policy(cfg.model).pretrained_model, LoraConfig(r=4, target_modules=["c_attn"]))
    for name, param in sft.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)  # a non-trivial "SFT" adapter
    sft.save_pretrained(tmp_path / "sft")
    capture = {}

    class Keep(L.Callback):
        def on_train_end(self, trainer, pl_module):
            capture["module"] = pl_module

    fit_with(compose(FAST + ["peft=lora", "peft.target_modules=[c_attn]", "ref=peft", "ref.adapter_name=sft",
                             f"ref.adapter_path={tmp_path / 'sft'}"], tmp_path / "run"), [Keep()])
    module = capture["module"]
    peft_model = module.policy.pretrained_model
    assert set(peft_model.peft_config) == {"default", "sft"} and peft_model.active_adapter == "default"
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if ".sft." in n)
    ids = torch.randint(3, 259, (2, 6))
    with torch.no_grad(), module.reference.context():
        assert peft_model.active_adapter == "sft"
        ref_logits = module.policy(ids)[0]
    with torch.no_grad(), peft_model.disable_adapter():
        base_logits = module.policy(ids)[0]
    assert not torch.allclose(ref_logits, base_logits)  # the SFT adapter, not the bare base
    assert peft_model.active_adapter == "default"


def test_tensorboard_logger_gets_every_ppo_step(tmp_path):
    from test_ppo_trainer import read_tensorboard_scalars

    metrics = train(compose([*FAST, "logger=tensorboard"], tmp_path))
    scalars = read_tensorboard_scalars(tmp_path / "tensorboard")
    assert [step for step, _ in scalars["env/reward_mean"]] == [0, 1, 2, 3]
    assert scalars["objective/kl"][-1][1] == pytest.approx(metrics["objective/kl"], rel=1e-6)
