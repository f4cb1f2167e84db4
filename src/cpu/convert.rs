//! Block conversions for the CPU reference's inner loops: exact widening of
//! f32/f16/bf16 to f32, and correctly rounded narrowing of f64 that gives the
//! same bits as [`Element::from_f64`] (the tests compare both with an exact
//! oracle). `half` converts one element at a time through branches; these run a
//! block at a time and vectorise.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::dtype::{round_to_odd_f32, DType, Element};
use crate::error::{ensure, Result};

/// `src` widened to f32 (exact for every element type). For f32 this is `src`
/// itself; otherwise the values are written to `buf`.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument): `buf` shorter than `src`.
#[inline(always)]
pub fn widen<'a, T: Element>(src: &'a [T], buf: &'a mut [f32]) -> Result<&'a [f32]> {
    ensure!(
        buf.len() >= src.len(),
        "widen: a buffer of {} for {} elements",
        buf.len(),
        src.len()
    );
    Ok(widen_into(src, buf))
}

/// [`widen`] for the reference's own loops, whose buffers are sized by
/// construction: converts the first `min(src.len(), buf.len())` elements.
#[inline(always)]
pub(crate) fn widen_into<'a, T: Element>(src: &'a [T], buf: &'a mut [f32]) -> &'a [f32] {
    let n = src.len().min(buf.len());
    let (src, dst) = (&src[..n], &mut buf[..n]);
    match T::DTYPE {
        DType::F32 => {
            if let Ok(s) = bytemuck::try_cast_slice::<T, f32>(src) {
                return s;
            }
        }
        DType::BF16 => {
            if let Ok(s) = bytemuck::try_cast_slice::<T, u16>(src) {
                // bf16 is the top half of an f32.
                for (d, &b) in dst.iter_mut().zip(s) {
                    *d = f32::from_bits((b as u32) << 16);
                }
                return dst;
            }
        }
        DType::F16 => {
            if let Ok(s) = bytemuck::try_cast_slice::<T, f16>(src) {
                // F16C when the CPU has it (runtime detection in `half`).
                s.convert_to_f32_slice(dst);
                return dst;
            }
        }
    }
    // Not reached (the casts match DTYPE); kept so nothing here can panic.
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
    dst
}

/// `dst[k] = T::from_f64(src[k])`, bit for bit, rounding once to nearest even.
/// `scratch` speeds up f16 when it is at least `src.len()` long; shorter (or
/// empty) it is not used, with the same result.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument): `dst` and `src` of different lengths (nothing is written then).
#[inline(always)]
pub fn narrow<T: Element>(src: &[f64], dst: &mut [T], scratch: &mut [f32]) -> Result<()> {
    ensure!(
        dst.len() == src.len(),
        "narrow: {} values into {} elements",
        src.len(),
        dst.len()
    );
    narrow_into(src, dst, scratch);
    Ok(())
}

/// [`narrow`] for the reference's own loops, whose buffers are sized by
/// construction: converts the first `min(src.len(), dst.len())` values.
#[inline(always)]
pub(crate) fn narrow_into<T: Element>(src: &[f64], dst: &mut [T], scratch: &mut [f32]) {
    let n = src.len().min(dst.len());
    let (src, dst) = (&src[..n], &mut dst[..n]);
    match T::DTYPE {
        DType::F32 => {
            if let Ok(d) = bytemuck::try_cast_slice_mut::<T, f32>(dst) {
                for (d, &x) in d.iter_mut().zip(src) {
                    *d = x as f32;
                }
                return;
            }
        }
        DType::BF16 => {
            if let Ok(d) = bytemuck::try_cast_slice_mut::<T, u16>(dst) {
                // f32 → bf16 to nearest even on the bits (inf stays inf); NaN
                // (whose bits this would garble) is fixed up after, off the fast loop.
                let mut any_nan = false;
                for (d, &x) in d.iter_mut().zip(src) {
                    let b = round_to_odd_f32(x).to_bits();
                    *d = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
                    any_nan |= x.is_nan();
                }
                if any_nan {
                    for (d, &x) in d.iter_mut().zip(src) {
                        if x.is_nan() {
                            *d = bf16::from_f64(x).to_bits();
                        }
                    }
                }
                return;
            }
        }
        DType::F16 => {
            if scratch.len() >= n {
                if let Ok(d) = bytemuck::try_cast_slice_mut::<T, f16>(dst) {
                    let s = &mut scratch[..n];
                    let mut any_nan = false;
                    for (o, &x) in s.iter_mut().zip(src) {
                        *o = round_to_odd_f32(x);
                        any_nan |= x.is_nan();
                    }
                    // F16C when the CPU has it (runtime detection in `half`).
                    d.convert_from_f32_slice(s);
                    if any_nan {
                        for (d, &x) in d.iter_mut().zip(src) {
                            if x.is_nan() {
                                *d = f16::from_f64(x);
                            }
                        }
                    }
                    return;
                }
            }
        }
    }
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = T::from_f64(x);
    }
}
