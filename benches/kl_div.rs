//! KL divergence over logits: the CPU reference on 64 × 50,257 (the numpy
//! baseline's shape), and with a GPU the fused kernel on 64 × 1,048,576 (few
//! long rows), 16,384 × 32,000 (many short rows), 16 × 250,002 (XLM-R's
//! vocabulary) and 4,096 × 50,257 (8 × 512 tokens of GPT-2's vocabulary, the
//! step-level figure). Bytes per logit, as in the crate docs' memory-traffic table: loss = both
//! inputs read once (8 f32, 4 bf16); loss + gradient of the model logits =
//! both read twice and one written (20 f32, 10 bf16).
//!
//! Before timing, each GPU shape is checked against the CPU reference, and
//! `klerr` lines record the kernel's error at small logit gaps (beside
//! PyTorch's, which scripts/baselines_torch.py prints).

mod common;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use cudarc::driver::DeviceRepr;
use tram_kernels::cpu::kl_div::{kl_div, kl_div_grad, Logits};
use tram_kernels::cuda::kl_div::{
    kl_div as cuda_kl_div, kl_div_with_grad, DeviceLogits, GradOut, KlGrads, KlWorkspace,
};
use tram_kernels::cuda::CudaBackend;
use tram_kernels::{bf16, Element, KlDirection, KlOptions};

const CPU_SHAPE: (usize, usize) = (64, 50_257);
/// Logits a ~ σ·U(-1, 1) and b = a + gap·U(-1, 1): nearly equal, as in TRAM.
const SIGMA: f32 = 3.0;
const GAP: f32 = 0.1;

fn shape_tag((rows, vocab): (usize, usize)) -> String {
    format!("{rows}x{vocab}")
}

fn cpu_case<T: Element>(c: &mut Criterion, dtype: &str, with_grad: bool) {
    let (rows, vocab) = CPU_SHAPE;
    let (a, b) = common::host_logit_pair::<T>(rows, vocab, SIGMA, GAP);
    let ta = Logits::dense(&a, rows, vocab).expect("logits");
    let tb = Logits::dense(&b, rows, vocab).expect("logits");
    let opts = KlOptions::default();
    let n = rows * vocab;
    let size = T::DTYPE.size();
    let mut g = c.benchmark_group("kl_div");
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(common::bytes(2 * size * n));
    g.bench_function(
        format!("cpu/forward-loss/{dtype}/{}", shape_tag(CPU_SHAPE)),
        |bn| bn.iter(|| kl_div(&ta, &tb, None, &opts).expect("kl")),
    );
    if with_grad {
        let sym = KlOptions {
            direction: KlDirection::Symmetric,
            ..opts
        };
        g.bench_function(
            format!("cpu/symmetric-loss/{dtype}/{}", shape_tag(CPU_SHAPE)),
            |bn| bn.iter(|| kl_div(&ta, &tb, None, &sym).expect("kl")),
        );
        // The reference writes its gradient in f64; the budget counts the
        // logits' dtype, as for the kernel.
        g.throughput(common::bytes(5 * size * n));
        g.bench_function(
            format!("cpu/forward-loss+grad/{dtype}/{}", shape_tag(CPU_SHAPE)),
            |bn| bn.iter(|| kl_div_grad(&ta, &tb, None, &opts, 1.0, false).expect("kl")),
        );
    }
    g.finish();
}

fn cpu(c: &mut Criterion) {
    if !common::cpu_enabled() {
        return;
    }
    cpu_case::<f32>(c, "f32", true);
    cpu_case::<bf16>(c, "bf16", false);
}

