"""Value-head overhead: a bare ``AutoModelForCausalLM`` vs lit_vhead's and TRL 0.29.1's value-head wrappers.

All three run the *same* weights (one GPT-2 instance; TRL's ``v_head`` gets a copy of ours, so values match too), in
eval mode, with the same inputs (``input_ids`` and an all-ones ``attention_mask``; ``use_cache=False`` unless
``--use-cache``). Two modes:

* ``no_grad``: ``model(...)`` under ``torch.no_grad`` (rollout scoring, value estimation);
* ``fwd_bwd``: ``(logits.mean() + value.mean()).backward()`` (bare: ``logits.mean()``).

Time: the median of ``--repeats`` timed calls after ``--warmup`` untimed ones (the minimum is printed too: on a shared
machine other load only ever adds time, so min-vs-min is the steadier ratio); the three models are interleaved round by
round, in a rotating order, so that drift of a shared machine and position effects hit them alike.

Peak activation memory, measured deterministically on CPU (no allocator statistics exist there): one extra call runs
under a ``TorchDispatchMode`` that sees the output of every aten op, forward and backward. Each output whose
``UntypedStorage`` is new (not a parameter, buffer or input, not seen before) is an allocation of
``storage.nbytes()``; a ``weakref.finalize`` on that storage object records its release. PyTorch keeps one Python
object per live ``StorageImpl`` (PyObject preservation), so the finalizer fires exactly when the memory is freed, even
when only autograd's saved tensors or views still hold it. The peak of the running sum of live bytes is the peak
activation memory; storages that end up as a parameter's ``.grad`` are left out (they are the same for every model and
are not activations). Scratch buffers used *inside* a single aten kernel are invisible at this level, alike for all
three models. The figures are exact and repeatable, independent of the malloc in use.

Run: ``OMP_NUM_THREADS=1 python bench/value_head.py`` (``--quick`` for a fast sanity run). Prints a table and one
JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import warnings
import weakref

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import lit_vhead  # noqa: E402

warnings.filterwarnings("ignore")
transformers.utils.logging.set_verbosity_error()

TARGET_TIME = 1.03  # ours within 3% of bare time
TARGET_MEM = 1.02  # ours within 2% of bare activation memory
TRL_NO_GRAD_MEM_MEASURED = 1.20  # TRL's no-grad activation memory vs bare, measured before


# ------------------------------------------------------------------------------------------------ memory tracking
class PeakLiveBytes(TorchDispatchMode):
    """Peak of live bytes of the storages allocated by aten ops while active (see the module docstring)."""

    def __init__(self, preexisting: list[torch.Tensor]):
        super().__init__()
        self.preexisting = weakref.WeakSet(t.untyped_storage() for t in preexisting)
        self.tracked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # storage -> allocation id
        self.events: list[tuple[int, int]] = []  # (allocation id, +bytes / -bytes) in time order
        self.recording = True

    def _free(self, sid: int, nbytes: int) -> None:
        if self.recording:
            self.events.append((sid, -nbytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if storage in self.preexisting or storage in self.tracked or storage.nbytes() == 0:
                continue
            sid = len(self.tracked) + len(self.events)
            self.tracked[storage] = sid
            self.events.append((sid, storage.nbytes()))
            weakref.finalize(storage, self._free, sid, storage.nbytes())
        return out

    def peak(self, exclude: set[int] = frozenset()) -> int:
        live = peak = 0
        for sid, delta in self.events:
            if sid not in exclude:
                live += delta
                peak = max(peak, live)
        return peak


# ------------------------------------------------------------------------------------------------ models and calls
def build(name: str, args) -> dict:
    if name == "gpt2-small":
        config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    else:
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=args.tiny_vocab, n_positions=1024)
    torch.manual_seed(0)
    bare = transformers.AutoModelForCausalLM.from_config(config).eval()
    ours = lit_vhead.AutoModelForCausalLMWithValueHead(bare).eval()
    from trl.experimental.ppo import AutoModelForCausalLMWithValueHead as TRLValueHead

    trl = TRLValueHead.from_pretrained(bare).eval()
    trl.v_head.summary.load_state_dict(ours.v_head.summary.state_dict())
    assert trl.pretrained_model is bare and ours.pretrained_model is bare  # one set of weights
    return {"config": config, "models": {"bare": bare, "ours": ours, "trl": trl}}


def make_call(kind: str, model, mode: str, inputs: dict):
    def outputs():
        if kind == "bare":
            return model(**inputs).logits, None
        logits, _, value = model(**inputs)
        return logits, value

    def call():
        if mode == "no_grad":
            with torch.no_grad():
                return outputs()
        model.zero_grad(set_to_none=True)
        logits, value = outputs()
        loss = logits.mean() + (value.mean() if value is not None else 0)
        loss.backward()
        return logits, value

    return call


def time_calls(calls: dict, warmup: int, repeats: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for call in calls.values():
            call()
    kinds = list(calls)
    times = {kind: [] for kind in kinds}
    for round_ in range(repeats):
        for kind in kinds[round_ % len(kinds) :] + kinds[: round_ % len(kinds)]:  # rotate who goes first
            call = calls[kind]
            gc.collect()
            start = time.perf_counter()
            result = call()
            times[kind].append(time.perf_counter() - start)
            del result
    return times


def peak_memory(model, call, inputs: dict) -> int:
    gc.collect()
    model.zero_grad(set_to_none=True)
    tracker = PeakLiveBytes([*model.parameters(), *model.buffers(), *inputs.values()])
    with tracker:
        result = call()
        del result
        gc.collect()
    tracker.recording = False
    grads = {
        tracker.tracked[p.grad.untyped_storage()]
        for p in model.parameters()
        if p.grad is not None and p.grad.untyped_storage() in tracker.tracked
    }
    model.zero_grad(set_to_none=True)
    return tracker.peak(exclude=grads)


def check_outputs(models: dict, inputs: dict) -> dict:
    with torch.no_grad():
        bare = models["bare"](**inputs).logits
        ours_logits, _, ours_value = models["ours"](**inputs)
        trl_logits, _, trl_value = models["trl"](**inputs)
    return {
        "ours_logits_equal_bare": bool(torch.equal(ours_logits, bare)),
        "trl_logits_equal_bare": bool(torch.equal(trl_logits, bare)),
        "values_max_abs_diff_ours_trl": float((ours_value - trl_value).abs().max()),
    }


def run_config(name: str, args) -> tuple[list[dict], dict]:
    built = build(name, args)
    models = built["models"]
    vocab = built["config"].vocab_size
    torch.manual_seed(1)
    inputs = {
        "input_ids": torch.randint(0, vocab, (args.batch, args.seq)),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
        "use_cache": args.use_cache,
    }
    tensor_inputs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    checks = check_outputs(models, inputs)
    repeats = args.repeats if name == "gpt2-small" else args.tiny_repeats
    rows = []
    for mode in ("no_grad", "fwd_bwd"):
        calls = {kind: make_call(kind, model, mode, inputs) for kind, model in models.items()}
        times = time_calls(calls, args.warmup, repeats)
        peaks = {kind: peak_memory(models[kind], calls[kind], tensor_inputs) for kind in models}
        for kind in models:
            median = statistics.median(times[kind])
            rows.append(
                {
                    "config": name,
                    "model": kind,
                    "mode": mode,
                    "repeats": repeats,
                    "time_ms": median * 1e3,
                    "time_min_ms": min(times[kind]) * 1e3,
                    "time_vs_bare": median / statistics.median(times["bare"]),
                    "time_min_vs_bare": min(times[kind]) / min(times["bare"]),
                    "peak_act_bytes": peaks[kind],
                    "peak_act_mb": peaks[kind] / 2**20,
                    "mem_vs_bare": peaks[kind] / peaks["bare"],
                }
            )
    return rows, checks


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", "-B", type=int, default=4)
    parser.add_argument("--seq", "-T", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per model and mode (gpt2-small)")
    parser.add_argument("--tiny-repeats", type=int, default=200, help="timed calls per model and mode (tiny)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--configs", default="gpt2-small,tiny", help="comma-separated: gpt2-small, tiny")
    parser.add_argument("--tiny-vocab", type=int, default=259, help="vocabulary of the tiny config")
    parser.add_argument("--use-cache", action="store_true", help="let the models build a KV cache (off: scoring)")
    parser.add_argument("--quick", action="store_true", help="B=1, T=16, 2 repeats (tiny: 5): a sanity run")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.repeats, args.tiny_repeats, args.warmup = 1, 16, 2, 5, 1
    torch.manual_seed(0)

    all_rows, all_checks = [], {}
    for name in args.configs.split(","):
        rows, checks = run_config(name.strip(), args)
        all_rows += rows
        all_checks[name] = checks

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, B={args.batch} T={args.seq}, "
        f"use_cache={args.use_cache}, warm-up {args.warmup}; time = median of N repeats (min: right columns)"
    )
    header = (
        f"{'config':<11} {'model':<5} {'mode':<8} {'N':>3} {'time ms':>10} {'vs bare':>8} "
        f"{'peak act MB':>12} {'vs bare':>8} | {'min ms':>9} {'vs bare':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in all_rows:
        print(
            f"{r['config']:<11} {r['model']:<5} {r['mode']:<8} {r['repeats']:>3} {r['time_ms']:>10.2f} "
            f"{r['time_vs_bare']:>7.3f}x {r['peak_act_mb']:>12.2f} {r['mem_vs_bare']:>7.3f}x | "
            f"{r['time_min_ms']:>9.2f} {r['time_min_vs_bare']:>7.3f}x"
        )
    print("output checks:", all_checks)

    targets = []
    for r in all_rows:
        if r["model"] == "ours":
            targets.append(
                f"{r['config']}/{r['mode']}: time {r['time_vs_bare']:.3f}x "
                f"(min {r['time_min_vs_bare']:.3f}x) "
                f"({'PASS' if r['time_vs_bare'] <= TARGET_TIME else 'MISS'} <= {TARGET_TIME}), "
                f"mem {r['mem_vs_bare']:.3f}x ({'PASS' if r['mem_vs_bare'] <= TARGET_MEM else 'MISS'} "
                f"<= {TARGET_MEM})"
            )
        if r["model"] == "trl" and r["mode"] == "no_grad":
            targets.append(
                f"{r['config']}/trl no_grad mem {r['mem_vs_bare']:.3f}x (measured before: {TRL_NO_GRAD_MEM_MEASURED}x)"
            )
    print("targets:")
    for line in targets:
        print("  " + line)
    print(
        json.dumps(
            {
                "bench": "value_head",
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "batch": args.batch,
                "seq": args.seq,
                "use_cache": args.use_cache,
                "quick": args.quick,
                "rows": all_rows,
                "checks": all_checks,
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
