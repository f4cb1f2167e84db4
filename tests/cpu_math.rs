//! `cpu::math::exp` against a double-double reference: within 1 ulp of the
//! exact value over the whole range, subnormal results included, and the
//! special values exact.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tram_kernels::cpu::math::exp;

/// A double-double: `hi + lo` with |lo| ≤ ulp(hi)/2.
type Dd = (f64, f64);

fn two_sum(a: f64, b: f64) -> Dd {
    let s = a + b;
    let bb = s - a;
    (s, (a - (s - bb)) + (b - bb))
}

fn two_prod(a: f64, b: f64) -> Dd {
    let p = a * b;
    (p, a.mul_add(b, -p))
}

fn add(a: Dd, b: Dd) -> Dd {
    let (s, e) = two_sum(a.0, b.0);
    two_sum(s, e + a.1 + b.1)
}

fn mul(a: Dd, b: Dd) -> Dd {
    let (p, e) = two_prod(a.0, b.0);
    two_sum(p, e + a.0 * b.1 + a.1 * b.0)
}

/// a / j for a small integer j, to double-double accuracy.
fn div_int(a: Dd, j: f64) -> Dd {
    let q = a.0 / j;
    let (p, e) = two_prod(q, j);
    two_sum(q, ((a.0 - p) - e + a.1) / j)
}

/// e^x as (m, k) with e^x = m·2^k, m a double-double in [0.7, 1.5]: ln 2 in two
/// parts (~2^-106), r = x − k·ln 2 in double-double, and 30 terms of the series.
fn exp_ref(x: f64) -> (Dd, i32) {
    let ln2: Dd = (
        f64::from_bits(0x3fe6_2e42_fefa_39ef),
        f64::from_bits(0x3c7a_bc9e_3b39_803f),
    );
    let k = (x / ln2.0).round();
    let kl = mul((k, 0.0), ln2);
    let r = add((x, 0.0), (-kl.0, -kl.1));
    let (mut sum, mut term): (Dd, Dd) = ((1.0, 0.0), (1.0, 0.0));
    for j in 1..=30 {
        term = div_int(mul(term, r), j as f64);
        sum = add(sum, term);
    }
    (sum, k as i32)
}

/// 2^k for any k that keeps the result normal or zero.
fn pow2(k: i32) -> f64 {
    let half = k / 2;
    2f64.powi(half) * 2f64.powi(k - half)
}

/// |ours − exact| in ulps of the exact value (binade ulp; below the normal
/// range the subnormal spacing 2^-1074).
fn ulp_error(x: f64) -> f64 {
    let ours = exp(x);
    let ((hi, lo), k) = exp_ref(x);
    // Work in the units of m: ours·2^-k, exact for every result of interest.
    let scaled = ours * pow2(-k.clamp(-1000, 1000)) * pow2(-(k - k.clamp(-1000, 1000)));
    let diff = ((scaled - hi) - lo).abs();
    let binade = f64::from_bits(hi.to_bits() & 0x7ff0_0000_0000_0000);
    let ulp_normal = binade * f64::EPSILON;
    // 2^-1074 in the units of m.
    let ulp_sub = pow2(-1074 - k);
    let exact_is_subnormal = k + (binade.log2() as i32) < -1022;
    diff / if exact_is_subnormal {
        ulp_sub
    } else {
        ulp_normal
    }
}

#[test]
fn exp_within_one_ulp_on_random_arguments() {
    let mut rng = SmallRng::seed_from_u64(0x05ee_de4b);
    // Where the KL uses it (x ≤ 0, most near 0), the whole normal range, and
    // the subnormal tail.
    let ranges: [(f64, f64); 5] = [
        (-1.0, 1.0),
        (-40.0, 0.0),
        (-708.0, 0.0),
        (-20.0, 709.7),
        (-745.1, -708.4),
    ];
    for (lo, hi) in ranges {
        let mut worst = (0.0f64, 0.0f64);
        for _ in 0..400_000 {
            let x = rng.random_range(lo..hi);
            let e = ulp_error(x);
            if e > worst.0 {
                worst = (e, x);
            }
        }
        assert!(
            worst.0 <= 1.0,
            "exp on [{lo}, {hi}]: {:.4} ulp at x = {:e}",
            worst.0,
            worst.1
        );
    }
}

#[test]
fn exp_near_integer_multiples_of_ln2() {
    // r = x − k·ln 2 is smallest here, where a careless reduction loses most.
    let mut rng = SmallRng::seed_from_u64(17);
    for k in -1070..=1023 {
        let x0 = k as f64 * std::f64::consts::LN_2;
        for _ in 0..20 {
            let x = x0 + rng.random_range(-1e-9..1e-9) * (1.0 + x0.abs());
            if x > 709.78 {
                continue;
            }
            let e = ulp_error(x);
            assert!(e <= 1.0, "{e:.4} ulp at x = {x:e}");
        }
    }
}

#[test]
fn exp_special_values() {
    assert_eq!(exp(0.0), 1.0);
    assert_eq!(exp(-0.0), 1.0);
    assert_eq!(exp(f64::NEG_INFINITY), 0.0);
    assert_eq!(exp(f64::INFINITY), f64::INFINITY);
    assert!(exp(f64::NAN).is_nan());
    // Overflow and underflow thresholds.
    assert_eq!(exp(709.79), f64::INFINITY);
    assert!(exp(709.78).is_finite());
    assert_eq!(exp(-745.2), 0.0);
    assert_eq!(exp(-745.1), f64::from_bits(1));
    assert_eq!(exp(-1e300), 0.0);
    assert_eq!(exp(1e300), f64::INFINITY);
    // Tiny arguments: 1 + x rounds to 1.
    assert_eq!(exp(1e-300), 1.0);
    assert_eq!(exp(-1e-17), 1.0);
}
