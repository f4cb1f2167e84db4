//! The CPU KL reference against an independent two-pass oracle and the edge
//! cases of `cpu::kl_div`'s module docs.

#![allow(clippy::needless_range_loop)] // index loops read best in numeric checks

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tram_kernels::cpu::kl_div::{kl_div, kl_div_grad, KlOutput, Logits};
use tram_kernels::{bf16, f16, Element, Error, KlDirection, KlOptions, Reduction};

const DIRS: [KlDirection; 3] = [
    KlDirection::Forward,
    KlDirection::Reverse,
    KlDirection::Symmetric,
];
const REDS: [Reduction; 4] = [
    Reduction::None,
    Reduction::Sum,
    Reduction::MeanRows,
    Reduction::MeanElements,
];

/// The bound the module docs state for the value (relative to the oracle).
const KL_REL: f64 = 1e-12;
/// Gradient bound: |g − g*| ≤ GRAD_TOL·(max_row |g*| + |g*_i|).
const GRAD_TOL: f64 = 1e-12;

// ---------------------------------------------------------------- oracle

/// Neumaier-compensated sum.
fn nsum(it: impl IntoIterator<Item = f64>) -> f64 {
    let (mut s, mut c) = (0.0f64, 0.0f64);
    for v in it {
        let t = s + v;
        c += if s.abs() >= v.abs() {
            (s - t) + v
        } else {
            (v - t) + s
        };
        s = t;
    }
    s + c
}

/// expm1(−u) + u from its series, summed until the terms vanish.
fn phi_o(u: f64) -> f64 {
    let mut term = u * u / 2.0;
    let mut sum = 0.0f64;
    let mut k = 2.0;
    while term.abs() > 1e-40 * sum.abs() && k < 60.0 {
        sum += term;
        k += 1.0;
        term *= -u / k;
    }
    sum
}

/// y − log1p(y), by its series near 0.
fn psi_o(y: f64) -> f64 {
    if y.abs() >= 0.125 {
        return y - y.ln_1p();
    }
    let mut sum = 0.0f64;
    let mut pow = y * y;
    let mut k = 2.0;
    while pow.abs() / k > 1e-40 * sum.abs() && k < 80.0 {
        sum += if k % 2.0 == 0.0 { pow / k } else { -pow / k };
        pow *= y;
        k += 1.0;
    }
    sum
}

/// One direction of one row: KL(softmax(x·s) ‖ softmax(y·s)) and its gradients
/// w.r.t. the scaled logits, by a two-pass computation centred on the exact
/// (refined) P-mean of d, with compensated sums.
struct OSide {
    kl: f64,
    gx: Vec<f64>,
    gy: Vec<f64>,
}

fn oracle_side(x: &[f64], y: &[f64], s: f64) -> OSide {
    let n = x.len();
    let bad = |v: f64| v.is_nan() || v == f64::INFINITY;
    let nan = OSide {
        kl: f64::NAN,
        gx: vec![f64::NAN; n],
        gy: vec![f64::NAN; n],
    };
    if x.iter().chain(y).any(|&v| bad(v)) {
        return nan;
    }
    let fin: Vec<usize> = (0..n).filter(|&i| x[i].is_finite()).collect();
    if fin.is_empty() {
        return nan;
    }
    if fin.iter().any(|&i| y[i] == f64::NEG_INFINITY) {
        return OSide {
            kl: f64::INFINITY,
            ..nan
        };
    }
    let m = fin.iter().map(|&i| x[i]).fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = (0..n).map(|i| ((x[i] - m) * s).exp()).collect();
    let ss = nsum(fin.iter().map(|&i| w[i]));
    let d = |i: usize| x[i] - y[i];
    let mut c = nsum(fin.iter().map(|&i| w[i] * d(i))) / ss;
    c += nsum(fin.iter().map(|&i| w[i] * (d(i) - c))) / ss;
    let u: Vec<f64> = (0..n).map(|i| (d(i) - c) * s).collect();
    let a = nsum(fin.iter().map(|&i| w[i] * u[i]));
    let orphan = |i: usize| ((y[i] - m + c) * s).exp();
    let b = nsum(fin.iter().map(|&i| {
        if u[i].abs() < 1.0 {
            w[i] * phi_o(u[i])
        } else if u[i] > -30.0 {
            w[i] * ((-u[i]).exp_m1() + u[i])
        } else {
            ((x[i] - m) * s - u[i]).exp() - w[i] + w[i] * u[i]
        }
    })) + nsum((0..n).filter(|&i| x[i] == f64::NEG_INFINITY).map(orphan));
    let alpha = a / ss;
    // α + log1p(β − α) = β − ψ(β − α) with ψ(y) = y − log1p(y) ≈ y²/2: no
    // rounding at the size of α (the reference c is only within ε·|c| of the mean).
    // Where β − α is large, ψ ≈ β and the plain form is the accurate one.
    let ba = b / ss - alpha;
    let mut kl = if ba.abs() < 0.5 {
        b / ss - psi_o(ba)
    } else {
        alpha + ba.ln_1p()
    };
    if !kl.is_finite() {
        let mb = y.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sb = nsum(y.iter().map(|&v| ((v - mb) * s).exp()));
        kl = alpha + (c - m + mb) * s + sb.ln() - ss.ln();
    }
    let l = kl - alpha;
    let mut gx = vec![0.0; n];
    let mut gy = vec![0.0; n];
    for i in 0..n {
        if x[i] == f64::NEG_INFINITY {
            gy[i] = ((y[i] - m + c) * s - ss.ln() - l).exp();
            continue;
        }
        let p = w[i] / ss;
        gx[i] = p * (u[i] - alpha);
        let v = u[i] + l;
        gy[i] = if v > -30.0 {
            p * (-v).exp_m1()
        } else {
            ((x[i] - m) * s - ss.ln() - v).exp() - p
        };
    }
    OSide { kl, gx, gy }
}

/// The oracle of one row for a direction: (KL, d/da, d/db) w.r.t. original logits.
fn oracle_row(a: &[f64], b: &[f64], dir: KlDirection, tau: f64) -> (f64, Vec<f64>, Vec<f64>) {
    let s = 1.0 / tau;
    let n = a.len();
    let (mut kl, mut ga, mut gb) = (0.0, vec![0.0; n], vec![0.0; n]);
    if dir != KlDirection::Reverse {
        let o = oracle_side(a, b, s);
        kl += o.kl;
        (0..n).for_each(|i| {
            ga[i] += o.gx[i] * s;
            gb[i] += o.gy[i] * s;
        });
    }
    if dir != KlDirection::Forward {
        let o = oracle_side(b, a, s);
        kl += o.kl;
        (0..n).for_each(|i| {
            gb[i] += o.gx[i] * s;
            ga[i] += o.gy[i] * s;
        });
    }
    (kl, ga, gb)
}

