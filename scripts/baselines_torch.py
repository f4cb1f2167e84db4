#!/usr/bin/env python3
"""PyTorch baselines on the GPU, on the sizes of the crate's CUDA benches.

Run by scripts/gpu-run.sh on the GPU machine, after the crate's benches. Timing:
CUDA events recorded around each repetition, from before its first launch to
after its last (launch gaps included), after warm-up; the median is printed.

    copy      device-to-device copy of 1 GiB (the bandwidth ceiling)
    tram      the public TRAM code's op sequence on an XLM-R base-like group
              (199 f32 tensors, 278M parameters): per-tensor
              torch.linalg.vector_norm stacked and normed, p.clone() of every
              parameter, torch._foreach_mul(grads, scale),
              torch._foreach_add_(params, e), restore by assigning the clone
    kl        F.kl_div(F.log_softmax(y.float(), -1), F.log_softmax(x.float(), -1),
              log_target=True) on bf16 logits (x target, y model), eager and
              torch.compile, loss and loss + backward
    klerr     PyTorch's f32 KL error against an f64 oracle at small logit gaps
    step      the step-level figure's base step: torch.optim.AdamW(fused=True)
              on GPT-2 medium's 292 f32 master tensors (355M) with f32
              gradients, alone and followed by the copy of the master into a
              bf16 model (benches/step.rs times TRAM's stages on the same shapes)
    liger     Liger-Kernel's KL (liger_kernel.transformers.functional.liger_kl_div,
              reduction="batchmean", log_target=True) on the kl shapes, from
              the bf16 logits (F.log_softmax of both in f32 first: Liger takes
              log-probabilities) and on ready f32 log-probabilities (the kernel
              alone); skipped with a message when liger_kernel is not installed

Output lines for scripts/results.py:

    baseline torch <name>: median <ms> ms, <GB/s> GB/s (<bytes> bytes, <reps> reps)
    klerr torch-f32 sigma=<s> gap=<g>: kl=<oracle> rel_err=<max over rows>
    stepfig torch_fused_adamw ms=<median ms per step> # ...
    stepfig torch_fused_adamw_bf16copy ms=<median ms per step> # ...

Without PyTorch or without a CUDA device it prints why and exits 1 (no traceback).

GB/s divide the bytes the crate's own bench counts for the same work (its byte
floor), so the two compare as times.
"""

import math
import os
import statistics
import sys
import time

try:
    import torch
    import torch.nn.functional as F
except ImportError as e:  # a machine without PyTorch: say so, no traceback
    print(f"torch not installed ({e}): PyTorch baselines skipped", flush=True)
    sys.exit(1)

DEV = "cuda"
BUDGET_S = float(os.environ.get("TRAM_TORCH_BUDGET_S", "110"))
T0 = time.monotonic()


def elapsed():
    return time.monotonic() - T0


def report(name, nbytes, times_ms, note=""):
    med = statistics.median(times_ms)
    gbps = nbytes / (med * 1e-3) / 1e9
    extra = f"; {note}" if note else ""
    print(
        f"baseline torch {name}: median {med:.4f} ms, {gbps:.2f} GB/s "
        f"({nbytes} bytes, {len(times_ms)} reps; min {min(times_ms):.4f} ms{extra})",
        flush=True,
    )
    return med


def cuda_times(fn, reps, warmup=3, setup=None):
    """Milliseconds of each repetition, CUDA events around it."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        if setup:
            setup()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def xlmr_base():
    """Element counts of XLM-R base's 199 tensors (as benches/common/mod.rs)."""
    h, ff = 768, 3072
    t = [250_002 * h, 514 * h, h, h, h]
    for _ in range(12):
        t += [h * h, h, h * h, h, h * h, h, h * h, h]
        t += [h, h]
        t += [ff * h, ff, h * ff, h]
        t += [h, h]
    t += [h * h, h]
    return t


def group_of(params):
    """xlmr_base() cycled and cut at `params` parameters (as benches/common/mod.rs)."""
    base, t, total, i = xlmr_base(), [], 0, 0
    while total < params:
        n = min(base[i % len(base)], params - total)
        t.append(n)
        total += n
        i += 1
    return t


