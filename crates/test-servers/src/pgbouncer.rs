//! A throwaway PgBouncer in transaction mode in front of one `Postgres`.
//!
//! It is configured like production (transaction pooling, so no session state survives a
//! transaction) with one difference: it retries a failed server login after 1 s instead of 15 s,
//! so outage tests see the pool recover as soon as PostgreSQL is back.

use std::path::PathBuf;
use std::time::Duration;

use tempfile::TempDir;

use crate::logs::{data_dir, instance_dir};
use crate::postgres::{execute, url};
use crate::process::{
    binary, command, free_port, retry_on_address_in_use, write_file, Account, Process,
    READY_TIMEOUT,
};
use crate::{block_on, Error, Postgres};

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// A PgBouncer process, stopped and deleted when dropped.
#[derive(Debug)]
pub struct PgBouncer {
    /// Kept across restarts so clients reconnect to the same address.
    port: u16,
    /// Resolved once, so a restart cannot pick up a different binary.
    binary: PathBuf,
    /// pgbouncer.ini, written once; restarts reuse it.
    config: PathBuf,
    /// PgBouncer refuses to run as root, like PostgreSQL.
    account: Option<Account>,
    process: Process,
    /// Owns the config and auth file; declared last so it is removed after the process stops.
    dir: TempDir,
}

impl PgBouncer {
    /// Starts PgBouncer on a free port in front of `upstream` and returns once a `SELECT 1`
    /// passes through it. Every database name is forwarded to `upstream`; the name `pgbouncer`
    /// is its admin console.
    pub fn start(upstream: &Postgres) -> Result<PgBouncer, Error> {
        retry_on_address_in_use(|| Self::start_on_free_port(upstream.port()))
    }

    fn start_on_free_port(upstream_port: u16) -> Result<PgBouncer, Error> {
        let binary = binary(
            "pgbouncer",
            "TEST_PGBOUNCER",
            "/usr/sbin/pgbouncer",
            "sudo apt-get install -y pgbouncer",
        )?;
        let account = Account::for_postgres()?;
        let dir = data_dir("pgbouncer")?;
        let port = free_port()?;
        let auth_file = dir.path().join("userlist.txt");
        write_file(&auth_file, "\"postgres\" \"\"\n")?;
        let config = dir.path().join("pgbouncer.ini");
        write_file(&config, config_text(port, upstream_port, &auth_file))?;
        for path in [dir.path(), &auth_file, &config] {
            Account::give(account, path)?;
        }
        let log = instance_dir("pgbouncer")?.join("pgbouncer.log");
        let pgbouncer = PgBouncer {
            port,
            binary,
            config,
            account,
            process: Process::new(format!("pgbouncer on port {port}"), log),
            dir,
        };
        pgbouncer.launch()?;
        // Once at start, prove the pool really reaches PostgreSQL; restarts skip this so they
        // also work while PostgreSQL is down in an outage test.
        let through = block_on(execute(port, "postgres", &["SELECT 1"], PROBE_TIMEOUT));
        through.map_err(|error| Error::NotReady {
            server: format!("pgbouncer on port {port} (to postgres on port {upstream_port})"),
            waited: PROBE_TIMEOUT,
            last: error.to_string(),
            log: pgbouncer.process.log().to_owned(),
            tail: pgbouncer.process.tail(),
        })?;
        Ok(pgbouncer)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for database `db` through PgBouncer.
    pub fn url(&self, db: &str) -> String {
        url(self.port, db)
    }

    /// Stops PgBouncer at once, dropping client and server connections.
    pub fn stop(&self) {
        // In 1.18 SIGTERM is the immediate shutdown; SIGINT would wait for open transactions.
        self.process.stop(libc::SIGTERM, Duration::from_secs(10));
    }

    /// Starts PgBouncer again on the same port, returning once its admin console answers
    /// (PostgreSQL may be down); does nothing if it is running.
    pub fn start_again(&self) -> Result<(), Error> {
        self.launch()
    }

    /// Freezes PgBouncer (SIGSTOP): connections stay open but nothing answers, like a hung
    /// network path.
    pub fn pause(&self) {
        self.process.signal(libc::SIGSTOP);
    }

    /// Lets a paused PgBouncer run again (SIGCONT).
    pub fn resume(&self) {
        self.process.signal(libc::SIGCONT);
    }

    pub(crate) fn shutdown(&self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir.path());
    }

    fn launch(&self) -> Result<(), Error> {
        let mut command = command(&self.binary, self.dir.path());
        command.arg(&self.config);
        Account::apply(self.account, &mut command);
        self.process.launch(command)?;
        // The admin console answers without PostgreSQL, so readiness means PgBouncer itself.
        self.process.wait_ready(READY_TIMEOUT, || {
            block_on(execute(
                self.port,
                "pgbouncer",
                &["SHOW VERSION"],
                PROBE_TIMEOUT,
            ))
            .map_err(|error| error.to_string())
        })
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config_text(port: u16, upstream_port: u16, auth_file: &std::path::Path) -> String {
    format!(
        "\
[databases]
* = host=127.0.0.1 port={upstream_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
; no unix socket: parallel runs would fight over /tmp/.s.PGSQL.<port>
unix_socket_dir =
auth_type = trust
auth_file = {auth_file}
admin_users = postgres
pool_mode = transaction
max_client_conn = 1000
default_pool_size = 20
ignore_startup_parameters = extra_float_digits,options
server_login_retry = 1
",
        auth_file = auth_file.display()
    )
}
