//! KL divergence over logits (placeholder until the CPU reference lands).

mod common;

use criterion::{criterion_group, criterion_main, Criterion};

fn cpu(_c: &mut Criterion) {}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = cpu
}
criterion_main!(benches);
