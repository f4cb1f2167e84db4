//! θ ← backup, bit for bit, over every tensor of a [`ParamGroup`] that has a
//! gradient this step, in one launch (`kernels/restore.cu`; 8 B/param for
//! f32, 16-byte vectors where the two buffers share an alignment).
//!
//! It undoes [`perturb`](super::perturb::perturb) with
//! [`PerturbMode::InPlace`](super::perturb::PerturbMode::InPlace), which wrote
//! the backup of exactly these tensors; don't change
//! [`ParamGroup::set_has_grad`] in between. With master weights nothing needs
//! restoring (the master is the backup: the optimizer rewrites the working
//! copy from it), and an out-of-place perturbation never touched θ.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::group::{ParamGroup, BLOCK_THREADS};
use super::CudaBackend;
use crate::error::{ensure, Result};

/// Enqueues θ ← backup for the group's tensors with a gradient. The group
/// must have backups. No allocation, no host sync. Moves 8 bytes per f32
/// element (4 per bf16/f16): the backup read, θ written, bit for bit.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a group without backups or a backend whose stream is not the
/// group's; [`Error::Driver`](crate::Error::Driver) when the launch fails.
pub fn restore(backend: &CudaBackend, group: &ParamGroup<'_>) -> Result<()> {
    group.check_backend(backend)?;
    ensure!(
        group.roles().backup,
        "restore needs a group built with backup buffers"
    );
    let f = backend.function_named(format_args!("restore_b{}", 8 * group.param_dtype().size()))?;
    let (table, chunks, n_chunks) = (group.table_ptr(), group.chunks_ptr(), group.n_chunks_ptr());
    let mut b = backend.stream().launch_builder(f);
    b.arg(&table).arg(&chunks).arg(&n_chunks);
    let cfg = LaunchConfig {
        grid_dim: (group.restore_grid(), 1, 1),
        block_dim: (BLOCK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `restore_b16/b32(MtTensor*, MtChunk*, uint32_t*)` with the group's
    // table, whose param and backup addresses were validated (same length,
    // aligned, disjoint) and stay live for the group's lifetime.
    unsafe { b.launch(cfg) }?;
    Ok(())
}