def gpt2_medium():
    """Element counts of GPT-2 medium's 292 tensors, 354,823,168 parameters
    (as benches/common/mod.rs gpt2_medium)."""
    h, ff = 1024, 4096
    t = [50_257 * h, 1024 * h]  # wte, wpe
    for _ in range(24):
        t += [h, h]  # ln_1
        t += [h * 3 * h, 3 * h]  # attn.c_attn
        t += [h * h, h]  # attn.c_proj
        t += [h, h]  # ln_2
        t += [h * ff, ff]  # mlp.c_fc
        t += [ff * h, h]  # mlp.c_proj
    t += [h, h]  # ln_f
    return t


def free():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def bench_copy():
    n = 256 << 20
    src = torch.randn(n, device=DEV)
    dst = torch.empty_like(src)
    report("copy/d2d/f32/256Mi", 8 * n, cuda_times(lambda: dst.copy_(src), reps=30))
    assert torch.equal(dst, src)
    del src, dst
    free()


def bench_tram_step():
    sizes = xlmr_base()
    nparam = sum(sizes)
    g = torch.Generator(device=DEV).manual_seed(3)
    params = [torch.randn(n, device=DEV, generator=g) * 0.02 for n in sizes]
    grads = [torch.randn(n, device=DEV, generator=g) * 1e-3 for n in sizes]
    delta = 0.5
    d = torch.tensor(0.1, device=DEV)  # the KL value: a device scalar
    tag = f"f32/xlmr{len(sizes)}x{nparam // 1_000_000}M"

    def norm():
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads]))

    state = {}

    def perturb():
        scale = delta * d / (norm() + 1e-12)
        state["backup"] = [p.clone() for p in params]
        e = torch._foreach_mul(grads, scale)
        torch._foreach_add_(params, e)

    def perturb_only():  # clone, mul, add with the norm already known
        scale = delta * d / (state["norm"] + 1e-12)
        state["backup"] = [p.clone() for p in params]
        e = torch._foreach_mul(grads, scale)
        torch._foreach_add_(params, e)

    def restore():
        for p, b in zip(params, state.pop("backup", [])):
            p.data = b

    def step():
        perturb()
        restore()

    state["norm"] = norm()
    report(f"tram/norm/{tag}", 4 * nparam, cuda_times(norm, reps=20))
    report(f"tram/perturb/{tag}", 16 * nparam, cuda_times(perturb_only, reps=20, setup=restore))
    # Restore by assignment moves no bytes on the device; time it for completeness.
    report(f"tram/restore/{tag}", 8 * nparam, cuda_times(restore, reps=20, setup=perturb_only))
    report(
        f"tram/step/{tag}",
        28 * nparam,
        cuda_times(step, reps=20),
        note="norm + clone + foreach_mul + foreach_add_ + restore; bytes = the crate's in-place floor 28 B/param",
    )
    del params, grads, state
    free()


def kl_fn(x, y):
    return F.kl_div(F.log_softmax(y.float(), -1), F.log_softmax(x.float(), -1), log_target=True)


KL_SHAPES = [(64, 1_048_576), (16_384, 32_000), (16, 250_002), (4096, 50_257)]


def make_logits(rows, vocab):
    g = torch.Generator(device=DEV).manual_seed(5)
    x = (3.0 * torch.randn(rows, vocab, device=DEV, generator=g)).to(torch.bfloat16)
    y = (x.float() + 0.1 * torch.randn(rows, vocab, device=DEV, generator=g)).to(torch.bfloat16)
    return x, y


