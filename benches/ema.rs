//! TRAM-θ's target upkeep θ̄ ← λ·θ̄ + (1−λ)·θ as its own launch (the
//! optimizer bench times it fused into the update). The CPU reference on
//! 64 Mi elements; with a GPU the multi-tensor kernel on one 64 Mi-element
//! tensor, on the XLM-R base-like group (199 tensors, 278M) and on GPT-2
//! medium (292 tensors, 355M: the step-level figure's model, a bf16 target
//! following the f32 master weights).
//!
//! Bytes per element as in the crate docs' memory-traffic table: θ̄ read and written, θ read once:
//! 12 for f32, 6 for bf16 θ̄ and θ, 8 for a bf16 θ̄ of f32 θ. Dtype tags name
//! the target first: `bf16-f32` is a bf16 θ̄ following f32 θ.
//!
//! Each GPU case is first checked against the CPU reference, bit for bit (both
//! backends evaluate the same operations; see `cpu::ema`).
//!
//! `cargo bench --bench ema`

mod common;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};
use tram_kernels::cpu::ema::{ema_update, EmaTensor};
use tram_kernels::cuda::ema::{ema_update as cuda_ema_update, DeviceEmaTensor, EmaGroup};
use tram_kernels::cuda::CudaBackend;
use tram_kernels::{bf16, Element};

const CPU_LEN: usize = 64 << 20;
/// λ strictly inside (0, 1): the general path (0 copies, 1 launches nothing).
const LAMBDA: f32 = 0.99;

/// θ̄ read and written, θ read.
fn bytes_per<T: Element, P: Element>() -> usize {
    2 * T::DTYPE.size() + P::DTYPE.size()
}

fn cpu_case<T: Element, P: Element>(c: &mut Criterion, dtype: &str) {
    let mut target = common::host_random::<T>(CPU_LEN, 1, 0.05);
    let theta = common::host_random::<P>(CPU_LEN, 2, 0.05);
    let mut g = c.benchmark_group("ema");
    g.sampling_mode(SamplingMode::Flat);
    g.throughput(common::bytes(bytes_per::<T, P>() * CPU_LEN));
    g.bench_function(format!("cpu/{dtype}/{}", common::count(CPU_LEN)), |b| {
        b.iter(|| {
            let mut t = [EmaTensor {
                target: &mut target[..],
                theta: &theta[..],
            }];
            ema_update(&mut t, LAMBDA).expect("ema")
        })
    });
    g.finish();
}

fn cpu(c: &mut Criterion) {
    if !common::cpu_enabled() {
        return;
    }
    cpu_case::<f32, f32>(c, "f32");
    cpu_case::<bf16, bf16>(c, "bf16");
    cpu_case::<bf16, f32>(c, "bf16-f32");
}

/// One device allocation per tensor, so each tensor of the group borrows its
/// own view (the safe constructor, as a framework would use it).
fn upload<T: Element + DeviceRepr>(
    stream: &Arc<CudaStream>,
    host: &[T],
    sizes: &[usize],
) -> Vec<CudaSlice<T>> {
    let mut at = 0;
    sizes
        .iter()
        .map(|&n| {
            let s = stream.clone_htod(&host[at..at + n]).expect("upload");
            at += n;
            s
        })
        .collect()
}

fn group<'a, T: Element + DeviceRepr, P: Element + DeviceRepr>(
    gpu: &CudaBackend,
    targets: &'a mut [CudaSlice<T>],
    thetas: &'a [CudaSlice<P>],
) -> EmaGroup<'a> {
    let tensors = targets
        .iter_mut()
        .zip(thetas)
        .map(|(t, p)| DeviceEmaTensor {
            target: t.as_view_mut(),
            theta: p.as_view(),
        })
        .collect();
    EmaGroup::new(gpu, tensors).expect("group")
}

/// One group on the GPU: one update checked against the CPU reference, then
/// one launch per iteration timed with CUDA events.
fn cuda_case<T: Element + DeviceRepr, P: Element + DeviceRepr>(
    c: &mut Criterion,
    gpu: &CudaBackend,
    dtype: &str,
    sizes: &[usize],
    tag: &str,
) {
    let stream = gpu.stream();
    let n: usize = sizes.iter().sum();
    let mut want: Vec<T> = common::random(n, 3, 0.05);
    let theta: Vec<P> = common::random(n, 4, 0.05);
    let mut targets = upload(stream, &want, sizes);
    let thetas = upload(stream, &theta, sizes);

    cuda_ema_update(gpu, &group(gpu, &mut targets, &thetas), LAMBDA).expect("ema");
    let got: Vec<T> = targets
        .iter()
        .flat_map(|t| stream.clone_dtoh(t).expect("download"))
        .collect();
    ema_update(
        &mut [EmaTensor {
            target: &mut want[..],
            theta: &theta[..],
        }],
        LAMBDA,
    )
    .expect("cpu ema");
    let differ = got
        .iter()
        .zip(&want)
        .filter(|(a, b)| a.to_bits_u32() != b.to_bits_u32())
        .count();
    println!(
        "check: cuda ema {dtype} {tag}: {differ} of {n} elements differ from the CPU reference"
    );
    assert_eq!(
        differ, 0,
        "the CUDA EMA is not the CPU reference bit for bit"
    );
    drop((got, want, theta));

    let group = group(gpu, &mut targets, &thetas);
    let mut g = c.benchmark_group("ema");
    g.throughput(common::bytes(bytes_per::<T, P>() * n));
    g.bench_function(format!("cuda/{dtype}/{tag}"), |b| {
        b.iter_custom(|iters| {
            common::gpu_time(gpu, iters, || {
                cuda_ema_update(gpu, &group, LAMBDA).expect("ema");
            })
        })
    });
    g.finish();
}

fn cuda(c: &mut Criterion) {
    let Some(gpu) = common::gpu("ema") else {
        return;
    };
    let one = [CPU_LEN];
    cuda_case::<f32, f32>(c, &gpu, "f32", &one, "1x64Mi");
    cuda_case::<bf16, bf16>(c, &gpu, "bf16", &one, "1x64Mi");
    cuda_case::<bf16, f32>(c, &gpu, "bf16-f32", &one, "1x64Mi");
    let xlmr = common::xlmr_base();
    cuda_case::<f32, f32>(c, &gpu, "f32", &xlmr, &common::group_tag("xlmr", &xlmr));
    let gpt2 = common::gpt2_medium();
    cuda_case::<bf16, f32>(
        c,
        &gpu,
        "bf16-f32",
        &gpt2,
        &common::group_tag("gpt2m", &gpt2),
    );
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = cpu, cuda
}
criterion_main!(benches);
