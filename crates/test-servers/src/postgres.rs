//! A throwaway PostgreSQL cluster on a free loopback port.
//!
//! Durability is kept where tests look at it: `synchronous_commit` stays on, so a committed row
//! survives `kill9` (a process crash leaves the OS page cache intact). Only `fsync` is off, which
//! would matter for a power cut, not for the crashes tests simulate.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::logs::{data_dir, instance_dir};
use crate::process::{
    self, command, create_dir, free_port, retry_on_address_in_use, Account, Process, READY_TIMEOUT,
};
use crate::{block_on, Error};

/// Where Debian's postgresql-15 package puts its binaries (not on PATH).
const DEFAULT_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

const INSTALL: &str = "sudo apt-get install -y postgresql";

/// Sized for many tests each holding a few connections plus PgBouncer pools of 20 per database.
const MAX_CONNECTIONS: &str = "500";

/// Bounds a single readiness probe, so a wedged server fails the wait instead of hanging it.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `start_again` keeps retrying while workers of a killed postmaster linger.
const WORKERS_EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds the statements of `create_database`; generous for loaded CI machines.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(60);

/// A PostgreSQL server with its own cluster, stopped and deleted when dropped.
#[derive(Debug)]
pub struct Postgres {
    /// Kept across restarts so clients and PgBouncer can reconnect to the same address.
    port: u16,
    /// The `postgres` binary; restarts reuse it without looking it up again.
    binary: PathBuf,
    /// The cluster made by initdb, kept across restarts so data survives them.
    cluster: PathBuf,
    /// Unix sockets go here rather than /tmp so parallel test runs never share a socket path.
    sockets: PathBuf,
    /// The account the server runs as when the tests run as root.
    account: Option<Account>,
    process: Process,
    /// Owns `cluster` and `sockets`; declared last so it is removed after the process stops.
    data: TempDir,
}

impl Postgres {
    /// Creates a cluster (`initdb -A trust`, superuser `postgres`) and starts a server on a free
    /// port of 127.0.0.1, returning once it answers `SELECT 1`.
    pub fn start() -> Result<Postgres, Error> {
        retry_on_address_in_use(Self::start_on_free_port)
    }

