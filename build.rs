//! Builds every `kernels/*.cu` into one fat binary and embeds it in the crate
//! through `$OUT_DIR/kernels.rs`. Each fat binary holds
//! - machine code (SASS) for sm_80, sm_90, sm_100, sm_110 and sm_120, stored
//!   compressed: a cubin for X.y runs on every X.z with z ≥ y, so these five
//!   run Ampere (8.x), Hopper (9.0) and Blackwell (10.x, 11.0, 12.x) without
//!   a JIT at load;
//! - `compute_80` PTX, stored uncompressed, which the driver compiles for any
//!   newer GPU, and from which the crate (and the emulated device) read the
//!   kernel names and signatures.
//!
//! `TRAM_CUDA_ARCHS` picks the SASS architectures instead (`sm_90`,
//! `sm_80,sm_90`, or `none` for PTX alone): a quick local build, or a bundle
//! for one GPU. A default architecture this nvcc cannot build is skipped with
//! a warning (such GPUs JIT the PTX); one asked for by name is an error.
//!
//! The results live in a content-addressed cache (`TRAM_KERNEL_CACHE`, by
//! default `<target dir>/tram-kernel-cache`) keyed by the kernel sources, this
//! file, nvcc's version, the architectures and the flags: builds of the crate
//! with other profiles or features, and crates that build it beside theirs,
//! compile the kernels once. ptxas's report per architecture (registers,
//! spills, shared memory per kernel) lands in `target/<profile>/ptxas-sm_XX.txt`
//! and the list of embedded images in `target/<profile>/tram-kernels-images.txt`.
//!
//! nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, else the
//! first on `$PATH`. Without nvcc the crate still builds: no module is
//! embedded, the CPU reference works, and `CudaBackend::new` returns an error
//! naming the missing nvcc. `TRAM_REQUIRE_NVCC=1` makes a missing nvcc fatal.

use std::collections::hash_map::DefaultHasher;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::Instant;

#[allow(dead_code)] // build.rs merges and lists images; the crate uses the rest
#[path = "src/cuda/fatbin.rs"]
mod fatbin;

/// The virtual architecture of the embedded PTX.
const PTX_ARCH: u32 = 80;
/// The fewest SASS architectures that run Ampere, Hopper and Blackwell natively.
const DEFAULT_SASS: [u32; 5] = [80, 90, 100, 110, 120];
/// No `--use_fast_math`: the KL relies on accurate expf/expm1f/log1pf.
const NVCC_FLAGS: [&str; 3] = ["-std=c++17", "-O3", "-Xptxas=-warn-spills"];
/// Env vars this script reads (PATH only when it searches it, see `find_nvcc`).
const ENV_VARS: [&str; 6] = [
    "NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "TRAM_REQUIRE_NVCC",
    "TRAM_CUDA_ARCHS",
    "TRAM_KERNEL_CACHE",
];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernel_dir = manifest.join("kernels");

    println!("cargo:rerun-if-changed=kernels");
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let mut sources: Vec<PathBuf> = fs::read_dir(&kernel_dir)
        .map(|dir| {
            dir.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("cu" | "cuh")))
                .collect()
        })
        .unwrap_or_default();
    sources.sort();
    for path in &sources {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let generated = match find_nvcc() {
        Some(nvcc) => {
            // A reinstalled toolkit changes the compiler under the same path.
            println!("cargo:rerun-if-changed={}", nvcc.display());
            build(&nvcc, &manifest, &kernel_dir, &sources, &out_dir)
        }
        None => {
            let reason = "nvcc was not found at build time (looked at $NVCC, $CUDA_HOME/bin, \
                          $CUDA_PATH/bin and $PATH), so no CUDA kernels are embedded. Install it \
                          with `scripts/install-nvcc.sh` (NVIDIA's nvcc 13.0 pip wheels) and \
                          rebuild with NVCC=<the path it prints>.";
            if env::var("TRAM_REQUIRE_NVCC").is_ok_and(|v| v == "1") {
                panic!("TRAM_REQUIRE_NVCC=1 but {reason}");
            }
            println!("cargo:warning=tram-kernels: {reason}");
            generated_source(None, reason, &Plan::default(), &[])
        }
    };
    fs::write(out_dir.join("kernels.rs"), generated).expect("write kernels.rs");
}

