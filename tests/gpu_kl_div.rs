//! The CUDA KL divergence against the CPU reference (the note's centred formula
//! in f64 on the same upcast inputs), on fresh seeded random logits, with every
//! output poisoned before the run. Skips without a GPU (fails with
//! TRAM_REQUIRE_GPU=1).

#![allow(clippy::needless_range_loop)] // index loops read best in numeric checks

mod common;

use cudarc::driver::{CudaSlice, DeviceRepr};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tram_kernels::cpu::kl_div as cpu;
use tram_kernels::cuda::kl_div::{
    kl_div, kl_div_raw, kl_div_with_grad, DeviceLogits, GradOut, KlGrads, KlReadback, KlWorkspace,
    RawGrads, RawLogits,
};
use tram_kernels::cuda::CudaBackend;
use tram_kernels::{bf16, f16, Element, Error, KlDirection, KlOptions, Reduction};

/// The stated bound on a row's KL (and the reduced value), relative.
const KL_REL: f64 = 1e-4;
/// Gradient bound: |g − g*| ≤ GRAD_REL·|g*| + GRAD_ABS·max_row|g*| (+ the
/// output dtype's rounding).
const GRAD_REL: f64 = 1e-4;
const GRAD_ABS: f64 = 1e-5;

const DIRS: [KlDirection; 3] = [
    KlDirection::Forward,
    KlDirection::Reverse,
    KlDirection::Symmetric,
];
const REDS: [Reduction; 4] = [
    Reduction::None,
    Reduction::Sum,
    Reduction::MeanRows,
    Reduction::MeanElements,
];

fn opts(direction: KlDirection, reduction: Reduction, temperature: f32) -> KlOptions {
    KlOptions {
        direction,
        reduction,
        temperature,
    }
}

fn normal(rng: &mut SmallRng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Two logit matrices laid out as the kernels see them: `lead` poison elements,
/// then rows `stride` apart, padding (poison) between `vocab` and the stride.
#[derive(Clone)]
struct Case<T> {
    rows: usize,
    vocab: usize,
    stride: usize,
    lead: usize,
    a: Vec<T>,
    b: Vec<T>,
    mask: Option<Vec<u8>>,
}

impl<T: Element> Case<T> {
    fn len(rows: usize, vocab: usize, stride: usize, lead: usize) -> usize {
        lead + if rows == 0 {
            0
        } else {
            (rows - 1) * stride + vocab
        } + 3
    }

    /// a ~ σ·N(0,1), b = a + offset + gap·N(0,1), rounded to T.
    #[allow(clippy::too_many_arguments)]
    fn random(
        seed: u64,
        rows: usize,
        vocab: usize,
        stride: usize,
        lead: usize,
        sigma: f64,
        offset: f64,
        gap: f64,
    ) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let n = Self::len(rows, vocab, stride, lead);
        let poison = T::from_f32(f32::NAN);
        let mut a = vec![poison; n];
        let mut b = vec![poison; n];
        for r in 0..rows {
            for j in 0..vocab {
                let i = lead + r * stride + j;
                let x = sigma * normal(&mut rng);
                a[i] = T::from_f64(x);
                b[i] = T::from_f64(x + offset + gap * normal(&mut rng));
            }
        }
        Self {
            rows,
            vocab,
            stride,
            lead,
            a,
            b,
            mask: None,
        }
    }

    fn at(&self, r: usize, j: usize) -> usize {
        self.lead + r * self.stride + j
    }

    fn cpu_logits<'a>(&self, data: &'a [T]) -> cpu::Logits<'a, T> {
        cpu::Logits::new(&data[self.lead..], self.rows, self.vocab, self.stride).unwrap()
    }
}

/// What the GPU produced, read back.
struct GpuOut {
    value_f32: f32,
    back: KlReadback,
    per_row_f32: Vec<f32>,
    /// Dense rows × vocab, f64, when a gradient was asked for.
    grad_model: Option<Vec<f64>>,
    grad_target: Option<Vec<f64>>,
}

/// Gradient outputs: a stride and a lead of their own (to exercise both).
#[derive(Clone, Copy)]
struct GradSpec {
    upstream: f32,
    device_factor: Option<f32>,
    with_target: bool,
    stride: usize,
    lead: usize,
}

fn poison_buf<T: Element + DeviceRepr>(gpu: &CudaBackend, n: usize) -> CudaSlice<T> {
    gpu.stream()
        .clone_htod(&vec![T::from_f32(f32::NAN); n])
        .unwrap()
}

