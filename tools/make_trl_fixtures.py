"""Write the TRL 0.11.4 ``PPOTrainer.step`` fixtures that ``tests/test_ppo_trainer.py`` checks ``lit_vhead.PPOTrainer``
against. Run once, in the TRL-classic venv (its creation command is in ``bench/ppo_step.py``'s docstring)::

    OMP_NUM_THREADS=1 /tmp/trl-classic/bin/python tools/make_trl_fixtures.py tests/data/trl_step

It builds a tiny GPT-2 (2 layers, n_embd 16, ByT5's 259-token vocabulary, seed 0) with TRL's
``AutoModelForCausalLMWithValueHead``, saves its starting weights with TRL's ``save_pretrained`` (``start/``), then for
each case runs two ``PPOTrainer.step`` calls on the same ``(queries, responses, scores)`` from those weights and records
the statistics, the ``np.random.permutation`` draws and the weights after each step (``<case>_step<k>.safetensors``):

- ``equal``: all queries and responses of one length (no padding anywhere), whitened rewards;
- ``right``: variable lengths, TRL's default right padding (TRL's positions are right there), gradient accumulation
  and score clipping. Not recorded: ``use_score_scaling`` (TRL 0.11.4's step raises ``AttributeError: 'float' object
  has no attribute 'to'`` on it) and ``whiten_rewards`` with padding (TRL's whitened rewards are non-zero on padding
  positions, which GAE then carries into the real tokens, so the result depends on how much padding a row gets);
- ``left``: variable lengths with ``tokenizer.padding_side = "left"``. TRL passes no ``position_ids`` there (trl#469),
  so every left-padded row sees shifted positions. ``left`` is TRL as released; ``left_patched`` is TRL with
  ``position_ids = cumsum(attention_mask) - 1`` passed to the model, which is what lit_vhead computes.

Everything is small (well under 1 MB in all); the script is deterministic (one thread, fixed seeds).
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel
from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

MODEL = dict(n_layer=2, n_embd=16, n_head=2, n_positions=64, vocab_size=259, bos_token_id=1, eos_token_id=1,
             pad_token_id=0)
COMMON = dict(batch_size=8, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-4, init_kl_coef=0.2, target=0.05,
              horizon=100.0, seed=0)
CASES = {
    "equal": dict(config=dict(whiten_rewards=True), padding_side="right", query_lens=[6] * 8, response_lens=[5] * 8),
    "right": dict(
        config=dict(gradient_accumulation_steps=2, score_clip=1.0),
        padding_side="right", query_lens=[3, 7, 5, 4, 6, 2, 7, 5], response_lens=[4, 2, 6, 5, 3, 6, 1, 4],
    ),
    "left": dict(config={}, padding_side="left", query_lens=[3, 7, 5, 4, 6, 2, 7, 5],
                 response_lens=[4, 2, 6, 5, 3, 6, 1, 4]),
}


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The wrapper's state (``v_head.*`` included), one entry per tensor (GPT-2's tied LM head dropped)."""
    state = model.state_dict()
    state.pop("lm_head.weight", None)
    return {k: v.detach().clone().contiguous() for k, v in state.items() if v.is_floating_point()}


def with_position_ids(model) -> None:
    """Patch TRL's wrapper to pass ``position_ids`` from the attention mask (the fix trl#469 asked for)."""
    forward = model.forward

    def patched(input_ids=None, past_key_values=None, attention_mask=None, **kwargs):
        kwargs["position_ids"] = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        return forward(input_ids=input_ids, past_key_values=past_key_values, attention_mask=attention_mask, **kwargs)

    model.forward = patched


def run_case(name: str, case: dict, start_dir: str, out: str, patched: bool) -> dict:
    generator = torch.Generator().manual_seed(sum(map(ord, name)))
    queries = [torch.randint(3, 259, (n,), generator=generator) for n in case["query_lens"]]
    responses = [torch.randint(3, 259, (n,), generator=generator) for n in case["response_lens"]]
    scores = [s for s in torch.randn(len(queries), generator=generator)]

    model = AutoModelForCausalLMWithValueHead.from_pretrained(start_dir)
    tokenizer = ByT5Tokenizer(extra_ids=0)
    tokenizer.padding_side = case["padding_side"]
    settings = {**COMMON, **case["config"]}
    trainer = PPOTrainer(PPOConfig(**settings), model, None, tokenizer)
    if patched:  # after the reference copy was made, so each model's patch calls its own forward
        with_position_ids(trainer.model)
        with_position_ids(trainer.ref_model)

    permutations: list[list[int]] = []
    draw = np.random.permutation

    def recording(n):
        order = draw(n)
        permutations.append(order.tolist())
        return order

    np.random.permutation = recording
    steps = []
    try:
        for k in (1, 2):
            stats = trainer.step(list(queries), list(responses), list(scores))
            scalars = {key: float(v) for key, v in stats.items() if np.ndim(v) == 0 and not key.startswith("time/")}
            shapes = {key: list(np.shape(v)) for key, v in stats.items() if np.ndim(v) > 0}
            steps.append({"stats": scalars, "array_shapes": shapes, "kl_coef_after": float(trainer.kl_ctl.value)})
            tag = f"{name}_patched" if patched else name
            save_file(trainable_state(model), os.path.join(out, f"{tag}_step{k}.safetensors"))
    finally:
        np.random.permutation = draw
    return {
        "config": settings,
        "padding_side": case["padding_side"],
        "position_ids_patched": patched,
        "queries": [q.tolist() for q in queries],
        "responses": [r.tolist() for r in responses],
        "scores": [float(s) for s in scores],
        "permutations": permutations,
        "steps": steps,
    }


def main(out: str) -> None:
    import transformers
    import trl

    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(**MODEL))
    model = AutoModelForCausalLMWithValueHead.from_pretrained(base)
    start_dir = os.path.join(out, "start")
    model.save_pretrained(start_dir)  # TRL's format: model.safetensors with the v_head.* tensors inside
    for extra in ("generation_config.json",):
        path = os.path.join(start_dir, extra)
        if os.path.exists(path):
            os.remove(path)
    record = {
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "model": MODEL,
        "cases": {},
    }
    for name, case in CASES.items():
        record["cases"][name] = run_case(name, case, start_dir, out, patched=False)
        if case["padding_side"] == "left":
            record["cases"][f"{name}_patched"] = run_case(name, case, start_dir, out, patched=True)
    with open(os.path.join(out, "trl_step.json"), "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"wrote {out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/trl_step")
