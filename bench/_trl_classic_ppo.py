"""TRL classic (0.11.4) side of ``bench/ppo_step.py``, and with ``--impl lit_vhead`` its ``trainer`` side.

The identical workload: a random-init GPT-2 with a value head, ``PPOTrainer`` with its own full-copy reference
(``ref_model=None``), ``PPOConfig(batch_size, mini_batch_size, ppo_epochs, learning_rate)``, token ids fed directly:
one batched ``model.generate`` per PPO step (same sampling settings: min = max new tokens, top_k=0, top_p=1, no EOS
stop), reward = fraction of even response ids, then ``step(queries, responses, scores)``. Run by the python of TRL's
own venv it imports ``trl``; with ``--impl lit_vhead`` the very same loop imports ``lit_vhead`` instead (a TRL-classic
script migrates by changing that import). Each step waits for ``go`` on stdin and reports a ``BENCH_STEP {json}``
line (``ppo_step.StepGate``); a final ``BENCH_RESULT {json}`` line gives the peak RSS.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_step import SAMPLING, StepGate, build_id_tokenizer, emit, make_queries, parse_args, peak_rss_mib  # noqa: E402


def main() -> None:
    args = parse_args()
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel
    if args.impl == "lit_vhead":
        from lit_vhead import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
    else:
        from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    torch.manual_seed(args.seed)
    base = GPT2LMHeadModel(
        GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, vocab_size=args.vocab_size)
    )
    model = AutoModelForCausalLMWithValueHead.from_pretrained(base)
    tokenizer = build_id_tokenizer(args.vocab_size)
    config = PPOConfig(
        batch_size=args.batch_size,
        mini_batch_size=args.mini_batch_size,
        ppo_epochs=args.ppo_epochs,
        learning_rate=args.learning_rate,
        seed=args.seed,
        **({"cpu_kernels": args.cpu_kernels} if args.impl == "lit_vhead" else {}),
    )
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tokenizer)
    q_len, r_len = args.query_len, args.response_len

    gate = StepGate()
    for step in range(args.warmup + args.steps):
        queries = make_queries(args.seed, step, args.batch_size, q_len, args.vocab_size)
        gate.wait()
        t0 = time.perf_counter()
        with torch.no_grad():
            output = trainer.model.generate(
                input_ids=queries,
                attention_mask=torch.ones_like(queries),
                max_new_tokens=r_len,
                min_new_tokens=r_len,
                pad_token_id=tokenizer.pad_token_id,
                **SAMPLING,
            )
        responses = output[:, q_len:]
        t1 = time.perf_counter()
        scores = (responses % 2 == 0).float().mean(1)
        t2 = time.perf_counter()
        stats = trainer.step(list(queries), list(responses), list(scores))
        t3 = time.perf_counter()
        assert responses.shape[1] == r_len
        scoring = sum(stats[f"time/ppo/{k}"] for k in ("forward_pass", "compute_rewards", "compute_advantages"))
        gate.done(
            {
                "wall": t3 - t0,
                "total": t3 - t0,
                "generation": t1 - t0,
                "scoring": (t2 - t1) + scoring,
                "optimisation": stats["time/ppo/optimize_step"],
                "step_other": (t3 - t2)
                - scoring
                - stats["time/ppo/optimize_step"],  # calc_stats and the rest of step()
                "reward": float(scores.mean()),
            }
        )
    emit({"side": "trl" if args.impl == "trl" else "trainer", "peak_rss_mib": peak_rss_mib()})


if __name__ == "__main__":
    main()
