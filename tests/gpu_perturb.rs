//! The multi-tensor perturbation (in place with backup, master weights, out of
//! place) and restore on the GPU, against the CPU reference and an f64 replay
//! of the norm and radius the GPU itself used: random groups of mixed sizes
//! (sub-slices off the vector alignment, tensors without a gradient), every
//! geometry and dtype pair, outputs poisoned before each run, the status
//! paths, run-to-run bit identity, bit-exact restore, bad input, and a tensor
//! of more than 2^31 elements when the device has room.

mod common;
mod multi_tensor;

use cudarc::driver::CudaSlice;
use multi_tensor::{bits, hashed, poison, ulp, Case, Dev, Layout, SIZES};
use rayon::prelude::*;
use tram_kernels::cpu::grad_norm::grad_norm as cpu_norm;
use tram_kernels::cpu::perturb::{direction, plan, radius_value};
use tram_kernels::cuda::grad_norm::{grad_norm, NormOptions};
use tram_kernels::cuda::group::{DeviceBuf, NormState, ParamGroup, RawTensor, TensorViews};
use tram_kernels::cuda::perturb::{
    perturb, perturb_device, perturb_raw, DeviceRadius, PerturbMode, PerturbOptions,
};
use tram_kernels::cuda::restore::restore;
use tram_kernels::cuda::CudaBackend;
use tram_kernels::{bf16, f16, DType, Element, Error, Geometry, PerturbStatus, Radius};

const GEOMETRIES: [Geometry; 3] = [
    Geometry::Sam,
    Geometry::Adaptive { eta: 0.01 },
    Geometry::Fisher { eta: 0.5 },
];

fn layout(mode: PerturbMode) -> Layout {
    match mode {
        PerturbMode::InPlace => Layout::Backup,
        PerturbMode::Master => Layout::Master,
        PerturbMode::OutOfPlace => Layout::Out,
    }
}

fn poison_state(gpu: &CudaBackend, group: &mut ParamGroup<'_>) {
    let st = NormState {
        sum_sq: f64::NAN,
        norm: f64::NAN,
        rho: f64::NAN,
        coef: f64::NAN,
        status: 0xdead_beef,
        found_inf: 0xdead_beef,
        _pad: [0; 2],
    };
    gpu.stream().memcpy_htod(&[st], group.state_mut()).unwrap();
}

/// Norm then perturbation (two launches), state poisoned first.
fn step(
    gpu: &CudaBackend,
    group: &mut ParamGroup<'_>,
    opts: PerturbOptions,
    d: &CudaSlice<f32>,
) -> NormState {
    poison_state(gpu, group);
    let norm = NormOptions {
        geometry: opts.geometry,
        inv_scale: opts.inv_scale,
    };
    grad_norm(gpu, group, norm).unwrap();
    perturb(gpu, group, opts, Some(&d.as_view())).unwrap();
    group.read_state().unwrap()
}

/// |got − (θ + ε)| ≤ 1 ulp(θ + ε) + 2 ulp(ε), ulps of P, ε exact in f64.
fn check_value<P: Element>(got: P, theta: f64, eps: f64, what: &dyn Fn() -> String) {
    let want = theta + eps;
    let tol = ulp::<P>(want) + 2.0 * ulp::<P>(eps);
    let g = got.to_f64();
    assert!(
        (g - want).abs() <= tol,
        "{}: got {g:e}, want {want:e} (θ {theta:e}, ε {eps:e}, tol {tol:e})",
        what()
    );
}

/// The outputs of one step, read back.
struct Outputs<P> {
    theta: Vec<Vec<P>>,
    aux: Vec<Vec<P>>,
    state: NormState,
}

fn run_mode<P, G>(gpu: &CudaBackend, case: &Case<P, G>, opts: PerturbOptions, d: f32) -> Outputs<P>
where
    P: Element + cudarc::driver::DeviceRepr,
    G: Element + cudarc::driver::DeviceRepr,
{
    // Fresh buffers every run: θ from the case, backup/out poisoned.
    let dev = Dev::upload(gpu, case);
    let d_dev = gpu.stream().clone_htod(&[d]).unwrap();
    let mut group = dev.group(gpu, layout(opts.mode), &case.has_grad);
    let state = step(gpu, &mut group, opts, &d_dev);
    let out = Outputs {
        theta: dev.read_theta(gpu),
        aux: dev.read_aux(gpu),
        state,
    };
    if opts.mode == PerturbMode::InPlace {
        // Restore brings every tensor back bit for bit.
        restore(gpu, &group).unwrap();
        let back = dev.read_theta(gpu);
        for (i, (b, t)) in back.iter().zip(&case.theta).enumerate() {
            assert_eq!(bits(b), bits(t), "restore, tensor {i}");
        }
    }
    out
}

