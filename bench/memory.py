"""Reference modes side by side in real PPO steps: memory of policy + reference, peak RSS, and trunk-reuse time.

For a GPT-2-small-sized config (12 layers, 768 wide, vocab 50257) and a Llama-style one (12 layers, 768 wide,
intermediate 2048, GQA 12/4 heads, vocab 32000), each reference mode runs `train(cfg)` (PPOModule + Lightning Trainer)
for a few PPO steps in its own process and reports:

* ``unique param MB``: unique storage bytes of policy + reference parameters (shared storage counted once);
* ``peak RSS MB``: the process's peak resident memory after the steps (model build included);
* ``ref fwd s``: median seconds of the reference forward per PPO step (``time/ppo/reference_forward``);
* ``step s``: median seconds per PPO step.

Modes: ``copy`` (full frozen copy), ``shared k`` with trunk reuse (the reference starts from the policy's layer-k
output) and without it (``noreuse``: the shared layers are run again), and ``peft`` (LoRA r=8, reference = adapters
disabled). Trunk reuse should cut the reference forward in proportion to k/L.

    OMP_NUM_THREADS=1 python bench/memory.py            # both configs, all modes (~10 min on 2 cores)
    OMP_NUM_THREADS=1 python bench/memory.py --quick    # 4-layer 256-wide configs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "gpt2-small": {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257,
                   "n_positions": 1024, "eos_token_id": 1, "bos_token_id": 1, "pad_token_id": 0},
    "llama": {"model_type": "llama", "num_hidden_layers": 12, "hidden_size": 768, "intermediate_size": 2048,
              "num_attention_heads": 12, "num_key_value_heads": 4, "vocab_size": 32000,
              "max_position_embeddings": 1024, "eos_token_id": 1, "bos_token_id": 1, "pad_token_id": 0},
}
QUICK = {"n_layer": 4, "n_embd": 256, "n_head": 4, "num_hidden_layers": 4, "hidden_size": 256,
         "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}
MODES = ["copy", "shared2", "shared2-noreuse", "shared4", "shared4-noreuse", "shared8", "shared8-noreuse", "peft"]


def mode_overrides(mode: str) -> list[str]:
    if mode == "copy":
        return ["ref=copy"]
    if mode == "peft":
        return ["ref=peft", "peft=lora", "peft.r=8"]
    k = int(mode.removeprefix("shared").split("-")[0])
    return ["ref=shared", f"ref.num_shared_layers={k}", f"ref.reuse_trunk={'noreuse' not in mode}"]


def word_tokenizer(vocab: int, directory: str) -> None:
    """A word-level tokenizer over the ids themselves ("17" is token 17), saved to ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({str(i): i for i in range(vocab)}, unk_token="2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="0", eos_token="1", unk_token="2")
    tokenizer.save_pretrained(directory)


def run_one(config_name: str, mode: str, args: argparse.Namespace) -> dict:
    """One mode in this process: build, train a few PPO steps, measure."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import lightning as L
    from conftest import compose

    import lit_vhead.run as lt

    config = dict(CONFIGS[config_name], **(QUICK if args.quick else {}))
    config = {k: v for k, v in config.items() if k in CONFIGS[config_name]}
    vocab = config["vocab_size"]
    rng = random.Random(0)
    prompts = [" ".join(str(rng.randrange(3, vocab)) for _ in range(16)) for _ in range(64)]
    probe = {}

    class Keep(L.Callback):
        def on_train_end(self, trainer, pl_module):
            probe["module"] = pl_module

    with tempfile.TemporaryDirectory() as tmp:
        word_tokenizer(vocab, f"{tmp}/tok")
        with open(f"{tmp}/prompts.txt", "w") as f:
            f.write("\n".join(prompts))
        model = "tiny-gpt2" if config["model_type"] == "gpt2" else "tiny-llama"
        overrides = [f"++model.config.{k}={v}" for k, v in config.items() if k != "model_type"]
        cfg = compose([f"model={model}", f"model.tokenizer={tmp}/tok", *overrides,
                       f"data.prompts={tmp}/prompts.txt", f"ppo.steps={args.steps}",
                       f"ppo.batch_size={args.batch_size}",
                       f"ppo.mini_batch_size={args.batch_size}", "ppo.ppo_epochs=1",
                       f"ppo.generation.max_new_tokens={args.response_tokens}",
                       f"ppo.generation.min_new_tokens={args.response_tokens}", "logger=csv", "callbacks=none",
                       "plot=false", "save_pretrained_dir=null", *mode_overrides(mode)], tmp)
        original = lt._instantiate_dict
        lt._instantiate_dict = lambda node: original(node) + ([Keep()] if node is cfg.get("callbacks") else [])
        lt.train(cfg)
        from lit_vhead.plot import read_metrics

        series = read_metrics(tmp)
    module = probe["module"]
    tensors = [*module.policy.parameters()]
    if module.reference.model is not module.policy:
        tensors += [*module.reference.model.parameters()]
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}

    def median(name: str) -> float:
        return statistics.median(v for _, v in series[name][args.warmup:])

    return {"config": config_name, "mode": mode, "unique_param_mb": round(sum(unique.values()) / 2**20, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "ref_forward_s": round(median("time/ppo/reference_forward"), 4),
            "step_s": round(median("time/ppo/total"), 3),
            "layers": config.get("n_layer", config.get("num_hidden_layers"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--modes", nargs="+", default=MODES)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--response-tokens", type=int, default=16)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(*args.one, args)), flush=True)
        return
    rows = []
    for config_name in args.configs:
        for mode in args.modes:
            layers = 4 if args.quick else 12
            if mode.startswith("shared") and int(mode.removeprefix("shared").split("-")[0]) >= layers:
                continue
            cmd = [sys.executable, __file__, "--one", config_name, mode, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                   "--response-tokens", str(args.response_tokens), *(["--quick"] if args.quick else [])]
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "WANDB_MODE": "offline",
                   "HF_HUB_OFFLINE": "1"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"{config_name}/{mode} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
            rows.append(json.loads(line[len("RESULT "):]))
            print(f"{config_name}/{mode} done", file=sys.stderr, flush=True)
    base = {r["config"]: r for r in rows if r["mode"] == "copy"}
    print(f"{'config':11} {'mode':16} {'unique param MB':>15} {'vs copy':>7} {'peak RSS MB':>11} {'ref fwd s':>9} "
          f"{'vs copy':>7} {'step s':>7}")
    for r in rows:
        b = base.get(r["config"], r)
        print(f"{r['config']:11} {r['mode']:16} {r['unique_param_mb']:15.1f} "
              f"{r['unique_param_mb'] / b['unique_param_mb']:7.3f} "
              f"{r['peak_rss_mb']:11.1f} {r['ref_forward_s']:9.4f} {r['ref_forward_s'] / b['ref_forward_s']:7.3f} "
              f"{r['step_s']:7.3f}")
    print(json.dumps({"bench": "memory", "rows": rows}))


if __name__ == "__main__":
    main()
