"""Tiny local stand-ins for the hub models and data sets that TRL 0.29.1's experimental-PPO example and tests load,
and TRL's example and tests made runnable against them (for the README's "TRL's experimental PPOTrainer" section).

    python tools/make_trl_ppov2_standins.py /tmp/trl-ppov2-standins [path/to/trl.git]

writes (nothing from the hub, deterministic, a few seconds):

- ``models/trl-internal-testing/tiny-<Arch>``: every model TRL's ``tests/experimental/test_ppo_trainer.py`` loads (14
  causal architectures, T5, BART, ``tiny-Qwen2ForSequenceClassification-2.5``): random weights from configs (2 layers,
  width 16, or the hub's width 8 for Qwen2, 512-row embeddings), each with a small byte-level BPE tokenizer trained
  here (EOS ``<|endoftext|>``, a chat template; the embedding has rows to spare, for the ``[PAD]`` token TRL's
  example adds);
- ``datasets/trl-internal-testing/zen`` (configs ``standard_prompt_only``: ``prompt``, train/test;
  ``conversational_language_modeling``: ``messages``) and ``datasets/trl-internal-testing/descriptiveness-sentiment-
  trl-style`` (split ``descriptiveness``: ``prompt``), readable by ``datasets.load_dataset(<dir>, name)``;
- with a clone of huggingface/trl: ``trl/`` and ``ours/``, each with TRL's example ``examples/scripts/ppo/ppo.py`` (as
  ``examples/ppo.py``), ``tests/testing_utils.py`` and ``tests/experimental/test_ppo_trainer.py`` at tag v0.29.1 (read
  from the clone at run time, never stored here), the tests' hub ids pointed at ``models/`` and ``datasets/``;
  ``ours`` has only ``trl.experimental.ppo`` replaced by ``lit_vhead.experimental.ppo``. Run the tests with
  ``python -m pytest -q tests/experimental/test_ppo_trainer.py`` from that dir. Its two ``PPOTrainer`` tests use
  ``PPOConfig``'s default ``bf16=True``, which ``TrainingArguments`` refuses without a GPU;
  ``test_ppo_trainer_cpu.py`` is the same file with ``use_cpu=True`` added to their ``PPOConfig``. The example runs on
  the stand-ins given as flags: ``--model_name_or_path``/``--sft_model_path`` the Qwen2 causal stand-in,
  ``--reward_model_path`` the classifier, ``--dataset_name`` the descriptiveness data set (see the README).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    PreTrainedTokenizerFast,
)

HUB = "trl-internal-testing"
CAUSAL = {
    "tiny-BloomForCausalLM": "bloom", "tiny-CohereForCausalLM": "cohere", "tiny-Gemma2ForCausalLM": "gemma2",
    "tiny-GemmaForCausalLM": "gemma", "tiny-GPT2LMHeadModel": "gpt2", "tiny-GPTNeoXForCausalLM": "gpt_neox",
    "tiny-LlamaForCausalLM-3.1": "llama", "tiny-LlamaForCausalLM-3.2": "llama", "tiny-LlamaForCausalLM-3": "llama",
    "tiny-MistralForCausalLM-0.1": "mistral", "tiny-MistralForCausalLM-0.2": "mistral", "tiny-OPTForCausalLM": "opt",
    "tiny-Phi3ForCausalLM": "phi3", "tiny-Qwen2ForCausalLM-2.5": "qwen2",
}
SEQ2SEQ = {"tiny-T5ForConditionalGeneration": "t5", "tiny-BartModel": "bart"}
CLASSIFIER = "tiny-Qwen2ForSequenceClassification-2.5"
POLICY = "tiny-Qwen2ForCausalLM-2.5"
DESCRIPTIVENESS = "descriptiveness-sentiment-trl-style"
# One set of small sizes; each config takes the names its architecture knows (the rest are ignored attributes).
TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
            head_dim=8, vocab_size=512, max_position_embeddings=256, n_positions=256, ffn_dim=32,
            d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
            tie_word_embeddings=False)
# The hub's tiny Qwen2 sizes: TRL's test_check_peft_model_nb_trainable_params counts its LoRA parameters (905) and,
# with its 151665-token vocabulary (HUB_VOCAB; the example's stand-ins keep 512 rows, for speed), all its weights.
QWEN2 = dict(hidden_size=8, num_attention_heads=4, num_key_value_heads=2, head_dim=2)
HUB_VOCAB = 151665
WORDS = ("the a movie film story actor day night city river house garden bright dark quiet loud old new happy sad "
         "walked looked found made told gave took said went came saw knew thought felt").split()
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|endoftext|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize()


def tokenizer() -> PreTrainedTokenizerFast:
    rng = random.Random(0)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([sentence(rng, 12) for _ in range(200)], vocab_size=400, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|user|>", "<|assistant|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def save_model(path: str, model_type: str, auto: type, seed: int, **extra: object) -> None:
    """A tiny random ``auto`` model of ``model_type`` with the BPE tokenizer (``extra``: config overrides)."""
    tok = tokenizer()
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.eos_token_id,
           "decoder_start_token_id": tok.eos_token_id}
    torch.manual_seed(seed)
    own = {"qwen2": QWEN2, "opt": {"word_embed_proj_dim": 16}}.get(model_type, {})  # value heads read the latter
    sizes = {**TINY, **own, **ids, **extra}
    model = auto.from_config(AutoConfig.for_model(model_type, **sizes))
    model.save_pretrained(path)
    tok.save_pretrained(path)


def save_models(out: str, only_example: bool = False) -> None:
    """The example's two stand-ins (policy, classifier); with ``only_example=False`` every model TRL's tests load."""
    root = os.path.join(out, "models", HUB)
    vocab = {} if only_example else {"vocab_size": HUB_VOCAB}
    save_model(os.path.join(root, POLICY), "qwen2", AutoModelForCausalLM, 0, **vocab)
    save_model(os.path.join(root, CLASSIFIER), "qwen2", AutoModelForSequenceClassification, 1, num_labels=1, **vocab)
    if only_example:
        return
    for seed, (name, model_type) in enumerate(CAUSAL.items(), start=2):
        if name != POLICY:
            save_model(os.path.join(root, name), model_type, AutoModelForCausalLM, seed)
    for seed, (name, model_type) in enumerate(SEQ2SEQ.items(), start=20):
        save_model(os.path.join(root, name), model_type, AutoModelForSeq2SeqLM, seed)


def save_dataset(path: str, splits: dict[str, dict[str, list]]) -> None:
    """A dataset dir of JSON-lines files with a README whose ``configs`` metadata names them (``load_dataset`` reads
    it); ``splits`` maps ``config/split`` to rows."""
    configs: dict[str, list[tuple[str, str]]] = {}
    for key, rows in splits.items():
        config, split = key.split("/")
        file = f"{config}/{split}.jsonl"
        os.makedirs(os.path.join(path, config), exist_ok=True)
        with open(os.path.join(path, file), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        configs.setdefault(config, []).append((split, file))
    lines = ["---", "configs:"]
    for config, files in configs.items():
        lines += [f"- config_name: {config}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {file}" for split, file in files]
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write("\n".join([*lines, "---", ""]))


def save_datasets(out: str, only_example: bool = False) -> None:
    rng = random.Random(1)
    root = os.path.join(out, "datasets", HUB)
    save_dataset(os.path.join(root, DESCRIPTIVENESS), {
        "default/descriptiveness": [{"prompt": sentence(rng, rng.randint(3, 8))} for _ in range(116)],
    })
    if only_example:
        return
    prompts = [{"prompt": sentence(rng, rng.randint(3, 8))} for _ in range(24)]
    chats = [{"messages": [{"role": "user", "content": sentence(rng, 5)},
                           {"role": "assistant", "content": sentence(rng, 6)}]} for _ in range(6)]
    save_dataset(os.path.join(root, "zen"), {
        "standard_prompt_only/train": prompts[:16], "standard_prompt_only/test": prompts[16:],
        "conversational_language_modeling/train": chats,
    })


def write_trl_files(out: str, mirror: str) -> None:
    """TRL's example and tests at v0.29.1 (tests' hub ids pointed at the stand-ins): ``trl/`` as they are, ``ours/``
    with ``trl.experimental.ppo`` replaced by ``lit_vhead.experimental.ppo``."""

    def show(path: str) -> str:
        return subprocess.run(["git", f"--git-dir={mirror}", "show", f"v0.29.1:{path}"], check=True,
                              capture_output=True, text=True).stdout

    def ours(text: str) -> str:
        assert "from trl.experimental.ppo import" in text, "TRL's file no longer imports trl.experimental.ppo"
        return text.replace("trl.experimental.ppo", "lit_vhead.experimental.ppo")

    example = show("examples/scripts/ppo/ppo.py")
    source = show("tests/experimental/test_ppo_trainer.py")
    for kind in ("models", "datasets"):
        for name in os.listdir(os.path.join(out, kind, HUB)):
            source = source.replace(f'"{HUB}/{name}"', repr(os.path.join(out, kind, HUB, name)))
    for side, code, text in (("trl", example, source), ("ours", ours(example), ours(source))):
        os.makedirs(os.path.join(out, side, "examples"), exist_ok=True)
        with open(os.path.join(out, side, "examples", "ppo.py"), "w") as f:
            f.write(code)
        tests = os.path.join(out, side, "tests")
        os.makedirs(os.path.join(tests, "experimental"), exist_ok=True)
        for path in ("__init__.py", "experimental/__init__.py"):
            open(os.path.join(tests, path), "w").close()
        with open(os.path.join(tests, "testing_utils.py"), "w") as f:
            f.write(show("tests/testing_utils.py"))
        with open(os.path.join(tests, "experimental", "test_ppo_trainer.py"), "w") as f:
            f.write(text)
        # PPOConfig defaults to bf16, which TrainingArguments refuses without a GPU: a copy that trains on the CPU
        with open(os.path.join(tests, "experimental", "test_ppo_trainer_cpu.py"), "w") as f:
            f.write(text.replace('report_to="none",', 'report_to="none", use_cpu=True,'))


def main(out: str, mirror: str | None = None) -> None:
    torch.set_num_threads(1)
    save_models(out)
    save_datasets(out)
    if mirror is not None:
        write_trl_files(out, mirror)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
