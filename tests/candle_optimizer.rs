//! The candle optimizer (feature `candle`) on candle's CPU device: after
//! several iterations its vars, targets and state are bit for bit those of
//! the crate's own CPU step run on the same gradients (TRAM-θ, TRAM-x, SAM,
//! ASAM; AdamW and SGD with momentum; an AMP loss scale; a var whose
//! gradient comes and goes); a checkpointed and resumed run is the
//! uninterrupted one; a short training run lowers the loss; bad input is an
//! `Err` that leaves the vars as they were.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tram_kernels::candle::{Method, TramOptimizer};
use tram_kernels::cpu::kl_div::Logits;
use tram_kernels::cpu::step::{Perturbation, Tensor as StepTensor, TramStep};
use tram_kernels::{
    BaseOptimizer, Geometry, KlOptions, NoiseConfig, NoiseDistribution, Tram, TramConfig,
    TramVariant,
};

const N: usize = 24; // samples
const D_IN: usize = 6;
const H: usize = 10;
const C: usize = 4; // classes
/// Shapes of the model's vars: w1, b1, w2, and `extra` (used on even
/// iterations only, so its gradient comes and goes).
const SHAPES: [&[usize]; 4] = [&[D_IN, H], &[H], &[H, C], &[D_IN, C]];