/// Checks one applied step: the state against the CPU, every element against
/// the f64 replay, untouched buffers untouched.
fn check_applied<P, G>(case: &Case<P, G>, opts: PerturbOptions, d: f32, out: &Outputs<P>)
where
    P: Element,
    G: Element,
{
    let (geo, s, mode) = (opts.geometry, opts.inv_scale, opts.mode);
    let st = &out.state;
    let what = format!("{:?}/{:?} {geo:?} {mode:?} s={s}", P::DTYPE, G::DTYPE);
    let cpu = if mode == PerturbMode::Master {
        cpu_norm(&case.masters(), &case.grads(), geo, s).unwrap()
    } else {
        cpu_norm(&case.thetas(), &case.grads(), geo, s).unwrap()
    };
    assert!(
        ((st.norm - cpu.norm) / cpu.norm).abs() <= 1e-6,
        "{what}: norm {} vs CPU {}",
        st.norm,
        cpu.norm
    );
    assert_eq!(st.norm.to_bits(), st.sum_sq.sqrt().to_bits(), "{what}");
    assert_eq!(st.rho, radius_value(opts.radius, d), "{what}: ρ");
    let planned = plan(st.norm, st.rho);
    assert_eq!(st.perturb_status(), planned.status, "{what}");
    assert_eq!(planned.status.0, PerturbStatus::APPLIED, "{what}");
    assert_eq!(st.coef.to_bits(), planned.coef.to_bits(), "{what}: coef");
    assert_eq!(st.found_inf, 0, "{what}");

    for i in 0..case.theta.len() {
        let (theta, aux) = (&out.theta[i], &out.aux[i]);
        let orig = bits(&case.theta[i]);
        let poisoned = vec![poison::<P>().to_bits_u32(); orig.len()];
        let active = case.has_grad[i];
        // The buffer that should hold θ + ε, and what the others hold.
        let perturbed: &[P] = match mode {
            PerturbMode::InPlace | PerturbMode::Master => theta,
            PerturbMode::OutOfPlace => aux,
        };
        match mode {
            PerturbMode::InPlace => {
                let want = if active { &orig } else { &poisoned };
                assert_eq!(&bits(aux), want, "{what}: backup of tensor {i}");
            }
            PerturbMode::OutOfPlace => {
                assert_eq!(bits(theta), orig, "{what}: θ of tensor {i} was written");
                if !active {
                    assert_eq!(bits(aux), orig, "{what}: out of tensor {i} (no gradient)");
                }
            }
            PerturbMode::Master => {}
        }
        if !active {
            if mode != PerturbMode::OutOfPlace {
                assert_eq!(bits(theta), orig, "{what}: skipped tensor {i} changed");
            }
            continue;
        }
        for (k, &got) in perturbed.iter().enumerate() {
            let t = if mode == PerturbMode::Master {
                case.master[i][k] as f64
            } else {
                case.theta[i][k].to_f64()
            };
            let g = case.grad[i][k].to_f64();
            let eps = st.coef * direction(t, s as f64 * g, geo);
            check_value(got, t, eps, &|| format!("{what}: tensor {i}[{k}]"));
        }
    }
}

fn check_pair<P, G>(gpu: &CudaBackend, seed: u64, modes: &[PerturbMode])
where
    P: Element + cudarc::driver::DeviceRepr,
    G: Element + cudarc::driver::DeviceRepr,
{
    for &mode in modes {
        for (k, geo) in GEOMETRIES.into_iter().enumerate() {
            // Alternate: trust region without loss scale, fixed ρ with one.
            let (radius, d, scale) = if k % 2 == 0 {
                (Radius::TrustRegion { delta: 0.5 }, 0.3f32, 1.0)
            } else {
                (Radius::Fixed(0.05), f32::NAN, 1024.0)
            };
            for (j, r) in [(0, radius), (1, Radius::TrustRegion { delta: 2.0 })] {
                let case =
                    Case::<P, G>::random(seed + 10 * k as u64 + j, &SIZES, 1e-2 * scale, true);
                let opts = PerturbOptions {
                    geometry: geo,
                    radius: r,
                    inv_scale: (1.0 / scale) as f32,
                    mode,
                };
                let d = if j == 1 { 0.125 } else { d };
                let first = run_mode(gpu, &case, opts, d);
                check_applied(&case, opts, d, &first);
                let second = run_mode(gpu, &case, opts, d);
                assert_eq!(
                    bytemuck::bytes_of(&first.state),
                    bytemuck::bytes_of(&second.state)
                );
                for i in 0..case.theta.len() {
                    assert_eq!(bits(&first.theta[i]), bits(&second.theta[i]), "run 2 θ {i}");
                    assert_eq!(bits(&first.aux[i]), bits(&second.aux[i]), "run 2 aux {i}");
                }
            }
        }
    }
}

