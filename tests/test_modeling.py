"""Value-head models and checkpoints: every tiny architecture, TRL 0.29.1 compatibility both ways, PEFT, the reward
adapter, and each TRL bug that lit_vhead fixes (TRL 0.29.1's behaviour, checked against trl==0.29.1 where it is
installed)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from conftest import SEQ2SEQ, TINY_CONFIGS, VOCAB, tiny_hf_model
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lit_vhead
from lit_vhead import AutoModelForCausalLMWithValueHead as CLM
from lit_vhead import AutoModelForSeq2SeqLMWithValueHead as S2S
from lit_vhead.checkpoint import CheckpointError
from lit_vhead.value_head import ValueHead, hidden_size_of

ARCHS = list(TINY_CONFIGS)
B, T, T_DEC = 2, 5, 3


# ---------------------------------------------------------------------------------------------------- helpers
def wrapper_cls(arch: str):
    return S2S if arch in SEQ2SEQ else CLM


def hf_auto(arch: str):
    return transformers.AutoModelForSeq2SeqLM if arch in SEQ2SEQ else transformers.AutoModelForCausalLM


def make_inputs(arch: str, seed: int = 0) -> dict:
    """ids avoid 0..2 (pad / eos / bos of the tiny configs) so no model sees a special token by accident."""
    g = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(3, VOCAB, (B, T), generator=g)}
    if arch in SEQ2SEQ:
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (B, T_DEC), generator=g)
    return inputs


def load_quiet(cls, *args, **kwargs):
    """from_pretrained without the expected 'no v_head found' warning (plain HF dirs) leaking into the output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(*args, **kwargs)


def vhead_warnings(records) -> list[str]:
    return [str(r.message) for r in records if issubclass(r.category, UserWarning) and "v_head" in str(r.message)]


def assert_state_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_outputs_equal(a: tuple, b: tuple) -> None:
    """(logits, loss, value) of two models."""
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[2], b[2])