fn run<T: Element + DeviceRepr>(
    gpu: &CudaBackend,
    ws: &mut KlWorkspace,
    c: &Case<T>,
    o: &KlOptions,
    grad: Option<GradSpec>,
) -> GpuOut {
    let s = gpu.stream();
    let da = s.clone_htod(&c.a).unwrap();
    let db = s.clone_htod(&c.b).unwrap();
    let dm = c.mask.as_ref().map(|m| s.clone_htod(m).unwrap());
    let mut per_row = poison_buf::<f32>(gpu, c.rows.max(1));
    // The workspace results are poisoned too: a stale value must not pass.
    ws.poison(gpu).unwrap();
    let va = da.slice(c.lead..);
    let vb = db.slice(c.lead..);
    let ta = DeviceLogits::new(va, c.rows, c.vocab, c.stride).unwrap();
    let tb = DeviceLogits::new(vb, c.rows, c.vocab, c.stride).unwrap();
    let mv = dm.as_ref().map(|m| m.slice(..));
    let mut pr = per_row.slice_mut(..);
    let (mut gm, mut gt) = (None, None);
    match grad {
        None => kl_div(gpu, &ta, &tb, mv.as_ref(), o, ws, Some(&mut pr)).unwrap(),
        Some(g) => {
            let n = Case::<T>::len(c.rows, c.vocab, g.stride, g.lead);
            let mut bm = poison_buf::<T>(gpu, n);
            let mut bt = poison_buf::<T>(gpu, n);
            let up = g.device_factor.map(|f| s.clone_htod(&[f]).unwrap());
            let upv = up.as_ref().map(|u| u.slice(..));
            {
                let grads = KlGrads {
                    model: GradOut::new(bm.slice_mut(g.lead..), g.stride),
                    target: g
                        .with_target
                        .then(|| GradOut::new(bt.slice_mut(g.lead..), g.stride)),
                    upstream: g.upstream,
                    upstream_device: upv.as_ref(),
                };
                kl_div_with_grad(gpu, &ta, &tb, mv.as_ref(), o, ws, Some(&mut pr), grads).unwrap();
            }
            let read = |buf: &CudaSlice<T>| -> Vec<f64> {
                let h = s.clone_dtoh(buf).unwrap();
                s.synchronize().unwrap();
                // Padding and lead stay poison: the kernel writes only rows × vocab.
                let poison = T::from_f32(f32::NAN).to_bits_u32();
                let mut dense = Vec::with_capacity(c.rows * c.vocab);
                for (i, v) in h.iter().enumerate() {
                    let k = i as isize - g.lead as isize;
                    let inside = k >= 0
                        && (k as usize) / g.stride < c.rows
                        && (k as usize) % g.stride < c.vocab;
                    if !inside {
                        assert_eq!(
                            v.to_bits_u32(),
                            poison,
                            "gradient written outside its rows at {i}"
                        );
                    }
                }
                for r in 0..c.rows {
                    for j in 0..c.vocab {
                        dense.push(h[g.lead + r * g.stride + j].to_f64());
                    }
                }
                dense
            };
            gm = Some(read(&bm));
            if g.with_target {
                gt = Some(read(&bt));
            } else {
                let h = s.clone_dtoh(&bt).unwrap();
                let poison = T::from_f32(f32::NAN).to_bits_u32();
                assert!(
                    h.iter().all(|v| v.to_bits_u32() == poison),
                    "target gradient written unasked"
                );
            }
        }
    }
    let back = ws.read(gpu, c.rows).unwrap();
    let value_f32 = s.clone_dtoh(ws.value()).unwrap()[0];
    let per_row_f32 = s.clone_dtoh(&per_row).unwrap()[..c.rows].to_vec();
    s.synchronize().unwrap();
    GpuOut {
        value_f32,
        back,
        per_row_f32,
        grad_model: gm,
        grad_target: gt,
    }
}

/// `got` within KL_REL of `want` (both NaN, or both the same infinity, pass;
/// an exact-zero reference is compared absolutely).
fn check_kl(what: &str, got: f64, want: f64, extra_rel: f64) {
    if want.is_nan() || want.is_infinite() {
        assert!(
            (want.is_nan() && got.is_nan()) || got == want,
            "{what}: got {got}, want {want}"
        );
        return;
    }
    let tol = (KL_REL + extra_rel) * want.abs() + if want == 0.0 { 1e-30 } else { 0.0 };
    assert!(
        (got - want).abs() <= tol,
        "{what}: got {got:e}, want {want:e} (rel {:e})",
        ((got - want) / want).abs()
    );
}

