"""Tiny local stand-ins for the hub models TRL 0.11.4's tests and examples load, and TRL's PPO tests made runnable
against them, for the classic-API comparison in the README ("TRL 0.11.4's own tests").

    /tmp/trl-classic/bin/python tools/make_trl_standins.py /tmp/trl-standins path/to/trl.git

writes (nothing from the hub, deterministic):

- ``models/<hub id>``: a tiny random model of the hub model's architecture and vocabulary size (T5: ByT5's), with a
  small byte-level BPE tokenizer trained here on a few sentences (GPT-2, BLOOM and the DistilBERT sentiment
  classifier; GPT-2's splits ``"This morning I went to the "`` into the 7 tokens TRL's tests expect) or ByT5's (T5).
  ``test_loss_trainer`` asserts two loss values that belong to the hub model's weights: the GPT-2 stand-in's value
  head is fitted so that they come out (on it, TRL's ``PPOTrainer`` and lit_vhead's then compute the same losses,
  as the test checks). The examples' data sets (``stanfordnlp/imdb``, ``Anthropic/hh-rlhf``,
  ``lvwerra/stack-exchange-paired``) are random rows of their columns, ``trl-lib/llama-7b-hh-rm-adapter`` a reward
  LoRA on the GPT-2 stand-in ``lvwerra/gpt2-imdb``;
- ``trl/tests`` and ``ours/tests``: TRL's ``tests/test_ppo_trainer.py`` at tag v0.11.4 (read at run time from
  ``path/to/trl.git``, a clone of huggingface/trl; never stored here) with the hub ids pointed at ``models/``;
  ``ours`` also has ``from trl`` replaced by ``from lit_vhead``. Run each with ``python -m pytest -q
  tests/test_ppo_trainer.py`` from ``<dir>`` (lit_vhead's side needs ``pip install parameterized``).

Built with transformers 4.46 (the TRL-classic venv) so that both transformers 4 and 5 read the files.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import ByteLevelBPETokenizer

CORPUS = [
    "This morning I went to the market and the park.",
    "this is a test, this is another, longer test.",
    "The movie was good. The film was bad. I liked the story and the actors.",
    "I went to the store this morning to buy the things we need.",
]


def bpe_tokenizer(special: list[str]) -> ByteLevelBPETokenizer:
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(CORPUS * 20, vocab_size=400, min_frequency=1, special_tokens=special)
    return tokenizer


def save_gpt2(path: str, seed: int, fit_loss_test: bool = False) -> None:
    tokenizer = transformers.GPT2TokenizerFast(
        tokenizer_object=bpe_tokenizer(["<|endoftext|>"])._tokenizer, bos_token="<|endoftext|>",
        eos_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    assert len(tokenizer.encode("This morning I went to the ")) == 7
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=256, vocab_size=50257,
                                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.eos_token_id)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if fit_loss_test:
        head = fit_value_head(model, tokenizer.eos_token_id)
        weights = load_file(os.path.join(path, "model.safetensors"))
        weights.update({f"v_head.summary.{k}": v.contiguous() for k, v in head.items()})
        save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def fit_value_head(model: transformers.GPT2LMHeadModel, pad_id: int) -> dict[str, torch.Tensor]:
    """A value head under which ``test_loss_trainer``'s PPO losses on this model are the ones its asserts hold
    (1.8226 and 0.1260: properties of the hub model's weights). The test's computation, written out: its two
    (query, response) pairs right-padded, rewards ``0.2`` per token (its KL is -1 everywhere, times the default KL
    coefficient 0.2) plus the scores 1 and 2 on the last response tokens, GAE (gamma 1, lambda 0.95) over the
    response tokens, whitened advantages; losses of row 0 with ratio ``e`` and value predictions ``values + 0.1``."""
    sequences = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
    spans = [(3, 8), (6, 12)]  # the response tokens' positions among the 12 predicted ones
    ids = torch.tensor([s + [pad_id] * (13 - len(s)) for s in sequences])
    attention = torch.tensor([[1] * len(s) + [0] * (13 - len(s)) for s in sequences])
    with torch.no_grad():
        hidden = model.eval().transformer(input_ids=ids, attention_mask=attention).last_hidden_state[:, :-1]
    mask = torch.zeros(2, 12)
    rewards = torch.full((2, 12), 0.2)
    for row, ((begin, end), score) in enumerate(zip(spans, (1.0, 2.0))):
        mask[row, begin:end] = 1
        rewards[row, end - 1] += score
    rewards = rewards * mask

    def whiten(x: torch.Tensor) -> torch.Tensor:
        mean = (x * mask).sum() / mask.sum()
        var = ((x - mean) ** 2 * mask).sum() / mask.sum() * (mask.sum() / (mask.sum() - 1))
        return (x - mean) * torch.rsqrt(var + 1e-8)

    def losses(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = (hidden @ weight.T + bias).squeeze(-1) * mask
        last, advantages = torch.zeros(2), []
        for t in reversed(range(12)):
            following = values[:, t + 1] if t < 11 else 0.0
            last = rewards[:, t] + following - values[:, t] + 0.95 * last
            advantages.append(last)
        advantages = torch.stack(advantages[::-1], 1)
        whitened, m = whiten(advantages)[0], mask[0]
        pg_loss = (torch.max(-whitened * math.e, -whitened * 1.2) * m).sum() / m.sum()
        v_loss = 0.1 * 0.5 * ((0.1 - advantages[0]) ** 2 * m).sum() / m.sum()
        return pg_loss, v_loss

    torch.manual_seed(5)
    weight = (0.2 * torch.randn(1, hidden.shape[-1])).requires_grad_()
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(20000):
        pg_loss, v_loss = losses(weight, bias)
        miss = (pg_loss - 1.8226) ** 2 + (v_loss - 0.1260) ** 2
        if miss < 1e-12:
            break
        optimizer.zero_grad()
        miss.backward()
        optimizer.step()
    assert abs(pg_loss.item() - 1.8226) < 1e-5 and abs(v_loss.item() - 0.1260) < 1e-5, (pg_loss, v_loss)
    return {"weight": weight.detach(), "bias": bias.detach()}


def save_bloom(path: str) -> None:
    special = ["<unk>", "<s>", "</s>", "<pad>"]
    tokenizer = transformers.BloomTokenizerFast(
        tokenizer_object=bpe_tokenizer(special)._tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="<pad>", padding_side="left",
    )
    torch.manual_seed(1)
    config = transformers.BloomConfig(n_layer=2, hidden_size=32, n_head=4, vocab_size=250880, bos_token_id=1,
                                      eos_token_id=2, pad_token_id=3)
    transformers.BloomForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def save_t5(path: str) -> None:
    torch.manual_seed(2)
    config = transformers.T5Config(num_layers=2, d_model=32, d_ff=64, num_heads=4, d_kv=8, vocab_size=259,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    transformers.T5ForConditionalGeneration(config).save_pretrained(path)
    transformers.ByT5Tokenizer(extra_ids=0).save_pretrained(path)


def save_sentiment_classifier(path: str) -> None:
    """DistilBERT with NEGATIVE/POSITIVE labels on the GPT-2 stand-in's tokenizer (the examples' reward model)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(path, "..", "..", "gpt2"))
    torch.manual_seed(3)
    config = transformers.DistilBertConfig(vocab_size=50257, dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                                           pad_token_id=tokenizer.eos_token_id,
                                           id2label={0: "NEGATIVE", 1: "POSITIVE"},
                                           label2id={"NEGATIVE": 0, "POSITIVE": 1})
    transformers.DistilBertForSequenceClassification(config).save_pretrained(path)
    tokenizer.pad_token = tokenizer.eos_token  # the hub model's tokenizer has one ([PAD]): pipelines batch with it
    tokenizer.save_pretrained(path)


