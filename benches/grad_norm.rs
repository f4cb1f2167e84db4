//! Global gradient norm over a group: the CPU reference on 64 Mi elements (the
//! size of the numpy `np.linalg.norm` baseline), and with a GPU the multi-tensor
//! kernel on an XLM-R base-like group of 199 tensors (~1 GiB of f32 gradients).
//! Bytes as in byte-budgets.md: the gradient read once (SAM, Fisher), plus θ
//! for the adaptive geometry.

mod common;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use tram_kernels::cpu::grad_norm::grad_norm;
use tram_kernels::{bf16, Element, Geometry};

const CPU_LEN: usize = 64 << 20;

const GEOMETRIES: [(&str, Geometry); 3] = [
    ("sam", Geometry::Sam),
    ("adaptive", Geometry::Adaptive { eta: 0.01 }),
    ("fisher", Geometry::Fisher { eta: 1.0 }),
];

/// Bytes one norm reads per element.
fn bytes_per<P: Element, G: Element>(geometry: Geometry) -> usize {
    let theta = if matches!(geometry, Geometry::Adaptive { .. }) {
        P::DTYPE.size()
    } else {
        0
    };
    theta + G::DTYPE.size()
}

fn cpu_case<P: Element, G: Element>(
    c: &mut Criterion,
    dtype: &str,
    geometries: &[(&str, Geometry)],
) {
    let theta: Vec<P> = common::random(CPU_LEN, 1, 0.05);
    let grad: Vec<G> = common::random(CPU_LEN, 2, 1e-3);
    let params = [&theta[..]];
    let grads = [Some(&grad[..])];
    let mut g = c.benchmark_group("grad_norm");
    g.sampling_mode(SamplingMode::Flat);
    for &(name, geometry) in geometries {
        g.throughput(common::bytes(bytes_per::<P, G>(geometry) * CPU_LEN));
        let id = format!("cpu/{name}/{dtype}/{}", common::count(CPU_LEN));
        g.bench_function(id, |b| {
            b.iter(|| grad_norm(&params, &grads, geometry, 1.0).expect("norm"))
        });
    }
    g.finish();
}

fn cpu(c: &mut Criterion) {
    if !common::cpu_enabled() {
        return;
    }
    cpu_case::<f32, f32>(c, "f32", &GEOMETRIES);
    cpu_case::<bf16, bf16>(c, "bf16", &GEOMETRIES[..1]);
    cpu_case::<bf16, f32>(c, "bf16-f32", &GEOMETRIES[1..2]);
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = cpu
}
criterion_main!(benches);