/// One shape on the GPU: check against the CPU reference, then time the loss
/// and, with `with_grad`, the loss with the model logits' gradient.
fn cuda_case<T: Element + DeviceRepr>(
    c: &mut Criterion,
    gpu: &CudaBackend,
    ws: &mut KlWorkspace,
    dtype: &str,
    (rows, vocab): (usize, usize),
    with_grad: bool,
) {
    let stream = gpu.stream();
    let (a, b) = common::logit_pair::<T>(rows, vocab, SIGMA, GAP);
    let opts = KlOptions::default();
    let want = kl_div(
        &Logits::dense(&a, rows, vocab).expect("logits"),
        &Logits::dense(&b, rows, vocab).expect("logits"),
        None,
        &opts,
    )
    .expect("cpu kl")
    .value;
    let da = stream.clone_htod(&a).expect("upload");
    let db = stream.clone_htod(&b).expect("upload");
    drop((a, b));
    let ta = DeviceLogits::dense(da.as_view(), rows, vocab).expect("logits");
    let tb = DeviceLogits::dense(db.as_view(), rows, vocab).expect("logits");
    cuda_kl_div(gpu, &ta, &tb, None, &opts, ws, None).expect("kl");
    let got = ws.read(gpu, rows).expect("read").value;
    let rel = ((got - want) / want).abs();
    println!("check: cuda kl {dtype} {rows}x{vocab}: {got:.9e}, cpu {want:.9e}, relative error {rel:.2e}");
    assert!(
        rel <= 1e-4,
        "CUDA KL {got} differs from the CPU reference {want}"
    );

    let n = rows * vocab;
    let size = T::DTYPE.size();
    let tag = shape_tag((rows, vocab));
    let mut g = c.benchmark_group("kl_div");
    g.throughput(common::bytes(2 * size * n));
    g.bench_function(format!("cuda/forward-loss/{dtype}/{tag}"), |bn| {
        bn.iter_custom(|iters| {
            common::gpu_time(gpu, iters, || {
                cuda_kl_div(gpu, &ta, &tb, None, &opts, ws, None).expect("kl");
            })
        })
    });
    if with_grad {
        // SAFETY: the kernel writes every element of the gradient before it is read.
        let mut grad = unsafe { stream.alloc::<T>(n) }.expect("alloc");
        g.throughput(common::bytes(5 * size * n));
        g.bench_function(format!("cuda/forward-loss+grad/{dtype}/{tag}"), |bn| {
            bn.iter_custom(|iters| {
                common::gpu_time(gpu, iters, || {
                    let grads = KlGrads {
                        model: GradOut::new(grad.as_view_mut(), vocab),
                        target: None,
                        upstream: 1.0,
                        upstream_device: None,
                    };
                    kl_div_with_grad(gpu, &ta, &tb, None, &opts, ws, None, grads).expect("kl");
                })
            })
        });
    }
    g.finish();
}

/// The kernel's relative error at small logit gaps, f32 inputs, against the
/// CPU reference (itself within 1e-12 of the exact value): σ·N(0,1) logits,
/// b = a + gap·N(0,1), as scripts/baselines_torch.py measures PyTorch.
fn kl_errors(gpu: &CudaBackend, ws: &mut KlWorkspace) {
    let (rows, vocab) = (4, 50_257);
    let stream = gpu.stream();
    let opts = KlOptions::default();
    for sigma in [3.0, 30.0] {
        for gap in [1.0, 1e-2, 1e-3, 1e-4, 1e-5] {
            let z1 = common::gaussian(rows * vocab, 31);
            let z2 = common::gaussian(rows * vocab, 32);
            let a: Vec<f32> = z1.iter().map(|z| (sigma * z) as f32).collect();
            let b: Vec<f32> = a
                .iter()
                .zip(&z2)
                .map(|(&a, z)| (a as f64 + gap * z) as f32)
                .collect();
            let want = kl_div(
                &Logits::dense(&a, rows, vocab).expect("logits"),
                &Logits::dense(&b, rows, vocab).expect("logits"),
                None,
                &opts,
            )
            .expect("cpu kl");
            let da = stream.clone_htod(&a).expect("upload");
            let db = stream.clone_htod(&b).expect("upload");
            let ta = DeviceLogits::dense(da.as_view(), rows, vocab).expect("logits");
            let tb = DeviceLogits::dense(db.as_view(), rows, vocab).expect("logits");
            cuda_kl_div(gpu, &ta, &tb, None, &opts, ws, None).expect("kl");
            let got = ws.read(gpu, rows).expect("read");
            let rel = got
                .per_row
                .iter()
                .zip(&want.per_row)
                .map(|(g, w)| ((g - w) / w).abs())
                .fold(0.0f64, f64::max);
            println!(
                "klerr tram-cuda-f32 sigma={sigma} gap={gap:e}: kl={:.3e} rel_err={rel:.3e}",
                want.value
            );
        }
    }
}

fn cuda(c: &mut Criterion) {
    let Some(gpu) = common::gpu("kl_div") else {
        return;
    };
    let mut ws = KlWorkspace::new(&gpu, 16_384).expect("workspace");
    kl_errors(&gpu, &mut ws);
    for shape in [
        (64, 1_048_576),
        (16_384, 32_000),
        (16, 250_002),
        (4096, 50_257),
    ] {
        cuda_case::<bf16>(c, &gpu, &mut ws, "bf16", shape, shape.0 != 16);
    }
    for shape in [(64, 1_048_576), (16_384, 32_000)] {
        cuda_case::<f32>(c, &gpu, &mut ws, "f32", shape, false);
    }
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = cpu, cuda
}
criterion_main!(benches);
