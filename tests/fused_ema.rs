//! TRAM-θ's target upkeep fused into the restore + update pass: on the CPU,
//! bit for bit the update followed by the separate EMA; on the GPU, bit for
//! bit the CPU (fused kernel) and the TRAM step using it. Random groups with
//! a tensor without a gradient, several steps, AdamW and SGD, restore and
//! master modes, targets in f32 and in the parameter type, λ in {0, 0.37, 1}.

mod common;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tram_kernels::cpu::ema::{ema_update, EmaTensor};
use tram_kernels::cpu::optimizer::{EmaSource, FusedOptimizer, UpdateTensor, Weights};
use tram_kernels::{bf16, f16, BaseOptimizer, Element, Error};

const SIZES: [usize; 4] = [1, 7, 40_000, 70_001];
/// Gets no gradient (restore only, and the EMA still follows θ).
const NO_GRAD: usize = 1;
const STEPS: usize = 3;
const LAMBDAS: [f32; 3] = [0.0, 0.37, 1.0];

#[derive(Clone)]
struct Host<P, G, T> {
    backup: Vec<Vec<P>>,
    master: Vec<Vec<f32>>,
    param: Vec<Vec<P>>,
    grad: Vec<Vec<G>>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    target: Vec<Vec<T>>,
}

fn poison<P: Element>(n: usize) -> Vec<P> {
    vec![P::from_f32(f32::from_bits(0x7fc0_dead)); n]
}

fn rand_vec<E: Element>(rng: &mut SmallRng, n: usize, lo: f32, hi: f32) -> Vec<E> {
    (0..n)
        .map(|_| E::from_f32(rng.random_range(lo..hi)))
        .collect()
}

fn host<P: Element, G: Element, T: Element>(seed: u64) -> Host<P, G, T> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut each = |lo: f32, hi: f32| -> Vec<Vec<f32>> {
        SIZES
            .iter()
            .map(|&n| rand_vec(&mut rng, n, lo, hi))
            .collect()
    };
    let theta = each(-1.0, 1.0);
    let target = each(-1.0, 1.0);
    let m = each(-0.01, 0.01);
    let v = each(0.0, 1e-4);
    let conv = |x: &Vec<Vec<f32>>| -> Vec<Vec<P>> {
        x.iter()
            .map(|t| t.iter().map(|&y| P::from_f32(y)).collect())
            .collect()
    };
    Host {
        backup: conv(&theta),
        master: theta.clone(),
        param: SIZES.iter().map(|&n| poison(n)).collect(),
        grad: SIZES.iter().map(|&n| vec![G::from_f32(0.0); n]).collect(),
        m,
        v,
        target: target
            .iter()
            .map(|t| t.iter().map(|&y| T::from_f32(y)).collect())
            .collect(),
    }
}

/// Fresh gradients for the next step, and the perturbed θ (poison) to be
/// overwritten; in restore mode the backup is the current θ.
fn next_step<P: Element, G: Element, T: Element>(
    h: &mut Host<P, G, T>,
    rng: &mut SmallRng,
    master: bool,
    first: bool,
) {
    if !master && !first {
        h.backup = h.param.clone();
    }
    for (g, &n) in h.grad.iter_mut().zip(&SIZES) {
        *g = rand_vec(rng, n, -0.1, 0.1);
    }
    for (p, &n) in h.param.iter_mut().zip(&SIZES) {
        *p = poison(n);
    }
}

fn updates<'a, P: Element, G: Element>(
    backup: &'a [Vec<P>],
    master: &'a mut [Vec<f32>],
    param: &'a mut [Vec<P>],
    grad: &'a [Vec<G>],
    m: &'a mut [Vec<f32>],
    v: &'a mut [Vec<f32>],
    use_master: bool,
) -> Vec<UpdateTensor<'a, P, G>> {
    let mut out = Vec::new();
    let iter = backup
        .iter()
        .zip(master.iter_mut())
        .zip(param.iter_mut())
        .zip(grad.iter())
        .zip(m.iter_mut().zip(v.iter_mut()))
        .enumerate();
    for (k, ((((b, w), p), g), (m, v))) in iter {
        out.push(UpdateTensor {
            weights: if use_master {
                Weights::Master {
                    master: w,
                    param: p,
                }
            } else {
                Weights::Restore {
                    backup: b,
                    param: p,
                }
            },
            grad: (k != NO_GRAD).then_some(&g[..]),
            m,
            v,
            weight_decay: k % 2 == 0,
        });
    }
    out
}

