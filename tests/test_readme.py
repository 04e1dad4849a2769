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
from lit_vhead.run import train

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
    if "<old_run_dir>" in command:  # the resume line, as written (plus more steps): the run's own config is used
        first = FAST + ["callbacks=default", "callbacks.progress_bar=null", "model=tiny-llama", "peft=lora", "ref=peft"]
        train(compose(first, tmp_path))
        cfg = compose([a for a in args if not a.startswith("hydra.")] + ["ppo.steps=6"], tmp_path)
        metrics = train(cfg)
        assert_run_outputs(tmp_path, compose(first + ["ppo.steps=6"], tmp_path / "probe"), metrics)
        return
    fast = [o for o in FAST if o.split("=")[0] not in {a.split("=")[0] for a in args}]
    if "my_reward." in command:  # a custom reward: the README's file in the directory the command runs from
        (tmp_path / "my_reward.py").write_text(readme_file("my_reward.py"))
        result = run_cli(args + fast + [f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert result.stdout.strip().splitlines()[-1].startswith("Done: 4 PPO steps")
        assert len(read_rows(tmp_path / "run")) == 4
        return
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


def readme_file(name: str) -> str:
    """The README's code block that starts with the comment ``# <name>``."""
    return next(body for lang, body in BLOCKS if body.startswith(f"# {name}\n"))


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


def printed_lines() -> list[str]:
    """The last lines the README says its two "PPO from Python" scripts print."""
    section = README.split("\n## PPO from Python\n", 1)[1].split("\n## ", 1)[0]
    return [re.search(r"`(reward: [^`]+)`", section).group(1), re.search(r"`(last step: [^`]+)`", section).group(1)]


def same_form(printed: str, claimed: str) -> bool:
    """The same line but for its figures (which depend on the CPU's kernels)."""
    return re.sub(r"-?\d+(\.\d+)?", "#", printed) == re.sub(r"-?\d+(\.\d+)?", "#", claimed)


def test_ppo_from_python_scripts_in_the_readme_run(tmp_path, monkeypatch, capfd):
    """Both scripts run as written and print what the README says, as plain lines (no model summary, no progress-bar
    escape codes or it/s): PPO learns, checkpoints are written, the saved policies reload identically."""
    from lit_vhead import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead

    monkeypatch.chdir(tmp_path)
    causal, seq2seq = python_from_python_section()
    claimed_causal, claimed_seq2seq = printed_lines()
    scope = {}
    exec(causal, scope)
    out = capfd.readouterr().out
    assert same_form(out.strip().splitlines()[-1], claimed_causal)
    progress = [line for line in out.splitlines() if line.startswith("PPO step")]
    assert [line.split(":")[0] for line in progress] == ["PPO step 10/30", "PPO step 20/30", "PPO step 30/30"]
    assert not [noise for noise in ("FLOPs", "Params", "v_num", "it/s", "\x1b[", "\r") if noise in out]
    first, last = map(float, re.search(r"reward: ([\d.]+) \(first 5 steps\) -> ([\d.]+)", out).groups())
    assert last > first + 0.5 and scope["trainer"].current_epoch == scope["ppo"].steps
    assert list((tmp_path / "logs").glob("lightning_logs/version_0/checkpoints/*.ckpt"))  # Lightning's default
    ids = torch.randint(3, 259, (2, 5))
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "ppo-policy").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids)[2], scope["module"].policy.eval()(ids)[2])

    scope = {}
    exec(seq2seq, scope)
    out = capfd.readouterr().out
    assert same_form(out.strip().splitlines()[-1], claimed_seq2seq)
    assert scope["trainer"].current_epoch == scope["ppo"].steps
    assert not [noise for noise in ("FLOPs", "v_num", "it/s", "\x1b[") if noise in out]
    reloaded = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(tmp_path / "ppo-t5").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids, decoder_input_ids=ids)[2],
                           scope["module"].policy.eval()(ids, decoder_input_ids=ids)[2])


def group_table() -> dict[str, tuple[list[str], str]]:
    """The README's config-group table: ``{group: (options, what it sets)}``."""
    table = README.split("### Config groups", 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in table.splitlines()[2:]:
        groups, options, sets = (cell.strip() for cell in line.strip("|").split("|"))
        names = [re.match(r"`([\w-]+)`", o.strip()).group(1) for o in re.split(r"[,;]", options) for o in o.split("/")]
        for group in re.findall(r"`(\w+)`", groups):
            rows[group] = (names, sets)
    return rows


def test_config_group_table_lists_the_real_options():
    """Every group's options are its configs/<group>/*.yaml files (the README listed `adam` for `default`)."""
    rows = group_table()
    for group, (options, _) in rows.items():
        files = sorted(p.stem for p in (Path(ROOT) / "configs" / group).glob("*.yaml"))
        if group in ("optimizer", "scheduler"):  # one row for both: `default`/`adamw`; `none`/`linear`
            options = sorted(set(options) & set(files))
        assert sorted(options) == files, (group, options, files)
    assert {p.name for p in (Path(ROOT) / "configs").iterdir() if p.is_dir()} - set(rows) == {"hydra", "paths"}


@pytest.mark.parametrize("group", ["model", "data", "ref"])
def test_config_group_table_names_real_keys(tmp_path, group):
    """Each key the table names for a group is a key of one of its options (or a value they set, like byt5): the
    README listed `data.path` (the key is `prompts`) and `model.gradient_checkpointing` (a ppo setting)."""
    from omegaconf import OmegaConf

    options, sets = group_table()[group]
    known = set()
    for option in options:
        node = OmegaConf.to_container(compose([f"{group}={option}"], tmp_path)[group], resolve=False)
        known |= set(node) | {str(v) for v in node.values() if not isinstance(v, dict)}
    named = [word for word in re.findall(r"`([a-z_0-9]+)`", sets)]
    assert named and [word for word in named if word not in known] == []


def test_readme_lists_every_built_in_reward_function_with_its_signature():
    import inspect

    import lit_vhead.rewards as rewards

    def shown(fn) -> str:
        params = [p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
                  for p in inspect.signature(fn).parameters.values()]
        return f"`{fn.__name__}({', '.join(params)})`"

    functions = [fn for name, fn in inspect.getmembers(rewards, inspect.isfunction)
                 if fn.__module__ == rewards.__name__ and list(inspect.signature(fn).parameters)[:2] == ["prompts",
                                                                                                          "responses"]]
    assert {fn.__name__ for fn in functions} == {"even_token_fraction", "character_fraction"}
    section = README.split("\n### Rewards\n", 1)[1].split("\n### ", 1)[0]
    assert [shown(fn) for fn in functions if shown(fn) not in section] == []
