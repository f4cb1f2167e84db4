#!/usr/bin/env bash
# Installs NVIDIA's nvcc 13.0 from its pip wheels into a cache folder and prints
# the path of nvcc on the last line of stdout.
#
# Why 13.0 and not newer: the GPUs we measure on run driver 580 (CUDA 13.0), and a
# driver rejects PTX from a newer nvcc. Build with an nvcc no newer than your driver.
#
#   NVCC=$(scripts/install-nvcc.sh | tail -n 1) cargo test
set -euo pipefail

cache="${TRAM_NVCC_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tram-kernels/nvcc-13.0}"
python="${PYTHON:-python3}"

find_nvcc() { ls "$cache"/venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -n 1; }

nvcc="$(find_nvcc || true)"
if [ -z "$nvcc" ] || ! "$nvcc" --version >/dev/null 2>&1; then
    echo "installing nvcc 13.0 wheels into $cache" >&2
    rm -rf "$cache/venv"
    mkdir -p "$cache"
    "$python" -m venv "$cache/venv"
    "$cache/venv/bin/pip" install --quiet --disable-pip-version-check \
        'nvidia-cuda-nvcc==13.0.88' 'nvidia-nvvm==13.0.*' 'nvidia-cuda-crt==13.0.*' \
        'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-cccl==13.0.*' >&2
    nvcc="$(find_nvcc)"
fi
[ -x "$nvcc" ] || { echo "nvcc not found under $cache after install" >&2; exit 1; }
"$nvcc" --version | tail -n 2 >&2
echo "$nvcc"
