//! Restore θ from its backup, bit-exact (CPU reference): a parallel copy in
//! fixed-size chunks. Bits are copied, never converted, so NaN payloads and −0.0
//! survive.

use rayon::prelude::*;

use super::grad_norm::CHUNK;
use crate::dtype::Element;
use crate::error::{ensure, Result};

/// `params[i] ← backups[i]` bit-exact for every tensor.
///
/// # Errors
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument): empty group; `backups.len() != params.len()`; a backup whose length
/// differs from its tensor's. Nothing is written on error.
pub fn restore<P: Element>(params: &mut [&mut [P]], backups: &[&[P]]) -> Result<()> {
    ensure!(!params.is_empty(), "empty group: no tensors");
    ensure!(
        backups.len() == params.len(),
        "{} backups for {} tensors",
        backups.len(),
        params.len()
    );
    for (i, (p, b)) in params.iter().zip(backups).enumerate() {
        ensure!(
            p.len() == b.len(),
            "tensor {i}: {} elements but the backup has {}",
            p.len(),
            b.len()
        );
    }
    let mut work: Vec<(&mut [P], &[P])> = Vec::new();
    for (p, b) in params.iter_mut().zip(backups) {
        work.extend(p.chunks_mut(CHUNK).zip(b.chunks(CHUNK)));
    }
    work.into_par_iter().for_each(|(p, b)| p.copy_from_slice(b));
    Ok(())
}