/// Relative rounding of T (half an ulp at 1).
fn half_ulp<T: Element>() -> f64 {
    match T::DTYPE {
        tram_kernels::DType::F32 => f32::EPSILON as f64 / 2.0,
        tram_kernels::DType::F16 => 2f64.powi(-11),
        tram_kernels::DType::BF16 => 2f64.powi(-8),
    }
}

/// Smallest positive subnormal of T: gradients below it flush to 0.
fn tiny<T: Element>() -> f64 {
    match T::DTYPE {
        tram_kernels::DType::F32 => 1.5e-45,
        tram_kernels::DType::F16 => 6e-8,
        tram_kernels::DType::BF16 => 1e-40,
    }
}

fn check_grad<T: Element>(what: &str, got: &[f64], want: &[f64], rows: usize, vocab: usize) {
    assert_eq!(got.len(), want.len());
    for r in 0..rows {
        let row = &want[r * vocab..(r + 1) * vocab];
        let gmax = row
            .iter()
            .filter(|v| v.is_finite())
            .fold(0.0f64, |m, v| m.max(v.abs()));
        for j in 0..vocab {
            let (g, w) = (got[r * vocab + j], row[j]);
            if w.is_nan() {
                assert!(g.is_nan(), "{what}[{r},{j}]: got {g}, want NaN");
                continue;
            }
            let tol = (GRAD_REL + half_ulp::<T>()) * w.abs() + GRAD_ABS * gmax + tiny::<T>();
            assert!(
                (g - w).abs() <= tol,
                "{what}[{r},{j}]: got {g:e}, want {w:e} (row max {gmax:e})"
            );
        }
    }
}

/// Runs the GPU and the CPU reference on one case and compares everything.
fn compare<T: Element + DeviceRepr>(
    gpu: &CudaBackend,
    ws: &mut KlWorkspace,
    c: &Case<T>,
    o: &KlOptions,
    grad: Option<GradSpec>,
    label: &str,
) {
    let got = run(gpu, ws, c, o, grad);
    let (ta, tb) = (c.cpu_logits(&c.a), c.cpu_logits(&c.b));
    let mask = c.mask.as_deref();
    let (want, wgrad) = match grad {
        None => (cpu::kl_div(&ta, &tb, mask, o).unwrap(), None),
        Some(g) => {
            let up = g.upstream as f64 * g.device_factor.unwrap_or(1.0) as f64;
            let (w, gr) = cpu::kl_div_grad(&ta, &tb, mask, o, up, g.with_target).unwrap();
            (w, Some(gr))
        }
    };
    let label = format!("{label} {o:?} {:?}", T::DTYPE);
    assert_eq!(
        got.back.unmasked_rows, want.unmasked_rows,
        "{label}: unmasked rows"
    );
    assert_eq!(got.back.all_masked, want.all_masked, "{label}: all masked");
    for r in 0..c.rows {
        check_kl(
            &format!("{label} row {r}"),
            got.back.per_row[r],
            want.per_row[r],
            0.0,
        );
        let f = got.per_row_f32[r] as f64;
        check_kl(&format!("{label} row {r} (f32)"), f, want.per_row[r], 1e-7);
    }
    check_kl(&format!("{label} value"), got.back.value, want.value, 0.0);
    check_kl(
        &format!("{label} value (f32)"),
        got.value_f32 as f64,
        want.value,
        1e-7,
    );
    if let Some(wg) = wgrad {
        check_grad::<T>(
            &format!("{label} dmodel"),
            got.grad_model.as_ref().unwrap(),
            &wg.model,
            c.rows,
            c.vocab,
        );
        match (&got.grad_target, &wg.target) {
            (Some(g), Some(w)) => {
                check_grad::<T>(&format!("{label} dtarget"), g, w, c.rows, c.vocab)
            }
            (None, None) => {}
            _ => panic!("{label}: target gradient presence differs"),
        }
    }
}

fn grad_spec(vocab: usize) -> GradSpec {
    GradSpec {
        upstream: 0.75,
        device_factor: None,
        with_target: true,
        stride: vocab,
        lead: 0,
    }
}

// ------------------------------------------------------------------ tests

#[test]
fn f32_loss_holds_across_gaps() {
    let gpu = gpu_or_skip!();
    let mut ws = KlWorkspace::new(&gpu, 64).unwrap();
    let o = opts(KlDirection::Forward, Reduction::MeanRows, 1.0);
    let mut seed = 1;
    // 4 rows of 50,257 take the multi-block path, 40 rows of 4,099 one block each.
    for (rows, vocab) in [(4usize, 50_257usize), (40, 4_099)] {
        for sigma in [1.0, 3.0, 30.0] {
            for offset in [0.0, 10.0] {
                for gap in [1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5] {
                    seed += 1;
                    let c = Case::<f32>::random(seed, rows, vocab, vocab, 0, sigma, offset, gap);
                    compare(
                        &gpu,
                        &mut ws,
                        &c,
                        &o,
                        None,
                        &format!("σ {sigma} offset {offset} gap {gap}"),
                    );
                }
            }
        }
    }
}

