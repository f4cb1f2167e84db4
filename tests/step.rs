//! The TRAM step object: configuration checks, the CPU step's wiring against
//! the operations it composes, and (GPU) a captured CUDA graph of a whole step
//! replayed against the same steps run uncaptured, with the learning rate
//! and δ changed between replays.

#[macro_use]
mod common;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tram_kernels::cpu::ema::{ema_update, EmaTensor};
use tram_kernels::cpu::kl_div::{kl_div, Logits};
use tram_kernels::cpu::noise::add_noise;
use tram_kernels::cpu::optimizer::{EmaSource, FusedOptimizer, UpdateTensor, Weights};
use tram_kernels::cpu::step::{FirstStepWeights, TramStep};
use tram_kernels::{
    BaseOptimizer, Error, Geometry, KlOptions, NoiseConfig, NoiseDistribution, TramConfig,
    TramVariant,
};

fn theta_cfg() -> TramConfig {
    TramConfig {
        delta: 0.5,
        geometry: Geometry::Adaptive { eta: 0.01 },
        kl: KlOptions::default(),
        variant: TramVariant::Theta { lambda: 0.9 },
        optimizer: BaseOptimizer::adamw(0.01),
        lr: 1e-2,
    }
}

fn noise() -> NoiseConfig {
    NoiseConfig {
        distribution: NoiseDistribution::Gaussian,
        sigma: 0.1,
        seed: 5,
    }
}

#[test]
fn bad_configuration_is_an_error_at_construction() {
    let ok = theta_cfg();
    assert!(TramStep::new(ok, true).is_ok());
    let bad = [
        (TramConfig { delta: -0.1, ..ok }, true),
        (
            TramConfig {
                delta: f32::NAN,
                ..ok
            },
            true,
        ),
        (
            TramConfig {
                variant: TramVariant::Theta { lambda: 1.5 },
                ..ok
            },
            true,
        ),
        (
            TramConfig {
                variant: TramVariant::Theta { lambda: -0.1 },
                ..ok
            },
            true,
        ),
        (ok, false), // TRAM-θ without a target
        (
            TramConfig {
                variant: TramVariant::X {
                    noise: NoiseConfig {
                        sigma: -1.0,
                        ..noise()
                    },
                },
                ..ok
            },
            false,
        ),
        (
            TramConfig {
                optimizer: BaseOptimizer::AdamW {
                    beta1: 1.0,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: 0.0,
                },
                ..ok
            },
            true,
        ),
        (
            TramConfig {
                optimizer: BaseOptimizer::AdamW {
                    beta1: 0.9,
                    beta2: -0.5,
                    eps: 1e-8,
                    weight_decay: 0.0,
                },
                ..ok
            },
            true,
        ),
        (TramConfig { lr: -1.0, ..ok }, true),
        (
            TramConfig {
                geometry: Geometry::Fisher { eta: -1.0 },
                ..ok
            },
            true,
        ),
        (
            TramConfig {
                kl: KlOptions {
                    temperature: 0.0,
                    ..KlOptions::default()
                },
                ..ok
            },
            true,
        ),
    ];
    for (cfg, has_target) in bad {
        assert!(
            matches!(
                TramStep::new(cfg, has_target),
                Err(Error::InvalidArgument(_))
            ),
            "{cfg:?} has_target={has_target}"
        );
    }
    // TRAM-x needs no target.
    let x = TramConfig {
        variant: TramVariant::X { noise: noise() },
        ..ok
    };
    assert!(TramStep::new(x, false).is_ok());
}

fn rand_vec(rng: &mut SmallRng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-s..s)).collect()
}

