//! The multi-tensor gradient norm on the GPU against the CPU reference:
//! random groups of mixed sizes (sub-slices off the vector alignment, tensors
//! without a gradient), every geometry and dtype pair, the documented 1e-6
//! relative bound, run-to-run bit identity, non-finite gradients, the
//! sharded finish, and groups up to 2^28 elements when the device has room.

mod common;
mod multi_tensor;

use multi_tensor::{hashed, Case, Dev, Layout, SIZES};
use rayon::prelude::*;
use tram_kernels::cpu::grad_norm::{grad_norm as cpu_norm, NormOutput};
use tram_kernels::cuda::grad_norm::{finish, grad_norm, NormOptions};
use tram_kernels::cuda::group::{NormState, ParamGroup};
use tram_kernels::cuda::CudaBackend;
use tram_kernels::{bf16, f16, Element, Error, Geometry};

/// The documented bound of the GPU norm (the kernel's header derives < 4e-7).
const NORM_REL: f64 = 1e-6;

const GEOMETRIES: [Geometry; 3] = [
    Geometry::Sam,
    Geometry::Adaptive { eta: 0.01 },
    Geometry::Fisher { eta: 0.5 },
];

fn rel(got: f64, want: f64) -> f64 {
    ((got - want) / want).abs()
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

/// Poisons the state, runs the norm, reads the state back.
fn run(gpu: &CudaBackend, group: &mut ParamGroup<'_>, opts: NormOptions) -> NormState {
    poison_state(gpu, group);
    grad_norm(gpu, group, opts).unwrap();
    group.read_state().unwrap()
}

fn assert_close(st: &NormState, want: &NormOutput, what: &str) {
    assert!(
        want.norm > 0.0 && want.norm.is_finite(),
        "{what}: test data"
    );
    assert!(
        rel(st.norm, want.norm) <= NORM_REL,
        "{what}: norm {} vs CPU {} (rel {:e})",
        st.norm,
        want.norm,
        rel(st.norm, want.norm)
    );
    assert!(
        rel(st.sum_sq, want.sum_sq) <= 2.0 * NORM_REL,
        "{what}: sum_sq {} vs CPU {}",
        st.sum_sq,
        want.sum_sq
    );
    assert_eq!(st.norm.to_bits(), st.sum_sq.sqrt().to_bits(), "{what}");
    assert_eq!(st.found_inf, 0, "{what}");
}

fn check_pair<P, G>(gpu: &CudaBackend, seed: u64, layout: Layout)
where
    P: Element + cudarc::driver::DeviceRepr,
    G: Element + cudarc::driver::DeviceRepr,
{
    for (k, geo) in GEOMETRIES.into_iter().enumerate() {
        // Without and with a loss scale (gradients stored scaled by 1024).
        for (scale, inv_scale) in [(1.0, 1.0f32), (1024.0, 1.0 / 1024.0)] {
            let case = Case::<P, G>::random(seed + k as u64, &SIZES, 1e-2 * scale, true);
            let dev = Dev::upload(gpu, &case);
            let mut group = dev.group(gpu, layout, &case.has_grad);
            let opts = NormOptions {
                geometry: geo,
                inv_scale,
            };
            // With master weights the adaptive norm reads θ from the master.
            let want = if layout == Layout::Master {
                cpu_norm(&case.masters(), &case.grads(), geo, inv_scale).unwrap()
            } else {
                cpu_norm(&case.thetas(), &case.grads(), geo, inv_scale).unwrap()
            };
            let what = format!(
                "{:?}/{:?} {geo:?} s={inv_scale} {layout:?}",
                P::DTYPE,
                G::DTYPE
            );
            let first = run(gpu, &mut group, opts);
            assert_close(&first, &want, &what);
            let second = run(gpu, &mut group, opts);
            assert_eq!(
                bytemuck::bytes_of(&first),
                bytemuck::bytes_of(&second),
                "{what}: two runs differ"
            );
        }
    }
}

#[test]
fn norm_matches_cpu_for_every_dtype_and_geometry() {
    let gpu = gpu_or_skip!();
    check_pair::<f32, f32>(&gpu, 10, Layout::Plain);
    check_pair::<f16, f16>(&gpu, 20, Layout::Plain);
    check_pair::<bf16, bf16>(&gpu, 30, Layout::Plain);
    check_pair::<bf16, f32>(&gpu, 40, Layout::Plain);
    // θ from f32 master weights: the (f32, g) kernels.
    check_pair::<bf16, f32>(&gpu, 50, Layout::Master);
    check_pair::<bf16, bf16>(&gpu, 60, Layout::Master);
    check_pair::<f16, f16>(&gpu, 70, Layout::Master);
}

#[test]
fn toggling_gradients_matches_cpu_without_rebuilding() {
    let gpu = gpu_or_skip!();
    let mut case = Case::<f32, f32>::random(80, &SIZES, 1e-2, false);
    let dev = Dev::upload(&gpu, &case);
    let mut group = dev.group(&gpu, Layout::Plain, &case.has_grad);
    let opts = NormOptions::default();
    let patterns: [Vec<bool>; 3] = [
        (0..SIZES.len()).map(|i| i % 2 == 0).collect(),
        (0..SIZES.len()).map(|i| i == 10).collect(),
        vec![true; SIZES.len()],
    ];
    for flags in patterns {
        case.has_grad = flags.clone();
        group.set_has_grad(&flags).unwrap();
        let want = cpu_norm(&case.thetas(), &case.grads(), Geometry::Sam, 1.0).unwrap();
        let st = run(&gpu, &mut group, opts);
        assert_close(&st, &want, &format!("{flags:?}"));
    }
    // No tensor with a gradient: a zero norm, not an error.
    group.set_has_grad(&[false; SIZES.len()]).unwrap();
    let st = run(&gpu, &mut group, opts);
    assert_eq!((st.sum_sq, st.norm, st.found_inf), (0.0, 0.0, 0));
    assert!(group.set_has_grad(&[true; 3]).is_err());
}

#[test]
fn nonfinite_gradients_are_found() {
    let gpu = gpu_or_skip!();
    for (bad, geo) in [
        (f32::NAN, Geometry::Sam),
        (f32::INFINITY, Geometry::Adaptive { eta: 0.1 }),
        (f32::NEG_INFINITY, Geometry::Fisher { eta: 0.5 }),
    ] {
        let mut case = Case::<bf16, f32>::random(90, &SIZES, 1e-2, true);
        // In an active tensor: found. In one without a gradient: ignored.
        case.grad[9][777] = bad;
        case.grad[1][3] = f32::NAN;
        assert!(case.has_grad[9] && !case.has_grad[1]);
        let dev = Dev::upload(&gpu, &case);
        let mut group = dev.group(&gpu, Layout::Plain, &case.has_grad);
        let st = run(
            &gpu,
            &mut group,
            NormOptions {
                geometry: geo,
                inv_scale: 1.0,
            },
        );
        let want = cpu_norm(&case.thetas(), &case.grads(), geo, 1.0).unwrap();
        assert!(want.found_inf);
        assert_eq!(st.found_inf, 1, "{bad} {geo:?}");
        assert!(!st.norm.is_finite() && !st.sum_sq.is_finite());

        case.has_grad[9] = false;
        group.set_has_grad(&case.has_grad).unwrap();
        let st = run(
            &gpu,
            &mut group,
            NormOptions {
                geometry: geo,
                inv_scale: 1.0,
            },
        );
        assert_eq!(
            st.found_inf, 0,
            "{geo:?}: the bad tensor has no gradient now"
        );
        let want = cpu_norm(&case.thetas(), &case.grads(), geo, 1.0).unwrap();
        assert_close(&st, &want, "bad tensor skipped");
    }
}

#[test]
fn found_inf_looks_at_gradients_only() {
    let gpu = gpu_or_skip!();
    // A non-finite θ under the adaptive geometry: the norm is not finite, but
    // no gradient is (as the CPU reference reports it).
    let mut case = Case::<f32, f32>::random(95, &SIZES, 1e-2, true);
    // Tensor 9 has a gradient (every third tensor from 1 on has none).
    assert!(case.has_grad[9]);
    case.theta[9][5] = f32::INFINITY;
    let dev = Dev::upload(&gpu, &case);
    let mut group = dev.group(&gpu, Layout::Plain, &case.has_grad);
    let geo = Geometry::Adaptive { eta: 0.01 };
    let opts = NormOptions {
        geometry: geo,
        inv_scale: 1.0,
    };
    let st = run(&gpu, &mut group, opts);
    let want = cpu_norm(&case.thetas(), &case.grads(), geo, 1.0).unwrap();
    assert!(!want.norm.is_finite() && !want.found_inf);
    assert!(!st.norm.is_finite());
    assert_eq!(st.found_inf, 0);
    // SAM ignores θ: finite again.
    let st = run(&gpu, &mut group, NormOptions::default());
    let want = cpu_norm(&case.thetas(), &case.grads(), Geometry::Sam, 1.0).unwrap();
    assert_close(&st, &want, "SAM with an infinite θ");
}

#[test]
fn finish_takes_the_norm_of_an_all_reduced_sum() {
    let gpu = gpu_or_skip!();
    let case = Case::<f32, f32>::random(100, &SIZES[..6], 1e-2, false);
    let dev = Dev::upload(&gpu, &case);
    let mut group = dev.group(&gpu, Layout::Plain, &case.has_grad);
    let mut st = run(&gpu, &mut group, NormOptions::default());
    // What an all-reduce over 3 identical ranks would leave, then the finish.
    st.sum_sq *= 3.0;
    st.norm = f64::NAN;
    gpu.stream().memcpy_htod(&[st], group.state_mut()).unwrap();
    finish(&gpu, &group).unwrap();
    let done = group.read_state().unwrap();
    assert_eq!(done.sum_sq, st.sum_sq);
    assert_eq!(done.norm.to_bits(), st.sum_sq.sqrt().to_bits());
    assert_eq!(done.found_inf, 0);
    st.sum_sq = f64::INFINITY;
    gpu.stream().memcpy_htod(&[st], group.state_mut()).unwrap();
    finish(&gpu, &group).unwrap();
    assert_eq!(group.read_state().unwrap().found_inf, 1);
}

#[test]
fn bad_options_are_errors() {
    let gpu = gpu_or_skip!();
    let case = Case::<f32, f32>::random(110, &SIZES[..3], 1e-2, false);
    let dev = Dev::upload(&gpu, &case);
    let group = dev.group(&gpu, Layout::Plain, &case.has_grad);
    for opts in [
        NormOptions {
            geometry: Geometry::Sam,
            inv_scale: 0.0,
        },
        NormOptions {
            geometry: Geometry::Sam,
            inv_scale: f32::NAN,
        },
        NormOptions {
            geometry: Geometry::Fisher { eta: -1.0 },
            inv_scale: 1.0,
        },
        NormOptions {
            geometry: Geometry::Adaptive { eta: f32::INFINITY },
            inv_scale: 1.0,
        },
    ] {
        assert!(matches!(
            grad_norm(&gpu, &group, opts),
            Err(Error::InvalidArgument(_))
        ));
    }
}

/// Fast reproducible values without a serial generator: a hash of the index.
#[test]
fn large_groups_hold_the_bound_up_to_2_pow_28() {
    let gpu = gpu_or_skip!();
    let n_max = (1usize << 28) + 5;
    // θ and g in f32, and room for the group's tables.
    if !common::device_has(&gpu, n_max * 4 * 2 + (64 << 20), "the 2^28-element norm") {
        return;
    }
    for (n, geo) in [
        ((1usize << 24) + 1, Geometry::Sam),
        ((1 << 26) - 3, Geometry::Fisher { eta: 0.5 }),
        (n_max, Geometry::Sam),
        (n_max, Geometry::Adaptive { eta: 0.01 }),
    ] {
        let g: Vec<f32> = (0..n as u64)
            .into_par_iter()
            .map(|i| hashed(i, 1) as f32 * 1e-2)
            .collect();
        let t: Vec<f32> = (0..n as u64)
            .into_par_iter()
            .map(|i| hashed(i, 2) as f32)
            .collect();
        // Two tensors: most of it, and an odd tail off the vector alignment.
        let cut = n - 12_345;
        let s = gpu.stream();
        let (td, gd) = (s.clone_htod(&t).unwrap(), s.clone_htod(&g).unwrap());
        let views = [
            tram_kernels::cuda::group::TensorViews::<f32, f32> {
                param: td.slice(..cut),
                grad: gd.slice(..cut),
                backup: None,
                master: None,
                out: None,
            },
            tram_kernels::cuda::group::TensorViews::<f32, f32> {
                param: td.slice(cut + 1..),
                grad: gd.slice(cut + 1..),
                backup: None,
                master: None,
                out: None,
            },
        ];
        let mut group = ParamGroup::new(&gpu, &views).unwrap();
        let opts = NormOptions {
            geometry: geo,
            inv_scale: 1.0,
        };
        let st = run(&gpu, &mut group, opts);
        let want = cpu_norm(
            &[&t[..cut], &t[cut + 1..]],
            &[Some(&g[..cut]), Some(&g[cut + 1..])],
            geo,
            1.0,
        )
        .unwrap();
        assert_close(&st, &want, &format!("n = {n} {geo:?}"));
        let again = run(&gpu, &mut group, opts);
        assert_eq!(st.sum_sq.to_bits(), again.sum_sq.to_bits());
    }
}

/// Gradients near 1e20 (and, for f16, scaled gradients near 1e20 through
/// `inv_scale`): an f32 term overflows, but the norm is the finite one the CPU
/// reference returns, in every geometry, with `found_inf` 0, bit-identical
/// from run to run. Some tensors huge, the others ordinary, so that only some
/// runs overflow.
fn check_huge<P, G>(gpu: &CudaBackend, seed: u64, grad_scale: f64, inv_scale: f32, layout: Layout)
where
    P: Element + cudarc::driver::DeviceRepr,
    G: Element + cudarc::driver::DeviceRepr,
{
    for geo in GEOMETRIES {
        let mut case = Case::<P, G>::random(seed, &SIZES, grad_scale, true);
        let ordinary = Case::<P, G>::random(seed + 1, &SIZES, 1e-2, true);
        for i in [0, 3, 9] {
            case.grad[i] = ordinary.grad[i].clone();
        }
        let dev = Dev::upload(gpu, &case);
        let mut group = dev.group(gpu, layout, &case.has_grad);
        let opts = NormOptions {
            geometry: geo,
            inv_scale,
        };
        let want = if layout == Layout::Master {
            cpu_norm(&case.masters(), &case.grads(), geo, inv_scale).unwrap()
        } else {
            cpu_norm(&case.thetas(), &case.grads(), geo, inv_scale).unwrap()
        };
        let what = format!(
            "huge {:?}/{:?} {geo:?} s={inv_scale} {layout:?}",
            P::DTYPE,
            G::DTYPE
        );
        // The test's premise: an f32 square of the largest scaled gradient overflows.
        let max_g = case
            .grads()
            .iter()
            .flatten()
            .flat_map(|g| g.iter())
            .fold(0.0f64, |m, x| m.max((x.to_f64() * inv_scale as f64).abs()));
        assert!(((max_g * max_g) as f32).is_infinite(), "{what}: test data");
        assert!(
            want.norm.is_finite() && !want.found_inf,
            "{what}: CPU {want:?}"
        );
        let first = run(gpu, &mut group, opts);
        assert_close(&first, &want, &what);
        let second = run(gpu, &mut group, opts);
        assert_eq!(
            bytemuck::bytes_of(&first),
            bytemuck::bytes_of(&second),
            "{what}: two runs differ"
        );
    }
}

#[test]
fn huge_gradients_give_the_cpu_norm() {
    let gpu = gpu_or_skip!();
    check_huge::<f32, f32>(&gpu, 400, 1e20, 1.0, Layout::Plain);
    check_huge::<bf16, bf16>(&gpu, 410, 1e20, 1.0, Layout::Plain);
    check_huge::<bf16, f32>(&gpu, 420, 1e20, 1.0, Layout::Plain);
    check_huge::<bf16, f32>(&gpu, 430, 1e20, 1.0, Layout::Master);
    // f16 cannot hold 1e20: the inverse loss scale makes g' that large.
    check_huge::<f16, f16>(&gpu, 440, 1e3, 1e17, Layout::Plain);
    // An inf gradient among huge ones: found, and the norm is not finite.
    let mut case = Case::<f32, f32>::random(450, &SIZES, 1e20, true);
    case.grad[9][5] = f32::INFINITY;
    assert!(case.has_grad[9]);
    let dev = Dev::upload(&gpu, &case);
    let mut group = dev.group(&gpu, Layout::Plain, &case.has_grad);
    for geo in GEOMETRIES {
        let opts = NormOptions {
            geometry: geo,
            inv_scale: 1.0,
        };
        let st = run(&gpu, &mut group, opts);
        assert_eq!(st.found_inf, 1, "{geo:?}");
        assert!(!st.sum_sq.is_finite(), "{geo:?}");
    }
}
