#!/usr/bin/env bash
# Checks that tram-kernels builds in one cudarc with the frameworks that share
# it: ci/beside-candle enables cudarc as candle-core 0.11.1's `cuda` feature
# does (dynamic-linking, the CUDA version from nvcc), ci/beside-burn as
# cubecl-cuda 0.11 does (fallback-dynamic-loading, fallback-latest). Each is a
# workspace of its own with its own lock file, so `cargo test` at the root
# never builds them; `cargo check` needs no CUDA libraries.
#
#   ci/check-beside.sh TARGET_DIR      (NVCC set; TRAM_KERNEL_CACHE shared
#                                       with the main build, as .ci/run does)
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:?usage: ci/check-beside.sh TARGET_DIR}"
: "${NVCC:?NVCC must name nvcc}"

for crate in beside-candle beside-burn; do
    manifest="ci/$crate/Cargo.toml"
    # A cuda-XXXXX feature from tram-kernels would override the framework's
    # CUDA version detection for the whole build.
    forced="$(cargo tree --manifest-path "$manifest" --locked -e features -i cudarc |
        grep -oE 'cudarc feature "cuda-[0-9]+"' || true)"
    if [ -n "$forced" ]; then
        echo "$crate: something turns on $forced: the user's build must choose the CUDA version" >&2
        exit 1
    fi
    echo "cargo check $crate (cudarc reads the CUDA version from the nvcc on PATH)"
    PATH="$(dirname "$NVCC"):$PATH" cargo check --manifest-path "$manifest" --locked \
        --target-dir "$target/beside"
done

# A candle user on CUDA 12.x gets 12.x bindings, and tram-kernels compiles
# against them.
echo "cargo check beside-candle with CUDARC_CUDA_VERSION=12080"
CUDARC_CUDA_VERSION=12080 cargo check --manifest-path ci/beside-candle/Cargo.toml --locked \
    --target-dir "$target/beside"
