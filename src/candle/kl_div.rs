//! The KL divergence over candle logits, as a candle op with its backward.
//!
//! `kl_div(target, model, &opts)` is [`crate::cpu::kl_div::kl_div`] (on candle's CPU
//! device) or [`crate::cuda::kl_div::kl_div`] (on a CUDA device, with the
//! `candle-cuda` feature) applied to two candle tensors of logits, recorded in
//! candle's graph so that `backward()` gives the gradient with respect to
//! either or both: TRAM's trust-region measure, or a distillation loss
//! (teacher logits as `target`, student logits as `model`).
//!
//! # Shapes and layouts
//! Logits are `(..., vocab)`: the last axis is the vocabulary, every leading
//! axis a row (`(batch, vocab)`, `(batch, seq, vocab)`, or `(vocab)` for one
//! row). Both tensors have the same shape and dtype: f32, f16 or bf16. The
//! layout need not be contiguous: a tensor whose vocabulary axis has stride 1
//! and whose rows lie a fixed stride apart (a `narrow` of the vocabulary, a
//! slice of rows, an offset into the storage) is read in place. Anything else
//! (a transposed vocabulary axis, broadcast rows, leading axes that cannot be
//! merged into one row stride) is an error that says to call `.contiguous()`.
//!
//! # Value
//! An f32 tensor whatever the logits' dtype (the crate sums in f64 on the CPU
//! and f32/f64 on the GPU; a bf16 loss would keep 3 significant digits):
//! shape `()` for [`Reduction::Sum`], [`Reduction::MeanRows`] and
//! [`Reduction::MeanElements`], the leading shape `(...)` (one value per row)
//! for [`Reduction::None`]. Use `to_dtype` to mix it with losses of another
//! dtype. Direction, temperature and reductions are those of [`KlOptions`];
//! the error bounds are those of the backend that runs (CPU: 1e-12 relative;
//! GPU: 1e-4 relative per row, see [`crate::cuda::kl_div`]).
//!
//! # Backward
//! The gradient with respect to each input that candle tracks (a `Var`, or a
//! tensor computed from one; a detached teacher gets none), in that input's
//! dtype and shape, contiguous. It is computed afresh from the inputs (one
//! more pass over both, as the crate's gradient recomputes the row statistics)
//! and scaled by the incoming gradient:
//! * scalar reductions: the crate's gradient with that upstream factor (on the
//!   CPU, the f64 gradient of [`crate::cpu::kl_div::kl_div_grad`] with `upstream` = the
//!   incoming f32 value, rounded once to the dtype: the very bits the crate
//!   returns; on CUDA the incoming scalar is read by the kernel from device
//!   memory, no host sync);
//! * [`Reduction::None`]: row r's gradient (weight 1, as for `Sum`) times the
//!   incoming value of row r, in f64 before the one rounding on the CPU; on
//!   CUDA the kernel's gradient in the logits' dtype times the row weights in
//!   candle (one more rounding, one more pass).
//!
//! # Cost
//! CPU: the crate's reference, parallel over rows with rayon; the forward
//! allocates only its output, the backward one f64 buffer per gradient (then
//! the output tensor). CUDA: per call a
//! [`KlWorkspace`](crate::cuda::kl_div::KlWorkspace) (`64 · rows` bytes plus
//! 312 bytes per SM: 40 KiB on a 132-SM H100) and the outputs, allocated
//! zero-filled on candle's stream (a memset of each gradient: one more write of
//! 2 or 4 bytes per element); the forward is two launches, the backward three,
//! plus a 4-byte device copy for a scalar result. Nothing waits on the host
//! where the driver has stream-ordered allocation (cudarc then frees the
//! workspace in stream order); elsewhere cudarc synchronises the stream to free
//! it.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType as CandleDType, Device, Layout, Shape, Tensor};

use crate::config::{KlOptions, Reduction};
use crate::cpu::kl_div::Logits;
use crate::dtype::Element;
use crate::error::ensure;
use crate::{bf16, f16};

