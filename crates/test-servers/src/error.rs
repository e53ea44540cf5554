//! Every way starting, stopping or using a throwaway server can fail.
//!
//! Messages name the server, the value involved (port, path, topic) and the next step, because
//! they end up in the panic of a test that somebody else has to debug.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// A failure of this crate; one variant per failure site.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{name} not found {looked}; install it with: make deps   (or: {install})")]
    MissingBinary {
        name: &'static str,
        /// Where we looked, e.g. "at /usr/sbin/mosquitto" or "in PATH, ...".
        looked: String,
        install: &'static str,
    },

    #[error(
        "user 'postgres' not found in /etc/passwd; postgresql and pgbouncer refuse to run as \
         root, so install postgresql (its package creates the user) or run the tests as a \
         normal user"
    )]
    NoPostgresUser,

    #[error("could not read /etc/passwd to find the 'postgres' user: {0}")]
    Passwd(#[source] io::Error),

    #[error("could not find a free port on 127.0.0.1: {0}")]
    FreePort(#[source] io::Error),

    #[error("could not create {path}: {source}; check that the disk is writable")]
    CreateDir { path: PathBuf, source: io::Error },

    #[error("could not write {path}: {source}; check that the disk is writable")]
    WriteFile { path: PathBuf, source: io::Error },

    #[error("could not hand {path} to uid {uid}: {source}")]
    Chown {
        path: PathBuf,
        uid: u32,
        source: io::Error,
    },

    #[error("could not start {program}: {source}")]
    Spawn { program: PathBuf, source: io::Error },

    #[error("initdb failed ({status}) for {dir}; last lines of {log}:\n{tail}")]
    Initdb {
        status: ExitStatus,
        dir: PathBuf,
        log: PathBuf,
        tail: String,
    },

    #[error("{server} exited ({status}) before it was ready; last lines of {log}:\n{tail}")]
    Exited {
        server: String,
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },

    #[error(
        "{server} was not ready after {waited:?} (last check: {last}); the machine may be \
         overloaded, last lines of {log}:\n{tail}"
    )]
    NotReady {
        server: String,
        waited: Duration,
        last: String,
        log: PathBuf,
        tail: String,
    },

    #[error("could not connect to postgres at {url}: {source}; is the server running?")]
    Connect {
        url: String,
        source: tokio_postgres::Error,
    },

    #[error("query `{sql}` failed on postgres port {port}: {source}")]
    Query {
        sql: String,
        port: u16,
        source: tokio_postgres::Error,
    },

    #[error("{what} did not answer within {timeout:?}; is the server paused or overloaded?")]
    Timeout { what: String, timeout: Duration },

    #[error("could not create a kafka client for {bootstrap}: {source}")]
    KafkaClient {
        bootstrap: String,
        source: rdkafka::error::KafkaError,
    },

    #[error("could not create topic '{topic}' on {bootstrap}: {reason}")]
    CreateTopic {
        topic: String,
        bootstrap: String,
        reason: String,
    },

    #[error(
        "topic '{topic}' did not show {partitions} partitions in the metadata of {bootstrap} \
         within {waited:?} (last seen: {last}); was it created earlier with another count?"
    )]
    TopicNotVisible {
        topic: String,
        partitions: i32,
        bootstrap: String,
        waited: Duration,
        last: String,
    },

    #[error("could not build a tokio runtime: {0}")]
    Runtime(#[source] io::Error),
}

impl Error {
    /// Whether a start failed only because another process took the port between our probe
    /// and the server's bind, so that starting again on a fresh port is worth one try.
    pub(crate) fn is_address_in_use(&self) -> bool {
        let tail = match self {
            Error::Exited { tail, .. } | Error::NotReady { tail, .. } => tail,
            _ => return false,
        };
        let tail = tail.to_ascii_lowercase();
        tail.contains("address already in use") || tail.contains("address in use")
    }
}