def bench_kl(compiled):
    fn = torch.compile(kl_fn, dynamic=False) if compiled else kl_fn
    mode = "compile" if compiled else "eager"
    for rows, vocab in KL_SHAPES:
        if elapsed() > BUDGET_S * (0.9 if compiled else 0.6):
            print(f"skip kl {mode} {rows}x{vocab}: time budget ({elapsed():.0f}s of {BUDGET_S:.0f}s)")
            continue
        x, y = make_logits(rows, vocab)
        n = rows * vocab
        tag = f"bf16/{rows}x{vocab}"
        t = time.monotonic()
        report(f"kl/{mode}/loss/{tag}", 4 * n, cuda_times(lambda: fn(x, y), reps=10, warmup=2))
        if compiled:
            print(f"  (compile + warm-up + timing took {time.monotonic() - t:.1f}s)")
        else:
            yg = y.detach().requires_grad_(True)

            def loss_grad():
                yg.grad = None
                fn(x, yg).backward()

            report(f"kl/{mode}/loss+grad/{tag}", 10 * n, cuda_times(loss_grad, reps=10, warmup=2))
            del yg
        del x, y
        free()


def phi(x):
    """expm1(-x) + x in f64, with a series where it would cancel."""
    small = x.abs() < 1e-3
    series = x * x * (0.5 - x * (1 / 6 - x * (1 / 24 - x / 120)))
    return torch.where(small, series, torch.expm1(-x) + x)


def kl_oracle(a, b):
    """KL(P||Q) per row in f64, centred on the P-mean of d = a - b (src/cpu/kl_div.rs)."""
    a, b = a.double(), b.double()
    p = torch.softmax(a, -1)
    d = a - b
    alpha = (p * d).sum(-1, keepdim=True)
    return torch.log1p((p * phi(d - alpha)).sum(-1))


def kl_errors():
    vocab, rows = 50_257, 4
    g = torch.Generator(device=DEV).manual_seed(7)
    for sigma in (3.0, 30.0):
        for gap in (1.0, 1e-2, 1e-3, 1e-4, 1e-5):
            a = (sigma * torch.randn(rows, vocab, device=DEV, generator=g, dtype=torch.float64)).float()
            z = torch.randn(rows, vocab, device=DEV, generator=g, dtype=torch.float64)
            b = (a.double() + gap * z).float()
            ref = kl_oracle(a, b)
            ours = F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="none").sum(-1)
            rel = ((ours.double() - ref).abs() / ref.abs()).max().item()
            print(f"klerr torch-f32 sigma={sigma:g} gap={gap:g}: kl={ref.mean().item():.3e} rel_err={rel:.3e}")


def bench_step():
    """The step-level figure's base step: fused AdamW on the f32 masters."""
    sizes = gpt2_medium()
    nparam = sum(sizes)
    g = torch.Generator(device=DEV).manual_seed(9)
    master = [(torch.randn(n, device=DEV, generator=g) * 0.02).requires_grad_(True) for n in sizes]
    for p in master:
        p.grad = torch.randn(p.shape, device=DEV, generator=g) * 1e-3
    model = [p.detach().to(torch.bfloat16) for p in master]
    master_data = [p.detach() for p in master]
    # lr and decay as benches/step.rs (decay on every tensor there too).
    opt = torch.optim.AdamW(master, lr=1e-6, weight_decay=0.01, fused=True)
    tag = f"gpt2m{len(sizes)}x{nparam // 1_000_000}M"

    def with_copy():
        opt.step()
        with torch.no_grad():
            torch._foreach_copy_(model, master_data)

    alone = cuda_times(opt.step, reps=20, warmup=3)
    copied = cuda_times(with_copy, reps=20, warmup=3)
    report(f"adamw/fused/f32master/{tag}", 28 * nparam, alone, note="fused AdamW on the f32 masters; 28 B/param")
    report(f"adamw/fused+bf16copy/{tag}", 30 * nparam, copied, note="+ copy into the bf16 model; 30 B/param")
    print(
        f"stepfig torch_fused_adamw ms={statistics.median(alone):.4f} "
        f"# torch.optim.AdamW(fused=True).step on {len(sizes)} f32 master tensors ({nparam} params), f32 grads",
        flush=True,
    )
    print(
        f"stepfig torch_fused_adamw_bf16copy ms={statistics.median(copied):.4f} "
        "# the same step + torch._foreach_copy_ of the masters into the bf16 model (what our fused update also writes)",
        flush=True,
    )
    del master, model, master_data, opt
    free()