/// The KL divergence between target logits (P) and model logits (Q) of the
/// same shape, reduced as `opts` says; see the [module docs](self) for the
/// shapes, the value, the backward and the errors.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use tram_kernels::{candle::kl_div, KlOptions};
///
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// // A frozen teacher and a trainable student, 4 rows of 10 classes.
/// let teacher = Tensor::randn(0f32, 1.0, (4, 10), &dev)?;
/// let student = Var::randn(0f32, 1.0, (4, 10), &dev)?;
/// let loss = kl_div(&teacher, student.as_tensor(), &KlOptions::default())?;
/// let grads = loss.backward()?;
/// let g = grads.get(student.as_tensor()).expect("the student has a gradient");
/// assert_eq!(g.dims(), &[4, 10]);
/// assert!(grads.get(&teacher).is_none()); // not tracked: no gradient computed
/// # Ok(())
/// # }
/// ```
pub fn kl_div(target: &Tensor, model: &Tensor, opts: &KlOptions) -> candle_core::Result<Tensor> {
    target.apply_op2(model, KlDiv::new(*opts)?)
}

/// The op behind [`kl_div`], for `Tensor::apply_op2` (target first, model
/// second) and friends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KlDiv {
    opts: KlOptions,
}

impl KlDiv {
    /// The op with these options; `Err` for a temperature that is not finite
    /// and > 0.
    pub fn new(opts: KlOptions) -> crate::Result<Self> {
        let t = opts.temperature;
        ensure!(
            t.is_finite() && t > 0.0,
            "kl_div: temperature must be finite and > 0, got {t}"
        );
        Ok(Self { opts })
    }

    /// The options the op was built with.
    pub fn options(&self) -> &KlOptions {
        &self.opts
    }

    /// The shape of the value for inputs whose rows have this leading shape.
    fn out_shape(&self, rows: &RowLayout) -> Shape {
        match self.opts.reduction {
            Reduction::None => Shape::from(rows.lead.clone()),
            _ => Shape::from(()),
        }
    }
}

/// A candle layout seen as the crate's row-major logits: `rows × vocab`, row
/// `r` starting at element `offset + r · row_stride` of the storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RowLayout {
    pub(crate) rows: usize,
    pub(crate) vocab: usize,
    pub(crate) row_stride: usize,
    pub(crate) offset: usize,
    /// The leading (row) axes.
    pub(crate) lead: Vec<usize>,
}

impl RowLayout {
    /// Reads `layout` as rows of logits, or says why it cannot.
    pub(crate) fn of(layout: &Layout, what: &str) -> crate::Result<Self> {
        let dims = layout.dims();
        let strides = layout.stride();
        ensure!(
            !dims.is_empty(),
            "kl_div: {what} logits are a scalar; they need a vocabulary axis (the last one)"
        );
        let n = dims.len();
        let vocab = dims[n - 1];
        ensure!(
            vocab > 0,
            "kl_div: {what} logits have an empty vocabulary axis"
        );
        ensure!(
            vocab == 1 || strides[n - 1] == 1,
            "kl_div: the vocabulary axis of the {what} logits has stride {}, not 1 \
             (transposed?): call .contiguous() first",
            strides[n - 1]
        );
        let lead = dims[..n - 1].to_vec();
        let rows = lead
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| crate::Error::InvalidArgument("kl_div: row count overflows".into()))?;
        // The leading axes, inner to outer, must step by one row stride: each
        // axis (of more than one element) strides over the whole of the axes
        // inside it. Axes of size 1 have no say.
        let mut row_stride = None;
        let mut next = 0usize;
        for i in (0..n - 1).rev() {
            if dims[i] == 1 {
                continue;
            }
            match row_stride {
                None => row_stride = Some(strides[i]),
                Some(_) => ensure!(
                    strides[i] == next,
                    "kl_div: the row axes {:?} of the {what} logits (strides {:?}) do not \
                     step by one row stride: call .contiguous() first",
                    &dims[..n - 1],
                    &strides[..n - 1]
                ),
            }
            next = strides[i].checked_mul(dims[i]).ok_or_else(|| {
                crate::Error::InvalidArgument("kl_div: row strides overflow".into())
            })?;
        }
        let row_stride = match row_stride {
            Some(s) if rows > 1 => s,
            _ => vocab,
        };
        ensure!(
            row_stride >= vocab,
            "kl_div: rows of the {what} logits overlap (row stride {row_stride} < vocabulary \
             {vocab}, e.g. broadcast rows): call .contiguous() first"
        );
        Ok(Self {
            rows,
            vocab,
            row_stride,
            offset: layout.start_offset(),
            lead,
        })
    }

    /// The crate's CPU view of these rows in `data` (a whole storage).
    pub(crate) fn logits<'a, T: Element>(
        &self,
        data: &'a [T],
        what: &str,
    ) -> crate::Result<Logits<'a, T>> {
        let data = data.get(self.offset..).ok_or_else(|| {
            crate::Error::InvalidArgument(format!(
                "kl_div: {what} logits start at {} past a storage of {}",
                self.offset,
                data.len()
            ))
        })?;
        Logits::new(data, self.rows, self.vocab, self.row_stride)
    }
}

