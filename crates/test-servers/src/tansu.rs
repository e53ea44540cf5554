//! A throwaway Tansu broker (Kafka wire protocol) with in-memory storage.
//!
//! Memory storage is the only engine fast and complete enough for tests (the SQLite engine
//! stalls at about 100k records). Two consequences: a restart starts empty, so topics must be
//! created again after `start_again`; and its ListOffsets answer for "latest" is wrong, so
//! tests must not derive positions or lag from it.

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::ClientConfig;
use tempfile::TempDir;

use crate::logs::{data_dir, instance_dir};
use crate::process::{
    command, free_port, in_path, is_executable, retry_on_address_in_use, Process, READY_TIMEOUT,
};
use crate::{block_on, Error};

const INSTALL: &str = "cargo install --locked tansu@0.6.0 --features dynostore,postgres, ~20 min";

const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a created topic may take to show all its partitions in metadata.
const TOPIC_TIMEOUT: Duration = Duration::from_secs(30);

/// A Tansu process, stopped when dropped.
#[derive(Debug)]
pub struct Tansu {
    /// Kept across restarts so clients reconnect to the same address.
    port: u16,
    /// Resolved once, so a restart cannot pick up a different binary.
    binary: PathBuf,
    process: Process,
    /// Working directory: Tansu loads a `.env` from where it runs, so it must not run in the
    /// checkout.
    dir: TempDir,
}

impl Tansu {
    /// Starts Tansu with memory storage on a free port, returning once a metadata request
    /// lists the broker.
    pub fn start() -> Result<Tansu, Error> {
        retry_on_address_in_use(Self::start_on_free_port)
    }

    fn start_on_free_port() -> Result<Tansu, Error> {
        let binary = tansu_binary()?;
        let dir = data_dir("tansu")?;
        let port = free_port()?;
        let log = instance_dir("tansu")?.join("tansu.log");
        let tansu = Tansu {
            port,
            binary,
            process: Process::new(format!("tansu on port {port}"), log),
            dir,
        };
        tansu.launch()?;
        Ok(tansu)
    }

    /// The `bootstrap.servers` value, `127.0.0.1:<port>`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Creates `name` with `partitions` partitions (replication 1) and waits until metadata
    /// shows all of them. A topic that already exists with that count is fine.
    pub fn create_topic(&self, name: &str, partitions: i32) -> Result<(), Error> {
        let admin = self.admin()?;
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let options = AdminOptions::new().operation_timeout(Some(TOPIC_TIMEOUT));
        let create_error = |reason: String| Error::CreateTopic {
            topic: name.to_owned(),
            bootstrap: self.bootstrap(),
            reason,
        };
        let results = block_on(async {
            admin
                .create_topics([&topic], &options)
                .await
                .map_err(|error| create_error(error.to_string()))
        })?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(create_error(code.to_string())),
            }
        }
        self.wait_for_topic(&admin, name, partitions)
    }

    /// Freezes the broker (SIGSTOP): connections stay open but nothing answers.
    pub fn pause(&self) {
        self.process.signal(libc::SIGSTOP);
    }

    /// Lets a paused broker run again (SIGCONT).
    pub fn resume(&self) {
        self.process.signal(libc::SIGCONT);
    }

    /// Stops the broker (SIGTERM); with memory storage its topics and records are gone.
    pub fn stop(&self) {
        self.process.stop(libc::SIGTERM, Duration::from_secs(10));
    }

    /// Starts an empty broker again on the same port; does nothing if it is running.
    pub fn start_again(&self) -> Result<(), Error> {
        self.launch()
    }

    pub(crate) fn shutdown(&self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir.path());
    }

    fn launch(&self) -> Result<(), Error> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let mut command = command(&self.binary, self.dir.path());
        command
            .arg("broker")
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .args(["--cluster-id", "test-servers"])
            // Its filter comes from RUST_LOG; the test's own RUST_LOG=debug would flood the log.
            .env(
                "RUST_LOG",
                std::env::var("TEST_TANSU_RUST_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            // Settings the test's environment might carry for a production broker.
            .env_remove("SCHEMA_REGISTRY")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
        self.process.launch(command)?;
        let address = SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut admin = None;
        self.process.wait_ready(READY_TIMEOUT, || {
            // Probe TCP first: librdkafka backs off on refused connections and would make
            // readiness lag behind the broker.
            TcpStream::connect_timeout(&address, PROBE_TIMEOUT)
                .map_err(|error| format!("tcp connect to {address}: {error}"))?;
            if admin.is_none() {
                admin = Some(self.admin().map_err(|error| error.to_string())?);
            }
            let admin = admin.as_ref().expect("set just above");
            let metadata = admin
                .inner()
                .fetch_metadata(None, PROBE_TIMEOUT)
                .map_err(|error| format!("metadata request: {error}"))?;
            if metadata.brokers().is_empty() {
                return Err("metadata lists no brokers".to_owned());
            }
            Ok(())
        })
    }

    fn admin(&self) -> Result<AdminClient<DefaultClientContext>, Error> {
        ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("broker.address.family", "v4")
            .set("reconnect.backoff.ms", "50")
            .set("reconnect.backoff.max.ms", "500")
            .create()
            .map_err(|source| Error::KafkaClient {
                bootstrap: self.bootstrap(),
                source,
            })
    }

    fn wait_for_topic(
        &self,
        admin: &AdminClient<DefaultClientContext>,
        name: &str,
        partitions: i32,
    ) -> Result<(), Error> {
        let started = Instant::now();
        loop {
            let last = match admin.inner().fetch_metadata(Some(name), PROBE_TIMEOUT) {
                Ok(metadata) => match metadata.topics().iter().find(|t| t.name() == name) {
                    Some(topic) if topic.error().is_some() => {
                        format!("error {:?}", topic.error())
                    }
                    Some(topic) if topic.partitions().len() == partitions as usize => {
                        return Ok(());
                    }
                    Some(topic) => format!("{} partitions", topic.partitions().len()),
                    None => "no such topic".to_owned(),
                },
                Err(error) => format!("metadata request: {error}"),
            };
            if started.elapsed() >= TOPIC_TIMEOUT {
                return Err(Error::TopicNotVisible {
                    topic: name.to_owned(),
                    partitions,
                    bootstrap: self.bootstrap(),
                    waited: TOPIC_TIMEOUT,
                    last,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `TEST_TANSU`, else `tansu` in PATH, `$CARGO_HOME/bin` or `~/.cargo/bin` (where
/// `cargo install` puts it even when that directory is not on PATH).
fn tansu_binary() -> Result<PathBuf, Error> {
    if let Some(path) = std::env::var_os("TEST_TANSU").filter(|value| !value.is_empty()) {
        let path = PathBuf::from(path);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(Error::MissingBinary {
                name: "tansu",
                looked: format!("at {} (from TEST_TANSU)", path.display()),
                install: INSTALL,
            })
        };
    }
    let cargo_dirs = [
        std::env::var_os("CARGO_HOME").map(PathBuf::from),
        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")),
    ];
    in_path("tansu")
        .or_else(|| {
            cargo_dirs
                .into_iter()
                .flatten()
                .map(|dir| dir.join("bin").join("tansu"))
                .find(|path| is_executable(path))
        })
        .ok_or_else(|| Error::MissingBinary {
            name: "tansu",
            looked: "in PATH, $CARGO_HOME/bin or ~/.cargo/bin (or set TEST_TANSU)".to_owned(),
            install: INSTALL,
        })
}
