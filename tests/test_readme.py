"""Every command in the README runs: the set-up lines match .ci/run, each `python train.py ...` line runs (shortened
with fast overrides), and the Python example executes."""

import re
import shlex

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
    assert setup_main == "pip install torch==2.13.0 && pip install -e . && python train.py"
    assert setup_tests.startswith('pip install torch==2.13.0 && pip install -e ".[dev]" && ')
    ci = open(f"{ROOT}/.ci/run").read()
    assert "pip install -q torch==2.13.0" in ci and 'pip install -q -e ".[dev]"' in ci
    assert "OMP_NUM_THREADS=1" in ci and "python -m pytest -q" in ci and setup_tests.endswith("python -m pytest -q")


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
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return
    overrides = [a for a in args if not a.startswith("hydra.run.dir=")]
    cfg = compose(overrides + fast, tmp_path)
    if cfg.model.name_or_path and not cfg.model.name_or_path.startswith("/"):
        with pytest.raises(ModelNotFoundError, match="model.name_or_path=<dir>"):  # needs the HF cache
            train(cfg)
        return
    metrics = train(cfg)
    assert metrics["env/reward_mean"] > 0


def test_python_example_in_the_readme_runs(tmp_path):
    import transformers
    from conftest import TINY_CONFIGS

    config = transformers.AutoConfig.for_model(**{**TINY_CONFIGS["gpt2"], "n_layer": 8})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    code = next(body for lang, body in BLOCKS if lang == "python")
    code = code.replace('"gpt2"', repr(str(tmp_path / "gpt2"))).replace('"out"', repr(str(tmp_path / "out")))
    scope = {"input_ids": torch.randint(3, 259, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    with pytest.warns(UserWarning, match="No value-head weights"):
        exec(code, scope)
    assert scope["values"].shape == (2, 7) and (tmp_path / "out" / "model.safetensors").is_file()
    shared = scope["ref"].pretrained_model.transformer.h[5].mlp.c_fc.weight
    assert shared.data_ptr() == scope["model"].pretrained_model.transformer.h[5].mlp.c_fc.weight.data_ptr()


def inline_commands():
    """`python train.py ...` commands quoted inline in the README's prose (recipes)."""
    found = re.findall(r"`(python train\.py [^`]+)`", README)
    return sorted({c for c in found if c not in train_commands() and "..." not in c})


@pytest.mark.parametrize("command", inline_commands())
def test_every_inline_command_composes(tmp_path, command):
    """Recipe commands need GPUs or checkpoints we don't have here; their configs must still compose."""
    args = [a.replace("<dir>", str(tmp_path)).replace("<old_run_dir>", str(tmp_path))
            for a in shlex.split(command)[2:] if a != "-m" and not a.startswith("hydra.")]
    if any("," in a for a in args):
        args = [a.split(",")[0] for a in args]
    cfg = compose(args, tmp_path)
    assert cfg.ppo.steps >= 1


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