fn half_loss_holds<T: Element + DeviceRepr>() {
    let gpu = gpu_or_skip!();
    let mut ws = KlWorkspace::new(&gpu, 64).unwrap();
    let mut seed = 100 + T::DTYPE as u64 * 1000;
    for dir in DIRS {
        let o = opts(dir, Reduction::Sum, 1.0);
        for (rows, vocab) in [(3usize, 40_003usize), (50, 1_001)] {
            for (sigma, offset) in [(3.0, 0.0), (3.0, 10.0), (1.0, 0.5)] {
                for gap in [1.0, 1e-1, 1e-2, 1e-3, 1e-5] {
                    seed += 1;
                    let c = Case::<T>::random(seed, rows, vocab, vocab, 0, sigma, offset, gap);
                    compare(
                        &gpu,
                        &mut ws,
                        &c,
                        &o,
                        None,
                        &format!("σ {sigma} offset {offset} gap {gap}"),
                    );
                }
            }
        }
    }
}

#[test]
fn f16_loss_matches_the_oracle_on_the_same_inputs() {
    half_loss_holds::<f16>();
}

#[test]
fn bf16_loss_matches_the_oracle_on_the_same_inputs() {
    half_loss_holds::<bf16>();
}

fn every_direction_reduction_and_temperature<T: Element + DeviceRepr>() {
    let gpu = gpu_or_skip!();
    let mut ws = KlWorkspace::new(&gpu, 128).unwrap();
    let mut seed = 7000 + T::DTYPE as u64 * 1000;
    // Misaligned rows (stride 1,003, lead 1) on the one-block path; a long
    // split row set; gradients to strided outputs with a lead of their own.
    for (rows, vocab, stride, lead) in [
        (37usize, 1_000usize, 1_003usize, 1usize),
        (3, 70_001, 70_001, 0),
    ] {
        for dir in DIRS {
            for red in REDS {
                for tau in [1.0f32, 0.7, 2.5] {
                    seed += 1;
                    let mut c = Case::<T>::random(seed, rows, vocab, stride, lead, 2.0, 0.3, 0.2);
                    let mut rng = SmallRng::seed_from_u64(seed);
                    c.mask = Some(
                        (0..rows)
                            .map(|_| (rng.random::<f64>() < 0.75) as u8 * 3)
                            .collect(),
                    );
                    let g = GradSpec {
                        upstream: 1.5,
                        device_factor: Some(0.5),
                        with_target: seed % 2 == 0,
                        stride: vocab + 5,
                        lead: 3,
                    };
                    compare(
                        &gpu,
                        &mut ws,
                        &c,
                        &opts(dir, red, tau),
                        Some(g),
                        "all options",
                    );
                }
            }
        }
    }
}

#[test]
fn f32_every_direction_reduction_and_temperature() {
    every_direction_reduction_and_temperature::<f32>();
}

#[test]
fn f16_every_direction_reduction_and_temperature() {
    every_direction_reduction_and_temperature::<f16>();
}

#[test]
fn bf16_every_direction_reduction_and_temperature() {
    every_direction_reduction_and_temperature::<bf16>();
}

#[test]
fn gradients_hold_at_small_gaps() {
    let gpu = gpu_or_skip!();
    let mut ws = KlWorkspace::new(&gpu, 16).unwrap();
    let mut seed = 9000;
    for dir in DIRS {
        for gap in [1.0, 1e-2, 1e-4, 1e-5] {
            for (rows, vocab) in [(2usize, 33_333usize), (16, 2_048)] {
                seed += 1;
                let c = Case::<f32>::random(seed, rows, vocab, vocab, 0, 3.0, 10.0, gap);
                let o = opts(dir, Reduction::MeanRows, 1.0);
                compare(
                    &gpu,
                    &mut ws,
                    &c,
                    &o,
                    Some(grad_spec(vocab)),
                    &format!("gap {gap}"),
                );
            }
        }
    }
}

