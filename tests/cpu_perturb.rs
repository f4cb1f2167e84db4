//! The CPU perturbation (in place with backup, master weights, out of place) and
//! restore, against an independent f64 oracle on seeded random groups.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tram_kernels::cpu::grad_norm::grad_norm;
use tram_kernels::cpu::perturb::{
    perturb, perturb_master, perturb_master_with, perturb_out_of_place, perturb_out_of_place_with,
    perturb_with, perturbed_value, plan, radius_value, PerturbReport,
};
use tram_kernels::cpu::restore::restore;
use tram_kernels::{bf16, f16, Element, Error, Geometry, PerturbStatus, Radius};

const SIZES: [usize; 8] = [0, 1, 7, 513, 4099, 65_537, 3, (1 << 20) + 3];

const GEOMETRIES: [Geometry; 3] = [
    Geometry::Sam,
    Geometry::Adaptive { eta: 0.01 },
    Geometry::Fisher { eta: 0.5 },
];

fn rand_vec<T: Element>(rng: &mut SmallRng, n: usize, scale: f64) -> Vec<T> {
    (0..n)
        .map(|_| {
            let mag = scale * 2f64.powf(rng.random_range(-6.0..2.0));
            T::from_f64(if rng.random::<bool>() { mag } else { -mag })
        })
        .collect()
}

/// A value of `T` from its bit pattern (NaN payloads, −0.0, poison).
fn from_bits<T: Element>(bits: u32) -> T {
    match size_of::<T>() {
        4 => bytemuck::cast_slice::<u32, T>(&[bits])[0],
        _ => bytemuck::cast_slice::<u16, T>(&[bits as u16])[0],
    }
}

fn bits<T: Element>(v: &[T]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits_u32()).collect()
}

/// A NaN bit pattern that no computation here produces.
fn poison<T: Element>(n: usize) -> Vec<T> {
    let b = if size_of::<T>() == 4 {
        0x7fa5_a5a5
    } else {
        0x7da5
    };
    vec![from_bits(b); n]
}

struct Group<P, G> {
    params: Vec<Vec<P>>,
    grads: Vec<Option<Vec<G>>>,
}

impl<P: Element, G: Element> Group<P, G> {
    fn random(rng: &mut SmallRng, sizes: &[usize]) -> Self {
        let params = sizes.iter().map(|&n| rand_vec(rng, n, 1.0)).collect();
        let grads = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (i % 3 != 1).then(|| rand_vec(rng, n, 1e-2)))
            .collect();
        Self { params, grads }
    }
    fn p(&self) -> Vec<&[P]> {
        self.params.iter().map(|v| v.as_slice()).collect()
    }
    fn g(&self) -> Vec<Option<&[G]>> {
        self.grads.iter().map(|g| g.as_deref()).collect()
    }
}

fn muts<T>(v: &mut [Vec<T>]) -> Vec<&mut [T]> {
    v.iter_mut().map(|x| x.as_mut_slice()).collect()
}

fn zeros_like<T: Element>(v: &[Vec<T>]) -> Vec<Vec<T>> {
    v.iter().map(|x| poison(x.len())).collect()
}

/// The test's own f64 norm (plain compensated sum over the formulas of the docs).
fn oracle_norm<P: Element, G: Element>(
    p: &[&[P]],
    g: &[Option<&[G]>],
    geo: Geometry,
    s: f32,
) -> f64 {
    let (mut sum, mut comp) = (0.0f64, 0.0f64);
    for (t, gr) in p.iter().zip(g) {
        let Some(gr) = gr else { continue };
        for (t, gv) in t.iter().zip(gr.iter()) {
            let x = s as f64 * gv.to_f64();
            let term = match geo {
                Geometry::Sam => x * x,
                Geometry::Adaptive { eta } => ((t.to_f64().abs() + eta as f64) * x).powi(2),
                Geometry::Fisher { eta } => x * x / (1.0 + eta as f64 * x * x),
            };
            let y = term - comp;
            let tt = sum + y;
            comp = (tt - sum) - y;
            sum = tt;
        }
    }
    sum.sqrt()
}

/// The test's own ε of one element.
fn oracle_eps(t: f64, g: f64, geo: Geometry, s: f32, coef: f64) -> f64 {
    let x = s as f64 * g;
    coef * match geo {
        Geometry::Sam => x,
        Geometry::Adaptive { eta } => (t.abs() + eta as f64).powi(2) * x,
        Geometry::Fisher { eta } => x / (1.0 + eta as f64 * x * x),
    }
}