// ---------------------------------------------------------------- data

fn normal(rng: &mut SmallRng) -> f64 {
    // Box–Muller; u1 in (0, 1].
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// rows × stride logits: a ~ N(0, σ²), b = a + offset + gap·N(0, 1), rounded to T;
/// padding past vocab is NaN (it must never be read).
fn make<T: Element>(
    rng: &mut SmallRng,
    rows: usize,
    vocab: usize,
    stride: usize,
    sigma: f64,
    offset: f64,
    gap: f64,
) -> (Vec<T>, Vec<T>) {
    let mut a = vec![T::from_f64(f64::NAN); rows * stride];
    let mut b = a.clone();
    for r in 0..rows {
        for i in 0..vocab {
            let x = sigma * normal(rng);
            let xa = T::from_f64(x);
            a[r * stride + i] = xa;
            b[r * stride + i] = T::from_f64(xa.to_f64() + offset + gap * normal(rng));
        }
    }
    (a, b)
}

fn row64<T: Element>(l: &Logits<T>, r: usize) -> Vec<f64> {
    l.data[r * l.row_stride..r * l.row_stride + l.vocab]
        .iter()
        .map(|v| v.to_f64())
        .collect()
}

fn opts(direction: KlDirection, reduction: Reduction, temperature: f32) -> KlOptions {
    KlOptions {
        direction,
        reduction,
        temperature,
    }
}

fn rel_err(got: f64, want: f64) -> f64 {
    if got == want {
        0.0
    } else {
        (got - want).abs() / want.abs()
    }
}

/// Asserts every row's value within KL_REL (and 1e-28 absolute, for rows whose
/// KL is 0 up to rounding), and every gradient entry within the mixed bound.
/// Returns the worst relative value error seen.
#[allow(clippy::too_many_arguments)]
fn check_against_oracle<T: Element>(
    a: &Logits<T>,
    b: &Logits<T>,
    dir: KlDirection,
    tau: f32,
    what: &str,
    with_grad: bool,
) -> f64 {
    let o = opts(dir, Reduction::Sum, tau);
    let out = kl_div(a, b, None, &o).unwrap();
    let grads = with_grad.then(|| kl_div_grad(a, b, None, &o, 1.0, true).unwrap());
    let bits = |x: &[f64]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    if let Some((gout, _)) = &grads {
        assert_eq!(
            bits(&gout.per_row),
            bits(&out.per_row),
            "{what}: grad call differs"
        );
    }
    let mut worst = 0.0f64;
    for r in 0..a.rows {
        let (ar, br) = (row64(a, r), row64(b, r));
        let (kl, ga, gb) = oracle_row(&ar, &br, dir, tau as f64);
        let got = out.per_row[r];
        if !kl.is_finite() {
            // +∞ or NaN rows: the same class, and NaN gradients over the row.
            assert!(
                got == kl || (got.is_nan() && kl.is_nan()),
                "{what} row {r}: {got} vs {kl}"
            );
            if let Some((_, g)) = &grads {
                let v = a.vocab;
                let gt = g.target.as_ref().unwrap();
                assert!(g.model[r * v..(r + 1) * v].iter().all(|x| x.is_nan()));
                assert!(gt[r * v..(r + 1) * v].iter().all(|x| x.is_nan()));
            }
            continue;
        }
        let err = (got - kl).abs();
        assert!(
            err <= KL_REL * kl.abs() + 1e-28,
            "{what} row {r}: KL {got:e} vs oracle {kl:e} (rel {:e})",
            rel_err(got, kl)
        );
        if kl > 1e-28 {
            worst = worst.max(rel_err(got, kl));
        }
        if let Some((_, g)) = &grads {
            let v = a.vocab;
            let gm = &g.model[r * v..(r + 1) * v];
            let gt = &g.target.as_ref().unwrap()[r * v..(r + 1) * v];
            for (name, got, want) in [("model", gm, &gb), ("target", gt, &ga)] {
                let scale = want.iter().fold(0.0f64, |m, g| m.max(g.abs()));
                for i in 0..v {
                    let e = (got[i] - want[i]).abs();
                    assert!(
                        e <= GRAD_TOL * (scale + want[i].abs()),
                        "{what} row {r} d/d{name}[{i}]: {:e} vs {:e} (row max {scale:e})",
                        got[i],
                        want[i]
                    );
                }
            }
        }
    }
    worst
}

// ---------------------------------------------------------------- tests

fn accuracy_sweep<T: Element>(seed: u64, vocabs: &[usize], with_grad: bool) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut worst = 0.0f64;
    for &v in vocabs {
        for sigma in [1.0, 3.0, 30.0] {
            for gap in [1.0, 1e-2, 1e-4, 1e-5] {
                for offset in [0.0, 10.0] {
                    let rows = if v > 10_000 { 2 } else { 3 };
                    let stride = v + (v % 3);
                    let (da, db) = make::<T>(&mut rng, rows, v, stride, sigma, offset, gap);
                    let a = Logits::new(&da, rows, v, stride).unwrap();
                    let b = Logits::new(&db, rows, v, stride).unwrap();
                    for dir in DIRS {
                        let what = format!(
                            "{:?} V={v} σ={sigma} gap={gap} offset={offset} {dir:?}",
                            T::DTYPE
                        );
                        worst = worst.max(check_against_oracle(&a, &b, dir, 1.0, &what, with_grad));
                    }
                }
            }
        }
    }
    eprintln!("{:?}: worst relative KL error {worst:e}", T::DTYPE);
}

#[test]
fn value_matches_oracle_f32() {
    accuracy_sweep::<f32>(1, &[1, 7, 50_257], false);
}

#[test]
fn value_matches_oracle_f16() {
    accuracy_sweep::<f16>(2, &[1, 7, 50_257], false);
}

#[test]
fn value_matches_oracle_bf16() {
    accuracy_sweep::<bf16>(3, &[1, 7, 50_257], false);
}

#[test]
fn gradients_match_oracle() {
    // 1_003 and 2_051: not multiples of 8 nor of the chunk; several chunks.
    accuracy_sweep::<f32>(4, &[1, 7, 1_003, 2_051], true);
    accuracy_sweep::<bf16>(5, &[7, 2_051], true);
    accuracy_sweep::<f16>(6, &[1_003], true);
}

