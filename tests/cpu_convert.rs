//! The block conversions of the CPU reference give exactly the bits of
//! `Element::to_f32` / `Element::from_f64`: exhaustively over the half formats'
//! values and the midpoints between them, and on random f64 bit patterns.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tram_kernels::cpu::convert::{narrow, widen};
use tram_kernels::{bf16, f16, Element};

fn from_bits16<T: Element>(b: u16) -> T {
    bytemuck::cast_slice::<u16, T>(&[b])[0]
}

fn next_up(x: f64) -> f64 {
    if x == 0.0 {
        return f64::from_bits(1);
    }
    f64::from_bits(if x > 0.0 {
        x.to_bits() + 1
    } else {
        x.to_bits() - 1
    })
}

fn next_down(x: f64) -> f64 {
    -next_up(-x)
}

/// Round to nearest, ties to even, by search over every finite positive value of
/// a 16-bit format (bits 1..=max_bits, increasing): the exact oracle.
fn rne16(x: f64, table: &[f64], max_bits: u16) -> u16 {
    let sign = if x.is_sign_negative() { 0x8000u16 } else { 0 };
    let a = x.abs();
    if a == 0.0 {
        return sign;
    }
    let max = table[max_bits as usize];
    let over = max + (max - table[max_bits as usize - 1]) / 2.0;
    if a >= over {
        return sign | (max_bits + 1); // inf: ties go to inf (max is odd)
    }
    // lo = largest value ≤ a (index = bits), hi = the next one.
    let lo = table.partition_point(|&v| v <= a) - 1;
    let hi = (lo + 1).min(max_bits as usize);
    let (dl, dh) = (a - table[lo], table[hi] - a);
    let bits = if dl < dh || (dl == dh && lo % 2 == 0) {
        lo
    } else {
        hi
    };
    sign | bits as u16
}

/// `from_f64` against the exact oracle, for a 16-bit format (NaN: any NaN).
fn check_oracle<T: Element>(xs: &[f64]) {
    let max_bits: u16 = if T::DTYPE == tram_kernels::DType::F16 {
        0x7bff
    } else {
        0x7f7f
    };
    let table: Vec<f64> = (0..=max_bits)
        .map(|b| from_bits16::<T>(b).to_f64())
        .collect();
    for &x in xs {
        let got = T::from_f64(x);
        if x.is_nan() {
            assert!(got.to_f64().is_nan());
            continue;
        }
        let want = rne16(x, &table, max_bits) as u32;
        assert_eq!(
            got.to_bits_u32(),
            want,
            "{:?} {x:e} ({:#x})",
            T::DTYPE,
            x.to_bits()
        );
    }
}

/// `narrow` against `from_f64`, bit for bit, in blocks of odd sizes.
fn check_narrow<T: Element>(xs: &[f64]) {
    for block in xs.chunks(511) {
        let mut got = vec![T::default(); block.len()];
        let mut scratch = vec![0.0f32; block.len()];
        narrow(block, &mut got, &mut scratch).unwrap();
        for (g, &x) in got.iter().zip(block) {
            let want = T::from_f64(x);
            assert_eq!(
                g.to_bits_u32(),
                want.to_bits_u32(),
                "{:?}: {x:e} ({:#x})",
                T::DTYPE,
                x.to_bits()
            );
        }
    }
}

/// Every value of a 16-bit format, the midpoints to the next value, and one f64
/// ulp either side of each midpoint; widening of every bit pattern.
fn exhaustive16<T: Element>() {
    let all: Vec<T> = (0..=u16::MAX).map(from_bits16).collect();
    let mut buf = vec![0.0f32; all.len()];
    let wide = widen(&all, &mut buf).unwrap();
    for (w, v) in wide.iter().zip(&all) {
        let want = v.to_f32();
        assert!(
            w.to_bits() == want.to_bits() || (w.is_nan() && want.is_nan()),
            "{:?} {:#x}",
            T::DTYPE,
            v.to_bits_u32()
        );
    }
    let mut xs = Vec::new();
    for b in 0..=u16::MAX {
        let v = from_bits16::<T>(b).to_f64();
        if v.is_nan() {
            xs.push(v);
            continue;
        }
        xs.push(v);
        // The next value away from zero (inf after the largest finite value).
        let w = from_bits16::<T>(b.wrapping_add(1)).to_f64();
        if w.is_nan() || (w.signum() != v.signum()) {
            continue;
        }
        let mid = if w.is_infinite() {
            // The rounding boundary beyond the largest finite value.
            v + (v - from_bits16::<T>(b - 1).to_f64()) / 2.0
        } else {
            (v + w) / 2.0
        };
        xs.extend([mid, next_up(mid), next_down(mid)]);
    }
    check_narrow::<T>(&xs);
    check_oracle::<T>(&xs);
}

