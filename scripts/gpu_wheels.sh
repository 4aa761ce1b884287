#!/usr/bin/env bash
# Wheels for a GPU machine with no network. Run where PyPI is reachable:
#   bash scripts/gpu_wheels.sh wheels/          # our wheel + what a typical GPU image lacks
#   bash scripts/gpu_wheels.sh --with-mteb wheels/   # also mteb's subtree (~100 MiB in all)
#   bash scripts/gpu_wheels.sh --check-only wheels/  # versions and size only, no network
# Target: CPython 3.12, manylinux x86_64. The image is assumed to hold torch (CUDA),
# transformers, sentence-transformers, accelerate, peft, onnxruntime, scikit-learn, pandas,
# pyarrow, tensorboard and pytest with their dependencies; DIR gets our own wheel and the rest
# of conan-embedding[serve,llm] (datasets, faiss-cpu, pydantic, typer, fastapi, gguf, ...), at
# most 60 MiB, one version per package (fails otherwise). DIR's old *.whl are replaced, and
# DIR/MANIFEST.txt lists what is there and what is left out. Then, on the GPU machine:
#   bash scripts/gpu_check.sh --wheels wheels/
# PYTHON picks the interpreter that runs pip here (any version; default python3).
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/gpu_wheels.py" "$@"