/// `got` is the rounding to `P` of some value within `tol` of `want`: rounding is
/// monotone, so it lies between the roundings of the two ends.
fn assert_rounded<P: Element>(got: P, want: f64, tol: f64, what: &str) {
    let (lo, hi) = (
        P::from_f64(want - tol).to_f64(),
        P::from_f64(want + tol).to_f64(),
    );
    let g = got.to_f64();
    assert!(
        lo <= g && g <= hi,
        "{what}: got {g:e}, want round({want:e} ± {tol:e}) in [{lo:e}, {hi:e}]"
    );
}

/// Checks the perturbed tensor against the oracle and against `perturbed_value`
/// (bit-exact: the public per-element helper is what the bulk path computes).
fn check_perturbed<T: Element, P: Element, G: Element>(
    theta: &[T],
    g: &[G],
    got: &[P],
    geo: Geometry,
    s: f32,
    report: &PerturbReport,
    oracle_coef: f64,
) {
    for k in 0..theta.len() {
        let (t, gv) = (theta[k].to_f64(), g[k].to_f64());
        let eps = oracle_eps(t, gv, geo, s, oracle_coef);
        // f64 error of θ + ε: the coefficient (≤ 1e-13 relative between the two
        // norms), ~8 roundings in ε, and one in the sum.
        let tol = 1e-13 * eps.abs() + 2f64.powi(-52) * (t + eps).abs();
        assert_rounded(got[k], t + eps, tol, &format!("{geo:?} element {k}"));
        let exact = P::from_f64(perturbed_value(t, gv, geo, s, report.coef));
        assert_eq!(got[k].to_bits_u32(), exact.to_bits_u32(), "element {k}");
    }
}

fn check_in_place<P: Element, G: Element>(seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    for geo in GEOMETRIES {
        for (radius, d) in [
            (Radius::Fixed(0.05), 0.0),
            (Radius::TrustRegion { delta: 0.5 }, 0.3),
        ] {
            let s = 0.25f32;
            let group = Group::<P, G>::random(&mut rng, &SIZES);
            let orig = group.params.clone();
            let mut params = group.params.clone();
            let mut backups = zeros_like(&params);
            let (p0, g) = (group.p(), group.g());
            let rep = perturb(
                &mut muts(&mut params),
                &g,
                &mut muts(&mut backups),
                geo,
                radius,
                d,
                s,
            )
            .unwrap();
            assert_eq!(rep.status, PerturbStatus(PerturbStatus::APPLIED));
            assert_eq!(rep.rho, radius_value(radius, d));
            if let Radius::TrustRegion { delta } = radius {
                assert_eq!(rep.rho, delta as f64 * d as f64);
            }
            let on = oracle_norm(&p0, &g, geo, s);
            assert!((rep.norm - on).abs() <= 1e-13 * on);
            let oc = rep.rho / (on + 1e-12);
            for i in 0..params.len() {
                // Every backup is written, bit-exact.
                assert_eq!(bits(&backups[i]), bits(&orig[i]), "backup {i}");
                match &group.grads[i] {
                    Some(gi) => check_perturbed(&orig[i], gi, &params[i], geo, s, &rep, oc),
                    None => assert_eq!(bits(&params[i]), bits(&orig[i])),
                }
            }
            // Some element did move (the test would not notice a no-op otherwise).
            assert!(params.iter().zip(&orig).any(|(a, b)| bits(a) != bits(b)));
            // Restore is bit-exact.
            let b: Vec<&[P]> = backups.iter().map(|v| v.as_slice()).collect();
            restore(&mut muts(&mut params), &b).unwrap();
            for i in 0..params.len() {
                assert_eq!(bits(&params[i]), bits(&orig[i]));
            }
        }
    }
}

#[test]
fn in_place_f32_f32() {
    check_in_place::<f32, f32>(1);
}
#[test]
fn in_place_f16_f16() {
    check_in_place::<f16, f16>(2);
}
#[test]
fn in_place_bf16_bf16() {
    check_in_place::<bf16, bf16>(3);
}
#[test]
fn in_place_bf16_f32() {
    check_in_place::<bf16, f32>(4);
}

