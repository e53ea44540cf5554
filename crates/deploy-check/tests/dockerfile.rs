//! The top-level `Dockerfile` builds every binary of the workspace into a small image that runs
//! as an unprivileged user, with build commands that work on this checkout.
//!
//! Building the image needs Docker; what runs here instead:
//! - the build stage's cargo command with `build --release` replaced by `tree --depth 0`: the
//!   same `--locked` flag and package list, so it fails exactly when the Docker build's
//!   dependency resolution would (a stale Cargo.lock, a package that is not in the workspace),
//!   without compiling everything twice;
//! - each stage's `apt-get install`, simulated (`apt-get install -s`) against this machine's
//!   Debian package lists: the images are Debian 12 (bookworm), as the machines these tests
//!   run on, so a misspelt or missing package fails here as it would in the image build.

use std::collections::BTreeSet;
use std::process::Command;

use deploy_check::{dockerfile_stages, image_is_pinned, read, repo_root, DockerStage};

fn stages() -> Vec<DockerStage> {
    dockerfile_stages(&read("Dockerfile").unwrap())
}

fn build_stage() -> DockerStage {
    stages()
        .into_iter()
        .find(|s| s.name.as_deref() == Some("build"))
        .expect("a stage named `build`")
}

/// The `cargo build` command of the build stage, as words, and the packages it builds.
fn cargo_build() -> (Vec<String>, Vec<String>) {
    let stage = build_stage();
    let run = stage
        .instructions
        .iter()
        .filter(|(keyword, _)| keyword == "RUN")
        .map(|(_, args)| args)
        .find(|args| args.contains("cargo build"))
        .expect("the build stage runs cargo build");
    let command = run
        .split("&&")
        .map(str::trim)
        .find(|part| part.contains("cargo build"))
        .unwrap();
    let words: Vec<String> = command
        .split_whitespace()
        .skip_while(|w| *w != "cargo")
        .map(str::to_owned)
        .collect();
    let packages = words
        .windows(2)
        .filter(|w| w[0] == "-p" || w[0] == "--package")
        .map(|w| w[1].clone())
        .collect();
    (words, packages)
}

/// Binary targets of the workspace's packages, as `cargo metadata` sees them.
fn workspace_binaries() -> BTreeSet<String> {
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--locked", "--no-deps", "--format-version", "1"])
        .current_dir(repo_root())
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo metadata --locked failed; is Cargo.lock up to date?\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap())
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn every_base_image_is_pinned() {
    for stage in stages() {
        assert!(
            image_is_pinned(&stage.image),
            "FROM {} is not pinned to a version",
            stage.image
        );
    }
}

#[test]
fn the_image_runs_as_an_unprivileged_user() {
    let stages = stages();
    let runtime = stages.last().unwrap();
    let user = runtime
        .instructions
        .iter()
        .rev()
        .find(|(keyword, _)| keyword == "USER")
        .map(|(_, args)| args.clone())
        .expect("the final stage sets USER");
    let uid = user.split(':').next().unwrap();
    assert!(
        uid != "root" && uid != "0",
        "the image runs as root ({user})"
    );
    assert!(
        runtime.image.contains("slim") || runtime.image.contains("distroless"),
        "the runtime stage starts from a small base, not {}",
        runtime.image
    );
}

#[test]
fn the_build_stage_has_what_librdkafka_needs() {
    let stage = build_stage();
    let installs: String = stage
        .instructions
        .iter()
        .filter(|(keyword, args)| keyword == "RUN" && args.contains("apt-get install"))
        .map(|(_, args)| args.as_str())
        .collect();
    for package in ["build-essential", "cmake", "pkg-config", "zlib1g-dev"] {
        assert!(
            installs.split_whitespace().any(|w| w == package),
            "the build stage must install {package}"
        );
    }
}