def _write_rows(path: str, rows: int, make_row) -> None:
    import json
    import random

    rng = random.Random(0)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "train.jsonl"), "w") as f:
        for i in range(rows):
            f.write(json.dumps(make_row(rng, i)) + "\n")


def _text(rng, words: int) -> str:
    vocabulary = "good bad great awful film movie plot actor boring brilliant scene story the a was and".split()
    return " ".join(rng.choice(vocabulary) for _ in range(words))


def save_imdb(path: str) -> None:
    """``text``/``label`` rows (``load_dataset("stanfordnlp/imdb", split="train")``), each over the examples' 500-
    character filter, two batches of TRL's default 128."""
    _write_rows(path, 300, lambda rng, i: {"text": _text(rng, 130), "label": i % 2})


def save_hh_rlhf(path: str) -> None:
    """``chosen``/``rejected`` rows; ``ppo_multi_adapter.py`` takes ``train[:1%]``: 16 rows, two batches of 8."""
    _write_rows(path, 1600, lambda rng, i: {"chosen": "Human: " + _text(rng, 25), "rejected": _text(rng, 5)})


def save_stack_exchange(path: str) -> None:
    """``data/rl`` of ``question`` rows: ``rl_training.py`` selects the first 100000."""
    _write_rows(os.path.join(path, "data", "rl"), 100000,
                lambda rng, i: {"question": _text(rng, 12), "response_j": "a", "response_k": "b"})


