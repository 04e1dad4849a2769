"""Every command in the README runs: the set-up lines match .ci/run, each `python train.py ...` line runs (shortened
with fast overrides) and leaves its outputs, each recipe command composes with its overrides in effect, and the
migration snippet runs as written. (The "PPO from Python" and TRL-loop blocks: tests/test_readme.py's and
tests/test_ppo_trainer.py's own tests.)"""

import logging
import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, compose
from test_train import run_cli

from lit_vhead.builders import ModelNotFoundError
from lit_vhead.train import train

README = open(f"{ROOT}/README.md").read()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)


def train_commands():
    lines = [line.split("#")[0].strip() for lang, body in BLOCKS if lang == "bash" for line in body.splitlines()]
    return [line for line in lines if line.startswith("python train.py")]


def test_readme_opens_with_the_two_commands_ci_runs():
    first = BLOCKS[0][1].splitlines()
    setup_main, setup_tests = (line.split("#")[0].strip() for line in first[:2])
    assert setup_main == "pip install torch==2.13.0 && pip install -c constraints.txt -e . && python train.py"
    assert setup_tests.startswith('pip install torch==2.13.0 && pip install -c constraints.txt -e ".[dev]" && ')
    ci = open(f"{ROOT}/.ci/run").read()
    assert "pip install -q torch==2.13.0" in ci and 'pip install -q -c constraints.txt -e ".[dev]"' in ci
    assert "OMP_NUM_THREADS=1" in ci and "python -m pytest -q" in ci and setup_tests.endswith("python -m pytest -q")


def assert_run_outputs(run_dir, cfg, metrics) -> None:
    """A finished run: one CSV row per PPO step with finite rewards and KL, and a policy that reloads."""
    from test_train import read_csv

    from lit_vhead.builders import value_head_class

    rows = read_csv(run_dir)
    assert [int(float(r["ppo/step"])) for r in rows] == list(range(cfg.ppo.steps))
    values = torch.tensor([[float(r["env/reward_mean"]), float(r["objective/kl"])] for r in rows])
    assert torch.isfinite(values).all()
    assert metrics["env/reward_mean"] == pytest.approx(float(rows[-1]["env/reward_mean"]))
    policy = value_head_class(cfg.model.kind).from_pretrained(run_dir / "policy")
    assert policy.is_peft_model == bool(cfg.peft)


@pytest.mark.slow
@pytest.mark.parametrize("command", train_commands())
def test_every_train_command_in_the_readme_runs(tmp_path, command):
    args = shlex.split(command)[2:]
    if "<old_run_dir>" in command:  # the resume line: resume a run made just before
        train(compose(FAST + ["callbacks=default", "callbacks.progress_bar=null"], tmp_path))
        args = [a.replace("<old_run_dir>", str(tmp_path)) for a in args] + ["ppo.steps=6"]
    fast = [o for o in FAST if o.split("=")[0] not in {a.split("=")[0] for a in args}]
    if "-m" in args or any(a.startswith("trainer=ddp") for a in args):
        result = run_cli(args + [o.replace("ppo.steps=4", "ppo.steps=2") for o in fast]
                         + [f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "Done: 2 PPO steps" in result.stdout
        sweep = tmp_path / "sweep"
        runs = sorted(p for p in sweep.iterdir() if p.is_dir()) if "-m" in args else [tmp_path / "run"]
        for run_dir in runs:
            assert len(read_rows(run_dir)) == 2 and (run_dir / "policy" / "config.json").is_file()
        return
    overrides = [a for a in args if not a.startswith("hydra.run.dir=")]
    cfg = compose(overrides + fast, tmp_path)
    if cfg.model.name_or_path and not cfg.model.name_or_path.startswith("/"):
        with pytest.raises(ModelNotFoundError, match="model.name_or_path=<local dir>"):  # needs the HF cache
            train(cfg)
        return
    assert_run_outputs(tmp_path, cfg, train(cfg))


def read_rows(run_dir):
    from test_train import read_csv

    return read_csv(run_dir)


def test_python_example_in_the_readme_runs_as_written(tmp_path, monkeypatch, byt5, caplog):
    """The migration snippet, as written, with "gpt2" a local checkpoint of GPT-2's shape (12 layers) and tokenizer."""
    import transformers
    from conftest import TINY_CONFIGS

    config = transformers.AutoConfig.for_model(**{**TINY_CONFIGS["gpt2"], "n_layer": 12})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    byt5.save_pretrained(tmp_path / "gpt2")
    monkeypatch.chdir(tmp_path)  # "gpt2" is now that local dir, and "out" is written here
    code = next(body for lang, body in BLOCKS if lang == "python")
    scope = {}
    with caplog.at_level(logging.INFO, logger="lit_vhead.modeling"):
        exec(code, scope)
    assert "No value-head weights" in caplog.text  # said at info level: the usual start from a plain LM
    tokens = scope["inputs"]["input_ids"].shape[1]
    assert scope["logits"].shape == (1, tokens, 259) and scope["values"].shape == (1, tokens)
    shared = scope["ref"].pretrained_model.transformer.h[5].mlp.c_fc.weight
    assert shared.data_ptr() == scope["model"].pretrained_model.transformer.h[5].mlp.c_fc.weight.data_ptr()
    reloaded = type(scope["model"]).from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**scope["inputs"])[2], scope["model"].eval()(**scope["inputs"])[2])