#[test]
fn textbook_f64_agrees_where_it_is_accurate() {
    // An independent check of the formula itself: at gap 1 and σ ≤ 3 the plain
    // log-softmax formula in f64 is accurate to ~1e-14 (note's table).
    let mut rng = SmallRng::seed_from_u64(7);
    for v in [2, 7, 1_003, 50_257] {
        for sigma in [1.0, 3.0] {
            let (da, db) = make::<f32>(&mut rng, 2, v, v, sigma, 0.5, 1.0);
            let a = Logits::dense(&da, 2, v).unwrap();
            let b = Logits::dense(&db, 2, v).unwrap();
            let o = opts(KlDirection::Forward, Reduction::None, 1.0);
            let (out, g) = kl_div_grad(&a, &b, None, &o, 1.0, false).unwrap();
            for r in 0..2 {
                let (ar, br) = (row64(&a, r), row64(&b, r));
                let lse = |z: &[f64]| {
                    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
                };
                let (la, lb) = (lse(&ar), lse(&br));
                let kl: f64 = (0..v)
                    .map(|i| (ar[i] - la).exp() * ((ar[i] - la) - (br[i] - lb)))
                    .sum();
                assert!(rel_err(out.per_row[r], kl) < 1e-12, "V={v} σ={sigma}");
                for i in 0..v {
                    let q_p = (br[i] - lb).exp() - (ar[i] - la).exp();
                    assert!((g.model[r * v + i] - q_p).abs() < 1e-15, "V={v} grad {i}");
                }
            }
        }
    }
}

#[test]
fn textbook_f32_fails_where_this_holds() {
    // σ = 3, gap 1e-5 (KL ≈ 5e-11): the note's table row where the f32 textbook
    // formula is off by 10^3 relative.
    let mut rng = SmallRng::seed_from_u64(8);
    let v = 50_257;
    let (da, db) = make::<f32>(&mut rng, 1, v, v, 3.0, 0.0, 1e-5);
    let a = Logits::dense(&da, 1, v).unwrap();
    let b = Logits::dense(&db, 1, v).unwrap();
    let want = oracle_side(&row64(&a, 0), &row64(&b, 0), 1.0).kl;
    let ours = kl_div(&a, &b, None, &KlOptions::default()).unwrap().value;
    let lsm = |z: &[f32]| {
        let m = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let l = m + z.iter().map(|x| (x - m).exp()).sum::<f32>().ln();
        z.iter().map(|x| x - l).collect::<Vec<f32>>()
    };
    let (la, lb) = (lsm(&da), lsm(&db));
    let textbook: f32 = (0..v).map(|i| la[i].exp() * (la[i] - lb[i])).sum();
    assert!(want > 1e-12 && want < 1e-9, "KL {want:e}");
    assert!(rel_err(ours, want) <= 1e-6, "ours {ours:e} vs {want:e}");
    assert!(
        rel_err(textbook as f64, want) > 1e-3,
        "textbook f32 {textbook:e} unexpectedly close to {want:e}"
    );
}

#[test]
fn temperature_scales_logits_and_gradients() {
    let mut rng = SmallRng::seed_from_u64(9);
    let (v, rows) = (1_500, 3);
    let (da, db) = make::<f32>(&mut rng, rows, v, v, 3.0, 0.0, 1e-2);
    let a = Logits::dense(&da, rows, v).unwrap();
    let b = Logits::dense(&db, rows, v).unwrap();
    for tau in [0.5f32, 2.0, 3.7] {
        for dir in DIRS {
            check_against_oracle(&a, &b, dir, tau, &format!("τ={tau} {dir:?}"), true);
        }
    }
    // τ = 2 on the logits is τ = 1 on the halved logits (exact in binary), and
    // the gradient w.r.t. the original logits carries the factor 1/2.
    let ha: Vec<f32> = da.iter().map(|x| x / 2.0).collect();
    let hb: Vec<f32> = db.iter().map(|x| x / 2.0).collect();
    let (a2, b2) = (
        Logits::dense(&ha, rows, v).unwrap(),
        Logits::dense(&hb, rows, v).unwrap(),
    );
    for dir in DIRS {
        let o2 = opts(dir, Reduction::Sum, 2.0);
        let o1 = opts(dir, Reduction::Sum, 1.0);
        let (x, gx) = kl_div_grad(&a, &b, None, &o2, 1.0, true).unwrap();
        let (y, gy) = kl_div_grad(&a2, &b2, None, &o1, 1.0, true).unwrap();
        assert_eq!(x.per_row, y.per_row);
        for (p, q) in gx.model.iter().zip(&gy.model) {
            assert_eq!(*p, q * 0.5);
        }
        for (p, q) in gx.target.unwrap().iter().zip(gy.target.as_ref().unwrap()) {
            assert_eq!(*p, q * 0.5);
        }
    }
}

