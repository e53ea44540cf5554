//! Where server logs and data live, and when they are cleaned up.
//!
//! Logs go to `<target>/test-servers/<test binary>-<pid>/<server>-<n>/`, next to the build, so
//! CI can upload them as artifacts. Data directories go to the system temp dir, because
//! PostgreSQL runs as another user when the tests run as root and that user may not be able to
//! enter the checkout.
//!
//! At exit the log directory is deleted unless a test panicked (or `TEST_SERVERS_KEEP_LOGS` is
//! set); then it is kept and marked. Leftovers of processes that no longer exist are removed at
//! start-up: data directories at once, unmarked log directories at once (the run was killed),
//! kept log directories after a day.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tempfile::TempDir;

use crate::process::create_dir;
use crate::Error;

/// Marks a log directory kept because a test failed.
const KEPT_MARKER: &str = "KEPT";

/// How long logs of failed runs stay around for someone to read them.
const KEEP_FAILED_LOGS: Duration = Duration::from_secs(24 * 60 * 60);

/// Prefix of data directories in the temp dir; the pid follows so leftovers can be matched to
/// the process that made them.
const DATA_PREFIX: &str = "test-servers-";

static FAILED: AtomicBool = AtomicBool::new(false);

/// Where the servers' logs are, to print when a test fails.
///
/// The first call prepares the directory, removes leftovers of dead test processes, installs
/// the panic hook that keeps the logs of failed runs, and registers the exit handler.
pub fn log_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = target_dir().join("test-servers");
        remove_stale_logs(&root);
        remove_stale_data();
        let preferred = root.join(format!("{}-{}", binary_name(), std::process::id()));
        let dir = match std::fs::create_dir_all(&preferred) {
            Ok(()) => preferred,
            Err(_) => {
                // A read-only checkout should not stop the tests; logs then go to the temp dir.
                let fallback =
                    std::env::temp_dir().join(format!("{DATA_PREFIX}{}-logs", std::process::id()));
                let _ = std::fs::create_dir_all(&fallback);
                fallback
            }
        };
        install_panic_hook(dir.clone());
        crate::register_exit_handler();
        dir
    })
}

/// A fresh directory for one server instance's log, e.g. `postgres-3`.
pub(crate) fn instance_dir(kind: &str) -> Result<PathBuf, Error> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let dir = log_dir().join(format!("{kind}-{}", NEXT.fetch_add(1, Ordering::Relaxed)));
    create_dir(&dir)?;
    Ok(dir)
}

/// A fresh data directory for one server instance, removed when dropped.
pub(crate) fn data_dir(kind: &str) -> Result<TempDir, Error> {
    // Touch the log dir first so the exit handler exists before any server does.
    let _ = log_dir();
    let prefix = format!("{DATA_PREFIX}{}-{kind}-", std::process::id());
    tempfile::Builder::new()
        .prefix(&prefix)
        .tempdir()
        .map_err(|source| Error::CreateDir {
            path: std::env::temp_dir().join(prefix),
            source,
        })
}

/// Called from the exit handler once servers are stopped.
pub(crate) fn finish() {
    let dir = log_dir();
    if FAILED.load(Ordering::SeqCst) || std::env::var_os("TEST_SERVERS_KEEP_LOGS").is_some() {
        let _ = std::fs::write(dir.join(KEPT_MARKER), b"");
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn install_panic_hook(dir: PathBuf) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        previous(info);
        FAILED.store(true, Ordering::SeqCst);
        eprintln!("server logs kept in {}", dir.display());
    }));
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when absolute, else the nearest ancestor of
/// the test binary holding the `CACHEDIR.TAG` cargo writes there.
fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        if dir.is_absolute() {
            return dir;
        }
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.ancestors()
                .skip(1)
                .find(|dir| dir.join("CACHEDIR.TAG").is_file())
                .map(Path::to_path_buf)
        })
        .unwrap_or_else(std::env::temp_dir)
}

/// The test binary's name without cargo's `-<16 hex digits>` suffix.
fn binary_name() -> String {
    let stem = std::env::current_exe()
        .ok()
        .and_then(|exe| {
            exe.file_stem()
                .map(|stem| stem.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "tests".to_owned());
    strip_hash(&stem).to_owned()
}

fn strip_hash(stem: &str) -> &str {
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            name
        }
        _ => stem,
    }
}

fn process_exists(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

fn remove_stale_logs(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.rsplit_once('-'))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if process_exists(pid) {
            continue;
        }
        let path = entry.path();
        let kept_recently = path
            .join(KEPT_MARKER)
            .metadata()
            .and_then(|meta| meta.modified())
            .is_ok_and(|at| at.elapsed().is_ok_and(|age| age < KEEP_FAILED_LOGS));
        if !kept_recently {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

fn remove_stale_data() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix(DATA_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !process_exists(pid) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_hash_suffixes_are_stripped_from_binary_names() {
        assert_eq!(strip_hash("servers-0123456789abcdef"), "servers");
        assert_eq!(strip_hash("end-to-end-0123456789abcdef"), "end-to-end");
        assert_eq!(strip_hash("end-to-end"), "end-to-end");
    }
}
