#!/usr/bin/env bash
# Runs on the GPU machine (no Rust there) what scripts/gpu-build.sh bundled:
#   1. nvidia-smi -L and nvidia-smi                       -> OUTDIR/01-system.log
#   2. every test binary with TRAM_REQUIRE_GPU=1, then the examples `tour` and
#      `train_shift --check` (CPU vs CUDA, per-step losses)  -> OUTDIR/02-tests.log
#   3. the test binaries (but tests/cpu_*) once under compute-sanitizer memcheck -> OUTDIR/03-memcheck.log
#   4. every bench binary (--bench, short criterion times; their CUDA halves
#      only, TRAM_BENCH=cuda; TRAM_REQUIRE_GPU=1), `step` (the step-level
#      figure's stepfig lines, self-timed, ~15 s) first so a cap reached
#      later cannot lose it                             -> OUTDIR/04-bench.log
#   5. baselines_torch.py (PyTorch on the same sizes, its fused AdamW step
#      for the step-level figure, Liger's KL if installed) -> OUTDIR/05-torch.log
# and OUTDIR/summary.txt with each step's exit code and seconds. Each stage has
# a time cap so the whole run fits in about 9 minutes; a failing step is logged
# and the run goes on. At most 6 files, each cut at 15 MiB.
#
#   scripts/gpu-run.sh OUTDIR      (from the repository root, gpu-bundle/ beside it)
#
# With the device tool: build with scripts/gpu-build.sh in the checkout the
# tool sends, then run(command="scripts/gpu-run.sh $OUT", carry=["gpu-bundle"],
# timeout_s=590). Commit what comes back as gpu-runs/<date>-<card>/ and run
# scripts/results.py to regenerate BENCHMARKS.md.
set -u

out="${1:?usage: gpu-run.sh OUTDIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
here="$(cd "$(dirname "$0")" && pwd)"
if [ -f "$here/MANIFEST" ]; then bundle="$here"; else bundle="$(cd "$here/.." && pwd)/gpu-bundle"; fi
# The binaries travel packed; unpack them outside the bundle.
bin="$bundle"
if [ -f "$bundle/bin.tar.gz" ]; then
    bin="$(mktemp -d "${TMPDIR:-/tmp}/tram-bin.XXXXXX")"
    trap 'rm -rf "$bin"' EXIT
    tar -C "$bin" -xzf "$bundle/bin.tar.gz"
fi
summary="$out/summary.txt"
cap=$((15 * 1024 * 1024))
export CRITERION_HOME="${TMPDIR:-/tmp}/tram-criterion"
export PYTHONUNBUFFERED=1
export TRAM_BENCH=cuda # the benches' CPU halves measure this host, not the GPU

# Stage caps in seconds (sum 520 s ≈ 8.7 min, plus the examples' few seconds:
# under a 590 s device call); override with TRAM_CAP_<STAGE>. The bench cap
# covers ~40 criterion ids of ~2.7 s each, their data and checks, and `step`.
cap_tests="${TRAM_CAP_TESTS:-80}"
cap_memcheck="${TRAM_CAP_MEMCHECK:-100}"
cap_bench="${TRAM_CAP_BENCH:-220}"
cap_torch="${TRAM_CAP_TORCH:-120}"

note() { echo "$*" | tee -a "$summary"; }

# run LOG SECONDS CMD...: appends CMD's output to LOG (cut at the cap), logs
# the exit code and time, never stops the script.
run() {
    local log="$1" limit="$2"
    shift 2
    local t0=$SECONDS rc
    {
        echo
        echo "=== $* (time cap ${limit}s)"
    } >>"$log"
    timeout --kill-after=5 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    if [ "$(stat -c %s "$log")" -gt "$cap" ]; then truncate -s "$cap" "$log"; fi
    local what="exit $rc"
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && what="exit $rc (time cap ${limit}s reached)"
    echo "=== $what after $((SECONDS - t0))s" >>"$log"
    local cmd="$*"
    cmd="${cmd//$bin\//}"
    note "$(printf '%-64s %s, %ss' "${cmd//$bundle\//}" "$what" "$((SECONDS - t0))")"
    return 0
}

# left STAGE_START CAP: seconds left of a stage's cap (at least 1)
left() { local l=$(($2 - (SECONDS - $1))); [ "$l" -lt 1 ] && l=1; echo "$l"; }

: >"$summary"
note "gpu-run: $(date -u +%Y-%m-%dT%H:%M:%SZ), bundle $bundle"
[ -f "$bundle/MANIFEST" ] || note "no bundle at $bundle: run scripts/gpu-build.sh and carry gpu-bundle"

sys="$out/01-system.log"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -a)"
    cat "$bundle/MANIFEST" 2>/dev/null
} >"$sys"
run "$sys" 30 nvidia-smi -L
run "$sys" 30 nvidia-smi
run "$sys" 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
[ -f "$bundle/ptxas-sm_90.txt" ] && { echo "=== ptxas sm_90 resource usage"; cat "$bundle/ptxas-sm_90.txt"; } >>"$sys"

tests=("$bin"/tests/*)
# The step-level figure first, then the others in name order.
benches=()
[ -e "$bin/benches/step" ] && benches+=("$bin/benches/step")
for b in "$bin"/benches/*; do
    [ "$(basename "$b")" = step ] || benches+=("$b")
done

log="$out/02-tests.log"
t0=$SECONDS
for t in "${tests[@]}"; do
    [ -x "$t" ] || continue
    TRAM_REQUIRE_GPU=1 run "$log" "$(left $t0 "$cap_tests")" "$t" --test-threads=4
done

for e in tour "train_shift --check"; do
    # shellcheck disable=SC2086 # the name carries its arguments
    set -- $e
    [ -x "$bin/examples/$1" ] || { note "example $1: not in the bundle"; continue; }
    exe="$bin/examples/$1"
    shift
    TRAM_REQUIRE_GPU=1 run "$log" 120 "$exe" "$@"
done

log="$out/03-memcheck.log"
t0=$SECONDS
if ! command -v compute-sanitizer >/dev/null; then
    note "compute-sanitizer: not found, memcheck skipped"
else
    # Every test binary but the CPU reference's (tests/cpu_*), which launch nothing.
    for t in "${tests[@]}"; do
        [ -x "$t" ] || continue
        case "$(basename "$t")" in cpu_*) continue ;; esac
        # --error-exitcode makes a found error a failing exit; a device the
        # tool refuses (as under gVisor) shows up in the log and exit code.
        TRAM_REQUIRE_GPU=1 run "$log" "$(left $t0 "$cap_memcheck")" \
            compute-sanitizer --tool memcheck --error-exitcode 99 "$t" --test-threads=1
    done
    grep -q "Device not supported\|not supported on this device" "$log" 2>/dev/null &&
        note "compute-sanitizer refused the device (see 03-memcheck.log)"
fi

log="$out/04-bench.log"
t0=$SECONDS
for b in "${benches[@]}"; do
    [ -x "$b" ] || continue
    TRAM_REQUIRE_GPU=1 run "$log" "$(left $t0 "$cap_bench")" "$b" --bench --warm-up-time 0.5 --measurement-time 2
done

log="$out/05-torch.log"
py="$(command -v python3 || command -v python)"
# Liger-Kernel travels unpacked in the bundle (see gpu-build.sh).
if [ -d "$bundle/pylib" ]; then export PYTHONPATH="$bundle/pylib${PYTHONPATH:+:$PYTHONPATH}"; fi
run "$log" "$cap_torch" "$py" "$bundle/baselines_torch.py"

note "gpu-run: done in ${SECONDS}s"