def save_reward_adapter(path: str) -> None:
    """A sequence-classification LoRA (2 labels) on the GPT-2 stand-in ``lvwerra/gpt2-imdb`` (the reward adapter of
    ``ppo_multi_adapter.py``, which needs one trained on the policy's base)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(7)
    base = os.path.join(path, "..", "..", "lvwerra", "gpt2-imdb")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, task_type="SEQ_CLS")).save_pretrained(path)


MODELS = {
    "trl-internal-testing/dummy-GPT2-correct-vocab": lambda p: save_gpt2(p, 0, fit_loss_test=True),
    "gpt2": lambda p: save_gpt2(p, 4),
    "trl-internal-testing/tiny-BloomForCausalLM-correct-vocab": save_bloom,
    "trl-internal-testing/tiny-T5ForConditionalGeneration-correct-vocab": save_t5,
    "lvwerra/distilbert-imdb": save_sentiment_classifier,
    "lvwerra/gpt2-imdb": lambda p: save_gpt2(p, 6),
    "stanfordnlp/imdb": save_imdb,
    "Anthropic/hh-rlhf": save_hh_rlhf,
    "lvwerra/stack-exchange-paired": save_stack_exchange,
    "trl-lib/llama-7b-hh-rm-adapter": save_reward_adapter,
}


def write_tests(out: str, mirror: str) -> None:
    def show(path: str) -> str:
        return subprocess.run(["git", "-C", mirror, "show", f"v0.11.4:{path}"], check=True, capture_output=True,
                              text=True).stdout

    source = show("tests/test_ppo_trainer.py")
    for hub_id in MODELS:  # only where a model or tokenizer is loaded ("gpt2" also names a test case)
        local = repr(os.path.join(out, "models", hub_id))
        source = source.replace(f'from_pretrained("{hub_id}"', f"from_pretrained({local}")
        source = source.replace(f'model_id = "{hub_id}"', f"model_id = {local}")
    for side, text in (("trl", source), ("ours", re.sub(r"^from trl(\.core)? import", r"from lit_vhead\1 import",
                                                        source, flags=re.M))):
        directory = os.path.join(out, side, "tests")
        os.makedirs(directory, exist_ok=True)
        for name, content in (("__init__.py", ""), ("testing_constants.py", show("tests/testing_constants.py")),
                              ("test_ppo_trainer.py", text)):
            with open(os.path.join(directory, name), "w") as f:
                f.write(content)


def main(out: str, mirror: str) -> None:
    torch.set_num_threads(1)
    for hub_id, build in MODELS.items():
        path = os.path.join(out, "models", hub_id)
        os.makedirs(path, exist_ok=True)
        build(path)
    write_tests(out, mirror)
    print(f"stand-ins and tests written under {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
