"""Shared fixtures: offline, one thread, quiet transformers, and tiny models of every supported architecture."""

import os
import subprocess

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import pytest
import torch
import transformers

torch.set_num_threads(1)
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

VOCAB = 259  # ByT5Tokenizer(extra_ids=0)

# Tiny configs (2 layers, hidden 32-64) of every architecture the value-head models support, all offline.
TINY_CONFIGS = {
    "gpt2": dict(model_type="gpt2", n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=128),
    "gpt_neo": dict(
        model_type="gpt_neo", num_layers=2, hidden_size=32, num_heads=4, vocab_size=VOCAB,
        attention_types=[[["global", "local"], 1]], max_position_embeddings=128,
    ),
    "gpt_neox": dict(
        model_type="gpt_neox", num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        vocab_size=VOCAB, max_position_embeddings=128,
    ),
    "opt": dict(
        model_type="opt", num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=4, vocab_size=VOCAB,
        word_embed_proj_dim=16, max_position_embeddings=128,
    ),
    "llama": dict(
        model_type="llama", num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
    ),
    "mistral": dict(
        model_type="mistral", num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
    ),
    "qwen2": dict(
        model_type="qwen2", num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
    ),
    "gemma": dict(
        model_type="gemma", num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=128,
    ),
    "t5": dict(
        model_type="t5", num_layers=2, d_model=32, d_ff=64, num_heads=4, d_kv=8, vocab_size=VOCAB,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ),
    "bart": dict(
        model_type="bart", encoder_layers=2, decoder_layers=2, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=128,
    ),
}
SEQ2SEQ = {"t5", "bart"}
CAUSAL = sorted(set(TINY_CONFIGS) - SEQ2SEQ)


def tiny_hf_model(arch: str, seed: int = 0):
    """A freshly initialised tiny transformers model of ``arch`` in eval mode (CausalLM or Seq2SeqLM)."""
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(**TINY_CONFIGS[arch])
    for name in ("bos_token_id", "eos_token_id"):  # GPT-2's and GPT-Neo's default, 50256, is outside VOCAB
        if isinstance(getattr(config, name, None), int) and getattr(config, name) >= VOCAB:
            setattr(config, name, 1)  # ByT5's eos
    auto = transformers.AutoModelForSeq2SeqLM if arch in SEQ2SEQ else transformers.AutoModelForCausalLM
    return auto.from_config(config).eval()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """``{arch: dir}``: each tiny model saved once with save_pretrained (a plain HF checkpoint, no value head)."""
    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {}
    for arch in TINY_CONFIGS:
        dirs[arch] = root / arch
        tiny_hf_model(arch).save_pretrained(dirs[arch])
    return dirs


@pytest.fixture(scope="session")
def byt5():
    return transformers.ByT5Tokenizer(extra_ids=0)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
FAST = [  # a short, real PPO run: a few steps, small batches
    "ppo.steps=4",
    "ppo.batch_size=8",
    "ppo.mini_batch_size=4",
    "ppo.generation.max_new_tokens=8",
    "logger=csv",
    "callbacks=none",
    "plot=false",
    "sample_table_every=0",
]


def compose(overrides: list[str], output_dir) -> "DictConfig":  # noqa: F821
    """The train config with ``overrides``, its run dir set to ``output_dir`` (as ``@hydra.main`` would)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from lit_vhead.cli import register_configs

    register_configs()

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size)``: a fresh tmpfs of that size under ``tmp_path`` (another filesystem than the system temp dir),
    unmounted afterwards."""
    mounted = []

    def mount(size: str):
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs (a second filesystem of a chosen size) needs root")
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)
