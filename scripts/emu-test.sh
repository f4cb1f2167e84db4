#!/usr/bin/env bash
# Runs the README's test command (cargo test --release) on the emulated CUDA
# device, building it first if needed, with TRAM_REQUIRE_GPU=1 so that a GPU
# test that skips fails. Arguments go to cargo test. The emulator's own tests
# (emu/tests/driver_test.cpp) run first.
#
#   TRAM_EMU_VARIANT    plain (default), sanitize (ASan + UBSan), fma
#   TRAM_EMU_SCHEDULE   in-order (default), reverse, random:SEED, threads:N
#   TRAM_EMU_DEFERRED   1: stream work runs only when the host waits for it
#   TRAM_EMU_MEMORY_MIB device memory the emulator reports (default 4096)
#
# It refuses to run where a real CUDA driver is installed (the stand-in must
# never shadow it) unless TRAM_EMU_FORCE=1.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

if [ "${TRAM_EMU_FORCE:-0}" != 1 ] &&
    { [ -e /dev/nvidiactl ] || ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; }; then
    echo "emu-test: a real CUDA driver is installed here: run the tests on it" \
        "(cargo test --release), or set TRAM_EMU_FORCE=1 to use the emulator anyway" >&2
    exit 1
fi

NVCC="${NVCC:-$(scripts/install-nvcc.sh | tail -n 1)}"
export NVCC
lib="$(scripts/emu-build.sh | tail -n 1)"
variant="${TRAM_EMU_VARIANT:-plain}"
echo "emu-test: variant $variant, schedule ${TRAM_EMU_SCHEDULE:-in-order}," \
    "deferred ${TRAM_EMU_DEFERRED:-0}, memory ${TRAM_EMU_MEMORY_MIB:-4096} MiB, driver $lib" >&2

# Only the test binaries get the emulator (and, sanitized, the ASan runtime,
# which must be the first library of the process); cargo and rustc do not.
runner="env LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} TRAM_REQUIRE_GPU=1"
if [ "$variant" = sanitize ]; then
    asan="$(gcc -print-file-name=libasan.so)"
    runner="$runner LD_PRELOAD=$asan ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:${ASAN_OPTIONS:-}"
    runner="$runner UBSAN_OPTIONS=print_stacktrace=1:${UBSAN_OPTIONS:-}"
fi

# The emulator's own tests print the refusals they provoke: shown in full only
# when one fails. They assume that stream work runs when it is enqueued (they
# read device memory right after launching): not under deferred streams.
if [ "${TRAM_EMU_DEFERRED:-0}" = 1 ]; then
    echo "emu-test: deferred streams: the emulator's own tests (driver_test) are skipped" >&2
elif ! selftest="$($runner TRAM_EMU_KERNEL_LIBS="$lib/libtram_emu_testkernels.so" "$lib/driver_test" 2>&1)"; then
    echo "$selftest" >&2
    echo "emu-test: the emulator's own tests failed" >&2
    exit 1
else
    echo "$selftest" | tail -n 1 >&2
fi

host="$(rustc -vV | sed -n 's/^host: //p')"
export "CARGO_TARGET_$(echo "$host" | tr 'a-z-' 'A-Z_')_RUNNER=$runner"
export TRAM_REQUIRE_GPU=1
exec cargo test --release "$@"
