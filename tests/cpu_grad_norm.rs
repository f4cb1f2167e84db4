//! The CPU gradient norm against a compensated f64 oracle, on seeded random
//! groups of mixed sizes, every geometry and dtype combination.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tram_kernels::cpu::grad_norm::{grad_norm, NormOutput, REL_ERROR_BOUND};
use tram_kernels::{bf16, f16, Element, Error, Geometry};

const SIZES: [usize; 9] = [0, 1, 7, 8, 513, 4099, 65_536, 65_537, (1 << 20) + 3];

const GEOMETRIES: [Geometry; 4] = [
    Geometry::Sam,
    Geometry::Adaptive { eta: 0.01 },
    Geometry::Adaptive { eta: 0.0 },
    Geometry::Fisher { eta: 0.5 },
];

/// Non-zero values with random sign and magnitude in [2^-lo, 2^hi) · scale.
fn rand_vec<T: Element>(rng: &mut SmallRng, n: usize, scale: f64) -> Vec<T> {
    (0..n)
        .map(|_| {
            let mag = scale * 2f64.powf(rng.random_range(-6.0..2.0));
            let v = if rng.random::<bool>() { mag } else { -mag };
            T::from_f64(v)
        })
        .collect()
}

struct Group<P, G> {
    params: Vec<Vec<P>>,
    grads: Vec<Option<Vec<G>>>,
}

impl<P: Element, G: Element> Group<P, G> {
    /// Tensors of every size in `sizes`, every third one without a gradient.
    fn random(rng: &mut SmallRng, sizes: &[usize], grad_scale: f64) -> Self {
        let mut params = Vec::new();
        let mut grads = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            params.push(rand_vec::<P>(rng, n, 1.0));
            grads.push((i % 3 != 2).then(|| rand_vec::<G>(rng, n, grad_scale)));
        }
        Self { params, grads }
    }
    fn p(&self) -> Vec<&[P]> {
        self.params.iter().map(|v| v.as_slice()).collect()
    }
    fn g(&self) -> Vec<Option<&[G]>> {
        self.grads.iter().map(|g| g.as_deref()).collect()
    }
}

/// Error-free product x·x = hi + lo.
fn two_square(x: f64) -> (f64, f64) {
    let hi = x * x;
    (hi, x.mul_add(x, -hi))
}

/// Double-double accumulator (hi, lo), add one f64 exactly up to 2^-106.
fn dd_add(acc: &mut (f64, f64), x: f64) {
    let s = acc.0 + x;
    let bp = s - acc.0;
    let err = (acc.0 - (s - bp)) + (x - bp);
    let lo = acc.1 + err;
    let hi = s + lo;
    acc.1 = lo - (hi - s);
    acc.0 = hi;
}

/// The oracle: SAM terms exact (s·g is exact, the square split in two), other
/// geometries' terms in plain f64 (≤ 6 roundings), summed in double-double.
fn oracle<P: Element, G: Element>(
    params: &[&[P]],
    grads: &[Option<&[G]>],
    geometry: Geometry,
    inv_scale: f32,
) -> f64 {
    let s = inv_scale as f64;
    let mut acc = (0.0, 0.0);
    for (p, g) in params.iter().zip(grads) {
        let Some(g) = g else { continue };
        for (t, gv) in p.iter().zip(g.iter()) {
            let x = s * gv.to_f64();
            match geometry {
                Geometry::Sam => {
                    let (hi, lo) = two_square(x);
                    dd_add(&mut acc, hi);
                    dd_add(&mut acc, lo);
                }
                Geometry::Adaptive { eta } => {
                    let a = (t.to_f64().abs() + eta as f64) * x;
                    dd_add(&mut acc, a * a);
                }
                Geometry::Fisher { eta } => {
                    dd_add(&mut acc, x * x / (1.0 + eta as f64 * x * x));
                }
            }
        }
    }
    acc.0 + acc.1
}

fn rel(a: f64, b: f64) -> f64 {
    if a == b {
        0.0
    } else {
        (a - b).abs() / b.abs()
    }
}