/// `$NVCC`, then `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, then `nvcc` on
/// `$PATH`. PATH is declared a rerun trigger only when the search reaches it:
/// an nvcc found through the variables above does not depend on it, and any
/// change of PATH (a virtual environment, an editor) would otherwise rebuild
/// this crate and everything that depends on it.
fn find_nvcc() -> Option<PathBuf> {
    let exe = format!("nvcc{}", env::consts::EXE_SUFFIX);
    if let Some(p) = env::var_os("NVCC").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Some(p);
        }
        println!(
            "cargo:warning=tram-kernels: NVCC={} is not a file; searching elsewhere",
            p.display()
        );
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var).filter(|p| !p.is_empty()) {
            let p = Path::new(&root).join("bin").join(&exe);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    println!("cargo:rerun-if-env-changed=PATH");
    env::var_os("PATH").and_then(|path| {
        env::split_paths(&path)
            .map(|dir| dir.join(&exe))
            .find(|p| p.is_file())
    })
}

/// Which SASS architectures to build.
#[derive(Default)]
struct Plan {
    sass: Vec<u32>,
    /// Default architectures this nvcc does not know.
    skipped: Vec<u32>,
    /// `TRAM_CUDA_ARCHS`, when it chose.
    from_env: Option<String>,
}

fn plan_archs(nvcc: &Path, release: &str) -> Plan {
    let from_env = env::var("TRAM_CUDA_ARCHS")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let requested: Vec<u32> = match &from_env {
        None => DEFAULT_SASS.to_vec(),
        Some(v) if v.trim().eq_ignore_ascii_case("none") => Vec::new(),
        Some(v) => {
            let mut archs: Vec<u32> = v
                .split(|c: char| c == ',' || c == ';' || c.is_whitespace())
                .filter(|t| !t.is_empty())
                .map(|t| {
                    t.strip_prefix("sm_")
                        .unwrap_or(t)
                        .parse()
                        .ok()
                        .filter(|&a| a >= PTX_ARCH)
                        .unwrap_or_else(|| {
                            panic!(
                                "tram-kernels: TRAM_CUDA_ARCHS={v:?}: {t:?} is not an \
                                 architecture like sm_90 (sm_80 or newer), nor `none`"
                            )
                        })
                })
                .collect();
            archs.sort_unstable();
            archs.dedup();
            archs
        }
    };
    // `--list-gpu-code` names every real architecture this nvcc can build
    // (sm_90, sm_90a, ...); an nvcc too old to answer is left to fail on its own.
    let known: Option<Vec<u32>> = Command::new(nvcc)
        .arg("--list-gpu-code")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|t| t.strip_prefix("sm_")?.parse().ok())
                .collect()
        });
    let mut plan = Plan {
        from_env,
        ..Plan::default()
    };
    for arch in requested {
        if known.as_ref().is_none_or(|k| k.contains(&arch)) {
            plan.sass.push(arch);
        } else if let Some(v) = &plan.from_env {
            panic!(
                "tram-kernels: TRAM_CUDA_ARCHS={v:?} asks for sm_{arch}, which {} ({release}) \
                 cannot build (see `nvcc --list-gpu-code`)",
                nvcc.display()
            );
        } else {
            println!(
                "cargo:warning=tram-kernels: {release} cannot build sm_{arch}: no machine code \
                 for it is embedded, and such GPUs JIT-compile the compute_{PTX_ARCH} PTX on \
                 first load"
            );
            plan.skipped.push(arch);
        }
    }
    plan
}

/// What one kernel file became.
struct Built {
    stem: String,
    fatbin: PathBuf,
    /// ptxas's `--resource-usage` output, per SASS architecture.
    usage: Vec<(u32, String)>,
}