/// Both inputs' row layouts, which must describe the same shape.
fn row_layouts(target: &Layout, model: &Layout) -> crate::Result<(RowLayout, RowLayout)> {
    ensure!(
        target.dims() == model.dims(),
        "kl_div: target logits are {:?} but model logits are {:?}",
        target.dims(),
        model.dims()
    );
    Ok((
        RowLayout::of(target, "target")?,
        RowLayout::of(model, "model")?,
    ))
}

fn dtype_error(target: CandleDType, model: CandleDType) -> crate::Error {
    crate::Error::InvalidArgument(if target == model {
        format!("kl_div: logits of dtype {target:?}; the crate takes f32, f16 or bf16")
    } else {
        format!("kl_div: target logits are {target:?} but model logits are {model:?}")
    })
}

/// The CPU forward for one dtype: one value, or one per row.
fn cpu_value<T: Element>(
    a: &[T],
    ta: &RowLayout,
    b: &[T],
    tb: &RowLayout,
    opts: &KlOptions,
) -> crate::Result<Vec<f32>> {
    let out = crate::cpu::kl_div::kl_div(
        &ta.logits(a, "target")?,
        &tb.logits(b, "model")?,
        None,
        opts,
    )?;
    Ok(match opts.reduction {
        Reduction::None => out.per_row.iter().map(|&v| v as f32).collect(),
        _ => vec![out.value as f32],
    })
}

/// The CPU gradients for one dtype, as dense `rows × vocab` vectors: the
/// crate's f64 gradient scaled by the incoming gradient `up` (one value, or
/// one per row for `Reduction::None`), rounded once to `T`.
fn cpu_grads<T: Element>(
    a: &[T],
    ta: &RowLayout,
    b: &[T],
    tb: &RowLayout,
    opts: &KlOptions,
    up: &[f32],
    with_target: bool,
) -> crate::Result<(Vec<T>, Option<Vec<T>>)> {
    let per_row = opts.reduction == Reduction::None;
    ensure!(
        up.len() == if per_row { ta.rows } else { 1 },
        "kl_div backward: {} incoming gradient values for {} rows",
        up.len(),
        ta.rows
    );
    let upstream = if per_row { 1.0 } else { up[0] as f64 };
    let (_, g) = crate::cpu::kl_div::kl_div_grad(
        &ta.logits(a, "target")?,
        &tb.logits(b, "model")?,
        None,
        opts,
        upstream,
        with_target,
    )?;
    let vocab = ta.vocab;
    let round = |g: Vec<f64>| -> Vec<T> {
        if per_row {
            g.chunks(vocab)
                .zip(up)
                .flat_map(|(row, &u)| row.iter().map(move |&x| T::from_f64(x * u as f64)))
                .collect()
        } else {
            g.into_iter().map(T::from_f64).collect()
        }
    };
    Ok((round(g.model), g.target.map(round)))
}