/// One CPU step: fused (`step_with_target`) or the update then `ema_update`.
fn cpu_step<P: Element, G: Element, T: Element>(
    opt: &mut FusedOptimizer,
    h: &mut Host<P, G, T>,
    use_master: bool,
    source: EmaSource,
    lambda: f32,
    fused: bool,
) {
    let Host {
        backup,
        master,
        param,
        grad,
        m,
        v,
        target,
    } = h;
    let mut ups = updates(backup, master, param, grad, m, v, use_master);
    if fused {
        let mut ts: Vec<&mut [T]> = target.iter_mut().map(|t| &mut t[..]).collect();
        opt.step_with_target(&mut ups, &mut ts, lambda, source)
            .unwrap();
        return;
    }
    opt.step(&mut ups).unwrap();
    drop(ups);
    match source {
        EmaSource::Param => {
            let mut ts: Vec<EmaTensor<T, P>> = target
                .iter_mut()
                .zip(param.iter())
                .map(|(t, p)| EmaTensor {
                    target: t,
                    theta: p,
                })
                .collect();
            ema_update(&mut ts, lambda).unwrap();
        }
        EmaSource::Master => {
            let mut ts: Vec<EmaTensor<T, f32>> = target
                .iter_mut()
                .zip(master.iter())
                .map(|(t, w)| EmaTensor {
                    target: t,
                    theta: w,
                })
                .collect();
            ema_update(&mut ts, lambda).unwrap();
        }
    }
}

fn bits<T: Element>(x: &[Vec<T>]) -> Vec<Vec<u32>> {
    x.iter()
        .map(|v| v.iter().map(|y| y.to_bits_u32()).collect())
        .collect()
}

fn assert_same<P: Element, G: Element, T: Element>(
    a: &Host<P, G, T>,
    b: &Host<P, G, T>,
    what: &str,
) {
    assert_eq!(bits(&a.param), bits(&b.param), "{what}: θ");
    assert_eq!(bits(&a.master), bits(&b.master), "{what}: master");
    assert_eq!(bits(&a.m), bits(&b.m), "{what}: m");
    assert_eq!(bits(&a.v), bits(&b.v), "{what}: v");
    assert_eq!(bits(&a.target), bits(&b.target), "{what}: θ̄");
}

fn sgd() -> BaseOptimizer {
    BaseOptimizer::Sgd {
        momentum: 0.9,
        dampening: 0.0,
        weight_decay: 0.01,
        nesterov: true,
    }
}

/// The cases both test halves run: (optimizer, master mode, EMA source).
fn cases() -> [(BaseOptimizer, bool, EmaSource); 4] {
    [
        (BaseOptimizer::adamw(0.01), false, EmaSource::Param),
        (BaseOptimizer::adamw(0.01), true, EmaSource::Master),
        (sgd(), true, EmaSource::Param),
        (sgd(), false, EmaSource::Param),
    ]
}

fn cpu_fused_matches_separate<P: Element, G: Element, T: Element>(seed: u64) {
    for (c, (opt, use_master, source)) in cases().into_iter().enumerate() {
        for lambda in LAMBDAS {
            let mut rng = SmallRng::seed_from_u64(seed + c as u64);
            let mut sep = host::<P, G, T>(seed);
            let target0 = bits(&sep.target);
            let mut fus = sep.clone();
            let mut o_sep = FusedOptimizer::new(opt, 1e-2).unwrap();
            let mut o_fus = FusedOptimizer::new(opt, 1e-2).unwrap();
            for step in 0..STEPS {
                next_step(&mut sep, &mut rng, use_master, step == 0);
                fus.grad = sep.grad.clone();
                fus.param = sep.param.clone();
                fus.backup = sep.backup.clone();
                cpu_step(&mut o_sep, &mut sep, use_master, source, lambda, false);
                cpu_step(&mut o_fus, &mut fus, use_master, source, lambda, true);
                let what = format!("case {c}, λ {lambda}, step {step}");
                assert_same(&sep, &fus, &what);
                // The EMA ran (or, λ = 1, did not touch θ̄).
                assert_eq!(lambda == 1.0, bits(&fus.target) == target0, "{what}");
            }
            assert_eq!(o_sep.counter(), o_fus.counter());
        }
    }
}