fn check_master<P: Element, G: Element>(seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    for geo in GEOMETRIES {
        let s = 1.0f32;
        let group = Group::<f32, G>::random(&mut rng, &SIZES);
        let (m, g) = (group.p(), group.g());
        let mut working: Vec<Vec<P>> = m.iter().map(|x| poison(x.len())).collect();
        let rep = perturb_master(
            &m,
            &g,
            &mut muts(&mut working),
            geo,
            Radius::Fixed(0.1),
            0.0,
            s,
        )
        .unwrap();
        assert!(rep.status.applied());
        let oc = rep.rho / (oracle_norm(&m, &g, geo, s) + 1e-12);
        for i in 0..m.len() {
            match g[i] {
                Some(gi) => check_perturbed(m[i], gi, &working[i], geo, s, &rep, oc),
                // Untouched: still the poison.
                None => assert_eq!(bits(&working[i]), bits(&poison::<P>(m[i].len()))),
            }
        }
        // Not applied (bad radius): nothing written at all.
        let mut w2: Vec<Vec<P>> = m.iter().map(|x| poison(x.len())).collect();
        let r2 =
            perturb_master(&m, &g, &mut muts(&mut w2), geo, Radius::Fixed(-1.0), 0.0, s).unwrap();
        assert_eq!(r2.status, PerturbStatus(PerturbStatus::NEGATIVE_RADIUS));
        assert!(w2.iter().all(|w| bits(w) == bits(&poison::<P>(w.len()))));
    }
}

#[test]
fn master_weights() {
    check_master::<bf16, f32>(10);
    check_master::<bf16, bf16>(11);
    check_master::<f16, f16>(12);
    check_master::<f32, f32>(13);
}

fn check_out_of_place<P: Element, G: Element>(seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    for geo in GEOMETRIES {
        let s = 2.0f32;
        let group = Group::<P, G>::random(&mut rng, &SIZES);
        let (p, g) = (group.p(), group.g());
        let mut out = zeros_like(&group.params);
        let radius = Radius::TrustRegion { delta: 2.0 };
        let rep = perturb_out_of_place(&p, &g, &mut muts(&mut out), geo, radius, 0.01, s).unwrap();
        assert!(rep.status.applied());
        let oc = rep.rho / (oracle_norm(&p, &g, geo, s) + 1e-12);
        for i in 0..p.len() {
            match g[i] {
                Some(gi) => check_perturbed(p[i], gi, &out[i], geo, s, &rep, oc),
                None => assert_eq!(bits(&out[i]), bits(p[i])),
            }
        }
        // Not applied (zero norm): out is θ, bit for bit.
        let zero: Vec<Option<Vec<G>>> = p
            .iter()
            .map(|x| Some(vec![G::default(); x.len()]))
            .collect();
        let zg: Vec<Option<&[G]>> = zero.iter().map(|x| x.as_deref()).collect();
        let mut out2 = zeros_like(&group.params);
        let r2 = perturb_out_of_place(&p, &zg, &mut muts(&mut out2), geo, radius, 0.01, s).unwrap();
        assert_eq!(r2.status, PerturbStatus(PerturbStatus::ZERO_NORM));
        for i in 0..p.len() {
            assert_eq!(bits(&out2[i]), bits(p[i]));
        }
    }
}

#[test]
fn out_of_place() {
    check_out_of_place::<f32, f32>(20);
    check_out_of_place::<f16, f16>(21);
    check_out_of_place::<bf16, bf16>(22);
    check_out_of_place::<bf16, f32>(23);
}

/// A report compared by bits (NaN radius included).
fn key(r: &PerturbReport) -> (PerturbStatus, u64, u64, u64) {
    (
        r.status,
        r.norm.to_bits(),
        r.rho.to_bits(),
        r.coef.to_bits(),
    )
}

/// Runs all three paths on one group and returns (report, in-place θ, backups,
/// master-path working copy, out-of-place output).
#[allow(clippy::type_complexity)]
fn run_all<P: Element, G: Element>(
    params: &[Vec<P>],
    grads: &[Option<Vec<G>>],
    geo: Geometry,
    radius: Radius,
    d: f32,
    s: f32,
) -> (
    PerturbReport,
    Vec<Vec<P>>,
    Vec<Vec<P>>,
    Vec<Vec<P>>,
    Vec<Vec<P>>,
) {
    let g: Vec<Option<&[G]>> = grads.iter().map(|x| x.as_deref()).collect();
    let p: Vec<&[P]> = params.iter().map(|x| x.as_slice()).collect();
    let mut theta = params.to_vec();
    let mut backups = zeros_like(params);
    let r1 = perturb(
        &mut muts(&mut theta),
        &g,
        &mut muts(&mut backups),
        geo,
        radius,
        d,
        s,
    )
    .unwrap();
    let master: Vec<Vec<f32>> = params
        .iter()
        .map(|x| x.iter().map(|v| v.to_f32()).collect())
        .collect();
    let m: Vec<&[f32]> = master.iter().map(|x| x.as_slice()).collect();
    let mut working = zeros_like(params);
    let r2 = perturb_master(&m, &g, &mut muts(&mut working), geo, radius, d, s).unwrap();
    let mut out = zeros_like(params);
    let r3 = perturb_out_of_place(&p, &g, &mut muts(&mut out), geo, radius, d, s).unwrap();
    // The master is θ widened exactly, so all three decide the same.
    assert_eq!(key(&r1), key(&r2));
    assert_eq!(key(&r1), key(&r3));
    (r1, theta, backups, working, out)
}

