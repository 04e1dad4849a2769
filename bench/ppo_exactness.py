"""Is the whole PPO update still TRL's? One ``PPOTrainer.step`` on the PPO-step workload, TRL 0.11.4 against ours.

The workload of ``bench/ppo_step.py`` (GPT-2 4x256, vocab 512, random init, batch 32, 16+32 tokens, mini-batch 8,
4 PPO epochs, Adam lr 1e-4): TRL 0.11.4 builds the model, saves it with its ``save_pretrained`` and runs ``step``
twice on fixed ``(queries, responses, scores)`` in its own venv; ``lit_vhead.PPOTrainer`` loads the same start and
runs the same two steps (the same ``np.random.permutation`` minibatches), once per setting below. Printed: the largest
``|Δweight|`` against TRL after each step (and float32's spacing at that weight: ``ulp there``), for

- ``default``: ``cpu_kernels="auto"`` (oneDNN GEMMs where the probe measured them clearly faster on this CPU, else
  PyTorch's: the line says which);
- ``plain``: ``cpu_kernels=False`` (PyTorch's default kernels);
- ``onednn``: ``cpu_kernels=True`` (oneDNN GEMMs forced; ``lit_vhead.kernels``).

- ``trl start+1e-7``: the yardstick: TRL itself from the same start multiplied by ``1 + 1e-7 N(0, 1)`` (float
  rounding of the start weights), against TRL from the exact start.

Adam divides each gradient by its own running magnitude, so a gradient entry near zero turns a rounding difference
into a visible step difference: on this workload rounding alone moves the update by about 1e-5 (the yardstick), so
the figures are printed next to it and to the size of the update itself. The ``sgd`` rows run the same steps with
``torch.optim.SGD`` (same learning rate, passed as ``optimizer=`` on both sides), whose step is linear in the
gradient: there the difference is the gradients' own rounding, without Adam's amplification.

    OMP_NUM_THREADS=1 python bench/ppo_exactness.py --trl-python /tmp/trl-classic/bin/python

Prints a table, then ONE JSON line (``{"bench": "ppo_exactness", ...}``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ppo_step import build_id_tokenizer, make_queries  # noqa: E402

WORKLOAD = dict(n_layer=4, n_embd=256, n_head=4, vocab_size=512)
PPO = dict(batch_size=32, mini_batch_size=8, ppo_epochs=4, learning_rate=1e-4, seed=0)
QUERY_LEN, RESPONSE_LEN, STEPS = 16, 32, 2


def rollout():
    """Fixed queries (``make_queries`` of step 0), random responses and the even-token reward."""
    import torch

    queries = make_queries(0, 0, PPO["batch_size"], QUERY_LEN, WORKLOAD["vocab_size"])
    g = torch.Generator().manual_seed(1)
    responses = torch.randint(3, WORKLOAD["vocab_size"], (PPO["batch_size"], RESPONSE_LEN), generator=g)
    scores = (responses % 2 == 0).float().mean(1)
    return list(queries), list(responses), list(scores)


def weights(model) -> dict:
    state = model.state_dict()
    state.pop("lm_head.weight", None)  # tied to the embedding
    return {k: v.detach().clone().contiguous() for k, v in state.items() if v.is_floating_point()}


def build_optimizer(name: str, model):
    """``None`` for ``adam`` (each trainer builds its default Adam), else SGD at the same learning rate."""
    import torch

    if name == "adam":
        return None
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=PPO["learning_rate"])


def run_trl(out: str) -> None:
    """In TRL's venv: build and save the start, run the steps, save the weights after each."""
    import torch
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(GPT2LMHeadModel(GPT2Config(**WORKLOAD)))
    model.save_pretrained(os.path.join(out, "start"))
    queries, responses, scores = rollout()
    for optimizer in ("adam", "sgd"):
        model = AutoModelForCausalLMWithValueHead.from_pretrained(os.path.join(out, "start"))
        trainer = PPOTrainer(PPOConfig(**PPO), model, None, build_id_tokenizer(WORKLOAD["vocab_size"]),
                             optimizer=build_optimizer(optimizer, model))
        for k in range(1, STEPS + 1):
            trainer.step(queries, responses, scores)
            save_file(weights(model), os.path.join(out, f"trl_{optimizer}_step{k}.safetensors"))
    # the yardstick: TRL again, from the same start times (1 + 1e-7 N(0, 1)), i.e. float rounding of the start
    model = AutoModelForCausalLMWithValueHead.from_pretrained(os.path.join(out, "start"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=g))
    trainer = PPOTrainer(PPOConfig(**PPO), model, None, build_id_tokenizer(WORKLOAD["vocab_size"]))
    for k in range(1, STEPS + 1):
        trainer.step(queries, responses, scores)
        save_file(weights(model), os.path.join(out, f"trl_perturbed_step{k}.safetensors"))


