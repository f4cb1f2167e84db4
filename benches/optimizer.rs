//! TRAM's second step fused (restore + AdamW in one pass: backup, g, m, v in;
//! θ, m, v out: 28 B/param for f32) against a restore followed by a separate
//! AdamW update (8 + 28 = 36 B/param), and with TRAM-θ's EMA target fused in
//! (+8 B) against the same update followed by the EMA launch (+12 B). Byte
//! counts as in the crate docs' memory-traffic table; the throughput criterion
//! reports is those bytes over the measured time.
//!
//! AMP's found-inf check that a TRAM step runs before its update reads every
//! gradient once more (+4 B/param for f32 gradients): timed alone
//! (`amp_check`) and with the fused update (`checked_restore_adamw`, 32 B) on
//! the CPU, and on CUDA as a step without perturbation (`tram_base_step`:
//! check, gate and fused update, 32 B/param, against `fused_restore_adamw`).
//!
//! CPU always (rayon reference); CUDA when a device is present (skipped with a
//! message otherwise), timed with CUDA events around `iters` launches through
//! `iter_custom`, with a working set well above L2.
//!
//! `cargo bench --bench optimizer`

mod common;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use tram_kernels::cpu::ema::{ema_update, EmaTensor};
use tram_kernels::cpu::optimizer::{
    grads_overflow, EmaSource, FusedOptimizer, UpdateTensor, Weights,
};
use tram_kernels::BaseOptimizer;

/// Small enough that the moments stay tame over many repeats.
const LR: f32 = 1e-6;
/// λ of the EMA target (neither 0 nor 1: the general path).
const LAMBDA: f32 = 0.99;

fn rand_vec(rng: &mut SmallRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

struct Host {
    backup: Vec<f32>,
    param: Vec<f32>,
    out: Vec<f32>,
    grad: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    target: Vec<f32>,
}

fn host(n: usize) -> Host {
    let mut rng = SmallRng::seed_from_u64(7);
    Host {
        backup: rand_vec(&mut rng, n, -1.0, 1.0),
        param: rand_vec(&mut rng, n, -1.0, 1.0),
        out: rand_vec(&mut rng, n, -1.0, 1.0),
        grad: rand_vec(&mut rng, n, -0.1, 0.1),
        m: rand_vec(&mut rng, n, -0.01, 0.01),
        v: rand_vec(&mut rng, n, 0.0, 1e-4),
        target: rand_vec(&mut rng, n, -1.0, 1.0),
    }
}

fn cpu(c: &mut Criterion) {
    if !common::cpu_enabled() {
        return;
    }
    let n = 1usize << 22;
    let mut h = host(n);
    let mut opt = FusedOptimizer::new(BaseOptimizer::adamw(0.01), LR).unwrap();
    let mut g = c.benchmark_group("optimizer_cpu_f32_4M");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));

    let bytes = |per_param: u64| Throughput::Bytes(per_param * n as u64);
    g.throughput(bytes(28));
    g.bench_function("fused_restore_adamw", |b| {
        b.iter(|| {
            let t = UpdateTensor {
                weights: Weights::Restore {
                    backup: &h.backup,
                    param: &mut h.param,
                },
                grad: Some(&h.grad[..]),
                m: &mut h.m,
                v: &mut h.v,
                weight_decay: true,
            };
            opt.step(&mut [t]).unwrap();
        })
    });
    g.throughput(bytes(4));
    g.bench_function("amp_check", |b| {
        b.iter(|| assert!(!grads_overflow(&[Some(&h.grad[..])], 1.0)))
    });
    g.throughput(bytes(4 + 28));
    g.bench_function("checked_restore_adamw", |b| {
        b.iter(|| {
            assert!(!grads_overflow(&[Some(&h.grad[..])], 1.0));
            let t = UpdateTensor {
                weights: Weights::Restore {
                    backup: &h.backup,
                    param: &mut h.param,
                },
                grad: Some(&h.grad[..]),
                m: &mut h.m,
                v: &mut h.v,
                weight_decay: true,
            };
            opt.step(&mut [t]).unwrap();
        })
    });
    g.throughput(bytes(8 + 28));
    g.bench_function("restore_then_adamw", |b| {
        b.iter(|| {
            h.param
                .par_chunks_mut(1 << 15)
                .zip(h.backup.par_chunks(1 << 15))
                .for_each(|(p, s)| p.copy_from_slice(s));
            // The update reads the restored θ and writes it elsewhere: the
            // traffic of an in-place update (the crate has no in-place mode).
            let t = UpdateTensor {
                weights: Weights::Restore {
                    backup: &h.param,
                    param: &mut h.out,
                },
                grad: Some(&h.grad[..]),
                m: &mut h.m,
                v: &mut h.v,
                weight_decay: true,
            };
            opt.step(&mut [t]).unwrap();
        })
    });
    g.throughput(bytes(28 + 8));
    g.bench_function("fused_restore_adamw_ema", |b| {
        b.iter(|| {
            let t = UpdateTensor {
                weights: Weights::Restore {
                    backup: &h.backup,
                    param: &mut h.param,
                },
                grad: Some(&h.grad[..]),
                m: &mut h.m,
                v: &mut h.v,
                weight_decay: true,
            };
            let mut targets = [&mut h.target[..]];
            opt.step_with_target(&mut [t], &mut targets, LAMBDA, EmaSource::Param)
                .unwrap();
        })
    });
    g.throughput(bytes(28 + 12));
    g.bench_function("fused_restore_adamw_then_ema", |b| {
        b.iter(|| {
            let t = UpdateTensor {
                weights: Weights::Restore {
                    backup: &h.backup,
                    param: &mut h.param,
                },
                grad: Some(&h.grad[..]),
                m: &mut h.m,
                v: &mut h.v,
                weight_decay: true,
            };
            opt.step(&mut [t]).unwrap();
            let mut e = [EmaTensor {
                target: &mut h.target[..],
                theta: &h.param[..],
            }];
            ema_update(&mut e, LAMBDA).unwrap();
        })
    });
    g.finish();
}

