//! `Tram::first_step_fixed`: SAM and ASAM (a fixed radius ρ) through the step
//! API. On the CPU its θ + ε and backups are the bits of the lower-level
//! `cpu::perturb::perturb` with `Radius::Fixed`, and a whole iteration is
//! then the second step's; on CUDA (the emulated device in CI) a whole
//! iteration matches the CPU step: θ + ε within the perturbation's bound,
//! and, since the second step restores θ and updates it with g₂ alone, θ, m
//! and v afterwards bit for bit.

mod common;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tram_kernels::cpu::perturb::perturb;
use tram_kernels::cpu::step::{Perturbation, Tensor, TramStep};
use tram_kernels::{
    BaseOptimizer, Geometry, KlOptions, NoiseConfig, NoiseDistribution, Radius, Tram, TramConfig,
    TramVariant,
};

const LENS: [usize; 3] = [1000, 37, 4099];

fn cfg(geometry: Geometry) -> TramConfig {
    TramConfig {
        delta: 0.0,
        geometry,
        kl: KlOptions::default(),
        variant: TramVariant::X {
            noise: NoiseConfig {
                distribution: NoiseDistribution::Gaussian,
                sigma: 0.0,
                seed: 0,
            },
        },
        optimizer: BaseOptimizer::adamw(0.01),
        lr: 1e-3,
    }
}