fn build(
    nvcc: &Path,
    manifest: &Path,
    kernel_dir: &Path,
    sources: &[PathBuf],
    out_dir: &Path,
) -> String {
    let version = Command::new(nvcc)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| panic!("tram-kernels: could not run {} --version", nvcc.display()));
    let release = version.lines().last().unwrap_or("unknown nvcc").to_string();
    let plan = plan_archs(nvcc, &release);
    let kernels: Vec<&PathBuf> = sources
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();

    // The cache key: everything the fat binaries depend on.
    let mut key = Vec::new();
    key.extend_from_slice(b"tram-kernels fatbin cache 1\0");
    for own in ["build.rs", "src/cuda/fatbin.rs"] {
        key.extend(fs::read(manifest.join(own)).unwrap_or_default());
    }
    key.extend_from_slice(version.as_bytes());
    key.extend_from_slice(format!("{PTX_ARCH} {:?} {NVCC_FLAGS:?}", plan.sass).as_bytes());
    for src in sources {
        key.extend_from_slice(src.file_name().unwrap().as_encoded_bytes());
        key.push(0);
        key.extend(fs::read(src).unwrap_or_else(|e| panic!("read {}: {e}", src.display())));
    }
    let key = hex_digest(&key);

    let profile_dir = out_dir.ancestors().nth(3).map(Path::to_path_buf);
    let cache_root = env::var_os("TRAM_KERNEL_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| Some(profile_dir.as_ref()?.parent()?.join("tram-kernel-cache")))
        .unwrap_or_else(|| out_dir.join("tram-kernel-cache"));
    let entry = cache_root.join(&key);

    let started = Instant::now();
    let hit = entry.join("MANIFEST").is_file();
    if !hit {
        fs::create_dir_all(&cache_root)
            .unwrap_or_else(|e| panic!("tram-kernels: create {}: {e}", cache_root.display()));
        let work = cache_root.join(format!(".tmp-{key}-{}", std::process::id()));
        let _cleanup = RemoveOnDrop(work.clone());
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work).expect("create the kernel work directory");
        compile_into(nvcc, &release, kernel_dir, &kernels, &plan, &work);
        fs::write(work.join("MANIFEST"), format!("{release}\n{version}\n"))
            .expect("write MANIFEST");
        // Another build may have finished the same entry meanwhile; either is fine.
        if fs::rename(&work, &entry).is_err() && !entry.join("MANIFEST").is_file() {
            panic!(
                "tram-kernels: could not move {} to {}",
                work.display(),
                entry.display()
            );
        }
    }
    let seconds = started.elapsed().as_secs_f64();

    let mut built = Vec::new();
    for src in &kernels {
        let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
        let fatbin = out_dir.join(format!("{stem}.fatbin"));
        let cached = entry.join(format!("{stem}.fatbin"));
        fs::copy(&cached, &fatbin)
            .unwrap_or_else(|e| panic!("copy {} to OUT_DIR: {e}", cached.display()));
        let usage = plan
            .sass
            .iter()
            .map(|&a| {
                let f = entry.join(format!("{stem}.sm_{a}.ptxas.txt"));
                (a, fs::read_to_string(&f).unwrap_or_default())
            })
            .collect();
        built.push(Built {
            stem,
            fatbin,
            usage,
        });
    }
    write_reports(&release, &plan, &built, out_dir, profile_dir.as_deref());
    write_images_report(
        &release,
        &plan,
        &built,
        &entry,
        hit,
        seconds,
        profile_dir.as_deref(),
    );
    generated_source(Some((nvcc, &release)), "", &plan, &built)
}

/// Removes a work directory that was not moved into the cache (a failed build).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// 128 bits from two SipHash passes (std's, fixed keys): a cache key, not a
/// security boundary; a std change of the hash only costs one rebuild.
fn hex_digest(bytes: &[u8]) -> String {
    let mut out = String::new();
    for salt in [0u8, 1] {
        let mut h = DefaultHasher::new();
        salt.hash(&mut h);
        bytes.hash(&mut h);
        let _ = write!(out, "{:016x}", h.finish());
    }
    out
}

#[derive(Clone, Copy)]
enum Target {
    Ptx,
    Sass(u32),
}