const ALL_MODES: [PerturbMode; 3] = [
    PerturbMode::InPlace,
    PerturbMode::Master,
    PerturbMode::OutOfPlace,
];

#[test]
fn f32_params_f32_grads() {
    let gpu = gpu_or_skip!();
    check_pair::<f32, f32>(&gpu, 1000, &ALL_MODES);
}

#[test]
fn f16_params_f16_grads() {
    let gpu = gpu_or_skip!();
    check_pair::<f16, f16>(&gpu, 2000, &ALL_MODES);
}

#[test]
fn bf16_params_bf16_grads() {
    let gpu = gpu_or_skip!();
    check_pair::<bf16, bf16>(&gpu, 3000, &ALL_MODES);
}

#[test]
fn bf16_params_f32_grads() {
    let gpu = gpu_or_skip!();
    check_pair::<bf16, f32>(&gpu, 4000, &ALL_MODES);
}

/// A step that must not move θ: its status, and what each mode wrote.
fn check_not_applied<P, G>(gpu: &CudaBackend, case: &Case<P, G>, radius: Radius, d: f32)
where
    P: Element + cudarc::driver::DeviceRepr,
    G: Element + cudarc::driver::DeviceRepr,
{
    for mode in ALL_MODES {
        for geo in GEOMETRIES {
            let opts = PerturbOptions {
                geometry: geo,
                radius,
                inv_scale: 1.0,
                mode,
            };
            let out = run_mode(gpu, case, opts, d);
            let what = format!("{mode:?} {geo:?} {radius:?} d={d}");
            let cpu = if mode == PerturbMode::Master {
                cpu_norm(&case.masters(), &case.grads(), geo, 1.0).unwrap()
            } else {
                cpu_norm(&case.thetas(), &case.grads(), geo, 1.0).unwrap()
            };
            let want = plan(cpu.norm, radius_value(radius, d)).status;
            let st = out.state;
            assert_eq!(st.perturb_status(), want, "{what}");
            assert!(!want.applied(), "{what}: test setup");
            assert_eq!(st.coef, 0.0, "{what}");
            assert_eq!(st.found_inf == 1, cpu.found_inf, "{what}");
            for i in 0..case.theta.len() {
                let orig = bits(&case.theta[i]);
                let poisoned = vec![poison::<P>().to_bits_u32(); orig.len()];
                assert_eq!(bits(&out.theta[i]), orig, "{what}: θ of tensor {i}");
                let want_aux = match mode {
                    // The backup of tensors with a gradient; θ as the output of all.
                    PerturbMode::InPlace if case.has_grad[i] => &orig,
                    PerturbMode::OutOfPlace => &orig,
                    _ => &poisoned,
                };
                assert_eq!(&bits(&out.aux[i]), want_aux, "{what}: aux of tensor {i}");
            }
        }
    }
}

#[test]
fn status_paths_leave_theta_unchanged() {
    let gpu = gpu_or_skip!();
    let sizes = &SIZES[..8];
    let trust = Radius::TrustRegion { delta: 0.5 };
    let good = Case::<bf16, f32>::random(5000, sizes, 1e-2, true);
    // Non-finite gradient in a tensor that has one.
    let mut nan = Case::<bf16, f32>::random(5001, sizes, 1e-2, true);
    nan.grad[5][100] = f32::NAN;
    check_not_applied(&gpu, &nan, trust, 0.3);
    let mut inf = Case::<f32, f32>::random(5002, sizes, 1e-2, true);
    inf.grad[0][0] = f32::INFINITY;
    check_not_applied(&gpu, &inf, Radius::Fixed(0.05), f32::NAN);
    // Both a bad gradient and a negative radius: both bits.
    check_not_applied(&gpu, &nan, trust, -0.3);
    // Zero gradients: zero norm, ε = 0.
    let mut zero = Case::<f16, f16>::random(5003, sizes, 1e-2, true);
    for g in &mut zero.grad {
        g.iter_mut().for_each(|x| *x = f16::ZERO);
    }
    check_not_applied(&gpu, &zero, trust, 0.3);
    // Bad radii.
    check_not_applied(&gpu, &good, trust, -0.3);
    check_not_applied(&gpu, &good, trust, f32::INFINITY);
    check_not_applied(&gpu, &good, trust, f32::NAN);
    check_not_applied(&gpu, &good, Radius::Fixed(f32::NAN), 0.0);
    check_not_applied(&gpu, &good, Radius::Fixed(-1e-3), 0.0);
    check_not_applied(&gpu, &good, Radius::TrustRegion { delta: -0.5 }, 0.3);
}

