#!/usr/bin/env bash
# Runs on the GPU machine (no Rust there) what scripts/gpu-build.sh bundled,
# results first, in 8 minutes (480 s) at most:
#   1. the card, driver and compute capability, first lines of summary.txt and
#      of 01-system.log, then nvidia-smi in full                  (cap  15 s)
#   2. the test binaries with TRAM_REQUIRE_GPU=1, GPU tests first; binaries
#      that capture CUDA graphs (capture-tests.txt) one test at a time, so no
#      other test thread's context-wide synchronize can invalidate an open
#      capture; then `tour` and `train_shift --check`  -> 02-tests.log  (cap 150 s)
#   3. one compute-sanitizer memcheck pass over the test binaries that launch
#      kernels (gpu-tests.txt), each with an equal share of the cap; a machine
#      the tool refuses (as under gVisor) is logged and the stage ends
#                                                    -> 03-memcheck.log (cap  60 s)
#   4. the benches (CUDA halves only, TRAM_BENCH=cuda), `step` first (the
#      step-level figure, self-timed), then ~40 criterion ids at
#      --warm-up-time 0.5 --measurement-time 2       -> 04-bench.log    (cap 160 s)
#   5. baselines_torch.py: PyTorch eager, torch.compile, fused AdamW and
#      Liger's KL on the same sizes                   -> 05-torch.log    (cap  95 s)
# and OUTDIR/summary.txt with each command's exit code and seconds. A failing
# or capped command is logged and the run goes on; no command starts past the
# 480 s budget. Caps: TRAM_CAP_<STAGE> (SYSTEM, TESTS, MEMCHECK, BENCH, TORCH),
# budget: TRAM_BUDGET_S. At most 6 files, each cut at 15 MiB.
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

budget="${TRAM_BUDGET_S:-480}"
cap_system="${TRAM_CAP_SYSTEM:-15}"
cap_tests="${TRAM_CAP_TESTS:-150}"
cap_memcheck="${TRAM_CAP_MEMCHECK:-60}"
cap_bench="${TRAM_CAP_BENCH:-160}"
cap_torch="${TRAM_CAP_TORCH:-95}"

note() { echo "$*" | tee -a "$summary"; }

# left STAGE_START CAP: seconds left of a stage's cap and of the whole budget
# (0 when either is spent).
left() {
    local l=$(($2 - (SECONDS - $1))) b=$((budget - SECONDS))
    [ "$b" -lt "$l" ] && l=$b
    [ "$l" -lt 0 ] && l=0
    echo "$l"
}

# run LOG SECONDS CMD...: appends CMD's output to LOG (cut at the cap), logs
# the exit code and time, never stops the script; with no seconds left it
# logs the command as not run.
run() {
    local log="$1" limit="$2"
    shift 2
    local cmd="$*"
    cmd="${cmd//$bin\//}"
    cmd="${cmd//$bundle\//}"
    if [ "$limit" -lt 1 ]; then
        note "$(printf '%-64s not run: no time left' "$cmd")"
        return 0
    fi
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
    note "$(printf '%-64s %s, %ss' "$cmd" "$what" "$((SECONDS - t0))")"
    return 0
}

# Results first: the card and driver head the summary and the system log.
card="$(timeout 10 nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total \
    --format=csv,noheader 2>/dev/null | head -n 1)"
[ -n "$card" ] || card="no answer from nvidia-smi"
sass="$(sed -n 's/^sass: //p' "$bundle/MANIFEST" 2>/dev/null)"
cc="$(echo "$card" | awk -F', ' '{print $3}' | tr -d .)"
native="unknown"
if [[ "$cc" =~ ^[0-9]{2,3}$ ]] && [ -n "$sass" ]; then
    native="no: the driver JIT-compiles the compute_80 PTX at first load"
    for a in ${sass//,/ }; do
        a="${a#sm_}"
        [[ "$a" =~ ^[0-9]{2,3}$ ]] || continue
        # A cubin for X.y runs on X.z, z >= y.
        if [ "${a:0:-1}" = "${cc:0:-1}" ] && [ "${a: -1}" -le "${cc: -1}" ]; then native="yes (sm_$a)"; fi
    done
fi
: >"$summary"
note "card: $card (name, driver, compute capability, memory)"
note "machine code for this card: $native; bundle: SASS ${sass:-?} + compute_80 PTX"
note "gpu-run: $(date -u +%Y-%m-%dT%H:%M:%SZ), bundle $bundle, budget ${budget}s"
[ -f "$bundle/MANIFEST" ] || note "no bundle at $bundle: run scripts/gpu-build.sh and carry gpu-bundle"

sys="$out/01-system.log"
{
    echo "card: $card"
    echo "machine code for this card: $native"
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -a)"
    cat "$bundle/MANIFEST" 2>/dev/null
} >"$sys"
t0=$SECONDS
run "$sys" "$(left $t0 "$cap_system")" nvidia-smi -L
run "$sys" "$(left $t0 "$cap_system")" nvidia-smi
run "$sys" "$(left $t0 "$cap_system")" nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
[ -f "$bundle/ptxas-sm_90.txt" ] && { echo "=== ptxas sm_90 resource usage"; cat "$bundle/ptxas-sm_90.txt"; } >>"$sys"
[ -f "$bundle/tram-kernels-images.txt" ] && { echo "=== embedded images"; cat "$bundle/tram-kernels-images.txt"; } >>"$sys"

