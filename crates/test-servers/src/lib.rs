//! Real throwaway servers for integration tests: PostgreSQL, PgBouncer, Mosquitto and Tansu
//! (Kafka protocol), each on a free port of 127.0.0.1, started on demand and stopped afterwards.
//! No mocks: tests talk to the same software the pipeline talks to in production.
//!
//! - [`shared`] starts one set per test binary on first use; tests isolate themselves with
//!   their own database, topic or client id from [`unique_name`].
//! - [`Postgres`], [`PgBouncer`], [`Mosquitto`] and [`Tansu`] can also be started privately,
//!   for tests that stop, pause or kill a server.
//! - [`read_topic`] reads a topic back, to check what a stage produced; [`http_get`] reads a
//!   stage's /metrics or /readyz.
//! - `process` spawns and stops processes, `logs` decides where logs and data live.
//!
//! Guarantee: servers never outlive the test process. Private servers stop when dropped, the
//! shared set stops in an exit handler, and if the test process is killed the kernel kills the
//! servers (see `process`).

// Spawning servers safely needs libc: prctl(PR_SET_PDEATHSIG) between fork and exec, kill()
// for signals std does not offer (SIGSTOP, SIGCONT, whole process groups), atexit() for the
// shared set, which lives in a static and is never dropped.
#![allow(unsafe_code)]

mod child;
mod error;
mod http;
mod logs;
mod mosquitto;
mod pgbouncer;
mod postgres;
mod process;
mod records;
mod tansu;

use std::collections::hash_map::RandomState;
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::thread;

pub use child::{terminate, KillOnDrop};
pub use error::Error;
pub use http::{free_addr, http_get, metric_value};
pub use logs::log_dir;
pub use mosquitto::Mosquitto;
pub use pgbouncer::PgBouncer;
pub use postgres::Postgres;
pub use records::{read_at_least, read_dead_letters, read_topic, KafkaRecord};
pub use tansu::Tansu;

/// One server of each kind, shared by every test of a test binary.
#[derive(Debug)]
pub struct Servers {
    pub postgres: Postgres,
    /// In transaction mode in front of `postgres`.
    pub pgbouncer: PgBouncer,
    pub mosquitto: Mosquitto,
    pub kafka: Tansu,
}

/// The shared set, or why it could not start; the error is kept so that every later test
/// fails at once with the same message instead of waiting for the same timeout again.
static SHARED: OnceLock<Result<Servers, String>> = OnceLock::new();

/// One set of servers shared by every test in a test binary, started on first use.
///
/// Blocks while starting. Panics with the reason (and the install command when a binary is
/// missing) if any server cannot start. Tests must not stop or pause these servers; start a
/// private one for that.
#[track_caller]
pub fn shared() -> &'static Servers {
    let servers = SHARED.get_or_init(|| Servers::start().map_err(|errors| errors.join("\n")));
    match servers {
        Ok(servers) => servers,
        Err(message) => panic!("could not start the shared test servers:\n{message}"),
    }
}

impl Servers {
    /// Starts the four servers concurrently and reports every failure, not just the first, so
    /// a fresh machine learns about all missing binaries in one run.
    fn start() -> Result<Servers, Vec<String>> {
        thread::scope(|scope| {
            let sql = scope.spawn(|| {
                let postgres = Postgres::start()?;
                let pgbouncer = PgBouncer::start(&postgres)?;
                Ok::<_, Error>((postgres, pgbouncer))
            });
            let mosquitto = scope.spawn(Mosquitto::start);
            let kafka = scope.spawn(Tansu::start);
            let sql = join(sql);
            let mosquitto = join(mosquitto);
            let kafka = join(kafka);
            match (sql, mosquitto, kafka) {
                (Ok((postgres, pgbouncer)), Ok(mosquitto), Ok(kafka)) => Ok(Servers {
                    postgres,
                    pgbouncer,
                    mosquitto,
                    kafka,
                }),
                (sql, mosquitto, kafka) => Err([sql.err(), mosquitto.err(), kafka.err()]
                    .into_iter()
                    .flatten()
                    .map(|error| error.to_string())
                    .collect()),
            }
        })
    }

    fn shutdown(&self) {
        // PgBouncer first, so it does not log a burst of failed server logins.
        self.pgbouncer.shutdown();
        self.postgres.shutdown();
        self.mosquitto.shutdown();
        self.kafka.shutdown();
    }
}

fn join<T>(handle: thread::ScopedJoinHandle<'_, T>) -> T {
    handle
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Stops the shared set and settles the log directory when the test binary exits; statics are
/// never dropped, and the test harness leaves through `exit`, which runs atexit handlers.
pub(crate) fn register_exit_handler() {
    extern "C" fn at_exit() {
        // Unwinding out of an extern "C" function aborts; a failed cleanup must not.
        let _ = std::panic::catch_unwind(|| {
            if let Some(Ok(servers)) = SHARED.get() {
                servers.shutdown();
            }
            logs::finish();
        });
    }
    // SAFETY: at_exit takes no arguments and never unwinds.
    unsafe { libc::atexit(at_exit) };
}

/// A unique name for a test's own database, topic or MQTT client id: the prefix, the pid, a
/// counter and a short random part, lowercase and only `[a-z0-9_]`.
///
/// The pid and counter keep names apart within a machine; the random part keeps them apart
/// across pid reuse, e.g. a database left over by a killed run of an earlier binary. Names stay
/// under PostgreSQL's 63-byte identifier limit and never start with a digit.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut clean: String = prefix
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(30)
        .collect();
    if !clean.starts_with(|c: char| c.is_ascii_lowercase() || c == '_') {
        clean.insert(0, 't');
    }
    let random = RandomState::new().hash_one((count, std::time::SystemTime::now()));
    format!(
        "{clean}_{}_{count}_{}",
        std::process::id(),
        base36(random, 6)
    )
}

fn base36(mut value: u64, digits: usize) -> String {
    const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    (0..digits)
        .map(|_| {
            let digit = ALPHABET[(value % 36) as usize] as char;
            value /= 36;
            digit
        })
        .collect()
}

/// Runs `future` to completion from sync code, also when called inside an async test: a
/// runtime cannot block inside another, so then it runs on a thread of its own.
pub(crate) fn block_on<T, F>(future: F) -> Result<T, Error>
where
    F: Future<Output = Result<T, Error>> + Send,
    T: Send,
{
    let run = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::Runtime)?
            .block_on(future)
    };
    if tokio::runtime::Handle::try_current().is_ok() {
        thread::scope(|scope| join(scope.spawn(run)))
    } else {
        run()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_distinct_and_safe_identifiers() {
        let names: Vec<String> = ["Orders", "9lives", "", "a-b.c/d", "ünïcode"]
            .iter()
            .map(|prefix| unique_name(prefix))
            .collect();
        for name in &names {
            assert!(name.len() <= 63, "{name}");
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name}"
            );
            assert!(!name.starts_with(|c: char| c.is_ascii_digit()), "{name}");
        }
        assert!(names[0].starts_with("orders_"));
        let distinct: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(distinct.len(), names.len());
    }
}
