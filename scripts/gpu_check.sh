#!/usr/bin/env bash
# One command for anyone with a GPU: runs scripts/gpu_check.py (its rows, report and options:
# `bash scripts/gpu_check.sh --help`); every argument but --wheels is passed on to it.
# On a machine without CUDA it says so and exits 0 (`--device cpu` runs the CPU-able rows).
#
#   --wheels DIR   first install, offline (pip --no-index), what DIR holds: our own wheel (always
#                  reinstalled) and each package the machine lacks (an installed version that
#                  satisfies the others is kept). DIR comes from `bash scripts/gpu_wheels.sh DIR`
#                  on a machine with network (docs/distributed.md, "A GPU machine without network").
#
# The check runs with TOKENIZERS_PARALLELISM=false and HF_HUB_OFFLINE=1 (set HF_HUB_OFFLINE=0
# beforehand to let it download models). PYTHON picks the interpreter (default: python).
set -euo pipefail

wheels=""
args=()
while (($#)); do
    case "$1" in
        --wheels)
            [[ $# -ge 2 ]] || { echo "gpu_check.sh: --wheels needs a folder" >&2; exit 2; }
            wheels="$2"
            shift 2
            ;;
        --wheels=*)
            wheels="${1#--wheels=}"
            shift
            ;;
        *)
            args+=("$1")
            shift
            ;;
    esac
done

PYTHON="${PYTHON:-python}"
if [[ -n "$wheels" ]]; then
    [[ -d "$wheels" ]] || { echo "gpu_check.sh: no folder $wheels" >&2; exit 2; }
    wheels="$(cd "$wheels" && pwd)"
    shopt -s nullglob
    ours=("$wheels"/conan_embedding-*.whl)
    if [[ ${#ours[@]} -ne 1 ]]; then
        echo "gpu_check.sh: want one conan_embedding-*.whl in $wheels, found ${#ours[@]}" >&2
        exit 2
    fi
    names=()
    for wheel in "$wheels"/*.whl; do
        name="$(basename "$wheel")"
        name="${name%%-*}"
        [[ "$name" == conan_embedding ]] || names+=("$name")
    done
    shopt -u nullglob
    pip_offline=("$PYTHON" -m pip install --disable-pip-version-check --no-index --find-links "$wheels")
    echo "gpu_check.sh: installing from $wheels (offline)"
    # the packages first (pip keeps installed versions that satisfy the rest), then our wheel
    # without its dependencies: mteb's subtree is not in DIR by default (gpu_wheels.sh explains)
    if ((${#names[@]})); then "${pip_offline[@]}" "${names[@]}"; fi
    "${pip_offline[@]}" --no-deps --force-reinstall "${ours[0]}"
    if ! "$PYTHON" -m pip check; then
        echo "gpu_check.sh: pip check found the above (mteb missing is expected: the check runs" \
            "no MTEB evaluation)" >&2
    fi
fi

cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
exec "$PYTHON" scripts/gpu_check.py ${args[@]+"${args[@]}"}
