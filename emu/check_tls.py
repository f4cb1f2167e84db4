#!/usr/bin/env python3
"""Checks that a kernel library's thread-local block holds nothing but the
kernels' __shared__ variables (function-local statics) and the anchor: the
runtime poisons and swaps that whole block as the blocks' shared memory."""
import subprocess
import sys

lib = sys.argv[1]
out = subprocess.run(["readelf", "-sW", lib], check=True, capture_output=True, text=True).stdout
bad = []
for line in out.splitlines():
    cols = line.split()
    if len(cols) >= 8 and cols[3] == "TLS":
        name = cols[7]
        if not (name.startswith("_ZZ") or "anchor" in name):
            bad.append(name)
if bad:
    sys.exit(f"{lib}: thread-local variables that are not __shared__ memory: {', '.join(sorted(set(bad)))}")