#[test]
fn cpu_fused_ema_matches_the_separate_ema() {
    cpu_fused_matches_separate::<f32, f32, f32>(1);
    cpu_fused_matches_separate::<bf16, f32, bf16>(2);
    cpu_fused_matches_separate::<bf16, f32, f32>(3);
    cpu_fused_matches_separate::<f16, f16, f32>(4);
}

#[test]
fn cpu_fused_ema_rejects_bad_input_before_writing() {
    let mut h = host::<f32, f32, f32>(9);
    let mut rng = SmallRng::seed_from_u64(9);
    next_step(&mut h, &mut rng, false, true);
    let before = h.clone();
    let mut opt = FusedOptimizer::new(BaseOptimizer::adamw(0.0), 1e-3).unwrap();
    let Host {
        backup,
        master,
        param,
        grad,
        m,
        v,
        target,
    } = &mut h;
    let mut ups = updates(backup, master, param, grad, m, v, false);
    let invalid = |r: tram_kernels::Result<()>| matches!(r, Err(Error::InvalidArgument(_)));
    {
        // Master source without master weights.
        let mut ts: Vec<&mut [f32]> = target.iter_mut().map(|t| &mut t[..]).collect();
        assert!(invalid(opt.step_with_target(
            &mut ups,
            &mut ts,
            0.5,
            EmaSource::Master
        )));
        // λ outside [0, 1].
        for l in [-0.1f32, 1.5, f32::NAN] {
            assert!(invalid(opt.step_with_target(
                &mut ups,
                &mut ts,
                l,
                EmaSource::Param
            )));
        }
        // One target too few.
        ts.pop();
        assert!(invalid(opt.step_with_target(
            &mut ups,
            &mut ts,
            0.5,
            EmaSource::Param
        )));
    }
    {
        // A target of the wrong length (the last tensor's, cut short).
        let mut ts: Vec<&mut [f32]> = target.iter_mut().map(|t| &mut t[..]).collect();
        let last = ts.pop().unwrap();
        let n = last.len();
        ts.push(&mut last[..n - 1]);
        assert!(invalid(opt.step_with_target(
            &mut ups,
            &mut ts,
            0.5,
            EmaSource::Param
        )));
    }
    drop(ups);
    assert_eq!(opt.step_count(), 0);
    assert_same(&h, &before, "after rejected calls");
}

