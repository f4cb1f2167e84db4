#!/usr/bin/env bash
# Builds, here, everything the GPU machine runs (it has no Rust toolchain) into
# the git-ignored folder gpu-bundle/:
#   gpu-bundle/bin.tar.gz       tests/<name>: release test binaries (lib unit
#                               tests + tests/*.rs); benches/<name>: release
#                               bench binaries, every [[bench]] of Cargo.toml
#                               (criterion, and `step`, which prints the
#                               step-level figure's stepfig lines);
#                               examples/<name>: tour and train_shift
#   gpu-bundle/gpu-run.sh, baselines_torch.py, MANIFEST, ptxas-sm_90.txt,
#   tram-kernels-images.txt     (what the embedded fat binaries hold),
#   capture-tests.txt           (test binaries that capture CUDA graphs),
#   gpu-tests.txt               (test binaries that launch kernels)
#   gpu-bundle/pylib/           liger_kernel (the KL baseline), when pip can
#                               fetch its wheel here
# The kernels carry machine code for the GPU the bundle goes to only:
# TRAM_CUDA_ARCHS, sm_90 (H100/H200) unless set (sm_80 for A100, sm_100 for
# B200, ...), plus the compute_80 PTX every build embeds, which the driver JITs
# on any other GPU. cudarc's bindings are pinned to CUDA 13.0
# (CUDARC_CUDA_VERSION=13000), the driver (R580) the GPU machines run.
# Binaries are stripped and packed so the bundle stays well under the 64 MiB a
# device call may carry. Then, on the GPU machine (from the repository root):
#   scripts/gpu-run.sh OUTDIR          (or gpu-bundle/gpu-run.sh OUTDIR)
# with gpu-bundle carried along (it is git-ignored).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bundle="$root/gpu-bundle"

# The kernels must be embedded: a bundle without PTX would only skip on the GPU.
default_nvcc="$HOME/.cache/tram-kernels/nvcc-13.0/venv/lib/python3.11/site-packages/nvidia/cu13/bin/nvcc"
if [ -z "${NVCC:-}" ] && [ -x "$default_nvcc" ]; then export NVCC="$default_nvcc"; fi
if ! { [ -n "${NVCC:-}" ] && [ -x "$NVCC" ]; } && ! command -v nvcc >/dev/null; then
    echo "no nvcc: run scripts/install-nvcc.sh and set NVCC to the path it prints" >&2
    exit 1
fi
export TRAM_REQUIRE_NVCC=1
export TRAM_CUDA_ARCHS="${TRAM_CUDA_ARCHS:-sm_90}"
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}"
echo "machine code for $TRAM_CUDA_ARCHS, PTX for compute_80; cudarc bindings for CUDA $CUDARC_CUDA_VERSION" >&2
target_dir="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"

list_executables() { # reads cargo's JSON messages, prints "kind name path" per test-harness or bench executable
    python3 -c '
import json, sys
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("{"):
        continue
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t = m["target"]
    # `cargo test` also builds examples as plain programs: only harness binaries.
    if not m["profile"]["test"] and "bench" not in t["kind"]:
        continue
    print(t["kind"][0], t["name"], m["executable"])
'
}

