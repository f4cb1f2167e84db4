#!/usr/bin/env python3
"""Generates BENCHMARKS.md from the committed raw logs; no number is typed by hand.

    CPU: the newest bench-logs/cpu/*.log (scripts/bench-cpu.sh)
    GPU: the newest gpu-runs/<run>/ holding 04-bench.log (scripts/gpu-run.sh),
         with 05-torch.log (scripts/baselines_torch.py) and 01-system.log;
         the step-level figure from the `stepfig` lines of both (benches/step.rs,
         the torch script's step section)

Criterion reports "time: [lo mid hi]" and "thrpt: [lo mid hi]" per benchmark id;
the middle value (criterion's point estimate) is used. Throughput is the byte
count of the crate docs' memory-traffic table (src/lib.rs) over that time, shown in GB/s (10^9).

    python3 scripts/results.py [--out BENCHMARKS.md]
"""

import argparse
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

UNIT_S = {"ps": 1e-12, "ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
UNIT_B = {
    "B/s": 1.0,
    "KiB/s": 2.0**10,
    "MiB/s": 2.0**20,
    "GiB/s": 2.0**30,
    "TiB/s": 2.0**40,
    "KB/s": 1e3,
    "MB/s": 1e6,
    "GB/s": 1e9,
    "TB/s": 1e12,
}
TRIPLE = r"\[\s*\S+ \S+ (\S+) (\S+) \S+ \S+\s*\]"
RE_TIME = re.compile(r"time:\s+" + TRIPLE)
RE_THRPT = re.compile(r"thrpt:\s+" + TRIPLE)
RE_ID = re.compile(r"^([A-Za-z0-9_]+/\S+)")
RE_BASE = re.compile(r"^baseline (\S+) (\S+): median ([0-9.]+) ms, ([0-9.]+) GB/s \((\d+) bytes")
RE_KLERR = re.compile(r"^klerr (\S+) sigma=(\S+) gap=(\S+): kl=(\S+) rel_err=(\S+)")
RE_HEADER = re.compile(r"^# ([a-z ]+): (.*)$")
RE_STEPFIG = re.compile(r"^stepfig (\S+) ms=([0-9.eE+-]+)(?: gbps=([0-9.eE+-]+))?(?: # (.*))?$")


def parse(path):
    """Criterion results {id: {"s": seconds, "Bps": bytes/s}}, baselines
    {(lib, name): {"s", "Bps", "bytes"}}, klerr rows and '# key: value' headers."""
    crit, base, klerr, head, runs = {}, {}, [], {}, {}
    current = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            m = RE_HEADER.match(line)
            if m:
                head.setdefault(m.group(1), m.group(2))
                continue
            m = RE_BASE.match(line)
            if m:
                lib, name, ms, gbps, nbytes = m.groups()
                r = {"s": float(ms) * 1e-3, "Bps": float(gbps) * 1e9, "bytes": int(nbytes), "rounds": 1}
                old = base.get((lib, name))
                if old:  # several rounds: keep the fastest
                    r["rounds"] = old["rounds"] + 1
                    if old["s"] < r["s"]:
                        r = dict(old, rounds=r["rounds"])
                base[(lib, name)] = r
                continue
            m = RE_KLERR.match(line)
            if m:
                klerr.append(m.groups())
                continue
            m = RE_ID.match(line)
            if m and not line.startswith("Benchmarking"):
                current = m.group(1)
            m = RE_TIME.search(line)
            if m and current:
                runs.setdefault(current, []).append({"s": float(m.group(1)) * UNIT_S[m.group(2)]})
            m = RE_THRPT.search(line)
            if m and current and current in runs:
                runs[current][-1]["Bps"] = float(m.group(1)) * UNIT_B[m.group(2)]
    # Several rounds of one benchmark: keep the fastest.
    for bid, rs in runs.items():
        best = min(rs, key=lambda r: r["s"])
        crit[bid] = dict(best, rounds=len(rs))
    return crit, base, klerr, head


def newest(pattern):
    files = sorted(glob.glob(os.path.join(ROOT, pattern)))
    return files[-1] if files else None


def rel(path):
    return os.path.relpath(path, ROOT)


def fmt_ms(s):
    return f"{s * 1e3:.3f}" if s < 1 else f"{s * 1e3:.0f}"


def fmt_gbps(bps):
    return f"{bps / 1e9:.2f}" if bps < 100e9 else f"{bps / 1e9:.0f}"


def fmt_ratio(x):
    return f"{x:.2f}×"


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def find(crit, prefix):
    """The one criterion id starting with `prefix` (the size suffix varies)."""
    hits = sorted(k for k in crit if k.startswith(prefix))
    return hits[0] if hits else None


# CPU rows: (bench id prefix, numpy baseline name or None, target kind, target value)
CPU_TARGETS = {
    "grad_norm/cpu/sam/f32/": ("norm/f32/64Mi", "numpy", 1.0),
    "kl_div/cpu/forward-loss/f32/64x50257": ("kl/f32/64x50257", "numpy", 2.0),
    "perturb/cpu/sam/f32/": (None, "copy", 0.60),
    "perturb/cpu/adaptive/f32/": (None, "copy", 0.60),
    "restore/cpu/f32/": (None, "copy", 0.60),
    "restore/cpu/bf16/": (None, "copy", 0.60),
    "copy/cpu/rayon/f32/": ("copy/f32/64Mi", None, None),
}


def cpu_section(path):
    lines = ["## CPU reference (rayon, f64 accumulation)", ""]
    if not path:
        return lines + ["No CPU log is committed yet (run `scripts/bench-cpu.sh`).", ""]
    crit, base, _, head = parse(path)
    # The machine's copy bandwidth is the fastest copy measured in the run:
    # the crate's (rayon, one thread) or numpy's.
    copies = [(r["Bps"], f"`{k}`") for k, r in crit.items() if k.startswith("copy/cpu/") and "Bps" in r]
    copies += [(b["Bps"], f"numpy `{n}`") for (lib, n), b in base.items() if lib == "numpy" and n.startswith("copy/")]
    copy, copy_id = max(copies) if copies else (None, "?")
    lines += [
        f"Machine: {head.get('machine', '?')} ({head.get('cpu', '?')}), date {head.get('date', '?')}, "
        f"commit {head.get('commit', '?')}; raw log `{rel(path)}`.",
        "",
        f"Load average (1, 5, 15 min) before the run {head.get('load before', '?')}, after it "
        f"{head.get('load after', '?')}: on a shared machine, other jobs compete for the cores, so each "
        "comparison is run back to back (numpy copy, copy, perturb/restore; numpy norm, norm; numpy KL, KL), "
        f"the whole sequence {max([r.get('rounds', 1) for r in crit.values()] + [1])} times, and each "
        "benchmark's fastest round is shown (the one other jobs disturbed least). Benchmarks with a "
        "single round (EMA, noise, the optimizer in the newer logs) ran once, after the rounds.",
        "",
    ]
    setup = [
        f"{label}: {head[key]}."
        for key, label in (
            ("simd", "SIMD"),
            ("rustflags", "RUSTFLAGS"),
            ("transparent huge pages", "Transparent huge pages"),
        )
        if key in head
    ]
    if setup:
        lines += [" ".join(setup), ""]
    lines += [
        f"Copy bandwidth (the 100% line): the fastest copy of the run, {copy_id} at "
        f"{fmt_gbps(copy) if copy else '?'} GB/s, bytes read + written. "
        "Bytes per element are the floors of the crate docs' memory-traffic table (src/lib.rs); numpy baselines "
        "count the same bytes, so a GB/s ratio is a time ratio.",
        "",
    ]
    rows, verdicts = [], []
    for bid in sorted(crit, key=lambda k: (k.split("/")[0] != "copy", k)):
        r = crit[bid]
        if "s" not in r or "Bps" not in r:
            continue
        pct = f"{100 * r['Bps'] / copy:.0f}%" if copy else "—"
        target = next((v for k, v in CPU_TARGETS.items() if bid.startswith(k)), None)
        vs_np, tgt, met = "—", "", ""
        if target:
            np_name, kind, value = target
            b = base.get(("numpy", np_name)) if np_name else None
            if b:
                vs_np = fmt_ratio(r["Bps"] / b["Bps"])
            if kind == "numpy" and b:
                tgt = f"≥ {value:g}× numpy"
                ok = r["Bps"] / b["Bps"] >= value
            elif kind == "copy" and copy:
                tgt = f"≥ {100 * value:.0f}% of copy"
                ok = r["Bps"] / copy >= value
            else:
                ok = None
            if ok is not None:
                met = "yes" if ok else "**no**"
                verdicts.append((bid, tgt, met))
        rows.append([f"`{bid}`", fmt_ms(r["s"]), fmt_gbps(r["Bps"]), pct, vs_np, tgt, met])
    lines += table(["benchmark", "time (ms)", "GB/s", "% of copy", "vs numpy", "target", "met"], rows)
    lines += ["", "numpy baselines in the same run:", ""]
    rows = [[f"`{n}`", fmt_ms(b["s"]), fmt_gbps(b["Bps"])] for (lib, n), b in sorted(base.items()) if lib == "numpy"]
    lines += table(["numpy", "time (ms)", "GB/s"], rows) if rows else ["(none in this log)"]
    lines.append("")
    return lines


# GPU: crate id prefix -> (torch baseline name prefix) for the side-by-side ratios.
GPU_VS_TORCH = [
    ("tram_step/cuda/in-place-sam/f32/xlmr", "tram/step/f32/xlmr"),
    ("grad_norm/cuda/sam/f32/xlmr", "tram/norm/f32/xlmr"),
    ("perturb/cuda/sam/f32/xlmr", "tram/perturb/f32/xlmr"),
    ("kl_div/cuda/forward-loss/bf16/64x1048576", "kl/eager/loss/bf16/64x1048576"),
    ("kl_div/cuda/forward-loss/bf16/16384x32000", "kl/eager/loss/bf16/16384x32000"),
    ("kl_div/cuda/forward-loss/bf16/16x250002", "kl/eager/loss/bf16/16x250002"),
    ("kl_div/cuda/forward-loss/bf16/4096x50257", "kl/eager/loss/bf16/4096x50257"),
    ("kl_div/cuda/forward-loss+grad/bf16/64x1048576", "kl/eager/loss+grad/bf16/64x1048576"),
    ("kl_div/cuda/forward-loss+grad/bf16/16384x32000", "kl/eager/loss+grad/bf16/16384x32000"),
]
GPU_VS_COMPILE = [(a, b.replace("/eager/", "/compile/")) for a, b in GPU_VS_TORCH if "/eager/loss/" in b]
# Liger-Kernel's KL (log_softmax of both logit sets, then its kernel), when installed there.
GPU_VS_LIGER = [(a, b.replace("/eager/", "/liger/")) for a, b in GPU_VS_TORCH if "/eager/loss/" in b]
# Whole first steps (sum of our benches) against PyTorch's TRAM sequence.
GPU_STEPS = [
    ("in place (norm + perturb + restore)", ["grad_norm/cuda/sam/f32/xlmr", "perturb/cuda/sam/f32/xlmr", "restore/cuda/f32/xlmr"], 1.2),
    ("out of place (norm + perturb into a second buffer)", ["grad_norm/cuda/sam/f32/xlmr", "perturb/cuda/out-of-place-sam/f32/xlmr"], 2.0),
    ("master weights (norm + perturb from f32 master)", ["grad_norm/cuda/sam/f32/xlmr", "perturb/cuda/master-sam/bf16-f32/xlmr"], 2.0),
]
GPU_COPY_TARGETS = {"grad_norm/cuda/": 0.90, "perturb/cuda/": 0.85, "restore/cuda/": 0.90, "kl_div/cuda/forward-loss/": 0.85}


def gpu_section(run_dir):
    lines = ["## CUDA kernels (GPU)", ""]
    if not run_dir:
        return lines + [
            "No GPU log is committed yet: these tables fill in when a `scripts/gpu-run.sh` output "
            "folder is committed under `gpu-runs/`. (Build with `scripts/gpu-build.sh`; the run needs "
            "no Rust on the GPU machine.)",
            "",
        ]
    crit, _, klerr, head = parse(os.path.join(run_dir, "04-bench.log"))
    torch_log = os.path.join(run_dir, "05-torch.log")
    _, base, klerr_torch, _ = parse(torch_log) if os.path.exists(torch_log) else ({}, {}, [], {})
    klerr = klerr + klerr_torch
    card = "?"
    sys_log = os.path.join(run_dir, "01-system.log")
    date = "?"
    if os.path.exists(sys_log):
        with open(sys_log, encoding="utf-8", errors="replace") as f:
            text = f.read()
        m = re.search(r"^GPU 0: (.*?) \(UUID", text, re.M)
        card = m.group(1) if m else card
        m = re.search(r"^date: (\S+)", text, re.M)
        date = m.group(1) if m else date
        m = re.search(r"Driver Version: (\S+)", text)
        card += f", driver {m.group(1)}" if m else ""
    copy_id = find(crit, "copy/cuda/d2d/")
    copy = crit.get(copy_id, {}).get("Bps")
    lines += [f"Card: {card}; date {date}; raw logs `{rel(run_dir)}/`.", ""]
    lines += [f"Copy bandwidth (the 100% line): `{copy_id}` = {fmt_gbps(copy) if copy else '?'} GB/s read + written.", ""]
    rows = []
    for bid in sorted(k for k in crit if "/cuda/" in k):
        r = crit[bid]
        if "s" not in r or "Bps" not in r:
            continue
        pct = f"{100 * r['Bps'] / copy:.0f}%" if copy else "—"
        t = next((v for k, v in GPU_COPY_TARGETS.items() if bid.startswith(k)), None)
        met = ("yes" if r["Bps"] / copy >= t else "**no**") if (t and copy) else ""
        rows.append([f"`{bid}`", fmt_ms(r["s"]), fmt_gbps(r["Bps"]), pct, f"≥ {100 * t:.0f}%" if t else "", met])
    lines += table(["benchmark", "time (ms)", "GB/s", "% of copy", "target", "met"], rows) + [""]

    def torch_find(prefix):
        hits = sorted(k for k in base if k[0] == "torch" and k[1].startswith(prefix))
        return base[hits[0]] if hits else None

    rows = []
    for ours, theirs in GPU_VS_TORCH + GPU_VS_COMPILE + GPU_VS_LIGER:
        oid = find(crit, ours)
        b = torch_find(theirs)
        if oid and b and "s" in crit[oid]:
            rows.append([f"`{oid}`", fmt_ms(crit[oid]["s"]), f"`{theirs}`", fmt_ms(b["s"]), fmt_ratio(b["s"] / crit[oid]["s"])])
    lines += ["Against PyTorch (eager, `torch.compile`) and Liger-Kernel on the same GPU and sizes (CUDA events, first launch to last):", ""]
    lines += table(["ours", "ms", "PyTorch", "ms", "speed-up"], rows) if rows else ["(no matching rows)"]
    lines.append("")

    step = torch_find("tram/step/")
    rows = []
    for name, parts, target in GPU_STEPS:
        ids = [find(crit, p) for p in parts]
        if step and all(i and "s" in crit[i] for i in ids):
            ours = sum(crit[i]["s"] for i in ids)
            ratio = step["s"] / ours
            rows.append([name, fmt_ms(ours), fmt_ms(step["s"]), fmt_ratio(ratio), f"≥ {target:g}×", "yes" if ratio >= target else "**no**"])
    lines += ["TRAM's first step on the XLM-R base-like group against the public PyTorch sequence:", ""]
    lines += table(["path", "ours (ms)", "PyTorch (ms)", "speed-up", "target", "met"], rows) if rows else ["(no matching rows)"]
    lines.append("")

    if klerr:
        impls = sorted({r[0] for r in klerr})
        keys, by = [], {}
        for impl, sigma, gap, kl, err in klerr:
            sigma, gap = f"{float(sigma):g}", f"{float(gap):.0e}"
            if (sigma, gap) not in by:
                keys.append((sigma, gap))
                by[(sigma, gap)] = {"kl": kl}
            by[(sigma, gap)][impl] = err
        lines += [
            "KL accuracy on f32 inputs at small logit gaps (max relative error over the rows; "
            "ours against the CPU reference, PyTorch's f32 `log_softmax` path against an f64 centred oracle):",
            "",
        ]
        rows = [[s_, g_, by[(s_, g_)]["kl"]] + [by[(s_, g_)].get(i, "—") for i in impls] for s_, g_ in keys]
        lines += table(["σ", "gap", "KL"] + impls, rows) + [""]
    return lines


def stepfig(path):
    """{key: {"ms", "gbps", "what"}} from the `stepfig` lines of a log (the last of each key)."""
    out = {}
    if not path or not os.path.exists(path):
        return out
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = RE_STEPFIG.match(line.rstrip("\n"))
            if m:
                key, ms, gbps, what = m.groups()
                out[key] = {"ms": float(ms), "gbps": float(gbps) if gbps else None, "what": what or ""}
    return out


STEP_STAGES = ["stage=kl", "stage=norm", "stage=perturb", "stage=restore"]


def step_section(run_dir):
    lines = [
        "## Step-level figure (GPU)",
        "",
        "TRAM's extra device time per training step of GPT-2 medium (292 tensors, 355M parameters: bf16 "
        "weights, f32 master weights and gradients) with bf16 logits of 8 × 512 × 50,257, stage by stage "
        "as `TramStep` launches them (`benches/step.rs`), against the base AdamW step on the same parameters.",
        "",
    ]
    ours = stepfig(os.path.join(run_dir, "04-bench.log")) if run_dir else {}
    torch = stepfig(os.path.join(run_dir, "05-torch.log")) if run_dir else {}
    if not all(k in ours for k in STEP_STAGES):
        return lines + [
            "Not measured yet: the figure fills in when a GPU run whose `04-bench.log` holds the `stepfig` "
            "lines of `benches/step.rs` is committed under `gpu-runs/`.",
            "",
        ]
    total = sum(ours[k]["ms"] for k in STEP_STAGES)

    def gb(r):
        return f"{r['gbps']:.0f}" if r.get("gbps") else ""

    def cell(text):  # a '|' (as in KL(P||Q)) would end the table cell
        return text.replace("|", "\\|")

    rows = [[f"`{k.split('=', 1)[1]}`", f"{ours[k]['ms']:.3f}", gb(ours[k]), cell(ours[k]["what"])] for k in STEP_STAGES]
    rows.append(["**TRAM extra per step**", f"**{total:.3f}**", "", "sum of the stages above"])
    lines += table(["stage", "ms", "GB/s", "what"], rows) + [""]

    bases = [
        ("torch_fused_adamw", torch, "PyTorch `AdamW(fused=True).step` on the f32 masters"),
        ("torch_fused_adamw_bf16copy", torch, "the same + copy of the masters into the bf16 model"),
        ("ours_fused_adamw", ours, "our fused AdamW (master mode; also writes the bf16 weights)"),
    ]
    rows = [[what, f"{src[k]['ms']:.3f}", f"{total / src[k]['ms']:.2f}"] for k, src, what in bases if k in src]
    lines += ["TRAM's extra time as a fraction of one base AdamW step:", ""]
    lines += table(["base step", "ms", "TRAM extra / base"], rows) if rows else ["(no base step in this run)"]
    if "torch_fused_adamw" not in torch:
        lines += ["", "(PyTorch's fused AdamW is not in this run's `05-torch.log`.)"]
    lines.append("")

    rows = []
    if "first_step" in ours:
        parts = sum(ours[k]["ms"] for k in STEP_STAGES[:3])
        rows.append(["`TramStep::first_step` as one call", f"{ours['first_step']['ms']:.3f}", f"kl + norm + perturb timed alone: {parts:.3f}"])
    base = ours.get("ours_fused_adamw")
    for key, what in [("second_step_x", "`TramStep::second_step`, TRAM-x"), ("second_step_theta", "`TramStep::second_step`, TRAM-θ (EMA target fused)")]:
        if key in ours:
            extra = f"{ours[key]['ms'] - base['ms']:+.3f} over our fused AdamW" if base else ""
            rows.append([what, f"{ours[key]['ms']:.3f}", extra])
    if "noise_embed" in ours:
        rows.append(["TRAM-x embedding noise (bf16 8 × 512 × 1024)", f"{ours['noise_embed']['ms']:.3f}", "a framework-side call of TRAM-x, not in the sum"])
    if rows:
        lines += ["Cross-checks from the same run:", ""]
        lines += table(["call", "ms", "note"], rows) + [""]
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    args = ap.parse_args()
    cpu = newest("bench-logs/cpu/*.log")
    runs = sorted(glob.glob(os.path.join(ROOT, "gpu-runs", "*", "04-bench.log")))
    gpu = os.path.dirname(runs[-1]) if runs else None
    lines = [
        "# Benchmarks",
        "",
        "Generated by `scripts/results.py` from the committed raw logs; do not edit by hand.",
        "CPU logs come from `scripts/bench-cpu.sh`, GPU logs from `scripts/gpu-run.sh`",
        "(binaries built by `scripts/gpu-build.sh`). Times are criterion's point estimates;",
        "GPU times are CUDA-event times around the launches after warm-up.",
        "",
    ]
    lines += cpu_section(cpu)
    lines += gpu_section(gpu)
    lines += step_section(gpu)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    print(f"wrote {rel(args.out)} from {rel(cpu) if cpu else 'no CPU log'} and {rel(gpu) if gpu else 'no GPU run'}", file=sys.stderr)


if __name__ == "__main__":
    main()
