#!/usr/bin/env bash
# The Conan-v2 CPU demo in one command (5.5 min on an idle 2-core machine, one torch thread;
# add --quick for the CI form).
#   bash scripts/v2_demo.sh            # full: configs/v2-demo.yaml -> runs/v2-demo/ablation.md
#   bash scripts/v2_demo.sh --quick    # a few steps per stage, same code path
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
conan-embed v2-demo --config configs/v2-demo.yaml "$@"
