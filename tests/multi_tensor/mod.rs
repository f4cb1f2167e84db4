//! Shared by the GPU tests of the parameter-group operations: random groups of
//! mixed sizes on the host, uploaded as sub-slices (some off the 16-byte
//! vector alignment, some at different misalignments per buffer) of padded
//! device buffers whose padding is poisoned, so writes out of bounds show.
#![allow(dead_code)]

use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use tram_kernels::cuda::group::{DeviceBuf, ParamGroup, TensorViews};
use tram_kernels::cuda::CudaBackend;
use tram_kernels::{DType, Element};

/// Mixed sizes: single elements, odd lengths, chunk boundaries (65536), an empty
/// tensor and 2^20 + 3.
pub const SIZES: [usize; 13] = [
    1,
    7,
    3,
    1000,
    4097,
    65_535,
    65_536,
    65_537,
    0,
    131_075,
    (1 << 20) + 3,
    2,
    33,
];

/// Elements of padding before and after each device buffer.
pub const PAD: usize = 8;

pub fn rand_vec<T: Element>(rng: &mut SmallRng, n: usize, scale: f64) -> Vec<T> {
    (0..n)
        .map(|_| {
            let mag = scale * 2f64.powf(rng.random_range(-6.0..2.0));
            T::from_f64(if rng.random::<bool>() { mag } else { -mag })
        })
        .collect()
}

/// A value of `T` from its bit pattern.
pub fn from_bits<T: Element>(bits: u32) -> T {
    match size_of::<T>() {
        4 => bytemuck::cast_slice::<u32, T>(&[bits])[0],
        _ => bytemuck::cast_slice::<u16, T>(&[bits as u16])[0],
    }
}

/// A NaN bit pattern no kernel produces.
pub fn poison<T: Element>() -> T {
    from_bits(if size_of::<T>() == 4 {
        0x7fa5_a5a5
    } else {
        0x7da5
    })
}

pub fn bits<T: Element>(v: &[T]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits_u32()).collect()
}

/// ulp of `P` at `x` (the spacing of P's numbers in x's binade; subnormal
/// spacing below the normal range).
pub fn ulp<P: Element>(x: f64) -> f64 {
    let (mant, emin) = match P::DTYPE {
        DType::F32 => (23, -126),
        DType::F16 => (10, -14),
        DType::BF16 => (7, -126),
    };
    let e = if x == 0.0 {
        emin
    } else {
        (x.abs().log2().floor() as i32).max(emin)
    };
    2f64.powi(e - mant)
}

/// Which element offset each buffer of a tensor starts at inside its padded
/// allocation: 0 (aligned), the same odd offset for all (a common
/// misalignment: scalar head, then vectors) or different ones (all scalar).
pub fn offsets(rng: &mut SmallRng) -> [usize; 3] {
    match rng.random_range(0..3) {
        0 => [0, 0, 0],
        1 => {
            let o = rng.random_range(1..8);
            [o, o, o]
        }
        _ => [
            rng.random_range(0..8),
            rng.random_range(0..8),
            rng.random_range(0..8),
        ],
    }
}

/// A random group on the host: θ (or master weights), g, which tensors have a
/// gradient, and where each buffer sits in its allocation.
pub struct Case<P, G> {
    pub theta: Vec<Vec<P>>,
    pub master: Vec<Vec<f32>>,
    pub grad: Vec<Vec<G>>,
    pub has_grad: Vec<bool>,
    pub offs: Vec<[usize; 3]>,
}

impl<P: Element, G: Element> Case<P, G> {
    /// `inactive`: every third tensor has no gradient this step.
    pub fn random(seed: u64, sizes: &[usize], grad_scale: f64, inactive: bool) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let theta = sizes.iter().map(|&n| rand_vec(&mut rng, n, 1.0)).collect();
        let master = sizes.iter().map(|&n| rand_vec(&mut rng, n, 1.0)).collect();
        let grad = sizes
            .iter()
            .map(|&n| rand_vec(&mut rng, n, grad_scale))
            .collect();
        let has_grad = (0..sizes.len()).map(|i| !inactive || i % 3 != 1).collect();
        let offs = sizes.iter().map(|_| offsets(&mut rng)).collect();
        Self {
            theta,
            master,
            grad,
            has_grad,
            offs,
        }
    }

    pub fn grads(&self) -> Vec<Option<&[G]>> {
        self.grad
            .iter()
            .zip(&self.has_grad)
            .map(|(g, &a)| a.then_some(g.as_slice()))
            .collect()
    }

    pub fn thetas(&self) -> Vec<&[P]> {
        self.theta.iter().map(|v| v.as_slice()).collect()
    }

    pub fn masters(&self) -> Vec<&[f32]> {
        self.master.iter().map(|v| v.as_slice()).collect()
    }
}

/// A padded device copy of `data` starting at element `PAD + off`.
pub struct Buf<T> {
    pub dev: CudaSlice<T>,
    pub start: usize,
    pub len: usize,
}