def inline_commands():
    """`python train.py ...` commands quoted inline in the README's prose (recipes)."""
    found = re.findall(r"`(python train\.py [^`]+)`", README)
    return sorted({c for c in found if c not in train_commands() and "..." not in c})


@pytest.mark.parametrize("command", inline_commands())
def test_every_inline_command_composes_with_its_overrides_in_effect(tmp_path, command):
    """Recipe commands need GPUs or checkpoints we don't have here: each composes, and every override it names lands
    in the config (a group's chosen option, or the key's value)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    args = [re.sub(r"<\w+>", str(tmp_path), a) for a in shlex.split(command)[2:]
            if a != "-m" and not a.startswith("hydra.")]
    args = [a.split(",")[0] for a in args]  # a sweep: its first job
    cfg = compose(args, tmp_path)
    choices = HydraConfig.get().runtime.choices
    for arg in args:
        key, value = arg.split("=", 1)
        if (Path(ROOT) / "configs" / key).is_dir():
            assert choices[key] == value, (arg, choices[key])
        else:
            assert str(OmegaConf.select(cfg, key)) == value, (arg, OmegaConf.select(cfg, key))


def python_from_python_section() -> tuple[str, str]:
    """The two scripts of the README's "PPO from Python" section: a causal LM, then a seq2seq model."""
    section = README.split("\n## PPO from Python\n", 1)[1].split("\n## ", 1)[0]
    causal, seq2seq = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return causal, seq2seq


def test_ppo_from_python_scripts_in_the_readme_run(tmp_path, monkeypatch, capsys):
    """Both scripts run as written: PPO learns, checkpoints are written, the saved policies reload identically."""
    from lit_vhead import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead

    monkeypatch.chdir(tmp_path)
    causal, seq2seq = python_from_python_section()
    scope = {}
    exec(causal, scope)
    first, last = map(float, re.search(r"reward: ([\d.]+) \(first 5 steps\) -> ([\d.]+)", capsys.readouterr().out)
                      .groups())
    assert last > first + 0.5 and scope["trainer"].current_epoch == scope["ppo"].steps
    assert list((tmp_path / "logs").glob("lightning_logs/version_0/checkpoints/*.ckpt"))  # Lightning's default
    ids = torch.randint(3, 259, (2, 5))
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "ppo-policy").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids)[2], scope["module"].policy.eval()(ids)[2])

    scope = {}
    exec(seq2seq, scope)
    assert "last step: reward" in capsys.readouterr().out and scope["trainer"].current_epoch == scope["ppo"].steps
    reloaded = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(tmp_path / "ppo-t5").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids, decoder_input_ids=ids)[2],
                           scope["module"].policy.eval()(ids, decoder_input_ids=ids)[2])