#[test]
fn the_build_stage_builds_and_copies_every_workspace_binary() {
    let (words, packages) = cargo_build();
    assert!(
        words.iter().any(|w| w == "--locked") && words.iter().any(|w| w == "--release"),
        "cargo build must be --release --locked: {words:?}"
    );
    let wanted: BTreeSet<String> = [
        "telemetry-worker",
        "telemetry-bridge",
        "telemetry-api",
        "load-tester",
    ]
    .map(String::from)
    .into();
    let built: BTreeSet<String> = packages.iter().cloned().collect();
    assert_eq!(built, wanted, "the image must hold exactly these binaries");
    let binaries = workspace_binaries();
    let missing: Vec<_> = wanted.difference(&binaries).collect();
    assert!(
        missing.is_empty(),
        "the workspace has no binary target named {missing:?} yet"
    );
    // Each built binary is copied out of the (cache-mounted) target directory.
    let run = build_stage()
        .instructions
        .into_iter()
        .find(|(_, args)| args.contains("cargo build"))
        .unwrap()
        .1;
    for binary in &wanted {
        assert!(
            run.contains(&format!("target/release/{binary}")),
            "the build stage does not copy target/release/{binary} out"
        );
    }
}

#[test]
fn the_build_command_resolves_on_this_checkout() {
    let (words, _) = cargo_build();
    // cargo build --release --locked -p a -p b  ->  cargo tree --depth 0 --locked -p a -p b
    let args: Vec<&str> = words[1..]
        .iter()
        .map(String::as_str)
        .filter(|w| *w != "--release")
        .map(|w| if w == "build" { "tree" } else { w })
        .chain(["--depth", "0"])
        .collect();
    let output = Command::new(env!("CARGO"))
        .args(&args)
        .current_dir(repo_root())
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "`cargo {}` failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_build_context_keeps_what_the_build_needs() {
    let ignored: Vec<String> = read(".dockerignore")
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect();
    let manifest: toml::Table = read("Cargo.toml").unwrap().parse().unwrap();
    let members = manifest["workspace"]["members"].as_array().unwrap();
    let mut needed: Vec<String> = vec!["Cargo.toml".into(), "Cargo.lock".into()];
    needed.extend(members.iter().map(|m| m.as_str().unwrap().to_owned()));
    for path in &needed {
        for pattern in &ignored {
            let excluded = path == pattern
                || path.starts_with(&format!("{pattern}/"))
                || (pattern.ends_with("/*") && path.starts_with(pattern.trim_end_matches('*')));
            assert!(
                !excluded,
                ".dockerignore's '{pattern}' drops {path}, which the build needs"
            );
        }
    }
    assert!(
        ignored.iter().any(|p| p == "target"),
        "target/ must stay out of the build context"
    );
}

/// The packages of every `apt-get install` in the Dockerfile, by stage.
fn apt_installs() -> Vec<(String, Vec<String>)> {
    stages()
        .into_iter()
        .flat_map(|stage| {
            let name = stage.name.clone().unwrap_or_else(|| stage.image.clone());
            stage
                .instructions
                .into_iter()
                .filter(|(keyword, _)| keyword == "RUN")
                .flat_map(|(_, args)| {
                    args.split("&&")
                        .filter_map(|part| part.split_once("apt-get install").map(|(_, rest)| rest))
                        .map(|rest| {
                            rest.split_whitespace()
                                .filter(|w| !w.starts_with('-') && *w != "\\")
                                .map(str::to_owned)
                                .collect::<Vec<_>>()
                        })
                        .collect::<Vec<_>>()
                })
                .map(move |packages| (name.clone(), packages))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn every_package_the_image_installs_exists_in_debian() {
    // The images' Debian release; another release's lists would answer for other packages.
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    assert!(
        os_release.lines().any(|l| l == "VERSION_ID=\"12\""),
        "these tests run on Debian 12, the images' release; this machine has:\n{os_release}"
    );
    let installs = apt_installs();
    assert_eq!(
        installs.len(),
        2,
        "one apt-get install per stage: {installs:?}"
    );
    for (stage, packages) in installs {
        assert!(!packages.is_empty(), "stage {stage} installs nothing");
        let output = Command::new("apt-get")
            .args(["install", "-s", "--no-install-recommends"])
            .args(&packages)
            .output()
            .expect("apt-get runs (these tests run on Debian 12; scripts/install-deps.sh)");
        assert!(
            output.status.success(),
            "stage {stage}: apt-get install -s {} failed (run `apt-get update` first if the package lists are empty):\n{}",
            packages.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
