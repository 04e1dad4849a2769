"""The repository itself: it points only at files it has (nothing outside the checkout, which a clone may not have
beside it), test helpers do not look like test files, and each config default has one source."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, compose

from lit_vhead.config import HeadConfig, PPOConfig
from lit_vhead.ppo import KL_PENALTY_KINDS

TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".ipynb", ".txt", ".cfg"}
# A path to a document or data file written in prose or code: docs/x.md, data/y.json, tests/data/...
POINTER = re.compile(r"(?<![\w/.])((?:\.\./shared/)?(?:docs|data|seed)/[\w./-]+\.(?:md|json|txt))")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [Path(ROOT, n) for n in names.splitlines() if Path(n).suffix in TEXT_SUFFIXES and Path(ROOT, n).is_file()]


def test_every_document_the_repo_points_at_exists():
    missing = []
    for file in tracked_text_files():
        text = file.read_text(errors="ignore")
        if file == Path(__file__):
            continue
        assert "/work/" not in text, f"{file} points at this machine's /work/ tree; use a path relative to the repo"
        assert "../shared" not in text, f"{file} points outside the repository (../shared); cite or vendor instead"
        for pointer in POINTER.findall(text):
            candidates = [Path(ROOT, pointer), file.parent / pointer, Path(ROOT, "tests", pointer)]
            if not any(c.exists() for c in candidates):
                missing.append(f"{file.relative_to(ROOT)}: {pointer}")
    assert missing == []


def test_test_helpers_do_not_look_like_test_files():
    names = sorted(p.name for p in Path(ROOT, "tests").glob("*.py"))
    odd = [n for n in names if n != "conftest.py" and not n.startswith(("test_", "helpers_"))]
    assert odd == [] and not [n for n in names if n.startswith("tests_")]


def schema_defaults(schema) -> dict:
    return {name: getattr(schema(), name) for name in schema.__dataclass_fields__}


@pytest.mark.parametrize("group, schema", [("head", HeadConfig), ("ppo", PPOConfig)])
def test_config_yaml_states_only_what_differs_from_the_schema(group, schema):
    """configs/<group>/default.yaml restates no default of its schema (one source per default)."""
    stated = yaml.safe_load(Path(ROOT, "configs", group, "default.yaml").read_text())
    stated.pop("defaults")
    defaults = schema_defaults(schema)
    restated = {k: v for k, v in stated.items() if k in defaults and defaults[k] == v}
    assert restated == {}
    assert set(stated) <= set(defaults)


def test_head_defaults_are_the_model_classes_own(tmp_path):
    """HeadConfig's defaults give the same head as from_pretrained without head arguments."""
    import torch
    from conftest import tiny_hf_model

    from lit_vhead import AutoModelForCausalLMWithValueHead
    from lit_vhead.builders import wrap_policy

    bases = [tiny_hf_model("gpt2"), tiny_hf_model("gpt2")]
    for base in bases:
        base.config.summary_dropout_prob = 0.3  # a config's dropout is used unless the user sets one
    torch.manual_seed(0)
    plain = AutoModelForCausalLMWithValueHead.from_pretrained(bases[0])
    torch.manual_seed(0)
    configured = wrap_policy(bases[1], compose([], tmp_path).head)
    assert plain.v_head.dropout.p == configured.v_head.dropout.p == 0.3
    assert torch.equal(plain.v_head.summary.weight, configured.v_head.summary.weight)


def test_paths_group_holds_only_what_is_used(tmp_path):
    assert set(compose([], tmp_path).paths) == {"output_dir"}


def test_kl_estimators_are_listed_once_and_the_readme_agrees(tmp_path):
    from lit_vhead.config import KLPenalty

    assert [k.value for k in KLPenalty] == list(KL_PENALTY_KINDS)
    readme = Path(ROOT, "README.md").read_text()
    listed = re.search(r"`ppo\.kl_penalty`: ([a-z0-9, ]+)\)", readme).group(1)
    assert [k.strip() for k in listed.split(",")] == list(KL_PENALTY_KINDS)



# A key written as a command-line override (`group.key=value`) in the README, the configs' comments, or the code's
# messages and docstrings; `+key=` adds a key on purpose and is not checked.
OVERRIDE = re.compile(r"(?<![\w.+{/-])((?:ppo|head|data|model|reward|ref|trainer|logger|optimizer|scheduler|peft|"
                      r"callbacks|paths)(?:\.[A-Za-z_]\w*)+)=")


def override_keys() -> dict[str, list[str]]:
    files = [Path(ROOT, "README.md"), *Path(ROOT, "configs").rglob("*.yaml"), *Path(ROOT, "lit_vhead").rglob("*.py")]
    found: dict[str, list[str]] = {}
    for file in files:
        for key in OVERRIDE.findall(file.read_text()):
            found.setdefault(key, []).append(str(file.relative_to(ROOT)))
    return found


def test_every_key_the_docs_tell_users_to_override_exists(tmp_path):
    """e.g. ``data.path=`` in an experiment's comment, where the key is ``data.prompts``: each key exists in the
    composed config with one of its group's options (``reward.name_or_path`` with ``reward=model``)."""
    from omegaconf import OmegaConf

    def keys(node, prefix=""):
        out = set()
        for k, v in node.items():
            if prefix or k != "hydra":
                out.add(prefix + str(k))
                if isinstance(v, dict):
                    out |= keys(v, f"{prefix}{k}.")
        return out

    def composed(overrides):
        return OmegaConf.to_container(compose(overrides, tmp_path), resolve=False)

    known = keys(composed([]))
    for group in ("model", "reward", "ref", "trainer", "logger", "optimizer", "scheduler", "peft", "callbacks"):
        for option in Path(ROOT, "configs", group).glob("*.yaml"):
            known |= keys(composed([f"{group}={option.stem}"]))
    named = override_keys()
    assert len(named) > 20  # the scan finds the README's examples
    assert {key: files for key, files in named.items() if key not in known} == {}
