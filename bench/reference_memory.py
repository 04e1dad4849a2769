"""Memory of policy + reference model: TRL 0.29.1's ``create_reference_model`` vs lit_vhead's, and the PEFT reference.

For a GPT-2-small-sized config and a Llama-style one (random init, fp32, real CPU tensors), the policy is a
``lit_vhead.AutoModelForCausalLMWithValueHead`` and each row builds a reference from it:

* ``trl k=...``: ``trl.experimental.utils.create_reference_model`` (0.29.1), ``num_shared_layers`` = k;
* ``ours k=...``: ``lit_vhead.create_reference_model`` (k = None is a full frozen copy);
* ``peft``: LoRA (r=8, peft's default target modules) on the policy; the reference is the same model with the adapters
  disabled (``with policy.pretrained_model.disable_adapter():``), so it costs no bytes at all.

Columns:

* ``policy MB``: unique bytes of the policy's parameters and buffers;
* ``ref extra MB``: what the reference adds: unique bytes of policy + reference (storages deduplicated by
  ``data_ptr``) minus the policy's;
* ``total vs policy``: (policy + extra) / policy; 2.00x is a full copy;
* ``alloc MB``: bytes allocated while ``create_reference_model`` ran, counted by a ``TorchDispatchMode`` that sums
  every new storage an aten op produces (``deepcopy`` copies parameters with ``aten.clone`` and buffers with
  ``aten.copy_`` into a fresh storage, both seen): the transient cost, even of a copy that is later shared;
* ``trainable %``: share of the policy's parameter bytes still trainable afterwards (both freeze the shared layers).

Run: ``OMP_NUM_THREADS=1 python bench/reference_memory.py`` (``--quick``: 4-layer, 256-wide configs). Prints a table
and one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import warnings

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import lit_vhead  # noqa: E402
import lit_vhead.layers  # noqa: E402

warnings.filterwarnings("ignore")
transformers.utils.logging.set_verbosity_error()
MB = 2**20


def ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def storages(*models: torch.nn.Module) -> dict[int, int]:
    """``{storage data_ptr: nbytes}`` of every parameter and buffer (shared or tied storage counted once)."""
    out = {}
    for model in models:
        for t in [*model.parameters(), *model.buffers()]:
            out[ptr(t)] = t.untyped_storage().nbytes()
    return out


class AllocationCounter(TorchDispatchMode):
    """Bytes of the new storages produced by aten ops while active (nothing is freed during a deepcopy)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.known = set(storages(model))
        self.allocated = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and ptr(t) not in self.known and t.untyped_storage().nbytes():
                self.known.add(ptr(t))
                self.allocated += t.untyped_storage().nbytes()
        return out


def make_config(name: str, quick: bool) -> transformers.PretrainedConfig:
    layers, width = (4, 256) if quick else (12, 768)
    if name == "gpt2-small":
        return transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=width // 64, vocab_size=50257)
    return transformers.LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=width,
        intermediate_size=width * 8 // 3 // 256 * 256,
        num_attention_heads=width // 64,
        num_key_value_heads=width // 64 // 3,
        vocab_size=32000,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
    )


def row(config: str, method: str, k, policy, reference, allocated: int) -> dict:
    policy_bytes = sum(storages(policy).values())
    total = sum(storages(policy, reference).values()) if reference is not None else policy_bytes
    params = {ptr(p): p for p in policy.parameters()}.values()
    trainable = sum(p.untyped_storage().nbytes() for p in params if p.requires_grad)
    return {
        "config": config,
        "method": method,
        "num_shared_layers": k,
        "policy_bytes": policy_bytes,
        "ref_extra_bytes": total - policy_bytes,
        "total_bytes": total,
        "total_vs_policy": total / policy_bytes,
        "alloc_bytes": allocated,
        "trainable_pct": 100 * trainable / sum(p.untyped_storage().nbytes() for p in params),
    }


def run_config(name: str, ks: list[int], quick: bool) -> list[dict]:
    from trl.experimental.utils import create_reference_model as trl_create_reference_model

    config = make_config(name, quick)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    policy = lit_vhead.AutoModelForCausalLMWithValueHead(hf)
    n_layers = lit_vhead.layers.find_layer_pattern(policy)[1]
    rows = []
    for method, fn in (("trl", trl_create_reference_model), ("ours", lit_vhead.create_reference_model)):
        for k in [None, 0, *ks]:
            if k is not None and k >= n_layers:
                continue
            policy.requires_grad_(True)  # both freeze the shared layers in the policy: start each row afresh
            with AllocationCounter(policy) as counter:
                reference = fn(policy, num_shared_layers=k)
            rows.append(row(name, method, k, policy, reference, counter.allocated))
            del reference
            gc.collect()
    policy.requires_grad_(True)

    # PEFT: LoRA on the policy; the reference is the same weights with the adapters switched off.
    from peft import LoraConfig, get_peft_model

    probe = torch.randint(0, config.vocab_size, (1, 8))
    with torch.no_grad():
        base_logits = hf(probe).logits
    peft_policy = lit_vhead.AutoModelForCausalLMWithValueHead(
        get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM"))
    ).eval()
    with torch.no_grad():
        for n, p in peft_policy.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)  # as if trained: the adapter-enabled policy now differs from the base
        with peft_policy.pretrained_model.disable_adapter():
            ref_logits = peft_policy(probe)[0]
        policy_logits = peft_policy(probe)[0]
    assert torch.equal(ref_logits, base_logits) and not torch.equal(policy_logits, base_logits)
    rows.append(row(name, "peft", None, peft_policy, None, 0))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="gpt2-small,llama", help="comma-separated: gpt2-small, llama")
    parser.add_argument("--shared", default="2,4,8", help="num_shared_layers values besides None and 0")
    parser.add_argument("--quick", action="store_true", help="4 layers, 256 wide (k >= 4 skipped)")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ks = [int(k) for k in args.shared.split(",") if k]

    rows = []
    for name in args.configs.split(","):
        rows += run_config(name.strip(), ks, args.quick)

    print(
        f"torch {torch.__version__}, fp32, {'quick: 4 layers x 256' if args.quick else '12 layers x 768'}; "
        "MB = 2**20 bytes; unique storages (data_ptr) of parameters and buffers"
    )
    header = (
        f"{'config':<11} {'method':<6} {'k':>4} {'policy MB':>10} {'ref extra MB':>13} {'total MB':>9} "
        f"{'vs policy':>10} {'alloc MB':>9} {'trainable %':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        k = "-" if r["method"] == "peft" else str(r["num_shared_layers"])
        print(
            f"{r['config']:<11} {r['method']:<6} {k:>4} {r['policy_bytes'] / MB:>10.1f} "
            f"{r['ref_extra_bytes'] / MB:>13.1f} {r['total_bytes'] / MB:>9.1f} {r['total_vs_policy']:>9.3f}x "
            f"{r['alloc_bytes'] / MB:>9.1f} {r['trainable_pct']:>11.1f}%"
        )
    print("peft: the adapter-disabled reference reproduces the base logits exactly, with LoRA B perturbed (checked)")
    print(json.dumps({"bench": "reference_memory", "torch": torch.__version__, "quick": args.quick, "rows": rows}))


if __name__ == "__main__":
    sys.exit(main())
