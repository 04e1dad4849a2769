"""``create_reference_model``: TRL's reference-model tests, plus real memory sharing on every architecture.

TRL 0.29.1 froze the policy's lower layers but still deep-copied them (a full-size reference), froze the whole policy
on a typo'd pattern and had no pattern for T5/BART. These tests pin what users rely on instead: the shared layers are
the *same storage* (``data_ptr`` equal), never even transiently copied, and bad inputs change nothing.
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from conftest import SEQ2SEQ, TINY_CONFIGS, VOCAB, tiny_hf_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lit_vhead
from lit_vhead import AutoModelForCausalLMWithValueHead, AutoModelForSeq2SeqLMWithValueHead, create_reference_model
from lit_vhead.layers import LAYER_PATTERNS, find_layer_pattern
from lit_vhead.reference import tie_shared_parameters

LAYER = "pretrained_model.transformer.h.{layer}.attn.c_attn.weight"  # TRL's test names
EXPECTED_PATTERN = {
    "gpt2": "transformer.h.{layer}",
    "gpt_neo": "transformer.h.{layer}",
    "gpt_neox": "gpt_neox.layers.{layer}",
    "opt": "model.decoder.layers.{layer}",
    "llama": "model.layers.{layer}",
    "mistral": "model.layers.{layer}",
    "qwen2": "model.layers.{layer}",
    "gemma": "model.layers.{layer}",
    "t5": "decoder.block.{layer}",  # the decoder side of the seq2seq models
    "bart": "model.decoder.layers.{layer}",
}


# ----------------------------------------------------------------------------------------------------------- helpers
def wrap(arch: str, seed: int = 0):
    """A tiny value-head model of ``arch`` (CLM or seq2seq)."""
    cls = AutoModelForSeq2SeqLMWithValueHead if arch in SEQ2SEQ else AutoModelForCausalLMWithValueHead
    return cls(tiny_hf_model(arch, seed))


def gpt2_vhead(n_layer: int = 2, n_embd: int = 32, seed: int = 0) -> AutoModelForCausalLMWithValueHead:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, vocab_size=VOCAB, n_positions=64)
    return AutoModelForCausalLMWithValueHead(transformers.GPT2LMHeadModel(config).eval())


def ptr(param: torch.Tensor) -> int:
    return param.untyped_storage().data_ptr()


def nbytes(param: torch.Tensor) -> int:
    return param.untyped_storage().nbytes()


def unique_bytes(*models: nn.Module) -> int:
    """Bytes of distinct parameter storages across ``models`` (a tensor shared by two models counts once)."""
    storages = {}
    for model in models:
        for param in model.parameters():
            storages[ptr(param)] = nbytes(param)
    return sum(storages.values())


def names_below(model: nn.Module, first_unshared: str) -> list[str]:
    """Independent of lit_vhead's regex: parameter names before the first one inside ``first_unshared.``."""
    names = [name for name, _ in model.named_parameters()]
    stop = next(i for i, name in enumerate(names) if f".{first_unshared}." in f".{name}")
    return names[:stop]


def forward(model: nn.Module, arch: str):
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    if arch in SEQ2SEQ:
        return model(input_ids=input_ids, decoder_input_ids=torch.tensor([[0, 11, 12, 13]]))
    return model(input_ids=input_ids)


def lm_step(model: AutoModelForCausalLMWithValueHead) -> None:
    """TRL's update: one AdamW(lr=1) step on the LM loss plus the value."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1)
    input_ids = torch.tensor([[0, 1, 0, 1, 5, 9]])
    _, loss, value = model(input_ids=input_ids, labels=input_ids)
    (loss + value.mean()).backward()
    optimizer.step()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def requires_grad(model: nn.Module) -> dict[str, bool]:
    return {name: param.requires_grad for name, param in model.named_parameters()}


class AllocationCounter(TorchDispatchMode):
    """Sums the bytes of every *new* storage produced by an aten op while active.

    ``copy.deepcopy`` copies a Parameter with ``aten.clone`` and a plain tensor (buffer) by allocating an untyped
    storage outside the dispatcher and filling it with ``aten.copy_``: both show up here as an op output whose storage
    did not exist before (``known``). Views (``detach``, ``set_``) of existing storage are not allocations. Nothing is
    freed during a deepcopy, so data_ptr reuse cannot hide an allocation. ``test_allocation_counter_sees_deepcopy``
    checks that a full copy is seen in full, so a small count for the shared case means a real absence of copying.
    """

    def __init__(self, *models: nn.Module):
        super().__init__()
        self.known = {ptr(t) for model in models for t in [*model.parameters(), *model.buffers()]}
        self.allocated = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().nbytes() and ptr(tensor) not in self.known:
                self.known.add(ptr(tensor))
                self.allocated += nbytes(tensor)
        return out


# ----------------------------------------------------------------------------------------------------- TRL's tests
def test_independent_reference():
    """TRL's test_independent_reference: a full frozen copy that a policy update does not touch."""
    model = gpt2_vhead()
    reference = create_reference_model(model)
    before = snapshot(model)
    for name, param in reference.named_parameters():
        torch.testing.assert_close(param, before[name], rtol=0, atol=0)

    lm_step(model)

    for name, param in reference.named_parameters():
        torch.testing.assert_close(param, before[name], rtol=0, atol=0, msg=f"reference changed at {name}")
    for layer in (0, 1):
        name = LAYER.format(layer=layer)
        assert not torch.equal(model.get_parameter(name), before[name]), f"model layer {layer} did not train"


