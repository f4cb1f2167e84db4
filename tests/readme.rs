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
