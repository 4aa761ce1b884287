#!/usr/bin/env bash
# One command for anyone with a GPU: one bf16 step of every training stage on one GPU; DDP,
# CBB and mining (its encoding shared by the ranks) on two GPUs when present; one DeepSpeed
# ZeRO-2 step when deepspeed is installed; and a few optimizer steps of the 1.4B pretraining
# config on a GPU of 40 GB or more. Prints a pass/fail table with step time and peak memory
# (also written to runs/gpu_check/report.json).
# On a machine without CUDA it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
exec python scripts/gpu_check.py "$@"