def _key_bias_free(name: str, delta):
    """``delta`` with GPT-2's attention key biases zeroed: their true gradient is exactly 0 (a bias on every key
    shifts all of a query's scores alike, which the softmax ignores), so Adam turns pure rounding noise there into
    learning-rate-sized steps."""
    if name.endswith("attn.c_attn.bias"):
        delta = delta.clone()
        third = delta.shape[0] // 3
        delta[third : 2 * third] = 0
    return delta


def _spacing_at_max(ours, trl) -> float:
    """float32's spacing (one ulp) at the weight where ``|ours - trl|`` is largest."""
    import torch

    at = trl.flatten()[(ours - trl).abs().argmax()].abs()
    return (torch.nextafter(at, torch.tensor(float("inf"))) - at).item()


def compare(k: int, ours: dict, trl: dict, start: dict) -> dict:
    worst = max(trl, key=lambda n: (ours[n] - trl[n]).abs().max().item())
    return {
        "step": k,
        "max_abs_dw_vs_trl": (ours[worst] - trl[worst]).abs().max().item(),
        "ulp_at_max": _spacing_at_max(ours[worst], trl[worst]),
        "max_abs_dw_vs_trl_without_key_biases": max(
            _key_bias_free(n, ours[n] - trl[n]).abs().max().item() for n in trl
        ),
        "max_abs_update": max((trl[n] - start[n]).abs().max().item() for n in trl if n in start),
    }


def trl_yardstick(out: str) -> list[dict]:
    """How far TRL itself lands from a start perturbed by float rounding."""
    from safetensors.torch import load_file

    start = load_file(os.path.join(out, "start", "model.safetensors"))
    rows = []
    for k in range(1, STEPS + 1):
        trl = load_file(os.path.join(out, f"trl_adam_step{k}.safetensors"))
        perturbed = load_file(os.path.join(out, f"trl_perturbed_step{k}.safetensors"))
        rows.append(compare(k, perturbed, trl, start))
    return rows


def run_ours(out: str, cpu_kernels: bool | str, optimizer: str) -> list[dict]:
    import torch
    from safetensors.torch import load_file

    from lit_vhead import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    torch.set_num_threads(1)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(os.path.join(out, "start"))
    trainer = PPOTrainer(PPOConfig(**PPO, cpu_kernels=cpu_kernels), model, None,
                         build_id_tokenizer(WORKLOAD["vocab_size"]), optimizer=build_optimizer(optimizer, model))
    queries, responses, scores = rollout()
    start = weights(model)
    rows = []
    for k in range(1, STEPS + 1):
        trainer.step(queries, responses, scores)
        ours, trl = weights(model), load_file(os.path.join(out, f"trl_{optimizer}_step{k}.safetensors"))
        rows.append(compare(k, ours, trl, start))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trl-python", required=False, default="/tmp/trl-classic/bin/python")
    p.add_argument("--trl-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    if args.trl_child:
        run_trl(args.trl_child)
        return
    with tempfile.TemporaryDirectory(prefix="ppo_exactness_") as out:
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        subprocess.run([args.trl_python, __file__, "--trl-child", out], check=True, env=env)
        sys.path.insert(0, str(HERE.parent))
        results = {"trl start+1e-7": trl_yardstick(out)}
        for optimizer in ("adam", "sgd"):
            for name, flag in (("default", "auto"), ("plain", False), ("onednn", True)):
                results[name if optimizer == "adam" else f"{name}, sgd"] = run_ours(out, flag, optimizer)
    from lit_vhead import kernels

    shapes = ((WORKLOAD["n_embd"] * 4, WORKLOAD["n_embd"]),)  # the workload's largest GEMM (its MLP), as auto sees it
    auto = "oneDNN" if kernels.onednn_available() and kernels.probe_gemms(shapes).use_onednn else "PyTorch"
    print(f"One PPOTrainer.step x{STEPS} on the ppo_step workload vs TRL 0.11.4 (fp32, same start, same minibatches)")
    print(f"on {kernels.cpu_name()}: cpu_kernels=auto ran {auto}'s GEMMs")
    print(f"{'setting':17s} {'step':>4s} {'max|dW| vs TRL':>15s} {'w/o key biases':>15s} {'ulp there':>10s} "
          f"{'max|update|':>12s}")
    for name, rows in results.items():
        for r in rows:
            print(f"{name:17s} {r['step']:4d} {r['max_abs_dw_vs_trl']:15.2e} "
                  f"{r['max_abs_dw_vs_trl_without_key_biases']:15.2e} {r['ulp_at_max']:10.2e} "
                  f"{r['max_abs_update']:12.2e}")
    print(json.dumps({"bench": "ppo_exactness", "workload": {**WORKLOAD, **PPO}, "results": results}))


if __name__ == "__main__":
    main()