echo "building release test binaries" >&2
tests="$(cargo test --release --no-run --message-format=json | list_executables)"
echo "building release bench binaries" >&2
benches="$(cargo bench --no-run --message-format=json | list_executables | awk '$1 == "bench"')"
echo "building release examples (tour, train_shift)" >&2
examples="$(cargo build --release --examples --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    if line.startswith("{"):
        m = json.loads(line)
        if m.get("reason") == "compiler-artifact" and m.get("executable") and "example" in m["target"]["kind"]:
            print(m["target"]["name"], m["executable"])
')"

stage="$target_dir/gpu-stage"
rm -rf "$bundle" "$stage"
mkdir -p "$bundle" "$stage/tests" "$stage/benches" "$stage/examples"
copy() { # dest-folder name path
    local dst="$1/$2"
    if [ -e "$dst" ]; then dst="$1/$2-$(basename "$3")"; fi
    cp "$3" "$dst"
    strip --strip-all "$dst" 2>/dev/null || true
    echo "$dst"
}
while read -r kind name path; do
    [ -n "$path" ] || continue
    # The lib's unit tests are named after the lib; keep that name distinct.
    [ "$kind" = "lib" ] && name="lib-$name"
    copy "$stage/tests" "$name" "$path" >/dev/null
done <<<"$tests"
while read -r kind name path; do
    [ -n "$path" ] || continue
    copy "$stage/benches" "$name" "$path" >/dev/null
done <<<"$benches"
while read -r name path; do
    [ -n "$path" ] || continue
    copy "$stage/examples" "$name" "$path" >/dev/null
done <<<"$examples"

cp scripts/gpu-run.sh scripts/baselines_torch.py "$bundle/"
# Liger-Kernel for the KL baseline: a pure-Python wheel (torch and triton come
# with the GPU machine's PyTorch), unpacked into gpu-bundle/pylib, which
# gpu-run.sh puts on PYTHONPATH. The GPU machine has no network, so it travels.
liger="${TRAM_LIGER_VERSION:-0.8.5}"
wheels="$target_dir/wheels"
if python3 -m pip download -q --no-deps --only-binary=:all: "liger-kernel==$liger" -d "$wheels" >&2 2>&1 ||
    ls "$wheels"/liger_kernel-"$liger"-*.whl >/dev/null 2>&1; then
    mkdir -p "$bundle/pylib"
    python3 -m zipfile -e "$(ls "$wheels"/liger_kernel-"$liger"-*.whl | head -n 1)" "$bundle/pylib"
    echo "liger-kernel $liger unpacked into gpu-bundle/pylib" >&2
else
    echo "could not fetch liger-kernel $liger: the Liger baseline will be skipped" >&2
fi
# Test binaries that capture CUDA graphs: gpu-run.sh runs them one test at a
# time, so another test thread's context-wide synchronize cannot invalidate an
# open capture.
{
    grep -l "begin_capture" tests/*.rs 2>/dev/null | xargs -r -n 1 basename | sed 's/\.rs$//'
    grep -rlq "begin_capture" src/ && echo "lib-tram_kernels"
} >"$bundle/capture-tests.txt" || true
# Test binaries that launch kernels: gpu-run.sh's memcheck pass runs these.
grep -lE "CudaBackend|common::gpu" tests/*.rs 2>/dev/null | xargs -r -n 1 basename |
    sed 's/\.rs$//' >"$bundle/gpu-tests.txt" || true
cp "$target_dir/release/ptxas-sm_90.txt" "$bundle/" 2>/dev/null || true
cp "$target_dir/release/tram-kernels-images.txt" "$bundle/"
{
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
    echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src kernels benches tests 2>/dev/null || echo ' (+ uncommitted changes)')"
    echo "rustc: $(rustc --version)"
    echo "nvcc: ${NVCC:-from PATH/CUDA_HOME}"
    echo "sass: $TRAM_CUDA_ARCHS"
    echo "ptx: compute_80"
    echo "cudarc bindings: CUDA $CUDARC_CUDA_VERSION"
    (cd "$stage" && find tests benches examples -type f | sort | xargs ls -l | awk '{print $5, $9}')
} >"$bundle/MANIFEST"
tar -C "$stage" -czf "$bundle/bin.tar.gz" tests benches examples
cat "$bundle/MANIFEST"

size=$(du -sb "$bundle" | cut -f1)
echo "gpu-bundle: $((size / 1024 / 1024)) MiB" >&2
if [ "$size" -ge $((64 * 1024 * 1024)) ]; then
    echo "gpu-bundle is over 64 MiB: it cannot travel to the GPU machine" >&2
    exit 1
fi