# Test binaries that capture CUDA graphs run one test at a time.
captures=" $(tr '\n' ' ' <"$bundle/capture-tests.txt" 2>/dev/null) "
# GPU tests first; the CPU reference's (cpu_*) last, if time is left.
tests=()
for t in "$bin"/tests/*; do case "$(basename "$t")" in cpu_*) ;; *) tests+=("$t") ;; esac; done
for t in "$bin"/tests/cpu_*; do [ -e "$t" ] && tests+=("$t"); done
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
    threads=4
    case "$captures" in *" $(basename "$t") "*) threads=1 ;; esac
    TRAM_REQUIRE_GPU=1 run "$log" "$(left $t0 "$cap_tests")" "$t" --test-threads=$threads
done
for e in tour "train_shift --check"; do
    # shellcheck disable=SC2086 # the name carries its arguments
    set -- $e
    [ -x "$bin/examples/$1" ] || { note "example $1: not in the bundle"; continue; }
    exe="$bin/examples/$1"
    shift
    TRAM_REQUIRE_GPU=1 run "$log" "$(left $t0 "$cap_tests")" "$exe" "$@"
done

log="$out/03-memcheck.log"
t0=$SECONDS
if ! command -v compute-sanitizer >/dev/null; then
    note "compute-sanitizer: not found, memcheck skipped"
else
    # The binaries that launch kernels (gpu-tests.txt), else all but cpu_*.
    gpu_tests=()
    for t in "${tests[@]}"; do
        [ -x "$t" ] || continue
        name="$(basename "$t")"
        if [ -f "$bundle/gpu-tests.txt" ]; then
            grep -qx "$name" "$bundle/gpu-tests.txt" && gpu_tests+=("$t")
        else
            case "$name" in cpu_*) ;; *) gpu_tests+=("$t") ;; esac
        fi
    done
    for i in "${!gpu_tests[@]}"; do
        # An equal share of what is left, so every binary gets its turn.
        share=$(($(left $t0 "$cap_memcheck") / (${#gpu_tests[@]} - i)))
        # --error-exitcode makes a found error a failing exit.
        TRAM_REQUIRE_GPU=1 run "$log" "$share" \
            compute-sanitizer --tool memcheck --error-exitcode 99 "${gpu_tests[$i]}" --test-threads=1
        if grep -qiE "device not supported|not supported on this (device|platform)|unable to (find|open|load)|failed to initialize" "$log"; then
            note "compute-sanitizer refused this machine (see 03-memcheck.log); memcheck ends here"
            break
        fi
    done
fi

log="$out/04-bench.log"
t0=$SECONDS
for b in "${benches[@]}"; do
    [ -x "$b" ] || continue
    TRAM_REQUIRE_GPU=1 run "$log" "$(left $t0 "$cap_bench")" "$b" --bench --warm-up-time 0.5 --measurement-time 2
done

log="$out/05-torch.log"
t0=$SECONDS
py="$(command -v python3 || command -v python)"
# Liger-Kernel travels unpacked in the bundle (see gpu-build.sh).
if [ -d "$bundle/pylib" ]; then export PYTHONPATH="$bundle/pylib${PYTHONPATH:+:$PYTHONPATH}"; fi
limit="$(left $t0 "$cap_torch")"
# The script skips its later sections to finish inside its own budget.
TRAM_TORCH_BUDGET_S=$((limit > 15 ? limit - 10 : 5)) run "$log" "$limit" "$py" "$bundle/baselines_torch.py"

note "gpu-run: done in ${SECONDS}s (budget ${budget}s)"
