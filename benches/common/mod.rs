//! Shared by the benches: criterion settings, seeded inputs, the XLM-R-like
//! parameter group, and CUDA-event timing.
#![allow(dead_code)]

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::time::Duration;

use bytemuck::Pod;
use memmap2::MmapMut;

use criterion::{Criterion, Throughput};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, DeviceRepr};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use tram_kernels::cuda::group::TensorViews;
use tram_kernels::cuda::CudaBackend;
use tram_kernels::Element;

/// Short criterion times, so `cargo bench` of everything stays within a few
/// minutes on a 2-core machine; the command line overrides them.
pub fn criterion() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

/// A CPU bench buffer on transparent huge pages. numpy advises huge pages for
/// every array of 4 MiB or more (it is ~20% faster to stream through here), so
/// the CPU comparison gives our side the same kind of memory. Zero-filled.
pub struct HostBuf<T> {
    map: MmapMut,
    len: usize,
    _elem: PhantomData<T>,
}

impl<T: Pod> HostBuf<T> {
    pub fn zeroed(len: usize) -> Self {
        let bytes = (len * size_of::<T>()).max(1);
        let map = MmapMut::map_anon(bytes).expect("anonymous map for a bench buffer");
        #[cfg(target_os = "linux")]
        map.advise(memmap2::Advice::HugePage)
            .expect("madvise(MADV_HUGEPAGE) on a bench buffer");
        Self {
            map,
            len,
            _elem: PhantomData,
        }
    }

    pub fn from_slice(src: &[T]) -> Self {
        let mut b = Self::zeroed(src.len());
        b.copy_from_slice(src);
        b
    }
}

impl<T: Pod> Deref for HostBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        bytemuck::cast_slice(&self.map[..self.len * size_of::<T>()])
    }
}

impl<T: Pod> DerefMut for HostBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(&mut self.map[..self.len * size_of::<T>()])
    }
}

/// [`random`] in a [`HostBuf`].
pub fn host_random<T: Element + Pod>(n: usize, seed: u64, scale: f32) -> HostBuf<T> {
    HostBuf::from_slice(&random::<T>(n, seed, scale))
}

/// [`logit_pair`] in [`HostBuf`]s.
pub fn host_logit_pair<T: Element + Pod>(
    rows: usize,
    vocab: usize,
    sigma: f32,
    gap: f32,
) -> (HostBuf<T>, HostBuf<T>) {
    let (a, b) = logit_pair::<T>(rows, vocab, sigma, gap);
    (HostBuf::from_slice(&a), HostBuf::from_slice(&b))
}

/// Bytes moved per operation, as counted in the byte budgets.
pub fn bytes(n: usize) -> Throughput {
    Throughput::Bytes(n as u64)
}

/// Whether the CPU half of the benches runs: `TRAM_BENCH=cuda` leaves it out
/// (the GPU machine's run measures the kernels, not its host's memory).
pub fn cpu_enabled() -> bool {
    std::env::var("TRAM_BENCH").map_or(true, |v| v != "cuda")
}

/// The CUDA backend on device 0, or `None` after printing why the CUDA half
/// of `bench` is skipped (also with `TRAM_BENCH=cpu`); with
/// `TRAM_REQUIRE_GPU=1` a missing GPU is a panic instead.
pub fn gpu(bench: &str) -> Option<CudaBackend> {
    if std::env::var("TRAM_BENCH").is_ok_and(|v| v == "cpu") {
        println!("skipping the CUDA benches of {bench}: TRAM_BENCH=cpu");
        return None;
    }
    match CudaBackend::new(0) {
        Ok(b) => Some(b),
        Err(e) => {
            // The GPU machine's run must not pass for having measured nothing.
            if std::env::var("TRAM_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                panic!("TRAM_REQUIRE_GPU=1 but no GPU backend for {bench}: {e}");
            }
            println!("skipping the CUDA benches of {bench}: {e}");
            None
        }
    }
}