#[test]
fn zero_radius_applies_a_zero_step() {
    let gpu = gpu_or_skip!();
    let case = Case::<f32, f32>::random(5100, &SIZES[..8], 1e-2, true);
    for mode in ALL_MODES {
        let opts = PerturbOptions {
            geometry: Geometry::Sam,
            radius: Radius::TrustRegion { delta: 0.5 },
            inv_scale: 1.0,
            mode,
        };
        let out = run_mode(&gpu, &case, opts, 0.0);
        check_applied(&case, opts, 0.0, &out);
        assert_eq!((out.state.rho, out.state.coef), (0.0, 0.0));
    }
}

#[test]
fn bad_input_is_an_error() {
    let gpu = gpu_or_skip!();
    let case = Case::<f32, f32>::random(5200, &SIZES[..4], 1e-2, false);
    let dev = Dev::upload(&gpu, &case);
    let d = gpu.stream().clone_htod(&[0.3f32]).unwrap();
    let invalid = |r: tram_kernels::Result<()>| matches!(r, Err(Error::InvalidArgument(_)));
    let opts = PerturbOptions {
        geometry: Geometry::Sam,
        radius: Radius::TrustRegion { delta: 0.5 },
        inv_scale: 1.0,
        mode: PerturbMode::InPlace,
    };
    {
        // A group without backups, master weights or outputs.
        let plain = dev.group(&gpu, Layout::Plain, &case.has_grad);
        for mode in ALL_MODES {
            let o = PerturbOptions { mode, ..opts };
            assert!(invalid(perturb(&gpu, &plain, o, Some(&d.as_view()))));
        }
        assert!(invalid(restore(&gpu, &plain)));
    }
    let group = dev.group(&gpu, Layout::Backup, &case.has_grad);
    // Trust region without a divergence, or with an empty one.
    assert!(invalid(perturb(&gpu, &group, opts, None)));
    assert!(invalid(perturb(&gpu, &group, opts, Some(&d.slice(1..)))));
    // SAFETY: a null divergence is rejected before any launch.
    assert!(invalid(unsafe { perturb_raw(&gpu, &group, opts, 0) }));
    // Bad η or scale.
    for (geometry, inv_scale) in [
        (Geometry::Adaptive { eta: -0.1 }, 1.0),
        (Geometry::Fisher { eta: f32::NAN }, 1.0),
        (Geometry::Sam, 0.0),
        (Geometry::Sam, f32::INFINITY),
    ] {
        let o = PerturbOptions {
            geometry,
            inv_scale,
            ..opts
        };
        assert!(invalid(perturb(&gpu, &group, o, Some(&d.as_view()))));
    }
    // A fixed radius needs no divergence.
    let fixed = PerturbOptions {
        radius: Radius::Fixed(0.05),
        ..opts
    };
    assert!(perturb(&gpu, &group, fixed, None).is_ok());
    gpu.synchronize().unwrap();

    // Groups: length mismatch, empty, overlapping, unsupported dtype pairs.
    let (p, g) = (&dev.theta[3], &dev.grad[3]);
    let t = |param, grad, backup| TensorViews::<f32, f32> {
        param,
        grad,
        backup,
        master: None,
        out: None,
    };
    let short = g.dev.slice(g.start..g.start + g.len - 1);
    assert!(ParamGroup::new(&gpu, &[t(p.view(), short, None)]).is_err());
    let short_backup = dev.aux[3].dev.slice(dev.aux[3].start..dev.aux[3].start + 1);
    assert!(ParamGroup::new(&gpu, &[t(p.view(), g.view(), Some(short_backup))]).is_err());
    assert!(ParamGroup::new::<f32, f32>(&gpu, &[]).is_err());
    assert!(ParamGroup::new(&gpu, &[t(p.view(), g.view(), Some(p.view()))]).is_err());
    let halves = gpu.stream().alloc_zeros::<f16>(4).unwrap();
    let mixed = [TensorViews::<f16, f32> {
        param: halves.as_view(),
        grad: dev.grad[1].view(),
        backup: None,
        master: None,
        out: None,
    }];
    assert!(ParamGroup::new(&gpu, &mixed).is_err());
    let raw = RawTensor {
        param: DeviceBuf {
            ptr: 0x1000,
            len: 4,
        },
        grad: DeviceBuf {
            ptr: 0x2000,
            len: 4,
        },
        ..Default::default()
    };
    // SAFETY: rejected by validation (no kernel ever sees these addresses).
    assert!(unsafe { ParamGroup::from_raw(&gpu, DType::F32, DType::BF16, &[raw]) }.is_err());
    // SAFETY: as above: the group is empty.
    assert!(unsafe { ParamGroup::from_raw(&gpu, DType::F32, DType::F32, &[]) }.is_err());
}

