//! Global gradient norm over every tensor of a [`ParamGroup`], in one launch
//! (`kernels/grad_norm.cu`), for the three geometries of [`Geometry`].
//!
//! The result stays on the device, in the group's [`NormState`](super::group::NormState)
//! (`sum_sq`, `norm`, `found_inf`: see there); [`ParamGroup::read_state`] fetches it
//! when the host wants it, outside the step. Sharded (ZeRO/FSDP) callers
//! all-reduce `sum_sq` (an f64 at [`ParamGroup::state_ptr`]) across ranks
//! after [`grad_norm`]; the perturbation reads `sum_sq` itself, and
//! [`finish`] recomputes `norm` and `found_inf` from it for those who want the
//! norm alone.
//!
//! Determinism: a fixed grid ([`ParamGroup::norm_grid`], a multiple of the SM
//! count) and fixed summation orders, so a group gives the same bits on every
//! run on the same device.
//!
//! Accuracy, against the exact norm of the stored inputs (f64 reference):
//! relative error below 4.1e-7 for every geometry and any group of up to 2^28
//! elements per launch (each term and runs of at most 8 terms in f32, at most
//! 13 roundings of 2^-24 on sum_sq; f64 sums beyond; see the kernel's header),
//! documented and tested as 1e-6.
//!
//! Huge gradients: terms are formed in f32, whose square overflows once
//! |inv_scale·g| exceeds ~1.8e19. When that happens with every gradient finite,
//! the launch sums the group again with f64 terms (in its last block, so the
//! common case does not pay for it), and the norm is the finite one the CPU
//! reference returns (within ~1e-10 relative). It is non-finite only for an
//! inf/NaN gradient (`found_inf` is then 1: it flags inf/NaN gradient elements
//! only, as the CPU reference's does) or, under the adaptive geometry, an
//! inf/NaN θ.
//!
//! Tiny gradients: terms below f32's normal range (|inv_scale·g| below ~1e-19)
//! are summed as f32 subnormals or zeros, so a group whose every scaled
//! gradient is that small gets a less accurate norm than stated above.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::group::{ParamGroup, Slot, BLOCK_THREADS};
use super::CudaBackend;
use crate::config::Geometry;
use crate::dtype::DType;
use crate::error::{ensure, Result};

/// How the norm is taken.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormOptions {
    /// Which norm ([`Geometry`]); the perturbation that follows must use the same.
    pub geometry: Geometry,
    /// s in g' = s·g: 1/loss-scale under AMP, else 1. Finite and > 0.
    pub inv_scale: f32,
}

impl Default for NormOptions {
    fn default() -> Self {
        Self {
            geometry: Geometry::Sam,
            inv_scale: 1.0,
        }
    }
}

pub(crate) fn check_geometry(geometry: Geometry, inv_scale: f32) -> Result<()> {
    let eta = geometry.eta();
    ensure!(
        eta.is_finite() && eta >= 0.0,
        "η must be finite and non-negative, got {eta}"
    );
    ensure!(
        inv_scale.is_finite() && inv_scale > 0.0,
        "inv_scale must be finite and positive, got {inv_scale}"
    );
    Ok(())
}

/// Enqueues the norm of the group's tensors that have a gradient, into the
/// group's [`NormState`](super::group::NormState). One launch; no allocation, no host sync. With
/// master weights the adaptive geometry reads θ from the f32 master copy.
/// Reads 4 bytes per f32 gradient element (8 with θ for the adaptive geometry).
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument): η negative or not finite, `inv_scale` not finite and > 0, or a
/// backend whose stream is not the group's; [`Error::Driver`](crate::Error::Driver) when the launch fails.
pub fn grad_norm(backend: &CudaBackend, group: &ParamGroup<'_>, opts: NormOptions) -> Result<()> {
    launch(backend, group, opts, 0)
}

/// [`grad_norm`] with the inverse scale read from device memory at run time
/// (`inv_scale_dev`: the address of an f32 the caller keeps alive, e.g. a
/// step's); `opts.inv_scale` is its current value, checked here.
pub(crate) fn grad_norm_device_scale(
    backend: &CudaBackend,
    group: &ParamGroup<'_>,
    opts: NormOptions,
    inv_scale_dev: u64,
) -> Result<()> {
    launch(backend, group, opts, inv_scale_dev)
}

fn launch(
    backend: &CudaBackend,
    group: &ParamGroup<'_>,
    opts: NormOptions,
    inv_scale_dev: u64,
) -> Result<()> {
    group.check_backend(backend)?;
    check_geometry(opts.geometry, opts.inv_scale)?;
    let (theta, slot) = if group.roles().master {
        (DType::F32, Slot::Master)
    } else {
        (group.param_dtype(), Slot::Param)
    };
    let f = backend.function_named(format_args!(
        "grad_norm_{}_{}",
        theta.name(),
        group.grad_dtype().name()
    ))?;
    let (table, chunks, n_chunks) = (group.table_ptr(), group.chunks_ptr(), group.n_chunks_ptr());
    let (partials, counter, state) = (group.partials_ptr(), group.counter_ptr(), group.state_ptr());
    let (slot, geometry, eta) = (slot as u32, opts.geometry.code(), opts.geometry.eta());
    let mut b = backend.stream().launch_builder(f);
    b.arg(&table)
        .arg(&chunks)
        .arg(&n_chunks)
        .arg(&slot)
        .arg(&geometry)
        .arg(&eta)
        .arg(&opts.inv_scale)
        .arg(&partials)
        .arg(&counter)
        .arg(&state)
        .arg(&inv_scale_dev);
    let cfg = LaunchConfig {
        grid_dim: (group.norm_grid(), 1, 1),
        block_dim: (BLOCK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match `grad_norm_<θ>_<g>` in kernels/grad_norm.cu
    // (three u64 table addresses, u32 slot and geometry, f32 η and scale, three
    // u64 workspace addresses, an optional f32 scale address: 0, or one its
    // caller keeps alive). The table's addresses were validated when the
    // group was built and stay live for its lifetime ('a, or the `from_raw`
    // contract); `partials` holds 2·`norm_grid` doubles for the grid launched here.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Recomputes `norm` of the group's [`NormState`](super::group::NormState) from its `sum_sq`, for a
/// sharded group after `sum_sq` was all-reduced, and raises `found_inf` when
/// that sum is not finite. One single-thread launch.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a backend whose stream is not the group's; [`Error::Driver`](crate::Error::Driver) when the
/// launch fails.
pub fn finish(backend: &CudaBackend, group: &ParamGroup<'_>) -> Result<()> {
    group.check_backend(backend)?;
    let f = backend.function("grad_norm_finish")?;
    let state = group.state_ptr();
    let mut b = backend.stream().launch_builder(f);
    b.arg(&state);
    // SAFETY: `grad_norm_finish(NormState*)` with the group's own live state.
    unsafe { b.launch(LaunchConfig::for_num_elems(1)) }?;
    Ok(())
}