/// Device time of `iters` runs of `launch`, measured with CUDA events recorded
/// on the backend's stream around the launches (launch gaps included). The
/// caller has already warmed up (criterion's warm-up phase runs this too).
pub fn gpu_time(gpu: &CudaBackend, iters: u64, mut launch: impl FnMut()) -> Duration {
    let ctx = gpu.context();
    let start = ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .expect("event");
    let end = ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .expect("event");
    start.record(gpu.stream()).expect("record");
    for _ in 0..iters {
        launch();
    }
    end.record(gpu.stream()).expect("record");
    let ms = start.elapsed_ms(&end).expect("elapsed");
    Duration::from_secs_f64(f64::from(ms) * 1e-3)
}

/// Seeded values `scale · u`, u uniform in [-1, 1) and never exactly zero,
/// filled in parallel (each 1 Mi-element chunk from its own seed).
pub fn random<T: Element>(n: usize, seed: u64, scale: f32) -> Vec<T> {
    const CHUNK: usize = 1 << 20;
    let mut v = vec![T::default(); n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
        let mut rng =
            SmallRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for x in c {
            let u: f32 = rng.random_range(-1.0f32..1.0);
            let u = if u == 0.0 { 0.5 } else { u };
            *x = T::from_f32(scale * u);
        }
    });
    v
}

/// Logits `a` and `b = a + gap·z` of `rows × vocab`, a ~ σ·U(-1, 1): two
/// nearly equal distributions, as TRAM compares.
pub fn logit_pair<T: Element>(rows: usize, vocab: usize, sigma: f32, gap: f32) -> (Vec<T>, Vec<T>) {
    let a: Vec<f32> = random(rows * vocab, 11, sigma);
    let z: Vec<f32> = random(rows * vocab, 12, 1.0);
    let b = a
        .par_iter()
        .zip(&z)
        .map(|(&a, &z)| T::from_f32(a + gap * z))
        .collect();
    let a = a.into_par_iter().map(T::from_f32).collect();
    (a, b)
}

/// Element counts of the tensors of XLM-R base (the model of TRAM's
/// cross-lingual results): 199 tensors, 278M parameters, one 250,002×768
/// embedding beside many 768×768 and 3072×768 matrices and ~100 768-long
/// vectors.
pub fn xlmr_base() -> Vec<usize> {
    const H: usize = 768;
    const FF: usize = 3072;
    let mut t = vec![250_002 * H, 514 * H, H, H, H]; // embeddings + their LayerNorm
    for _ in 0..12 {
        t.extend([H * H, H, H * H, H, H * H, H, H * H, H]); // q, k, v, attention out
        t.extend([H, H]); // attention LayerNorm
        t.extend([FF * H, FF, H * FF, H]); // feed-forward
        t.extend([H, H]); // output LayerNorm
    }
    t.extend([H * H, H]); // pooler
    t
}

/// Element counts of GPT-2 medium's 292 tensors (the step-level figure's
/// model): the 50,257×1024 token and 1024×1024 position embeddings, 24 layers
/// of LayerNorm, attention (fused q/k/v 1024×3072 and output 1024×1024) and
/// MLP (1024×4096, 4096×1024) weights with their biases, and the final
/// LayerNorm: 354,823,168 parameters. scripts/baselines_torch.py lists the same.
pub fn gpt2_medium() -> Vec<usize> {
    const H: usize = 1024;
    const FF: usize = 4 * H;
    let mut t = vec![50_257 * H, 1024 * H]; // wte, wpe
    for _ in 0..24 {
        t.extend([H, H]); // ln_1
        t.extend([H * 3 * H, 3 * H]); // attn.c_attn
        t.extend([H * H, H]); // attn.c_proj
        t.extend([H, H]); // ln_2
        t.extend([H * FF, FF]); // mlp.c_fc
        t.extend([FF * H, H]); // mlp.c_proj
    }
    t.extend([H, H]); // ln_f
    t
}