fn random(rng: &mut SmallRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

struct Data {
    x: Tensor,
    y: Tensor, // one-hot, f32
}

fn data(seed: u64) -> Data {
    let mut rng = SmallRng::seed_from_u64(seed);
    let x = Tensor::from_vec(random(&mut rng, N * D_IN, 1.0), (N, D_IN), &Device::Cpu).unwrap();
    let mut y = vec![0f32; N * C];
    for i in 0..N {
        y[i * C + rng.random_range(0..C)] = 1.0;
    }
    let y = Tensor::from_vec(y, (N, C), &Device::Cpu).unwrap();
    Data { x, y }
}

fn init(seed: u64) -> Vec<Vec<f32>> {
    let mut rng = SmallRng::seed_from_u64(seed);
    SHAPES
        .iter()
        .map(|s| random(&mut rng, s.iter().product(), 0.5))
        .collect()
}

fn vars_from(values: &[Vec<f32>]) -> Vec<Var> {
    values
        .iter()
        .zip(SHAPES)
        .map(|(v, s)| Var::from_slice(v, s, &Device::Cpu).unwrap())
        .collect()
}

fn values(vars: &[Var]) -> Vec<Vec<f32>> {
    vars.iter()
        .map(|v| v.flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

/// Logits of the MLP with weights `w` on inputs `x`; `extra` on even iterations.
fn logits(w: &[Tensor], x: &Tensor, it: usize) -> Tensor {
    let h = x
        .matmul(&w[0])
        .unwrap()
        .broadcast_add(&w[1])
        .unwrap()
        .relu()
        .unwrap();
    let z = h.matmul(&w[2]).unwrap();
    if it % 2 == 0 {
        (z + x.matmul(&w[3]).unwrap()).unwrap()
    } else {
        z
    }
}

/// Mean cross-entropy times `scale` (AMP's scaled loss).
fn loss(z: &Tensor, y: &Tensor, scale: f64) -> Tensor {
    let lse = z.log_sum_exp(D::Minus1).unwrap().unsqueeze(1).unwrap();
    let logp = z.broadcast_sub(&lse).unwrap();
    let nll = (logp * y).unwrap().sum_all().unwrap().neg().unwrap();
    (nll * (scale / N as f64)).unwrap()
}

fn tensors(vars: &[Var]) -> Vec<Tensor> {
    vars.iter().map(|v| v.as_tensor().clone()).collect()
}

fn grad_of(g: &GradStore, v: &Var) -> Option<Vec<f32>> {
    g.get(v.as_tensor())
        .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn noise_cfg() -> NoiseConfig {
    NoiseConfig {
        distribution: NoiseDistribution::Gaussian,
        sigma: 0.1,
        seed: 42,
    }
}

fn tram_cfg(variant: TramVariant, geometry: Geometry, optimizer: BaseOptimizer) -> TramConfig {
    TramConfig {
        delta: 0.5,
        geometry,
        kl: KlOptions::default(),
        variant,
        optimizer,
        lr: 0.02,
    }
}

fn sgd() -> BaseOptimizer {
    BaseOptimizer::Sgd {
        momentum: 0.9,
        dampening: 0.0,
        weight_decay: 1e-3,
        nesterov: true,
    }
}

/// The reference: the crate's CPU step over plain vectors.
struct Reference {
    theta: Vec<Vec<f32>>,
    backup: Vec<Vec<f32>>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    target: Vec<Vec<f32>>,
    step: Option<TramStep<f32>>,
}

impl Reference {
    fn new(method: &Method, init: &[Vec<f32>]) -> Self {
        let (cfg, theta) = match method {
            Method::Tram(c) => (*c, matches!(c.variant, TramVariant::Theta { .. })),
            Method::Sam {
                geometry,
                optimizer,
                lr,
                ..
            } => (
                TramConfig {
                    delta: 0.0,
                    geometry: *geometry,
                    kl: KlOptions::default(),
                    variant: TramVariant::X { noise: noise_cfg() },
                    optimizer: *optimizer,
                    lr: *lr,
                },
                false,
            ),
        };
        let zeros = |on: bool| {
            if on {
                init.iter().map(|t| vec![0.0; t.len()]).collect()
            } else {
                Vec::new()
            }
        };
        let mut r = Self {
            theta: init.to_vec(),
            backup: zeros(true),
            m: zeros(cfg.optimizer.uses_m()),
            v: zeros(cfg.optimizer.uses_v()),
            target: if theta { init.to_vec() } else { Vec::new() },
            step: None,
        };
        let none = vec![None; init.len()];
        let step = TramStep::new(cfg, &r.describe(&none)).unwrap();
        r.step = Some(step);
        r
    }

    fn describe<'a>(&'a mut self, grads: &'a [Option<Vec<f32>>]) -> Vec<StepTensor<'a, f32>> {
        let mut m = self.m.iter_mut();
        let mut v = self.v.iter_mut();
        let mut t = self.target.iter_mut();
        self.theta
            .iter_mut()
            .zip(self.backup.iter_mut())
            .zip(grads)
            .map(|((p, b), g)| StepTensor {
                param: p,
                grad: g.as_deref(),
                perturbation: Perturbation::Backup(b),
                m: m.next().map(|x| &mut x[..]),
                v: v.next().map(|x| &mut x[..]),
                target: t.next().map(|x| &mut x[..]),
                weight_decay: true,
            })
            .collect()
    }
}

/// Which weights give the KL's target logits, and on which inputs.
fn kl_pair(
    method: &Method,
    w: &[Tensor],
    targets: &[Tensor],
    x: &Tensor,
    x_noised: Option<&Tensor>,
    it: usize,
) -> Option<(Tensor, Tensor)> {
    match method {
        Method::Sam { .. } => None,
        Method::Tram(c) => match c.variant {
            TramVariant::Theta { .. } => {
                Some((logits(targets, x, it).detach(), logits(w, x, it).detach()))
            }
            TramVariant::X { .. } => Some((
                logits(w, x, it).detach(),
                logits(w, x_noised.unwrap(), it).detach(),
            )),
        },
    }
}

/// `iters` iterations of the candle optimizer and of the reference on the
/// same gradients; every var, target and state buffer compared bit for bit
/// after every iteration.
fn compare(method: Method, scale: f64, iters: usize) {
    let d = data(1);
    let init = init(2);
    let vars = vars_from(&init);
    let mut opt = TramOptimizer::new(vars.clone(), method).unwrap();
    let mut r = Reference::new(&method, &init);
    let step = r.step.take().unwrap();
    let mut step = step;
    opt.set_inv_scale((1.0 / scale) as f32).unwrap();
    step.set_inv_scale((1.0 / scale) as f32).unwrap();
    // The reference's gradients come from candle on vars holding its θ.
    let ref_vars = vars_from(&init);
    let set = |vs: &[Var], vals: &[Vec<f32>]| {
        for (v, x) in vs.iter().zip(vals) {
            v.set(&Tensor::from_slice(x, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    };
    let what = format!("{method:?}, scale {scale}");
    for it in 0..iters {
        // The optimizer.
        let w = tensors(&vars);
        let g1 = loss(&logits(&w, &d.x, it), &d.y, scale).backward().unwrap();
        let xn = match method {
            Method::Tram(TramConfig {
                variant: TramVariant::X { .. },
                ..
            }) => Some(opt.noise(&d.x).unwrap()),
            _ => None,
        };
        let targets = opt.targets().unwrap();
        let pair = kl_pair(&method, &w, &targets, &d.x, xn.as_ref(), it);
        opt.first_step(&g1, pair.as_ref().map(|(a, b)| (a, b)))
            .unwrap();
        let g2 = loss(&logits(&w, &d.x, it), &d.y, scale).backward().unwrap();
        opt.second_step(&g2).unwrap();

        // The reference, on the same inputs.
        set(&ref_vars, &r.theta);
        let rw = tensors(&ref_vars);
        let rg1 = loss(&logits(&rw, &d.x, it), &d.y, scale)
            .backward()
            .unwrap();
        let grads1: Vec<Option<Vec<f32>>> = ref_vars.iter().map(|v| grad_of(&rg1, v)).collect();
        let has: Vec<bool> = grads1.iter().map(Option::is_some).collect();
        assert_eq!(
            has[3],
            it % 2 == 0,
            "the extra var's gradient comes and goes"
        );
        step.set_has_grad(&has).unwrap();
        let rtargets: Vec<Tensor> = r
            .target
            .iter()
            .zip(SHAPES)
            .map(|(t, s)| Tensor::from_slice(t, s, &Device::Cpu).unwrap())
            .collect();
        let rxn = match method {
            Method::Tram(TramConfig {
                variant: TramVariant::X { noise },
                ..
            }) => {
                let x = flat(&d.x);
                let mut out = vec![0f32; x.len()];
                tram_kernels::cpu::noise::add_noise(&x, &mut out, &noise, it as u64).unwrap();
                Some(Tensor::from_vec(out, (N, D_IN), &Device::Cpu).unwrap())
            }
            _ => None,
        };
        if let Some(xn) = &xn {
            assert_eq!(
                flat(xn),
                flat(rxn.as_ref().unwrap()),
                "{what}: noise, it {it}"
            );
        }
        match kl_pair(&method, &rw, &rtargets, &d.x, rxn.as_ref(), it) {
            Some((a, b)) => {
                let (a, b) = (flat(&a), flat(&b));
                step.first_step(
                    &mut r.describe(&grads1),
                    &Logits::dense(&a, N, C).unwrap(),
                    &Logits::dense(&b, N, C).unwrap(),
                    None,
                )
                .unwrap()
            }
            None => {
                let Method::Sam { rho, .. } = method else {
                    unreachable!()
                };
                step.first_step_fixed(&mut r.describe(&grads1), rho)
                    .unwrap()
            }
        }
        set(&ref_vars, &r.theta);
        let rg2 = loss(&logits(&rw, &d.x, it), &d.y, scale)
            .backward()
            .unwrap();
        let grads2: Vec<Option<Vec<f32>>> = ref_vars.iter().map(|v| grad_of(&rg2, v)).collect();
        step.second_step(&mut r.describe(&grads2)).unwrap();

        let bits = |v: &[Vec<f32>]| -> Vec<Vec<u32>> {
            v.iter()
                .map(|t| t.iter().map(|x| x.to_bits()).collect())
                .collect()
        };
        assert_eq!(
            bits(&values(&vars)),
            bits(&r.theta),
            "{what}: θ after iteration {it}"
        );
        let tg: Vec<Vec<f32>> = opt.targets().unwrap().iter().map(flat).collect();
        assert_eq!(
            bits(&tg),
            bits(&r.target),
            "{what}: targets after iteration {it}"
        );
        let ck = opt.checkpoint().unwrap();
        let m: Vec<Vec<f32>> = ck.m.iter().map(flat).collect();
        let v: Vec<Vec<f32>> = ck.v.iter().map(flat).collect();
        assert_eq!(bits(&m), bits(&r.m), "{what}: m after iteration {it}");
        assert_eq!(bits(&v), bits(&r.v), "{what}: v after iteration {it}");
        assert_eq!(ck.state, step.state().unwrap(), "{what}: state");
        let (a, b) = (opt.report().unwrap(), step.report().unwrap());
        assert_eq!(a, b, "{what}: report after iteration {it}");
        assert!(a.perturb.applied(), "{what}: iteration {it} was perturbed");
    }
    assert_eq!(opt.step_count().unwrap(), iters as u64);
    assert_ne!(values(&vars), init, "{what}: the vars moved");
}

#[test]
fn tram_theta_is_the_step_api_bit_for_bit() {
    let theta = TramVariant::Theta { lambda: 0.9 };
    compare(
        Method::Tram(tram_cfg(theta, Geometry::Sam, BaseOptimizer::adamw(0.01))),
        1.0,
        5,
    );
    compare(
        Method::Tram(tram_cfg(theta, Geometry::Adaptive { eta: 0.01 }, sgd())),
        1024.0,
        5,
    );
}

#[test]
fn tram_x_is_the_step_api_bit_for_bit() {
    let x = TramVariant::X { noise: noise_cfg() };
    compare(
        Method::Tram(tram_cfg(
            x,
            Geometry::Fisher { eta: 0.1 },
            BaseOptimizer::adamw(0.01),
        )),
        256.0,
        5,
    );
    compare(Method::Tram(tram_cfg(x, Geometry::Sam, sgd())), 1.0, 4);
}

#[test]
fn sam_and_asam_are_the_step_api_bit_for_bit() {
    for geometry in [Geometry::Sam, Geometry::Adaptive { eta: 0.01 }] {
        compare(
            Method::Sam {
                rho: 0.05,
                geometry,
                optimizer: BaseOptimizer::adamw(0.01),
                lr: 0.01,
            },
            8.0,
            4,
        );
    }
}

/// A TRAM-θ iteration with the optimizer, the target logits from its targets.
fn tram_iteration(opt: &mut TramOptimizer, vars: &[Var], d: &Data, it: usize) -> f32 {
    let w = tensors(vars);
    let l = loss(&logits(&w, &d.x, it), &d.y, 1.0);
    let g1 = l.backward().unwrap();
    let t = opt.targets().unwrap();
    let (a, b) = (logits(&t, &d.x, it).detach(), logits(&w, &d.x, it).detach());
    opt.first_step(&g1, Some((&a, &b))).unwrap();
    let g2 = loss(&logits(&w, &d.x, it), &d.y, 1.0).backward().unwrap();
    opt.second_step(&g2).unwrap();
    l.to_scalar::<f32>().unwrap()
}

#[test]
fn a_resumed_run_is_the_uninterrupted_one() {
    let method = Method::Tram(tram_cfg(
        TramVariant::Theta { lambda: 0.8 },
        Geometry::Sam,
        BaseOptimizer::adamw(0.01),
    ));
    let d = data(3);
    let vars = vars_from(&init(4));
    let mut opt = TramOptimizer::new(vars.clone(), method).unwrap();
    for it in 0..6 {
        tram_iteration(&mut opt, &vars, &d, it);
    }

    let first = vars_from(&init(4));
    let mut a = TramOptimizer::new(first.clone(), method).unwrap();
    for it in 0..3 {
        tram_iteration(&mut a, &first, &d, it);
    }
    let ck = a.checkpoint().unwrap();
    // A new process: the vars from their saved values, a fresh optimizer.
    let second = vars_from(&values(&first));
    let mut b = TramOptimizer::new(second.clone(), method).unwrap();
    b.resume(&ck).unwrap();
    for it in 3..6 {
        tram_iteration(&mut b, &second, &d, it);
    }
    assert_eq!(values(&second), values(&vars));
    assert_eq!(
        b.checkpoint().unwrap().state,
        opt.checkpoint().unwrap().state
    );
    let flat_all =
        |o: &TramOptimizer| -> Vec<Vec<f32>> { o.targets().unwrap().iter().map(flat).collect() };
    assert_eq!(flat_all(&b), flat_all(&opt));

    // A checkpoint of another model is refused, and changes nothing.
    let mut bad = ck.clone();
    bad.m.pop();
    let before = b.checkpoint().unwrap();
    assert!(b.resume(&bad).is_err());
    assert_eq!(b.checkpoint().unwrap().state, before.state);
}

#[test]
fn tram_training_lowers_the_loss() {
    let d = data(5);
    let vars = vars_from(&init(6));
    let method = Method::Tram(tram_cfg(
        TramVariant::Theta { lambda: 0.9 },
        Geometry::Sam,
        BaseOptimizer::adamw(0.01),
    ));
    let mut opt = TramOptimizer::new(vars.clone(), method).unwrap();
    opt.set_weight_decay(&vars[1], false).unwrap();
    let first = tram_iteration(&mut opt, &vars, &d, 1);
    let mut last = first;
    for it in 1..150 {
        last = tram_iteration(&mut opt, &vars, &d, 2 * it + 1);
    }
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    let r = opt.report().unwrap();
    assert!(r.rho > 0.0 && r.rho.is_finite(), "ρ = δ·d = {}", r.rho);
}

fn err_text<T: std::fmt::Debug>(r: candle_core::Result<T>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn bad_input_is_an_error() {
    let cpu = Device::Cpu;
    let method = Method::Tram(tram_cfg(
        TramVariant::Theta { lambda: 0.9 },
        Geometry::Sam,
        BaseOptimizer::adamw(0.0),
    ));
    let sam = Method::Sam {
        rho: 0.05,
        geometry: Geometry::Sam,
        optimizer: BaseOptimizer::adamw(0.0),
        lr: 0.01,
    };
    let a = Var::ones((3, 2), DType::F32, &cpu).unwrap();
    let b = Var::ones(4, DType::F16, &cpu).unwrap();
    let e = err_text(TramOptimizer::new(vec![a.clone(), b], method));
    assert!(e.contains("one dtype"), "{e}");
    let e = err_text(TramOptimizer::new(vec![a.clone(), a.clone()], method));
    assert!(e.contains("twice"), "{e}");
    let e = err_text(TramOptimizer::new(vec![], method));
    assert!(e.contains("at least one"), "{e}");
    let f64var = Var::ones(4, DType::F64, &cpu).unwrap();
    let e = err_text(TramOptimizer::new(vec![f64var], method));
    assert!(e.contains("f32, f16 or bf16"), "{e}");
    let e = err_text(TramOptimizer::new(
        vec![a.clone()],
        Method::Sam {
            rho: -1.0,
            geometry: Geometry::Sam,
            optimizer: BaseOptimizer::adamw(0.0),
            lr: 0.01,
        },
    ));
    assert!(e.contains("ρ"), "{e}");

    let w = Var::from_vec(vec![0.5f32, -1.0, 2.0, 0.25], (2, 2), &cpu).unwrap();
    let c = Var::from_vec(vec![1.0f32, 3.0], 2, &cpu).unwrap();
    let vars = vec![w.clone(), c.clone()];
    let before = values(&vars);
    let mut opt = TramOptimizer::new(vars.clone(), method).unwrap();
    let mut sam_opt = TramOptimizer::new(vars.clone(), sam).unwrap();
    let grads = || {
        w.as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    };
    let z = Tensor::from_vec(vec![0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6], (2, 3), &cpu).unwrap();

    // Calls out of order, logits missing or superfluous.
    let e = err_text(opt.second_step(&grads()));
    assert!(e.contains("first_step"), "{e}");
    let e = err_text(opt.first_step(&grads(), None));
    assert!(e.contains("logits"), "{e}");
    let e = err_text(sam_opt.first_step(&grads(), Some((&z, &z))));
    assert!(e.contains("fixed"), "{e}");
    // Logits of different shapes or dtypes.
    let z2 = Tensor::zeros((3, 3), DType::F32, &cpu).unwrap();
    let e = err_text(opt.first_step(&grads(), Some((&z, &z2))));
    assert!(e.contains("[2, 3]") && e.contains("[3, 3]"), "{e}");
    let zh = z.to_dtype(DType::F16).unwrap();
    let e = err_text(opt.first_step(&grads(), Some((&z, &zh))));
    assert!(e.contains("F16"), "{e}");
    // Gradients of the wrong dtype or shape.
    let mut g = grads();
    g.insert(
        w.as_tensor(),
        Tensor::ones((2, 2), DType::F16, &cpu).unwrap(),
    );
    let e = err_text(opt.first_step(&g, Some((&z, &z))));
    assert!(e.contains("gradient is F16"), "{e}");
    let mut g = grads();
    g.insert(w.as_tensor(), Tensor::ones(4, DType::F32, &cpu).unwrap());
    let e = err_text(opt.first_step(&g, Some((&z, &z))));
    assert!(e.contains("shape"), "{e}");
    assert_eq!(values(&vars), before, "refused calls wrote nothing");

    // A var without a gradient sits the iteration out: c is not in these
    // gradients, so it is neither perturbed nor updated.
    let z3 = (&z * 3.0).unwrap(); // d > 0, so ρ > 0
    opt.first_step(&grads(), Some((&z3, &z))).unwrap();
    assert_ne!(values(&vars)[0], before[0], "w was perturbed");
    assert_eq!(values(&vars)[1], before[1], "c was not");
    // A var that had a gradient in the first step needs one in the second.
    let mut g = grads();
    g.remove(w.as_tensor());
    let e = err_text(opt.second_step(&g));
    assert!(e.contains("tensor 0"), "{e}");
    // Non-contiguous gradients are copied, not refused.
    let mut g = grads();
    let gt = g
        .remove(w.as_tensor())
        .unwrap()
        .t()
        .unwrap()
        .contiguous()
        .unwrap()
        .t()
        .unwrap();
    assert!(!gt.is_contiguous());
    g.insert(w.as_tensor(), gt);
    opt.second_step(&g).unwrap();
    assert_eq!(values(&vars)[1], before[1], "c was not updated");
    assert_eq!(opt.step_count().unwrap(), 1);
    // Bad values for the step's settings.
    assert!(opt.set_learning_rate(f64::NAN).is_err());
    assert!(opt.set_radius_scale(-1.0).is_err());
    assert!(opt.set_inv_scale(0.0).is_err());
    assert!(sam_opt.set_radius_scale(f32::INFINITY).is_err());
    let other = Var::ones(2, DType::F32, &cpu).unwrap();
    assert!(opt.set_weight_decay(&other, false).is_err());
    let e = err_text(sam_opt.noise(&z));
    assert!(e.contains("TRAM-θ") || e.contains("noise"), "{e}");
}

#[test]
fn amp_overflow_skips_the_update() {
    let cpu = Device::Cpu;
    let w = Var::from_vec(vec![0.5f32, -1.0, 2.0, 0.25], 4, &cpu).unwrap();
    let sam = Method::Sam {
        rho: 0.05,
        geometry: Geometry::Sam,
        optimizer: BaseOptimizer::adamw(0.0),
        lr: 0.01,
    };
    let mut opt = TramOptimizer::new(vec![w.clone()], sam).unwrap();
    let before = flat(w.as_tensor());
    let g1 = (w.as_tensor() * 2.0)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    opt.first_step(&g1, None).unwrap();
    let g2 = (w.as_tensor() * f64::INFINITY)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    opt.second_step(&g2).unwrap();
    let r = opt.report().unwrap();
    assert!(r.status.skipped() && r.status.found_inf(), "{:?}", r.status);
    assert_eq!(flat(w.as_tensor()), before, "θ restored, not updated");
    assert_eq!(opt.step_count().unwrap(), 0);
}