#[test]
fn reductions_masks_and_upstream() {
    let mut rng = SmallRng::seed_from_u64(10);
    let (v, rows) = (777, 6);
    let (da, db) = make::<f32>(&mut rng, rows, v, v + 9, 2.0, 0.0, 0.1);
    let a = Logits::new(&da, rows, v, v + 9).unwrap();
    let b = Logits::new(&db, rows, v, v + 9).unwrap();
    let mask = [1u8, 0, 3, 1, 0, 1];
    for dir in DIRS {
        let oracle: Vec<f64> = (0..rows)
            .map(|r| oracle_row(&row64(&a, r), &row64(&b, r), dir, 1.0).0)
            .collect();
        let full = kl_div(&a, &b, None, &opts(dir, Reduction::None, 1.0)).unwrap();
        for red in REDS {
            let o = opts(dir, red, 1.0);
            let out = kl_div(&a, &b, Some(&mask), &o).unwrap();
            assert_eq!(out.unmasked_rows, 4);
            assert!(!out.all_masked);
            let mut sum = 0.0;
            for r in 0..rows {
                if mask[r] == 0 {
                    assert_eq!(out.per_row[r].to_bits(), 0, "masked row {r} not +0");
                } else {
                    // Masking does not change the other rows.
                    assert_eq!(out.per_row[r], full.per_row[r]);
                    sum += oracle[r];
                }
            }
            let want = match red {
                Reduction::None | Reduction::Sum => sum,
                Reduction::MeanRows => sum / 4.0,
                Reduction::MeanElements => sum / (4.0 * v as f64),
            };
            assert!(rel_err(out.value, want) < 1e-12, "{dir:?} {red:?}");

            // Gradient of upstream × value: masked rows exactly 0, the rest the
            // per-row gradient times upstream × d(value)/d(row).
            let up = -1.75;
            let (gout, g) = kl_div_grad(&a, &b, Some(&mask), &o, up, true).unwrap();
            assert_eq!(gout, out);
            let (_, g1) =
                kl_div_grad(&a, &b, None, &opts(dir, Reduction::Sum, 1.0), 1.0, true).unwrap();
            let f = match red {
                Reduction::None | Reduction::Sum => 1.0,
                Reduction::MeanRows => 0.25,
                Reduction::MeanElements => 0.25 / v as f64,
            };
            let gt = g.target.unwrap();
            let g1t = g1.target.unwrap();
            for (got, base) in [(&g.model, &g1.model), (&gt, &g1t)] {
                for r in 0..rows {
                    let span = r * v..(r + 1) * v;
                    let top = base[span.clone()]
                        .iter()
                        .fold(0.0f64, |m, x| m.max(x.abs()));
                    for i in span {
                        if mask[r] == 0 {
                            assert_eq!(got[i].to_bits(), 0);
                        } else {
                            // The symmetric sum is scaled per direction: ε of the row.
                            let want = up * f * base[i];
                            let tol = 1e-15 * (up * f).abs() * top;
                            assert!((got[i] - want).abs() <= tol, "{dir:?} {red:?}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn all_masked_and_no_rows() {
    let mut rng = SmallRng::seed_from_u64(11);
    let (da, db) = make::<bf16>(&mut rng, 3, 40, 40, 1.0, 0.0, 0.3);
    let a = Logits::dense(&da, 3, 40).unwrap();
    let b = Logits::dense(&db, 3, 40).unwrap();
    for red in REDS {
        let o = opts(KlDirection::Symmetric, red, 1.0);
        let (out, g) = kl_div_grad(&a, &b, Some(&[0, 0, 0]), &o, 1.0, true).unwrap();
        assert!(out.all_masked);
        assert_eq!(out.unmasked_rows, 0);
        assert_eq!(out.value, 0.0);
        assert!(out.per_row.iter().all(|&x| x == 0.0));
        assert!(g.model.iter().chain(&g.target.unwrap()).all(|&x| x == 0.0));
        // No rows at all behaves the same.
        let e = Logits::<bf16>::dense(&[], 0, 40).unwrap();
        let out = kl_div(&e, &e, None, &o).unwrap();
        assert!(out.all_masked && out.value == 0.0 && out.per_row.is_empty());
    }
}

/// Runs one row of f64 logits (converted to f32 exactly) in every direction.
fn one_row(a: &[f32], b: &[f32], dir: KlDirection) -> (KlOutput, Vec<f64>, Vec<f64>) {
    let v = a.len();
    let la = Logits::dense(a, 1, v).unwrap();
    let lb = Logits::dense(b, 1, v).unwrap();
    let (out, g) = kl_div_grad(&la, &lb, None, &opts(dir, Reduction::Sum, 1.0), 1.0, true).unwrap();
    (out, g.model, g.target.unwrap())
}

#[test]
fn edge_cases_of_the_note() {
    let ninf = f32::NEG_INFINITY;
    // Vocab 1: exactly 0, zero gradients.
    for (x, y) in [(3.5f32, -2.0f32), (0.0, 0.0), (1e30, -1e30)] {
        for dir in DIRS {
            let (o, gm, gt) = one_row(&[x], &[y], dir);
            assert_eq!(o.value.to_bits(), 0, "vocab 1 {x} {y} {dir:?}");
            assert!(gm[0] == 0.0 && gt[0] == 0.0);
        }
    }
    // a = −∞ carries no P mass, but its b still counts in Q: KL([1,0]‖[½,½]) = ln 2.
    let (o, gm, gt) = one_row(&[0.0, ninf], &[0.0, 0.0], KlDirection::Forward);
    assert!(rel_err(o.value, std::f64::consts::LN_2) < 1e-15);
    assert!((gm[0] + 0.5).abs() < 1e-15 && (gm[1] - 0.5).abs() < 1e-15);
    assert!(gt.iter().all(|g| g.is_finite()));
    // Both −∞: the element does not exist.
    let (o1, ..) = one_row(&[0.3, ninf, 1.0], &[0.1, ninf, 1.2], KlDirection::Symmetric);
    let (o2, ..) = one_row(&[0.3, 1.0], &[0.1, 1.2], KlDirection::Symmetric);
    assert!(rel_err(o1.value, o2.value) < 1e-15);
    // a finite, b = −∞: forward +∞ (gradients NaN), reverse finite.
    let (o, gm, _) = one_row(&[0.0, 1.0], &[0.0, ninf], KlDirection::Forward);
    assert_eq!(o.value, f64::INFINITY);
    assert!(gm.iter().all(|g| g.is_nan()));
    let (o, gm, _) = one_row(&[0.0, 1.0], &[0.0, ninf], KlDirection::Reverse);
    let want = oracle_side(&[0.0, f64::NEG_INFINITY], &[0.0, 1.0], 1.0).kl;
    assert!(rel_err(o.value, want) < 1e-15 && gm.iter().all(|g| g.is_finite()));
    // Every a = −∞: no distribution, NaN.
    let (o, ..) = one_row(&[ninf, ninf], &[0.0, 1.0], KlDirection::Forward);
    assert!(o.value.is_nan());
    // NaN (or +∞) anywhere: NaN in every direction, never a silent zero.
    for bad in [f32::NAN, f32::INFINITY] {
        for pos in [0, 600, 1_099] {
            let mut a = vec![0.25f32; 1_100];
            let b = a.clone();
            a[pos] = bad;
            for dir in DIRS {
                for (x, y) in [(&a, &b), (&b, &a)] {
                    let (o, gm, gt) = one_row(x, y, dir);
                    assert!(o.value.is_nan(), "{bad} at {pos} {dir:?}");
                    assert!(gm.iter().chain(&gt).all(|g| g.is_nan()));
                }
            }
        }
    }
    // Disjoint one-hot rows with logits 1000: KL = 1000, finite.
    for v in [2usize, 5, 3_000] {
        let mut a = vec![0.0f32; v];
        let mut b = vec![0.0f32; v];
        a[0] = 1000.0;
        b[v - 1] = 1000.0;
        for dir in [KlDirection::Forward, KlDirection::Reverse] {
            let (o, gm, gt) = one_row(&a, &b, dir);
            assert!((o.value - 1000.0).abs() < 1e-9, "V={v}: {}", o.value);
            assert!(gm.iter().chain(&gt).all(|g| g.is_finite()));
        }
        let (o, ..) = one_row(&a, &b, KlDirection::Symmetric);
        assert!((o.value - 2000.0).abs() < 2e-9);
    }
}

#[test]
fn special_values_match_oracle() {
    // −∞ entries scattered over several chunks, an outlier chunk whose b exceeds
    // the rest by 900 (the merges overflow, the fallback takes over), and rows
    // with a mass far from the reference.
    let mut rng = SmallRng::seed_from_u64(12);
    let v = 3_000;
    for case in 0..6 {
        let (mut da, mut db) = make::<f32>(&mut rng, 2, v, v, 3.0, 0.0, 0.05);
        for r in 0..2 {
            for i in 0..v {
                let k = r * v + i;
                match case {
                    0 if i % 7 == 3 => da[k] = f32::NEG_INFINITY,
                    1 if i % 11 == 2 => db[k] = f32::NEG_INFINITY,
                    1 if i % 5 == 1 => da[k] = f32::NEG_INFINITY,
                    2 if i == 2_600 => db[k] += 900.0,
                    3 if i == 2_600 => da[k] += 900.0,
                    4 if i >= 1_024 => db[k] -= 40.0,
                    5 if i == 17 => da[k] += 30.0,
                    _ => {}
                }
            }
        }
        // case 1: keep b finite wherever a is finite.
        if case == 1 {
            for k in 0..2 * v {
                if db[k] == f32::NEG_INFINITY {
                    da[k] = f32::NEG_INFINITY;
                }
            }
        }
        let a = Logits::dense(&da, 2, v).unwrap();
        let b = Logits::dense(&db, 2, v).unwrap();
        for dir in DIRS {
            let what = format!("case {case} {dir:?}");
            check_against_oracle(&a, &b, dir, 1.0, &what, true);
        }
    }
}

#[test]
fn gradient_rows_sum_to_zero() {
    let mut rng = SmallRng::seed_from_u64(13);
    let (v, rows) = (5_003, 4);
    for gap in [1.0, 1e-3, 1e-5] {
        let (da, db) = make::<f32>(&mut rng, rows, v, v, 3.0, 1.0, gap);
        let a = Logits::dense(&da, rows, v).unwrap();
        let b = Logits::dense(&db, rows, v).unwrap();
        for dir in DIRS {
            let (_, g) =
                kl_div_grad(&a, &b, None, &opts(dir, Reduction::Sum, 1.0), 1.0, true).unwrap();
            for grad in [&g.model, g.target.as_ref().unwrap()] {
                for r in 0..rows {
                    let row = &grad[r * v..(r + 1) * v];
                    let mag = nsum(row.iter().map(|x| x.abs()));
                    assert!(mag > 0.0);
                    assert!(
                        nsum(row.iter().cloned()).abs() <= 1e-13 * mag,
                        "{gap} {dir:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn deterministic_across_calls_threads_and_batching() {
    let mut rng = SmallRng::seed_from_u64(14);
    let v = 50_257;
    let (da, db) = make::<f32>(&mut rng, 64, v, v, 3.0, 0.0, 1e-3);
    let a = Logits::dense(&da, 64, v).unwrap();
    let b = Logits::dense(&db, 64, v).unwrap();
    // Three rows alone (rows split over threads) and all 64 (one task per row).
    let a3 = Logits::dense(&da[..3 * v], 3, v).unwrap();
    let b3 = Logits::dense(&db[..3 * v], 3, v).unwrap();
    let run = |a: &Logits<f32>, b: &Logits<f32>| {
        let o = opts(KlDirection::Symmetric, Reduction::MeanRows, 1.3);
        kl_div_grad(a, b, None, &o, 0.7, true).unwrap()
    };
    let base = run(&a, &b);
    let base3 = run(&a3, &b3);
    assert_eq!(run(&a, &b), base, "two calls differ");
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        assert_eq!(pool.install(|| run(&a, &b)), base, "{threads} threads");
        assert_eq!(
            pool.install(|| run(&a3, &b3)),
            base3,
            "{threads} threads, 3 rows"
        );
    }
    for r in 0..3 {
        assert_eq!(base.0.per_row[r].to_bits(), base3.0.per_row[r].to_bits());
    }
    let bits = |x: &[f64]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    // A row's gradient does not depend on the batch around it either.
    let o = opts(KlDirection::Forward, Reduction::Sum, 1.0);
    let (_, g64) = kl_div_grad(&a, &b, None, &o, 1.0, false).unwrap();
    let (_, g3) = kl_div_grad(&a3, &b3, None, &o, 1.0, false).unwrap();
    assert_eq!(bits(&g64.model[..3 * v]), bits(&g3.model));
}

#[test]
fn bad_input_is_an_error() {
    let d = vec![0.5f32; 100];
    let inv = |r: tram_kernels::Result<Logits<f32>>| matches!(r, Err(Error::InvalidArgument(_)));
    assert!(inv(Logits::new(&d, 2, 0, 10)));
    assert!(inv(Logits::new(&d, 2, 10, 9)));
    assert!(inv(Logits::new(&d, 11, 10, 10)));
    assert!(inv(Logits::new(&d, 2, 60, 60)));
    assert!(inv(Logits::new(&d, 3, 10, usize::MAX / 2)));
    assert!(Logits::new(&d, 2, 10, 90).is_ok());
    assert!(Logits::new(&d, 0, 10, 1_000).is_ok());

    let a = Logits::dense(&d, 10, 10).unwrap();
    let o = KlOptions::default();
    let kinv = |r: tram_kernels::Result<KlOutput>| matches!(r, Err(Error::InvalidArgument(_)));
    // Shape mismatches (strides may differ).
    assert!(kinv(kl_div(
        &a,
        &Logits::dense(&d, 9, 10).unwrap(),
        None,
        &o
    )));
    assert!(kinv(kl_div(
        &a,
        &Logits::dense(&d, 10, 9).unwrap(),
        None,
        &o
    )));
    assert!(kl_div(&a, &Logits::new(&d, 5, 10, 19).unwrap(), None, &o).is_err());
    assert!(kl_div(
        &Logits::new(&d, 5, 10, 19).unwrap(),
        &Logits::dense(&d, 5, 10).unwrap(),
        None,
        &o
    )
    .is_ok());
    // Mask length.
    assert!(kinv(kl_div(&a, &a, Some(&[1; 9]), &o)));
    assert!(kinv(kl_div(&a, &a, Some(&[1; 11]), &o)));
    // Temperature.
    for t in [0.0f32, -1.0, f32::NAN, f32::INFINITY, -0.0] {
        let o = KlOptions {
            temperature: t,
            ..o
        };
        assert!(kinv(kl_div(&a, &a, None, &o)), "τ = {t}");
        assert!(kl_div_grad(&a, &a, None, &o, 1.0, true).is_err());
    }
    // Hand-built logits bypassing `new` are checked as well.
    let bad = Logits {
        data: &d[..],
        rows: 20,
        vocab: 10,
        row_stride: 10,
    };
    assert!(kinv(kl_div(&bad, &bad, None, &o)));
    assert!(kl_div_grad(&bad, &bad, None, &o, 1.0, false).is_err());
    let bad = Logits {
        data: &d[..],
        rows: 2,
        vocab: 10,
        row_stride: 5,
    };
    assert!(kinv(kl_div(&bad, &bad, None, &o)));
}

#[test]
fn adversarial_rows_match_oracle() {
    let mut rng = SmallRng::seed_from_u64(15);
    // (name, vocab, a, b, τ)
    type Case = (String, usize, Vec<f32>, Vec<f32>, f32);
    let mut cases: Vec<Case> = Vec::new();
    // The argmax element is an outlier in d while the rest agree to 1e-5: the
    // reference must not sit on it.
    let v = 50_257;
    let mut a: Vec<f32> = (0..v).map(|_| (0.01 * normal(&mut rng)) as f32).collect();
    a[123] = 0.2;
    let mut b: Vec<f32> = a
        .iter()
        .map(|&x| (x as f64 + 1e-5 * normal(&mut rng)) as f32)
        .collect();
    b[123] = -0.8;
    cases.push(("outlier at the argmax".into(), v, a, b, 1.0));
    // Every chunk has its own mean of d (merges move references by up to ±10).
    let v = 20_000;
    let a: Vec<f32> = (0..v).map(|_| (2.0 * normal(&mut rng)) as f32).collect();
    let b: Vec<f32> = (0..v)
        .map(|i| (a[i] as f64 + 5.0 * ((i / 512) as f64).sin() + 1e-4 * normal(&mut rng)) as f32)
        .collect();
    cases.push(("chunk-wise offsets".into(), v, a, b, 1.0));
    // Huge logits, a temperature, and the peak in the one-element last chunk.
    let v = 4_097;
    let mut a: Vec<f32> = (0..v).map(|_| (1000.0 * normal(&mut rng)) as f32).collect();
    a[v - 1] = a.iter().cloned().fold(f32::MIN, f32::max) + 100.0;
    let b: Vec<f32> = a
        .iter()
        .map(|&x| (x as f64 + 0.3 * normal(&mut rng)) as f32)
        .collect();
    cases.push(("huge logits, τ = 700".into(), v, a, b, 700.0));
    // XLM-R's vocabulary, nearly equal rows, a high temperature.
    let v = 250_002;
    let (a, b) = make::<f32>(&mut rng, 1, v, v, 30.0, 2.0, 1e-4);
    cases.push(("V = 250,002, τ = 0.7".into(), v, a, b, 0.7));
    let (a, b) = make::<f32>(&mut rng, 1, v, v, 30.0, 0.0, 1e-3);
    cases.push(("V = 250,002, τ = 100".into(), v, a, b, 100.0));
    for (what, v, a, b, tau) in &cases {
        let la = Logits::dense(a, 1, *v).unwrap();
        let lb = Logits::dense(b, 1, *v).unwrap();
        for dir in DIRS {
            let w = format!("{what} {dir:?}");
            let e = check_against_oracle(&la, &lb, dir, *tau, &w, *v < 100_000);
            let kl = kl_div(&la, &lb, None, &opts(dir, Reduction::Sum, *tau)).unwrap();
            eprintln!("{w}: KL {:e}, relative error {e:e}", kl.value);
        }
    }
}

// ------------------------------------------------- double-double oracle

/// An unevaluated sum hi + lo carrying ~106 bits: enough to run the textbook
/// formula itself without its cancellation mattering.
#[derive(Clone, Copy, Debug)]
struct Dd(f64, f64);

impl Dd {
    fn new(x: f64) -> Dd {
        Dd(x, 0.0)
    }
    fn two_sum(a: f64, b: f64) -> Dd {
        let s = a + b;
        let bb = s - a;
        Dd(s, (a - (s - bb)) + (b - bb))
    }
    fn add(self, o: Dd) -> Dd {
        let s = Dd::two_sum(self.0, o.0);
        let t = Dd::two_sum(self.1, o.1);
        let s = Dd::two_sum(s.0, s.1 + t.0);
        Dd::two_sum(s.0, s.1 + t.1)
    }
    fn neg(self) -> Dd {
        Dd(-self.0, -self.1)
    }
    fn sub(self, o: Dd) -> Dd {
        self.add(o.neg())
    }
    fn mul(self, o: Dd) -> Dd {
        let p = self.0 * o.0;
        let e = self.0.mul_add(o.0, -p) + (self.0 * o.1 + self.1 * o.0);
        Dd::two_sum(p, e)
    }
    fn scale(self, k: f64) -> Dd {
        // Exact for a power of two k.
        Dd(self.0 * k, self.1 * k)
    }
    fn div(self, o: Dd) -> Dd {
        let q1 = self.0 / o.0;
        let r = self.sub(o.mul(Dd::new(q1)));
        let q2 = r.0 / o.0;
        let r = r.sub(o.mul(Dd::new(q2)));
        let q3 = r.0 / o.0;
        Dd::two_sum(q1, q2).add(Dd::new(q3))
    }
    fn to_f64(self) -> f64 {
        self.0 + self.1
    }
}

const LN2_DD: Dd = Dd(std::f64::consts::LN_2, 2.319_046_813_846_299_6e-17);

fn exp_dd(x: Dd) -> Dd {
    if x.0 < -700.0 {
        return Dd::new(0.0);
    }
    let k = (x.0 / std::f64::consts::LN_2).round();
    let r = x.sub(LN2_DD.mul(Dd::new(k))).scale(1.0 / 1024.0);
    // e^r by Taylor (|r| < 4e-4: 12 terms reach 1e-45), then square 10 times.
    let mut sum = Dd::new(1.0);
    let mut term = Dd::new(1.0);
    for n in 1..=12 {
        term = term.mul(r).div(Dd::new(n as f64));
        sum = sum.add(term);
    }
    for _ in 0..10 {
        sum = sum.mul(sum);
    }
    sum.scale(2f64.powi(k as i32))
}

fn ln_dd(x: Dd) -> Dd {
    // Newton on e^y = x from the f64 logarithm: each step doubles the digits.
    let mut y = Dd::new(x.0.ln());
    for _ in 0..2 {
        y = y.add(x.mul(exp_dd(y.neg())).sub(Dd::new(1.0)));
    }
    y
}

/// log_softmax in double-double.
fn log_softmax_dd(z: &[f64]) -> Vec<Dd> {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut s = Dd::new(0.0);
    for &v in z {
        s = s.add(exp_dd(Dd::new(v - m)));
    }
    let lse = Dd::new(m).add(ln_dd(s));
    z.iter().map(|&v| Dd::new(v).sub(lse)).collect()
}

#[test]
fn double_double_textbook_oracle_agrees() {
    // The textbook formula evaluated with ~32 digits: a check of the value and
    // gradient that shares no code or formula with the centred computation.
    assert!((exp_dd(Dd::new(1.0)).to_f64() - std::f64::consts::E).abs() < 1e-16);
    assert!((ln_dd(Dd::new(10.0)).to_f64() - std::f64::consts::LN_10).abs() < 1e-16);
    let mut rng = SmallRng::seed_from_u64(16);
    let mut worst = 0.0f64;
    let mut checked = 0;
    for v in [2, 7, 50, 300] {
        for sigma in [1.0, 3.0, 30.0] {
            for gap in [1.0, 1e-3, 1e-5] {
                let (da, db) = make::<f32>(&mut rng, 1, v, v, sigma, 10.0, gap);
                let a = Logits::dense(&da, 1, v).unwrap();
                let b = Logits::dense(&db, 1, v).unwrap();
                let (ar, br) = (row64(&a, 0), row64(&b, 0));
                let (la, lb) = (log_softmax_dd(&ar), log_softmax_dd(&br));
                let o = opts(KlDirection::Forward, Reduction::Sum, 1.0);
                let (out, g) = kl_div_grad(&a, &b, None, &o, 1.0, false).unwrap();
                let mut kl = Dd::new(0.0);
                let mut q_p = vec![0.0; v];
                for i in 0..v {
                    let p = exp_dd(la[i]);
                    kl = kl.add(p.mul(la[i].sub(lb[i])));
                    q_p[i] = exp_dd(lb[i]).sub(p).to_f64();
                }
                let kl = kl.to_f64();
                let what = format!("V={v} σ={sigma} gap={gap}");
                // The double-double textbook value itself is only good to about
                // 2^-104·|log-softmax| absolute; below that it is the less exact one.
                let big = ar.iter().chain(&br).fold(1.0f64, |m, x| m.max(x.abs()));
                let dd_floor = 1e-30 * big;
                let err = rel_err(out.value, kl);
                assert!(
                    (out.value - kl).abs() <= KL_REL * kl + dd_floor,
                    "{what}: {:e} vs {kl:e} (rel {err:e})",
                    out.value
                );
                if kl > 1e14 * dd_floor {
                    worst = worst.max(err);
                    checked += 1;
                }
                let top = q_p.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                for i in 0..v {
                    let e = (g.model[i] - q_p[i]).abs();
                    assert!(e <= GRAD_TOL * (top + q_p[i].abs()), "{what} grad {i}");
                }
            }
        }
    }
    // Rows far enough above the double-double floor to be checked relatively.
    assert!(checked >= 20, "only {checked} rows checked relatively");
    eprintln!("worst relative KL error against double-double ({checked} rows): {worst:e}");
}

#[test]
fn textbook_f64_fails_on_peaked_rows_where_this_holds() {
    // σ = 30, gap 1e-5: even in f64 the textbook formula is off by far more than
    // the 1e-12 bound (up to 100% in the note's table), which is why the oracles
    // here are not textbook f64.
    let mut rng = SmallRng::seed_from_u64(17);
    let v = 50_257;
    let (da, db) = make::<f32>(&mut rng, 1, v, v, 30.0, 0.0, 1e-5);
    let a = Logits::dense(&da, 1, v).unwrap();
    let b = Logits::dense(&db, 1, v).unwrap();
    let (ar, br) = (row64(&a, 0), row64(&b, 0));
    let want = oracle_side(&ar, &br, 1.0).kl;
    let ours = kl_div(&a, &b, None, &KlOptions::default()).unwrap().value;
    let lse = |z: &[f64]| {
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
    };
    let (la, lb) = (lse(&ar), lse(&br));
    let textbook: f64 = (0..v)
        .map(|i| (ar[i] - la).exp() * ((ar[i] - la) - (br[i] - lb)))
        .sum();
    assert!(want > 1e-16 && want < 1e-7, "KL {want:e}");
    eprintln!(
        "KL {want:e}: ours rel {:e}, textbook f64 rel {:e}",
        rel_err(ours, want),
        rel_err(textbook, want)
    );
    assert!(rel_err(ours, want) <= KL_REL, "ours {ours:e} vs {want:e}");
    assert!(
        rel_err(textbook, want) > 1e-7,
        "textbook f64 {textbook:e} unexpectedly close to {want:e}"
    );
}

#[test]
fn strides_may_differ_and_padding_is_never_read() {
    let mut rng = SmallRng::seed_from_u64(18);
    let (rows, v) = (5, 1_037);
    let (da, db) = make::<bf16>(&mut rng, rows, v, v, 3.0, 0.0, 0.01);
    // The model logits again, 29 NaN-padded slots apart.
    let stride = v + 29;
    let mut dbs = vec![bf16::from_f64(f64::NAN); rows * stride];
    for r in 0..rows {
        dbs[r * stride..r * stride + v].copy_from_slice(&db[r * v..(r + 1) * v]);
    }
    let a = Logits::dense(&da, rows, v).unwrap();
    let b = Logits::dense(&db, rows, v).unwrap();
    let bs = Logits::new(&dbs, rows, v, stride).unwrap();
    for dir in DIRS {
        let o = opts(dir, Reduction::MeanRows, 1.0);
        let (x, gx) = kl_div_grad(&a, &b, None, &o, 1.0, true).unwrap();
        let (y, gy) = kl_div_grad(&a, &bs, None, &o, 1.0, true).unwrap();
        assert!(x.per_row.iter().all(|k| k.is_finite() && *k > 0.0));
        assert_eq!(x, y);
        assert_eq!(gx, gy);
    }
}

// ------------------------------------------------- logits far apart in magnitude

/// The value and gradients of rows `a`, `b` (several rows of `vocab`) against the
/// oracle on `a − a_shift`, `b − b_shift`: the same divergence (softmax ignores a
/// constant), on small inputs the oracle handles exactly. Each shift must be
/// exact for the elements it is applied to (the callers use values of T near it).
#[allow(clippy::too_many_arguments)]
fn check_shifted<T: Element>(
    a: &[T],
    b: &[T],
    vocab: usize,
    a_shift: f64,
    b_shift: f64,
    tau: f32,
    what: &str,
) -> f64 {
    let rows = a.len() / vocab;
    let la = Logits::dense(a, rows, vocab).unwrap();
    let lb = Logits::dense(b, rows, vocab).unwrap();
    let mut worst = 0.0f64;
    for dir in DIRS {
        let o = opts(dir, Reduction::Sum, tau);
        let (out, g) = kl_div_grad(&la, &lb, None, &o, 1.0, true).unwrap();
        let gt = g.target.unwrap();
        for r in 0..rows {
            let ar: Vec<f64> = a[r * vocab..(r + 1) * vocab]
                .iter()
                .map(|x| x.to_f64() - a_shift)
                .collect();
            let br: Vec<f64> = b[r * vocab..(r + 1) * vocab]
                .iter()
                .map(|x| x.to_f64() - b_shift)
                .collect();
            let (kl, ga, gb) = oracle_row(&ar, &br, dir, tau as f64);
            let got = out.per_row[r];
            assert!(
                kl.is_finite() && kl > 0.0,
                "{what} {dir:?}: test data ({kl})"
            );
            let e = rel_err(got, kl);
            assert!(
                e <= KL_REL,
                "{what} {dir:?} row {r}: KL {got:e} vs {kl:e} (rel {e:e})"
            );
            worst = worst.max(e);
            let rg = r * vocab..(r + 1) * vocab;
            for (name, got, want) in [
                ("model", &g.model[rg.clone()], &gb),
                ("target", &gt[rg], &ga),
            ] {
                let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                for i in 0..vocab {
                    let e = (got[i] - want[i]).abs();
                    assert!(
                        e <= GRAD_TOL * (scale + want[i].abs()),
                        "{what} {dir:?} row {r} d/d{name}[{i}]: {:e} vs {:e}",
                        got[i],
                        want[i]
                    );
                }
            }
        }
    }
    worst
}

/// `a − b` is not exact in f64 once the two logits' exponents differ by more
/// than 53 − (significand bits): the difference must be carried exactly anyway.
#[test]
fn logits_far_apart_in_magnitude_keep_the_bound() {
    // The row: P uniform, Q = softmax([0, 1]); KL = ln(1 + e) − 1/2 − ln 2.
    let (o, _, _) = one_row(&[1e16, 1e16], &[0.0, 1.0], KlDirection::Forward);
    let want = (1.0 + std::f64::consts::E).ln() - 0.5 - std::f64::consts::LN_2;
    assert!(
        rel_err(o.per_row[0], want) <= KL_REL,
        "{} vs {want}",
        o.per_row[0]
    );

    let mut rng = SmallRng::seed_from_u64(77);
    let mut worst = 0.0f64;
    // f32, one side at a large offset o, the other near 0, in both roles:
    // (1) the far side constant (its softmax uniform), the near one ~ N(0, 9);
    // (2) the far side o + {0, 1, 2} ulps at τ = ulp(o) (spread over three
    //     levels), the near one ~ 2^-12·τ·N(0, 9): 35 binades apart.
    for offset in [1e10f32, 1e16, 3e38, -1e12] {
        let ulp = (f32::from_bits(offset.abs().to_bits() + 1) - offset.abs()) as f64;
        let rows = 3;
        for (vocab, tau) in [(3usize, 1.0f32), (1000, 1.0), (5000, 2.5)] {
            let far = vec![offset; rows * vocab];
            let near: Vec<f32> = (0..rows * vocab)
                .map(|_| (3.0 * normal(&mut rng)) as f32)
                .collect();
            let what = format!("f32 offset {offset:e} constant, V={vocab} τ={tau}");
            worst = worst.max(check_shifted(
                &far,
                &near,
                vocab,
                offset as f64,
                0.0,
                tau,
                &what,
            ));
            worst = worst.max(check_shifted(
                &near,
                &far,
                vocab,
                0.0,
                offset as f64,
                tau,
                &what,
            ));
        }
        let vocab = 2000;
        let far: Vec<f32> = (0..rows * vocab)
            .map(|i| (offset as f64 + ulp * (i % 3) as f64) as f32)
            .collect();
        let near: Vec<f32> = (0..rows * vocab)
            .map(|_| (ulp * 2f64.powi(-12) * 3.0 * normal(&mut rng)) as f32)
            .collect();
        let tau = ulp as f32;
        let what = format!("f32 offset {offset:e} three levels, τ = ulp");
        worst = worst.max(check_shifted(
            &far,
            &near,
            vocab,
            offset as f64,
            0.0,
            tau,
            &what,
        ));
        worst = worst.max(check_shifted(
            &near,
            &far,
            vocab,
            0.0,
            offset as f64,
            tau,
            &what,
        ));
    }
    // bf16 (8 significand bits, f32's exponent range) and f16 (whose range is
    // too small for an inexact difference: checked all the same).
    for (offset, dtype) in [(3e38f64, "bf16"), (1e20, "bf16"), (65504.0, "f16")] {
        let vocab = 700;
        let small: Vec<f64> = (0..2 * vocab).map(|_| 3.0 * normal(&mut rng)).collect();
        let what = format!("{dtype} offset {offset:e}");
        if dtype == "bf16" {
            let big = vec![bf16::from_f64(offset); 2 * vocab];
            let s: Vec<bf16> = small.iter().map(|&x| bf16::from_f64(x)).collect();
            let shift = big[0].to_f64();
            worst = worst.max(check_shifted(&big, &s, vocab, shift, 0.0, 1.0, &what));
            worst = worst.max(check_shifted(&s, &big, vocab, 0.0, shift, 1.0, &what));
        } else {
            let big = vec![f16::from_f64(offset); 2 * vocab];
            let s: Vec<f16> = small.iter().map(|&x| f16::from_f64(x * 1e-3)).collect();
            let shift = big[0].to_f64();
            worst = worst.max(check_shifted(&big, &s, vocab, shift, 0.0, 1e-3, &what));
            worst = worst.max(check_shifted(&s, &big, vocab, 0.0, shift, 1e-3, &what));
        }
    }
    eprintln!("far-apart logits: worst relative KL error {worst:e}");
}