/// A path that did not apply: θ unchanged and backed up, working copy untouched,
/// out = θ.
fn assert_not_applied<P: Element, G: Element>(
    group: &Group<P, G>,
    geo: Geometry,
    radius: Radius,
    d: f32,
) -> PerturbStatus {
    let (rep, theta, backups, working, out) =
        run_all(&group.params, &group.grads, geo, radius, d, 1.0);
    assert!(!rep.status.applied());
    assert_eq!(rep.coef, 0.0);
    for i in 0..theta.len() {
        let orig = bits(&group.params[i]);
        assert_eq!(bits(&theta[i]), orig);
        assert_eq!(bits(&backups[i]), orig);
        assert_eq!(bits(&out[i]), orig);
        assert_eq!(bits(&working[i]), bits(&poison::<P>(orig.len())));
    }
    rep.status
}

fn check_status_paths<P: Element, G: Element>(seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let sizes = [1, 100, 70_000, 0, 33];
    let fixed = Radius::Fixed(0.05);
    let tr = Radius::TrustRegion { delta: 1.0 };
    use PerturbStatus as S;
    for geo in GEOMETRIES {
        // Inf / NaN gradient.
        for bad in [f64::INFINITY, f64::NAN, f64::NEG_INFINITY] {
            let mut group = Group::<P, G>::random(&mut rng, &sizes);
            group.grads[2].as_mut().unwrap()[6_000] = G::from_f64(bad);
            assert_eq!(
                assert_not_applied(&group, geo, fixed, 0.0),
                S(S::NONFINITE_GRAD)
            );
            // Together with a bad radius: both bits.
            assert_eq!(
                assert_not_applied(&group, geo, tr, f32::NAN),
                S(S::NONFINITE_GRAD | S::NONFINITE_RADIUS)
            );
        }
        let group = Group::<P, G>::random(&mut rng, &sizes);
        // Bad radius: fixed or from the divergence.
        for (radius, d, want) in [
            (Radius::Fixed(-0.1), 0.0, S::NEGATIVE_RADIUS),
            (Radius::Fixed(f32::NAN), 0.0, S::NONFINITE_RADIUS),
            (Radius::Fixed(f32::INFINITY), 0.0, S::NONFINITE_RADIUS),
            (tr, -0.5, S::NEGATIVE_RADIUS),
            (tr, f32::NAN, S::NONFINITE_RADIUS),
            (tr, f32::INFINITY, S::NONFINITE_RADIUS),
            (Radius::TrustRegion { delta: -1.0 }, 0.5, S::NEGATIVE_RADIUS),
            (
                Radius::TrustRegion { delta: f32::MAX },
                f32::MAX,
                S::APPLIED,
            ),
        ] {
            if want == S::APPLIED {
                // δ·d overflows f32 but not f64: ρ is finite and applied, and
                // θ + ε overflows the parameter type.
                let (rep, ..) = run_all(&group.params, &group.grads, geo, radius, d, 1.0);
                assert_eq!(rep.status, S(S::APPLIED | S::OVERFLOW));
                continue;
            }
            assert_eq!(
                assert_not_applied(&group, geo, radius, d),
                S(want),
                "{radius:?} {d}"
            );
        }
        // Zero gradients: zero norm, ε = 0.
        let mut zero = Group::<P, G>::random(&mut rng, &sizes);
        for g in zero.grads.iter_mut().flatten() {
            g.iter_mut()
                .for_each(|x| *x = G::from_f64(if rng.random() { 0.0 } else { -0.0 }));
        }
        assert_eq!(assert_not_applied(&zero, geo, fixed, 0.0), S(S::ZERO_NORM));
        // No gradient at all: also a zero norm.
        zero.grads.iter_mut().for_each(|g| *g = None);
        assert_eq!(assert_not_applied(&zero, geo, tr, 0.7), S(S::ZERO_NORM));
        // A zero divergence gives ρ = 0: applied, with ε = 0.
        let (rep, theta, ..) = run_all(&group.params, &group.grads, geo, tr, 0.0, 1.0);
        assert_eq!((rep.status, rep.coef), (S(S::APPLIED), 0.0));
        for (t, p) in theta.iter().zip(&group.params) {
            assert_eq!(bits(t), bits(p));
        }
    }
}

