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
//! - otherwise N = 0 → `ZERO_NORM`, θ unchanged; else `APPLIED`, with
//!   `OVERFLOW` added when some finite θ (or master value) was written as
//!   ±inf (θ is written all the same; the backup keeps it for `restore`).
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
//! Huge numbers: SAM and adaptive compute in f64 for the whole launch when
//! ρ·s/(N + 1e-12) is not a normal f32 (e.g. a norm near 1e21 with ρ below
//! ~1e-17) or N passes 2^60, and Fisher in f32 takes w = 1/(1/x + η x) for
//! |x| = |s·g| ≥ 2^32, where the square would overflow. Outside the bound, for
//! f16/bf16 parameters only: with N below 2^60, an adaptive (|θ|+η)²·g past
//! ~3.4e38 (|θ| beyond ~1e19·s) comes out infinite (and the status says
//! `OVERFLOW`), and a Fisher coefficient, or an adaptive c·s, below ~1e-38
//! keeps fewer digits.
//!
//! Norm and perturbation together are two launches for any number of tensors,
//! with no allocation and no host sync.
//!
//! The radius scale (ρ itself when fixed, δ for a trust region) is either a
//! launch argument ([`perturb`], [`perturb_raw`]: a captured CUDA graph keeps
//! the value it was captured with) or read from a [`DeviceRadius`] in device
//! memory ([`perturb_device`]: the host rewrites it with an async copy between
//! steps and a replayed graph uses the current value).

use cudarc::driver::{CudaSlice, CudaView, DevicePtr, LaunchConfig, PushKernelArg};

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
    /// The direction and norm; the same as the norm's [`NormOptions`](super::grad_norm::NormOptions).
    pub geometry: Geometry,
    /// ρ, fixed or δ·d (d read from device memory at the launch).
    pub radius: Radius,
    /// s in g' = s·g (1/loss-scale under AMP, else 1). Finite and > 0.
    pub inv_scale: f32,
    /// Where θ + ε goes; the group must have the buffers the mode needs.
    pub mode: PerturbMode,
}

/// The radius scale in device memory: ρ for [`Radius::Fixed`], δ for
/// [`Radius::TrustRegion`]. The kind is fixed at construction (it selects the
/// formula at launch); the value can be changed between steps with
/// [`DeviceRadius::set_value`], and launches already captured in a CUDA graph
/// read the new value when replayed.
#[derive(Debug)]
pub struct DeviceRadius {
    radius: Radius,
    slot: CudaSlice<f32>,
    addr: u64,
}

impl DeviceRadius {
    /// Allocates the slot and writes the value of `radius` to it.
    ///
    /// # Errors
    /// [`Error::Driver`](crate::Error::Driver) when the allocation or copy fails.
    pub fn new(backend: &CudaBackend, radius: Radius) -> Result<Self> {
        let stream = backend.stream();
        let slot = stream.clone_htod(&[radius_value(radius)])?;
        // The address is taken once: launches pass it as a plain argument
        // (capturable, no event bookkeeping); it stays valid while `slot` lives.
        let addr = slot.device_ptr(stream).0;
        Ok(Self { radius, slot, addr })
    }

    /// The radius last written from the host.
    pub fn radius(&self) -> Radius {
        self.radius
    }

    /// Writes a new ρ (fixed) or δ (trust region) with an async copy on the
    /// backend's stream: launches enqueued or replayed after this call read
    /// it. Not to be called while the stream is being captured. Like the
    /// by-value radius, a negative or non-finite value is not an error here:
    /// the perturbation then reports it in its status and leaves θ unchanged.
    ///
    /// # Errors
    /// [`Error::Driver`](crate::Error::Driver) when the copy fails.
    pub fn set_value(&mut self, backend: &CudaBackend, value: f32) -> Result<()> {
        backend.stream().memcpy_htod(&[value], &mut self.slot)?;
        self.radius = match self.radius {
            Radius::Fixed(_) => Radius::Fixed(value),
            Radius::TrustRegion { .. } => Radius::TrustRegion { delta: value },
        };
        Ok(())
    }

    /// The device address of the f32 slot.
    pub fn ptr(&self) -> u64 {
        self.addr
    }
}

fn radius_value(radius: Radius) -> f32 {
    match radius {
        Radius::Fixed(r) => r,
        Radius::TrustRegion { delta } => delta,
    }
}

fn divergence_ptr(backend: &CudaBackend, divergence: Option<&CudaView<'_, f32>>) -> Result<u64> {
    Ok(match divergence {
        Some(v) => {
            ensure!(!v.is_empty(), "the divergence view is empty");
            let (p, _guard) = v.device_ptr(backend.stream());
            p
        }
        None => 0,
    })
}

/// Enqueues the perturbation. `divergence` (one f32 on the device, d in
/// ρ = δ·d) is required for [`Radius::TrustRegion`] and ignored otherwise.
///
/// Moves 16 bytes per f32 element in place (θ and g read, θ + ε and the
/// backup written), 10 per element for bf16 working weights from f32 master
/// weights and gradients, 12 per f32 element out of place.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument): the group lacks the buffers of the mode (backup, master, out), a
/// trust-region radius without a divergence, an empty divergence view, a
/// non-finite or negative η, a non-finite or non-positive `inv_scale`, or a
/// backend whose stream is not the group's; [`Error::Driver`](crate::Error::Driver) when the launch fails.
pub fn perturb(
    backend: &CudaBackend,
    group: &ParamGroup<'_>,
    opts: PerturbOptions,
    divergence: Option<&CudaView<'_, f32>>,
) -> Result<()> {
    let d = divergence_ptr(backend, divergence)?;
    // SAFETY: `d` is 0 or the address of an f32 that `divergence` borrows for
    // this call; the launch reads it in the order of the backend's stream, the
    // stream-order contract every cudarc view already carries.
    unsafe { perturb_raw(backend, group, opts, d) }
}