def test_shared_layers():
    """TRL's test_shared_layers: with num_shared_layers=1 layer 0 is frozen in the policy, layer 1 trains."""
    model = gpt2_vhead()
    reference = create_reference_model(model, num_shared_layers=1)
    before = snapshot(model)

    lm_step(model)

    for name, param in reference.named_parameters():
        torch.testing.assert_close(param, before[name], rtol=0, atol=0, msg=f"reference changed at {name}")
    layer0, layer1 = LAYER.format(layer=0), LAYER.format(layer=1)
    assert torch.equal(model.get_parameter(layer0), before[layer0])
    assert not model.get_parameter(layer0).requires_grad
    assert not torch.equal(model.get_parameter(layer1), before[layer1])


def test_shared_layers_share_memory():
    """TRL's test_shared_layers_share_memory (fails on TRL 0.29.1), for every parameter, embeddings included."""
    model = gpt2_vhead()
    reference = create_reference_model(model, num_shared_layers=1)
    ref_params = dict(reference.named_parameters())
    prefixes = tuple(f"pretrained_model.transformer.{m}." for m in ("wte", "wpe", "h.0"))
    shared = [name for name, _ in model.named_parameters() if name.startswith(prefixes)]
    assert "pretrained_model.transformer.wte.weight" in shared and "pretrained_model.transformer.wpe.weight" in shared
    assert LAYER.format(layer=0) in shared
    for name, param in model.named_parameters():
        if name in shared:
            assert ptr(ref_params[name]) == ptr(param), f"{name} is not shared"
            assert ref_params[name] is not param  # distinct Parameter objects (own requires_grad), same storage
        else:
            assert ptr(ref_params[name]) != ptr(param), f"{name} should be an independent copy"
    # after a training step the shared storage is still the very same memory
    lm_step(model)
    assert ptr(reference.get_parameter(LAYER.format(layer=0))) == ptr(model.get_parameter(LAYER.format(layer=0)))