#[test]
fn status_paths() {
    check_status_paths::<f32, f32>(30);
    check_status_paths::<f16, f16>(31);
    check_status_paths::<bf16, bf16>(32);
    check_status_paths::<bf16, f32>(33);
}

#[test]
fn plan_decides_in_order() {
    use PerturbStatus as S;
    assert_eq!(plan(2.0, 0.5).status, S(S::APPLIED));
    assert_eq!(plan(2.0, 0.5).coef, 0.5 / (2.0 + 1e-12));
    assert_eq!(plan(0.0, 0.5).status, S(S::ZERO_NORM));
    assert_eq!(plan(0.0, -0.5).status, S(S::NEGATIVE_RADIUS));
    assert_eq!(
        plan(f64::NAN, -0.5).status,
        S(S::NONFINITE_GRAD | S::NEGATIVE_RADIUS)
    );
    assert_eq!(plan(f64::INFINITY, 1.0).status, S(S::NONFINITE_GRAD));
    assert_eq!(plan(1.0, f64::NEG_INFINITY).status, S(S::NONFINITE_RADIUS));
}

/// Loss scaling: with the matching inverse scale every geometry gives the same
/// θ + ε bit for bit (power-of-two scales are exact); SAM and adaptive are
/// scale-invariant even without it (up to rounding), Fisher is not.
fn check_loss_scale<P: Element, G: Element>(scale: f64, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    for geo in GEOMETRIES {
        let group = Group::<P, G>::random(&mut rng, &[3, 20_000, 70_001]);
        let scaled: Vec<Option<Vec<G>>> = group
            .grads
            .iter()
            .map(|g| {
                g.as_ref()
                    .map(|g| g.iter().map(|x| G::from_f64(x.to_f64() * scale)).collect())
            })
            .collect();
        let radius = Radius::Fixed(0.05);
        let (_, a, ..) = run_all(&group.params, &group.grads, geo, radius, 0.0, 1.0);
        let (_, b, ..) = run_all(
            &group.params,
            &scaled,
            geo,
            radius,
            0.0,
            (1.0 / scale) as f32,
        );
        for i in 0..a.len() {
            assert_eq!(bits(&a[i]), bits(&b[i]), "{geo:?}");
        }
        let (_, c, ..) = run_all(&group.params, &scaled, geo, radius, 0.0, 1.0);
        let differs = a.iter().zip(&c).any(|(x, y)| bits(x) != bits(y));
        match geo {
            Geometry::Fisher { .. } => assert!(differs, "Fisher should depend on the scale"),
            _ => {
                // Same ε up to a few roundings: at most one ulp of θ + ε apart.
                for (x, y) in a.iter().flatten().zip(c.iter().flatten()) {
                    let (x, y) = (x.to_f64(), y.to_f64());
                    let ulp = 2f64.powi(x.abs().log2().floor() as i32 - P::DTYPE_MANT as i32);
                    assert!((x - y).abs() <= ulp, "{geo:?}: {x} vs {y}");
                }
            }
        }
    }
}

trait Mant {
    const DTYPE_MANT: u32;
}
impl<T: Element> Mant for T {
    const DTYPE_MANT: u32 = match T::DTYPE {
        tram_kernels::DType::F32 => 23,
        tram_kernels::DType::F16 => 10,
        tram_kernels::DType::BF16 => 7,
    };
}

#[test]
fn loss_scaled_gradients() {
    check_loss_scale::<f32, f32>(65536.0, 40);
    check_loss_scale::<bf16, bf16>(65536.0, 41);
    check_loss_scale::<bf16, f32>(1024.0, 42);
    check_loss_scale::<f16, f16>(4096.0, 43);
}

