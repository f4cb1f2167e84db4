#!/usr/bin/env bash
# Measures what building the crate costs, from a clean target directory and an
# empty kernel cache: the wall time of `cargo build --release` and of its
# kernel part (tram-kernels' build script, from cargo's --timings), the size of
# the library (.rlib) and of one release test binary (tests/ptx_embedded.rs),
# plain and stripped. Each COMMIT (default: HEAD) is measured in a fresh
# checkout with the default architectures, and HEAD once more with
# TRAM_CUDA_ARCHS=sm_90 (the quick local build, and the GPU bundle's). The
# machine's cores and load are printed too: on a shared machine, times vary.
#
#   scripts/build-times.sh [COMMIT...] > bench-logs/build/<date>.log
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
NVCC="${NVCC:-$("$root/scripts/install-nvcc.sh" 2>/dev/null | tail -n 1)}"
export NVCC TRAM_REQUIRE_NVCC=1
unset TRAM_CUDA_ARCHS TRAM_KERNEL_CACHE CARGO_TARGET_DIR
work="$(mktemp -d "${TMPDIR:-/tmp}/tram-build-times.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "rustc: $(rustc --version)"
echo "nvcc: $("$NVCC" --version | tail -n 1)"

# seconds of tram-kernels' build-script run in the newest cargo --timings report
script_seconds() {
    python3 - "$1" <<'EOF'
import glob, json, re, sys
html = open(sorted(glob.glob(sys.argv[1] + "/cargo-timings/cargo-timing-*.html"))[-1]).read()
units = json.loads(re.search(r"const UNIT_DATA = (\[.*?\]);", html, re.S).group(1))
runs = [u["duration"] for u in units if u["name"] == "tram-kernels" and "run" in u.get("target", "")]
print(f"{sum(runs):.1f}")
EOF
}

measure() { # label commit [env assignments...]
    local label="$1" commit="$2"
    shift 2
    local src="$work/src-$label" target="$work/target-$label"
    mkdir -p "$src"
    git -C "$root" archive "$commit" | tar -x -C "$src"
    local t0=$SECONDS
    (cd "$src" && env "$@" CARGO_TARGET_DIR="$target" cargo build --release --timings -q 2>/dev/null)
    local wall=$((SECONDS - t0))
    (cd "$src" && env "$@" CARGO_TARGET_DIR="$target" cargo test --release --no-run -q --test ptx_embedded 2>/dev/null)
    local rlib="$target/release/libtram_kernels.rlib"
    local exe
    exe="$(ls -t "$target"/release/deps/ptx_embedded-* | grep -v '\.d$' | head -n 1)"
    cp "$exe" "$work/stripped" && strip --strip-all "$work/stripped"
    echo
    echo "== $label: $(git -C "$root" rev-parse --short "$commit") ${*:-(default architectures)}"
    echo "clean cargo build --release: ${wall} s wall, of which the kernel build script $(script_seconds "$target") s"
    echo "libtram_kernels.rlib: $(stat -c %s "$rlib") bytes"
    echo "ptx_embedded test binary: $(stat -c %s "$exe") bytes, stripped $(stat -c %s "$work/stripped") bytes"
    if [ -f "$target/release/tram-kernels-images.txt" ]; then
        sed 's/^/  /' "$target/release/tram-kernels-images.txt"
    fi
    rm -rf "$src" "$target"
}

for commit in "${@:-HEAD}"; do
    measure "$(git -C "$root" rev-parse --short "$commit")" "$commit"
done
measure "sm_90-only" HEAD TRAM_CUDA_ARCHS=sm_90