/// f32 logits far apart in magnitude, within the domain where the module docs
/// state the bound (offsets up to 1e8 against logits ~ N(0, 9)): one side
/// constant at the offset, the other spread around 0, in both roles, every
/// direction, one and several blocks per row, loss and gradients.
#[test]
fn far_apart_logits_within_the_stated_domain() {
    let gpu = gpu_or_skip!();
    let mut ws = KlWorkspace::new(&gpu, 4).unwrap();
    let mut rng = SmallRng::seed_from_u64(9100);
    for offset in [1e6f32, 1e8, -1e8] {
        for (rows, vocab) in [(2usize, 1_000usize), (2, 40_000)] {
            let mut c = Case::<f32>::random(9100, rows, vocab, vocab, 0, 1.0, 0.0, 1.0);
            for r in 0..rows {
                for j in 0..vocab {
                    let i = c.at(r, j);
                    c.a[i] = offset;
                    c.b[i] = (3.0 * normal(&mut rng)) as f32;
                }
            }
            let flipped = Case {
                a: c.b.clone(),
                b: c.a.clone(),
                ..c.clone()
            };
            for dir in DIRS {
                let o = opts(dir, Reduction::Sum, 1.0);
                for (case, roles) in [(&c, "far/near"), (&flipped, "near/far")] {
                    let label = format!("offset {offset:e} V={vocab} {roles}");
                    compare(&gpu, &mut ws, case, &o, Some(grad_spec(vocab)), &label);
                }
            }
        }
    }
}

/// Rows exercising the note's edge cases, one per row.
fn edge_case<T: Element>(vocab: usize, seed: u64) -> Case<T> {
    let rows = 10;
    let mut c = Case::<T>::random(seed, rows, vocab, vocab + 2, 1, 2.0, 0.0, 0.3);
    let ninf = T::from_f32(f32::NEG_INFINITY);
    let last = vocab - 1;
    // 0: a = −∞ at a few places (orphans when b is finite there).
    for j in (0..vocab).step_by(3) {
        let i = c.at(0, j);
        c.a[i] = ninf;
    }
    let i = c.at(0, last);
    c.a[i] = T::from_f32(0.0); // at least one finite a
                               // 1: b = −∞ where a is finite: forward +∞.
    let i = c.at(1, vocab / 2);
    c.b[i] = ninf;
    // 2: every a = −∞: NaN.
    for j in 0..vocab {
        let i = c.at(2, j);
        c.a[i] = ninf;
    }
    // 3: a NaN.
    let i = c.at(3, last);
    c.b[i] = T::from_f32(f32::NAN);
    // 4: both −∞ at the same places (no mass on either side there).
    for j in (0..vocab).step_by(2) {
        let (i, k) = (c.at(4, j), c.at(4, j));
        c.a[i] = ninf;
        c.b[k] = ninf;
    }
    let (i, k) = (c.at(4, last), c.at(4, last));
    c.a[i] = T::from_f32(1.0);
    c.b[k] = T::from_f32(1.0);
    // 5: identical rows: exactly 0.
    for j in 0..vocab {
        let (i, k) = (c.at(5, j), c.at(5, j));
        c.b[k] = c.a[i];
    }
    // 6: +∞: NaN.
    let i = c.at(6, 0);
    c.a[i] = T::from_f32(f32::INFINITY);
    // 7: wildly different rows: disjoint peaks of 60 (the centred sums overflow).
    for j in 0..vocab {
        let (i, k) = (c.at(7, j), c.at(7, j));
        c.a[i] = T::from_f32(if j == 0 { 60.0 } else { -60.0 });
        c.b[k] = T::from_f32(if j == last { 60.0 } else { -60.0 });
    }
    // 8: masked, with a NaN in it (masked rows are 0 whatever they hold).
    let i = c.at(8, 0);
    c.a[i] = T::from_f32(f32::NAN);
    // 9: plain.
    let mut mask = vec![1u8; rows];
    mask[8] = 0;
    c.mask = Some(mask);
    c
}

fn edge_cases<T: Element + DeviceRepr>() {
    let gpu = gpu_or_skip!();
    let mut ws = KlWorkspace::new(&gpu, 16).unwrap();
    for (k, vocab) in [2usize, 7, 9, 15, 17, 1000, 20_011].into_iter().enumerate() {
        let c = edge_case::<T>(vocab, 500 + k as u64);
        for dir in DIRS {
            let o = opts(dir, Reduction::Sum, 1.3);
            compare(
                &gpu,
                &mut ws,
                &c,
                &o,
                Some(grad_spec(vocab)),
                &format!("edge cases, vocab {vocab}"),
            );
        }
    }
    // Vocabulary 1: exactly 0, gradients exactly 0.
    let c = Case::<T>::random(31, 5, 1, 1, 0, 3.0, 1.0, 0.5);
    for dir in DIRS {
        let got = run(
            &gpu,
            &mut ws,
            &c,
            &opts(dir, Reduction::Sum, 1.0),
            Some(grad_spec(1)),
        );
        assert!(
            got.back.per_row.iter().all(|&v| v == 0.0),
            "vocab 1: {:?}",
            got.back.per_row
        );
        assert!(got.grad_model.unwrap().iter().all(|&g| g == 0.0));
        assert!(got.grad_target.unwrap().iter().all(|&g| g == 0.0));
    }
}

