"""PPO-step benchmark: ``PPOModule`` + Lightning Trainer vs. the bare-transformers floor (and TRL classic).

The workload (the PPO issue's, see docs/ppo-reference.md §6): GPT-2 config n_layer=4, n_embd=256, n_head=4,
vocab_size=512 (other GPT-2 defaults), random init, a full frozen copy as reference, batch 32, queries of 16 token
ids drawn uniformly from the vocabulary, exactly 32 sampled response tokens (min_new_tokens = max_new_tokens = 32,
top_k=0, top_p=1, no EOS stop), reward = fraction of even response ids, mini-batch 8, 4 PPO epochs, Adam lr 1e-4,
dropout off in every forward (as TRL classic and ``PPOModule`` run PPO).

Sides, each run in its own process (so each has its own peak RSS) with ``OMP_NUM_THREADS`` = ``--threads``:

- ``ours``: the real product: ``PPOModule`` + ``ReferenceModelCallback("copy")`` + ``lightning.Trainer`` on CPU, one
  Lightning epoch per PPO step. Split from the module's logged ``time/ppo/*`` metrics; ``wall`` is the whole Lightning
  epoch (data loading, ``training_step``, logging, loop overhead), measured by a callback.
- ``floor``: bare transformers doing only the work PPO cannot avoid: one KV-cached ``generate`` (same settings), one
  no-grad policy forward over the rollout (``model.transformer`` + ``model.lm_head`` on the response positions + a
  separate ``nn.Linear`` value head on the last hidden state), the no-grad reference forward, then ppo_epochs x
  minibatches of forward + backward + ``Adam.step`` on a clipped-surrogate policy loss plus a value loss.
- ``trl`` (only with ``--trl-python``): TRL 0.11.4's ``PPOTrainer.step(queries, responses, scores)`` after a batched
  ``model.generate`` with the same sampling settings, run by ``bench/_trl_classic_ppo.py`` in TRL's own venv.
  Create that venv once with::

      python3 -m venv /tmp/trl-classic && /tmp/trl-classic/bin/pip install torch==2.13.0 trl==0.11.4 \
          transformers==4.46.3 accelerate==1.1.1 datasets==3.1.0 peft==0.13.2 pyarrow==18.1.0 "numpy<2.3" rich

  (``rich`` is imported by ``trl.trainer.utils`` 0.11.4 but not declared as its dependency.)

The sides are interleaved step by step: all side processes are started and set up first, then a gate lets exactly one
of them run one PPO step at a time, round-robin (the order rotates every step), so the machine's noise hits every side
alike and no two sides ever run at once. ``--warmup`` steps per side are dropped, then ``--steps`` are measured; every
side draws the same queries at the same step. The table shows median and min of the measured steps.

    OMP_NUM_THREADS=1 python bench/ppo_step.py --trl-python /tmp/trl-classic/bin/python

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


# ----------------------------------------------------------------------------------------- shared by every side
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--query-len", type=int, default=16)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--mini-batch-size", type=int, default=8)
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=10, help="measured PPO steps per run")
    p.add_argument("--warmup", type=int, default=2, help="PPO steps dropped at the start of each run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS / torch threads of every side")
    p.add_argument("--trl-python", default=None, help="python of a venv with TRL 0.11.4 (see the docstring)")
    p.add_argument("--sides", default="floor,ours,trl", help="comma-separated subset of floor,ours,trl")
    p.add_argument("--side", default=None, help=argparse.SUPPRESS)  # internal: run one side in this process
    return p.parse_args(argv)


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


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


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
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


# ----------------------------------------------------------------------------------------- side: ours
def run_ours(args) -> dict:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, Dataset, Sampler

    _quiet()
    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    from lit_vhead.module import PPOModule
    from lit_vhead.rewards import FunctionReward, even_token_fraction

    class QueryRows(Dataset):
        """Index ``step * B + row`` -> row ``row`` of ``make_queries(seed, step)`` (an unbounded map-style set)."""

        def __getitem__(self, index: int):
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + index)
            return torch.randint(args.vocab_size, (args.query_len,), generator=g)

        def __len__(self) -> int:  # only for DataLoader's sanity; the sampler decides what is drawn
            return 2**62

    class StepSampler(Sampler[int]):
        """The rows of one PPO step per epoch. A plain ``sampler`` (not a ``batch_sampler``): Lightning calls
        ``set_epoch`` only on ``dataloader.sampler`` and ``dataloader.batch_sampler.sampler``."""

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
                assert torch.equal(batch["query_ids"], expected), "queries differ from make_queries(seed, step)"

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("time/ppo/")}
            self._record = {
                "total": m["time/ppo/total"],
                "generation": m["time/ppo/generation"],
                "scoring": m["time/ppo/forward_pass"] + m["time/ppo/compute_rewards"],
                "optimisation": m["time/ppo/optimize_step"],
                "reward": float(trainer.callback_metrics["env/reward_mean"]),
            }

        def on_train_end(self, trainer, pl_module) -> None:
            self._finish()

    torch.manual_seed(args.seed)
    tokenizer = build_id_tokenizer(args.vocab_size)
    module = PPOModule(
        policy={"kind": "causal", "config": {"model_type": "gpt2", **gpt2_config_kwargs(args)}},
        reward=FunctionReward(even_token_fraction),
        tokenizer=tokenizer,
        ref="copy",
        ppo={
            "seed": args.seed,
            "steps": args.warmup + args.steps,
            "batch_size": args.batch_size,
            "mini_batch_size": args.mini_batch_size,
            "ppo_epochs": args.ppo_epochs,
            "learning_rate": args.learning_rate,
            "generation": {
                "max_new_tokens": args.response_len,
                "min_new_tokens": args.response_len,
                "do_sample": True,
                "top_k": 0,
                "top_p": 1.0,
                "stop_at_eos": False,
            },
        },
    )
    timer = StepTimer(StepGate())
    trainer = L.Trainer(
        max_epochs=args.warmup + args.steps,
        accelerator="cpu",
        devices=1,
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=RandomQueryDataModule())
    return {"side": "ours", "peak_rss_mib": peak_rss_mib()}


# ----------------------------------------------------------------------------------------- side: floor
def run_floor(args) -> dict:
    import copy

    import torch
    from torch import nn
    from transformers import GPT2Config, GPT2LMHeadModel

    _quiet()
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(GPT2Config(**gpt2_config_kwargs(args))).eval()  # dropout off everywhere, as in PPO
    v_head = nn.Linear(args.n_embd, 1)
    reference = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.Adam([*model.parameters(), *v_head.parameters()], lr=args.learning_rate)
    q_len, r_len, bs, mbs = args.query_len, args.response_len, args.batch_size, args.mini_batch_size
    span = slice(q_len - 1, q_len + r_len - 1)  # positions whose next token is a response token

    def score(lm, head, seq):
        """Response log-probs (and values): backbone, then LM head and value head on the response positions only."""
        hidden = lm.transformer(input_ids=seq, use_cache=False).last_hidden_state[:, span]
        logprobs = lm.lm_head(hidden).log_softmax(-1).gather(-1, seq[:, q_len:, None]).squeeze(-1)
        return logprobs, (head(hidden).squeeze(-1) if head is not None else None)

    gate = StepGate()
    for step in range(args.warmup + args.steps):
        queries = make_queries(args.seed, step, bs, q_len, args.vocab_size)
        torch.manual_seed(args.seed + step)
        gate.wait()
        t0 = time.perf_counter()
        with torch.no_grad():
            seq = model.generate(
                input_ids=queries,
                attention_mask=torch.ones_like(queries),
                do_sample=True,
                top_k=0,
                top_p=1.0,
                max_new_tokens=r_len,
                min_new_tokens=r_len,
                pad_token_id=0,
                eos_token_id=None,
                use_cache=True,
            )
        t1 = time.perf_counter()
        with torch.no_grad():
            old_logprobs, old_values = score(model, v_head, seq)
            ref_logprobs, _ = score(reference, None, seq)
            scores = (seq[:, q_len:] % 2 == 0).float().mean(1)
            rewards = -0.2 * (old_logprobs - ref_logprobs)
            rewards[:, -1] += scores
            returns = rewards.flip(1).cumsum(1).flip(1)
            advantages = returns - old_values
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        t2 = time.perf_counter()
        for _ in range(args.ppo_epochs):
            order = torch.randperm(bs)
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
        t3 = time.perf_counter()
        gate.done(
            {
                "wall": t3 - t0,
                "total": t3 - t0,
                "generation": t1 - t0,
                "scoring": t2 - t1,
                "optimisation": t3 - t2,
                "reward": float(scores.mean()),
            }
        )
    return {"side": "floor", "peak_rss_mib": peak_rss_mib()}


# ----------------------------------------------------------------------------------------- orchestration
def child_command(args, side: str) -> list[str]:
    flags = [
        f"--n-layer={args.n_layer}",
        f"--n-embd={args.n_embd}",
        f"--n-head={args.n_head}",
        f"--vocab-size={args.vocab_size}",
        f"--batch-size={args.batch_size}",
        f"--query-len={args.query_len}",
        f"--response-len={args.response_len}",
        f"--mini-batch-size={args.mini_batch_size}",
        f"--ppo-epochs={args.ppo_epochs}",
        f"--learning-rate={args.learning_rate}",
        f"--steps={args.steps}",
        f"--warmup={args.warmup}",
        f"--seed={args.seed}",
        f"--threads={args.threads}",
    ]
    if side == "trl":
        return [args.trl_python, str(HERE / "_trl_classic_ppo.py"), *flags]
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


def summarise(steps: list[dict], peak_rss: float) -> dict:
    out = {"n": len(steps), "peak_rss_mib": round(peak_rss, 1)}
    for key in ("wall", "total", *PARTS):
        values = [s[key] for s in steps]
        out[key] = {"median": round(statistics.median(values), 4), "min": round(min(values), 4)}
    out["reward_first_last"] = [round(steps[0]["reward"], 3), round(steps[-1]["reward"], 3)]
    return out


def main() -> None:
    args = parse_args()
    if args.side is not None:
        import torch

        torch.set_num_threads(args.threads)
        emit({"ours": run_ours, "floor": run_floor}[args.side](args))
        return

    import tempfile

    sides = [s for s in args.sides.split(",") if s and (s != "trl" or args.trl_python)]
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
    summary = {side: summarise(measured[side], results[side]["peak_rss_mib"]) for side in sides}

    print(
        f"\nPPO step, GPT-2 {args.n_layer}x{args.n_embd} vocab {args.vocab_size}, batch {args.batch_size}, "
        f"{args.query_len}+{args.response_len} tokens, mini-batch {args.mini_batch_size}, {args.ppo_epochs} epochs; "
        f"{args.steps} steps (+{args.warmup} warm-up) per side, interleaved, OMP_NUM_THREADS={args.threads}"
    )
    header = (
        f"{'side':6s} {'wall med':>9s} {'wall min':>9s} {'gen med':>8s} {'score med':>9s} {'optim med':>9s} "
        f"{'peak RSS':>9s}"
    )
    print(header)
    print("-" * len(header))
    for s in sides:
        x = summary[s]
        print(
            f"{s:6s} {x['wall']['median']:9.3f} {x['wall']['min']:9.3f} {x['generation']['median']:8.3f} "
            f"{x['scoring']['median']:9.3f} {x['optimisation']['median']:9.3f} {x['peak_rss_mib']:7.0f}MiB"
        )
    ratios = {}
    if "ours" in summary:
        ours = summary["ours"]
        print(
            f"(ours: module-logged time/ppo/total median {ours['total']['median']:.3f} s, min "
            f"{ours['total']['min']:.3f} s; wall adds the Lightning loop, data and logging)"
        )
        for other in ("floor", "trl"):
            if other in summary:
                for stat in ("median", "min"):
                    ratios[f"ours/{other}_{stat}"] = round(ours["wall"][stat] / summary[other]["wall"][stat], 3)
                other_median = summary[other]["wall"]["median"]
                ratios[f"ours_total/{other}_median"] = round(ours["total"]["median"] / other_median, 3)
                paired = [o["wall"] / t["wall"] for o, t in zip(measured["ours"], measured[other])]
                ratios[f"ours/{other}_paired_median"] = round(statistics.median(paired), 3)
        for other in ("floor", "trl"):
            if other in summary:
                print(
                    f"ours / {other}: {ratios[f'ours/{other}_median']:.3f}x (medians), "
                    f"{ratios[f'ours/{other}_min']:.3f}x (mins), "
                    f"{ratios[f'ours/{other}_paired_median']:.3f}x (median of per-step ratios)"
                )
    if "trl" in summary and "floor" in summary:
        ratios["trl/floor_median"] = round(summary["trl"]["wall"]["median"] / summary["floor"]["wall"]["median"], 3)
        print(f"trl / floor: {ratios['trl/floor_median']:.3f}x (medians)")
    print(
        json.dumps(
            {
                "bench": "ppo_step",
                "workload": {k: v for k, v in vars(args).items() if k not in ("side", "trl_python", "sides")},
                "trl_python": args.trl_python,
                "unit": "seconds per PPO step",
                "sides": summary,
                "ratios": ratios,
                "targets": {
                    "ours/floor_median<=1.15": ratios.get("ours/floor_median", float("nan")) <= 1.15,
                    "ours/trl_median<1": ratios.get("ours/trl_median", float("nan")) < 1.0,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