mod gpu {
    use super::*;
    use cudarc::driver::{CudaSlice, DevicePtr};
    use tram_kernels::cuda::buffer::{DevMut, DevRef};
    use tram_kernels::cuda::ema::{ema_update, EmaGroup, RawEmaTensor};
    use tram_kernels::cuda::group::{DeviceBuf, ParamGroup, RawTensor};
    use tram_kernels::cuda::optimizer::{
        FusedOptimizer as GpuOptimizer, FusedTarget, RawUpdateTensor, UpdateGroup,
    };
    use tram_kernels::cuda::restore::restore;
    use tram_kernels::cuda::step::{Perturbation, Tensor, TramStep};
    use tram_kernels::{DType, Geometry, KlOptions, NoiseConfig, NoiseDistribution, Tram};
    use tram_kernels::{TramConfig, TramVariant};

    /// 4 tensors of 16M f32 parameters: 256 MB per buffer, far above L2.
    const TENSORS: usize = 4;
    const PER_TENSOR: usize = 1 << 24;

    struct Dev {
        backup: Vec<CudaSlice<f32>>,
        param: Vec<CudaSlice<f32>>,
        out: Vec<CudaSlice<f32>>,
        grad: Vec<CudaSlice<f32>>,
        m: Vec<CudaSlice<f32>>,
        v: Vec<CudaSlice<f32>>,
        target: Vec<CudaSlice<f32>>,
    }