#[test]
fn f32_edge_cases() {
    edge_cases::<f32>();
}

#[test]
fn bf16_edge_cases() {
    edge_cases::<bf16>();
}

#[test]
fn all_masked_and_no_rows_give_zero() {
    let gpu = gpu_or_skip!();
    let mut ws = KlWorkspace::new(&gpu, 8).unwrap();
    let mut c = Case::<f32>::random(3, 6, 300, 300, 0, 2.0, 0.0, 0.5);
    c.mask = Some(vec![0; 6]);
    for red in REDS {
        let o = opts(KlDirection::Forward, red, 1.0);
        compare(&gpu, &mut ws, &c, &o, Some(grad_spec(300)), "all masked");
        let got = run(&gpu, &mut ws, &c, &o, None);
        assert!(got.back.all_masked && got.back.value == 0.0 && got.value_f32 == 0.0);
    }
    let c = Case::<f32>::random(4, 0, 300, 300, 0, 2.0, 0.0, 0.5);
    let got = run(
        &gpu,
        &mut ws,
        &c,
        &opts(KlDirection::Forward, Reduction::MeanRows, 1.0),
        None,
    );
    assert!(got.back.all_masked && got.value_f32 == 0.0);
}

/// Two runs of the same inputs: bit-identical value, per-row values and gradients.
#[test]
fn bit_identical_across_runs() {
    let gpu = gpu_or_skip!();
    let mut ws = KlWorkspace::new(&gpu, 64).unwrap();
    for (rows, vocab) in [(4usize, 250_002usize), (64, 5_000)] {
        let c = Case::<bf16>::random(77, rows, vocab, vocab, 0, 3.0, 0.0, 1e-2);
        for dir in DIRS {
            let o = opts(dir, Reduction::MeanRows, 1.0);
            let r1 = run(&gpu, &mut ws, &c, &o, Some(grad_spec(vocab)));
            let r2 = run(&gpu, &mut ws, &c, &o, Some(grad_spec(vocab)));
            assert_eq!(r1.value_f32.to_bits(), r2.value_f32.to_bits());
            assert_eq!(r1.back.value.to_bits(), r2.back.value.to_bits());
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&r1.back.per_row), bits(&r2.back.per_row));
            assert_eq!(
                bits(r1.grad_model.as_ref().unwrap()),
                bits(r2.grad_model.as_ref().unwrap())
            );
            assert_eq!(
                bits(r1.grad_target.as_ref().unwrap()),
                bits(r2.grad_target.as_ref().unwrap())
            );
        }
    }
}

/// The gradient written in place over the inputs (raw entry point).
#[test]
fn in_place_gradient_matches_separate_buffers() {
    let gpu = gpu_or_skip!();
    let mut ws = KlWorkspace::new(&gpu, 16).unwrap();
    let s = gpu.stream();
    for dir in DIRS {
        let c = Case::<bf16>::random(91, 9, 3_001, 3_008, 0, 2.0, 0.0, 0.1);
        let o = opts(dir, Reduction::MeanElements, 1.2);
        // Same layout as the inputs, so both runs take the same (vector) path.
        let spec = GradSpec {
            stride: c.stride,
            ..grad_spec(c.vocab)
        };
        let sep = run(&gpu, &mut ws, &c, &o, Some(spec));
        let mut da = s.clone_htod(&c.a).unwrap();
        let mut db = s.clone_htod(&c.b).unwrap();
        {
            use cudarc::driver::DevicePtrMut;
            let (pa, _ga) = da.device_ptr_mut(s);
            let (pb, _gb) = db.device_ptr_mut(s);
            let raw = |ptr| RawLogits {
                ptr,
                rows: c.rows,
                vocab: c.vocab,
                row_stride: c.stride,
                dtype: bf16::DTYPE,
            };
            let g = RawGrads {
                model: (pb, c.stride),
                target: Some((pa, c.stride)),
                upstream: 0.75,
                upstream_device: None,
            };
            // SAFETY: both buffers hold rows × stride elements on this stream;
            // the gradients are written exactly over their own inputs.
            unsafe { kl_div_raw(&gpu, raw(pa), raw(pb), None, &o, &mut ws, None, Some(g)) }
                .unwrap();
        }
        let ha = s.clone_dtoh(&da).unwrap();
        let hb = s.clone_dtoh(&db).unwrap();
        s.synchronize().unwrap();
        let (gm, gt) = (sep.grad_model.unwrap(), sep.grad_target.unwrap());
        for r in 0..c.rows {
            for j in 0..c.vocab {
                let i = c.lead + r * c.stride + j;
                assert_eq!(
                    hb[i].to_f64().to_bits(),
                    gm[r * c.vocab + j].to_bits(),
                    "{dir:?} model {r},{j}"
                );
                assert_eq!(
                    ha[i].to_f64().to_bits(),
                    gt[r * c.vocab + j].to_bits(),
                    "{dir:?} target {r},{j}"
                );
            }
            // Padding is untouched.
            for j in c.vocab..c.stride {
                let i = c.lead + r * c.stride + j;
                if i < ha.len() {
                    assert_eq!(ha[i].to_bits(), c.a[i].to_bits());
                    assert_eq!(hb[i].to_bits(), c.b[i].to_bits());
                }
            }
        }
    }
}