/// The group `xlmr_base()` repeated (and cut) until it holds about
/// `params` parameters: the shape of a larger model with the same mix.
pub fn group_of(params: usize) -> Vec<usize> {
    let base = xlmr_base();
    let mut t = Vec::new();
    let mut total = 0;
    for &n in base.iter().cycle() {
        if total >= params {
            break;
        }
        let n = n.min(params - total);
        t.push(n);
        total += n;
    }
    t
}

/// Human-readable element counts for benchmark ids (`64M`, `278M`, `50257`).
pub fn count(n: usize) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{}Mi", n >> 20)
    } else if n >= 1_000_000 {
        format!("{}M", n / 1_000_000)
    } else {
        n.to_string()
    }
}

/// `xlmr199x278M`: a group's tensor count and size, for benchmark ids (the
/// PyTorch baselines name their groups the same way).
pub fn group_tag(prefix: &str, sizes: &[usize]) -> String {
    let total: usize = sizes.iter().sum();
    format!("{prefix}{}x{}M", sizes.len(), total / 1_000_000)
}

/// The device buffers of a parameter group: one allocation per role, the
/// tensors as consecutive sub-slices of it (each starting 16-byte aligned,
/// as every size here is a multiple of 4), filled with seeded random values.
pub struct DeviceGroup<P: Element + DeviceRepr, G: Element + DeviceRepr> {
    pub sizes: Vec<usize>,
    pub param: CudaSlice<P>,
    pub grad: CudaSlice<G>,
    pub backup: Option<CudaSlice<P>>,
    pub master: Option<CudaSlice<f32>>,
    pub out: Option<CudaSlice<P>>,
}

impl<P: Element + DeviceRepr, G: Element + DeviceRepr> DeviceGroup<P, G> {
    pub fn new(gpu: &CudaBackend, sizes: &[usize], backup: bool, master: bool, out: bool) -> Self {
        let n: usize = sizes.iter().sum();
        let stream = gpu.stream();
        let upload = |v: Vec<P>| stream.clone_htod(&v).expect("upload");
        let param = upload(random(n, 21, 0.05));
        let grad = stream
            .clone_htod(&random::<G>(n, 22, 1e-3))
            .expect("upload");
        let backup = backup.then(|| upload(random(n, 23, 0.05)));
        let master = master.then(|| {
            stream
                .clone_htod(&random::<f32>(n, 24, 0.05))
                .expect("upload")
        });
        let out = out.then(|| upload(random(n, 25, 0.05)));
        Self {
            sizes: sizes.to_vec(),
            param,
            grad,
            backup,
            master,
            out,
        }
    }

    pub fn elements(&self) -> usize {
        self.sizes.iter().sum()
    }

    /// One `TensorViews` per tensor, for `ParamGroup::new`.
    pub fn views(&self) -> Vec<TensorViews<'_, P, G>> {
        let mut at = 0;
        self.sizes
            .iter()
            .map(|&n| {
                let r = at..at + n;
                at += n;
                TensorViews {
                    param: self.param.slice(r.clone()),
                    grad: self.grad.slice(r.clone()),
                    backup: self.backup.as_ref().map(|b| b.slice(r.clone())),
                    master: self.master.as_ref().map(|m| m.slice(r.clone())),
                    out: self.out.as_ref().map(|o| o.slice(r)),
                }
            })
            .collect()
    }
}

/// Seeded standard normal values (Box–Muller), filled in parallel.
pub fn gaussian(n: usize, seed: u64) -> Vec<f64> {
    const CHUNK: usize = 1 << 16;
    let mut v = vec![0.0f64; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(i, c)| {
        let mut rng =
            SmallRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        for x in c {
            let u: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
            let t: f64 = rng.random::<f64>();
            *x = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * t).cos();
        }
    });
    v
}