fn check_accuracy<P: Element, G: Element>(seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    for geometry in GEOMETRIES {
        let group = Group::<P, G>::random(&mut rng, &SIZES, 1.0);
        let (p, g) = (group.p(), group.g());
        for inv_scale in [1.0f32, 0.37] {
            let out = grad_norm(&p, &g, geometry, inv_scale).unwrap();
            let want = oracle(&p, &g, geometry, inv_scale);
            assert!(want > 0.0);
            assert!(!out.found_inf);
            let (es, en) = (rel(out.sum_sq, want), rel(out.norm, want.sqrt()));
            assert!(
                es <= REL_ERROR_BOUND && en <= REL_ERROR_BOUND,
                "{:?}/{:?} {geometry:?} s={inv_scale}: sum_sq rel err {es:e}, norm {en:e}",
                P::DTYPE,
                G::DTYPE
            );
            assert_eq!(out.norm, out.sum_sq.sqrt());
        }
    }
}

#[test]
fn accuracy_f32_f32() {
    check_accuracy::<f32, f32>(1);
}
#[test]
fn accuracy_f16_f16() {
    check_accuracy::<f16, f16>(2);
}
#[test]
fn accuracy_bf16_bf16() {
    check_accuracy::<bf16, bf16>(3);
}
#[test]
fn accuracy_bf16_f32() {
    check_accuracy::<bf16, f32>(4);
}

/// A loss-scaled gradient with the matching inverse scale gives the same norm
/// bit for bit (power-of-two scales are exact).
fn check_loss_scale<P: Element, G: Element>(scale: f64, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    for geometry in GEOMETRIES {
        let group = Group::<P, G>::random(&mut rng, &[1, 1000, 70_001], 1.0);
        let scaled: Vec<Option<Vec<G>>> = group
            .grads
            .iter()
            .map(|g| {
                g.as_ref()
                    .map(|g| g.iter().map(|x| G::from_f64(x.to_f64() * scale)).collect())
            })
            .collect();
        let sg: Vec<Option<&[G]>> = scaled.iter().map(|g| g.as_deref()).collect();
        let a = grad_norm(&group.p(), &group.g(), geometry, 1.0).unwrap();
        let b = grad_norm(&group.p(), &sg, geometry, (1.0 / scale) as f32).unwrap();
        assert_eq!(a.norm.to_bits(), b.norm.to_bits(), "{geometry:?}");
        assert!(a.norm > 0.0);
    }
}

#[test]
fn loss_scaled_gradients() {
    check_loss_scale::<f32, f32>(65536.0, 10);
    check_loss_scale::<bf16, bf16>(65536.0, 11);
    check_loss_scale::<bf16, f32>(1024.0, 12);
    // f16 overflows at 65504: values below 4 times 2^12 stay finite.
    check_loss_scale::<f16, f16>(4096.0, 13);
}

/// None gradients are skipped: the same norm as without those tensors, bit for bit.
#[test]
fn none_gradients_are_skipped() {
    let mut rng = SmallRng::seed_from_u64(20);
    let group = Group::<f32, f32>::random(&mut rng, &[5, 300_000, 17, 1, 90_000, 3], 1.0);
    assert!(group.grads.iter().any(|g| g.is_none()));
    let (p, g) = (group.p(), group.g());
    let kept: Vec<usize> = (0..p.len()).filter(|&i| g[i].is_some()).collect();
    let p2: Vec<&[f32]> = kept.iter().map(|&i| p[i]).collect();
    let g2: Vec<Option<&[f32]>> = kept.iter().map(|&i| g[i]).collect();
    for geometry in GEOMETRIES {
        let a = grad_norm(&p, &g, geometry, 1.0).unwrap();
        let b = grad_norm(&p2, &g2, geometry, 1.0).unwrap();
        assert_eq!(a.sum_sq.to_bits(), b.sum_sq.to_bits());
    }
    // Only None gradients (or only empty tensors): a zero norm, not an error.
    let none: Vec<Option<&[f32]>> = vec![None; p.len()];
    let z = grad_norm(&p, &none, Geometry::Sam, 1.0).unwrap();
    assert_eq!((z.sum_sq, z.norm, z.found_inf), (0.0, 0.0, false));
    let empty: [&[f32]; 2] = [&[], &[]];
    let z = grad_norm::<f32, f32>(&empty, &[Some(&[]), Some(&[])], Geometry::Sam, 1.0).unwrap();
    assert_eq!(z.norm, 0.0);
}