/// The issue's shapes: 16 × 250,002 (XLM-R), 64 × 1,048,576 and 16,384 × 32,000
/// (bf16), when the device has the memory.
#[test]
fn issue_shapes_match_the_reference() {
    let gpu = gpu_or_skip!();
    let mut ws = KlWorkspace::new(&gpu, 16_384).unwrap();
    let o = opts(KlDirection::Forward, Reduction::MeanRows, 1.0);
    let c = Case::<f32>::random(41, 16, 250_002, 250_002, 0, 3.0, 0.0, 1e-3);
    compare(
        &gpu,
        &mut ws,
        &c,
        &o,
        Some(grad_spec(250_002)),
        "16 × 250,002",
    );
    for (rows, vocab) in [(64usize, 1usize << 20), (16_384, 32_000)] {
        let what = format!("the {rows} × {vocab} case");
        if rows == 16_384
            && !common::real_gpu_case(&gpu, &what, "524 M logits: about 14 GB of host memory")
        {
            continue;
        }
        // Two inputs and the model gradient in bf16, and the workspace.
        if !common::device_has(&gpu, rows * vocab * 2 * 3 + (64 << 20), &what) {
            continue;
        }
        let c = Case::<bf16>::random(43 + rows as u64, rows, vocab, vocab, 0, 3.0, 0.0, 1e-2);
        let g = GradSpec {
            with_target: false,
            ..grad_spec(vocab)
        };
        compare(&gpu, &mut ws, &c, &o, Some(g), &format!("{rows} × {vocab}"));
    }
}

/// Element offsets past 2^31: three rows 2^30 + 8 apart (bf16, ~12 GiB).
#[test]
fn offsets_beyond_2_pow_31() {
    let gpu = gpu_or_skip!();
    let (rows, vocab, stride) = (3usize, 4_096usize, (1usize << 30) + 8);
    let n = (rows - 1) * stride + vocab;
    // Two bf16 buffers of n elements (only the rows are touched).
    if !common::device_has(&gpu, n * 2 * 2 + (64 << 20), "offsets past 2^31") {
        return;
    }
    let s = gpu.stream();
    let dense = Case::<bf16>::random(5, rows, vocab, vocab, 0, 3.0, 0.0, 0.1);
    let mut da = s.alloc_zeros::<bf16>(n).unwrap();
    let mut db = s.alloc_zeros::<bf16>(n).unwrap();
    for r in 0..rows {
        let src = r * vocab..(r + 1) * vocab;
        s.memcpy_htod(
            &dense.a[src.clone()],
            &mut da.slice_mut(r * stride..r * stride + vocab),
        )
        .unwrap();
        s.memcpy_htod(
            &dense.b[src],
            &mut db.slice_mut(r * stride..r * stride + vocab),
        )
        .unwrap();
    }
    let mut ws = KlWorkspace::new(&gpu, rows).unwrap();
    let o = opts(KlDirection::Symmetric, Reduction::None, 1.0);
    let ta = DeviceLogits::new(da.slice(..), rows, vocab, stride).unwrap();
    let tb = DeviceLogits::new(db.slice(..), rows, vocab, stride).unwrap();
    let mut gm = poison_buf::<bf16>(&gpu, rows * vocab);
    let grads = KlGrads {
        model: GradOut::new(gm.slice_mut(..), vocab),
        target: None,
        upstream: 1.0,
        upstream_device: None,
    };
    kl_div_with_grad(&gpu, &ta, &tb, None, &o, &mut ws, None, grads).unwrap();
    let back = ws.read(&gpu, rows).unwrap();
    let hg: Vec<f64> = s
        .clone_dtoh(&gm)
        .unwrap()
        .iter()
        .map(|v| v.to_f64())
        .collect();
    s.synchronize().unwrap();
    let (ca, cb) = (dense.cpu_logits(&dense.a), dense.cpu_logits(&dense.b));
    let (want, wg) = cpu::kl_div_grad(&ca, &cb, None, &o, 1.0, false).unwrap();
    for r in 0..rows {
        check_kl(&format!("row {r}"), back.per_row[r], want.per_row[r], 0.0);
    }
    check_grad::<bf16>("dmodel", &hg, &wg.model, rows, vocab);
}