    fn start_on_free_port() -> Result<Postgres, Error> {
        let bin_dir = bin_dir()?;
        let account = Account::for_postgres()?;
        let data = data_dir("postgres")?;
        Account::give(account, data.path())?;
        let sockets = data.path().join("sockets");
        create_dir(&sockets)?;
        Account::give(account, &sockets)?;
        let cluster = data.path().join("cluster");
        let port = free_port()?;
        let log = instance_dir("postgres")?.join("postgres.log");
        let process = Process::new(format!("postgres on port {port}"), log);
        initdb(&bin_dir, &cluster, account, &process)?;
        let postgres = Postgres {
            port,
            binary: bin_dir.join("postgres"),
            cluster,
            sockets,
            account,
            process,
            data,
        };
        postgres.launch()?;
        Ok(postgres)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A direct connection URL (not through PgBouncer) for database `db`.
    pub fn url(&self, db: &str) -> String {
        url(self.port, db)
    }

    /// Drops database `name` if it exists (disconnecting its sessions) and creates it empty.
    pub fn create_database(&self, name: &str) -> Result<(), Error> {
        let name = quote_ident(name);
        let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
        let create = format!("CREATE DATABASE {name}");
        block_on(execute(
            self.port,
            "postgres",
            &[&drop, &create],
            STATEMENT_TIMEOUT,
        ))
    }

    /// Stops the server with a fast shutdown (open sessions are disconnected, no data is lost).
    pub fn stop(&self) {
        self.process.stop(libc::SIGINT, Duration::from_secs(30));
    }

    /// Starts the server again on the same port and cluster; does nothing if it is running.
    pub fn start_again(&self) -> Result<(), Error> {
        // Right after kill9 the old workers may still hold the shared memory block, which makes
        // the new postmaster exit at once ("pre-existing shared memory block is still in use")
        // until they have noticed their postmaster is gone.
        let deadline = Instant::now() + WORKERS_EXIT_TIMEOUT;
        loop {
            match self.launch() {
                Err(Error::Exited { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                result => return result,
            }
        }
    }

    /// Kills the postmaster with SIGKILL, like a crash. Its workers (which PostgreSQL puts in
    /// sessions of their own) notice and exit by themselves; `start_again` then runs crash
    /// recovery.
    pub fn kill9(&self) {
        self.process.kill9();
    }

    /// Stops the server and deletes its cluster; used at exit for the shared set, whose statics
    /// are never dropped.
    pub(crate) fn shutdown(&self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.data.path());
    }

    fn launch(&self) -> Result<(), Error> {
        let mut command = command(&self.binary, &self.cluster);
        command
            .arg("-D")
            .arg(&self.cluster)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.sockets)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off"])
            .args(["-c", "synchronous_commit=on"])
            .args(["-c", &format!("max_connections={MAX_CONNECTIONS}")])
            .args(["-c", "huge_pages=off"])
            .args(["-c", "timezone=UTC"])
            .args(["-c", "lc_messages=C"])
            .args(["-c", "log_line_prefix=%m [%p] %q%u@%d "]);
        Account::apply(self.account, &mut command);
        self.process.launch(command)?;
        self.process.wait_ready(READY_TIMEOUT, || {
            block_on(execute(self.port, "postgres", &["SELECT 1"], PROBE_TIMEOUT))
                .map_err(|error| error.to_string())
        })
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn url(port: u16, db: &str) -> String {
    format!("postgres://postgres@127.0.0.1:{port}/{db}")
}

/// Runs `statements` one by one over a fresh connection with the simple query protocol, which
/// also works through PgBouncer in transaction mode.
pub(crate) async fn execute(
    port: u16,
    db: &str,
    statements: &[&str],
    timeout: Duration,
) -> Result<(), Error> {
    let url = url(port, db);
    let mut config: tokio_postgres::Config = url.parse().map_err(|source| Error::Connect {
        url: url.clone(),
        source,
    })?;
    config.connect_timeout(timeout);
    let connected = tokio::time::timeout(timeout, config.connect(tokio_postgres::NoTls)).await;
    let (client, connection) = match connected {
        Ok(result) => result.map_err(|source| Error::Connect {
            url: url.clone(),
            source,
        })?,
        Err(_) => return Err(Error::Timeout { what: url, timeout }),
    };
    let connection = tokio::spawn(connection);
    for sql in statements {
        match tokio::time::timeout(timeout, client.batch_execute(sql)).await {
            Ok(result) => result.map_err(|source| Error::Query {
                sql: (*sql).to_owned(),
                port,
                source,
            })?,
            Err(_) => {
                return Err(Error::Timeout {
                    what: format!("`{sql}` on {url}"),
                    timeout,
                })
            }
        }
    }
    drop(client);
    let _ = connection.await;
    Ok(())
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The PostgreSQL binaries: `TEST_PG_BIN_DIR`, else version 15 as in CI, else the newest
/// version installed, so a developer machine with another version still works.
fn bin_dir() -> Result<PathBuf, Error> {
    let candidates: Vec<PathBuf> = match std::env::var_os("TEST_PG_BIN_DIR") {
        Some(dir) if !dir.is_empty() => vec![PathBuf::from(dir)],
        _ => {
            let mut others: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|entry| {
                    let version = entry.file_name().to_str()?.parse().ok()?;
                    Some((version, entry.path().join("bin")))
                })
                .collect();
            others.sort();
            std::iter::once(PathBuf::from(DEFAULT_BIN_DIR))
                .chain(others.into_iter().rev().map(|(_, dir)| dir))
                .collect()
        }
    };
    candidates
        .iter()
        .find(|dir| has_server_binaries(dir))
        .cloned()
        .ok_or_else(|| Error::MissingBinary {
            name: "postgresql",
            looked: format!(
                "at {} (override the directory with TEST_PG_BIN_DIR)",
                candidates[0].join("postgres").display()
            ),
            install: INSTALL,
        })
}

fn has_server_binaries(dir: &Path) -> bool {
    process::is_executable(&dir.join("postgres")) && process::is_executable(&dir.join("initdb"))
}

fn initdb(
    bin_dir: &Path,
    cluster: &Path,
    account: Option<Account>,
    process: &Process,
) -> Result<(), Error> {
    let open_log = || {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(process.log())
            .map_err(|source| Error::WriteFile {
                path: process.log().to_owned(),
                source,
            })
    };
    let program = bin_dir.join("initdb");
    let mut command = command(&program, cluster.parent().unwrap_or(cluster));
    command
        .arg("-D")
        .arg(cluster)
        .args(["--auth=trust", "--username=postgres", "--encoding=UTF8"])
        .args(["--locale=C", "--no-sync", "--no-instructions"])
        .stdout(open_log()?)
        .stderr(open_log()?);
    Account::apply(account, &mut command);
    let status = process::spawn(command)
        .and_then(|mut child| child.wait())
        .map_err(|source| Error::Spawn { program, source })?;
    if status.success() {
        Ok(())
    } else {
        Err(Error::Initdb {
            status,
            dir: cluster.to_owned(),
            log: process.log().to_owned(),
            tail: process.tail(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_so_any_name_is_one_database() {
        assert_eq!(quote_ident("orders"), "\"orders\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
