//! Compiles every `kernels/*.cu` to PTX (virtual arch compute_80, so the driver
//! JITs it for any newer GPU) and embeds it in the crate through
//! `$OUT_DIR/ptx.rs`. Each kernel is also assembled for sm_90 with
//! `--resource-usage`; the report lands in `target/<profile>/ptxas-sm_90.txt`
//! so register counts and spills are visible without a GPU.
//!
//! Without nvcc the crate still builds: `ptx.rs` then embeds no module, the
//! CPU reference works, and `CudaBackend::new` returns an error naming the
//! missing nvcc. Set `TRAM_REQUIRE_NVCC=1` to make a missing nvcc fatal (CI).

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;

const PTX_ARCH: &str = "compute_80";
const SASS_ARCH: &str = "sm_90";

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kernel_dir = manifest.join("kernels");

    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "TRAM_REQUIRE_NVCC",
    ] {
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
    let kernels: Vec<PathBuf> = sources
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();

    let generated = match find_nvcc() {
        Some(nvcc) => compile_all(&nvcc, &kernel_dir, &kernels, &out_dir),
        None => {
            let reason = "nvcc was not found at build time (looked at $NVCC, $CUDA_HOME/bin, \
                          $CUDA_PATH/bin and $PATH), so no CUDA kernels are embedded. Install it \
                          with `scripts/install-nvcc.sh` (NVIDIA's nvcc 13.0 pip wheels) and \
                          rebuild with NVCC=<the path it prints>.";
            if env::var("TRAM_REQUIRE_NVCC").is_ok_and(|v| v == "1") {
                panic!("TRAM_REQUIRE_NVCC=1 but {reason}");
            }
            println!("cargo:warning=tram-kernels: {reason}");
            generated_source(None, reason, &[])
        }
    };
    fs::write(out_dir.join("ptx.rs"), generated).expect("write ptx.rs");
}

/// `$NVCC`, then `$CUDA_HOME/bin/nvcc`, `$CUDA_PATH/bin/nvcc`, then `nvcc` on `$PATH`.
fn find_nvcc() -> Option<PathBuf> {
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
            let p = Path::new(&root).join("bin").join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    env::var_os("PATH").and_then(|path| {
        env::split_paths(&path)
            .map(|dir| dir.join("nvcc"))
            .find(|p| p.is_file())
    })
}

struct Built {
    name: String,
    ptx: PathBuf,
    resource_usage: String,
}

fn compile_all(nvcc: &Path, kernel_dir: &Path, kernels: &[PathBuf], out_dir: &Path) -> String {
    let version = Command::new(nvcc)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let release = version.lines().last().unwrap_or("unknown nvcc").to_string();

    // One thread per kernel file: nvcc is single-threaded and slow to start.
    let results: Vec<Result<Built, String>> = thread::scope(|s| {
        let handles: Vec<_> = kernels
            .iter()
            .map(|src| s.spawn(move || compile_one(nvcc, kernel_dir, src, out_dir)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let mut built = Vec::new();
    let mut failures = String::new();
    for r in results {
        match r {
            Ok(b) => built.push(b),
            Err(e) => failures.push_str(&e),
        }
    }
    if !failures.is_empty() {
        panic!("tram-kernels: CUDA kernels failed to compile\n{failures}");
    }

    let mut report = format!(
        "# ptxas resource usage for {SASS_ARCH} ({release})\n\
         # registers, spill stores/loads and shared memory per kernel; spills should be 0.\n"
    );
    for b in &built {
        let _ = writeln!(
            report,
            "\n## {}.cu\n{}",
            b.name,
            b.resource_usage.trim_end()
        );
        for line in b.resource_usage.lines() {
            if line.contains("spill")
                && !line.contains(" 0 bytes spill stores, 0 bytes spill loads")
            {
                println!(
                    "cargo:warning=tram-kernels: {}.cu spills on {SASS_ARCH}: {}",
                    b.name,
                    line.trim()
                );
            }
        }
    }
    fs::write(out_dir.join(format!("ptxas-{SASS_ARCH}.txt")), &report).expect("write report");
    // target/<profile>/ptxas-sm_90.txt: OUT_DIR is target/<profile>/build/<pkg>-<hash>/out.
    if let Some(profile_dir) = out_dir.ancestors().nth(3) {
        let _ = fs::write(profile_dir.join(format!("ptxas-{SASS_ARCH}.txt")), &report);
    }
    generated_source(Some((nvcc, &release)), "", &built)
}

fn compile_one(
    nvcc: &Path,
    kernel_dir: &Path,
    src: &Path,
    out_dir: &Path,
) -> Result<Built, String> {
    let name = src.file_stem().unwrap().to_string_lossy().into_owned();
    let ptx = out_dir.join(format!("{name}.ptx"));
    let cubin = out_dir.join(format!("{name}.{SASS_ARCH}.cubin"));
    // No --use_fast_math: the KL relies on accurate expf/expm1f/log1pf.
    let common = |cmd: &mut Command| {
        cmd.arg("-std=c++17")
            .arg("-O3")
            .arg("-I")
            .arg(kernel_dir)
            .arg("-Xptxas=-warn-spills")
            .arg(src);
    };
    let run = |cmd: &mut Command, what: &str| -> Result<String, String> {
        let out = cmd
            .output()
            .map_err(|e| format!("could not run {}: {e}\n", nvcc.display()))?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            Ok(stderr)
        } else {
            Err(format!(
                "--- {} ({what}) ---\n{}{}\n",
                src.display(),
                String::from_utf8_lossy(&out.stdout),
                stderr
            ))
        }
    };

    let mut to_ptx = Command::new(nvcc);
    to_ptx
        .arg("--ptx")
        .arg(format!("-arch={PTX_ARCH}"))
        .arg("-o")
        .arg(&ptx);
    common(&mut to_ptx);
    run(&mut to_ptx, PTX_ARCH)?;

    let mut to_cubin = Command::new(nvcc);
    to_cubin
        .arg("--cubin")
        .arg(format!("-arch={SASS_ARCH}"))
        .arg("--resource-usage")
        .arg("-o")
        .arg(&cubin);
    common(&mut to_cubin);
    let resource_usage = run(&mut to_cubin, SASS_ARCH)?;
    Ok(Built {
        name,
        ptx,
        resource_usage,
    })
}

fn generated_source(nvcc: Option<(&Path, &str)>, missing: &str, built: &[Built]) -> String {
    let mut s = String::from("// @generated by build.rs\n");
    match nvcc {
        Some((path, release)) => {
            let _ = writeln!(
                s,
                "/// The nvcc that built the embedded PTX.\npub const NVCC: Option<&str> = Some({:?});",
                format!("{} ({release})", path.display())
            );
        }
        None => s.push_str(
            "/// The nvcc that built the embedded PTX.\npub const NVCC: Option<&str> = None;\n",
        ),
    }
    let _ = writeln!(
        s,
        "/// Why no PTX is embedded (empty when it is).\npub const MISSING_REASON: &str = {missing:?};"
    );
    s.push_str("/// Every `kernels/*.cu`, by file stem, as PTX text.\npub static MODULES: &[(&str, &str)] = &[\n");
    for b in built {
        let _ = writeln!(
            s,
            "    ({:?}, include_str!({:?})),",
            b.name,
            b.ptx.display().to_string()
        );
    }
    s.push_str("];\n");
    s
}
