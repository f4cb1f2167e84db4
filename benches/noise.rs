//! TRAM-x's embedding noise out = e + z, z ~ U(−σ, σ) or N(0, σ²) from Philox
//! keyed by (seed, step) and counted by element index. The CPU reference on
//! 64 Mi elements (f32 both distributions, bf16 uniform); with a GPU the kernel on 64 Mi elements and on the
//! step-level figure's embeddings (8 × 512 tokens × 1024, bf16).
//!
//! Bytes per element: e read once and out written once, 8 for f32 and 4 for
//! bf16 (in place moves the same bytes). Nothing else touches memory: the
//! random words are computed in registers from the counter (no generator
//! state is read or written), and the device step is one u64 every thread
//! reads from cache. The noise costs compute instead: ten Philox rounds per
//! four elements, and for Gaussian noise Box–Muller in f64 (log, sqrt, sin,
//! cos per pair), which on the CPU is far from memory-bound.
//!
//! Each GPU case is first checked against the CPU reference on poisoned
//! output: uniform noise bit for bit; Gaussian noise within the bound of
//! `cpu::noise` (z to an f32 ulp, then one rounding of e + z to the element
//! type).
//!
//! `cargo bench --bench noise`

mod common;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use cudarc::driver::DeviceRepr;
use rayon::prelude::*;
use tram_kernels::cpu::noise::{add_noise, noise_value};
use tram_kernels::cuda::noise::{add_noise as cuda_add_noise, NoiseStep};
use tram_kernels::cuda::CudaBackend;
use tram_kernels::{bf16, DType, Element, NoiseConfig, NoiseDistribution};

const CPU_LEN: usize = 64 << 20;
/// 8 sequences × 512 tokens × GPT-2 medium's width: TRAM-x's noised embeddings.
const EMBED_LEN: usize = 8 * 512 * 1024;
/// The step the noise is drawn at (a device counter on the GPU).
const STEP: u64 = 3;

fn cfg(distribution: NoiseDistribution) -> NoiseConfig {
    NoiseConfig {
        distribution,
        sigma: 0.1,
        seed: 0x7a3f_0011,
    }
}

fn name(d: NoiseDistribution) -> &'static str {
    match d {
        NoiseDistribution::Uniform => "uniform",
        NoiseDistribution::Gaussian => "gaussian",
    }
}

const DISTRIBUTIONS: [NoiseDistribution; 2] =
    [NoiseDistribution::Uniform, NoiseDistribution::Gaussian];

fn cpu_case<T: Element>(c: &mut Criterion, dtype: &str, distributions: &[NoiseDistribution]) {
    let e = common::host_random::<T>(CPU_LEN, 1, 1.0);
    let mut out = common::HostBuf::<T>::zeroed(CPU_LEN);
    let mut g = c.benchmark_group("noise");
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(common::bytes(2 * T::DTYPE.size() * CPU_LEN));
    for &d in distributions {
        let cfg = cfg(d);
        let id = format!("cpu/{}/{dtype}/{}", name(d), common::count(CPU_LEN));
        g.bench_function(id, |b| {
            b.iter(|| add_noise(&e, &mut out, &cfg, STEP).expect("noise"))
        });
    }
    g.finish();
}

fn cpu(c: &mut Criterion) {
    if !common::cpu_enabled() {
        return;
    }
    cpu_case::<f32>(c, "f32", &DISTRIBUTIONS);
    // Gaussian bf16 costs what Gaussian f32 does plus the conversions (about
    // 2 s a call on two cores): left out to keep the CPU run short.
    cpu_case::<bf16>(c, "bf16", &[NoiseDistribution::Uniform]);
}

