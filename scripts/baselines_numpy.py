#!/usr/bin/env python3
"""numpy baselines for the CPU reference, on the sizes of the CPU benches.

    norm   np.linalg.norm on 64 Mi f32           (4 bytes per element read)
    copy   np.copyto of 64 Mi f32                (8 bytes per element: read + write)
    kl     a log_softmax-based KL on 64 x 50,257 (8 bytes per logit: both f32 inputs read once)

    python3 baselines_numpy.py [norm] [copy] [kl]      (default: all three)

Bytes are counted as the crate's benches count them (the crate docs' memory-traffic table, src/lib.rs),
so GB/s here and there compare directly. Run it with OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE unset (they slow a current numpy); the BLAS kernel in use is
printed. Output lines for scripts/results.py:

    baseline numpy <name>: median <ms> ms, <GB/s> GB/s (<bytes> bytes, <reps> reps)
"""

import os
import platform
import statistics
import sys
import time

import numpy as np

REPS = 15


def bench(name, nbytes, fn, reps=REPS):
    fn()  # warm-up: page faults, thread pool start
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    print(
        f"baseline numpy {name}: median {med * 1e3:.4f} ms, {nbytes / med / 1e9:.3f} GB/s "
        f"({nbytes} bytes, {reps} reps; min {min(times) * 1e3:.4f} ms)",
        flush=True,
    )


def log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    s = x - m
    return s - np.log(np.exp(s).sum(axis=-1, keepdims=True))


def kl_rows(a, b):
    """Forward KL(P||Q) per row, P = softmax(a), Q = softmax(b): the textbook formula."""
    la = log_softmax(a)
    lb = log_softmax(b)
    return (np.exp(la) * (la - lb)).sum(axis=-1)


def main(sections):
    print(f"numpy {np.__version__}, python {platform.python_version()}, {os.cpu_count()} cpus")
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        print(f"  {var}={os.environ.get(var, '(unset)')}")
    try:
        # numpy advises transparent huge pages for arrays >= 4 MiB; the Rust
        # benches put their CPU buffers on them too (benches/common HostBuf).
        from numpy._core import multiarray

        print(f"  madvise_hugepage={multiarray._get_madvise_hugepage()}")
    except (ImportError, AttributeError):
        print("  madvise_hugepage=unknown")
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    if os.path.exists(thp):
        with open(thp) as f:
            print(f"  transparent_hugepage={f.read().strip()}")
    try:
        from threadpoolctl import threadpool_info

        for info in threadpool_info():
            print(
                f"  threadpool: {info.get('internal_api')} {info.get('version')} "
                f"arch={info.get('architecture')} threads={info.get('num_threads')}"
            )
    except ImportError:
        print("  threadpoolctl not installed: BLAS kernel unknown")

    rng = np.random.default_rng(1)
    n = 64 << 20

    if "norm" in sections:
        x = rng.uniform(-1.0, 1.0, n).astype(np.float32)
        bench("norm/f32/64Mi", 4 * n, lambda: np.linalg.norm(x))

    if "copy" in sections:
        x = rng.uniform(-1.0, 1.0, n).astype(np.float32)
        dst = np.empty_like(x)
        bench("copy/f32/64Mi", 8 * n, lambda: np.copyto(dst, x))
        assert np.array_equal(dst, x)

    if "kl" in sections:
        # The shape and logit spread of the crate's CPU KL bench.
        rows, vocab = 64, 50257
        a = rng.uniform(-3.0, 3.0, (rows, vocab)).astype(np.float32)
        b = (a + 0.1 * rng.uniform(-1.0, 1.0, (rows, vocab))).astype(np.float32)
        bench(f"kl/f32/{rows}x{vocab}", 8 * rows * vocab, lambda: kl_rows(a, b).mean())


if __name__ == "__main__":
    # Sections to run (default all), so a driver can place each next to the
    # crate's bench it is compared with.
    main(sys.argv[1:] or ["norm", "copy", "kl"])