/// Compiles every kernel to PTX and to each SASS architecture (one nvcc per
/// pair, as many at once as cargo allows), then packs each kernel's images
/// into `<stem>.fatbin` in `work`.
fn compile_into(
    nvcc: &Path,
    release: &str,
    kernel_dir: &Path,
    kernels: &[&PathBuf],
    plan: &Plan,
    work: &Path,
) {
    // The biggest sources first: kl_div dominates the build.
    let mut order: Vec<&PathBuf> = kernels.to_vec();
    order.sort_by_key(|p| std::cmp::Reverse(fs::metadata(p).map(|m| m.len()).unwrap_or(0)));
    let mut jobs = Vec::new();
    for src in &order {
        jobs.push((*src, Target::Ptx));
        for &a in &plan.sass {
            jobs.push((*src, Target::Sass(a)));
        }
    }
    let workers = env::var("NUM_JOBS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .or_else(|| thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .clamp(1, jobs.len().max(1));
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(String::new());
    thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(src, target)) = jobs.get(i) else {
                    break;
                };
                if let Err(e) = compile_one(nvcc, kernel_dir, src, target, work) {
                    failures.lock().unwrap().push_str(&e);
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    if !failures.is_empty() {
        panic!("tram-kernels: CUDA kernels failed to compile ({release})\n{failures}");
    }
    let fatbinary = nvcc.with_file_name(format!("fatbinary{}", env::consts::EXE_SUFFIX));
    for src in kernels {
        let stem = src.file_stem().unwrap().to_string_lossy();
        pack(&fatbinary, &stem, plan, work);
    }
}

fn compile_one(
    nvcc: &Path,
    kernel_dir: &Path,
    src: &Path,
    target: Target,
    work: &Path,
) -> Result<(), String> {
    let stem = src.file_stem().unwrap().to_string_lossy();
    let mut cmd = Command::new(nvcc);
    let what = match target {
        Target::Ptx => {
            cmd.arg("--ptx")
                .arg(format!("-arch=compute_{PTX_ARCH}"))
                .arg("-o")
                .arg(work.join(format!("{stem}.ptx")));
            format!("compute_{PTX_ARCH}")
        }
        Target::Sass(a) => {
            // -arch=sm_XX: PTX for compute_XX, assembled for sm_XX, as nvcc
            // does for each -gencode pair.
            cmd.arg("--cubin")
                .arg(format!("-arch=sm_{a}"))
                .arg("--resource-usage")
                .arg("-o")
                .arg(work.join(format!("{stem}.sm_{a}.cubin")));
            format!("sm_{a}")
        }
    };
    cmd.args(NVCC_FLAGS).arg("-I").arg(kernel_dir).arg(src);
    let out = cmd
        .output()
        .map_err(|e| format!("could not run {}: {e}\n", nvcc.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(format!(
            "--- {} ({what}) ---\n{}{stderr}\n",
            src.display(),
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    if let Target::Sass(a) = target {
        fs::write(work.join(format!("{stem}.sm_{a}.ptxas.txt")), stderr)
            .map_err(|e| format!("write the ptxas report: {e}\n"))?;
    }
    Ok(())
}

/// Packs one kernel's images into `<stem>.fatbin`: the cubins compressed and
/// the PTX plain. `fatbinary` compresses either all images or only the PTX,
/// so it writes two containers and their entries are joined under one header
/// (entries are self-contained: kind, sizes, architecture, flags).
fn pack(fatbinary: &Path, stem: &str, plan: &Plan, work: &Path) {
    let run = |args: &[String]| -> Result<Vec<u8>, String> {
        let out = Command::new(fatbinary)
            .args(args)
            .output()
            .map_err(|e| format!("could not run {}: {e}", fatbinary.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} {args:?}: {}{}",
                fatbinary.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let created = args[0].strip_prefix("--create=").unwrap();
        fs::read(created).map_err(|e| format!("read {created}: {e}"))
    };
    let path = |name: String| work.join(name).display().to_string();

    let ptx = run(&[
        format!("--create={}", path(format!("{stem}.ptx.fatbin"))),
        "--64".into(),
        "--compress=false".into(),
        format!(
            "--image3=kind=ptx,sm={PTX_ARCH},file={}",
            path(format!("{stem}.ptx"))
        ),
    ])
    .unwrap_or_else(|e| panic!("tram-kernels: packing the PTX of {stem}.cu: {e}"));
    let mut parts = vec![ptx];
    if !plan.sass.is_empty() {
        let mut args = vec![
            format!("--create={}", path(format!("{stem}.sass.fatbin"))),
            "--64".into(),
        ];
        for a in &plan.sass {
            args.push(format!(
                "--image3=kind=elf,sm={a},file={}",
                path(format!("{stem}.sm_{a}.cubin"))
            ));
        }
        let mut compressed = args.clone();
        compressed.insert(2, "--compress-all".into());
        let sass = run(&compressed).unwrap_or_else(|e| {
            println!(
                "cargo:warning=tram-kernels: this fatbinary cannot compress machine code ({e}); \
                 storing it uncompressed"
            );
            run(&args).unwrap_or_else(|e| panic!("tram-kernels: packing {stem}.cu: {e}"))
        });
        parts.insert(0, sass);
    }

    let mut body = Vec::new();
    for part in &parts {
        let range = fatbin::entries_range(part)
            .unwrap_or_else(|e| panic!("tram-kernels: fatbinary wrote a bad container: {e}"));
        body.extend_from_slice(&part[range]);
    }
    let mut joined = Vec::with_capacity(16 + body.len());
    joined.extend_from_slice(&0xBA55_ED50u32.to_le_bytes());
    joined.extend_from_slice(&1u16.to_le_bytes());
    joined.extend_from_slice(&16u16.to_le_bytes());
    joined.extend_from_slice(&(body.len() as u64).to_le_bytes());
    joined.extend_from_slice(&body);

    // What the crate and the emulated device rely on, checked here.
    let images = fatbin::images(&joined)
        .unwrap_or_else(|e| panic!("tram-kernels: {stem}.fatbin does not parse: {e}"));
    let sass: Vec<u32> = images
        .iter()
        .filter(|i| i.kind == fatbin::ImageKind::Sass)
        .map(|i| i.arch)
        .collect();
    assert_eq!(sass, plan.sass, "{stem}.fatbin: SASS images");
    if let Err(e) = fatbin::ptx_text(&joined, PTX_ARCH) {
        panic!("tram-kernels: {stem}.fatbin: {e}");
    }
    fs::write(work.join(format!("{stem}.fatbin")), joined).expect("write the fatbin");
}

/// `ptxas-sm_XX.txt` per architecture, in OUT_DIR and in target/<profile>/
/// (OUT_DIR is target/<profile>/build/<pkg>-<hash>/out). Spills on any
/// shipped architecture are a cargo warning, one per kernel file.
fn write_reports(
    release: &str,
    plan: &Plan,
    built: &[Built],
    out_dir: &Path,
    profile_dir: Option<&Path>,
) {
    for (i, &arch) in plan.sass.iter().enumerate() {
        let mut report = format!(
            "# ptxas resource usage for sm_{arch} ({release})\n\
             # registers, spill stores/loads and shared memory per kernel; spills should be 0.\n"
        );
        for b in built {
            let usage = &b.usage[i].1;
            let _ = writeln!(report, "\n## {}.cu\n{}", b.stem, usage.trim_end());
            let spilling = usage
                .lines()
                .filter(|l| l.contains("bytes spill stores"))
                .filter(|l| !l.contains(" 0 bytes spill stores, 0 bytes spill loads"))
                .count();
            if spilling > 0 {
                println!(
                    "cargo:warning=tram-kernels: {}.cu spills registers on sm_{arch} in {spilling} \
                     function(s); see ptxas-sm_{arch}.txt beside the build's binaries",
                    b.stem
                );
            }
        }
        let name = format!("ptxas-sm_{arch}.txt");
        fs::write(out_dir.join(&name), &report).expect("write the ptxas report");
        if let Some(dir) = profile_dir {
            let _ = fs::write(dir.join(&name), &report);
        }
    }
    // A report left from a build with other architectures would mislead.
    if let Some(Ok(dir)) = profile_dir.map(fs::read_dir) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let arch = name
                .strip_prefix("ptxas-sm_")
                .and_then(|r| r.strip_suffix(".txt"))
                .and_then(|a| a.parse::<u32>().ok());
            if arch.is_some_and(|a| !plan.sass.contains(&a)) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// `tram-kernels-images.txt`: what each embedded module holds, for CI's log.
fn write_images_report(
    release: &str,
    plan: &Plan,
    built: &[Built],
    entry: &Path,
    hit: bool,
    seconds: f64,
    profile_dir: Option<&Path>,
) {
    let Some(dir) = profile_dir else { return };
    let mut r = format!("# kernels embedded by tram-kernels ({release})\n");
    let archs: Vec<String> = plan.sass.iter().map(|a| format!("sm_{a}")).collect();
    let _ = writeln!(
        r,
        "# SASS: {} (from {}); PTX: compute_{PTX_ARCH}",
        if archs.is_empty() {
            "none".into()
        } else {
            archs.join(", ")
        },
        plan.from_env
            .as_ref()
            .map_or("the default set".to_string(), |v| format!(
                "TRAM_CUDA_ARCHS={v}"
            ))
    );
    if !plan.skipped.is_empty() {
        let _ = writeln!(
            r,
            "# skipped (this nvcc cannot build them): {:?}",
            plan.skipped
        );
    }
    let _ = writeln!(
        r,
        "# cache: {} ({})",
        entry.display(),
        if hit {
            "hit".to_string()
        } else {
            format!("compiled in {seconds:.1} s")
        }
    );
    let mut total = 0;
    for b in built {
        let bytes = fs::read(&b.fatbin).unwrap_or_default();
        total += bytes.len();
        let _ = writeln!(r, "{}.fatbin {} bytes", b.stem, bytes.len());
        for i in fatbin::images(&bytes).unwrap_or_default() {
            let _ = writeln!(
                r,
                "  {:<12} {:>9} bytes{}",
                i.arch_name(),
                i.payload.len(),
                if i.compressed { ", compressed" } else { "" }
            );
        }
    }
    let _ = writeln!(r, "total {total} bytes");
    let _ = fs::write(dir.join("tram-kernels-images.txt"), r);
}

fn generated_source(
    nvcc: Option<(&Path, &str)>,
    missing: &str,
    plan: &Plan,
    built: &[Built],
) -> String {
    let mut s = String::from("// @generated by build.rs\n");
    let nvcc = nvcc.map(|(path, release)| format!("{} ({release})", path.display()));
    let _ = writeln!(
        s,
        "/// The nvcc that built the embedded kernels (path and release), if one was found.\n\
         pub const NVCC: Option<&str> = {nvcc:?};\n\
         /// Why no kernels are embedded (empty when they are).\n\
         pub const MISSING_REASON: &str = {missing:?};\n\
         /// The virtual architecture of the embedded PTX: {PTX_ARCH} is `compute_{PTX_ARCH}`.\n\
         pub const PTX_ARCH: u32 = {PTX_ARCH};\n\
         /// The architectures every module holds machine code (SASS) for: 90 is `sm_90`.\n\
         pub const SASS_ARCHS: &[u32] = &{:?};\n\
         /// Architectures of the default set that the build's nvcc could not build.\n\
         pub const SKIPPED_ARCHS: &[u32] = &{:?};\n\
         /// `TRAM_CUDA_ARCHS` at build time, when it picked the architectures.\n\
         pub const ARCHS_FROM_ENV: Option<&str> = {:?};",
        plan.sass, plan.skipped, plan.from_env
    );
    s.push_str("/// Every `kernels/*.cu`, by file stem, as a fat binary.\npub static MODULES: &[(&str, &[u8])] = &[\n");
    for b in built {
        let _ = writeln!(
            s,
            "    ({:?}, include_bytes!({:?})),",
            b.stem,
            b.fatbin.display().to_string()
        );
    }
    s.push_str("];\n");
    s
}
