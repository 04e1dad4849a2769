"""lit_vhead's one change to transformers' code (its load report must not call our ``v_head.*`` tensors UNEXPECTED)
lives only inside our own ``from_pretrained``: afterwards, and around it, transformers is as it was."""

import pytest
import torch
import transformers
from conftest import tiny_hf_model
from safetensors.torch import load_file
from transformers import PreTrainedModel

from lit_vhead import AutoModelForCausalLMWithValueHead

HOOK = "_adjust_missing_and_unexpected_keys"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("vhead")
    AutoModelForCausalLMWithValueHead.from_pretrained(tiny_hf_model("gpt2")).save_pretrained(path)
    assert any(k.startswith("v_head.") for k in load_file(path / "model.safetensors"))
    return path


def test_loading_our_checkpoint_leaves_transformers_as_it_was(saved):
    original = PreTrainedModel.__dict__[HOOK]
    model = AutoModelForCausalLMWithValueHead.from_pretrained(saved)
    assert model.v_head.summary.weight.shape[1] == 32
    assert PreTrainedModel.__dict__[HOOK] is original


def test_a_plain_transformers_load_still_reports_the_value_head_as_unexpected(saved):
    """Outside our ``from_pretrained`` (before and after one), transformers' own report is untouched."""
    for _ in range(2):
        _, info = transformers.AutoModelForCausalLM.from_pretrained(saved, output_loading_info=True)
        assert {k for k in info["unexpected_keys"] if k.startswith("v_head.")} == {"v_head.summary.weight",
                                                                                   "v_head.summary.bias"}
        AutoModelForCausalLMWithValueHead.from_pretrained(saved)


def test_a_load_that_fails_leaves_transformers_as_it_was(saved, tmp_path):
    original = PreTrainedModel.__dict__[HOOK]
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    weights = load_file(saved / "model.safetensors")
    weights["transformer.wte.weight"] = torch.zeros(3, 3)  # a shape transformers refuses
    from safetensors.torch import save_file

    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception) as failure:  # noqa: B017 (whatever transformers raises for it)
        AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    assert any("modeling_utils" in str(entry.path) for entry in failure.traceback)  # raised inside the hook's block
    assert PreTrainedModel.__dict__[HOOK] is original