#[test]
fn bad_input_is_an_error() {
    let gpu = gpu_or_skip!();
    let s = gpu.stream();
    let buf = s.clone_htod(&vec![0.5f32; 1000]).unwrap();
    let mask = s.clone_htod(&[1u8; 9]).unwrap();
    let mut ws = KlWorkspace::new(&gpu, 8).unwrap();
    let bad =
        |r: tram_kernels::Result<()>| assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    let isbad = |r: tram_kernels::Result<DeviceLogits<'_, f32>>| {
        assert!(matches!(r, Err(Error::InvalidArgument(_))))
    };
    // Shapes that do not fit, zero vocab, stride < vocab.
    isbad(DeviceLogits::new(buf.slice(..), 10, 101, 101));
    isbad(DeviceLogits::new(buf.slice(..), 2, 0, 10));
    isbad(DeviceLogits::new(buf.slice(..), 2, 10, 9));
    let a = DeviceLogits::new(buf.slice(..), 8, 100, 100).unwrap();
    let b = DeviceLogits::new(buf.slice(..), 8, 100, 120).unwrap();
    let b2 = DeviceLogits::new(buf.slice(..), 8, 99, 100).unwrap();
    let b3 = DeviceLogits::new(buf.slice(..), 7, 100, 100).unwrap();
    let o = KlOptions::default();
    assert!(kl_div(&gpu, &a, &b, None, &o, &mut ws, None).is_ok());
    bad(kl_div(&gpu, &a, &b2, None, &o, &mut ws, None)); // vocab mismatch
    bad(kl_div(&gpu, &a, &b3, None, &o, &mut ws, None)); // rows mismatch
    bad(kl_div(
        &gpu,
        &a,
        &b,
        Some(&mask.slice(..)),
        &o,
        &mut ws,
        None,
    )); // mask of 9 for 8 rows
    for tau in [0.0f32, -1.0, f32::NAN, f32::INFINITY, 1e-45] {
        bad(kl_div(
            &gpu,
            &a,
            &b,
            None,
            &opts(KlDirection::Forward, Reduction::Sum, tau),
            &mut ws,
            None,
        ));
    }
    let mut small = KlWorkspace::new(&gpu, 4).unwrap();
    bad(kl_div(&gpu, &a, &b, None, &o, &mut small, None)); // workspace too small
    let mut pr = s.alloc_zeros::<f32>(7).unwrap();
    bad(kl_div(
        &gpu,
        &a,
        &b,
        None,
        &o,
        &mut ws,
        Some(&mut pr.slice_mut(..)),
    )); // per-row too short
    let mut g = s.alloc_zeros::<f32>(799).unwrap();
    let grads = KlGrads {
        model: GradOut::new(g.slice_mut(..), 100),
        target: None,
        upstream: 1.0,
        upstream_device: None,
    };
    bad(kl_div_with_grad(
        &gpu, &a, &b, None, &o, &mut ws, None, grads,
    )); // gradient buffer too small
    let mut g = s.alloc_zeros::<f32>(800).unwrap();
    let grads = KlGrads {
        model: GradOut::new(g.slice_mut(..), 99),
        target: None,
        upstream: 1.0,
        upstream_device: None,
    };
    bad(kl_div_with_grad(
        &gpu, &a, &b, None, &o, &mut ws, None, grads,
    )); // gradient stride < vocab
    assert!(matches!(
        KlWorkspace::new(&gpu, 0),
        Err(Error::InvalidArgument(_))
    ));
    // Raw: dtype mismatch.
    let raw = |dtype| RawLogits {
        ptr: 1 << 20,
        rows: 2,
        vocab: 4,
        row_stride: 4,
        dtype,
    };
    // SAFETY: rejected before any pointer is used (dtype mismatch).
    let r = unsafe {
        kl_div_raw(
            &gpu,
            raw(tram_kernels::DType::F32),
            raw(tram_kernels::DType::BF16),
            None,
            &o,
            &mut ws,
            None,
            None,
        )
    };
    bad(r);
}