def trainable_numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_numel(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def perturb_lora_b(model: nn.Module, seed: int, adapter: str | None = None) -> None:
    """LoRA's B starts at zero (the adapter is then a no-op): make it matter so a dropped adapter is noticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and (adapter is None or f".{adapter}." in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def gpt2_lora(**kw) -> LoraConfig:
    return LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"],
                      fan_in_fan_out=True, **kw)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def trl_classes():
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.ppo import AutoModelForCausalLMWithValueHead as TRLCausal
        from trl.experimental.ppo import AutoModelForSeq2SeqLMWithValueHead as TRLS2S
    return {"gpt2": TRLCausal, "t5": TRLS2S}


@pytest.fixture(scope="session")
def saved_gpt2(tiny_dirs, tmp_path_factory):
    """A lit_vhead gpt2 checkpoint (with a trained-looking, non-default value head) and its eval outputs."""
    model = load_quiet(CLM, tiny_dirs["gpt2"]).eval()
    with torch.no_grad():
        model.v_head.summary.weight.normal_(0, 1)
        model.v_head.summary.bias.fill_(0.25)
    path = tmp_path_factory.mktemp("saved") / "gpt2"
    model.save_pretrained(path)
    with torch.no_grad():
        out = model(**make_inputs("gpt2"))
    return SimpleNamespace(path=path, model=model, out=out)


# ---------------------------------------------------------------------------------------------------- every arch
@pytest.mark.parametrize("arch", ARCHS)
def test_from_pretrained_dir_and_instance(arch, tiny_dirs, caplog):
    hf = tiny_hf_model(arch)
    with warnings.catch_warnings(record=True) as rec, caplog.at_level(logging.INFO, logger="lit_vhead.modeling"):
        warnings.simplefilter("always")
        from_dir = wrapper_cls(arch).from_pretrained(tiny_dirs[arch])
    msgs = [r.message for r in caplog.records if "v_head" in r.message and r.levelno == logging.INFO]
    # a plain HF checkpoint (the usual start of PPO): said once at info level, with the path, not warned
    assert len(msgs) == 1 and str(tiny_dirs[arch]) in msgs[0] and vhead_warnings(rec) == []
    assert_state_equal(from_dir.pretrained_model.state_dict(), hf.state_dict())

    from_instance = wrapper_cls(arch).from_pretrained(hf)
    assert from_instance.pretrained_model is hf
    assert isinstance(from_instance.v_head, ValueHead)
    assert from_instance.v_head.summary.weight.shape[0] == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_contract_and_value_source(arch):
    hf = tiny_hf_model(arch)
    model = wrapper_cls(arch).from_pretrained(hf).eval()
    inputs = make_inputs(arch)
    t_out = T_DEC if arch in SEQ2SEQ else T
    with torch.no_grad():
        out = model(**inputs)
        with_labels = model(**inputs, labels=(inputs.get("decoder_input_ids", inputs["input_ids"])))
        with_past = model(**inputs, return_past_key_values=True)
        reference = hf(**inputs, output_hidden_states=True, return_dict=True)

    assert isinstance(out, tuple) and len(out) == 3
    logits, loss, value = out
    assert logits.dtype == torch.float32 and logits.shape == (B, t_out, VOCAB)
    assert loss is None
    assert value.shape == (B, t_out)
    assert len(with_labels) == 3 and with_labels[1].dim() == 0 and torch.isfinite(with_labels[1])
    assert len(with_past) == 4 and isinstance(with_past[3], transformers.Cache)
    assert_outputs_equal(with_past[:3], out)

    # the value head reads the decoder's last hidden state, whose width is word_embed_proj_dim for OPT
    cfg = hf.config
    width = cfg.word_embed_proj_dim if arch == "opt" else cfg.hidden_size
    if arch == "opt":
        assert width == 16 != cfg.hidden_size
    assert model.v_head.summary.in_features == width == hidden_size_of(cfg)

    # same state TRL read via output_hidden_states=True, without keeping every layer
    last = (reference.decoder_hidden_states if arch in SEQ2SEQ else reference.hidden_states)[-1]
    torch.testing.assert_close(value, model.v_head(last).squeeze(-1), rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, reference.logits.float(), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_matches_base(arch):
    hf = tiny_hf_model(arch)
    model = wrapper_cls(arch).from_pretrained(hf).eval()
    ids = make_inputs(arch)["input_ids"]
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    if arch not in SEQ2SEQ:
        kw["min_new_tokens"] = 3
    out = model.generate(input_ids=ids, **kw)
    expected = hf.generate(input_ids=ids, **kw)
    assert torch.equal(out, expected)
    if arch in SEQ2SEQ:
        assert out.shape[0] == B and 2 <= out.shape[1] <= 4  # decoder start token + up to 3 new
    else:
        assert out.shape == (B, T + 3) and torch.equal(out[:, :T], ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_round_trip_and_plain_transformers_load(arch, tmp_path):
    model = wrapper_cls(arch).from_pretrained(tiny_hf_model(arch)).eval()
    inputs = make_inputs(arch)
    model.save_pretrained(tmp_path / "ckpt")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        reloaded = wrapper_cls(arch).from_pretrained(tmp_path / "ckpt").eval()
    assert vhead_warnings(rec) == []  # the value head was found: no "freshly initialised" warning

    state = model.state_dict()
    assert {"v_head.summary.weight", "v_head.summary.bias"} <= set(state)
    assert_state_equal(reloaded.state_dict(), state)
    with torch.no_grad():
        assert_outputs_equal(reloaded(**inputs), model(**inputs))

    plain = hf_auto(arch).from_pretrained(tmp_path / "ckpt")
    assert not hasattr(plain, "v_head")
    assert_state_equal(plain.state_dict(), model.pretrained_model.state_dict())


# ---------------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_sharded_save_loads_locally(arch, tmp_path):
    model = wrapper_cls(arch).from_pretrained(tiny_hf_model(arch)).eval()
    with torch.no_grad():
        model.v_head.summary.bias.fill_(0.75)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    assert not (tmp_path / "model.safetensors").exists()

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        reloaded = wrapper_cls(arch).from_pretrained(tmp_path).eval()  # TRL: HFValidationError (trl#1917)
    assert vhead_warnings(rec) == []
    assert_state_equal(reloaded.state_dict(), model.state_dict())
    inputs = make_inputs(arch)
    with torch.no_grad():
        assert_outputs_equal(reloaded(**inputs), model(**inputs))


def test_truncated_safetensors_raises_checkpoint_error(saved_gpt2, tmp_path):
    shutil.copytree(saved_gpt2.path, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        CLM.from_pretrained(tmp_path / "ckpt")


def test_garbage_pickle_raises_checkpoint_error(saved_gpt2, tmp_path):
    shutil.copytree(saved_gpt2.path, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    (tmp_path / "ckpt" / "pytorch_model.bin").write_bytes(b"this is not a torch pickle" * 40)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        CLM.from_pretrained(tmp_path / "ckpt")


class NotATensor:
    pass


def test_legacy_non_zip_pickle_checkpoint_loads_and_is_still_read_weights_only(saved_gpt2, tmp_path):
    """torch.save(..., _use_new_zipfile_serialization=False) files (PyTorch < 1.6, still loaded by transformers)."""
    shutil.copytree(saved_gpt2.path, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in saved_gpt2.model.state_dict().items()}
    torch.save(state, tmp_path / "ckpt" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    with torch.no_grad():
        assert_outputs_equal(CLM.from_pretrained(tmp_path / "ckpt").eval()(**make_inputs("gpt2")), saved_gpt2.out)
    torch.save({**state, "v_head.extra": NotATensor()}, tmp_path / "ckpt" / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*weights_only=True"):
        CLM.from_pretrained(tmp_path / "ckpt")


@pytest.fixture(scope="module")
def saved_peft(tmp_path_factory):
    """A PEFT policy on a base built from a config: adapters, value head and base_model/ saved together."""
    model = CLM.from_pretrained(tiny_hf_model("gpt2"), peft_config=gpt2_lora()).eval()
    perturb_lora_b(model, seed=5)
    path = tmp_path_factory.mktemp("saved_peft") / "policy"
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "base_model/model.safetensors"])
def test_truncated_peft_file_raises_checkpoint_error_naming_it(saved_peft, tmp_path, name):
    shutil.copytree(saved_peft, tmp_path / "policy")
    weights = tmp_path / "policy" / name
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"{weights}.*truncated"):
        CLM.from_pretrained(tmp_path / "policy")


def overwrite_with_nan(file: Path, tensor: str) -> None:
    """Overwrite the first 8 bytes of ``tensor``'s data in a safetensors file (0xff bytes: float32 NaN): same size,
    valid header, corrupt values."""
    data = bytearray(file.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    start = 8 + header_len + json.loads(data[8 : 8 + header_len])[tensor]["data_offsets"][0]
    data[start : start + 8] = b"\xff" * 8
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("case", ["full", "adapter", "base_model"])
def test_weights_with_overwritten_bytes_name_the_file_and_tensor(saved_gpt2, saved_peft, tmp_path, case):
    source, name = (saved_gpt2.path, "model.safetensors") if case == "full" else (saved_peft, {
        "adapter": "adapter_model.safetensors", "base_model": "base_model/model.safetensors"}[case])
    shutil.copytree(source, tmp_path / "ckpt")
    file = tmp_path / "ckpt" / name
    with safe_open(file, "pt") as f:
        tensor = next(k for k in f.keys() if "attn.c_attn" in k and "bias" not in k)
    overwrite_with_nan(file, tensor)
    with pytest.raises(CheckpointError, match=f"'{file}' holds NaN or inf in tensor '{tensor}'"):
        load_quiet(CLM, tmp_path / "ckpt")


def test_value_head_of_another_architecture_is_rejected(saved_gpt2, tiny_dirs, tmp_path):
    """A gpt2 checkpoint (hidden 32) whose v_head was taken from an OPT model (word_embed_proj_dim 16)."""
    opt_head = load_quiet(CLM, tiny_dirs["opt"]).v_head.state_dict()
    shutil.copytree(saved_gpt2.path, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(weights)
    tensors.update({f"v_head.{k}": v.contiguous() for k, v in opt_head.items()})
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"(?s)\(1, 16\).*\(1, 32\)") as err:
        CLM.from_pretrained(tmp_path / "ckpt")
    assert "architecture" in str(err.value)


def test_save_keeps_tokenizer_in_existing_dir(byt5, tmp_path):
    model = CLM.from_pretrained(tiny_hf_model("gpt2")).eval()
    byt5.save_pretrained(tmp_path)
    tokenizer_files = {p.name for p in tmp_path.iterdir()}
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # re-saving over a checkpoint keeps it too
    assert tokenizer_files <= {p.name for p in tmp_path.iterdir()}
    tok = transformers.ByT5Tokenizer.from_pretrained(tmp_path)
    assert tok("hi").input_ids == byt5("hi").input_ids
    assert_state_equal(CLM.from_pretrained(tmp_path).state_dict(), model.state_dict())


def test_failed_save_leaves_previous_checkpoint_untouched(saved_gpt2, tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    shutil.copytree(saved_gpt2.path, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    other = CLM.from_pretrained(tiny_hf_model("gpt2", seed=1)).eval()

    def broken_save(save_directory, *args, **kwargs):
        Path(save_directory, "model.safetensors").write_bytes(b"half written")
        raise RuntimeError("disk full")

    monkeypatch.setattr(other.pretrained_model, "save_pretrained", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        other.save_pretrained(target)

    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary directory left behind
    reloaded = CLM.from_pretrained(target).eval()
    with torch.no_grad():
        assert_outputs_equal(reloaded(**make_inputs("gpt2")), saved_gpt2.out)


# The names a save once deleted because they start like its own files, and files of its own kinds that it never wrote.
USER_FILES = {
    "notes.txt": b"notes", "model_card.md": b"# card", "modeling_custom.py": b"X = 1\n", "config.json.bak": b"{}",
    "model_eval_results.json": b"{}", "generation_config_notes.txt": b"t", "base_model_readme.txt": b"r",
    "models/v1/model.safetensors": b"v1", "model-backup.safetensors": b"mine", "base_model_v0/config.json": b"{}",
}


def put_user_files(directory: Path) -> dict:
    for name, data in USER_FILES.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    return user_files(directory)


def user_files(directory: Path) -> dict:
    """Each user file's inode and bytes: equal means left in place, neither rewritten nor copied."""
    return {name: ((directory / name).stat().st_ino, (directory / name).read_bytes()) for name in USER_FILES}


def test_saves_replace_only_their_own_files_and_a_previous_saves_weights(tmp_path):
    target = tmp_path / "policy"
    target.mkdir()
    before = put_user_files(target)
    (target / "README.md").write_text("My notes on this policy.\n")
    full = CLM.from_pretrained(tiny_hf_model("gpt2")).eval()
    peft = CLM.from_pretrained(tiny_hf_model("gpt2", seed=1), peft_config=gpt2_lora()).eval()
    perturb_lora_b(peft, seed=2)
    weights = {"model.safetensors", "config.json", "generation_config.json"}
    for model, kwargs, expected in [
        (full, {}, weights),
        (full, {"max_shard_size": "20KB"}, "sharded"),
        (peft, {}, {"adapter_config.json", "adapter_model.safetensors", "model.safetensors", "base_model"}),
        (full, {}, weights),
    ]:
        model.save_pretrained(target, **kwargs)
        assert user_files(target) == before
        names = {p.name for p in target.iterdir()} - {n.split("/")[0] for n in USER_FILES} - {"README.md"}
        if expected == "sharded":
            index = json.loads((target / "model.safetensors.index.json").read_text())
            assert names == {"model.safetensors.index.json", "config.json", "generation_config.json",
                             *index["weight_map"].values()}  # the single file of the save before is gone
        else:  # a previous save's shards, adapters and base_model/ are gone; its config.json stays (not weights)
            assert names == expected | ({"config.json", "generation_config.json"} if model is peft else set())
        reloaded = load_quiet(CLM, target).eval()
        with torch.no_grad():
            assert_outputs_equal(reloaded(**make_inputs("gpt2")), model(**make_inputs("gpt2")))
    assert (target / "README.md").read_text().count("My notes on this policy.") == 1  # peft updated the card


def test_a_shard_index_cannot_make_a_save_delete_other_files(tmp_path):
    target = tmp_path / "policy"
    model = CLM.from_pretrained(tiny_hf_model("gpt2")).eval()
    model.save_pretrained(target, max_shard_size="20KB")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    (target / "notes.txt").write_bytes(b"notes")
    index_file = target / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"].update({"a": "notes.txt", "b": "../outside.safetensors"})
    index_file.write_text(json.dumps(index))
    model.save_pretrained(target)
    assert (target / "notes.txt").read_bytes() == b"notes" and (tmp_path / "outside.safetensors").exists()
    assert not list(target.glob("model-0*"))


def test_save_through_a_symlink_keeps_it_and_never_copies_symlinks_inside(tmp_path):
    real, link = tmp_path / "real", tmp_path / "link"
    model = CLM.from_pretrained(tiny_hf_model("gpt2")).eval()
    model.save_pretrained(real, max_shard_size="20KB")
    link.symlink_to(real, target_is_directory=True)
    big, data = tmp_path / "big.bin", tmp_path / "data"
    big.write_bytes(os.urandom(2**20))
    data.mkdir()
    (data / "x.txt").write_text("x")
    (real / "big_link.bin").symlink_to(big)
    (real / "data_link").symlink_to(data, target_is_directory=True)

    other = CLM.from_pretrained(tiny_hf_model("gpt2", seed=1)).eval()
    other.save_pretrained(link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin", "data", "link", "real"]  # nothing left beside
    assert not list(real.glob("model-0*")) and (real / "model.safetensors").is_file()  # no stale shard in real/
    assert os.readlink(real / "big_link.bin") == str(big) and os.readlink(real / "data_link") == str(data)
    assert sum(p.lstat().st_size for p in real.iterdir()) < 2**20  # the 1 MiB behind the link was not copied in
    with torch.no_grad():
        assert_outputs_equal(CLM.from_pretrained(link).eval()(**make_inputs("gpt2")), other(**make_inputs("gpt2")))


KILLED_SAVE = """
import sys, time
from pathlib import Path
from lit_vhead.atomic import atomic_directory
with atomic_directory(sys.argv[1]) as tmp:
    Path(tmp, "model.safetensors").write_bytes(b"half a model")
    print("writing", flush=True)
    time.sleep(600)
"""


def test_a_killed_save_leaves_the_directory_as_it_was_and_the_next_save_cleans_up(saved_gpt2, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(saved_gpt2.path, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(target)], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline() == b"writing\n"
    finally:
        proc.kill()
        proc.wait()
    left = [p.name for p in target.iterdir() if p.name not in before]
    assert len(left) == 1 and left[0].startswith(".save.lit-tmp.")  # the killed save's own temporary dir, nothing else
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.name in before} == before
    with torch.no_grad():
        assert_outputs_equal(CLM.from_pretrained(target).eval()(**make_inputs("gpt2")), saved_gpt2.out)
    saved_gpt2.model.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == sorted(before)


def test_adapters_are_not_saved_over_their_own_base(tiny_dirs, tmp_path):
    base_dir = tmp_path / "base"
    shutil.copytree(tiny_dirs["gpt2"], base_dir)
    before = (base_dir / "model.safetensors").read_bytes()
    model = load_quiet(CLM, base_dir, peft_config=gpt2_lora())
    with pytest.raises(ValueError, match="over the weights of their own base model"):
        model.save_pretrained(base_dir)
    assert (base_dir / "model.safetensors").read_bytes() == before


# ---------------------------------------------------------------------------------------------------- TRL compatibility
@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_trl_checkpoint_loads_here(arch, tiny_dirs, trl_classes, tmp_path):
    trl_model = load_quiet(trl_classes[arch], str(tiny_dirs[arch]))
    with torch.no_grad():
        trl_model.v_head.summary.bias.fill_(-0.5)
    trl_model.save_pretrained(str(tmp_path))
    ours = wrapper_cls(arch).from_pretrained(tmp_path).eval()
    trl_model.eval()
    inputs = make_inputs(arch)
    with torch.no_grad():
        assert_outputs_equal(ours(**inputs), trl_model(**inputs))
    assert torch.equal(ours.v_head.summary.weight, trl_model.v_head.summary.weight)
    assert torch.equal(ours.v_head.summary.bias, trl_model.v_head.summary.bias)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_our_checkpoint_loads_in_trl(arch, trl_classes, tmp_path):
    ours = wrapper_cls(arch).from_pretrained(tiny_hf_model(arch)).eval()
    with torch.no_grad():
        ours.v_head.summary.bias.fill_(0.5)
    ours.save_pretrained(tmp_path)
    trl_model = load_quiet(trl_classes[arch], str(tmp_path)).eval()
    inputs = make_inputs(arch)
    with torch.no_grad():
        assert_outputs_equal(trl_model(**inputs), ours(**inputs))
    assert torch.equal(trl_model.v_head.summary.bias, ours.v_head.summary.bias)


def test_trl_peft_checkpoint_loads_here(tiny_dirs, trl_classes, tmp_path):
    trl_model = load_quiet(trl_classes["gpt2"], str(tiny_dirs["gpt2"]), peft_config=gpt2_lora())
    perturb_lora_b(trl_model, seed=3)
    with torch.no_grad():
        trl_model.v_head.summary.bias.fill_(0.3)
    trl_model.save_pretrained(str(tmp_path))  # TRL: adapter files + pytorch_model.bin holding the v_head
    assert {"adapter_config.json", "adapter_model.safetensors", "pytorch_model.bin"} <= set(os.listdir(tmp_path))

    ours = CLM.from_pretrained(tmp_path).eval()
    assert ours.is_peft_model
    trl_model.eval()
    inputs = make_inputs("gpt2")
    with torch.no_grad():
        assert_outputs_equal(ours(**inputs), trl_model(**inputs))
        # the adapter matters: the bare base gives other logits
        with ours.pretrained_model.disable_adapter():
            assert not torch.equal(ours(**inputs)[0], trl_model(**inputs)[0])


def test_our_peft_checkpoint_loads_in_trl(tiny_dirs, trl_classes, tmp_path):
    ours = load_quiet(CLM, tiny_dirs["gpt2"], peft_config=gpt2_lora())
    perturb_lora_b(ours, seed=4)
    with torch.no_grad():
        ours.v_head.summary.bias.fill_(-0.3)
    ours.eval().save_pretrained(tmp_path)
    trl_model = load_quiet(trl_classes["gpt2"], str(tmp_path)).eval()
    assert trl_model.is_peft_model
    inputs = make_inputs("gpt2")
    with torch.no_grad():
        assert_outputs_equal(trl_model(**inputs), ours(**inputs))
    assert torch.equal(trl_model.v_head.summary.weight, ours.v_head.summary.weight)


# ---------------------------------------------------------------------------------------------------- TRL bugs fixed
def test_nested_in_parent_module_state_dict_round_trips():
    parent, other = nn.Module(), nn.Module()
    parent.child = CLM(tiny_hf_model("gpt2", seed=0))
    other.child = CLM(tiny_hf_model("gpt2", seed=1))
    state = parent.state_dict()  # TRL: RuntimeError: OrderedDict mutated during iteration
    assert set(state) == {f"child.{k}" for k in nn.Module.state_dict(parent.child)}  # ordinary nested format
    assert "child.v_head.summary.weight" in state and "child.pretrained_model.lm_head.weight" in state
    assert not torch.equal(other.child.v_head.summary.weight, parent.child.v_head.summary.weight)
    result = other.load_state_dict(state)  # strict
    assert not result.missing_keys and not result.unexpected_keys
    assert_state_equal(other.state_dict(), state)
    parent.load_state_dict(parent.state_dict())


def test_ddp_state_dict():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        model = CLM(tiny_hf_model("gpt2"))
        ddp = DDP(model)
        state = ddp.state_dict()  # TRL: RuntimeError: OrderedDict mutated during iteration
        assert "module.v_head.summary.weight" in state
        assert torch.equal(state["module.v_head.summary.weight"], model.v_head.summary.weight)
        ddp.load_state_dict(state)
    finally:
        dist.destroy_process_group()


def test_wrapper_load_state_dict_strict_round_trip():
    model = CLM(tiny_hf_model("gpt2", seed=0)).eval()
    other = CLM(tiny_hf_model("gpt2", seed=1)).eval()
    state = model.state_dict()
    assert "transformer.wte.weight" in state and "v_head.summary.weight" in state  # TRL's key format
    result = other.load_state_dict(state)  # TRL: RuntimeError (missing/unexpected keys)
    assert not result.missing_keys and not result.unexpected_keys
    inputs = make_inputs("gpt2")
    with torch.no_grad():
        assert_outputs_equal(other(**inputs), model(**inputs))
    # the nn.Module (prefixed) format is accepted too
    third = CLM(tiny_hf_model("gpt2", seed=2)).eval()
    third.load_state_dict(nn.Module.state_dict(model))
    assert_state_equal(third.state_dict(), state)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_plain_constructor_gives_working_model(arch):
    hf = tiny_hf_model(arch)
    model = wrapper_cls(arch)(hf)  # TRL: AttributeError 'is_peft_model' on forward
    inputs = make_inputs(arch)
    with torch.no_grad():
        logits, loss, value = model(**inputs)
        expected = hf(**inputs).logits
    assert torch.equal(logits, expected) and loss is None and value.shape == logits.shape[:2]


def test_train_eval_modes_are_consistent(tiny_dirs):
    model = load_quiet(CLM, tiny_dirs["gpt2"], summary_dropout_prob=0.5)
    modes = {m.training for m in model.modules()}
    assert modes == {False}  # TRL: wrapper and head in train mode, base in eval
    inputs = make_inputs("gpt2")
    with torch.no_grad():
        assert torch.equal(model(**inputs)[2], model(**inputs)[2])
        model.train()
        assert model.pretrained_model.training and model.v_head.dropout.training
        assert not torch.equal(model(**inputs)[2], model(**inputs)[2])

    train_base = tiny_hf_model("gpt2").train()
    assert {m.training for m in CLM(train_base).modules()} == {True}


def test_unknown_init_strategy_raises(tiny_dirs):
    with pytest.raises(ValueError, match="xavier"):
        CLM.from_pretrained(tiny_dirs["gpt2"], v_head_init_strategy="xavier")
    with pytest.raises(ValueError, match="xavier"):
        CLM(tiny_hf_model("gpt2"), v_head_init_strategy="xavier")


def test_normal_and_default_init():
    hf = tiny_hf_model("gpt2")
    torch.manual_seed(0)
    normal = CLM(hf, v_head_init_strategy="normal", v_head_initializer_range=0.05).v_head.summary
    wide = CLM(hf, v_head_init_strategy="normal", v_head_initializer_range=5.0).v_head.summary
    assert torch.all(normal.bias == 0) and torch.all(wide.bias == 0)
    assert 0.05 * 0.6 < normal.weight.std().item() < 0.05 * 1.4
    assert 5.0 * 0.6 < wide.weight.std().item() < 5.0 * 1.4
    default_std = CLM(hf, v_head_init_strategy="normal").v_head.summary.weight.std().item()
    assert 0.2 * 0.6 < default_std < 0.2 * 1.4  # TRL's default range

    default = CLM(hf).v_head.summary  # nn.Linear's default: bias uniform in +-1/sqrt(H), not zero
    bound = 1 / hf.config.hidden_size**0.5
    assert torch.all(default.bias != 0) and torch.all(default.bias.abs() <= bound)
    assert default.weight.abs().max() <= bound


def test_explicit_dropout_beats_config(tiny_dirs):
    hf = tiny_hf_model("gpt2")
    hf.config.summary_dropout_prob = 0.3
    assert CLM(hf).v_head.dropout.p == 0.3  # the config is used when nothing is passed
    assert CLM(hf, summary_dropout_prob=0.5).v_head.dropout.p == 0.5  # TRL: 0.3 (config wins)
    assert isinstance(CLM(hf, summary_dropout_prob=0.0).v_head.dropout, nn.Identity)
    assert CLM.from_pretrained(hf, summary_dropout_prob=0.5).v_head.dropout.p == 0.5
    assert load_quiet(CLM, tiny_dirs["gpt2"], summary_dropout_prob=0.5).v_head.dropout.p == 0.5


def test_hidden_size_resolution():
    cfg = transformers.PretrainedConfig()
    cfg.text_config = transformers.PretrainedConfig(hidden_size=24)
    assert not isinstance(getattr(cfg, "hidden_size", None), int)
    assert hidden_size_of(cfg) == 24  # TRL: UnboundLocalError
    assert ValueHead(cfg).summary.in_features == 24
    with pytest.raises(ValueError, match="hidden_size"):
        hidden_size_of(transformers.PretrainedConfig())


def test_invalid_from_pretrained_arguments(tiny_dirs):
    gpt2_cfg = transformers.AutoConfig.for_model(**TINY_CONFIGS["gpt2"])
    with pytest.raises(ValueError, match=r"(?i)(language.model|lm) head"):
        CLM.from_pretrained(transformers.GPT2Model(gpt2_cfg))  # TRL: AttributeError
    with pytest.raises(ValueError, match="string or a PreTrainedModel"):
        CLM.from_pretrained(123)
    with pytest.raises(ValueError, match="PeftConfig"):
        CLM.from_pretrained(tiny_dirs["gpt2"], peft_config={"r": 4})
    with pytest.raises(ValueError, match="needs a PEFT policy.*peft=lora"):
        load_quiet(CLM, tiny_dirs["gpt2"], reward_adapter=str(tiny_dirs["gpt2"]))


# ---------------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_forward_does_not_request_all_hidden_states(arch, monkeypatch):
    hf = tiny_hf_model(arch)
    model = wrapper_cls(arch).from_pretrained(hf).eval()
    inputs = make_inputs(arch)
    with torch.no_grad():
        reference = hf(**inputs, output_hidden_states=True)
    real_forward = hf.forward
    calls = []

    def recording_forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        calls.append((kwargs, out))
        return out

    monkeypatch.setattr(hf, "forward", recording_forward)
    with torch.no_grad():
        _, _, value = model(**inputs)
    assert len(calls) == 1
    kwargs, out = calls[0]
    assert kwargs.get("output_hidden_states") is not True
    assert getattr(out, "decoder_hidden_states" if arch in SEQ2SEQ else "hidden_states", None) is None
    last = (reference.decoder_hidden_states if arch in SEQ2SEQ else reference.hidden_states)[-1]
    torch.testing.assert_close(value, model.v_head(last).squeeze(-1), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- value helpers
def test_mask_values_and_gather_last():
    values = torch.arange(1.0, 13.0).reshape(3, 4)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    masked = lit_vhead.mask_values(values, mask)
    assert torch.equal(masked, torch.where(mask.bool(), values, torch.zeros_like(values)))
    assert lit_vhead.mask_values(values, None) is values
    # right-padded row 0 -> position 2, left-padded row 1 -> position 3, unpadded row 2 -> position 3
    assert torch.equal(lit_vhead.gather_last(values, mask), torch.tensor([3.0, 8.0, 12.0]))
    scores = values.unsqueeze(-1)  # [B, T, 1] like compute_reward_score
    assert torch.equal(lit_vhead.gather_last(scores, mask), torch.tensor([[3.0], [8.0], [12.0]]))
    with pytest.raises(ValueError):
        lit_vhead.gather_last(values, torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]]))


