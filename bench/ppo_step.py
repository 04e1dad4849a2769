"""PPO-step benchmark: lit_vhead's PPO step vs the bare-transformers floor, TRL 0.11.4 and the GEMM limit.

Presets (``--preset``; any field can still be set by its flag):

- ``workload`` (issue 12's: the one TRL classic was measured on): GPT-2 config n_layer=4, n_embd=256,
  n_head=4, vocab_size=512, random init, batch 32, 16+32 tokens, mini-batch 8, 4 PPO epochs, 1 thread.
- ``gpt2-small``: GPT-2 small's config (12x768, vocab 50257), random init, batch 16, 16+32 tokens, mini-batch 4,
  4 PPO epochs, 2 threads.

Common to both: queries of ``query_len`` token ids drawn uniformly from the vocabulary, exactly ``response_len``
sampled response tokens (min = max new tokens, top_k=0, top_p=1, no EOS stop), reward = fraction of even response ids,
Adam lr 1e-4, dropout off in every PPO forward (as TRL classic's passes and ``PPOModule``).

Sides (``--sides``), each in its own process (so each has its own peak RSS), ``OMP_NUM_THREADS`` = ``--threads``:

- ``ours``: the product: ``PPOModule`` + ``lightning.Trainer`` (reference = full frozen copy, default ``PPOConfig``:
  ``cpu_kernels="auto"``), one Lightning epoch per PPO step; ``wall`` is the whole epoch (data, ``training_step``,
  logging, loop), split by the module's logged ``time/ppo/*`` metrics. Variants of it: ``plain``
  (``ppo.cpu_kernels=False``: PyTorch's default kernels), ``onednn`` (``ppo.cpu_kernels=True``), ``bf16``
  (``precision=bf16-mixed``), ``bf16-plain``
  (both), ``compile`` (``ppo.compile=True``), ``compile-plain`` (both), ``bf16-compile`` (both),
  ``in-backward`` (``ppo.optimizer_in_backward=True``: each parameter stepped, and its gradient dropped, during
  backward), ``shared`` (``ref=shared``,
  k = n_layer/2), ``peft`` (LoRA r=8 on all linear layers, ``ref=peft``: the policy with adapters disabled),
  ``critic`` (``critic="model"``: a separate value network, a copy of the policy's base + a one-output head, as TRL's
  experimental ``PPOTrainer`` trains; compare it with ``ppov2``), ``critic-no-undo`` (the same with
  ``ppo.undo_failed_update=False``: no copy of the weights and optimizer state before each PPO step's updates, which
  TRL does not make either), ``critic-lora`` (``peft`` with ``critic="lora"``: LoRA adapters + a head on the policy's
  frozen base; compare it with ``peft`` and ``critic``).
- ``trainer``: ``lit_vhead.PPOTrainer.step`` (TRL's classic loop API, on Fabric), run by the very script of the
  ``trl`` side (``bench/_trl_classic_ppo.py --impl lit_vhead``: only the import differs).
- ``ppov2``: TRL 0.29.1's experimental ``PPOTrainer`` (``trl.experimental.ppo``, a separate value model) on the same
  workload, run by ``bench/_trl_ppov2.py`` under this repository's python (see its docstring for what it matches).
- ``floor``: bare transformers doing only the work PPO cannot avoid: one KV-cached ``generate``, one no-grad policy
  forward (backbone, LM head and a separate ``nn.Linear`` value head on the response positions), the no-grad
  reference forward, then ppo_epochs x minibatches of forward + backward + ``Adam.step`` (PyTorch's default kernels).
- ``trl`` (only with ``--trl-python``): TRL 0.11.4's ``PPOTrainer.step(queries, responses, scores)`` after a batched
  ``model.generate`` with the same sampling settings, in TRL's own venv. Create that venv once with::

      python3 -m venv /tmp/trl-classic && /tmp/trl-classic/bin/pip install torch==2.13.0 trl==0.11.4 \\
          transformers==4.46.3 accelerate==1.1.1 datasets==3.1.0 peft==0.13.2 pyarrow==18.1.0 "numpy<2.3" rich

  (``rich`` is imported by ``trl.trainer.utils`` 0.11.4 but not declared as its dependency.)
- ``gemm``: the arithmetic limit. It records every GEMM (``mm``/``addmm``/``bmm``: shapes, layouts, counts) of one
  floor step, then each round times each distinct GEMM with PyTorch's fp32 path (MKL ``sgemm`` on CPU, cuBLAS on
  GPU) and, on x86 CPUs, with oneDNN (what ``cpu_kernels`` uses), and adds them up by count. Its ``wall`` is the
  faster of the two: the time this machine needs for the step's matrix products alone, measured in the same run
  (attention's own products, a few per mille of the FLOPs at 48 tokens, are not in it). It also reports the GEMM
  FLOPs per PPO step and both GFLOP/s rates.

The sides are interleaved step by step: all side processes are started and set up first, then a gate lets exactly one
of them run one PPO step at a time, round-robin (the order rotates every step), so the machine's noise hits every side
alike and no two sides ever run at once. ``--warmup`` steps per side are dropped, then ``--steps`` are measured; every
side draws the same queries at the same step. The table shows median and min of the measured steps, and ``first``
(the first step, compilation included: every side starts with an empty Inductor cache). The machine is shared:
compare ratios from one run, and repeat runs.

    OMP_NUM_THREADS=1 python bench/ppo_step.py --trl-python /tmp/trl-classic/bin/python --steps 10
    OMP_NUM_THREADS=1 python bench/ppo_step.py --sides ours,plain,bf16,compile --steps 10
    python bench/ppo_step.py --preset gpt2-small --trl-python /tmp/trl-classic/bin/python
    OMP_NUM_THREADS=1 TRL_EXPERIMENTAL_SILENCE=1 python bench/ppo_step.py --sides critic,ppov2 --steps 10
    python3 bench/ppo_step.py --preset gpt2-small --accelerator gpu --sides floor,ours,gemm   # on a GPU

The report starts with the machine (CPU model, whether bf16 has hardware support: AMX or AVX512-BF16) and the
``cpu_kernels="auto"`` decision with the probe's GEMM rates: figures hold for that CPU only. The probe runs once, in
this script before any side starts (``--cpu-kernels auto``, the default), and every lit_vhead side that does not set
``cpu_kernels`` itself runs that choice: a probe taken in each side's process could decide differently under a
moment's load, and the sides would then compare different kernels.

Prints a table, then ONE JSON line (``{"bench": "ppo_step", ...}``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "BENCH_RESULT "
STEP_PREFIX = "BENCH_STEP "
READY = "BENCH_READY"
PARTS = ("generation", "scoring", "optimisation")
# The workload's sampling for every side: pure sampling, exactly the response length, no EOS stop, KV cache.
SAMPLING = dict(do_sample=True, top_k=0, top_p=1.0, eos_token_id=None, use_cache=True)

PRESETS = {
    "workload": dict(n_layer=4, n_embd=256, n_head=4, vocab_size=512, batch_size=32, query_len=16, response_len=32,
                     mini_batch_size=8, ppo_epochs=4, threads=1, steps=10, warmup=2,
                     sides="floor,ours,plain,onednn,bf16,trainer,trl,gemm"),
    "gpt2-small": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, batch_size=16, query_len=16,
                       response_len=32, mini_batch_size=4, ppo_epochs=4, threads=2, steps=3, warmup=1,
                       sides="ours,in-backward,trl,shared,peft,gemm"),
}
# The PPOModule variants: what each changes from the defaults.
OURS = {
    "ours": {},
    "plain": {"cpu_kernels": False},
    "onednn": {"cpu_kernels": True},
    "bf16": {"precision": "bf16-mixed"},
    "bf16-plain": {"precision": "bf16-mixed", "cpu_kernels": False},
    "compile": {"compile": True},
    "compile-plain": {"compile": True, "cpu_kernels": False},
    "bf16-compile": {"precision": "bf16-mixed", "compile": True},
    "in-backward": {"optimizer_in_backward": True},
    "shared": {"ref": "shared"},
    "peft": {"peft": True},
    "critic": {"critic": "model"},
    "critic-no-undo": {"critic": "model", "undo_failed_update": False},
    "critic-lora": {"peft": True, "critic": "lora"},
}
SIDES = (*OURS, "trainer", "floor", "trl", "ppov2", "gemm")


# ----------------------------------------------------------------------------------------- shared by every side
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="workload")
    for name in ("n_layer", "n_embd", "n_head", "vocab_size", "batch_size", "query_len", "response_len",
                 "mini_batch_size", "ppo_epochs", "threads"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=None, help="measured PPO steps per side")
    p.add_argument("--warmup", type=int, default=None, help="PPO steps dropped at the start of each side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--trl-python", default=None, help="python of a venv with TRL 0.11.4 (see the docstring)")
    p.add_argument("--sides", default=None, help=f"comma-separated subset of {','.join(SIDES)}")
    p.add_argument("--cpu-kernels", choices=("auto", "true", "false"), default="auto",
                   help="ppo.cpu_kernels of the lit_vhead sides that do not set it; auto: probed once here, before any "
                        "side starts, and that choice passed to every side")
    p.add_argument("--impl", default="trl", help=argparse.SUPPRESS)  # _trl_classic_ppo.py: trl | lit_vhead
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)  # internal: run one side in this process
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = [s for s in args.sides.split(",") if s and s not in SIDES]
    if unknown:
        p.error(f"unknown side(s) {unknown}; choose from {', '.join(SIDES)}")
    return args


def gpt2_config_kwargs(args) -> dict:
    return {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head, "vocab_size": args.vocab_size}


def make_queries(seed: int, step: int, batch_size: int, query_len: int, vocab_size: int):
    """The queries of PPO step ``step``: row ``i`` is drawn from its own generator, the same on every side."""
    import torch

    rows = []
    for row in range(batch_size):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step * batch_size + row)
        rows.append(torch.randint(vocab_size, (query_len,), generator=g))
    return torch.stack(rows)


def build_id_tokenizer(vocab_size: int):
    """A real fast tokenizer whose tokens are the ids 0..V-1 (``<i>``), pad = 0, eos = 1, left padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<2>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<0>", eos_token="<1>", unk_token="<2>", padding_side="left"
    )


