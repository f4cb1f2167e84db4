#!/usr/bin/env bash
# Builds the emulated CUDA device (emu/) for TRAM_EMU_VARIANT (plain, sanitize
# or fma; default plain) and prints, as the last line of its output, the
# directory holding its libcuda.so.1. Needs nvcc (found as build.rs finds it, or
# installed by scripts/install-nvcc.sh), g++ and Boost.Context (Debian's
# libboost-context-dev, installed here when missing and allowed).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

variant="${TRAM_EMU_VARIANT:-plain}"
case "$variant" in plain | sanitize | fma) ;; *)
    echo "TRAM_EMU_VARIANT=$variant: expected plain, sanitize or fma" >&2
    exit 2
    ;;
esac

if [ ! -e /usr/include/boost/context/detail/fcontext.hpp ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing libboost-context-dev" >&2
        apt-get install -y -q libboost-context-dev >&2 ||
            { apt-get update -q >&2 && apt-get install -y -q libboost-context-dev >&2; }
    else
        echo "emu-build: Boost.Context is missing: install libboost-context-dev" >&2
        exit 1
    fi
fi

nvcc="${NVCC:-}"
[ -n "$nvcc" ] && [ -x "$nvcc" ] || nvcc="$(command -v nvcc || true)"
[ -n "$nvcc" ] || nvcc="$(scripts/install-nvcc.sh | tail -n 1)"
cuda_inc="$(cd "$(dirname "$nvcc")/../include" && pwd)"
[ -e "$cuda_inc/cuda.h" ] || { echo "emu-build: no cuda.h beside $nvcc" >&2; exit 1; }

target="${CARGO_TARGET_DIR:-}"
if [ -z "$target" ]; then
    target="$(cargo metadata --format-version 1 --no-deps 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])' 2>/dev/null || true)"
fi
[ -n "$target" ] || target="$root/target"
out="$target/emu/$variant"

make -s -C emu -j"$(nproc)" VARIANT="$variant" OUT="$out" META="$target/emu/meta" \
    NVCC="$nvcc" CUDA_INC="$cuda_inc" KERNELS="$root/kernels" >&2
echo "$out"
