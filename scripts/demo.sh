#!/usr/bin/env bash
# The main job: install, then fine-tune all-MiniLM-L6-v2 with the Conan-v1 recipe on real data
# from ../shared/data and print STSBenchmark test Spearman before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
conan-embed demo "$@"