    pub fn bench(c: &mut Criterion) {
        let Some(gpu) = common::gpu("optimizer") else {
            return;
        };
        let s = gpu.stream();
        let h = host(PER_TENSOR);
        let up = |x: &[f32]| -> Vec<CudaSlice<f32>> {
            (0..TENSORS).map(|_| s.clone_htod(x).unwrap()).collect()
        };
        let d = Dev {
            backup: up(&h.backup),
            param: up(&h.param),
            out: up(&h.out),
            grad: up(&h.grad),
            m: up(&h.m),
            v: up(&h.v),
            target: up(&h.target),
        };
        drop(h);
        let p = |x: &CudaSlice<f32>| x.device_ptr(s).0;
        let len = PER_TENSOR as u64;
        let update_rows = |param: &[CudaSlice<f32>], source: &[CudaSlice<f32>]| {
            (0..TENSORS)
                .map(|k| RawUpdateTensor {
                    param: p(&param[k]),
                    grad: p(&d.grad[k]),
                    source: p(&source[k]),
                    m: p(&d.m[k]),
                    v: p(&d.v[k]),
                    len,
                    weight_decay: true,
                })
                .collect::<Vec<_>>()
        };
        let restore_rows: Vec<RawTensor> = (0..TENSORS)
            .map(|k| RawTensor {
                param: DeviceBuf {
                    ptr: p(&d.param[k]),
                    len,
                },
                grad: DeviceBuf {
                    ptr: p(&d.grad[k]),
                    len,
                },
                backup: Some(DeviceBuf {
                    ptr: p(&d.backup[k]),
                    len,
                }),
                master: None,
                out: None,
            })
            .collect();
        let ema_rows: Vec<RawEmaTensor> = (0..TENSORS)
            .map(|k| RawEmaTensor {
                target: p(&d.target[k]),
                theta: p(&d.param[k]),
                len,
            })
            .collect();
        // SAFETY: every address is a live allocation of `d`, which outlives
        // the groups and every launch (each timing synchronises), with `len`
        // f32 elements; all work is on the backend's one stream. Within each
        // group no written buffer overlaps another (the separate update reads
        // θ from `param` and writes `out`).
        let (fused, separate, restore_group, ema) = unsafe {
            (
                UpdateGroup::from_raw(
                    &gpu,
                    &update_rows(&d.param, &d.backup),
                    DType::F32,
                    DType::F32,
                    false,
                )
                .unwrap(),
                UpdateGroup::from_raw(
                    &gpu,
                    &update_rows(&d.out, &d.param),
                    DType::F32,
                    DType::F32,
                    false,
                )
                .unwrap(),
                ParamGroup::from_raw(&gpu, DType::F32, DType::F32, &restore_rows).unwrap(),
                EmaGroup::from_raw(&gpu, &ema_rows, DType::F32, DType::F32).unwrap(),
            )
        };
        let target = FusedTarget::new(&gpu, &fused, &ema).unwrap();
        let mut opt = GpuOptimizer::new(&gpu, BaseOptimizer::adamw(0.01), LR).unwrap();
        // A TRAM-x step over the same buffers (no target): its base step is
        // the check, the gate and the fused update.
        let describe = || -> Vec<Tensor<'static, f32>> {
            (0..TENSORS)
                .map(|k| {
                    let n = PER_TENSOR;
                    // SAFETY: as the groups above: live allocations of `d`
                    // with `len` f32 each, distinct, on the one stream.
                    unsafe {
                        Tensor {
                            param: DevMut::from_raw(p(&d.param[k]), n),
                            grad: Some(DevRef::from_raw(p(&d.grad[k]), n)),
                            perturbation: Perturbation::Backup(DevMut::from_raw(
                                p(&d.backup[k]),
                                n,
                            )),
                            m: Some(DevMut::from_raw(p(&d.m[k]), n)),
                            v: Some(DevMut::from_raw(p(&d.v[k]), n)),
                            target: None,
                            weight_decay: true,
                        }
                    }
                })
                .collect()
        };
        let cfg = TramConfig {
            delta: 0.5,
            geometry: Geometry::Sam,
            kl: KlOptions::default(),
            variant: TramVariant::X {
                noise: NoiseConfig {
                    distribution: NoiseDistribution::Uniform,
                    sigma: 0.01,
                    seed: 1,
                },
            },
            optimizer: BaseOptimizer::adamw(0.01),
            lr: LR,
        };
        let mut tensors = describe();
        let mut step = TramStep::<f32>::new(&gpu, cfg, &tensors, 1).unwrap();

        let n = (TENSORS * PER_TENSOR) as u64;
        let mut g = c.benchmark_group("optimizer_cuda_f32_64M");
        g.sample_size(20)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        g.throughput(Throughput::Bytes(28 * n));
        g.bench_function("fused_restore_adamw", |b| {
            b.iter_custom(|iters| common::gpu_time(&gpu, iters, || opt.step(&gpu, &fused).unwrap()))
        });
        g.throughput(Throughput::Bytes((4 + 28) * n));
        g.bench_function("tram_base_step", |b| {
            b.iter_custom(|iters| {
                common::gpu_time(&gpu, iters, || step.base_step(&mut tensors).unwrap())
            })
        });
        g.throughput(Throughput::Bytes((8 + 28) * n));
        g.bench_function("restore_then_adamw", |b| {
            b.iter_custom(|iters| {
                common::gpu_time(&gpu, iters, || {
                    restore(&gpu, &restore_group).unwrap();
                    opt.step(&gpu, &separate).unwrap();
                })
            })
        });
        g.throughput(Throughput::Bytes((28 + 8) * n));
        g.bench_function("fused_restore_adamw_ema", |b| {
            b.iter_custom(|iters| {
                common::gpu_time(&gpu, iters, || {
                    opt.step_with_target(&gpu, &fused, &target, LAMBDA).unwrap()
                })
            })
        });
        g.throughput(Throughput::Bytes((28 + 12) * n));
        g.bench_function("fused_restore_adamw_then_ema", |b| {
            b.iter_custom(|iters| {
                common::gpu_time(&gpu, iters, || {
                    opt.step(&gpu, &fused).unwrap();
                    ema_update(&gpu, &ema, LAMBDA).unwrap();
                })
            })
        });
        g.finish();
    }
}

criterion_group!(benches, cpu, gpu::bench);
criterion_main!(benches);
