//! The copy bandwidth every other figure is a percentage of: this machine's
//! memory (rayon copy of f32, bytes read + written) and, with a GPU, the
//! device-to-device copy (cuMemcpyDtoDAsync, read + written).

mod common;

use criterion::{criterion_group, criterion_main, Criterion};
use rayon::prelude::*;

/// 64 Mi f32 (256 MiB): far beyond this machine's 32 MiB L3.
const CPU_LEN: usize = 64 << 20;
/// 1 GiB of f32 on the GPU: far beyond the H100/H200's 50–60 MB of L2.
const GPU_LEN: usize = 256 << 20;

fn cpu(c: &mut Criterion) {
    if !common::cpu_enabled() {
        return;
    }
    let src = common::host_random::<f32>(CPU_LEN, 1, 1.0);
    let mut dst = common::HostBuf::<f32>::zeroed(CPU_LEN);
    let mut g = c.benchmark_group("copy");
    g.throughput(common::bytes(2 * 4 * CPU_LEN));
    // The same split as the rayon reference ops: big chunks, one per task.
    g.bench_function(format!("cpu/rayon/f32/{}", common::count(CPU_LEN)), |b| {
        b.iter(|| {
            dst.par_chunks_mut(1 << 16)
                .zip(src.par_chunks(1 << 16))
                .for_each(|(d, s)| d.copy_from_slice(s));
        })
    });
    g.bench_function(format!("cpu/1thread/f32/{}", common::count(CPU_LEN)), |b| {
        b.iter(|| dst.copy_from_slice(&src))
    });
    g.finish();
    assert_eq!(dst[..], src[..]);
}

fn cuda(c: &mut Criterion) {
    let Some(gpu) = common::gpu("copy") else {
        return;
    };
    let stream = gpu.stream().clone();
    let host: Vec<f32> = common::random(GPU_LEN, 2, 1.0);
    let src = stream.clone_htod(&host).expect("upload");
    // SAFETY: every element is written by the first copy before anything reads it.
    let mut dst = unsafe { stream.alloc::<f32>(GPU_LEN) }.expect("alloc");
    let mut g = c.benchmark_group("copy");
    g.throughput(common::bytes(2 * 4 * GPU_LEN));
    g.bench_function(format!("cuda/d2d/f32/{}", common::count(GPU_LEN)), |b| {
        b.iter_custom(|iters| {
            common::gpu_time(&gpu, iters, || {
                stream.memcpy_dtod(&src, &mut dst).expect("copy");
            })
        })
    });
    g.finish();
    let back = stream.clone_dtoh(&dst).expect("download");
    assert!(back == host, "the device copy is not bit-exact");
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = cpu, cuda
}
criterion_main!(benches);
