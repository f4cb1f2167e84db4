//! The KL op on candle's CPU tensors (feature `candle`): its value and backward
//! against the crate's CPU reference (bit for bit: the same code runs), against
//! candle's own composition of log-softmaxes in f64 (at the stated
//! tolerances), as a distillation loss in a small autograd graph, and on bad
//! input.

use candle_core::{DType, Device, IndexOp, Tensor, Var, WithDType, D};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tram_kernels::candle::{kl_div, KlDiv};
use tram_kernels::cpu::kl_div::{kl_div as cpu_kl_div, kl_div_grad as cpu_kl_div_grad, Logits};
use tram_kernels::{bf16, f16, Element, KlDirection, KlOptions, Reduction};

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

fn normal(rng: &mut SmallRng) -> f32 {
    // Box–Muller; 1 − u keeps the logarithm finite.
    let u: f64 = 1.0 - rng.random::<f64>();
    let v: f64 = rng.random::<f64>();
    ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
}

/// Model logits N(0, σ²) and target logits at a gap: target = model + gap·N(0, 1)
/// (gap 1 and more: unrelated rows; small: TRAM's nearly equal logits).
fn logits_pair<T: Element>(rng: &mut SmallRng, n: usize, sigma: f32, gap: f32) -> (Vec<T>, Vec<T>) {
    let model: Vec<f32> = (0..n).map(|_| sigma * normal(rng)).collect();
    let target: Vec<T> = model
        .iter()
        .map(|&m| T::from_f32(m + gap * sigma * normal(rng)))
        .collect();
    (target, model.into_iter().map(T::from_f32).collect())
}

fn opts(direction: KlDirection, reduction: Reduction, temperature: f32) -> KlOptions {
    KlOptions {
        direction,
        reduction,
        temperature,
    }
}

/// The bit patterns, with −0 read as +0: candle adds an op's gradient to a
/// zero-initialised accumulator (0 + −0 = +0), so a gradient of −0 reaches
/// the `GradStore` as +0. Every other bit is compared.
fn bits<T: Element>(v: &[T]) -> Vec<u32> {
    v.iter()
        .map(|&x| {
            if Element::to_f64(x) == 0.0 {
                0
            } else {
                x.to_bits_u32()
            }
        })
        .collect()
}

/// The op's value and both gradients, through candle's autograd: the loss is
/// `affine(value, 0.37)` for the scalar reductions and `Σ_r w_r·value_r`
/// (w from `row_weights`) for `Reduction::None`.
fn through_candle<T: Element + WithDType>(
    target: &[T],
    model: &[T],
    shape: &[usize],
    o: &KlOptions,
    row_weights: &[f32],
) -> (Vec<f32>, Vec<T>, Vec<T>) {
    let dev = Device::Cpu;
    let t = Var::from_vec(target.to_vec(), shape, &dev).unwrap();
    let m = Var::from_vec(model.to_vec(), shape, &dev).unwrap();
    let value = kl_div(t.as_tensor(), m.as_tensor(), o).unwrap();
    assert_eq!(value.dtype(), DType::F32);
    let loss = match o.reduction {
        Reduction::None => {
            assert_eq!(value.dims(), &shape[..shape.len() - 1]);
            let w = Tensor::from_vec(row_weights.to_vec(), value.shape(), &dev).unwrap();
            (&value * &w).unwrap().sum_all().unwrap()
        }
        _ => {
            assert_eq!(value.dims(), &[] as &[usize]);
            value.affine(0.37, 0.0).unwrap()
        }
    };
    let grads = loss.backward().unwrap();
    let g = |v: &Var| {
        let g = grads
            .get(v.as_tensor())
            .expect("a tracked input has a gradient");
        assert_eq!(g.dims(), shape);
        g.flatten_all().unwrap().to_vec1::<T>().unwrap()
    };
    let value = value.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (value, g(&m), g(&t))
}