def device_of(args) -> str:
    return "cuda" if args.accelerator == "gpu" else "cpu"


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def peak_memory() -> dict:
    """Peak RSS of this process (and peak CUDA memory allocated, when CUDA was used), MiB."""
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def peak_rss_mib() -> float:  # kept for bench/_trl_classic_ppo.py
    return peak_memory()["peak_rss_mib"]


def emit(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


class StepGate:
    """The child's side of the interleaving protocol: announce readiness once, then wait for ``go`` before each step
    and report each step's record when it is done."""

    def __init__(self) -> None:
        self.ready = False

    def wait(self) -> None:
        if not self.ready:
            print(READY, flush=True)
            self.ready = True
        line = sys.stdin.readline()
        if line.strip() != "go":
            raise SystemExit(f"step gate: expected 'go', got {line!r}")

    def done(self, record: dict) -> None:
        print(STEP_PREFIX + json.dumps(record), flush=True)


def _quiet() -> None:
    import logging
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "torch._dynamo", "torch._inductor"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ----------------------------------------------------------------------------------------- side: ours (PPOModule)
def run_ours(args, side: str) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, Dataset, Sampler

    _quiet()
    from lit_vhead.module import PPOModule
    from lit_vhead.reference import ReferenceConfig
    from lit_vhead.rewards import FunctionReward, even_token_fraction

    variant = OURS[side]

    class QueryRows(Dataset):
        """Index ``step * B + row`` -> row ``row`` of ``make_queries(seed, step)`` (an unbounded map-style set)."""

        def __getitem__(self, index: int):
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + index)
            return torch.randint(args.vocab_size, (args.query_len,), generator=g)

        def __len__(self) -> int:  # only for DataLoader's sanity; the sampler decides what is drawn
            return 2**62

    class StepSampler(Sampler[int]):
        """The rows of one PPO step per epoch (Lightning calls ``set_epoch`` on ``dataloader.sampler``)."""

        def __init__(self) -> None:
            self.epoch = 0

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

        def __iter__(self):
            return iter(range(self.epoch * args.batch_size, (self.epoch + 1) * args.batch_size))

        def __len__(self) -> int:
            return args.batch_size

    class RandomQueryDataModule(L.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            def collate(rows):
                ids = torch.stack(rows)
                return {"query_ids": ids, "query_mask": torch.ones_like(ids)}

            return DataLoader(QueryRows(), sampler=StepSampler(), batch_size=args.batch_size, collate_fn=collate)

    class StepTimer(L.Callback):
        """Gates every PPO step (= Lightning epoch) and times it from one epoch start to the next, so ``wall``
        includes everything Lightning does per step (data, ``training_step``, logging, epoch-end hooks)."""

        def __init__(self, gate: StepGate) -> None:
            self.gate, self._tic, self._record = gate, None, None

        def _finish(self) -> None:
            if self._tic is not None:
                self._record["wall"] = time.perf_counter() - self._tic
                self.gate.done(self._record)
                self._tic = None

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._finish()
            self.gate.wait()
            self._tic = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.current_epoch < args.warmup:  # the sampler's set_epoch really gives each step its queries
                expected = make_queries(
                    args.seed, trainer.current_epoch, args.batch_size, args.query_len, args.vocab_size
                )
                assert torch.equal(batch["query_ids"].cpu(), expected), "queries differ from make_queries(seed, step)"

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("time/ppo/")}
            self._record = {
                "total": m["time/ppo/total"] + m["time/ppo/generation"],
                "generation": m["time/ppo/generation"],
                "scoring": m["time/ppo/forward_pass"] + m["time/ppo/compute_rewards"],
                "optimisation": m["time/ppo/optimize_step"],
                "reward": float(trainer.callback_metrics["env/reward_mean"]),
            }

        def on_train_end(self, trainer, pl_module) -> None:
            self._finish()

    torch.manual_seed(args.seed)
    ref = {
        "shared": ReferenceConfig("shared", num_shared_layers=args.n_layer // 2),
        "peft": ReferenceConfig("peft"),
    }.get(variant.get("ref", "peft" if variant.get("peft") else "copy"), "copy")
    peft = None
    if variant.get("peft"):
        from peft import LoraConfig

        peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    module = PPOModule(
        # bos/eos: the id tokenizer's eos (GPT2Config's default 50256 lies outside the vocabulary, which PPOModule
        # refuses); responses have a fixed length (min_new_tokens), so no EOS ends them either way
        {"kind": "causal", "config": {"model_type": "gpt2", **gpt2_config_kwargs(args), "bos_token_id": 1,
                                      "eos_token_id": 1}},
        build_id_tokenizer(args.vocab_size),
        FunctionReward(even_token_fraction),
        ppo={
            "seed": args.seed,
            "steps": args.warmup + args.steps,
            "batch_size": args.batch_size,
            "mini_batch_size": args.mini_batch_size,
            "ppo_epochs": args.ppo_epochs,
            "learning_rate": args.learning_rate,
            "cpu_kernels": variant.get("cpu_kernels", args.cpu_kernels),
            "compile": variant.get("compile", False),
            "optimizer_in_backward": variant.get("optimizer_in_backward", False),
            "undo_failed_update": variant.get("undo_failed_update", True),
            "generation": {
                "max_new_tokens": args.response_len,
                "min_new_tokens": args.response_len,
                "do_sample": True,
                "top_k": 0,
                "top_p": 1.0,
                "stop_at_eos": False,
            },
        },
        peft=peft,
        ref=ref,
        critic=variant.get("critic"),
        sample_table_every=0,
    )
    trainer = L.Trainer(
        max_epochs=args.warmup + args.steps,
        accelerator=args.accelerator,
        devices=1,
        precision=variant.get("precision", "32-true"),
        callbacks=[StepTimer(StepGate())],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=RandomQueryDataModule())
    return {"side": side, **peak_memory()}


# ----------------------------------------------------------------------------------------- side: floor
def build_floor(args):
    """The floor's models and optimizer: bare GPT-2, a separate value head, a frozen full copy, Adam."""
    import copy

    import torch
    from torch import nn
    from transformers import GPT2Config, GPT2LMHeadModel

    device = device_of(args)
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(GPT2Config(**gpt2_config_kwargs(args))).eval().to(device)  # dropout off, as in PPO
    v_head = nn.Linear(args.n_embd, 1).to(device)
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.Adam([*model.parameters(), *v_head.parameters()], lr=args.learning_rate)
    return model, v_head, reference, optimizer


def floor_step(args, step: int, model, v_head, reference, optimizer) -> dict:
    """One PPO step of unavoidable work; returns its timings."""
    import torch

    device = device_of(args)
    q_len, r_len, bs, mbs = args.query_len, args.response_len, args.batch_size, args.mini_batch_size
    span = slice(q_len - 1, q_len + r_len - 1)  # positions whose next token is a response token

    def score(lm, head, seq):
        """Response log-probs (and values): backbone, then LM head and value head on the response positions only."""
        hidden = lm.transformer(input_ids=seq, use_cache=False).last_hidden_state[:, span]
        logprobs = lm.lm_head(hidden).log_softmax(-1).gather(-1, seq[:, q_len:, None]).squeeze(-1)
        return logprobs, (head(hidden).squeeze(-1) if head is not None else None)

    queries = make_queries(args.seed, step, bs, q_len, args.vocab_size).to(device)
    torch.manual_seed(args.seed + step)
    t0 = time.perf_counter()
    with torch.no_grad():
        seq = model.generate(
            input_ids=queries,
            attention_mask=torch.ones_like(queries),
            max_new_tokens=r_len,
            min_new_tokens=r_len,
            pad_token_id=0,
            **SAMPLING,
        )
    synchronize(device)
    t1 = time.perf_counter()
    with torch.no_grad():
        old = [score(model, v_head, seq[b : b + mbs]) for b in range(0, bs, mbs)]  # TRL's forward batch size
        ref = [score(reference, None, seq[b : b + mbs])[0] for b in range(0, bs, mbs)]
        old_logprobs, old_values = torch.cat([o[0] for o in old]), torch.cat([o[1] for o in old])
        ref_logprobs = torch.cat(ref)
        scores = (seq[:, q_len:] % 2 == 0).float().mean(1)
        rewards = -0.2 * (old_logprobs - ref_logprobs)
        rewards[:, -1] += scores
        returns = rewards.flip(1).cumsum(1).flip(1)
        advantages = returns - old_values
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    synchronize(device)
    t2 = time.perf_counter()
    for _ in range(args.ppo_epochs):
        order = torch.randperm(bs, device=device)
        for begin in range(0, bs, mbs):
            idx = order[begin : begin + mbs]
            logprobs, values = score(model, v_head, seq[idx])
            ratio = (logprobs - old_logprobs[idx]).exp()
            adv = advantages[idx]
            pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
            vf_loss = 0.5 * (values - returns[idx]).square().mean()
            (pg_loss + 0.1 * vf_loss).backward()
            optimizer.step()
            optimizer.zero_grad()
    reward = float(scores.mean())  # a host sync
    t3 = time.perf_counter()
    return {"wall": t3 - t0, "total": t3 - t0, "generation": t1 - t0, "scoring": t2 - t1, "optimisation": t3 - t2,
            "reward": reward}


def run_floor(args) -> dict:
    _quiet()
    parts = build_floor(args)
    gate = StepGate()
    for step in range(args.warmup + args.steps):
        gate.wait()
        gate.done(floor_step(args, step, *parts))
    return {"side": "floor", **peak_memory()}


# ----------------------------------------------------------------------------------------- side: gemm (the limit)
def record_gemms(args) -> dict:
    """Every GEMM of one floor step: ``{(op, shapes, transposed operands): count}``."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: dict = {}
    ops = {torch.ops.aten.mm.default: "mm", torch.ops.aten.addmm.default: "addmm", torch.ops.aten.bmm.default: "bmm"}

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args_=(), kwargs=None):
            if func in ops:
                a, b = (args_[1], args_[2]) if ops[func] == "addmm" else (args_[0], args_[1])
                key = (ops[func], tuple(a.shape), tuple(b.shape), a.stride(-2) == 1, b.stride(-2) == 1)
                counts[key] = counts.get(key, 0) + 1
            return func(*args_, **(kwargs or {}))

    parts = build_floor(args)
    floor_step(args, 0, *parts)  # warm (lazy inits), then record a step
    with Recorder():
        floor_step(args, 1, *parts)
    return counts


def gemm_flops(key) -> int:
    op, a, b = key[:3]
    return 2 * a[-2] * a[-1] * b[-1] * (a[0] if op == "bmm" else 1)


def run_gemm(args) -> dict:
    import torch

    _quiet()
    device = device_of(args)
    counts = record_gemms(args)
    onednn = device == "cpu" and __import__("lit_vhead.kernels", fromlist=["x"]).onednn_available()

    def operand(shape, transposed):
        if not transposed:
            return torch.randn(*shape, device=device)
        return torch.randn(*shape[:-2], shape[-1], shape[-2], device=device).transpose(-1, -2)

    cases = []
    for key, count in counts.items():
        op, a_shape, b_shape, a_t, b_t = key
        a, b = operand(a_shape, a_t), operand(b_shape, b_t)
        bias = torch.randn(b_shape[-1], device=device)
        plain = {"mm": lambda a=a, b=b: torch.mm(a, b), "bmm": lambda a=a, b=b: torch.bmm(a, b),
                 "addmm": lambda a=a, b=b, c=bias: torch.addmm(c, a, b)}[op]
        fast = None
        if onednn and op != "bmm":
            from lit_vhead.kernels import _gemm

            fast = lambda a=a, b=b, c=(bias if op == "addmm" else None): _gemm(a, b.t(), c)  # noqa: E731
        cases.append((count, plain, fast))

    def timed(fn, reps: int = 3) -> float:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    for _, plain, fast in cases:  # warm up the kernels (and oneDNN's primitive cache)
        plain(), fast and fast()
    flops = sum(gemm_flops(k) * c for k, c in counts.items())
    gate = StepGate()
    for _ in range(args.warmup + args.steps):
        gate.wait()
        t_plain = sum(count * timed(plain) for count, plain, _ in cases)
        t_fast = sum(count * timed(fast if fast else plain) for count, _, fast in cases)
        best = min(t_plain, t_fast)
        gate.done({"wall": best, "total": best, "generation": 0.0, "scoring": 0.0, "optimisation": best,
                   "reward": float("nan"), "gemm_plain_s": t_plain, "gemm_onednn_s": t_fast if onednn else None,
                   "gflop": flops / 1e9})
    return {"side": "gemm", "gemm_gflop": flops / 1e9, "distinct_gemms": len(counts),
            "gemm_calls": sum(counts.values()), "onednn": onednn, **peak_memory()}


# ----------------------------------------------------------------------------------------- orchestration
def child_command(args, side: str) -> list[str]:
    flags = [f"--preset={args.preset}", f"--accelerator={args.accelerator}", f"--sides={args.sides}",
             f"--cpu-kernels={args.cpu_kernels}"]
    for name in ("n_layer", "n_embd", "n_head", "vocab_size", "batch_size", "query_len", "response_len",
                 "mini_batch_size", "ppo_epochs", "learning_rate", "steps", "warmup", "seed", "threads"):
        flags.append(f"--{name.replace('_', '-')}={getattr(args, name)}")
    if side == "trl":
        return [args.trl_python, str(HERE / "_trl_classic_ppo.py"), *flags]
    if side == "trainer":
        return [sys.executable, str(HERE / "_trl_classic_ppo.py"), "--impl=lit_vhead", *flags]
    if side == "ppov2":
        return [sys.executable, str(HERE / "_trl_ppov2.py"), *flags]
    return [sys.executable, str(Path(__file__).resolve()), f"--side={side}", *flags]


class Child:
    """One side's process, driven through the step gate (stdin ``go`` -> stdout ``BENCH_STEP {json}``)."""

    def __init__(self, args, side: str, log_dir: Path) -> None:
        env = dict(
            os.environ,
            OMP_NUM_THREADS=str(args.threads),
            MKL_NUM_THREADS=str(args.threads),
            TOKENIZERS_PARALLELISM="false",
        )
        env["TORCHINDUCTOR_CACHE_DIR"] = str(log_dir / f"{side}.inductor")  # cold: compile time as a first run sees it
        if side != "trl":
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)
        self.side, self.steps = side, []
        self.stderr_path = log_dir / f"{side}.stderr"
        self.stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(
            child_command(args, side),
            env=env,
            cwd=HERE.parent,
            text=True,
            bufsize=1,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
        )

    def _read_until(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        self.proc.wait()
        self.stderr.flush()
        sys.stderr.write(Path(self.stderr_path).read_text()[-8000:])
        raise SystemExit(f"side {self.side!r} ended without {prefix.strip()!r} (exit code {self.proc.returncode})")

    def wait_ready(self) -> None:
        self._read_until(READY)

    def step(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        record = json.loads(self._read_until(STEP_PREFIX))
        self.steps.append(record)
        return record

    def finish(self) -> dict:
        result = json.loads(self._read_until(RESULT_PREFIX))
        self.proc.stdin.close()
        self.proc.wait()
        self.stderr.close()
        return result


def summarise(steps: list[dict], first: dict, result: dict) -> dict:
    out = {"n": len(steps), "first_wall": round(first["wall"], 4)}
    out.update({k: round(v, 1) for k, v in result.items() if k.startswith("peak_")})
    for key in ("wall", "total", *PARTS):
        values = [s[key] for s in steps]
        out[key] = {"median": round(statistics.median(values), 4), "min": round(min(values), 4)}
    out["reward_first_last"] = [round(steps[0]["reward"], 3), round(steps[-1]["reward"], 3)]
    for key in ("gemm_plain_s", "gemm_onednn_s"):
        values = [s[key] for s in steps if s.get(key) is not None]
        if values:
            out[key] = round(statistics.median(values), 4)
    for key in ("gemm_gflop", "distinct_gemms", "gemm_calls"):
        if key in result:
            out[key] = result[key]
    return out


def ratios_of(summary: dict, measured: dict) -> dict:
    """Speed and memory ratios: every lit_vhead side against trl, floor, ours and the GEMM limit."""
    ratios: dict = {}
    mine = [s for s in summary if s in OURS or s == "trainer"]

    def paired(a: str, b: str) -> float:
        return round(statistics.median(x["wall"] / y["wall"] for x, y in zip(measured[a], measured[b])), 3)

    for side in mine:
        wall = summary[side]["wall"]["median"]
        if "trl" in summary:
            ratios[f"trl/{side}"] = round(summary["trl"]["wall"]["median"] / wall, 3)
            ratios[f"trl/{side}_paired"] = round(1 / paired(side, "trl"), 3)
            ratios[f"{side}/trl_peak_rss"] = round(summary[side]["peak_rss_mib"] / summary["trl"]["peak_rss_mib"], 3)
        if "ppov2" in summary:
            ratios[f"ppov2/{side}"] = round(summary["ppov2"]["wall"]["median"] / wall, 3)
            ratios[f"ppov2/{side}_paired"] = round(1 / paired(side, "ppov2"), 3)
            ratios[f"{side}/ppov2_peak_rss"] = round(summary[side]["peak_rss_mib"] / summary["ppov2"]["peak_rss_mib"],
                                                     3)
        if "floor" in summary:
            ratios[f"{side}/floor"] = round(wall / summary["floor"]["wall"]["median"], 3)
        if "gemm" in summary:
            ratios[f"{side}/limit"] = round(wall / summary["gemm"]["wall"]["median"], 3)
            ratios[f"{side}/limit_plain_sgemm"] = round(wall / summary["gemm"]["gemm_plain_s"], 3)
        if side != "ours" and "ours" in summary:
            ratios[f"ours/{side}"] = round(summary["ours"]["wall"]["median"] / wall, 3)
            ratios[f"ours/{side}_paired"] = round(1 / paired(side, "ours"), 3)
    if "trl" in summary and "floor" in summary:
        ratios["trl/floor"] = round(summary["trl"]["wall"]["median"] / summary["floor"]["wall"]["median"], 3)
    for compiled, eager in (("compile", "ours"), ("compile-plain", "plain")):
        if compiled in summary and eager in summary:  # compile time: the extra time of the first step
            gain = summary[eager]["wall"]["median"] - summary[compiled]["wall"]["median"]
            compile_s = summary[compiled]["first_wall"] - summary[eager]["first_wall"]
            ratios[f"{compiled}_time_s"] = round(compile_s, 2)
            ratios[f"{compiled}_break_even_steps"] = round(compile_s / gain, 1) if gain > 0 else "never"
    return ratios


def machine_facts(args) -> dict:
    """Where the figures come from: they hold for this CPU (or GPU) only."""
    import torch

    from lit_vhead.kernels import cpu_flags, cpu_name, onednn_available

    flags = cpu_flags()
    facts = {
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "avx512f": "avx512f" in flags,
        "bf16_hardware": sorted(flags & {"amx_bf16", "avx512_bf16"}) or None,
        "onednn": onednn_available(),
        "threads": args.threads,
        "torch": torch.__version__,
    }
    if args.accelerator == "gpu" and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def probe_kernels(args) -> dict:
    """``cpu_kernels="auto"``'s decision for this workload's model, probed once (this process, quiet: before any side
    starts); ``args.cpu_kernels`` becomes the choice the sides run."""
    if args.cpu_kernels != "auto" or args.accelerator != "cpu":
        return {}
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lit_vhead import kernels

    torch.set_num_threads(args.threads)
    shapes = kernels.gemm_shapes(GPT2LMHeadModel(GPT2Config(**gpt2_config_kwargs(args))))
    if not kernels.onednn_available():
        args.cpu_kernels = "false"
        return {"auto_onednn": False}
    probe = kernels.probe_gemms(shapes)
    args.cpu_kernels = "true" if probe.use_onednn else "false"
    return {"auto_onednn": probe.use_onednn, "probe_shapes": [list(s) for s in shapes],
            "probe_pytorch_gflops": round(probe.pytorch_gflops, 1),
            "probe_onednn_gflops": round(probe.onednn_gflops, 1)}


def print_report(args, sides: list[str], summary: dict, ratios: dict, machine: dict, auto: dict) -> None:
    bf16 = ", ".join(machine["bf16_hardware"]) if machine["bf16_hardware"] else "none (bf16 is emulated)"
    print(
        f"\nMachine: {machine['cpu']} ({machine['cpu_capability']}, bf16 hardware: {bf16}), "
        f"torch {machine['torch']}, {machine['threads']} thread(s)" + (f", GPU {machine['gpu']}" if "gpu" in machine
                                                                         else "")
    )
    if "probe_shapes" in auto:
        speedup = auto["probe_onednn_gflops"] / auto["probe_pytorch_gflops"]
        print(f"cpu_kernels=auto chose {'oneDNN' if auto['auto_onednn'] else 'PyTorch'}'s GEMMs for every side: probe "
              f"at {auto['probe_shapes']}: PyTorch {auto['probe_pytorch_gflops']} GFLOP/s, oneDNN "
              f"{auto['probe_onednn_gflops']} GFLOP/s ({speedup:.2f}x; taken from 1.2x)")
    else:
        print(f"cpu_kernels={args.cpu_kernels} for the sides that do not set it")
    print(
        f"\nPPO step, GPT-2 {args.n_layer}x{args.n_embd} vocab {args.vocab_size}, batch {args.batch_size}, "
        f"{args.query_len}+{args.response_len} tokens, mini-batch {args.mini_batch_size}, {args.ppo_epochs} epochs; "
        f"{args.steps} steps (+{args.warmup} warm-up) per side, interleaved, {args.threads} thread(s), "
        f"{args.accelerator}"
    )
    cuda = any("peak_cuda_mib" in summary[s] for s in sides)
    header = (f"{'side':13s} {'wall med':>9s} {'wall min':>9s} {'first':>8s} {'gen med':>8s} {'score med':>9s} "
              f"{'optim med':>9s} {'peak RSS':>9s}" + (f" {'peak CUDA':>10s}" if cuda else ""))
    print(header)
    print("-" * len(header))
    for s in sides:
        x = summary[s]
        parts = "        -         -         -" if s == "gemm" else (
            f"{x['generation']['median']:8.3f} {x['scoring']['median']:9.3f} {x['optimisation']['median']:9.3f}")
        line = (f"{s:13s} {x['wall']['median']:9.3f} {x['wall']['min']:9.3f} {x['first_wall']:8.2f} {parts} "
                f"{x['peak_rss_mib']:6.0f}MiB")
        if cuda:
            line += f" {x.get('peak_cuda_mib', float('nan')):7.0f}MiB"
        print(line)
    if "gemm" in summary:
        g = summary["gemm"]
        library = "MKL sgemm" if args.accelerator == "cpu" else "cuBLAS"
        plain_s = g["gemm_plain_s"]
        rates = f"PyTorch fp32 ({library}) {plain_s:.3f} s = {g['gemm_gflop'] / plain_s:.0f} GFLOP/s"
        if g.get("gemm_onednn_s") is not None:
            rates += f", oneDNN {g['gemm_onednn_s']:.3f} s = {g['gemm_gflop'] / g['gemm_onednn_s']:.0f} GFLOP/s"
        print(f"gemm: the step's {g['gemm_calls']} GEMMs ({g['distinct_gemms']} shapes, {g['gemm_gflop']:.1f} GFLOP) "
              f"alone: {rates}")
    for key, value in ratios.items():
        if not key.endswith("_paired"):
            paired = ratios.get(key + "_paired")
            print(f"{key:34s} {value}" + (f"   (median of per-step ratios {paired})" if paired is not None else ""))


def main() -> None:
    args = parse_args()
    if args.side is not None:
        import torch

        torch.set_num_threads(args.threads)
        runner = {"floor": run_floor, "gemm": run_gemm}.get(args.side)
        emit(runner(args) if runner else run_ours(args, args.side))
        return

    import tempfile

    sides = [s for s in args.sides.split(",") if s and (s != "trl" or args.trl_python)]
    auto = probe_kernels(args)
    log_dir = Path(tempfile.mkdtemp(prefix="ppo_step_bench_"))
    children = {}
    for side in sides:  # set up one at a time, so no side's set-up overlaps another's steps
        children[side] = Child(args, side, log_dir)
        children[side].wait_ready()
    for step in range(args.warmup + args.steps):
        order = sides[step % len(sides) :] + sides[: step % len(sides)]
        walls = {side: children[side].step()["wall"] for side in order}
        print(
            f"# step {step:3d}{' (warm-up)' if step < args.warmup else '':10s} "
            + "  ".join(f"{side} {walls[side]:6.3f}s" for side in sides),
            file=sys.stderr,
            flush=True,
        )
    results = {side: children[side].finish() for side in sides}
    shutil.rmtree(log_dir, ignore_errors=True)  # the children's stderr, kept only when a side fails
    measured = {side: children[side].steps[args.warmup :] for side in sides}
    summary = {side: summarise(measured[side], children[side].steps[0], results[side]) for side in sides}
    ratios = ratios_of(summary, measured)
    machine = machine_facts(args)
    print_report(args, sides, summary, ratios, machine, auto)
    print(
        json.dumps(
            {
                "bench": "ppo_step",
                "workload": {k: v for k, v in vars(args).items() if k not in ("side", "trl_python", "impl")},
                "trl_python": args.trl_python,
                "machine": machine,
                "cpu_kernels_auto": auto,
                "unit": "seconds per PPO step",
                "sides": summary,
                "ratios": ratios,
            }
        )
    )


if __name__ == "__main__":
    main()