fn random(rng: &mut SmallRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// θ, g₁, g₂ per tensor.
type Model = (Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<Vec<f32>>);

fn model(seed: u64) -> Model {
    let mut rng = SmallRng::seed_from_u64(seed);
    let theta = LENS.iter().map(|&n| random(&mut rng, n)).collect();
    let g1 = LENS.iter().map(|&n| random(&mut rng, n)).collect();
    let g2 = LENS.iter().map(|&n| random(&mut rng, n)).collect();
    (theta, g1, g2)
}

struct Host {
    theta: Vec<Vec<f32>>,
    backup: Vec<Vec<f32>>,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl Host {
    fn new(theta: &[Vec<f32>]) -> Self {
        let zeros = || theta.iter().map(|t| vec![0.0; t.len()]).collect();
        Self {
            theta: theta.to_vec(),
            backup: zeros(),
            m: zeros(),
            v: zeros(),
        }
    }

    fn tensors<'a>(&'a mut self, g: &'a [Vec<f32>]) -> Vec<Tensor<'a, f32>> {
        self.theta
            .iter_mut()
            .zip(&mut self.backup)
            .zip(self.m.iter_mut().zip(&mut self.v))
            .zip(g)
            .map(|(((p, b), (m, v)), g)| Tensor {
                param: p,
                grad: Some(g),
                perturbation: Perturbation::Backup(b),
                m: Some(m),
                v: Some(v),
                target: None,
                weight_decay: true,
            })
            .collect()
    }
}

#[test]
fn cpu_fixed_radius_is_the_lower_level_perturbation() {
    for (geometry, rho) in [
        (Geometry::Sam, 0.05f32),
        (Geometry::Adaptive { eta: 0.01 }, 0.5),
    ] {
        let (theta, g1, g2) = model(7);
        let mut host = Host::new(&theta);
        let mut step = TramStep::<f32>::new(cfg(geometry), &host.tensors(&g1)).unwrap();
        step.set_inv_scale(0.25).unwrap();
        step.first_step_fixed(&mut host.tensors(&g1), rho).unwrap();

        // The same perturbation from the lower-level operation.
        let mut p2 = theta.clone();
        let mut b2: Vec<Vec<f32>> = theta.iter().map(|t| vec![0.0; t.len()]).collect();
        let mut pr: Vec<&mut [f32]> = p2.iter_mut().map(|v| &mut v[..]).collect();
        let mut br: Vec<&mut [f32]> = b2.iter_mut().map(|v| &mut v[..]).collect();
        let gr: Vec<Option<&[f32]>> = g1.iter().map(|g| Some(&g[..])).collect();
        let rep = perturb(
            &mut pr,
            &gr,
            &mut br,
            geometry,
            Radius::Fixed(rho),
            0.0,
            0.25,
        )
        .unwrap();
        assert_eq!(host.theta, p2, "{geometry:?}: θ + ε");
        assert_eq!(host.backup, b2, "{geometry:?}: backups");
        let r = step.report().unwrap();
        assert_eq!(r.rho, rho as f64);
        assert_eq!(r.norm, rep.norm);
        assert!(r.perturb.applied());
        assert_ne!(host.theta, theta, "θ was perturbed");

        // The second step restores θ, then AdamW with g₂: the same as a base
        // step from θ.
        step.second_step(&mut host.tensors(&g2)).unwrap();
        let mut plain = Host::new(&theta);
        let mut base = TramStep::<f32>::new(cfg(geometry), &plain.tensors(&g2)).unwrap();
        base.set_inv_scale(0.25).unwrap();
        base.base_step(&mut plain.tensors(&g2)).unwrap();
        assert_eq!(host.theta, plain.theta);
        assert_eq!(host.m, plain.m);
        assert_eq!(host.v, plain.v);
        assert_eq!(step.step_count().unwrap(), 1);
    }
}

#[test]
fn cpu_fixed_radius_refuses_misuse() {
    let (theta, g1, _) = model(8);
    let mut host = Host::new(&theta);
    let mut step = TramStep::<f32>::new(cfg(Geometry::Sam), &host.tensors(&g1)).unwrap();
    for rho in [-0.1f32, f32::NAN, f32::INFINITY] {
        let e = step
            .first_step_fixed(&mut host.tensors(&g1), rho)
            .unwrap_err();
        assert!(e.to_string().contains("fixed radius"), "{e}");
    }
    assert_eq!(host.theta, theta, "a refused call writes nothing");
    step.first_step_fixed(&mut host.tensors(&g1), 0.1).unwrap();
    let e = step
        .first_step_fixed(&mut host.tensors(&g1), 0.1)
        .unwrap_err();
    assert!(e.to_string().contains("second_step"), "{e}");
}

#[test]
fn gpu_fixed_radius_matches_cpu() {
    use cudarc::driver::CudaSlice;
    use tram_kernels::cuda::buffer::{DevMut, DevRef};
    use tram_kernels::cuda::step::{Perturbation as DP, Tensor as DT, TramStep as GpuStep};

    let gpu = gpu_or_skip!();
    let _serial = common::serial();
    let s = gpu.stream();
    for (geometry, rho) in [
        (Geometry::Sam, 0.05f32),
        (Geometry::Adaptive { eta: 0.01 }, 0.5),
    ] {
        let (theta, g1, g2) = model(9);
        let mut host = Host::new(&theta);
        let mut cpu = TramStep::<f32>::new(cfg(geometry), &host.tensors(&g1)).unwrap();

        let up = |v: &Vec<f32>| s.clone_htod(v).unwrap();
        let mut p: Vec<_> = theta.iter().map(up).collect();
        // Poisoned: a role the step failed to write shows.
        let nan = |v: &Vec<f32>| s.clone_htod(&vec![f32::NAN; v.len()]).unwrap();
        let mut b: Vec<_> = theta.iter().map(nan).collect();
        let zero = |v: &Vec<f32>| s.alloc_zeros::<f32>(v.len()).unwrap();
        let mut m: Vec<_> = theta.iter().map(zero).collect();
        let mut v: Vec<_> = theta.iter().map(zero).collect();
        let dg1: Vec<_> = g1.iter().map(up).collect();
        let dg2: Vec<_> = g2.iter().map(up).collect();
        type Bufs = Vec<CudaSlice<f32>>;
        fn describe<'a>(
            p: &'a mut Bufs,
            b: &'a mut Bufs,
            m: &'a mut Bufs,
            v: &'a mut Bufs,
            g: &'a Bufs,
        ) -> Vec<DT<'a, f32>> {
            p.iter_mut()
                .zip(b.iter_mut())
                .zip(m.iter_mut().zip(v.iter_mut()))
                .zip(g.iter())
                .map(|(((p, b), (m, v)), g)| DT::<f32> {
                    param: DevMut::new(p),
                    grad: Some(DevRef::new(g)),
                    perturbation: DP::Backup(DevMut::new(b)),
                    m: Some(DevMut::new(m)),
                    v: Some(DevMut::new(v)),
                    target: None,
                    weight_decay: true,
                })
                .collect()
        }
        let t = describe(&mut p, &mut b, &mut m, &mut v, &dg1);
        let mut dev = GpuStep::<f32>::new(&gpu, cfg(geometry), &t, 1).unwrap();
        drop(t);
        dev.set_inv_scale(0.5).unwrap();
        cpu.set_inv_scale(0.5).unwrap();

        dev.first_step_fixed(&mut describe(&mut p, &mut b, &mut m, &mut v, &dg1), rho)
            .unwrap();
        cpu.first_step_fixed(&mut host.tensors(&g1), rho).unwrap();
        let (rd, rc) = (dev.report().unwrap(), cpu.report().unwrap());
        assert_eq!(rd.perturb, rc.perturb);
        assert_eq!(rd.rho, rc.rho);
        assert!(
            (rd.norm - rc.norm).abs() <= 1e-6 * rc.norm,
            "norm {} vs {}",
            rd.norm,
            rc.norm
        );
        for (i, (d, c)) in p.iter().zip(&host.theta).enumerate() {
            let d = s.clone_dtoh(d).unwrap();
            for (j, (x, y)) in d.iter().zip(c).enumerate() {
                // |ε| ≤ ρ·max weight; the norm's relative error (≤ 1e-6)
                // and one rounding of θ + ε on each side.
                let bound = 1e-6 * rho * (1.0 + y.abs()) * 4.0 + 2.0 * f32::EPSILON * y.abs();
                assert!(
                    (x - y).abs() <= bound,
                    "{geometry:?}: tensor {i}[{j}] θ + ε {x} vs {y}"
                );
            }
        }
        for (d, c) in b.iter().zip(&host.backup) {
            assert_eq!(&s.clone_dtoh(d).unwrap(), c, "backups");
        }

        dev.second_step(&mut describe(&mut p, &mut b, &mut m, &mut v, &dg2))
            .unwrap();
        cpu.second_step(&mut host.tensors(&g2)).unwrap();
        for (name, d, c) in [
            ("θ", &p, &host.theta),
            ("m", &m, &host.m),
            ("v", &v, &host.v),
        ] {
            for (x, y) in d.iter().zip(c) {
                let x = s.clone_dtoh(x).unwrap();
                let same = x.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{geometry:?}: {name} after the second step");
            }
        }
        assert_eq!(dev.step_count().unwrap(), 1);
    }
}