#[test]
fn raw_pointer_group_matches_the_safe_one() {
    let gpu = gpu_or_skip!();
    let case = Case::<bf16, f32>::random(5300, &SIZES, 1e-2, true);
    let opts = PerturbOptions {
        geometry: Geometry::Adaptive { eta: 0.01 },
        radius: Radius::TrustRegion { delta: 0.5 },
        inv_scale: 1.0,
        mode: PerturbMode::InPlace,
    };
    let safe = run_mode(&gpu, &case, opts, 0.3);
    let dev = Dev::upload(&gpu, &case);
    let d = gpu.stream().clone_htod(&[0.3f32]).unwrap();
    let raw: Vec<RawTensor> = (0..SIZES.len())
        .map(|i| RawTensor {
            param: dev.theta[i].raw(gpu.stream()),
            grad: dev.grad[i].raw(gpu.stream()),
            backup: Some(dev.aux[i].raw(gpu.stream())),
            master: None,
            out: None,
        })
        .collect();
    // SAFETY: every address is inside a live allocation of `dev`, which
    // outlives the group, with the stated length and type; all on one stream.
    let mut group = unsafe { ParamGroup::from_raw(&gpu, DType::BF16, DType::F32, &raw) }.unwrap();
    group.set_has_grad(&case.has_grad).unwrap();
    let (dp, _g) = cudarc::driver::DevicePtr::device_ptr(&d, gpu.stream());
    poison_state(&gpu, &mut group);
    grad_norm(
        &gpu,
        &group,
        NormOptions {
            geometry: opts.geometry,
            inv_scale: 1.0,
        },
    )
    .unwrap();
    // SAFETY: `dp` is `d`'s address; `d` lives until after the synchronising read below.
    unsafe { perturb_raw(&gpu, &group, opts, dp) }.unwrap();
    let st = group.read_state().unwrap();
    assert_eq!(bytemuck::bytes_of(&st), bytemuck::bytes_of(&safe.state));
    for i in 0..SIZES.len() {
        assert_eq!(bits(&dev.theta[i].read(gpu.stream())), bits(&safe.theta[i]));
        assert_eq!(bits(&dev.aux[i].read(gpu.stream())), bits(&safe.aux[i]));
    }
}

#[test]
fn a_tensor_beyond_2_pow_31_elements() {
    let gpu = gpu_or_skip!();
    let n = (1usize << 31) + 37;
    let off = 3; // off the vector alignment, at 64-bit element offsets
    let what = "the 2^31-element tensor of random data";
    if !common::real_gpu_case(
        &gpu,
        what,
        "13 GB of device and 9 GB of host memory, all written",
    ) || !common::device_has(&gpu, 3 * 2 * (n + off) + (64 << 20), what)
    {
        return;
    }
    let theta: Vec<bf16> = (0..(n + off) as u64)
        .into_par_iter()
        .map(|i| bf16::from_f64(hashed(i, 7)))
        .collect();
    let grad: Vec<bf16> = (0..(n + off) as u64)
        .into_par_iter()
        .map(|i| bf16::from_f64(hashed(i, 8) * 1e-2))
        .collect();
    let s = gpu.stream();
    let td = s.clone_htod(&theta).unwrap();
    let gd = s.clone_htod(&grad).unwrap();
    let bd = s.alloc_zeros::<bf16>(n + off).unwrap();
    let d = s.clone_htod(&[0.3f32]).unwrap();
    let views = [TensorViews::<bf16, bf16> {
        param: td.slice(off..),
        grad: gd.slice(off..),
        backup: Some(bd.slice(off..)),
        master: None,
        out: None,
    }];
    let mut group = ParamGroup::new(&gpu, &views).unwrap();
    let opts = PerturbOptions {
        geometry: Geometry::Sam,
        radius: Radius::TrustRegion { delta: 0.5 },
        inv_scale: 1.0,
        mode: PerturbMode::InPlace,
    };
    let st = step(&gpu, &mut group, opts, &d);
    let cpu = cpu_norm(&[&theta[off..]], &[Some(&grad[off..])], Geometry::Sam, 1.0).unwrap();
    assert!(((st.norm - cpu.norm) / cpu.norm).abs() <= 1e-6);
    assert!(st.perturb_status().applied());
    // Windows at the start, across 2^31 and at the end.
    let windows = [0..70_000, (1 << 31) - 70_000..(1 << 31) + 30, n - 70_000..n];
    for w in windows.clone() {
        let got = s.clone_dtoh(&td.slice(off + w.start..off + w.end)).unwrap();
        let saved = s.clone_dtoh(&bd.slice(off + w.start..off + w.end)).unwrap();
        for (k, i) in w.clone().enumerate() {
            let t = theta[off + i].to_f64();
            let eps = st.coef * grad[off + i].to_f64();
            check_value(got[k], t, eps, &|| format!("element {i}"));
            assert_eq!(saved[k].to_bits(), theta[off + i].to_bits(), "backup {i}");
        }
    }
    restore(&gpu, &group).unwrap();
    for w in windows {
        let got = s.clone_dtoh(&td.slice(off + w.start..off + w.end)).unwrap();
        assert_eq!(bits(&got), bits(&theta[off + w.start..off + w.end]));
    }
}