impl CustomOp2 for KlDiv {
    fn name(&self) -> &'static str {
        "tram-kl-div"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (ta, tb) = row_layouts(l1, l2)?;
        let o = &self.opts;
        let v = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => cpu_value(a, &ta, b, &tb, o),
            (CpuStorage::F16(a), CpuStorage::F16(b)) => cpu_value(a, &ta, b, &tb, o),
            (CpuStorage::BF16(a), CpuStorage::BF16(b)) => cpu_value(a, &ta, b, &tb, o),
            _ => Err(dtype_error(s1.dtype(), s2.dtype())),
        }?;
        Ok((CpuStorage::F32(v), self.out_shape(&ta)))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (ta, tb) = row_layouts(l1, l2)?;
        let out = cuda::forward(s1, &ta, s2, &tb, &self.opts)?;
        Ok((out, self.out_shape(&ta)))
    }

    fn bwd(
        &self,
        target: &Tensor,
        model: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_target, want_model) = (target.track_op(), model.track_op());
        if !want_target && !want_model {
            return Ok((None, None));
        }
        let (gm, gt) = match target.device() {
            Device::Cpu => self.cpu_bwd(target, model, grad_res, want_target)?,
            #[cfg(feature = "candle-cuda")]
            Device::Cuda(_) => cuda::backward(target, model, grad_res, &self.opts, want_target)?,
            d => {
                return Err(crate::Error::InvalidArgument(format!(
                    "kl_div backward: no implementation on {:?}",
                    d.location()
                ))
                .into())
            }
        };
        Ok((gt, want_model.then_some(gm)))
    }
}

impl KlDiv {
    /// Backward on the CPU: (model gradient, target gradient when asked).
    fn cpu_bwd(
        &self,
        target: &Tensor,
        model: &Tensor,
        grad_res: &Tensor,
        with_target: bool,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let up = grad_res
            .to_dtype(CandleDType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let (s1, l1) = target.storage_and_layout();
        let (s2, l2) = model.storage_and_layout();
        let (ta, tb) = row_layouts(l1, l2)?;
        let (candle_core::Storage::Cpu(c1), candle_core::Storage::Cpu(c2)) = (&*s1, &*s2) else {
            return Err(crate::Error::InvalidArgument(
                "kl_div backward: target and model are not both on the CPU".into(),
            )
            .into());
        };
        let o = &self.opts;
        let shape = target.shape();
        let dev = &Device::Cpu;
        fn wrap<T: candle_core::WithDType>(
            (gm, gt): (Vec<T>, Option<Vec<T>>),
            shape: &Shape,
            dev: &Device,
        ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
            let gm = Tensor::from_vec(gm, shape, dev)?;
            let gt = gt.map(|g| Tensor::from_vec(g, shape, dev)).transpose()?;
            Ok((gm, gt))
        }
        match (c1, c2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                wrap(cpu_grads(a, &ta, b, &tb, o, &up, with_target)?, shape, dev)
            }
            (CpuStorage::F16(a), CpuStorage::F16(b)) => {
                wrap::<f16>(cpu_grads(a, &ta, b, &tb, o, &up, with_target)?, shape, dev)
            }
            (CpuStorage::BF16(a), CpuStorage::BF16(b)) => {
                wrap::<bf16>(cpu_grads(a, &ta, b, &tb, o, &up, with_target)?, shape, dev)
            }
            _ => Err(dtype_error(c1.dtype(), c2.dtype()).into()),
        }
    }
}