def test_forward_zeroes_values_at_padding():
    model = CLM(tiny_hf_model("gpt2")).eval()
    ids = make_inputs("gpt2")["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0  # right padding
    mask[1, :2] = 0  # left padding
    with torch.no_grad():
        _, _, value = model(ids, attention_mask=mask)
        _, _, short = model(ids[:1, :3])
    assert torch.all(value[mask == 0] == 0) and torch.all(value[mask == 1] != 0)
    torch.testing.assert_close(value[0, :3], short[0], rtol=0, atol=1e-5)


def test_seq2seq_forward_zeroes_values_at_decoder_padding():
    model = S2S(tiny_hf_model("t5")).eval()
    inputs = make_inputs("t5")
    dec_mask = torch.ones_like(inputs["decoder_input_ids"])
    dec_mask[0, -1] = 0
    with torch.no_grad():
        _, _, value = model(**inputs, decoder_attention_mask=dec_mask)
    assert value[0, -1] == 0 and torch.all(value[dec_mask == 1] != 0)


# ---------------------------------------------------------------------------------------------------- push_to_hub
@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    import huggingface_hub

    record = SimpleNamespace(created=[], uploads=[], root=tmp_path / "uploaded")

    def create_repo(self, repo_id, **kwargs):
        record.created.append((repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        dest = record.root / f"upload{len(record.uploads)}"
        shutil.copytree(folder_path, dest)
        record.uploads.append((repo_id, dest, kwargs))
        return f"https://huggingface.co/{repo_id}/commit/fake"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return record


def test_push_to_hub_uploads_value_head_without_mutating_base(fake_hub, saved_gpt2):
    model = saved_gpt2.model
    model.push_to_hub("me/tiny-vhead")
    assert [c[0] for c in fake_hub.created] == ["me/tiny-vhead"]
    ((repo_id, folder, _),) = fake_hub.uploads
    assert repo_id == "me/tiny-vhead"
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert {"v_head.summary.weight", "v_head.summary.bias"} <= set(f.keys())
    reloaded = CLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert_outputs_equal(reloaded(**make_inputs("gpt2")), saved_gpt2.out)
    assert not hasattr(model.pretrained_model, "v_head")  # TRL attaches the v_head to the base for good
    assert not any("v_head" in k for k in model.pretrained_model.state_dict())


def test_push_to_hub_peft_uploads_adapter_and_value_head(fake_hub, tiny_dirs):
    model = load_quiet(CLM, tiny_dirs["gpt2"], peft_config=gpt2_lora())
    perturb_lora_b(model, seed=5)
    model.eval()
    model.push_to_hub("me/tiny-peft")
    ((_, folder, _),) = fake_hub.uploads
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= set(os.listdir(folder))
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert set(f.keys()) == {"v_head.summary.weight", "v_head.summary.bias"}
    reloaded = CLM.from_pretrained(folder).eval()
    inputs = make_inputs("gpt2")
    with torch.no_grad():
        assert_outputs_equal(reloaded(**inputs), model(**inputs))
    assert not hasattr(model.pretrained_model, "v_head")
    assert not hasattr(model.hf_model, "v_head")


# ---------------------------------------------------------------------------------------------------- PEFT
def test_peft_from_path_and_instance_trainable_counts(tiny_dirs):
    from_path = load_quiet(CLM, tiny_dirs["gpt2"], peft_config=gpt2_lora())
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"])
    from_instance = CLM.from_pretrained(base, peft_config=gpt2_lora())
    cfg = base.config
    # LoRA on c_attn (n_embd -> 3 * n_embd), r=4, in every layer; v_head is Linear(n_embd, 1)
    expected_lora = cfg.n_layer * 4 * (cfg.n_embd + 3 * cfg.n_embd)
    v_head = cfg.n_embd + 1
    for model in (from_path, from_instance):
        assert model.is_peft_model and isinstance(model.pretrained_model, PeftModel)
        assert lora_numel(model) == expected_lora
        assert trainable_numel(model) == expected_lora + v_head
        assert model.v_head.summary.weight.requires_grad and model.v_head.summary.bias.requires_grad
        assert not model.hf_model.transformer.wte.weight.requires_grad


def test_peft_save_reload_and_is_trainable(tiny_dirs, tmp_path):
    model = load_quiet(CLM, tiny_dirs["gpt2"], peft_config=gpt2_lora())
    perturb_lora_b(model, seed=6)
    model.eval()
    state = model.state_dict()
    assert set(state) == {"v_head.summary.weight", "v_head.summary.bias"}
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= files
    assert "pytorch_model.bin" not in files  # TRL wrote a pickle
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(state)
    assert (tmp_path / "model.safetensors").read_bytes()[:2] != b"PK"  # not a zip pickle

    inputs = make_inputs("gpt2")
    frozen = CLM.from_pretrained(tmp_path).eval()
    assert trainable_numel(frozen) == model.v_head.summary.weight.numel() + 1  # v_head only
    trainable = CLM.from_pretrained(tmp_path, is_trainable=True).eval()
    assert trainable_numel(trainable) == trainable_numel(model) == lora_numel(model) + model.config.n_embd + 1
    with torch.no_grad():
        expected = model(**inputs)
        assert_outputs_equal(frozen(**inputs), expected)
        assert_outputs_equal(trainable(**inputs), expected)


def test_peft_save_into_new_nested_dir(tiny_dirs, tmp_path):
    model = load_quiet(CLM, tiny_dirs["gpt2"], peft_config=gpt2_lora())
    model.save_pretrained(save_directory=tmp_path / "a" / "b")  # TRL: IndexError / parent dir must exist
    assert_state_equal(CLM.from_pretrained(tmp_path / "a" / "b").state_dict(), model.state_dict())


# ---------------------------------------------------------------------------------------------------- reward adapter
@pytest.fixture(scope="module")
def reward_setup(tiny_dirs, tmp_path_factory):
    seq = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_dirs["gpt2"], num_labels=1)
    seq.config.pad_token_id = 0  # batch > 1 needs a pad id; the inputs never contain 0
    rm_config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn"],
                           fan_in_fan_out=True)  # fmt: skip
    rm = get_peft_model(seq, rm_config)
    perturb_lora_b(rm, seed=7)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        score_params = [p for n, p in rm.named_parameters() if "score" in n and p.requires_grad]
        assert score_params
        for p in score_params:
            p.copy_(torch.randn(p.shape, generator=g))
    rm.eval()
    path = tmp_path_factory.mktemp("reward_adapter")
    rm.save_pretrained(path)
    ids = make_inputs("gpt2")["input_ids"]
    with torch.no_grad():
        logits = rm(input_ids=ids).logits
    return SimpleNamespace(path=path, ids=ids, logits=logits)


def test_reward_adapter_scores_match_seq_cls_model(tiny_dirs, reward_setup):
    policy = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"]), gpt2_lora())
    perturb_lora_b(policy, seed=9)  # a policy adapter that differs from the reward adapter
    model = CLM.from_pretrained(policy, reward_adapter=str(reward_setup.path))
    assert model.supports_rm_adapter
    assert all(not p.requires_grad for p in model.score.parameters())
    lora_grad = {n: p.requires_grad for n, p in model.named_parameters() if "lora_" in n}
    assert any(lora_grad.values())

    for mode in (True, False):
        model.train(mode)
        before_modes = [m.training for m in model.modules()]
        before_adapter = model.pretrained_model.active_adapter
        scores = model.compute_reward_score(reward_setup.ids)
        assert scores.shape == (B, T, 1) and not scores.requires_grad
        torch.testing.assert_close(scores[:, -1, :], reward_setup.logits, rtol=1e-5, atol=1e-5)
        assert [m.training for m in model.modules()] == before_modes
        assert model.pretrained_model.active_adapter == before_adapter == "default"
        assert {n: p.requires_grad for n, p in model.named_parameters() if "lora_" in n} == lora_grad

    # the policy forward still uses the policy adapter afterwards
    model.eval()
    with torch.no_grad():
        expected = policy(input_ids=reward_setup.ids).logits
        assert torch.equal(model(reward_setup.ids)[0], expected)


def test_compute_reward_score_without_adapter_raises():
    model = CLM(tiny_hf_model("gpt2"))
    with pytest.raises(ValueError, match="reward"):
        model.compute_reward_score(make_inputs("gpt2")["input_ids"])


# ---------------------------------------------------------------------------------------------------- saves reload
RELOAD = """
import sys, torch
import lit_vhead
cls, path, io = getattr(lit_vhead, sys.argv[1]), sys.argv[2], sys.argv[3]
inputs = torch.load(io + "/inputs.pt", weights_only=True)
model = cls.from_pretrained(path).eval()
with torch.no_grad():
    logits, _, values = model(**inputs)
torch.save({"logits": logits, "values": values}, io + "/outputs.pt")
"""


def reload_in_fresh_process(cls, path, inputs: dict, tmp_path) -> dict:
    """Load ``path`` in a new Python process, offline, from another working directory; return its outputs."""
    io = tmp_path / "io"
    io.mkdir(exist_ok=True)
    torch.save(inputs, io / "inputs.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", RELOAD, cls.__name__, str(path), str(io)], cwd=io, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(io / "outputs.pt", weights_only=True)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_peft_policy_on_a_base_built_from_a_config_reloads_offline_in_a_fresh_process(arch, tmp_path):
    """The base exists nowhere on disk: the save must hold it too, and record where it is."""
    cls = wrapper_cls(arch)
    task = "SEQ_2_SEQ_LM" if arch in SEQ2SEQ else "CAUSAL_LM"
    lora = LoraConfig(task_type=task, r=4, target_modules="all-linear")
    model = cls.from_pretrained(tiny_hf_model(arch), peft_config=lora)
    perturb_lora_b(model, seed=3)
    with torch.no_grad():
        model.v_head.summary.weight.normal_()
    model.eval()
    model.save_pretrained(tmp_path / "policy")
    recorded = json.loads((tmp_path / "policy" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(tmp_path / "policy" / "base_model")
    assert not any(k.startswith("v_head") or "lora" in k for k in load_file(Path(recorded) / "model.safetensors"))
    inputs = make_inputs(arch)
    with torch.no_grad():
        logits, _, values = model(**inputs)
    out = reload_in_fresh_process(cls, tmp_path / "policy", inputs, tmp_path)
    assert torch.equal(out["logits"], logits) and torch.equal(out["values"], values)
    shutil.move(tmp_path / "policy", tmp_path / "moved")  # the saved base travels with the directory
    out = reload_in_fresh_process(cls, tmp_path / "moved", inputs, tmp_path)
    assert torch.equal(out["logits"], logits) and torch.equal(out["values"], values)


def test_peft_policy_on_a_local_base_records_it_and_saves_no_copy(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_dirs["gpt2"].parent)
    model = load_quiet(CLM, "gpt2", peft_config=gpt2_lora())  # a relative path: recorded as absolute
    perturb_lora_b(model, seed=4)
    model.eval()
    model.save_pretrained(tmp_path / "policy")
    assert not (tmp_path / "policy" / "base_model").exists()
    recorded = json.loads((tmp_path / "policy" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(tiny_dirs["gpt2"])
    inputs = make_inputs("gpt2")
    with torch.no_grad():
        logits, _, values = model(**inputs)
    out = reload_in_fresh_process(CLM, tmp_path / "policy", inputs, tmp_path)
    assert torch.equal(out["logits"], logits) and torch.equal(out["values"], values)


def test_adapters_that_record_no_base_give_a_clear_error(tmp_path):
    """A PEFT dir written elsewhere (peft itself, an older save) with base_model_name_or_path null."""
    peft_model = get_peft_model(tiny_hf_model("gpt2"), gpt2_lora())
    peft_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    with pytest.raises(CheckpointError, match="record no base model.*PeftModel.from_pretrained"):
        load_quiet(CLM, tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o027])
@pytest.mark.parametrize("peft", [False, True])
def test_saved_files_follow_the_umask(tmp_path, umask, peft):
    """Saves go through mkdtemp (0700) and libraries' mkstemp (0600): the result must look like any file the user
    writes (0755/0644 under umask 022)."""
    model = CLM.from_pretrained(tiny_hf_model("gpt2"), peft_config=gpt2_lora() if peft else None)
    previous = os.umask(umask)
    try:
        model.save_pretrained(tmp_path / "policy")
        model.save_pretrained(tmp_path / "policy")  # a re-save into an existing dir, too
    finally:
        os.umask(previous)
    paths = [tmp_path / "policy", *(tmp_path / "policy").rglob("*")]
    assert len(paths) > 3
    for path in paths:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, (path, oct(path.stat().st_mode))


def test_our_checkpoints_load_and_save_without_transformers_noise(saved_gpt2, tmp_path, capfd, caplog):
    """No LOAD REPORT calling our own ``v_head.*`` tensors UNEXPECTED, no progress bar for a 0.5 MB model; a key that
    really is unexpected is still reported."""
    hf_logging = transformers.utils.logging
    verbosity, propagate = hf_logging.get_verbosity(), hf_logging.get_logger().propagate
    hf_logging.set_verbosity_warning()
    hf_logging.enable_progress_bar()
    hf_logging.enable_propagation()  # to caplog, whatever another library or pytest version did to the logger
    try:
        capfd.readouterr()
        model = CLM.from_pretrained(saved_gpt2.path)
        model.save_pretrained(tmp_path / "resaved")
        bars = capfd.readouterr()
        quiet = caplog.text
        weights = load_file(tmp_path / "resaved" / "model.safetensors")
        save_file({**weights, "stray.weight": torch.zeros(1)}, tmp_path / "resaved" / "model.safetensors",
                  metadata={"format": "pt"})
        CLM.from_pretrained(tmp_path / "resaved")
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.disable_progress_bar()
        hf_logging.get_logger().propagate = propagate
    assert "Loading weights" not in bars.err and "Writing model shards" not in bars.err
    assert "LOAD REPORT" not in quiet
    report = caplog.text[len(quiet):]
    assert "LOAD REPORT" in report and "stray.weight" in report and "v_head" not in report


# ---------------------------------------------------------------------------------------------------- LM head
def test_lm_head_check_uses_lm_head_namings():
    """TRL 0.7.10: a base without a module named one of ``lm_head_namings`` has no LM head; extend the attribute for
    a model whose head is named otherwise."""
    assert CLM.lm_head_namings == ("lm_head", "embed_out")
    assert S2S.lm_head_namings == ["lm_head", "embed_out", "output_projection"]
    base = tiny_hf_model("gpt2")
    base.output_head = base.lm_head  # the same head under another name
    del base.lm_head
    with pytest.raises(ValueError, match=r"lm_head_namings=\['lm_head', 'embed_out'\]"):
        CLM(base)

    class RenamedHead(CLM):
        lm_head_namings = ("output_head",)

    assert RenamedHead(base).v_head.summary.in_features == base.config.n_embd


# ---------------------------------------------------------------------------------------------------- reward checks
def test_reward_adapter_of_another_base_warns(tiny_dirs, reward_setup, tmp_path):
    policy = get_peft_model(tiny_hf_model("gpt2", seed=1), gpt2_lora())  # built from a config: another base
    with pytest.warns(UserWarning, match=rf"trained on base '{tiny_dirs['gpt2']}'.*built from a config"):
        CLM.from_pretrained(policy, reward_adapter=str(reward_setup.path))
    same = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs["gpt2"]), gpt2_lora())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own base: no warning
        CLM.from_pretrained(same, reward_adapter=str(reward_setup.path))


def test_reward_adapter_whose_shapes_do_not_fit_gives_one_line(tiny_dirs, reward_setup):
    wider = transformers.AutoConfig.for_model(**{**TINY_CONFIGS["gpt2"], "n_embd": 64})
    policy = get_peft_model(transformers.AutoModelForCausalLM.from_config(wider), gpt2_lora())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError) as info:
            CLM.from_pretrained(policy, reward_adapter=str(reward_setup.path))
    message = str(info.value)
    assert "\n" not in message and "does not fit the policy" in message and "size mismatch" in message
    assert f"trained on base '{tiny_dirs['gpt2']}'" in message


# ---------------------------------------------------------------------------------------------------- one forward path
def test_ppo_passes_and_public_forward_share_one_path(monkeypatch):
    """PPO's log-prob/value pass (``rollout.forward``) and ``forward`` both run ``forward_with_values``: a change to
    it (masking, upcasting) reaches both, and they agree."""
    from lit_vhead.rollout import Rollout
    from lit_vhead.rollout import forward as ppo_forward

    model = CLM(tiny_hf_model("gpt2")).eval()
    calls = []
    original = CLM.forward_with_values
    monkeypatch.setattr(CLM, "forward_with_values", lambda self, **kw: calls.append(1) or original(self, **kw))
    g = torch.Generator().manual_seed(0)
    query, response = torch.randint(3, VOCAB, (2, 4), generator=g), torch.randint(3, VOCAB, (2, 3), generator=g)
    query_mask, response_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), torch.tensor([[1, 1, 0], [1, 1, 1]])
    rollout = Rollout(query, query_mask, response, response_mask)
    with torch.no_grad():
        ppo = ppo_forward(model, rollout)
        ids, mask = rollout.full_sequence()
        logits, _, values = model(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0))
    assert len(calls) == 2
    torch.testing.assert_close(ppo.values, values[:, 3:-1])  # the value of the state before each response token
    torch.testing.assert_close(ppo.logits, logits[:, 3:-1])
    assert values[0, 0] == 0 and values[0, 6] == 0  # padding on both sides of row 0 is masked