/// The crate's CPU value and gradients for the same loss.
fn through_crate<T: Element>(
    target: &[T],
    model: &[T],
    rows: usize,
    vocab: usize,
    o: &KlOptions,
    row_weights: &[f32],
) -> (Vec<f32>, Vec<T>, Vec<T>) {
    let a = Logits::dense(target, rows, vocab).unwrap();
    let b = Logits::dense(model, rows, vocab).unwrap();
    let out = cpu_kl_div(&a, &b, None, o).unwrap();
    let per_row = o.reduction == Reduction::None;
    // The incoming gradient: 0.37 in f32 (what candle's affine passes back),
    // or 1 with the rows weighted afterwards in f64.
    let upstream = if per_row { 1.0 } else { 0.37f32 as f64 };
    let (_, g) = cpu_kl_div_grad(&a, &b, None, o, upstream, true).unwrap();
    let round = |g: Vec<f64>| -> Vec<T> {
        g.iter()
            .enumerate()
            .map(|(i, &x)| {
                let w = if per_row {
                    row_weights[i / vocab] as f64
                } else {
                    1.0
                };
                T::from_f64(x * w)
            })
            .collect()
    };
    let value = if per_row {
        out.per_row.iter().map(|&v| v as f32).collect()
    } else {
        vec![out.value as f32]
    };
    (value, round(g.model), round(g.target.unwrap()))
}