/// The device output against the CPU reference; panics on a mismatch.
fn check<T: Element>(got: &[T], e: &[T], cfg: &NoiseConfig, what: &str) {
    let mut want = vec![T::default(); e.len()];
    add_noise(e, &mut want, cfg, STEP).expect("cpu noise");
    // ulp(x) <= 2^(1-p)·|x| for p significant bits (24 in f32, 8 in bf16).
    let ulp_rel = if T::DTYPE == DType::F32 {
        2f64.powi(-23)
    } else {
        2f64.powi(-7)
    };
    // Error over tolerance per element (above 1 fails; uniform: bits or ∞).
    let ratio = |i: usize| -> f64 {
        let (g, w) = (got[i], want[i]);
        match cfg.distribution {
            NoiseDistribution::Uniform => {
                if g.to_bits_u32() == w.to_bits_u32() {
                    0.0
                } else {
                    f64::INFINITY
                }
            }
            NoiseDistribution::Gaussian => {
                // z may differ by an f32 ulp (+1e-15·σ near the zeros of
                // sin/cos); e + z then rounds once to T, one more ulp of T.
                let z = noise_value(cfg, STEP, i as u64) as f64;
                let tol = 2f64.powi(-23) * z.abs()
                    + 1e-15 * cfg.sigma as f64
                    + ulp_rel * w.to_f64().abs().max(g.to_f64().abs());
                let err = (g.to_f64() - w.to_f64()).abs();
                // NaN (a poisoned element left unwritten) fails too.
                if err <= tol {
                    err / tol
                } else {
                    f64::INFINITY
                }
            }
        }
    };
    let worst = (0..got.len())
        .into_par_iter()
        .map(ratio)
        .reduce(|| 0.0, f64::max);
    if worst > 1.0 {
        let i = (0..got.len())
            .into_par_iter()
            .find_first(|&i| ratio(i) > 1.0)
            .expect("a failing element");
        panic!(
            "{what}: element {i}: cuda {:?}, cpu {:?} (input {:?})",
            got[i], want[i], e[i]
        );
    }
    println!(
        "check: cuda noise {what}: {} elements as the CPU reference{}",
        got.len(),
        if cfg.distribution == NoiseDistribution::Uniform {
            ", bit for bit".to_string()
        } else {
            format!(", worst error {worst:.2} of the tolerance")
        }
    );
}

/// One length on the GPU, out of place: checked against the CPU reference on
/// NaN-poisoned output, then one launch per iteration timed with CUDA events.
fn cuda_case<T: Element + DeviceRepr>(
    c: &mut Criterion,
    gpu: &CudaBackend,
    dtype: &str,
    n: usize,
    tag: &str,
    distributions: &[NoiseDistribution],
) {
    let stream = gpu.stream();
    let e: Vec<T> = common::random(n, 5, 1.0);
    let input = stream.clone_htod(&e).expect("upload");
    let poison = vec![T::from_f32(f32::from_bits(0x7fc0_beef)); n];
    let mut out = stream.clone_htod(&poison).expect("upload");
    let step = NoiseStep::new(gpu, STEP).expect("step");
    let mut g = c.benchmark_group("noise");
    g.throughput(common::bytes(2 * T::DTYPE.size() * n));
    for &d in distributions {
        let cfg = cfg(d);
        let what = format!("{}/{dtype}/{tag}", name(d));
        stream.memcpy_htod(&poison, &mut out).expect("poison");
        cuda_add_noise(gpu, &input.as_view(), &mut out.as_view_mut(), &cfg, &step).expect("noise");
        let got = stream.clone_dtoh(&out).expect("download");
        check(&got, &e, &cfg, &what);
        g.bench_function(format!("cuda/{what}"), |b| {
            b.iter_custom(|iters| {
                common::gpu_time(gpu, iters, || {
                    cuda_add_noise(gpu, &input.as_view(), &mut out.as_view_mut(), &cfg, &step)
                        .expect("noise");
                })
            })
        });
    }
    g.finish();
}

fn cuda(c: &mut Criterion) {
    let Some(gpu) = common::gpu("noise") else {
        return;
    };
    let size = common::count(CPU_LEN);
    cuda_case::<f32>(c, &gpu, "f32", CPU_LEN, &size, &DISTRIBUTIONS);
    cuda_case::<bf16>(c, &gpu, "bf16", CPU_LEN, &size, &DISTRIBUTIONS);
    // 8 MiB in, 8 MiB out: it stays in L2, so its GB/s can pass the copy's.
    cuda_case::<bf16>(
        c,
        &gpu,
        "bf16",
        EMBED_LEN,
        "8x512x1024",
        &[NoiseDistribution::Gaussian],
    );
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = cpu, cuda
}
criterion_main!(benches);