/// The 64-bit offsets of the test above in the least memory a 2^31-element
/// in-place perturbation can take: θ, g and the backup in bf16 (12 GiB), with
/// data only in the windows that are checked (the start, and from below 2^31
/// across it to the end: the tensor ends 37 elements past 2^31) and zeros
/// elsewhere, so the host holds only the windows. Every chunk is still read
/// and written by the kernels.
#[test]
fn a_tensor_beyond_2_pow_31_elements_in_12_gib() {
    let gpu = gpu_or_skip!();
    let n = (1usize << 31) + 37;
    let off = 3;
    if !common::device_has(
        &gpu,
        3 * 2 * (n + off) + (64 << 20),
        "the 2^31-element tensor",
    ) {
        return;
    }
    let windows = [0..70_000, (1 << 31) - 140_000..n];
    let theta_at = |i: usize| bf16::from_f64(hashed(i as u64, 17));
    let grad_at = |i: usize| bf16::from_f64(hashed(i as u64, 18) * 1e-2);
    let s = gpu.stream();
    let mut td = s.alloc_zeros::<bf16>(n + off).unwrap();
    let mut gd = s.alloc_zeros::<bf16>(n + off).unwrap();
    let bd = s.alloc_zeros::<bf16>(n + off).unwrap();
    let (mut thetas, mut grads) = (Vec::new(), Vec::new());
    for w in windows.clone() {
        let t: Vec<bf16> = w.clone().map(theta_at).collect();
        let g: Vec<bf16> = w.clone().map(grad_at).collect();
        s.memcpy_htod(&t, &mut td.slice_mut(off + w.start..off + w.end))
            .unwrap();
        s.memcpy_htod(&g, &mut gd.slice_mut(off + w.start..off + w.end))
            .unwrap();
        thetas.push(t);
        grads.push(g);
    }
    let d = s.clone_htod(&[0.3f32]).unwrap();
    let views = [TensorViews::<bf16, bf16> {
        param: td.slice(off..),
        grad: gd.slice(off..),
        backup: Some(bd.slice(off..)),
        master: None,
        out: None,
    }];
    let mut group = ParamGroup::new(&gpu, &views).unwrap();
    let opts = PerturbOptions {
        geometry: Geometry::Sam,
        radius: Radius::TrustRegion { delta: 0.5 },
        inv_scale: 1.0,
        mode: PerturbMode::InPlace,
    };
    let st = step(&gpu, &mut group, opts, &d);
    // Zeros elsewhere add nothing to the norm.
    let t_refs: Vec<&[bf16]> = thetas.iter().map(|t| t.as_slice()).collect();
    let g_refs: Vec<Option<&[bf16]>> = grads.iter().map(|g| Some(g.as_slice())).collect();
    let cpu = cpu_norm(&t_refs, &g_refs, Geometry::Sam, 1.0).unwrap();
    assert!(
        ((st.norm - cpu.norm) / cpu.norm).abs() <= 1e-6,
        "{} vs {}",
        st.norm,
        cpu.norm
    );
    assert!(st.perturb_status().applied());
    for (k, w) in windows.iter().enumerate() {
        let got = s.clone_dtoh(&td.slice(off + w.start..off + w.end)).unwrap();
        let saved = s.clone_dtoh(&bd.slice(off + w.start..off + w.end)).unwrap();
        for (j, i) in w.clone().enumerate() {
            let eps = st.coef * grads[k][j].to_f64();
            check_value(got[j], thetas[k][j].to_f64(), eps, &|| {
                format!("element {i}")
            });
            assert_eq!(saved[j].to_bits(), thetas[k][j].to_bits(), "backup {i}");
        }
    }
    // Between the windows θ stays 0 (ε = 0 there) and the backup holds it.
    for i in [100_000usize, 1 << 30, (1 << 31) - 200_000] {
        let got = s.clone_dtoh(&td.slice(off + i..off + i + 8)).unwrap();
        let saved = s.clone_dtoh(&bd.slice(off + i..off + i + 8)).unwrap();
        assert!(
            got.iter().chain(&saved).all(|v| v.to_bits() == 0),
            "element {i}"
        );
    }
    restore(&gpu, &group).unwrap();
    for (k, w) in windows.iter().enumerate() {
        let got = s.clone_dtoh(&td.slice(off + w.start..off + w.end)).unwrap();
        assert_eq!(bits(&got), bits(&thetas[k]));
    }
}