mod gpu {
    use super::*;
    use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};
    use tram_kernels::cuda::ema::{EmaGroup, RawEmaTensor};
    use tram_kernels::cuda::optimizer::{
        FusedOptimizer as GpuOptimizer, FusedTarget, RawUpdateTensor, UpdateGroup,
    };
    use tram_kernels::cuda::CudaBackend;

    struct Dev<P, G, T> {
        backup: Vec<CudaSlice<P>>,
        master: Vec<CudaSlice<f32>>,
        param: Vec<CudaSlice<P>>,
        grad: Vec<CudaSlice<G>>,
        m: Vec<CudaSlice<f32>>,
        v: Vec<CudaSlice<f32>>,
        target: Vec<CudaSlice<T>>,
    }

    fn up<E: DeviceRepr + Copy>(gpu: &CudaBackend, x: &[Vec<E>]) -> Vec<CudaSlice<E>> {
        x.iter()
            .map(|t| gpu.stream().clone_htod(t).unwrap())
            .collect()
    }

    fn write<E: DeviceRepr + Copy>(gpu: &CudaBackend, dst: &mut [CudaSlice<E>], x: &[Vec<E>]) {
        for (d, h) in dst.iter_mut().zip(x) {
            gpu.stream().memcpy_htod(h, d).unwrap();
        }
    }

    fn down<E: DeviceRepr + Copy + Default>(gpu: &CudaBackend, x: &[CudaSlice<E>]) -> Vec<Vec<E>> {
        x.iter()
            .map(|d| gpu.stream().clone_dtoh(d).unwrap())
            .collect()
    }

    fn ptr<E>(gpu: &CudaBackend, x: &CudaSlice<E>) -> u64 {
        x.device_ptr(gpu.stream()).0
    }

    fn groups<P: Element + DeviceRepr, G: Element + DeviceRepr, T: Element + DeviceRepr>(
        gpu: &CudaBackend,
        d: &Dev<P, G, T>,
        use_master: bool,
        source: EmaSource,
    ) -> (UpdateGroup<'static>, EmaGroup<'static>) {
        let p = |k: usize| ptr(gpu, &d.param[k]);
        let raw: Vec<RawUpdateTensor> = (0..SIZES.len())
            .map(|k| RawUpdateTensor {
                param: p(k),
                grad: if k == NO_GRAD {
                    0
                } else {
                    ptr(gpu, &d.grad[k])
                },
                source: if use_master {
                    ptr(gpu, &d.master[k])
                } else {
                    ptr(gpu, &d.backup[k])
                },
                m: ptr(gpu, &d.m[k]),
                v: ptr(gpu, &d.v[k]),
                len: SIZES[k] as u64,
                weight_decay: k % 2 == 0,
            })
            .collect();
        let ema: Vec<RawEmaTensor> = (0..SIZES.len())
            .map(|k| RawEmaTensor {
                target: ptr(gpu, &d.target[k]),
                theta: match source {
                    EmaSource::Param => p(k),
                    EmaSource::Master => ptr(gpu, &d.master[k]),
                },
                len: SIZES[k] as u64,
            })
            .collect();
        let theta_dtype = match source {
            EmaSource::Param => P::DTYPE,
            EmaSource::Master => tram_kernels::DType::F32,
        };
        // SAFETY: every address is a live allocation of `d` (kept by the
        // caller past the last launch) with the stated length and type; all
        // work is on the backend's one stream; no written buffer overlaps
        // another.
        unsafe {
            (
                UpdateGroup::from_raw(gpu, &raw, P::DTYPE, G::DTYPE, use_master).unwrap(),
                EmaGroup::from_raw(gpu, &ema, T::DTYPE, theta_dtype).unwrap(),
            )
        }
    }

    fn gpu_fused_matches_cpu<
        P: Element + DeviceRepr,
        G: Element + DeviceRepr,
        T: Element + DeviceRepr,
    >(
        gpu: &CudaBackend,
        seed: u64,
    ) {
        for (c, (opt, use_master, source)) in cases().into_iter().enumerate() {
            for lambda in LAMBDAS {
                let mut rng = SmallRng::seed_from_u64(seed + c as u64);
                let mut h = host::<P, G, T>(seed);
                let mut d = Dev {
                    backup: up(gpu, &h.backup),
                    master: up(gpu, &h.master),
                    param: up(gpu, &h.param),
                    grad: up(gpu, &h.grad),
                    m: up(gpu, &h.m),
                    v: up(gpu, &h.v),
                    target: up(gpu, &h.target),
                };
                let (update, ema) = groups(gpu, &d, use_master, source);
                let fused = FusedTarget::new(gpu, &update, &ema).unwrap();
                assert_eq!(fused.from_master(), source == EmaSource::Master);
                let mut o_cpu = FusedOptimizer::new(opt, 1e-2).unwrap();
                let mut o_gpu = GpuOptimizer::new(gpu, opt, 1e-2).unwrap();
                for step in 0..STEPS {
                    let lr = [1e-2f32, 3e-2, 5e-3][step];
                    o_cpu.set_lr(lr).unwrap();
                    o_gpu.set_lr(gpu, lr).unwrap();
                    next_step(&mut h, &mut rng, use_master, step == 0);
                    // The GPU starts every step from the CPU's inputs, θ poisoned.
                    write(gpu, &mut d.backup, &h.backup);
                    write(gpu, &mut d.param, &h.param);
                    write(gpu, &mut d.grad, &h.grad);
                    cpu_step(&mut o_cpu, &mut h, use_master, source, lambda, true);
                    o_gpu
                        .step_with_target(gpu, &update, &fused, lambda)
                        .unwrap();
                    let got = Host {
                        backup: h.backup.clone(),
                        master: down(gpu, &d.master),
                        param: down(gpu, &d.param),
                        grad: h.grad.clone(),
                        m: down(gpu, &d.m),
                        v: down(gpu, &d.v),
                        target: down(gpu, &d.target),
                    };
                    assert_same(&got, &h, &format!("case {c}, λ {lambda}, step {step}"));
                }
                assert_eq!(o_gpu.counter(gpu).unwrap(), o_cpu.counter());
            }
        }
    }

    #[test]
    fn gpu_fused_ema_matches_cpu_bit_for_bit() {
        let gpu = gpu_or_skip!();
        gpu_fused_matches_cpu::<f32, f32, f32>(&gpu, 11);
        gpu_fused_matches_cpu::<bf16, f32, bf16>(&gpu, 12);
        gpu_fused_matches_cpu::<bf16, f32, f32>(&gpu, 13);
        gpu_fused_matches_cpu::<f16, f16, f32>(&gpu, 14);
    }

    #[test]
    fn fused_target_rejects_what_it_cannot_fuse() {
        let gpu = gpu_or_skip!();
        let h = host::<bf16, f32, f32>(21);
        let d = Dev {
            backup: up(&gpu, &h.backup),
            master: up(&gpu, &h.master),
            param: up(&gpu, &h.param),
            grad: up(&gpu, &h.grad),
            m: up(&gpu, &h.m),
            v: up(&gpu, &h.v),
            target: up(&gpu, &h.target),
        };
        let (update, ema) = groups(&gpu, &d, false, EmaSource::Param);
        assert!(FusedTarget::new(&gpu, &update, &ema).is_ok());
        let invalid =
            |r: tram_kernels::Result<FusedTarget<'_>>| matches!(r, Err(Error::InvalidArgument(_)));
        let n = |k: usize| SIZES[k] as u64;
        let ema_of = |rows: Vec<RawEmaTensor>, t, th| {
            // SAFETY: as in `groups`; nothing is launched.
            unsafe { EmaGroup::from_raw(&gpu, &rows, t, th) }.unwrap()
        };
        let good: Vec<RawEmaTensor> = (0..SIZES.len())
            .map(|k| RawEmaTensor {
                target: ptr(&gpu, &d.target[k]),
                theta: ptr(&gpu, &d.param[k]),
                len: n(k),
            })
            .collect();
        use tram_kernels::DType::{BF16, F32};
        // θ is not the update's parameters (the backups), or reads masters
        // in restore mode.
        let mut rows = good.clone();
        rows[2].theta = ptr(&gpu, &d.backup[2]);
        assert!(invalid(FusedTarget::new(
            &gpu,
            &update,
            &ema_of(rows, F32, BF16)
        )));
        let rows: Vec<RawEmaTensor> = (0..SIZES.len())
            .map(|k| RawEmaTensor {
                theta: ptr(&gpu, &d.master[k]),
                ..good[k]
            })
            .collect();
        assert!(invalid(FusedTarget::new(
            &gpu,
            &update,
            &ema_of(rows, F32, F32)
        )));
        // θ of the wrong dtype; a target type without a kernel (f16 beside bf16).
        assert!(invalid(FusedTarget::new(
            &gpu,
            &update,
            &ema_of(good.clone(), F32, F32)
        )));
        let f16_ema = ema_of(good.clone(), tram_kernels::DType::F16, BF16);
        assert!(invalid(FusedTarget::new(&gpu, &update, &f16_ema)));
        // Other tensor count, other length.
        assert!(invalid(FusedTarget::new(
            &gpu,
            &update,
            &ema_of(good[..3].to_vec(), F32, BF16)
        )));
        let mut rows = good.clone();
        rows[3].len -= 1;
        assert!(invalid(FusedTarget::new(
            &gpu,
            &update,
            &ema_of(rows, F32, BF16)
        )));
        // A target that is the gradient of another tensor.
        let mut rows = good.clone();
        rows[2].target = ptr(&gpu, &d.grad[3]);
        assert!(invalid(FusedTarget::new(
            &gpu,
            &update,
            &ema_of(rows, F32, BF16)
        )));
        // A fused target of another group's size is refused by the step.
        let (small_update, small_ema) = {
            let r: Vec<RawUpdateTensor> = vec![RawUpdateTensor {
                param: ptr(&gpu, &d.param[0]),
                grad: ptr(&gpu, &d.grad[0]),
                source: ptr(&gpu, &d.backup[0]),
                m: ptr(&gpu, &d.m[0]),
                v: ptr(&gpu, &d.v[0]),
                len: n(0),
                weight_decay: false,
            }];
            // SAFETY: as in `groups`.
            let u = unsafe { UpdateGroup::from_raw(&gpu, &r, BF16, F32, false) }.unwrap();
            (u, ema_of(good[..1].to_vec(), F32, BF16))
        };
        let small = FusedTarget::new(&gpu, &small_update, &small_ema).unwrap();
        let mut opt = GpuOptimizer::new(&gpu, BaseOptimizer::adamw(0.0), 1e-3).unwrap();
        assert!(matches!(
            opt.step_with_target(&gpu, &update, &small, 0.5),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            opt.step_with_target(&gpu, &small_update, &small, 1.5),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(opt.step_count(&gpu).unwrap(), 0);
    }
}