#[test]
fn cpu_step_composes_kl_perturb_update_and_ema() {
    let mut rng = SmallRng::seed_from_u64(31);
    let (rows, vocab) = (6, 257);
    let a = rand_vec(&mut rng, rows * vocab, 3.0);
    let b: Vec<f32> = a
        .iter()
        .map(|x| x + rng.random_range(-0.3f32..0.3))
        .collect();
    let sizes = [1usize, 1000, 40_001];
    let theta0: Vec<Vec<f32>> = sizes.iter().map(|&n| rand_vec(&mut rng, n, 1.0)).collect();
    let grads: Vec<Vec<f32>> = sizes.iter().map(|&n| rand_vec(&mut rng, n, 0.1)).collect();
    let mut params = theta0.clone();
    let mut backups: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![f32::NAN; n]).collect();
    let cfg = theta_cfg();
    let mut step = TramStep::new(cfg, true).unwrap();

    let target = Logits::dense(&a, rows, vocab).unwrap();
    let model = Logits::dense(&b, rows, vocab).unwrap();
    let g: Vec<Option<&[f32]>> = grads.iter().map(|g| Some(&g[..])).collect();
    let report = {
        let mut p: Vec<&mut [f32]> = params.iter_mut().map(|p| &mut p[..]).collect();
        let mut bk: Vec<&mut [f32]> = backups.iter_mut().map(|p| &mut p[..]).collect();
        step.first_step(
            &target,
            &model,
            None,
            FirstStepWeights::InPlace {
                params: &mut p,
                backups: &mut bk,
            },
            &g,
        )
        .unwrap()
    };
    let kl = kl_div(&target, &model, None, &cfg.kl).unwrap();
    assert_eq!(report.divergence, kl.value as f32);
    assert!(report.divergence > 0.0);
    assert_eq!(
        report.perturb.rho,
        0.5 * report.divergence as f64,
        "ρ = δ·d"
    );
    assert!(report.perturb.status.applied());
    assert_eq!(
        backups, theta0,
        "the backup holds θ before the perturbation"
    );
    assert_ne!(params, theta0, "θ was perturbed");

    // Second step (g at θ+ε would differ; reuse g), then the target.
    let mut ms: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
    let mut vs = ms.clone();
    {
        let mut ups: Vec<UpdateTensor<f32, f32>> = params
            .iter_mut()
            .zip(&backups)
            .zip(&grads)
            .zip(ms.iter_mut().zip(vs.iter_mut()))
            .map(|(((p, b), g), (m, v))| UpdateTensor {
                weights: Weights::Restore {
                    backup: b,
                    param: p,
                },
                grad: Some(g),
                m,
                v,
                weight_decay: true,
            })
            .collect();
        step.second_step(&mut ups).unwrap();
    }
    // The same update run directly from θ0.
    let mut want = theta0.clone();
    let mut opt = FusedOptimizer::new(cfg.optimizer, cfg.lr).unwrap();
    {
        let mut m2: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
        let mut v2 = m2.clone();
        let mut ups: Vec<UpdateTensor<f32, f32>> = want
            .iter_mut()
            .zip(&theta0)
            .zip(&grads)
            .zip(m2.iter_mut().zip(v2.iter_mut()))
            .map(|(((p, b), g), (m, v))| UpdateTensor {
                weights: Weights::Restore {
                    backup: b,
                    param: p,
                },
                grad: Some(g),
                m,
                v,
                weight_decay: true,
            })
            .collect();
        opt.step(&mut ups).unwrap();
    }
    assert_eq!(params, want, "restore + update from the backup");
    assert_eq!(step.step_count(), 1);

    let mut targets = theta0.clone();
    let mut ts: Vec<EmaTensor<f32, f32>> = targets
        .iter_mut()
        .zip(&params)
        .map(|(t, th)| EmaTensor {
            target: t,
            theta: th,
        })
        .collect();
    step.update_target(&mut ts).unwrap();
    let mut want_t = theta0.clone();
    let mut ts: Vec<EmaTensor<f32, f32>> = want_t
        .iter_mut()
        .zip(&params)
        .map(|(t, th)| EmaTensor {
            target: t,
            theta: th,
        })
        .collect();
    ema_update(&mut ts, 0.9).unwrap();
    assert_eq!(targets, want_t);
    // Noise belongs to TRAM-x.
    let mut out = vec![0.0f32; 4];
    assert!(matches!(
        step.noise(&[1.0f32; 4], &mut out),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn cpu_set_delta_changes_rho_and_rejects_bad_values() {
    let mut rng = SmallRng::seed_from_u64(41);
    let (rows, vocab) = (3, 65);
    let a = rand_vec(&mut rng, rows * vocab, 2.0);
    let b = rand_vec(&mut rng, rows * vocab, 2.0);
    let theta0 = rand_vec(&mut rng, 777, 1.0);
    let grad = rand_vec(&mut rng, 777, 0.1);
    let mut step = TramStep::new(theta_cfg(), true).unwrap();
    let target = Logits::dense(&a, rows, vocab).unwrap();
    let model = Logits::dense(&b, rows, vocab).unwrap();
    let run = |step: &mut TramStep| {
        let mut p = theta0.clone();
        let mut bk = vec![f32::NAN; p.len()];
        let rep = step
            .first_step(
                &target,
                &model,
                None,
                FirstStepWeights::InPlace {
                    params: &mut [&mut p[..]],
                    backups: &mut [&mut bk[..]],
                },
                &[Some(&grad[..])],
            )
            .unwrap();
        (rep, p)
    };
    let (r0, p0) = run(&mut step);
    for delta in [0.05f32, 2.0, 0.0] {
        step.set_delta(delta).unwrap();
        assert_eq!(step.config().delta, delta);
        let (r, p) = run(&mut step);
        assert_eq!(r.divergence, r0.divergence);
        assert_eq!(r.perturb.rho, delta as f64 * r.divergence as f64, "ρ = δ·d");
        assert_ne!(p, p0, "δ {delta}: another perturbation");
        if delta == 0.0 {
            assert_eq!(p, theta0, "δ = 0 leaves θ as it is");
        }
    }
    for bad in [-1e-3f32, f32::NAN, f32::INFINITY] {
        assert!(matches!(
            step.set_delta(bad),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(step.config().delta, 0.0, "a rejected δ changes nothing");
    }
}

#[test]
fn cpu_fused_second_step_matches_update_then_target() {
    let mut rng = SmallRng::seed_from_u64(43);
    let sizes = [3usize, 50_000];
    let theta: Vec<Vec<f32>> = sizes.iter().map(|&n| rand_vec(&mut rng, n, 1.0)).collect();
    let grads: Vec<Vec<f32>> = sizes.iter().map(|&n| rand_vec(&mut rng, n, 0.1)).collect();
    let target0: Vec<Vec<f32>> = sizes.iter().map(|&n| rand_vec(&mut rng, n, 1.0)).collect();
    let run = |fused: bool| {
        let mut step = TramStep::new(theta_cfg(), true).unwrap();
        let mut params: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![f32::NAN; n]).collect();
        let mut targets = target0.clone();
        let mut ms: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
        let mut vs = ms.clone();
        let mut ups: Vec<UpdateTensor<f32, f32>> = params
            .iter_mut()
            .zip(&theta)
            .zip(&grads)
            .zip(ms.iter_mut().zip(vs.iter_mut()))
            .map(|(((p, b), g), (m, v))| UpdateTensor {
                weights: Weights::Restore {
                    backup: b,
                    param: p,
                },
                grad: Some(g),
                m,
                v,
                weight_decay: true,
            })
            .collect();
        if fused {
            let mut ts: Vec<&mut [f32]> = targets.iter_mut().map(|t| &mut t[..]).collect();
            step.second_step_with_target(&mut ups, &mut ts, EmaSource::Param)
                .unwrap();
            drop(ups);
        } else {
            step.second_step(&mut ups).unwrap();
            drop(ups);
            let mut ts: Vec<EmaTensor<f32, f32>> = targets
                .iter_mut()
                .zip(&params)
                .map(|(t, th)| EmaTensor {
                    target: t,
                    theta: th,
                })
                .collect();
            step.update_target(&mut ts).unwrap();
        }
        (params, targets, ms, vs)
    };
    let (a, b) = (run(false), run(true));
    assert_ne!(a.1, target0, "the target moved");
    let bits = |x: &Vec<Vec<f32>>| -> Vec<Vec<u32>> {
        x.iter()
            .map(|v| v.iter().map(|f| f.to_bits()).collect())
            .collect()
    };
    assert_eq!(bits(&a.0), bits(&b.0), "θ");
    assert_eq!(bits(&a.1), bits(&b.1), "θ̄");
    assert_eq!(bits(&a.2), bits(&b.2), "m");
    assert_eq!(bits(&a.3), bits(&b.3), "v");
}

#[test]
fn cpu_tram_x_noise_follows_the_step_count() {
    let cfg = TramConfig {
        variant: TramVariant::X { noise: noise() },
        ..theta_cfg()
    };
    let mut step = TramStep::new(cfg, false).unwrap();
    let e: Vec<f32> = (0..1001).map(|i| i as f32 * 1e-3).collect();
    let mut got = vec![0.0f32; e.len()];
    let mut want = got.clone();
    let mut p = vec![1.0f32; 3];
    let b = [1.0f32; 3];
    let g = [0.5f32; 3];
    let (mut m, mut v) = (vec![0.0f32; 3], vec![0.0f32; 3]);
    for t in 0..3u64 {
        step.noise(&e, &mut got).unwrap();
        add_noise(&e, &mut want, &noise(), t).unwrap();
        assert_eq!(got, want, "step {t}");
        let mut ups = [UpdateTensor {
            weights: Weights::Restore {
                backup: &b,
                param: &mut p,
            },
            grad: Some(&g[..]),
            m: &mut m,
            v: &mut v,
            weight_decay: false,
        }];
        step.second_step(&mut ups).unwrap();
    }
    let mut t = [EmaTensor {
        target: &mut p.clone()[..],
        theta: &b[..],
    }];
    assert!(matches!(
        step.update_target(&mut t),
        Err(Error::InvalidArgument(_))
    ));
}

mod gpu {
    use super::*;
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    use cudarc::driver::{CudaSlice, DevicePtr};
    use tram_kernels::cuda::ema::{EmaGroup, RawEmaTensor};
    use tram_kernels::cuda::group::{DeviceBuf, ParamGroup, RawTensor};
    use tram_kernels::cuda::kl_div::DeviceLogits;
    use tram_kernels::cuda::optimizer::{RawUpdateTensor, UpdateGroup};
    use tram_kernels::cuda::restore::restore;
    use tram_kernels::cuda::step::TramStep as GpuStep;
    use tram_kernels::cuda::CudaBackend;
    use tram_kernels::DType;

    const SIZES: [usize; 3] = [5, 70_001, 1000];
    const ROWS: usize = 8;
    const VOCAB: usize = 1003;

    /// One copy of every buffer a step touches.
    struct Buffers {
        params: Vec<CudaSlice<f32>>,
        grads: Vec<CudaSlice<f32>>,
        backups: Vec<CudaSlice<f32>>,
        ms: Vec<CudaSlice<f32>>,
        vs: Vec<CudaSlice<f32>>,
        targets: Vec<CudaSlice<f32>>,
        a: CudaSlice<f32>,
        b: CudaSlice<f32>,
    }

    fn buffers(gpu: &CudaBackend) -> Buffers {
        let s = gpu.stream();
        let mut rng = SmallRng::seed_from_u64(77);
        let mut up = |n: usize, sc: f32| s.clone_htod(&rand_vec(&mut rng, n, sc)).unwrap();
        let params = SIZES.iter().map(|&n| up(n, 1.0)).collect();
        let grads = SIZES.iter().map(|&n| up(n, 0.1)).collect();
        let targets = SIZES.iter().map(|&n| up(n, 1.0)).collect();
        let a = up(ROWS * VOCAB, 3.0);
        let a_host = s.clone_dtoh(&a).unwrap();
        let b_host: Vec<f32> = a_host
            .iter()
            .enumerate()
            .map(|(i, x)| x + ((i * 7919 % 101) as f32 - 50.0) * 4e-3)
            .collect();
        Buffers {
            params,
            grads,
            backups: SIZES
                .iter()
                .map(|&n| s.clone_htod(&vec![f32::NAN; n]).unwrap())
                .collect(),
            ms: SIZES
                .iter()
                .map(|&n| s.clone_htod(&vec![0.0f32; n]).unwrap())
                .collect(),
            vs: SIZES
                .iter()
                .map(|&n| s.clone_htod(&vec![0.0f32; n]).unwrap())
                .collect(),
            targets,
            a,
            b: s.clone_htod(&b_host).unwrap(),
        }
    }

    fn ptr(gpu: &CudaBackend, x: &CudaSlice<f32>) -> u64 {
        x.device_ptr(gpu.stream()).0
    }

    fn step_for<'a>(gpu: &CudaBackend, bufs: &Buffers) -> GpuStep<'a> {
        step_with_ema_order(gpu, bufs, false)
    }

    /// `reversed`: the target group lists the tensors in reverse order, which
    /// the update kernel cannot follow: the EMA is then a separate launch.
    fn step_with_ema_order<'a>(gpu: &CudaBackend, bufs: &Buffers, reversed: bool) -> GpuStep<'a> {
        let p = |x: &CudaSlice<f32>| ptr(gpu, x);
        let buf = |x: &CudaSlice<f32>| DeviceBuf {
            ptr: p(x),
            len: x.len() as u64,
        };
        let raw: Vec<RawTensor> = (0..SIZES.len())
            .map(|i| RawTensor {
                param: buf(&bufs.params[i]),
                grad: buf(&bufs.grads[i]),
                backup: Some(buf(&bufs.backups[i])),
                master: None,
                out: None,
            })
            .collect();
        let upd: Vec<RawUpdateTensor> = (0..SIZES.len())
            .map(|i| RawUpdateTensor {
                param: p(&bufs.params[i]),
                grad: p(&bufs.grads[i]),
                source: p(&bufs.backups[i]),
                m: p(&bufs.ms[i]),
                v: p(&bufs.vs[i]),
                len: SIZES[i] as u64,
                weight_decay: i != 0,
            })
            .collect();
        let mut ema: Vec<RawEmaTensor> = (0..SIZES.len())
            .map(|i| RawEmaTensor {
                target: p(&bufs.targets[i]),
                theta: p(&bufs.params[i]),
                len: SIZES[i] as u64,
            })
            .collect();
        if reversed {
            ema.reverse();
        }
        // SAFETY: every address is a live allocation of `bufs` (which the test
        // keeps until after the last launch) with the stated length and type,
        // all work is on the backend's one stream, and no written buffer
        // overlaps another.
        unsafe {
            let params = ParamGroup::from_raw(gpu, DType::F32, DType::F32, &raw).unwrap();
            let update = UpdateGroup::from_raw(gpu, &upd, DType::F32, DType::F32, false).unwrap();
            let target = EmaGroup::from_raw(gpu, &ema, DType::F32, DType::F32).unwrap();
            GpuStep::new(gpu, theta_cfg(), params, update, Some(target), ROWS).unwrap()
        }
    }

    fn run_step(gpu: &CudaBackend, step: &mut GpuStep<'_>, bufs: &Buffers) {
        let a = DeviceLogits::dense(bufs.a.slice(..), ROWS, VOCAB).unwrap();
        let b = DeviceLogits::dense(bufs.b.slice(..), ROWS, VOCAB).unwrap();
        step.first_step(gpu, &a, &b, None).unwrap();
        step.second_step(gpu).unwrap();
    }

    fn snapshot(gpu: &CudaBackend, bufs: &Buffers) -> Vec<Vec<u32>> {
        let s = gpu.stream();
        let mut out = Vec::new();
        for set in [
            &bufs.params,
            &bufs.backups,
            &bufs.ms,
            &bufs.vs,
            &bufs.targets,
        ] {
            for x in set {
                out.push(
                    s.clone_dtoh(x)
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect(),
                );
            }
        }
        out
    }

    #[test]
    fn captured_step_replays_like_uncaptured_steps() {
        let gpu = gpu_or_skip!();
        // SAFETY: everything below runs on the backend's one stream, so cudarc
        // needs no events to order it (and events cannot be recorded into a
        // capture from outside it). Slices created from here on are untracked.
        unsafe { gpu.context().disable_event_tracking() };
        let direct = buffers(&gpu);
        let graphed = buffers(&gpu);
        let mut s_direct = step_for(&gpu, &direct);
        let mut s_graph = step_for(&gpu, &graphed);
        assert!(s_graph.target_fused());
        gpu.synchronize().unwrap();
        assert_eq!(snapshot(&gpu, &direct), snapshot(&gpu, &graphed));

        let stream = gpu.stream();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .unwrap();
        run_step(&gpu, &mut s_graph, &graphed);
        let graph = stream
            .end_capture(CUgraphInstantiate_flags(0))
            .unwrap()
            .expect("a graph");
        // Capturing ran nothing.
        assert_eq!(s_graph.optimizer().step_count(&gpu).unwrap(), 0);

        let schedule = [(1e-2f32, 0.5f32), (3e-2, 0.05), (2e-3, 2.0), (2e-3, 0.3)];
        for (i, (lr, delta)) in schedule.into_iter().enumerate() {
            s_direct.set_lr(&gpu, lr).unwrap();
            s_direct.set_delta(&gpu, delta).unwrap();
            run_step(&gpu, &mut s_direct, &direct);
            s_graph.set_lr(&gpu, lr).unwrap();
            s_graph.set_delta(&gpu, delta).unwrap();
            graph.launch().unwrap();
            gpu.synchronize().unwrap();
            let (d, g) = (snapshot(&gpu, &direct), snapshot(&gpu, &graphed));
            assert_eq!(d, g, "replay {i}: every buffer bit for bit");
            // The replay read this δ: ρ = δ·d exactly (f64 product of the f32s).
            let kl = stream.clone_dtoh(s_graph.kl_workspace().value()).unwrap()[0];
            let st = s_graph.param_group().read_state().unwrap();
            assert_eq!(st.rho, delta as f64 * kl as f64, "replay {i}: ρ = δ·d");
            assert_eq!(
                s_graph.optimizer().counter(&gpu).unwrap(),
                s_direct.optimizer().counter(&gpu).unwrap()
            );
            assert_eq!(s_graph.optimizer().step_count(&gpu).unwrap(), i as u64 + 1);
            let st = s_graph.param_group().read_state().unwrap();
            assert!(st.perturb_status().applied(), "replay {i}: {st:?}");
            assert_eq!(st, s_direct.param_group().read_state().unwrap());
        }
        // The learning rate and δ mattered: a replay at other values diverges.
        s_direct.set_lr(&gpu, 1e-1).unwrap();
        s_direct.set_delta(&gpu, 0.7).unwrap();
        run_step(&gpu, &mut s_direct, &direct);
        s_graph.set_lr(&gpu, 1e-3).unwrap();
        s_graph.set_delta(&gpu, 0.1).unwrap();
        graph.launch().unwrap();
        gpu.synchronize().unwrap();
        assert_ne!(snapshot(&gpu, &direct)[0], snapshot(&gpu, &graphed)[0]);
        let (sd, sg) = (
            s_direct.param_group().read_state().unwrap(),
            s_graph.param_group().read_state().unwrap(),
        );
        let kl = stream.clone_dtoh(s_graph.kl_workspace().value()).unwrap()[0];
        assert_eq!(sg.rho, 0.1f32 as f64 * kl as f64);
        assert_ne!(sd.rho, sg.rho);
        assert!(matches!(
            s_graph.set_delta(&gpu, -1.0),
            Err(Error::InvalidArgument(_))
        ));
    }

    /// θ + ε itself follows δ in a replayed first step (the whole-step test
    /// sees δ only through the state: the update restores from the backup).
    #[test]
    fn captured_first_step_follows_delta() {
        let gpu = gpu_or_skip!();
        // SAFETY: as in `captured_step_replays_like_uncaptured_steps`.
        unsafe { gpu.context().disable_event_tracking() };
        let direct = buffers(&gpu);
        let graphed = buffers(&gpu);
        let mut s_direct = step_for(&gpu, &direct);
        let mut s_graph = step_for(&gpu, &graphed);
        let stream = gpu.stream();
        let first = |step: &mut GpuStep<'_>, bufs: &Buffers| {
            let a = DeviceLogits::dense(bufs.a.slice(..), ROWS, VOCAB).unwrap();
            let b = DeviceLogits::dense(bufs.b.slice(..), ROWS, VOCAB).unwrap();
            step.first_step(&gpu, &a, &b, None).unwrap();
        };
        gpu.synchronize().unwrap();
        let theta0 = snapshot(&gpu, &graphed)[..SIZES.len()].to_vec();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .unwrap();
        first(&mut s_graph, &graphed);
        let graph = stream
            .end_capture(CUgraphInstantiate_flags(0))
            .unwrap()
            .expect("a graph");
        let mut seen = Vec::new();
        for delta in [0.5f32, 0.05, 3.0] {
            s_direct.set_delta(&gpu, delta).unwrap();
            first(&mut s_direct, &direct);
            s_graph.set_delta(&gpu, delta).unwrap();
            graph.launch().unwrap();
            gpu.synchronize().unwrap();
            let (d, g) = (snapshot(&gpu, &direct), snapshot(&gpu, &graphed));
            assert_eq!(d, g, "δ {delta}: θ + ε and backups bit for bit");
            assert_eq!(
                d[SIZES.len()..2 * SIZES.len()],
                theta0[..],
                "backups are θ0"
            );
            assert!(
                !seen.contains(&g[..SIZES.len()].to_vec()),
                "δ {delta}: new θ + ε"
            );
            seen.push(g[..SIZES.len()].to_vec());
            // Back to θ0 (uncaptured) for the next δ.
            restore(&gpu, s_direct.param_group()).unwrap();
            restore(&gpu, s_graph.param_group()).unwrap();
        }
    }

    #[test]
    fn gpu_step_matches_cpu_step() {
        // The update restores from the backup, which is θ bit for bit on both
        // backends, so whatever small differences the KL and the perturbation
        // have, θ, m, v and the EMA target after each full step are identical.
        let gpu = gpu_or_skip!();
        let bufs = buffers(&gpu);
        let s = gpu.stream();
        let host = |x: &Vec<CudaSlice<f32>>| -> Vec<Vec<f32>> {
            x.iter().map(|d| s.clone_dtoh(d).unwrap()).collect()
        };
        let mut params = host(&bufs.params);
        let grads = host(&bufs.grads);
        let mut backups = host(&bufs.backups);
        let mut ms = host(&bufs.ms);
        let mut vs = host(&bufs.vs);
        let mut targets = host(&bufs.targets);
        let a = s.clone_dtoh(&bufs.a).unwrap();
        let b = s.clone_dtoh(&bufs.b).unwrap();
        let mut dev = step_for(&gpu, &bufs);
        // The target follows the parameters: its EMA runs inside the update
        // kernel, compared below with the CPU's separate EMA.
        assert!(dev.target_fused());
        let mut cpu = TramStep::new(theta_cfg(), true).unwrap();
        for (i, lr) in [1e-2f32, 5e-2, 3e-3].into_iter().enumerate() {
            dev.set_lr(&gpu, lr).unwrap();
            cpu.set_lr(lr).unwrap();
            let (da, db) = (
                DeviceLogits::dense(bufs.a.slice(..), ROWS, VOCAB).unwrap(),
                DeviceLogits::dense(bufs.b.slice(..), ROWS, VOCAB).unwrap(),
            );
            dev.first_step(&gpu, &da, &db, None).unwrap();
            let theta_before = params.clone();
            let g: Vec<Option<&[f32]>> = grads.iter().map(|g| Some(&g[..])).collect();
            let rep = {
                let mut p: Vec<&mut [f32]> = params.iter_mut().map(|p| &mut p[..]).collect();
                let mut bk: Vec<&mut [f32]> = backups.iter_mut().map(|p| &mut p[..]).collect();
                let (ta, tb) = (
                    Logits::dense(&a, ROWS, VOCAB).unwrap(),
                    Logits::dense(&b, ROWS, VOCAB).unwrap(),
                );
                cpu.first_step(
                    &ta,
                    &tb,
                    None,
                    FirstStepWeights::InPlace {
                        params: &mut p,
                        backups: &mut bk,
                    },
                    &g,
                )
                .unwrap()
            };
            let d_gpu = dev.kl_workspace().read(&gpu, ROWS).unwrap().value;
            assert!(
                (d_gpu - rep.kl.value).abs() <= 1e-4 * rep.kl.value,
                "step {i}: KL {d_gpu} vs {}",
                rep.kl.value
            );
            let st = dev.param_group().read_state().unwrap();
            assert!(st.perturb_status().applied() && rep.perturb.status.applied());
            assert!(
                (st.rho - rep.perturb.rho).abs() <= 1e-4 * rep.perturb.rho,
                "ρ {} vs {}",
                st.rho,
                rep.perturb.rho
            );
            assert_eq!(
                host(&bufs.backups),
                theta_before,
                "step {i}: GPU backup is θ"
            );
            assert_eq!(backups, theta_before, "step {i}: CPU backup is θ");
            {
                let mut ups: Vec<UpdateTensor<f32, f32>> = params
                    .iter_mut()
                    .zip(&backups)
                    .zip(&grads)
                    .zip(ms.iter_mut().zip(vs.iter_mut()))
                    .enumerate()
                    .map(|(k, (((p, bk), g), (m, v)))| UpdateTensor {
                        weights: Weights::Restore {
                            backup: bk,
                            param: p,
                        },
                        grad: Some(g),
                        m,
                        v,
                        weight_decay: k != 0,
                    })
                    .collect();
                cpu.second_step(&mut ups).unwrap();
            }
            let mut ts: Vec<EmaTensor<f32, f32>> = targets
                .iter_mut()
                .zip(&params)
                .map(|(t, th)| EmaTensor {
                    target: t,
                    theta: th,
                })
                .collect();
            cpu.update_target(&mut ts).unwrap();
            dev.second_step(&gpu).unwrap();
            let bits = |x: &Vec<Vec<f32>>| -> Vec<Vec<u32>> {
                x.iter()
                    .map(|v| v.iter().map(|f| f.to_bits()).collect())
                    .collect()
            };
            assert_eq!(bits(&host(&bufs.params)), bits(&params), "step {i}: θ");
            assert_eq!(bits(&host(&bufs.ms)), bits(&ms), "step {i}: m");
            assert_eq!(bits(&host(&bufs.vs)), bits(&vs), "step {i}: v");
            assert_eq!(bits(&host(&bufs.targets)), bits(&targets), "step {i}: θ̄");
            assert_eq!(
                dev.optimizer().counter(&gpu).unwrap(),
                cpu.optimizer().counter()
            );
        }
    }

    #[test]
    fn fused_and_separate_target_upkeep_agree() {
        let gpu = gpu_or_skip!();
        let fused_bufs = buffers(&gpu);
        let sep_bufs = buffers(&gpu);
        let mut fused = step_for(&gpu, &fused_bufs);
        let mut sep = step_with_ema_order(&gpu, &sep_bufs, true);
        assert!(fused.target_fused());
        assert!(!sep.target_fused());
        let targets0 = snapshot(&gpu, &sep_bufs)[4 * SIZES.len()..].to_vec();
        for (i, lr) in [1e-2f32, 4e-2, 1e-3].into_iter().enumerate() {
            for (step, bufs) in [(&mut fused, &fused_bufs), (&mut sep, &sep_bufs)] {
                step.set_lr(&gpu, lr).unwrap();
                run_step(&gpu, step, bufs);
            }
            gpu.synchronize().unwrap();
            let (f, s) = (snapshot(&gpu, &fused_bufs), snapshot(&gpu, &sep_bufs));
            assert_eq!(f, s, "step {i}: every buffer bit for bit");
            assert_ne!(s[4 * SIZES.len()..], targets0[..], "step {i}: θ̄ moved");
        }
    }

    #[test]
    fn gpu_step_rejects_bad_configuration() {
        let gpu = gpu_or_skip!();
        let bufs = buffers(&gpu);
        let step = step_for(&gpu, &bufs);
        drop(step);
        let p = ptr(&gpu, &bufs.params[0]);
        let g = ptr(&gpu, &bufs.grads[0]);
        let bk = ptr(&gpu, &bufs.backups[0]);
        let n = SIZES[0] as u64;
        // SAFETY: as in `step_for`; nothing is launched.
        unsafe {
            let params = ParamGroup::from_raw(
                &gpu,
                DType::F32,
                DType::F32,
                &[RawTensor {
                    param: DeviceBuf { ptr: p, len: n },
                    grad: DeviceBuf { ptr: g, len: n },
                    backup: Some(DeviceBuf { ptr: bk, len: n }),
                    master: None,
                    out: None,
                }],
            )
            .unwrap();
            let update = UpdateGroup::from_raw(
                &gpu,
                &[RawUpdateTensor {
                    param: p,
                    grad: g,
                    source: bk,
                    m: 0,
                    v: 0,
                    len: n,
                    weight_decay: false,
                }],
                DType::F32,
                DType::F32,
                false,
            )
            .unwrap();
            // TRAM-θ without a target.
            let r = GpuStep::new(&gpu, theta_cfg(), params, update, None, ROWS);
            assert!(matches!(r, Err(Error::InvalidArgument(_))));
        }
    }
}