/// [`perturb`] with the radius read from device memory at run time: the kind
/// and scale come from `radius` (`opts.radius` is ignored), so a graph that
/// captured this launch follows [`DeviceRadius::set_value`].
///
/// # Errors
/// As [`perturb`].
pub fn perturb_device(
    backend: &CudaBackend,
    group: &ParamGroup<'_>,
    opts: PerturbOptions,
    radius: &DeviceRadius,
    divergence: Option<&CudaView<'_, f32>>,
) -> Result<()> {
    let d = divergence_ptr(backend, divergence)?;
    let opts = PerturbOptions {
        radius: radius.radius(),
        ..opts
    };
    // SAFETY: `d` as in `perturb`; the radius slot is owned by `radius`, which
    // the caller keeps alive across the launch by the borrow (and, for a
    // captured graph, by keeping it for as long as the graph is replayed).
    unsafe { launch(backend, group, opts, radius.ptr(), d, 0) }
}

/// [`perturb`] with the divergence given as a raw device address.
///
/// # Safety
/// With [`Radius::TrustRegion`], `divergence` must be the address of an f32
/// in the backend's context that stays allocated, and is not written by other
/// streams, until the launch has run; it may be 0 (unused) otherwise.
///
/// # Errors
/// As [`perturb`]; a null `divergence` with a trust-region radius is one.
pub unsafe fn perturb_raw(
    backend: &CudaBackend,
    group: &ParamGroup<'_>,
    opts: PerturbOptions,
    divergence: u64,
) -> Result<()> {
    // SAFETY: no device radius (the value is passed by value); `divergence`
    // by this function's contract.
    unsafe { launch(backend, group, opts, 0, divergence, 0) }
}

/// [`perturb_raw`] with the radius scale read from `radius_dev` (an f32 in
/// device memory) instead of from `opts.radius`, whose kind still selects
/// fixed or trust region.
///
/// # Safety
/// As [`perturb_raw`]; `radius_dev` must in addition be the address of an f32
/// of the backend's context that stays allocated until the launch (or every
/// replay of a graph that captured it) has run.
///
/// # Errors
/// As [`perturb_raw`], and a null `radius_dev`.
pub unsafe fn perturb_raw_device(
    backend: &CudaBackend,
    group: &ParamGroup<'_>,
    opts: PerturbOptions,
    radius_dev: u64,
    divergence: u64,
) -> Result<()> {
    ensure!(radius_dev != 0, "the device radius address is null");
    // SAFETY: forwarded contract.
    unsafe { launch(backend, group, opts, radius_dev, divergence, 0) }
}

/// [`perturb_raw_device`] with the inverse scale read from `inv_scale_dev`
/// as well (`opts.inv_scale` is its current value, checked here): a TRAM
/// step's launch, which a replayed graph runs with the current scale.
///
/// # Safety
/// As [`perturb_raw_device`]; `inv_scale_dev` is the address of an f32 of
/// the backend's context that stays allocated while the launch (or a graph
/// of it) may run.
pub(crate) unsafe fn perturb_step(
    backend: &CudaBackend,
    group: &ParamGroup<'_>,
    opts: PerturbOptions,
    radius_dev: u64,
    divergence: u64,
    inv_scale_dev: u64,
) -> Result<()> {
    ensure!(
        radius_dev != 0 && inv_scale_dev != 0,
        "the device radius or scale address is null"
    );
    // SAFETY: forwarded contract.
    unsafe { launch(backend, group, opts, radius_dev, divergence, inv_scale_dev) }
}

/// `radius_dev` 0: the scale is `opts.radius`'s value; `inv_scale_dev` 0:
/// the inverse scale is `opts.inv_scale`.
///
/// # Safety
/// `divergence` as in [`perturb_raw`], `radius_dev` as in [`perturb_raw_device`]
/// and `inv_scale_dev` as in [`perturb_step`] when non-zero.
unsafe fn launch(
    backend: &CudaBackend,
    group: &ParamGroup<'_>,
    opts: PerturbOptions,
    radius_dev: u64,
    divergence: u64,
    inv_scale_dev: u64,
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
    let f = backend.function_named(format_args!(
        "perturb_{}_{}_{}",
        opts.mode.kernel_name(),
        group.param_dtype().name(),
        group.grad_dtype().name()
    ))?;
    let (table, chunks, n_chunks) = (group.table_ptr(), group.chunks_ptr(), group.n_chunks_ptr());
    let (state, scratch) = (group.state_ptr(), group.perturb_scratch_ptr());
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
        .arg(&radius_dev)
        .arg(&divergence)
        .arg(&state)
        .arg(&scratch)
        .arg(&inv_scale_dev);
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
    // this function's contract; `radius_dev` is 0 (unused) or live by the
    // callers' contracts; `scratch` is two u32 the group owns, zero between
    // launches (the kernel's last block resets them).
    unsafe { b.launch(cfg) }?;
    Ok(())
}
