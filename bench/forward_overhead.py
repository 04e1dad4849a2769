"""Per-call overhead of the value-head forward over a bare ``AutoModelForCausalLM``, measured interleaved.

``bench/value_head.py`` times each model in its own block of repeats; on a small, noisy CPU the order of the blocks
shows up in the ratios. Here bare, ours and TRL 0.29.1 are called in turn, call after call, on the same weights, and
the medians are compared; the parts of our overhead (the value head, the padding mask) are timed the same way.

    OMP_NUM_THREADS=1 python bench/forward_overhead.py            # tiny GPT-2 (2x64, vocab 259), B=4 T=128
    OMP_NUM_THREADS=1 python bench/forward_overhead.py --layers 12 --width 768 --vocab 50257 --calls 30
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from lit_vhead import AutoModelForCausalLMWithValueHead  # noqa: E402
from lit_vhead.sequence import mask_values  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=259)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--calls", type=int, default=1500)
    args = parser.parse_args()
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=max(1, args.width // 16),
                                     vocab_size=args.vocab)
    bare = transformers.AutoModelForCausalLM.from_config(config).eval()
    ours = AutoModelForCausalLMWithValueHead(bare).eval()
    from trl.experimental.ppo import AutoModelForCausalLMWithValueHead as TRLValueHead

    trl = TRLValueHead.from_pretrained(bare).eval()
    trl.v_head.load_state_dict(ours.v_head.state_dict())
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    mask = torch.ones_like(ids)
    _, hidden = ours._base_forward(input_ids=ids, attention_mask=mask)
    calls = {
        "bare": lambda: bare(input_ids=ids, attention_mask=mask),
        "ours": lambda: ours(ids, attention_mask=mask),
        "trl": lambda: trl(ids, attention_mask=mask),
        "ours: value head": lambda: ours.v_head(hidden).squeeze(-1),
        "ours: padding mask": lambda: mask_values(hidden[..., 0], mask),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for i in range(args.calls + args.calls // 10):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                if i >= args.calls // 10:  # warm-up calls are dropped
                    times[name].append(time.perf_counter() - start)
    median = {name: sorted(t)[len(t) // 2] * 1e6 for name, t in times.items()}
    print(f"GPT-2 {args.layers}x{args.width} vocab {args.vocab}, B={args.batch} T={args.seq}, {args.calls} interleaved "
          "no-grad calls each")
    for name, value in median.items():
        ratio = f"{value / median['bare']:.3f}x bare" if name in ("ours", "trl") else ""
        print(f"  {name:20s} {value:10.1f} us  {ratio}")
    print(json.dumps({"bench": "forward_overhead", "median_us": median,
                      "ours_vs_bare": median["ours"] / median["bare"], "trl_vs_bare": median["trl"] / median["bare"]}))


if __name__ == "__main__":
    main()