/// The explicit-norm entries reproduce the composite ones from their report.
#[test]
fn with_variants_match() {
    let mut rng = SmallRng::seed_from_u64(50);
    let group = Group::<bf16, f32>::random(&mut rng, &SIZES);
    let geo = Geometry::Adaptive { eta: 0.01 };
    let (rep, theta, backups, working, out) = run_all(
        &group.params,
        &group.grads,
        geo,
        Radius::TrustRegion { delta: 0.1 },
        0.4,
        0.5,
    );
    let g = group.g();
    let mut t2 = group.params.clone();
    let mut b2 = zeros_like(&t2);
    let r = perturb_with(
        &mut muts(&mut t2),
        &g,
        &mut muts(&mut b2),
        geo,
        0.5,
        rep.norm,
        rep.rho,
    )
    .unwrap();
    assert_eq!(r, rep);
    let master: Vec<Vec<f32>> = group
        .params
        .iter()
        .map(|x| x.iter().map(|v| v.to_f32()).collect())
        .collect();
    let m: Vec<&[f32]> = master.iter().map(|x| x.as_slice()).collect();
    let mut w2 = zeros_like(&t2);
    perturb_master_with(&m, &g, &mut muts(&mut w2), geo, 0.5, rep.norm, rep.rho).unwrap();
    let mut o2 = zeros_like(&t2);
    perturb_out_of_place_with(
        &group.p(),
        &g,
        &mut muts(&mut o2),
        geo,
        0.5,
        rep.norm,
        rep.rho,
    )
    .unwrap();
    for i in 0..t2.len() {
        assert_eq!(bits(&t2[i]), bits(&theta[i]));
        assert_eq!(bits(&b2[i]), bits(&backups[i]));
        assert_eq!(bits(&w2[i]), bits(&working[i]));
        assert_eq!(bits(&o2[i]), bits(&out[i]));
    }
    // The norm in the report is grad_norm's.
    let n = grad_norm(&group.p(), &g, geo, 0.5).unwrap();
    assert_eq!(n.norm, rep.norm);
}

/// Bit-identical results whatever the rayon thread count.
#[test]
fn deterministic_across_thread_counts() {
    let mut rng = SmallRng::seed_from_u64(60);
    let group = Group::<f16, f16>::random(&mut rng, &SIZES);
    for geo in GEOMETRIES {
        let radius = Radius::TrustRegion { delta: 0.3 };
        let base = run_all(&group.params, &group.grads, geo, radius, 0.2, 0.5);
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let other =
                pool.install(|| run_all(&group.params, &group.grads, geo, radius, 0.2, 0.5));
            assert_eq!(base.0, other.0);
            for (x, y) in [
                (&base.1, &other.1),
                (&base.3, &other.3),
                (&base.4, &other.4),
            ] {
                for i in 0..x.len() {
                    assert_eq!(bits(&x[i]), bits(&y[i]));
                }
            }
        }
    }
}

/// Restore copies bits: NaN payloads, −0.0, infinities and subnormals survive a
/// perturb/restore round trip.
fn check_restore_bits<P: Element>(specials: &[u32]) {
    let mut rng = SmallRng::seed_from_u64(70);
    let mut theta: Vec<P> = rand_vec(&mut rng, 200_003, 1.0);
    for (k, &b) in specials.iter().enumerate() {
        theta[k * 7919] = from_bits(b);
    }
    let grads: Vec<P> = rand_vec(&mut rng, theta.len(), 1.0);
    let orig = theta.clone();
    let mut params = vec![theta, orig[..5].to_vec()];
    let mut backups = zeros_like(&params);
    let g = [Some(grads.as_slice()), None];
    let rep = perturb(
        &mut muts(&mut params),
        &g,
        &mut muts(&mut backups),
        Geometry::Sam,
        Radius::Fixed(1.0),
        0.0,
        1.0,
    )
    .unwrap();
    assert!(rep.status.applied());
    assert_ne!(bits(&params[0]), bits(&orig));
    // Poison θ as well, then restore.
    params[0]
        .iter_mut()
        .for_each(|x| *x = from_bits(0x7fa5_a5a5));
    let b: Vec<&[P]> = backups.iter().map(|v| v.as_slice()).collect();
    restore(&mut muts(&mut params), &b).unwrap();
    assert_eq!(bits(&params[0]), bits(&orig));
    assert_eq!(bits(&params[1]), bits(&orig[..5]));
}

#[test]
fn restore_is_bit_exact() {
    // NaN payloads (quiet and signalling), −0.0, −inf, smallest subnormal.
    check_restore_bits::<f32>(&[0x7fc0_1234, 0xffa0_0001, 0x8000_0000, 0xff80_0000, 1]);
    check_restore_bits::<f16>(&[0x7e01, 0xfd55, 0x8000, 0xfc00, 1]);
    check_restore_bits::<bf16>(&[0x7fc1, 0xff81, 0x8000, 0xff80, 1]);
}

fn is_invalid<T>(r: tram_kernels::Result<T>) -> bool {
    matches!(r, Err(Error::InvalidArgument(_)))
}