fn same_bits_as_the_crate<T: Element + WithDType>(seed: u64) {
    let mut rng = SmallRng::seed_from_u64(seed);
    // A 3-d batch of short rows, and rows longer than the reference's chunk.
    let cases: [(&[usize], f32, f32); 3] = [
        (&[2, 3, 37], 1.0, 1.0),
        (&[5, 1300], 3.0, 1e-2),
        (&[64], 2.0, 0.3),
    ];
    let (mut checked, mut nonzero) = (0, 0);
    for (shape, sigma, gap) in cases {
        let vocab = shape[shape.len() - 1];
        let rows = shape.iter().product::<usize>() / vocab;
        let (target, model) = logits_pair::<T>(&mut rng, rows * vocab, sigma, gap);
        let weights: Vec<f32> = (0..rows).map(|_| 0.5 + rng.random::<f32>()).collect();
        for dir in DIRS {
            for red in REDS {
                for tau in [1.0, 2.5] {
                    let o = opts(dir, red, tau);
                    let (v, gm, gt) = through_candle(&target, &model, shape, &o, &weights);
                    let (ev, egm, egt) = through_crate(&target, &model, rows, vocab, &o, &weights);
                    let what = format!(
                        "{:?} {shape:?} {dir:?} {red:?} τ={tau}",
                        <T as Element>::DTYPE
                    );
                    assert_eq!(bits(&v), bits(&ev), "value, {what}");
                    assert!(
                        v.iter().all(|x| x.is_finite() && *x > 0.0),
                        "value {v:?}, {what}"
                    );
                    assert_eq!(bits(&gm), bits(&egm), "model gradient, {what}");
                    assert_eq!(bits(&gt), bits(&egt), "target gradient, {what}");
                    nonzero += gm.iter().any(|g| Element::to_f64(*g) != 0.0) as usize;
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 3 * 3 * 4 * 2);
    // Not vacuous: the gradients are zero only where they are below the
    // dtype's range (f16's MeanElements over 6,500 elements at τ = 2.5).
    assert!(
        nonzero * 10 >= checked * 9,
        "{nonzero} of {checked} cases had a gradient"
    );
}

#[test]
fn value_and_backward_are_the_crates_bits_f32() {
    same_bits_as_the_crate::<f32>(1);
}

#[test]
fn value_and_backward_are_the_crates_bits_f16() {
    same_bits_as_the_crate::<f16>(2);
}

#[test]
fn value_and_backward_are_the_crates_bits_bf16() {
    same_bits_as_the_crate::<bf16>(3);
}

// ------------------------------------------- candle's own composition, in f64

/// log softmax(x) over the last axis, composed from candle's ops.
fn log_softmax(x: &Tensor) -> Tensor {
    let m = x.max_keepdim(D::Minus1).unwrap().detach();
    let z = x.broadcast_sub(&m).unwrap();
    let lse = z
        .exp()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap()
        .log()
        .unwrap();
    z.broadcast_sub(&lse).unwrap()
}

/// KL(softmax(a/τ) ‖ softmax(b/τ)) per row, composed from candle's ops.
fn kl_rows(a: &Tensor, b: &Tensor, tau: f64) -> Tensor {
    let la = log_softmax(&a.affine(1.0 / tau, 0.0).unwrap());
    let lb = log_softmax(&b.affine(1.0 / tau, 0.0).unwrap());
    (la.exp().unwrap() * (la - lb).unwrap())
        .unwrap()
        .sum(D::Minus1)
        .unwrap()
}

/// The same loss as the op, composed in candle from log-softmaxes.
fn composed(a: &Tensor, b: &Tensor, o: &KlOptions) -> Tensor {
    let tau = o.temperature as f64;
    let rows = match o.direction {
        KlDirection::Forward => kl_rows(a, b, tau),
        KlDirection::Reverse => kl_rows(b, a, tau),
        KlDirection::Symmetric => (kl_rows(a, b, tau) + kl_rows(b, a, tau)).unwrap(),
    };
    let n_rows = rows.elem_count() as f64;
    let vocab = a.dim(D::Minus1).unwrap() as f64;
    match o.reduction {
        Reduction::None => rows,
        Reduction::Sum => rows.sum_all().unwrap(),
        Reduction::MeanRows => rows.sum_all().unwrap().affine(1.0 / n_rows, 0.0).unwrap(),
        Reduction::MeanElements => rows
            .sum_all()
            .unwrap()
            .affine(1.0 / (n_rows * vocab), 0.0)
            .unwrap(),
    }
}

/// Value: |v − v*| ≤ 1e-7·|v*|, v* candle's composition in f64 on the same
/// (exactly upcast) logits: the op's f32 rounding (≤ 6e-8 relative) plus the
/// crate's 1e-12 and the composition's own f64 rounding (≲ 1e-12 relative at
/// these divergences).
const VALUE_REL: f64 = 1e-7;
/// Gradient of f32 logits: |g − g*| ≤ 6e-8·|g*| + 1e-10·max|g*| (the f32
/// rounding of the op's gradient, and the composition's f64 rounding).
const GRAD_REL: f64 = 6e-8;
const GRAD_ABS: f64 = 1e-10;

fn against_composition<T: Element + WithDType>(seed: u64, check_grad: bool) {
    let mut rng = SmallRng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let shape = [3usize, 4, 50];
    let n: usize = shape.iter().product();
    for (sigma, gap) in [(1.0f32, 1.0f32), (3.0, 0.05)] {
        let (target, model) = logits_pair::<T>(&mut rng, n, sigma, gap);
        for dir in DIRS {
            for red in REDS {
                let o = opts(dir, red, 1.7);
                let what = format!(
                    "{:?} σ={sigma} gap={gap} {dir:?} {red:?}",
                    <T as Element>::DTYPE
                );
                let t = Var::from_vec(target.clone(), &shape, &dev).unwrap();
                let m = Var::from_vec(model.clone(), &shape, &dev).unwrap();
                let v = kl_div(t.as_tensor(), m.as_tensor(), &o).unwrap();
                // f64 copies of the same values (exact), through candle's ops.
                let t64 = Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap();
                let m64 = Var::from_tensor(&m.to_dtype(DType::F64).unwrap()).unwrap();
                let c = composed(t64.as_tensor(), m64.as_tensor(), &o);
                let vs = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let cs = c.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                assert_eq!(vs.len(), cs.len(), "{what}");
                for (x, y) in vs.iter().zip(&cs) {
                    assert!(
                        (*x as f64 - y).abs() <= VALUE_REL * y.abs(),
                        "value {x} vs candle's {y}, {what}"
                    );
                }
                if !check_grad {
                    continue;
                }
                let (ours, theirs) = (v.sum_all().unwrap(), c.sum_all().unwrap());
                let (g1, g2) = (ours.backward().unwrap(), theirs.backward().unwrap());
                for (mine, other, name) in [(&m, &m64, "model"), (&t, &t64, "target")] {
                    let a = g1.get(mine).unwrap().flatten_all().unwrap();
                    let a = a.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
                    let b = g2
                        .get(other)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f64>()
                        .unwrap();
                    let max = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
                    assert!(max > 0.0, "{what}");
                    for (x, y) in a.iter().zip(&b) {
                        assert!(
                            (x - y).abs() <= GRAD_REL * y.abs() + GRAD_ABS * max,
                            "{name} gradient {x} vs candle's {y}, {what}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn value_and_gradient_match_candles_composition_f32() {
    against_composition::<f32>(10, true);
}

#[test]
fn value_matches_candles_composition_f16_bf16() {
    against_composition::<f16>(11, false);
    against_composition::<bf16>(12, false);
}

// ------------------------------------------------------------- layouts

/// A narrowed vocabulary (rows a stride apart), an offset into the storage and
/// a 3-d view give the bits of their contiguous copies, and the gradient
/// reaches the var behind the view (zeros outside it).
#[test]
fn strided_views_are_read_in_place() {
    let mut rng = SmallRng::seed_from_u64(20);
    let dev = Device::Cpu;
    let (rows, wide, vocab) = (6usize, 40usize, 29usize);
    let (a, b) = logits_pair::<f32>(&mut rng, rows * wide, 2.0, 0.5);
    let ta = Var::from_vec(a, (rows, wide), &dev).unwrap();
    let tb = Var::from_vec(b, (rows, wide), &dev).unwrap();
    for red in REDS {
        let o = opts(KlDirection::Symmetric, red, 1.3);
        // Rows 1..5, columns 7..36: offset 47, row stride 40.
        let va = ta.narrow(0, 1, 4).unwrap().narrow(1, 7, vocab).unwrap();
        let vb = tb.narrow(0, 1, 4).unwrap().narrow(1, 7, vocab).unwrap();
        assert!(!va.is_contiguous());
        let v = kl_div(&va, &vb, &o).unwrap();
        let (ca, cb) = (
            va.contiguous().unwrap().detach(),
            vb.contiguous().unwrap().detach(),
        );
        let ca = Var::from_tensor(&ca).unwrap();
        let cb = Var::from_tensor(&cb).unwrap();
        let w = kl_div(ca.as_tensor(), cb.as_tensor(), &o).unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(bits(&flat(&v)), bits(&flat(&w)), "{red:?}");

        let g_view = v.sum_all().unwrap().backward().unwrap();
        let g_copy = w.sum_all().unwrap().backward().unwrap();
        for (var, copy) in [(&ta, &ca), (&tb, &cb)] {
            let g = g_view.get(var).unwrap();
            let inside = g.narrow(0, 1, 4).unwrap().narrow(1, 7, vocab).unwrap();
            assert_eq!(
                bits(&flat(&inside)),
                bits(&flat(g_copy.get(copy).unwrap())),
                "{red:?}"
            );
            let total: f32 = flat(&g.abs().unwrap()).iter().sum();
            let within: f32 = flat(&inside.abs().unwrap()).iter().sum();
            assert!(
                within > 0.0 && total == within,
                "{red:?}: gradient outside the view"
            );
        }
    }

    // (2, 3, vocab) rows taken from a (2, 3, wide) tensor: leading axes merge
    // into one row stride.
    let a3 = ta
        .reshape((2, 3, wide))
        .unwrap()
        .narrow(2, 3, vocab)
        .unwrap();
    let b3 = tb
        .reshape((2, 3, wide))
        .unwrap()
        .narrow(2, 3, vocab)
        .unwrap();
    let o = opts(KlDirection::Forward, Reduction::None, 1.0);
    let v = kl_div(&a3, &b3, &o).unwrap();
    let w = kl_div(&a3.contiguous().unwrap(), &b3.contiguous().unwrap(), &o).unwrap();
    assert_eq!(v.dims(), &[2, 3]);
    assert_eq!(
        bits(&v.flatten_all().unwrap().to_vec1::<f32>().unwrap()),
        bits(&w.flatten_all().unwrap().to_vec1::<f32>().unwrap())
    );
}

// ------------------------------------------------------- distillation

/// A linear student learns a fixed teacher's distribution through the op: the
/// gradient reaches the weights as xᵀ·(dL/dlogits), and plain gradient descent
/// driven by candle's autograd lowers the loss.
#[test]
fn works_as_a_distillation_loss() {
    let mut rng = SmallRng::seed_from_u64(30);
    let dev = Device::Cpu;
    let (batch, dim, classes) = (8usize, 16usize, 10usize);
    let rnd = |rng: &mut SmallRng, n: usize, s: f32| -> Vec<f32> {
        (0..n).map(|_| s * normal(rng)).collect()
    };
    let x = Tensor::from_vec(rnd(&mut rng, batch * dim, 1.0), (batch, dim), &dev).unwrap();
    let teacher =
        Tensor::from_vec(rnd(&mut rng, batch * classes, 2.0), (batch, classes), &dev).unwrap();
    let w = Var::from_vec(rnd(&mut rng, dim * classes, 0.1), (dim, classes), &dev).unwrap();
    let bias = Var::zeros(classes, DType::F32, &dev).unwrap();
    let o = KlOptions {
        temperature: 2.0,
        ..KlOptions::default()
    };
    let student = |w: &Var, b: &Var| {
        x.matmul(w.as_tensor())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap()
    };

    // The chain rule through candle's matmul, against the crate's gradient.
    let logits = student(&w, &bias);
    let loss = kl_div(&teacher, &logits, &o).unwrap();
    let grads = loss.backward().unwrap();
    assert!(grads.get(&teacher).is_none(), "the teacher is not tracked");
    let gw = grads
        .get(w.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let tv = teacher.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let lv = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (_, g) = cpu_kl_div_grad(
        &Logits::dense(&tv, batch, classes).unwrap(),
        &Logits::dense(&lv, batch, classes).unwrap(),
        None,
        &o,
        1.0,
        false,
    )
    .unwrap();
    let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut max = 0.0f64;
    let mut expect = vec![0.0f64; dim * classes];
    for i in 0..dim {
        for k in 0..classes {
            expect[i * classes + k] = (0..batch)
                .map(|r| xv[r * dim + i] as f64 * g.model[r * classes + k])
                .sum();
            max = max.max(expect[i * classes + k].abs());
        }
    }
    assert!(max > 0.0);
    // f32 gradients and an f32 matmul of 8 terms: a few ulps of the largest.
    for (a, e) in gw.iter().zip(&expect) {
        assert!((*a as f64 - e).abs() <= 1e-6 * max, "dW {a} vs {e}");
    }

    // Gradient descent, every gradient from candle's autograd.
    let first = loss.to_scalar::<f32>().unwrap();
    let mut last = first;
    for _ in 0..200 {
        let loss = kl_div(&teacher, &student(&w, &bias), &o).unwrap();
        let grads = loss.backward().unwrap();
        for v in [&w, &bias] {
            let g = grads.get(v.as_tensor()).unwrap();
            v.set(&(v.as_tensor() - g.affine(2.0, 0.0).unwrap()).unwrap())
                .unwrap();
        }
        last = loss.to_scalar::<f32>().unwrap();
    }
    assert!(first.is_finite() && first > 0.1, "initial loss {first}");
    assert!(last < 0.1 * first, "the loss went from {first} to {last}");
}

// ------------------------------------------------------------- bad input

fn err_text(r: candle_core::Result<Tensor>) -> String {
    match r {
        Ok(t) => panic!("accepted, giving {t:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_input_is_an_error() {
    let dev = Device::Cpu;
    let o = KlOptions::default();
    let t = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
    let a = t(&[4, 10]);

    // Shapes that differ, even with the same element count.
    assert!(err_text(kl_div(&a, &t(&[4, 11]), &o)).contains("[4, 10]"));
    assert!(err_text(kl_div(&a, &t(&[2, 20]), &o)).contains("[2, 20]"));
    // Dtypes: mixed, or not one the crate takes.
    let msg = err_text(kl_div(&a, &a.to_dtype(DType::BF16).unwrap(), &o));
    assert!(msg.contains("F32") && msg.contains("BF16"), "{msg}");
    let f64s = a.to_dtype(DType::F64).unwrap();
    assert!(err_text(kl_div(&f64s, &f64s, &o)).contains("F64"));
    let ints = Tensor::zeros((4, 10), DType::U32, &dev).unwrap();
    assert!(err_text(kl_div(&ints, &ints, &o)).contains("U32"));
    // Layouts the crate cannot read in place.
    let transposed = t(&[10, 4]).t().unwrap();
    assert!(err_text(kl_div(&transposed, &a, &o)).contains(".contiguous()"));
    assert!(kl_div(&transposed.contiguous().unwrap(), &a, &o).is_ok());
    let broadcast = t(&[1, 10]).broadcast_as((4, 10)).unwrap();
    assert!(err_text(kl_div(&broadcast, &a, &o)).contains(".contiguous()"));
    let gappy = t(&[2, 4, 10]).narrow(1, 0, 3).unwrap(); // rows 0-2 and 4-6 of 8
    let dense = t(&[2, 3, 10]);
    assert!(err_text(kl_div(&gappy, &dense, &o)).contains(".contiguous()"));
    assert!(kl_div(&gappy.contiguous().unwrap(), &dense, &o).is_ok());
    // No vocabulary axis, or an empty one.
    let scalar = Tensor::new(1f32, &dev).unwrap();
    assert!(err_text(kl_div(&scalar, &scalar, &o)).contains("scalar"));
    let empty_vocab = t(&[4, 0]);
    assert!(err_text(kl_div(&empty_vocab, &empty_vocab, &o)).contains("vocabulary"));
    // Temperatures.
    for tau in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let bad = KlOptions {
            temperature: tau,
            ..o
        };
        assert!(KlDiv::new(bad).is_err());
        assert!(err_text(kl_div(&a, &a, &bad)).contains("temperature"));
    }
}

/// No rows: the value is 0 (every reduction) and the gradients are empty.
#[test]
fn no_rows_give_zero() {
    let dev = Device::Cpu;
    for red in [Reduction::Sum, Reduction::MeanRows] {
        let a = Var::zeros((0, 10), DType::F32, &dev).unwrap();
        let v = kl_div(
            a.as_tensor(),
            a.as_tensor(),
            &opts(KlDirection::Forward, red, 1.0),
        )
        .unwrap();
        assert_eq!(v.to_scalar::<f32>().unwrap(), 0.0);
        let g = v.backward().unwrap();
        assert_eq!(g.get(a.as_tensor()).unwrap().dims(), &[0, 10]);
    }
    let a = Tensor::zeros((0, 10), DType::F32, &dev).unwrap();
    let v = kl_div(&a, &a, &opts(KlDirection::Forward, Reduction::None, 1.0)).unwrap();
    assert_eq!(v.dims(), &[0]);
}

/// A value that is not finite stays so (an infinite divergence is not hidden),
/// and a row of the batch picks its own value out of `Reduction::None`.
#[test]
fn per_row_values_index_like_the_rows() {
    let dev = Device::Cpu;
    let a = Tensor::new(&[[0f32, 0.0], [1.0, 2.0], [0.0, f32::NEG_INFINITY]], &dev).unwrap();
    let b = Tensor::new(&[[0f32, 0.0], [2.0, 1.0], [0.0, 0.0]], &dev).unwrap();
    let v = kl_div(&a, &b, &opts(KlDirection::Forward, Reduction::None, 1.0)).unwrap();
    let row = |r: usize| v.i(r).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(row(0), 0.0);
    // softmax([1,2]) vs softmax([2,1]): (p1 − p0)·1 = tanh(1/2).
    assert!((row(1) as f64 - 0.5f64.tanh()).abs() < 1e-7);
    // a = [0, −∞] against b = [0, 0]: ln 2.
    assert!((row(2) as f64 - 2f64.ln()).abs() < 1e-7);
    let inf = Tensor::new(&[[0f32, 0.0]], &dev).unwrap();
    let qinf = Tensor::new(&[[0f32, f32::NEG_INFINITY]], &dev).unwrap();
    let v = kl_div(&inf, &qinf, &KlOptions::default()).unwrap();
    assert_eq!(v.to_scalar::<f32>().unwrap(), f32::INFINITY);
}