/// The CUDA side (feature `candle-cuda`): the crate's kernels on candle's
/// stream, over candle's buffers.
#[cfg(feature = "candle-cuda")]
pub(crate) mod cuda {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorageSlice, DeviceId};
    use candle_core::op::BackpropOp;
    use candle_core::{CudaStorage, Shape, Storage, Tensor};
    use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

    use super::{dtype_error, row_layouts, RowLayout};
    use crate::config::{KlOptions, Reduction};
    use crate::cuda::kl_div::{DeviceLogits, GradOut, KlGrads, KlWorkspace};
    use crate::cuda::CudaBackend;
    use crate::dtype::Element;
    use crate::error::ensure;
    use crate::{bf16, f16};

    /// The crate's backend on a candle device's stream, made once per device.
    pub(crate) fn backend(dev: &CudaDevice) -> crate::Result<Arc<CudaBackend>> {
        static BACKENDS: OnceLock<Mutex<HashMap<DeviceId, Arc<CudaBackend>>>> = OnceLock::new();
        let map = BACKENDS.get_or_init(Default::default);
        // A panic elsewhere while the lock was held leaves a map that is still whole.
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = map.get(&dev.id()) {
            return Ok(b.clone());
        }
        let b = Arc::new(CudaBackend::from_stream(dev.cuda_stream())?);
        map.insert(dev.id(), b.clone());
        Ok(b)
    }

    /// An element type both the crate's kernels and candle's CUDA storage take.
    trait Elem: Element + CudaDType + DeviceRepr + ValidAsZeroBits {}
    impl Elem for f32 {}
    impl Elem for f16 {}
    impl Elem for bf16 {}

    /// The crate's device view of the rows of `s` that `l` describes.
    fn view<'a, T>(
        s: &'a CudaSlice<T>,
        l: &RowLayout,
        what: &str,
    ) -> crate::Result<DeviceLogits<'a, T>> {
        let v = s.try_slice(l.offset..).ok_or_else(|| {
            crate::Error::InvalidArgument(format!(
                "kl_div: {what} logits start at {} past a storage of {}",
                l.offset,
                s.len()
            ))
        })?;
        DeviceLogits::new(v, l.rows, l.vocab, l.row_stride)
    }

    fn forward_t<T: Elem>(
        dev: &CudaDevice,
        a: &CudaSlice<T>,
        ta: &RowLayout,
        b: &CudaSlice<T>,
        tb: &RowLayout,
        opts: &KlOptions,
    ) -> candle_core::Result<CudaStorage> {
        let backend = backend(dev)?;
        let (va, vb) = (view(a, ta, "target")?, view(b, tb, "model")?);
        let mut ws = KlWorkspace::new(&backend, ta.rows.max(1))?;
        let out = match opts.reduction {
            Reduction::None => {
                let mut out = dev.alloc_zeros::<f32>(ta.rows)?;
                let mut o = out.as_view_mut();
                crate::cuda::kl_div::kl_div(&backend, &va, &vb, None, opts, &mut ws, Some(&mut o))?;
                out
            }
            _ => {
                crate::cuda::kl_div::kl_div(&backend, &va, &vb, None, opts, &mut ws, None)?;
                let mut out = dev.alloc_zeros::<f32>(1)?;
                backend
                    .stream()
                    .memcpy_dtod(ws.value(), &mut out)
                    .map_err(crate::Error::from)?;
                out
            }
        };
        // Dropping the workspace frees it after the launches that use it
        // (cudarc: in stream order, or after a stream synchronisation).
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    /// The forward pass on candle's CUDA storage.
    pub(super) fn forward(
        s1: &CudaStorage,
        ta: &RowLayout,
        s2: &CudaStorage,
        tb: &RowLayout,
        opts: &KlOptions,
    ) -> candle_core::Result<CudaStorage> {
        let dev = &s1.device;
        match (&s1.slice, &s2.slice) {
            (CudaStorageSlice::F32(a), CudaStorageSlice::F32(b)) => {
                forward_t(dev, a, ta, b, tb, opts)
            }
            (CudaStorageSlice::F16(a), CudaStorageSlice::F16(b)) => {
                forward_t(dev, a, ta, b, tb, opts)
            }
            (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b)) => {
                forward_t(dev, a, ta, b, tb, opts)
            }
            _ => Err(dtype_error(s1.dtype(), s2.dtype()).into()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn backward_t<T: Elem>(
        dev: &CudaDevice,
        a: &CudaSlice<T>,
        ta: &RowLayout,
        b: &CudaSlice<T>,
        tb: &RowLayout,
        up: Option<(&CudaSlice<f32>, usize)>,
        opts: &KlOptions,
        with_target: bool,
    ) -> candle_core::Result<(CudaStorage, Option<CudaStorage>)> {
        let backend = backend(dev)?;
        let (va, vb) = (view(a, ta, "target")?, view(b, tb, "model")?);
        let mut ws = KlWorkspace::new(&backend, ta.rows.max(1))?;
        let n = ta.rows * ta.vocab;
        let mut gm = dev.alloc_zeros::<T>(n)?;
        let mut gt = if with_target {
            Some(dev.alloc_zeros::<T>(n)?)
        } else {
            None
        };
        let up_view = match up {
            Some((s, off)) => Some(s.try_slice(off..off + 1).ok_or_else(|| {
                crate::Error::InvalidArgument(
                    "kl_div backward: the incoming gradient is outside its storage".into(),
                )
            })?),
            None => None,
        };
        let grads = KlGrads {
            model: GradOut::new(gm.as_view_mut(), ta.vocab),
            target: gt.as_mut().map(|g| GradOut::new(g.as_view_mut(), ta.vocab)),
            upstream: 1.0,
            upstream_device: up_view.as_ref(),
        };
        crate::cuda::kl_div::kl_div_with_grad(
            &backend, &va, &vb, None, opts, &mut ws, None, grads,
        )?;
        let wrap = |g: CudaSlice<T>| CudaStorage::wrap_cuda_slice(g, dev.clone());
        Ok((wrap(gm), gt.map(wrap)))
    }

    /// Backward on CUDA: (model gradient, target gradient when asked).
    pub(super) fn backward(
        target: &Tensor,
        model: &Tensor,
        grad_res: &Tensor,
        opts: &KlOptions,
        with_target: bool,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let per_row = opts.reduction == Reduction::None;
        let grad_res = grad_res.to_dtype(candle_core::DType::F32)?;
        let (s1, l1) = target.storage_and_layout();
        let (s2, l2) = model.storage_and_layout();
        let (ta, tb) = row_layouts(l1, l2)?;
        let (Storage::Cuda(c1), Storage::Cuda(c2)) = (&*s1, &*s2) else {
            return Err(crate::Error::InvalidArgument(
                "kl_div backward: target and model are not both on a CUDA device".into(),
            )
            .into());
        };
        // Scalar reductions: the kernel reads the incoming scalar from device
        // memory. Per-row weights are applied below, by candle.
        let (gs, gl) = grad_res.storage_and_layout();
        let up = if per_row {
            None
        } else {
            let Storage::Cuda(g) = &*gs else {
                return Err(crate::Error::InvalidArgument(
                    "kl_div backward: the incoming gradient is not on the CUDA device".into(),
                )
                .into());
            };
            ensure_scalar(gl.dims())?;
            Some((g.as_cuda_slice::<f32>()?, gl.start_offset()))
        };
        let dev = &c1.device;
        let (gm, gt) = match (&c1.slice, &c2.slice) {
            (CudaStorageSlice::F32(a), CudaStorageSlice::F32(b)) => {
                backward_t(dev, a, &ta, b, &tb, up, opts, with_target)?
            }
            (CudaStorageSlice::F16(a), CudaStorageSlice::F16(b)) => {
                backward_t(dev, a, &ta, b, &tb, up, opts, with_target)?
            }
            (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b)) => {
                backward_t(dev, a, &ta, b, &tb, up, opts, with_target)?
            }
            _ => return Err(dtype_error(c1.dtype(), c2.dtype()).into()),
        };
        drop((gs, s1, s2));
        let shape = target.shape().clone();
        let tensor = |s: CudaStorage| {
            Tensor::from_storage(Storage::Cuda(s), shape.clone(), BackpropOp::none(), false)
        };
        let (gm, gt) = (tensor(gm), gt.map(tensor));
        if !per_row {
            return Ok((gm, gt));
        }
        // Row r's gradient times the incoming value of row r.
        let w = grad_res
            .reshape(rows_shape(&ta))?
            .to_dtype(target.dtype())?;
        let scale = |g: Tensor| -> candle_core::Result<Tensor> {
            g.reshape((ta.rows, ta.vocab))?
                .broadcast_mul(&w)?
                .reshape(shape.clone())
        };
        Ok((scale(gm)?, gt.map(scale).transpose()?))
    }

    fn rows_shape(l: &RowLayout) -> Shape {
        Shape::from((l.rows, 1))
    }

    fn ensure_scalar(dims: &[usize]) -> crate::Result<()> {
        ensure!(
            dims.iter().product::<usize>() == 1,
            "kl_div backward: the incoming gradient of a reduced value has shape {dims:?}"
        );
        Ok(())
    }
}