#[test]
fn bad_input_is_an_error() {
    let geo = Geometry::Sam;
    let fixed = Radius::Fixed(0.1);
    let g3 = [1.0f32, -2.0, 3.0];
    let g2 = [1.0f32, 2.0];
    let mut t = vec![0.5f32, 0.25, 0.125];
    let orig = t.clone();
    let mut b3 = vec![9.0f32; 3];
    let mut b2 = vec![9.0f32; 2];
    // Empty group.
    assert!(is_invalid(perturb::<f32, f32>(
        &mut [],
        &[],
        &mut [],
        geo,
        fixed,
        0.0,
        1.0
    )));
    assert!(is_invalid(perturb_master::<f32, f32>(
        &[],
        &[],
        &mut [],
        geo,
        fixed,
        0.0,
        1.0
    )));
    assert!(is_invalid(perturb_out_of_place::<f32, f32>(
        &[],
        &[],
        &mut [],
        geo,
        fixed,
        0.0,
        1.0
    )));
    assert!(is_invalid(restore::<f32>(&mut [], &[])));
    // Gradient count, gradient length.
    assert!(is_invalid(perturb::<f32, f32>(
        &mut [&mut t[..]],
        &[],
        &mut [&mut b3[..]],
        geo,
        fixed,
        0.0,
        1.0
    )));
    assert!(is_invalid(perturb(
        &mut [&mut t[..]],
        &[Some(&g2[..])],
        &mut [&mut b3[..]],
        geo,
        fixed,
        0.0,
        1.0
    )));
    // Backup count, backup length.
    assert!(is_invalid(perturb(
        &mut [&mut t[..]],
        &[Some(&g3[..])],
        &mut [],
        geo,
        fixed,
        0.0,
        1.0
    )));
    assert!(is_invalid(perturb(
        &mut [&mut t[..]],
        &[Some(&g3[..])],
        &mut [&mut b2[..]],
        geo,
        fixed,
        0.0,
        1.0
    )));
    assert!(is_invalid(perturb_with(
        &mut [&mut t[..]],
        &[None::<&[f32]>],
        &mut [&mut b2[..]],
        geo,
        1.0,
        1.0,
        0.1
    )));
    // Bad settings; a negative norm given explicitly.
    assert!(is_invalid(perturb(
        &mut [&mut t[..]],
        &[Some(&g3[..])],
        &mut [&mut b3[..]],
        geo,
        fixed,
        0.0,
        0.0
    )));
    let fisher = Geometry::Fisher { eta: -1.0 };
    assert!(is_invalid(perturb(
        &mut [&mut t[..]],
        &[Some(&g3[..])],
        &mut [&mut b3[..]],
        fisher,
        fixed,
        0.0,
        1.0
    )));
    assert!(is_invalid(perturb_with(
        &mut [&mut t[..]],
        &[Some(&g3[..])],
        &mut [&mut b3[..]],
        geo,
        1.0,
        -1.0,
        0.1
    )));
    // Nothing was written by any of these.
    assert_eq!(t, orig);
    assert_eq!((b3, b2), (vec![9.0; 3], vec![9.0; 2]));
    // Master and out of place: output count and length.
    let mut w2 = vec![0.0f32; 2];
    assert!(is_invalid(perturb_master::<f32, f32>(
        &[&g3[..]],
        &[Some(&g3[..])],
        &mut [],
        geo,
        fixed,
        0.0,
        1.0
    )));
    assert!(is_invalid(perturb_master(
        &[&g3[..]],
        &[Some(&g3[..])],
        &mut [&mut w2[..]],
        geo,
        fixed,
        0.0,
        1.0
    )));
    assert!(is_invalid(perturb_master(
        &[&g3[..]],
        &[None::<&[f32]>],
        &mut [&mut w2[..]],
        geo,
        fixed,
        0.0,
        1.0
    )));
    assert!(is_invalid(perturb_out_of_place(
        &[&g3[..]],
        &[Some(&g3[..])],
        &mut [&mut w2[..]],
        geo,
        fixed,
        0.0,
        1.0
    )));
    assert!(is_invalid(perturb_out_of_place::<f32, f32>(
        &[&g3[..]],
        &[Some(&g2[..])],
        &mut [],
        geo,
        fixed,
        0.0,
        1.0
    )));
    assert!(is_invalid(perturb_master_with(
        &[&g3[..]],
        &[Some(&g3[..])],
        &mut [&mut w2[..]],
        geo,
        1.0,
        1.0,
        0.1
    )));
    assert!(is_invalid(perturb_out_of_place_with(
        &[&g3[..]],
        &[Some(&g3[..])],
        &mut [&mut w2[..]],
        geo,
        1.0,
        1.0,
        0.1
    )));
    assert_eq!(w2, vec![0.0; 2]);
    // Restore: count and length.
    let mut t2 = vec![0.0f32; 3];
    assert!(is_invalid(restore(&mut [&mut t2[..]], &[])));
    assert!(is_invalid(restore(&mut [&mut t2[..]], &[&g2[..]])));
    assert!(is_invalid(restore(&mut [&mut t2[..]], &[&g3[..], &g3[..]])));
    assert_eq!(t2, vec![0.0; 3]);
    // The valid calls beside them work.
    let mut b = [0.0f32; 3];
    let rep = perturb(
        &mut [&mut t[..]],
        &[Some(&g3[..])],
        &mut [&mut b[..]],
        geo,
        fixed,
        0.0,
        1.0,
    )
    .unwrap();
    assert!(rep.status.applied());
    restore(&mut [&mut t2[..]], &[&g3[..]]).unwrap();
    assert_eq!(t2, g3.to_vec());
}