#[test]
fn device_radius_matches_the_by_value_radius() {
    let gpu = gpu_or_skip!();
    let case = Case::<f32, f32>::random(5400, &SIZES, 1e-2, true);
    for (k, radius) in [Radius::TrustRegion { delta: 0.7 }, Radius::Fixed(0.05)]
        .into_iter()
        .enumerate()
    {
        let opts = PerturbOptions {
            geometry: Geometry::Fisher { eta: 0.5 },
            radius,
            inv_scale: 1.0,
            mode: PerturbMode::InPlace,
        };
        let by_value = run_mode(&gpu, &case, opts, 0.3);
        let dev = Dev::upload(&gpu, &case);
        let d = gpu.stream().clone_htod(&[0.3f32]).unwrap();
        let mut group = dev.group(&gpu, Layout::Backup, &case.has_grad);
        // Built with another value, then set: the launch reads the slot.
        let wrong = match radius {
            Radius::Fixed(_) => Radius::Fixed(9.0),
            Radius::TrustRegion { .. } => Radius::TrustRegion { delta: 9.0 },
        };
        let mut slot = DeviceRadius::new(&gpu, wrong).unwrap();
        let value = match radius {
            Radius::Fixed(r) => r,
            Radius::TrustRegion { delta } => delta,
        };
        slot.set_value(&gpu, value).unwrap();
        assert_eq!(slot.radius(), radius);
        poison_state(&gpu, &mut group);
        let norm = NormOptions {
            geometry: opts.geometry,
            inv_scale: 1.0,
        };
        grad_norm(&gpu, &group, norm).unwrap();
        // `opts.radius` is ignored: the kind and value come from the slot.
        let ignored = PerturbOptions {
            radius: Radius::Fixed(123.0),
            ..opts
        };
        perturb_device(&gpu, &group, ignored, &slot, Some(&d.as_view())).unwrap();
        let st = group.read_state().unwrap();
        assert!(st.perturb_status().applied(), "case {k}: {st:?}");
        assert_eq!(bytemuck::bytes_of(&st), bytemuck::bytes_of(&by_value.state));
        for i in 0..SIZES.len() {
            assert_eq!(
                bits(&dev.theta[i].read(gpu.stream())),
                bits(&by_value.theta[i])
            );
            assert_eq!(bits(&dev.aux[i].read(gpu.stream())), bits(&by_value.aux[i]));
        }
    }
}

/// Gradients near 1e20 (for f16: scaled gradients, through `inv_scale`): the
/// norm overflows f32 terms and the coefficients are tiny, yet every mode and
/// geometry gives what the CPU reference gives, within the documented bound.
fn check_huge<P, G>(gpu: &CudaBackend, seed: u64, grad_scale: f64, inv_scale: f32)
where
    P: Element + cudarc::driver::DeviceRepr,
    G: Element + cudarc::driver::DeviceRepr,
{
    for mode in ALL_MODES {
        for (k, geo) in GEOMETRIES.into_iter().enumerate() {
            let mut case = Case::<P, G>::random(seed + k as u64, &SIZES, grad_scale, true);
            // Some θ exactly 0, where θ + ε is ε itself and every digit shows.
            for t in case.theta.iter_mut() {
                for x in t.iter_mut().step_by(5) {
                    *x = P::from_f64(0.0);
                }
            }
            for m in case.master.iter_mut() {
                m.iter_mut().step_by(5).for_each(|x| *x = 0.0);
            }
            // A usual radius, and a tiny one whose coefficient ρ/N is below
            // f32's normal range (SAM then works in f64; for f16/bf16 the
            // adaptive f32 coefficient keeps more digits than their outputs).
            for (radius, d) in [
                (Radius::TrustRegion { delta: 0.5 }, 0.3f32),
                (Radius::Fixed(1e-20), f32::NAN),
            ] {
                let opts = PerturbOptions {
                    geometry: geo,
                    radius,
                    inv_scale,
                    mode,
                };
                let out = run_mode(gpu, &case, opts, d);
                check_applied(&case, opts, d, &out);
            }
        }
    }
}