impl<T: Element + cudarc::driver::DeviceRepr> Buf<T> {
    pub fn new(stream: &Arc<CudaStream>, off: usize, data: &[T]) -> Self {
        let start = PAD + off;
        let mut host = vec![poison::<T>(); start + data.len() + PAD];
        host[start..start + data.len()].copy_from_slice(data);
        Self {
            dev: stream.clone_htod(&host).unwrap(),
            start,
            len: data.len(),
        }
    }

    /// Poisoned everywhere (an output before a run).
    pub fn poisoned(stream: &Arc<CudaStream>, off: usize, len: usize) -> Self {
        Self::new(stream, off, &vec![poison::<T>(); len])
    }

    pub fn view(&self) -> CudaView<'_, T> {
        self.dev.slice(self.start..self.start + self.len)
    }

    /// The tensor as a raw address and length.
    pub fn raw(&self, stream: &Arc<CudaStream>) -> DeviceBuf {
        let (ptr, _guard) = self.dev.device_ptr(stream);
        DeviceBuf {
            ptr: ptr + (self.start * size_of::<T>()) as u64,
            len: self.len as u64,
        }
    }

    /// The tensor's elements, after checking the padding is still poison.
    pub fn read(&self, stream: &Arc<CudaStream>) -> Vec<T> {
        let all = stream.clone_dtoh(&self.dev).unwrap();
        let p = poison::<T>().to_bits_u32();
        let outside = all[..self.start]
            .iter()
            .chain(&all[self.start + self.len..]);
        assert!(
            outside.into_iter().all(|x| x.to_bits_u32() == p),
            "a kernel wrote outside a tensor"
        );
        all[self.start..self.start + self.len].to_vec()
    }
}

/// The device side of a [`Case`]: θ, g, and one extra P buffer (backup or
/// out), f32 master weights.
pub struct Dev<P, G> {
    pub theta: Vec<Buf<P>>,
    pub grad: Vec<Buf<G>>,
    pub aux: Vec<Buf<P>>,
    pub master: Vec<Buf<f32>>,
}

/// Which optional buffers a group gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// θ, g only (norm of SAM/Fisher/adaptive on θ).
    Plain,
    /// θ, g, backup.
    Backup,
    /// working copy, g, f32 master.
    Master,
    /// θ, g, out.
    Out,
}

impl<P, G> Dev<P, G>
where
    P: Element + cudarc::driver::DeviceRepr,
    G: Element + cudarc::driver::DeviceRepr,
{
    /// θ (the working copy for `Layout::Master`) uploaded from the case; the
    /// aux buffers poisoned.
    pub fn upload(gpu: &CudaBackend, case: &Case<P, G>) -> Self {
        let s = gpu.stream();
        let n = case.theta.len();
        Self {
            theta: (0..n)
                .map(|i| Buf::new(s, case.offs[i][0], &case.theta[i]))
                .collect(),
            grad: (0..n)
                .map(|i| Buf::new(s, case.offs[i][1], &case.grad[i]))
                .collect(),
            aux: (0..n)
                .map(|i| Buf::poisoned(s, case.offs[i][2], case.theta[i].len()))
                .collect(),
            master: (0..n)
                .map(|i| Buf::new(s, case.offs[i][2], &case.master[i]))
                .collect(),
        }
    }

    pub fn group(&self, gpu: &CudaBackend, layout: Layout, has_grad: &[bool]) -> ParamGroup<'_> {
        let tensors: Vec<TensorViews<'_, P, G>> = (0..self.theta.len())
            .map(|i| TensorViews {
                param: self.theta[i].view(),
                grad: self.grad[i].view(),
                backup: (layout == Layout::Backup).then(|| self.aux[i].view()),
                master: (layout == Layout::Master).then(|| self.master[i].view()),
                out: (layout == Layout::Out).then(|| self.aux[i].view()),
            })
            .collect();
        let mut g = ParamGroup::new(gpu, &tensors).unwrap();
        g.set_has_grad(has_grad).unwrap();
        g
    }

    pub fn read_theta(&self, gpu: &CudaBackend) -> Vec<Vec<P>> {
        self.theta.iter().map(|b| b.read(gpu.stream())).collect()
    }

    pub fn read_aux(&self, gpu: &CudaBackend) -> Vec<Vec<P>> {
        self.aux.iter().map(|b| b.read(gpu.stream())).collect()
    }
}

/// A value for element `i` of a big test buffer, from a hash of `i` and `seed`:
/// magnitudes over [2^-6, 2^2) (never zero; a binade from three hash bits, the
/// mantissa from 52 more), both signs. Built from bits: the big tests make
/// billions of them.
pub fn hashed(i: u64, seed: u64) -> f64 {
    let mut z = i.wrapping_add(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let binade = (z >> 61) + 1023 - 6;
    let mag = f64::from_bits((binade << 52) | ((z >> 8) & ((1u64 << 52) - 1)));
    if z & 1 == 0 {
        mag
    } else {
        -mag
    }
}