#[test]
fn bf16_exhaustive() {
    exhaustive16::<bf16>();
}

#[test]
fn f16_exhaustive() {
    exhaustive16::<f16>();
}

fn specials() -> Vec<f64> {
    let mut v = vec![
        0.0,
        -0.0,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        -f64::NAN,
        f64::from_bits(0x7ff0_0000_0000_0001),
        f64::from_bits(0xfff8_dead_beef_0001),
        f64::MAX,
        f64::MIN,
        f64::MIN_POSITIVE,
        f64::from_bits(1),
        f32::MAX as f64,
        next_up(f32::MAX as f64),
        f32::MIN_POSITIVE as f64,
        2f64.powi(-149),
        2f64.powi(-150),
        next_up(2f64.powi(-150)),
        2f64.powi(-134),
        next_up(2f64.powi(-134)),
        2f64.powi(-25),
        next_up(2f64.powi(-25)),
        65504.0,
        65520.0,
        next_down(65520.0),
    ];
    v.extend(v.clone().iter().map(|x| -x));
    v
}

#[test]
fn random_and_special_f64() {
    let mut rng = SmallRng::seed_from_u64(7);
    let mut xs = specials();
    // Random bit patterns over the whole f64 range, and concentrated in the
    // range of the formats (exponents 2^-160 .. 2^130).
    for _ in 0..1_000_000 {
        xs.push(f64::from_bits(rng.random()));
        let e: i32 = rng.random_range(-160..130);
        let m: f64 = rng.random_range(1.0..2.0);
        xs.push(if rng.random() { m } else { -m } * 2f64.powi(e));
    }
    check_narrow::<f32>(&xs);
    check_narrow::<bf16>(&xs);
    check_narrow::<f16>(&xs);
    check_oracle::<bf16>(&xs);
    check_oracle::<f16>(&xs);
    // Widening f32 is the identity.
    let f: Vec<f32> = xs.iter().map(|&x| x as f32).collect();
    let mut buf = vec![0.0f32; f.len()];
    let w = widen(&f, &mut buf).unwrap();
    assert!(w.iter().zip(&f).all(|(a, b)| a.to_bits() == b.to_bits()));
}

/// Buffers of the wrong length are an `Err` (they panicked, and `narrow` into a
/// short output silently dropped values), for every element type; a short
/// scratch only makes f16 take the element-wise path, with the same bits.
#[test]
fn wrong_lengths_are_errors() {
    fn check<T: Element>() {
        let src: Vec<T> = [1.5f64, -2.25, 3.0]
            .iter()
            .map(|&x| T::from_f64(x))
            .collect();
        let mut short = [0.0f32; 2];
        assert!(widen(&src, &mut short).is_err(), "{:?} widen", T::DTYPE);
        let mut long = [f32::NAN; 4];
        assert_eq!(widen(&src, &mut long).unwrap(), &[1.5, -2.25, 3.0]);

        let vals = [1.0f64 / 3.0, -7.5, 65504.0];
        let poison = T::from_f64(99.0);
        for n in [2usize, 4] {
            let mut dst = vec![poison; n];
            let r = narrow(&vals, &mut dst, &mut [0.0; 8]);
            assert!(r.is_err(), "{:?} narrow into {n}", T::DTYPE);
            assert!(
                dst.iter().all(|&d| d == poison),
                "{:?}: written on error",
                T::DTYPE
            );
        }
        for scratch_len in [0usize, 2, 3] {
            let mut dst = vec![poison; 3];
            narrow(&vals, &mut dst, &mut vec![0.0; scratch_len]).unwrap();
            for (d, &x) in dst.iter().zip(&vals) {
                assert_eq!(
                    d.to_bits_u32(),
                    T::from_f64(x).to_bits_u32(),
                    "{:?}",
                    T::DTYPE
                );
            }
        }
    }
    check::<f32>();
    check::<bf16>();
    check::<f16>();
}
