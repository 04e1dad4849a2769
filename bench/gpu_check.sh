#!/usr/bin/env bash
# GPU readiness: ONE line per check (bf16-mixed, 16-mixed + GradScaler, bf16-true, fsdp on one device, the
# gpt2-small PPO-step benchmark), each PASS/FAIL with its key figures; at most 8 minutes on one GPU.
#
#   bash bench/gpu_check.sh                 # on a machine with one CUDA GPU
#   bash bench/gpu_check.sh --cpu-dry-run   # the same command lines on the CPU, to catch mistakes first
#
# Needs python3 with torch (CUDA), transformers, lightning, peft, torchmetrics, safetensors, hydra-core/omegaconf on
# the path; lit_vhead is found from the repo root (no `pip install -e .` needed), wandb is not used (CSV logger).
# Exit status: 0 when every check passed.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
exec python3 bench/gpu_check.py "$@"