# --------------------------------------------------------------------------------------------- every architecture
@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_every_architecture_shares_lower_layers(arch):
    model = wrap(arch)
    pattern, num_layers = find_layer_pattern(model)
    assert (pattern, num_layers) == (EXPECTED_PATTERN[arch], 2)
    assert pattern in LAYER_PATTERNS

    reference = create_reference_model(model, num_shared_layers=1)

    shared = set(names_below(model, pattern.format(layer=1)))
    assert any(f".{pattern.format(layer=0)}." in f".{name}" for name in shared), "layer 0 must be shared"
    ref_params = dict(reference.named_parameters())
    assert ref_params.keys() == dict(model.named_parameters()).keys()
    unshared = 0
    for name, param in model.named_parameters():
        if name in shared:
            assert ptr(ref_params[name]) == ptr(param), f"{arch}: {name} is below layer 1 but not shared"
            assert not param.requires_grad
        else:
            unshared += 1
            assert ptr(ref_params[name]) != ptr(param), f"{arch}: {name} is from layer 1 up but shared"
            assert param.requires_grad
    assert unshared and any(f".{pattern.format(layer=1)}." in f".{name}" for name in ref_params if name not in shared)

    with torch.no_grad():
        policy_out, reference_out = forward(model, arch), forward(reference, arch)
    torch.testing.assert_close(reference_out[0], policy_out[0], rtol=0, atol=0)  # logits
    torch.testing.assert_close(reference_out[2], policy_out[2], rtol=0, atol=0)  # values


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_seq2seq_full_copy_and_outputs(arch):
    """num_shared_layers=None on seq2seq: an independent copy with identical outputs, policy left trainable."""
    model = wrap(arch)
    reference = create_reference_model(model)
    assert all(requires_grad(model).values())
    assert not any(requires_grad(reference).values())
    assert not {ptr(p) for p in model.parameters()} & {ptr(p) for p in reference.parameters()}
    with torch.no_grad():
        torch.testing.assert_close(forward(reference, arch)[0], forward(model, arch)[0], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("num_shared_layers", [0, 1, 3])
def test_unique_parameter_bytes(num_shared_layers):
    """policy + reference == policy + the unshared parameters only (TRL 0.29.1: always 2x)."""
    model = gpt2_vhead(n_layer=4)
    policy = unique_bytes(model)
    params = dict(model.named_parameters())
    shared_names = ["pretrained_model.transformer.wte.weight", "pretrained_model.transformer.wpe.weight"] + [
        n for n in params for k in range(num_shared_layers) if n.startswith(f"pretrained_model.transformer.h.{k}.")
    ]
    unshared = policy - sum(nbytes(params[n]) for n in shared_names)  # wte is lm_head: counted once

    reference = create_reference_model(model, num_shared_layers=num_shared_layers)

    assert unique_bytes(model, reference) == policy + unshared
    assert unique_bytes(model, reference) < 2 * policy


def test_unique_parameter_bytes_full_copy():
    model = gpt2_vhead(n_layer=4)
    reference = create_reference_model(model, num_shared_layers=None)
    assert unique_bytes(model, reference) == 2 * unique_bytes(model)


def test_allocation_counter_sees_deepcopy():
    """The counter below is trustworthy: it sees every byte of a full deepcopy (parameters and buffers)."""
    model = gpt2_vhead(n_layer=2, n_embd=64)
    model.register_buffer("extra", torch.ones(1000))  # a plain tensor, copied outside aten.clone
    expected = sum(nbytes(t) for t in {ptr(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    with AllocationCounter(model) as counter:
        create_reference_model(model)
    assert counter.allocated >= expected


@pytest.mark.parametrize("num_shared_layers", [0, 7])
def test_no_transient_copy_of_shared_layers(num_shared_layers):
    """create_reference_model allocates the unshared parameters only (TRL deep-copied everything first: 2x peak)."""
    model = gpt2_vhead(n_layer=8, n_embd=256)
    params = dict(model.named_parameters())
    model_bytes = unique_bytes(model)
    shared = names_below(model, f"transformer.h.{num_shared_layers}")
    unshared_bytes = model_bytes - sum(nbytes(params[n]) for n in shared)
    buffer_bytes = sum(nbytes(b) for b in model.buffers())

    with AllocationCounter(model) as counter:
        create_reference_model(model, num_shared_layers=num_shared_layers)

    assert unshared_bytes <= counter.allocated <= unshared_bytes + buffer_bytes + 4096, (
        f"allocated {counter.allocated} B; unshared parameters are {unshared_bytes} B of {model_bytes} B"
    )
    if num_shared_layers == 7:
        assert counter.allocated < model_bytes / 5


# ---------------------------------------------------------------------------------------------------- validation
def test_typo_pattern_raises_and_changes_nothing():
    """TRL froze the *whole* policy and only logged a warning; here it raises before touching anything."""
    model = gpt2_vhead()
    before = snapshot(model)
    with pytest.raises(ValueError, match=re.escape("transformer.hh.{layer}")) as error:
        create_reference_model(model, num_shared_layers=1, pattern="transformer.hh.{layer}")
    assert "typo" in str(error.value)
    assert all(requires_grad(model).values()), "a typo'd pattern must not freeze the policy"
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name])


def test_pattern_without_layer_placeholder_raises():
    model = gpt2_vhead()
    with pytest.raises(ValueError, match=r"\{layer\}"):
        create_reference_model(model, num_shared_layers=1, pattern="transformer.h.1")
    assert all(requires_grad(model).values())


@pytest.mark.parametrize("bad", [2, 5, -1])
def test_num_shared_layers_out_of_range(bad):
    model = gpt2_vhead()  # 2 layers: 0..1 valid
    with pytest.raises(ValueError) as error:
        create_reference_model(model, num_shared_layers=bad)
    message = str(error.value)
    assert f"num_shared_layers={bad}" in message and "0..1" in message and "2 layers" in message
    assert all(requires_grad(model).values())


@pytest.mark.parametrize("bad", [1.0, "1", True])
def test_num_shared_layers_not_an_int(bad):
    model = gpt2_vhead()
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        create_reference_model(model, num_shared_layers=bad)
    assert all(requires_grad(model).values())


def test_no_pattern_matches_asks_for_pattern():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10))
    with pytest.raises(ValueError, match=r"Pass `pattern=`"):
        create_reference_model(model, num_shared_layers=1)
    assert all(requires_grad(model).values())


