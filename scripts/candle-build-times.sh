#!/usr/bin/env bash
# Measures what the candle features add to a CI run, in CI's order, in a fresh
# target directory whose kernel cache is already warm (CI builds the crate's
# kernels once per run; their cost is scripts/build-times.sh's subject):
#
#   1. the plain part: cargo clippy --all-targets --release, then
#      cargo test --release --no-run (the baseline the candle step builds on);
#   2. the candle step of .ci/run, as it runs there: clippy with --features
#      candle, the candle tests (build and run), the doctests and the short
#      example run;
#   3. cargo clippy --all-targets --features candle-cuda, CUDA_COMPUTE_CAP=90,
#      with cargo's --timings to split out candle-kernels' build script (nvcc
#      compiling candle's own kernels).
#
# The machine's cores and load are printed: on a shared machine, times vary.
#
#   scripts/candle-build-times.sh > bench-logs/build/<date>-candle.log
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
NVCC="${NVCC:-$("$root/scripts/install-nvcc.sh" 2>/dev/null | tail -n 1)}"
export NVCC TRAM_REQUIRE_NVCC=1
unset TRAM_CUDA_ARCHS CARGO_TARGET_DIR
work="$(mktemp -d "${TMPDIR:-/tmp}/tram-candle-times.XXXXXX")"
trap 'rm -rf "$work"' EXIT
target="$work/target"
# A warm kernel cache: the default architectures, built once before timing.
export TRAM_KERNEL_CACHE="${TRAM_KERNEL_CACHE:-$root/target/tram-kernel-cache}"
cd "$root"

load() { cut -d' ' -f1-3 /proc/loadavg; }
echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' (dirty)')"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo), load average $(load)"
echo "rustc: $(rustc --version)"
echo "nvcc: $("$NVCC" --version | tail -n 1)"
echo "kernel cache: warmed before timing ($TRAM_KERNEL_CACHE)"
cargo build --release -q --target-dir "$work/warm" 2>/dev/null
rm -rf "$work/warm"

timed() { # label command...
    local label="$1" t0=$SECONDS
    shift
    "$@" >"$work/out.log" 2>&1 || { cat "$work/out.log" >&2; exit 1; }
    printf '%-58s %5d s   (load %s)\n' "$label" $((SECONDS - t0)) "$(load)"
}

echo
echo "== 1. the plain part (no candle)"
timed "cargo clippy --all-targets --release" \
    cargo clippy --all-targets --release --target-dir "$target" -- -D warnings
timed "cargo test --release --no-run" \
    cargo test --release --no-run --target-dir "$target"

echo
echo "== 2. the candle step (after 1, same target directory)"
t0=$SECONDS
timed "cargo clippy --all-targets --release --features candle" \
    cargo clippy --all-targets --release --features candle --target-dir "$target" -- -D warnings
timed "cargo test --release --features candle --test candle_kl_div --test candle_optimizer" \
    cargo test --release --features candle --test candle_kl_div --test candle_optimizer --target-dir "$target"
timed "cargo test --release --features candle --doc" \
    cargo test --release --features candle --doc --target-dir "$target"
timed "cargo run --release --features candle --example candle_shift -- --steps 20 --seeds 1" \
    cargo run --release --features candle --example candle_shift --target-dir "$target" -- --steps 20 --seeds 1
echo "candle step in all: $((SECONDS - t0)) s"
echo "packages in the dependency tree (cargo tree -e normal): $(
    cargo tree --features candle -e normal --prefix none | sed "s/ (\*)//" | sort -u | wc -l) with candle, $(
    cargo tree -e normal --prefix none | sed "s/ (\*)//" | sort -u | wc -l) without"

echo
echo "== 3. cargo clippy --all-targets --features candle-cuda (after 2, same target directory)"
timed "CUDA_COMPUTE_CAP=90 cargo clippy --all-targets --features candle-cuda" \
    env PATH="$(dirname "$NVCC"):$PATH" CUDA_COMPUTE_CAP=90 \
    cargo clippy --all-targets --features candle-cuda --timings --target-dir "$target" -- -D warnings
python3 - "$target" <<'EOF'
import glob, json, re, sys
html = open(sorted(glob.glob(sys.argv[1] + "/cargo-timings/cargo-timing-*.html"))[-1]).read()
units = json.loads(re.search(r"const UNIT_DATA = (\[.*?\]);", html, re.S).group(1))
runs = [u["duration"] for u in units if u["name"] == "candle-kernels" and "run" in u.get("target", "")]
print(f"  of which candle-kernels' build script (nvcc): {sum(runs):.0f} s")
EOF