LIGER_ERROR = None


def liger_kl():
    """Liger-Kernel's KL as f(input, target, reduction, log_target), or None.

    Tries the autograd function itself first (it needs only torch and triton),
    then the functional and module wrappers. Any failure is kept in
    LIGER_ERROR, so the log says why the baseline is missing."""
    global LIGER_ERROR
    try:
        from liger_kernel.ops.kl_div import LigerKLDivLossFunction

        def via_function(inp, target, reduction="batchmean", log_target=False):
            return LigerKLDivLossFunction.apply(inp, target, reduction, log_target, 1e-10)

        return via_function
    except Exception as e:  # ImportError, or an import-time error of its deps
        LIGER_ERROR = f"{type(e).__name__}: {e}"
    try:
        from liger_kernel.transformers.functional import liger_kl_div

        return liger_kl_div
    except Exception:
        pass
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except Exception:
        return None

    def via_module(inp, target, reduction="batchmean", log_target=False):
        return LigerKLDIVLoss(reduction=reduction, log_target=log_target)(inp, target)

    return via_module


def bench_liger():
    fn = liger_kl()
    if fn is None:
        print(f"liger not available: skipped ({LIGER_ERROR}; gpu-build.sh carries the wheel in gpu-bundle/pylib)", flush=True)
        return
    try:
        import liger_kernel

        version = getattr(liger_kernel, "__version__", "?")
    except Exception:  # the version is only informative
        version = "?"
    print(f"liger-kernel {version}", flush=True)
    for rows, vocab in KL_SHAPES:
        if elapsed() > BUDGET_S * 0.8:
            print(f"skip kl liger {rows}x{vocab}: time budget ({elapsed():.0f}s of {BUDGET_S:.0f}s)")
            continue
        x, y = make_logits(rows, vocab)
        n = rows * vocab
        tag = f"{rows}x{vocab}"

        # KL(P_x || P_y): Liger's input is the model's log-probabilities,
        # its target the target's (log_target=True); batchmean = mean over rows.
        def from_logits():
            return fn(F.log_softmax(y.float(), -1), F.log_softmax(x.float(), -1), reduction="batchmean", log_target=True)

        want = F.kl_div(F.log_softmax(y.float(), -1), F.log_softmax(x.float(), -1), log_target=True, reduction="batchmean")
        got = from_logits()
        print(f"  liger {tag}: batchmean {got.item():.6e}, torch {want.item():.6e}", flush=True)
        report(f"kl/liger/loss/bf16/{tag}", 4 * n, cuda_times(from_logits, reps=10, warmup=2), note="log_softmax of both in f32, then liger_kl_div")
        lx, ly = F.log_softmax(x.float(), -1), F.log_softmax(y.float(), -1)
        del x, y
        report(
            f"kl/liger-kernel-only/loss/f32logp/{tag}",
            8 * n,
            cuda_times(lambda: fn(ly, lx, reduction="batchmean", log_target=True), reps=10, warmup=2),
            note="liger_kl_div on ready f32 log-probabilities; bytes = both read once",
        )
        del lx, ly
        free()


def main():
    if not torch.cuda.is_available():
        print("no CUDA device: PyTorch baselines skipped")
        return 1
    p = torch.cuda.get_device_properties(0)
    print(
        f"torch {torch.__version__}, cuda {torch.version.cuda}, device {p.name}, "
        f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB"
    )
    rc = 0
    for name, fn in [
        ("copy", bench_copy),
        ("tram", bench_tram_step),
        ("kl eager", lambda: bench_kl(False)),
        ("klerr", kl_errors),
        ("step", bench_step),
        ("liger", bench_liger),
        ("kl compile", lambda: bench_kl(True)),
    ]:
        t = time.monotonic()
        try:
            fn()
        except Exception as e:  # one failing section must not lose the others
            print(f"section {name} failed: {type(e).__name__}: {e}", flush=True)
            rc = 1
            free()
        print(f"# section {name}: {time.monotonic() - t:.1f}s (total {elapsed():.1f}s)", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