fn check_nonfinite<P: Element, G: Element>(bad: f64) {
    let mut rng = SmallRng::seed_from_u64(30);
    let mut group = Group::<P, G>::random(&mut rng, &[100, 200_000, 10], 1.0);
    group.grads[1].as_mut().unwrap()[123_456] = G::from_f64(bad);
    for geometry in GEOMETRIES {
        let out = grad_norm(&group.p(), &group.g(), geometry, 1.0).unwrap();
        assert!(out.found_inf, "{geometry:?} {bad}");
        assert!(!out.norm.is_finite() && !out.sum_sq.is_finite());
    }
}

/// A non-finite θ is not a gradient overflow: only the adaptive norm reads θ.
#[test]
fn nonfinite_theta_is_not_found_inf() {
    let mut rng = SmallRng::seed_from_u64(31);
    let mut group = Group::<f32, f32>::random(&mut rng, &[100, 70_000], 1.0);
    group.params[1][69_999] = f32::INFINITY;
    for geometry in GEOMETRIES {
        let out = grad_norm(&group.p(), &group.g(), geometry, 1.0).unwrap();
        assert!(!out.found_inf);
        let adaptive = matches!(geometry, Geometry::Adaptive { .. });
        assert_eq!(out.norm.is_finite(), !adaptive, "{geometry:?}");
    }
}

#[test]
fn nonfinite_gradient_is_found() {
    for bad in [f64::INFINITY, f64::NEG_INFINITY, f64::NAN] {
        check_nonfinite::<f32, f32>(bad);
        check_nonfinite::<f16, f16>(bad);
        check_nonfinite::<bf16, bf16>(bad);
        check_nonfinite::<bf16, f32>(bad);
    }
}

/// The result does not depend on the rayon thread count.
#[test]
fn deterministic_across_thread_counts() {
    let mut rng = SmallRng::seed_from_u64(40);
    let group = Group::<bf16, f32>::random(&mut rng, &[(1 << 20) + 3, 777, 300_001], 1.0);
    let (p, g) = (group.p(), group.g());
    for geometry in GEOMETRIES {
        let run = |threads: usize| -> NormOutput {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| grad_norm(&p, &g, geometry, 0.5).unwrap())
        };
        let default = grad_norm(&p, &g, geometry, 0.5).unwrap();
        for threads in [1, 3, 8] {
            assert_eq!(run(threads).sum_sq.to_bits(), default.sum_sq.to_bits());
        }
    }
}

fn invalid(r: tram_kernels::Result<NormOutput>) -> bool {
    matches!(r, Err(Error::InvalidArgument(_)))
}

#[test]
fn bad_input_is_an_error() {
    let a = [1.0f32, 2.0, 3.0];
    let b = [0.5f32, 0.25];
    let g = Geometry::Sam;
    // Empty group.
    assert!(invalid(grad_norm::<f32, f32>(&[], &[], g, 1.0)));
    // Gradient count differs from tensor count.
    assert!(invalid(grad_norm::<f32, f32>(&[&a], &[], g, 1.0)));
    assert!(invalid(grad_norm(&[&a[..]], &[Some(&a[..]), None], g, 1.0)));
    // Gradient length differs from its tensor's.
    assert!(invalid(grad_norm(&[&a[..]], &[Some(&b[..])], g, 1.0)));
    assert!(invalid(grad_norm(
        &[&a[..], &a[..]],
        &[Some(&a[..]), Some(&a[..2])],
        g,
        1.0
    )));
    // Bad inverse scale or eta.
    for s in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert!(invalid(grad_norm(&[&a[..]], &[Some(&a[..])], g, s)));
    }
    for eta in [-0.1, f32::NAN, f32::INFINITY] {
        for geo in [Geometry::Adaptive { eta }, Geometry::Fisher { eta }] {
            assert!(invalid(grad_norm(&[&a[..]], &[Some(&a[..])], geo, 1.0)));
        }
    }
    // And the valid call next to them works.
    let ok = grad_norm(&[&a[..]], &[Some(&a[..])], g, 1.0).unwrap();
    assert_eq!(ok.sum_sq, 14.0);
}