#[test]
fn huge_gradients_perturb_as_the_cpu() {
    let gpu = gpu_or_skip!();
    check_huge::<f32, f32>(&gpu, 6000, 1e20, 1.0);
    check_huge::<bf16, bf16>(&gpu, 6100, 1e20, 1.0);
    check_huge::<bf16, f32>(&gpu, 6200, 1e20, 1.0);
    check_huge::<f16, f16>(&gpu, 6300, 1e3, 1e17);
}

/// θ + ε that overflows the parameter type (θ = f32::MAX, bf16 3e38, f16
/// 65504, pushed outward) reports OVERFLOW with APPLIED, as the CPU reference
/// does, in every mode and geometry; restore still gives θ back bit for bit
/// (checked by `run_mode`), and a small radius on the same group does not.
fn check_overflow<P, G>(gpu: &CudaBackend, seed: u64, big: f64)
where
    P: Element + cudarc::driver::DeviceRepr,
    G: Element + cudarc::driver::DeviceRepr,
{
    use tram_kernels::cpu::perturb as cpu;
    for mode in ALL_MODES {
        for geo in GEOMETRIES {
            for sign in [1.0, -1.0] {
                let mut case = Case::<P, G>::random(seed, &SIZES[..8], 1e-3, false);
                case.theta[3][3] = P::from_f64(sign * big);
                case.master[3][3] = (sign * big) as f32;
                case.grad[3][3] = G::from_f64(sign);
                let what = format!("{:?}/{:?} {mode:?} {geo:?} sign {sign}", P::DTYPE, G::DTYPE);
                for (radius, d, overflows) in [
                    (Radius::TrustRegion { delta: 2.0 }, big as f32, true),
                    (Radius::Fixed(1e-9), f32::NAN, false),
                ] {
                    let opts = PerturbOptions {
                        geometry: geo,
                        radius,
                        inv_scale: 1.0,
                        mode,
                    };
                    let out = run_mode(gpu, &case, opts, d);
                    // The CPU reference on the same inputs and path.
                    let grads = case.grads();
                    let mut cpu_out: Vec<Vec<P>> = case
                        .theta
                        .iter()
                        .map(|t| vec![P::default(); t.len()])
                        .collect();
                    let mut outs: Vec<&mut [P]> =
                        cpu_out.iter_mut().map(|v| v.as_mut_slice()).collect();
                    let rep = match mode {
                        PerturbMode::Master => cpu::perturb_master(
                            &case.masters(),
                            &grads,
                            &mut outs,
                            geo,
                            radius,
                            d,
                            1.0,
                        ),
                        _ => cpu::perturb_out_of_place(
                            &case.thetas(),
                            &grads,
                            &mut outs,
                            geo,
                            radius,
                            d,
                            1.0,
                        ),
                    }
                    .unwrap();
                    let want = PerturbStatus(
                        PerturbStatus::APPLIED
                            | if overflows {
                                PerturbStatus::OVERFLOW
                            } else {
                                0
                            },
                    );
                    assert_eq!(rep.status, want, "{what}: CPU");
                    assert_eq!(out.state.perturb_status(), want, "{what}: GPU");
                    if overflows {
                        let written = match mode {
                            PerturbMode::OutOfPlace => &out.aux[3][3],
                            _ => &out.theta[3][3],
                        };
                        assert_eq!(written.to_f64(), sign * f64::INFINITY, "{what}");
                    }
                }
            }
        }
    }
}

#[test]
fn overflow_to_inf_is_reported_as_on_the_cpu() {
    let gpu = gpu_or_skip!();
    check_overflow::<f32, f32>(&gpu, 6400, f32::MAX as f64);
    check_overflow::<bf16, bf16>(&gpu, 6500, 3e38);
    check_overflow::<bf16, f32>(&gpu, 6600, 3e38);
    check_overflow::<f16, f16>(&gpu, 6700, 65504.0);
}
