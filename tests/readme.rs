//! The README's commands and code routes work as written.

use std::path::Path;

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

/// The command-line flags an example parses (`"--flag" =>` match arms; not `--help`).
fn example_flags(src: &str) -> Vec<String> {
    let mut flags = Vec::new();
    for part in src.split('"').skip(1).step_by(2) {
        let flag_like = part.len() > 2
            && part.starts_with("--")
            && part[2..]
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '-');
        if flag_like && part != "--help" && !flags.iter().any(|f| f == part) {
            flags.push(part.to_string());
        }
    }
    flags
}

/// Cargo takes every flag before `--` as its own and rejects the example's:
/// in a `cargo run --example` command, the example's flags come after `--`,
/// and each flag an example parses is shown in such a command.
#[test]
fn example_flags_follow_the_separator() {
    let readme = read("README.md");
    let commands: Vec<&str> = readme
        .lines()
        .filter(|l| l.contains("cargo run") && l.contains("--example"))
        .collect();
    assert!(!commands.is_empty(), "the README shows no example command");
    for cmd in &commands {
        let words: Vec<&str> = cmd
            .split('#')
            .next()
            .unwrap()
            .split_whitespace()
            .map(|w| w.trim_matches('`'))
            .collect();
        let sep = words.iter().position(|w| *w == "--").unwrap_or(words.len());
        let example = words[words.iter().position(|w| *w == "--example").unwrap() + 1];
        let src = read(&format!("examples/{example}.rs"));
        for flag in example_flags(&src) {
            if let Some(at) = words.iter().position(|w| *w == flag) {
                assert!(at > sep, "README: `{flag}` must follow `--` in: {cmd}");
            }
        }
    }
    for example in ["train_shift", "tour"] {
        for flag in example_flags(&read(&format!("examples/{example}.rs"))) {
            let shown = commands
                .iter()
                .any(|c| c.contains(&format!("--example {example} -- ")) && c.contains(&flag));
            assert!(
                shown,
                "README: no `cargo run` command shows {example} {flag}"
            );
        }
    }
}

/// cudarc's `CudaContext::new` panics where no driver library loads; the
/// README's route to `CudaBackend::from_stream` is `cuda::context`, which
/// returns an error instead (checked here on whatever this machine has).
#[test]
fn the_from_stream_route_returns_errors() {
    let readme = read("README.md");
    assert!(
        readme.contains("cuda::context("),
        "README: show `cuda::context` on the way to `from_stream`"
    );
    assert!(
        !readme.contains("CudaContext::new"),
        "README: CudaContext::new panics without a driver"
    );
    match tram_kernels::cuda::context(1 << 20) {
        Err(tram_kernels::Error::CudaUnavailable(_)) => {}
        other => panic!("expected CudaUnavailable for device 2^20, got {other:?}"),
    }
}

/// Every relative link of the Markdown files users read points at a file of
/// the repository.
#[test]
fn markdown_links_resolve() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for doc in ["README.md", "BENCHMARKS.md", "emu/README.md"] {
        let text = read(doc);
        let dir = root.join(doc).parent().unwrap().to_path_buf();
        let mut links = 0;
        for part in text.split("](").skip(1) {
            let Some(end) = part.find(')') else { continue };
            let target = part[..end].split('#').next().unwrap();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            links += 1;
            assert!(
                dir.join(target).exists(),
                "{doc}: the link to {target} points at no file of the repository"
            );
        }
        if doc == "README.md" {
            assert!(
                links > 0,
                "README.md: no relative link found (parser broken?)"
            );
        }
    }
}

/// Users have the repository only: nothing they read or build may send them to
/// the developers' design notes, which live outside it.
#[test]
fn nothing_points_outside_the_repository() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // Assembled, so that this file does not match itself.
    let needles = [
        ["shared", "/notes"].concat(),
        ["/work", "/shared"].concat(),
        ["byte-budgets", ".md"].concat(),
        ["kl-numerics", ".md"].concat(),
        ["cudarc-0.19", ".md"].concat(),
    ];
    let mut stack = vec![root.to_path_buf()];
    let mut checked = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                // Build outputs and committed logs are not sources.
                if !["target", ".git", "bench-logs", "gpu-runs", "gpu-bundle"]
                    .contains(&name.as_str())
                {
                    stack.push(path);
                }
                continue;
            }
            let ext = path.extension().map(|e| e.to_string_lossy().into_owned());
            let source = matches!(
                ext.as_deref(),
                Some("rs" | "md" | "cu" | "cuh" | "toml" | "sh" | "py" | "cpp" | "hpp" | "h")
            ) || name == "run";
            if !source {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            checked += 1;
            for needle in &needles {
                assert!(
                    !text.contains(needle.as_str()),
                    "{} mentions {needle}: move what users need into the docs",
                    path.strip_prefix(root).unwrap().display()
                );
            }
        }
    }
    assert!(checked > 50, "only {checked} source files found");
}
