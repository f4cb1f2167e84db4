#!/usr/bin/env bash
# The CPU comparison run: the crate's CPU benches (copy bandwidth, norm,
# perturb/restore, KL; then EMA, noise and the optimizer once) and the numpy
# baselines, one after the other in one run, into
# bench-logs/cpu/<date>-<machine>.log (raw output, read by scripts/results.py).
# Usage: scripts/bench-cpu.sh [extra criterion args]
#
# The sequence runs TRAM_ROUNDS times (default 3); results.py keeps each
# benchmark's best round, since on a shared machine the fastest round is the
# one other jobs disturbed least, and both sides of a comparison get the same
# treatment.
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
default_nvcc="$HOME/.cache/tram-kernels/nvcc-13.0/venv/lib/python3.11/site-packages/nvidia/cu13/bin/nvcc"
if [ -z "${NVCC:-}" ] && [ -x "$default_nvcc" ]; then export NVCC="$default_nvcc"; fi

# numpy (+ threadpoolctl to name the BLAS kernel) in a venv of its own.
venv="${TRAM_BENCH_VENV:-$HOME/.cache/tram-kernels/bench-venv}"
if ! "$venv/bin/python" -c 'import numpy, threadpoolctl' 2>/dev/null; then
    python3 -m venv "$venv" && "$venv/bin/pip" install -q --disable-pip-version-check numpy threadpoolctl >&2
fi

cpu_model="$(lscpu | sed -n 's/^Model name: *//p' | head -n 1)"
machine="$(echo "${TRAM_MACHINE:-$(echo "$cpu_model" | awk '{print tolower($1 "-" $2)}')-$(nproc)core}" | tr -c 'a-zA-Z0-9.\n-' '-')"
mkdir -p bench-logs/cpu
# Date and time in the name: runs of one day neither overwrite each other nor
# sort out of order (results.py reads the newest).
log="bench-logs/cpu/$(date -u +%Y-%m-%dT%H%MZ)-$machine.log"

benches=(copy grad_norm perturb kl_div ema noise optimizer)
# A fresh criterion folder: no "change since last run" lines, no stale baselines.
export CRITERION_HOME="$(mktemp -d)"
trap 'rm -rf "$CRITERION_HOME"' EXIT
cargo bench --no-run "${benches[@]/#/--bench=}" >&2 || exit 1

bench() {
    echo
    echo "=== cargo bench --bench $1 (load $(cut -d' ' -f1-3 /proc/loadavg))"
    cargo bench -q --bench "$1" -- "${criterion_args[@]}" 2>&1
    echo "=== exit $?"
}
numpy() {
    echo
    echo "=== numpy baseline $1 (OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset for this command only; load $(cut -d' ' -f1-3 /proc/loadavg))"
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "$venv/bin/python" scripts/baselines_numpy.py "$1" 2>&1
    echo "=== exit $?"
}
criterion_args=("$@")

{
    echo "# date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# machine: $machine"
    echo "# cpu: $cpu_model, $(nproc) cores; $(lscpu | sed -n 's/^L3 cache: *//p') L3"
    echo "# memory: $(free -g | awk '/^Mem:/ {print $2}') GiB"
    echo "# kernel: $(uname -r)"
    echo "# rustc: $(rustc --version)"
    echo "# commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src benches 2>/dev/null || echo ' (+ uncommitted changes)')"
    echo "# simd: $(grep -o -w -m1 avx2 /proc/cpuinfo || echo 'no avx2') (the KL, norm and perturbation loops dispatch to an AVX2 clone at run time when present)"
    echo "# rustflags: ${RUSTFLAGS:-(none)}"
    echo "# transparent huge pages: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || echo unknown) (CPU bench buffers are madvised, like numpy's arrays)"
    echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    # Each comparison back to back, since the load of a shared machine drifts:
    # numpy copy, our copy, perturb/restore (percent of that copy); numpy
    # norm, our norm; numpy KL, our KL.
    for round in $(seq 1 "${TRAM_ROUNDS:-3}"); do
        echo
        echo "=== round $round"
        numpy copy
        bench copy
        bench perturb
        numpy norm
        bench grad_norm
        numpy kl
        bench kl_div
    done
    # The operations without a CPU target, once: EMA, noise, and the fused
    # optimizer against its separate passes.
    echo
    echo "=== extra"
    bench ema
    bench noise
    bench optimizer
    echo
    echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$log"
echo "wrote $log" >&2