/// θ + ε that overflows the parameter type to ±inf, from a finite θ, is
/// reported (OVERFLOW with APPLIED) on every path; θ is still restored bit for
/// bit from the backup, and the master and the out-of-place input are untouched.
fn check_overflow<P: Element, G: Element>(big: f64, seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    use PerturbStatus as S;
    let overflow = S::APPLIED | S::OVERFLOW;
    for geo in GEOMETRIES {
        for sign in [1.0, -1.0] {
            // Element 3 of tensor 1 sits at `big` and its gradient points
            // outward, dominating the norm: ε there is about ρ (more for the
            // adaptive geometry), and ρ = 2·big.
            let mut group = Group::<P, G>::random(&mut rng, &[5, 9, 70_000]);
            group.params[1][3] = P::from_f64(sign * big);
            group.grads[1] = Some(rand_vec(&mut rng, 9, 1e-3));
            group.grads[1].as_mut().unwrap()[3] = G::from_f64(sign);
            let huge = Radius::TrustRegion { delta: 2.0 };
            let (rep, theta, backups, working, out) =
                run_all(&group.params, &group.grads, geo, huge, big as f32, 1.0);
            let what = format!("{:?}/{:?} {geo:?} sign {sign}", P::DTYPE, G::DTYPE);
            assert_eq!(rep.status, S(overflow), "{what}");
            assert!(rep.status.applied() && rep.status.overflow(), "{what}");
            let inf = P::from_f64(sign * f64::INFINITY).to_bits_u32();
            for written in [&theta, &working, &out] {
                assert_eq!(written[1][3].to_bits_u32(), inf, "{what}");
            }
            for i in 0..group.params.len() {
                let orig = bits(&group.params[i]);
                assert_eq!(bits(&backups[i]), orig, "{what}: backup {i}");
                // Restore brings θ back from the backup, infinities and all.
                let mut t = vec![theta[i].clone()];
                restore(&mut muts(&mut t), &[backups[i].as_slice()]).unwrap();
                assert_eq!(bits(&t[0]), orig, "{what}: restore {i}");
            }

            // The same group with a small radius (the adaptive ε is about ρ·big):
            // applied, no overflow.
            let small = Radius::Fixed(1e-9);
            let (rep, ..) = run_all(&group.params, &group.grads, geo, small, 0.0, 1.0);
            assert_eq!(rep.status, S(S::APPLIED), "{what}: small ρ");
        }
    }
    // An element that is already infinite is not an overflow (SAM: the norm
    // does not read θ, so the step applies and θ + ε stays inf).
    let mut group = Group::<P, G>::random(&mut rng, &[5, 9]);
    group.params[0][2] = P::from_f64(f64::INFINITY);
    group.grads[0] = Some(rand_vec(&mut rng, 5, 1e-2));
    let (rep, theta, ..) = run_all(
        &group.params,
        &group.grads,
        Geometry::Sam,
        Radius::Fixed(0.05),
        0.0,
        1.0,
    );
    assert_eq!(rep.status, S(S::APPLIED));
    assert_eq!(theta[0][2].to_f64(), f64::INFINITY);
}

#[test]
fn overflow_to_inf_is_reported() {
    check_overflow::<f32, f32>(f32::MAX as f64, 80);
    check_overflow::<bf16, bf16>(3e38, 81);
    check_overflow::<bf16, f32>(3e38, 82);
    check_overflow::<f16, f16>(65504.0, 83);
}
