//! θ + ε over every tensor of a [`ParamGroup`] that has a gradient this step,
//! in one launch (`kernels/perturb.cu`), with ε = ρ·w/(N + 1e-12) for the
//! geometry's direction w and norm N ([`Geometry`]).
//!
//! N comes from the group's [`NormState`](super::group::NormState) as
//! [`grad_norm`](super::grad_norm::grad_norm) (and a sharded all-reduce of
//! `sum_sq`) left it, and ρ is either fixed or δ·d with the divergence d read
//! from device memory: no host round trip. The status, and the norm, ρ and
//! coefficient used, are written to the same state for the host to read later:
//!
//! - N not finite → `NONFINITE_GRAD`; ρ not finite → `NONFINITE_RADIUS`;
//!   ρ < 0 → `NEGATIVE_RADIUS` (bits combine); θ unchanged.
//! - otherwise N = 0 → `ZERO_NORM`, θ unchanged; else `APPLIED`.
//!
//! Modes ([`PerturbMode`]): in place with a backup (the backup is written
//! whatever the status), from f32 master weights into the working copy
//! (written only when applied), or out of place into the group's `out`
//! buffers (θ copied there when not applied). Tensors without a gradient
//! this step have θ + ε = θ: the in-place and master paths skip them
//! entirely (no backup is written for them, and restore skips them too; the
//! CPU reference does write their backup), the out-of-place path copies θ to
//! their `out`, as the CPU reference does.
//!
//! Accuracy: the stored result is within 1 ulp(θ + ε) + 2 ulp(ε) of θ + ε
//! computed exactly (f64) from the norm and ρ in the state. SAM uses one f32
//! fma per element with ρ·s/(N + 1e-12) rounded once to f32; adaptive and
//! Fisher compute in f64 for f32 parameters and in f32 for f16/bf16 ones.
//!
//! Norm and perturbation together are two launches for any number of tensors,
//! with no allocation and no host sync.

use cudarc::driver::{CudaView, DevicePtr, LaunchConfig, PushKernelArg};

use super::grad_norm::check_geometry;
use super::group::{ParamGroup, BLOCK_THREADS};
use super::CudaBackend;
use crate::config::{Geometry, Radius};
use crate::error::{ensure, Result};

/// Where θ + ε goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum PerturbMode {
    /// θ ← θ + ε, with θ saved to the backup first (16 B/param for f32).
    InPlace,
    /// working copy ← round(master + ε), from the f32 master weights; no
    /// backup, the master is one (10 B/param for bf16 params, f32 grads).
    Master,
    /// out ← θ + ε; θ untouched (12 B/param for f32).
    OutOfPlace,
}

impl PerturbMode {
    pub(crate) const ALL: [PerturbMode; 3] = [
        PerturbMode::InPlace,
        PerturbMode::Master,
        PerturbMode::OutOfPlace,
    ];

    pub(crate) fn kernel_name(self) -> &'static str {
        match self {
            PerturbMode::InPlace => "in_place",
            PerturbMode::Master => "master",
            PerturbMode::OutOfPlace => "out_of_place",
        }
    }
}

/// How the perturbation is formed. `geometry` and `inv_scale` must be those
/// of the norm it follows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PerturbOptions {
    pub geometry: Geometry,
    pub radius: Radius,
    /// s in g' = s·g (1/loss-scale under AMP, else 1). Finite and > 0.
    pub inv_scale: f32,
    pub mode: PerturbMode,
}

/// Enqueues the perturbation. `divergence` (one f32 on the device, d in
/// ρ = δ·d) is required for [`Radius::TrustRegion`] and ignored otherwise.
///
/// Errors: the group lacks the buffers of the mode (backup, master, out), a
/// trust-region radius without a divergence, an empty divergence view, a
/// non-finite or negative η, a non-finite or non-positive `inv_scale`.
pub fn perturb(
    backend: &CudaBackend,
    group: &ParamGroup<'_>,
    opts: PerturbOptions,
    divergence: Option<&CudaView<'_, f32>>,
) -> Result<()> {
    let d = match divergence {
        Some(v) => {
            ensure!(!v.is_empty(), "the divergence view is empty");
            let (p, _guard) = v.device_ptr(backend.stream());
            p
        }
        None => 0,
    };
    // SAFETY: `d` is 0 or the address of an f32 that `divergence` borrows for
    // this call; the launch reads it in the order of the backend's stream, the
    // stream-order contract every cudarc view already carries.
    unsafe { perturb_raw(backend, group, opts, d) }
}

/// [`perturb`] with the divergence given as a raw device address.
///
/// # Safety
/// With [`Radius::TrustRegion`], `divergence` must be the address of an f32
/// in the backend's context that stays allocated, and is not written by other
/// streams, until the launch has run; it may be 0 (unused) otherwise.
pub unsafe fn perturb_raw(
    backend: &CudaBackend,
    group: &ParamGroup<'_>,
    opts: PerturbOptions,
    divergence: u64,
) -> Result<()> {
    group.check_backend(backend)?;
    check_geometry(opts.geometry, opts.inv_scale)?;
    let roles = group.roles();
    match opts.mode {
        PerturbMode::InPlace => ensure!(
            roles.backup,
            "an in-place perturbation needs a group built with backup buffers"
        ),
        PerturbMode::Master => ensure!(
            roles.master,
            "a master-weight perturbation needs a group built with master buffers"
        ),
        PerturbMode::OutOfPlace => ensure!(
            roles.out,
            "an out-of-place perturbation needs a group built with out buffers"
        ),
    }
    let (kind, value) = match opts.radius {
        Radius::Fixed(r) => (0u32, r),
        Radius::TrustRegion { delta } => {
            ensure!(
                divergence != 0,
                "a trust-region radius needs the divergence on the device"
            );
            (1u32, delta)
        }
    };
    let f = backend.function(&format!(
        "perturb_{}_{}_{}",
        opts.mode.kernel_name(),
        group.param_dtype().name(),
        group.grad_dtype().name()
    ))?;
    let (table, chunks, n_chunks) = (group.table_ptr(), group.chunks_ptr(), group.n_chunks_ptr());
    let state = group.state_ptr();
    let (geometry, eta) = (opts.geometry.code(), opts.geometry.eta());
    let mut b = backend.stream().launch_builder(f);
    b.arg(&table)
        .arg(&chunks)
        .arg(&n_chunks)
        .arg(&geometry)
        .arg(&eta)
        .arg(&opts.inv_scale)
        .arg(&kind)
        .arg(&value)
        .arg(&divergence)
        .arg(&state);
    let cfg = LaunchConfig {
        grid_dim: (group.perturb_grid(opts.mode), 1, 1),
        block_dim: (BLOCK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the arguments match `perturb_<mode>_<p>_<g>` in
    // kernels/perturb.cu. The table's addresses were validated when the group
    // was built (lengths, alignment, no overlap) and stay live for its
    // lifetime; the mode's slot is filled (checked above); `divergence` is
    // read only for a trust-region radius, where it is non-zero and live by
    // this function's contract.
    unsafe { b.launch(cfg) }?;
    Ok(())
}
