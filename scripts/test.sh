#!/usr/bin/env bash
# The project's test command: install, lint, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check src tests bench
python -m pytest -q -p no:cacheprovider "$@"