def test_explicit_default_pattern_equals_detection():
    model = gpt2_vhead(n_layer=4)
    reference = create_reference_model(model, num_shared_layers=2, pattern="transformer.h.{layer}")
    shared = set(names_below(model, "transformer.h.2"))
    assert LAYER.format(layer=1) in shared and LAYER.format(layer=2) not in shared
    for (name, param), ref_param in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert (ptr(param) == ptr(ref_param)) == (name in shared), name
        assert param.requires_grad == (name not in shared), name


class Blocks(nn.Module):
    """A non-transformers model with 12 blocks: custom pattern, and ``blocks.1`` must not catch ``blocks.10``."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(12))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = torch.tanh(block(h))
        return self.head(h)


@pytest.mark.parametrize("k", [1, 10])
def test_custom_pattern(k):
    torch.manual_seed(0)
    model = Blocks()
    with pytest.raises(ValueError, match="pattern="):
        create_reference_model(model, num_shared_layers=k)  # no default pattern fits
    reference = create_reference_model(model, num_shared_layers=k, pattern="blocks.{layer}")
    ref = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        is_shared = name.startswith("embed.") or (name.startswith("blocks.") and int(name.split(".")[1]) < k)
        assert (ptr(ref[name]) == ptr(param)) == is_shared, name
        assert param.requires_grad != is_shared, name
    x = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(reference(x), model(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- reference state
@pytest.mark.parametrize("num_shared_layers", [None, 0, 1])
def test_reference_frozen_eval_and_policy_mode_kept(num_shared_layers):
    model = gpt2_vhead().train()
    reference = create_reference_model(model, num_shared_layers=num_shared_layers)
    assert not any(requires_grad(reference).values())
    assert not reference.training and not any(m.training for m in reference.modules())
    assert model.training and all(m.training for m in model.modules()), "the policy's train/eval mode is kept"
    assert type(reference) is type(model) and hasattr(reference, "v_head")
    if num_shared_layers is None:
        assert all(requires_grad(model).values()), "a full copy leaves the policy trainable"


@pytest.mark.parametrize("num_shared_layers", [None, 0, 1])
def test_tied_weights_stay_tied(num_shared_layers):
    model = gpt2_vhead()
    hf = model.pretrained_model
    assert hf.lm_head.weight is hf.transformer.wte.weight
    reference = create_reference_model(model, num_shared_layers=num_shared_layers)
    ref_hf = reference.pretrained_model
    assert ref_hf.lm_head.weight is ref_hf.transformer.wte.weight
    assert (ptr(ref_hf.lm_head.weight) == ptr(hf.lm_head.weight)) == (num_shared_layers is not None)


def test_deepspeed_zero3_rejected_before_any_change(monkeypatch):
    import transformers.integrations.deepspeed as ds

    monkeypatch.setattr(ds, "is_deepspeed_zero3_enabled", lambda: True)
    model = gpt2_vhead()
    with pytest.raises(ValueError, match="ZeRO-3"):
        create_reference_model(model, num_shared_layers=1)
    assert all(requires_grad(model).values())


def test_tie_shared_parameters_after_dtype_round_trip():
    model = gpt2_vhead()
    reference = create_reference_model(model, num_shared_layers=1)
    shared = names_below(model, "transformer.h.1")
    ref = dict(reference.named_parameters())
    assert all(ptr(ref[n]) == ptr(model.get_parameter(n)) for n in shared)

    reference.to(torch.float64)
    reference.to(torch.float32)  # Module.to replaces each parameter's data: silently un-shared
    assert all(ptr(ref[n]) != ptr(model.get_parameter(n)) for n in shared)

    assert tie_shared_parameters(reference, model) == len(shared)
    for name, param in model.named_parameters():
        assert (ptr(ref[name]) == ptr(param)) == (name in shared), name  # unshared ones (equal values) stay apart
    assert reference.pretrained_model.lm_head.weight is reference.pretrained_model.transformer.wte.weight
    assert not any(requires_grad(reference).values())
    assert tie_shared_parameters(reference, model) == 0
    assert unique_bytes(model, reference) < 2 * unique_bytes(model)


def test_tie_shared_parameters_keeps_a_bf16_reference_bf16():
    """A reference kept in bf16 on purpose is not re-tied: LayerNorm ones/zeros compare equal across dtypes, and
    tying them used to leave a half-fp32, half-bf16 reference whose forward crashed."""
    model = gpt2_vhead()
    reference = create_reference_model(model, num_shared_layers=1).to(torch.bfloat16)
    assert tie_shared_parameters(reference, model) == 0
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits, _, value = reference(input_ids=torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, VOCAB) and value.shape == (1, 3)


def test_public_exports():
    assert lit_vhead.create_reference_model is create_reference_model
    assert lit_vhead.LAYER_PATTERNS is LAYER_PATTERNS
