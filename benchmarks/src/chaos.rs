//! The fault drill behind `make chaos`: the faults it injects into a running local stack, the
//! TCP proxy that cuts the path to Kafka, and the probe that says when the pipeline has
//! recovered.
//!
//! Every fault acts on the real process the way an operator or a crash would: signals to the
//! pids in `$STACK_DIR`, `pg_ctl` stop modes, and `scripts/stack.sh up` to start again whatever
//! is not running (the stand-in for an orchestrator's restart policy).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::stack::{metrics_page, LocalStack};

/// The faults of a drill. Each names what happens to which part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// kill -9 the worker, then start it again.
    KillWorker,
    /// kill -9 the bridge, then start it again.
    KillBridge,
    /// kill -9 PgBouncer, then start it again.
    KillPgbouncer,
    /// `pg_ctl stop -m fast` (clients disconnected, checkpoint), then start.
    RestartPostgresFast,
    /// `pg_ctl stop -m immediate` (a crash: WAL recovery on start), then start.
    RestartPostgresImmediate,
    /// kill -9 the Kafka broker (durable storage), then start it again.
    RestartKafka,
    /// SIGSTOP the Kafka broker past the clients' time-outs, then SIGCONT.
    FreezeKafka,
    /// Close every TCP connection to Kafka and refuse new ones, then let them through again.
    CutKafka,
    /// SIGTERM the MQTT broker (it saves its persistent sessions), then start it again.
    RestartMqtt,
    /// Three worker replicas in the group, then back to one.
    ScaleWorkers,
    /// SIGSTOP a worker past its consumer-group session time-out, then SIGCONT.
    StopWorker,
    /// Hold every connection PostgreSQL accepts, then release them.
    ExhaustPostgres,
}

impl Fault {
    pub const ALL: [Fault; 12] = [
        Fault::KillWorker,
        Fault::KillBridge,
        Fault::KillPgbouncer,
        Fault::RestartPostgresFast,
        Fault::RestartPostgresImmediate,
        Fault::RestartKafka,
        Fault::FreezeKafka,
        Fault::CutKafka,
        Fault::RestartMqtt,
        Fault::ScaleWorkers,
        Fault::StopWorker,
        Fault::ExhaustPostgres,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillWorker => "kill-worker",
            Fault::KillBridge => "kill-bridge",
            Fault::KillPgbouncer => "kill-pgbouncer",
            Fault::RestartPostgresFast => "restart-postgres-fast",
            Fault::RestartPostgresImmediate => "restart-postgres-immediate",
            Fault::RestartKafka => "restart-kafka",
            Fault::FreezeKafka => "freeze-kafka",
            Fault::CutKafka => "cut-kafka",
            Fault::RestartMqtt => "restart-mqtt",
            Fault::ScaleWorkers => "scale-workers",
            Fault::StopWorker => "stop-worker",
            Fault::ExhaustPostgres => "exhaust-postgres",
        }
    }
}

/// The `ALL` faults in an order drawn from `seed` (the same seed, the same order), cut to
/// `count`.
pub fn schedule(seed: u64, count: usize) -> Vec<Fault> {
    let mut order = Fault::ALL.to_vec();
    let mut state = seed;
    // Fisher-Yates with splitmix64: a schedule needs reproducibility, not a crate.
    for i in (1..order.len()).rev() {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        order.swap(i, (z % (i as u64 + 1)) as usize);
    }
    order.truncate(count.min(order.len()));
    order
}

/// How long the faults that last are held.
#[derive(Debug, Clone, Copy)]
pub struct Holds {
    /// Past librdkafka's socket time-out (60 s) and the group's session time-out (45 s).
    pub freeze_kafka: Duration,
    /// Past the worker's session time-out (librdkafka's default, 45 s).
    pub stop_worker: Duration,
    pub cut_kafka: Duration,
    pub exhaust_postgres: Duration,
    /// How long three replicas share the group before going back to one.
    pub scaled: Duration,
}

impl Holds {
    /// Roughly how long `fault` keeps the pipeline disturbed, so the load outlasts it.
    pub fn of(&self, fault: Fault) -> Duration {
        match fault {
            Fault::FreezeKafka => self.freeze_kafka,
            Fault::StopWorker => self.stop_worker,
            Fault::CutKafka => self.cut_kafka,
            Fault::ExhaustPostgres => self.exhaust_postgres,
            Fault::ScaleWorkers => self.scaled + Duration::from_secs(10),
            _ => Duration::from_secs(5),
        }
    }
}

/// The pipeline's own processes, which the drill restarts when they exit.
const STAGES: [&str; 3] = ["telemetry-worker", "telemetry-bridge", "telemetry-api"];

/// Injects faults into the stack and clears them again.
#[derive(Debug)]
pub struct Drill<'a> {
    pub stack: &'a LocalStack,
    pub proxy: &'a KafkaProxy,
    pub holds: Holds,
    /// How long a part may take to start again before the drill gives up on it.
    pub restart_limit: Duration,
    /// PostgreSQL's port, for holding its connections.
    pub pg_port: u16,
}

impl Drill<'_> {
    /// Injects `fault` and returns once it is cleared (the part is running again, the signal
    /// undone, the path restored); recovery is measured from then.
    pub fn run(&self, fault: Fault) -> anyhow::Result<()> {
        match fault {
            Fault::KillWorker => self.kill_and_restart("telemetry-worker"),
            Fault::KillBridge => self.kill_and_restart("telemetry-bridge"),
            Fault::KillPgbouncer => self.kill_and_restart("run/pgbouncer"),
            Fault::RestartKafka => self.kill_and_restart("tansu"),
            Fault::RestartPostgresFast => self.restart_postgres("fast"),
            Fault::RestartPostgresImmediate => self.restart_postgres("immediate"),
            Fault::FreezeKafka => self.freeze("tansu", self.holds.freeze_kafka),
            Fault::StopWorker => self.freeze("telemetry-worker", self.holds.stop_worker),
            Fault::CutKafka => {
                self.proxy.cut();
                std::thread::sleep(self.holds.cut_kafka);
                self.proxy.restore();
                Ok(())
            }
            Fault::RestartMqtt => self.restart_mqtt(),
            Fault::ScaleWorkers => {
                let out = self.stack.script(&["workers", "3"]);
                if out.is_ok() {
                    std::thread::sleep(self.holds.scaled);
                }
                // Back to one whatever happened, so the next fault starts from the same stack.
                let back = self.stack.script(&["workers", "1"]);
                out.and(back)
            }
            Fault::ExhaustPostgres => self.exhaust_postgres(),
        }
    }

    fn pid(&self, name: &str) -> anyhow::Result<u32> {
        let path = self.stack.dir.join(format!("{name}.pid"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}: is the stack up?", path.display()))?;
        text.lines()
            .next()
            .and_then(|line| line.trim().parse().ok())
            .with_context(|| format!("{} holds no pid", path.display()))
    }

    fn signal(&self, name: &str, signal: &str) -> anyhow::Result<u32> {
        let pid = self.pid(name)?;
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .context("cannot run kill")?;
        if !status.success() {
            bail!("kill -{signal} {pid} ({name}) failed");
        }
        Ok(pid)
    }

    fn wait_gone(&self, pid: u32, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            if Instant::now() > deadline {
                bail!("process {pid} did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// `scripts/stack.sh up` until it succeeds: a part that starts while another is still
    /// coming back (the worker while PostgreSQL replays its WAL) may need a second try.
    fn start_missing(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.restart_limit;
        loop {
            match self.stack.script(&["up"]) {
                Ok(()) => return Ok(()),
                Err(error) if Instant::now() < deadline => {
                    eprintln!("chaos: {error:#}; trying again");
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Starts again every stage whose process has exited, as an orchestrator's restart policy
    /// would (a worker that stops rather than guess, after the database was away too long).
    /// Returns the names it restarted.
    pub fn restart_exited(&self) -> Vec<String> {
        let exited: Vec<String> = STAGES
            .iter()
            .filter(|name| {
                self.pid(name)
                    .map(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
                    .unwrap_or(false)
            })
            .map(|name| name.to_string())
            .collect();
        if !exited.is_empty() {
            eprintln!("chaos: {} exited; starting again", exited.join(", "));
            if let Err(error) = self.stack.script(&["up"]) {
                eprintln!("chaos: {error:#}");
            }
        }
        exited
    }

    /// Clears a wedged consumer group (see [`ProbeTargets::kafka_group_wedged`]) the only way
    /// Tansu 0.6.0 allows: it keeps the group's state in memory and writes it back, so the
    /// broker stops, the group's state is deleted from its storage, and the broker starts
    /// again. Committed offsets are kept (the worker reads its own from `ingest_offsets`).
    pub fn repair_kafka_group(&self, kafka_db: &str, group: &str) -> anyhow::Result<()> {
        let pid = self.signal("tansu", "KILL")?;
        self.wait_gone(pid, Duration::from_secs(10))?;
        let group = group.replace('\'', "''");
        let sql = format!(
            "DELETE FROM consumer_group_detail WHERE consumer_group IN \
             (SELECT id FROM consumer_group WHERE name = '{group}')"
        );
        let status = Command::new("psql")
            .args([kafka_db, "-qAtc", &sql])
            .status()
            .context("cannot run psql")?;
        if !status.success() {
            bail!("cannot delete the group's state from Tansu's storage");
        }
        self.start_missing()
    }

    fn kill_and_restart(&self, name: &str) -> anyhow::Result<()> {
        let pid = self.signal(name, "KILL")?;
        self.wait_gone(pid, Duration::from_secs(10))?;
        self.start_missing()
    }

    fn restart_postgres(&self, mode: &str) -> anyhow::Result<()> {
        self.stack.script(&["stop-postgres", mode])?;
        self.start_missing()
    }

    fn freeze(&self, name: &str, hold: Duration) -> anyhow::Result<()> {
        self.signal(name, "STOP")?;
        std::thread::sleep(hold);
        self.signal(name, "CONT")?;
        Ok(())
    }

    fn restart_mqtt(&self) -> anyhow::Result<()> {
        let pid = self.signal("mosquitto", "TERM")?;
        self.wait_gone(pid, Duration::from_secs(30))?;
        self.start_missing()
    }

    /// Opens connections straight to PostgreSQL (past PgBouncer) until it refuses one, holds
    /// them, and lets them go. Connections PgBouncer already holds keep working; every new one
    /// (PgBouncer's, the worker's at start-up) is refused meanwhile.
    fn exhaust_postgres(&self) -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start a runtime to hold PostgreSQL's connections")?;
        let url = format!(
            "host=127.0.0.1 port={} user=postgres dbname=telemetry connect_timeout=5",
            self.pg_port
        );
        runtime.block_on(async {
            let mut held = Vec::new();
            let refusal = loop {
                match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                    Ok((client, connection)) => {
                        held.push((client, tokio::spawn(connection)));
                    }
                    Err(error) => break error,
                }
                if held.len() >= 1000 {
                    bail!("PostgreSQL accepted 1000 connections; max_connections is not the limit here");
                }
            };
            eprintln!(
                "chaos: holding {} connections to PostgreSQL; the next was refused: {refusal}",
                held.len()
            );
            tokio::time::sleep(self.holds.exhaust_postgres).await;
            drop(held);
            Ok(())
        })
    }
}

/// A TCP proxy between the clients and Kafka, so a drill can cut the path: every connection
/// closed at once, new ones refused, and later let through again. Clients only ever see the
/// proxy's port (the broker advertises it).
#[derive(Debug)]
pub struct KafkaProxy {
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl KafkaProxy {
    pub fn start(listen_port: u16, upstream_port: u16) -> anyhow::Result<KafkaProxy> {
        let listener = TcpListener::bind(("127.0.0.1", listen_port))
            .with_context(|| format!("cannot listen on 127.0.0.1:{listen_port} for Kafka"))?;
        let proxy = KafkaProxy {
            cut: Arc::new(AtomicBool::new(false)),
            open: Arc::new(Mutex::new(Vec::new())),
        };
        let (cut, open) = (proxy.cut.clone(), proxy.open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if cut.load(Ordering::Acquire) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                if let Ok(mut open) = open.lock() {
                    open.extend(
                        [client.try_clone(), server.try_clone()]
                            .into_iter()
                            .flatten(),
                    );
                }
                pipe(&client, &server);
                pipe(&server, &client);
            }
        });
        Ok(proxy)
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        if let Ok(mut open) = self.open.lock() {
            for stream in open.drain(..) {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::Release);
    }
}

/// Copies `from` to `to` on a thread of its own until either side closes.
fn pipe(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let mut buffer = [0u8; 64 * 1024];
        loop {
            match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buffer[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

/// One look at the pipeline: is every stage ready, and how far behind is it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Probe {
    pub ready: bool,
    /// Records in Kafka not yet stored: the topic's high watermarks (from Tansu's PostgreSQL
    /// storage, which answers them right) minus the worker's `ingest_offsets`. `None` while
    /// either database does not answer.
    pub kafka_lag: Option<f64>,
    /// Messages the bridge holds between the broker and Kafka.
    pub bridge_held: f64,
}

impl Probe {
    pub fn healthy(&self, lag_limit: f64) -> bool {
        self.ready
            && self.kafka_lag.is_some_and(|lag| lag <= lag_limit)
            && self.bridge_held <= lag_limit
    }
}

/// Where the probe looks.
#[derive(Debug, Clone)]
pub struct ProbeTargets {
    pub pipeline_db: String,
    pub kafka_db: String,
    pub worker_http: String,
    pub bridge_http: String,
    pub topic: String,
    /// The worker's consumer group.
    pub group: String,
}

impl ProbeTargets {
    pub fn probe(&self) -> Probe {
        let ready = http_ok(&self.worker_http, "/readyz") && http_ok(&self.bridge_http, "/readyz");
        let topic = self.topic.replace('\'', "''");
        let high = psql_number(
            &self.kafka_db,
            &format!(
                "SELECT coalesce(sum(w.high), 0) FROM watermark w JOIN topition tp ON tp.id = w.topition \
                 JOIN topic t ON t.id = tp.topic WHERE t.name = '{topic}'"
            ),
        );
        let stored = psql_number(
            &self.pipeline_db,
            &format!(
                "SELECT coalesce(sum(next_offset), 0) FROM ingest_offsets WHERE topic = '{topic}'"
            ),
        );
        let bridge_page = metrics_page(&self.bridge_http);
        Probe {
            ready,
            kafka_lag: high
                .zip(stored)
                .map(|(high, stored)| (high - stored).max(0.0)),
            bridge_held: test_servers::metric_value(&bridge_page, "telemetry_bridge_held_messages"),
        }
    }
}

impl ProbeTargets {
    /// Whether Tansu 0.6.0's group coordinator has wedged the worker's group (tansu-broker 0.6.0
    /// `coordinator/group/administrator.rs`); Kafka and Redpanda do neither:
    /// - it is forming a generation whose leader is no longer a member, so no member is ever
    ///   assigned anything (SyncGroup fails while the leader is another member, and nothing
    ///   expires a leader that already left). It follows a member's session expiring while the
    ///   broker was frozen or cut off;
    /// - it is formed with assignments of members that left: a static member that joins again is
    ///   handed its stored assignment, not a new one, so the partitions of replicas that went
    ///   away (scaling down) are consumed by no one.
    pub fn kafka_group_wedged(&self) -> bool {
        let group = self.group.replace('\'', "''");
        psql_number(
            &self.kafka_db,
            &format!(
                "SELECT count(*) FROM consumer_group_detail d JOIN consumer_group g ON g.id = d.consumer_group \
                 WHERE g.name = '{group}' AND ( \
                   (d.detail::jsonb #>> '{{state,Forming,leader}}' IS NOT NULL \
                    AND NOT (d.detail::jsonb -> 'members') ? (d.detail::jsonb #>> '{{state,Forming,leader}}')) \
                   OR EXISTS (SELECT 1 FROM jsonb_object_keys(coalesce(d.detail::jsonb #> '{{state,Formed,assignments}}', '{{}}')) AS owner \
                              WHERE NOT (d.detail::jsonb -> 'members') ? owner))"
            ),
        )
        .is_some_and(|wedged| wedged > 0.0)
    }
}

fn http_ok(addr: &str, path: &str) -> bool {
    let attempt = || -> io::Result<bool> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head)?;
        Ok(head.starts_with(b"HTTP/1.1 200"))
    };
    attempt().unwrap_or(false)
}

fn psql_number(url: &str, sql: &str) -> Option<f64> {
    let output = Command::new("psql")
        .args([url, "-qAtc", sql])
        .env("PGCONNECT_TIMEOUT", "2")
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8_lossy(&output.stdout).trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_one_order_of_every_fault() {
        let first = schedule(7, Fault::ALL.len());
        assert_eq!(first, schedule(7, Fault::ALL.len()));
        let mut sorted: Vec<&str> = first.iter().map(|f| f.name()).collect();
        sorted.sort_unstable();
        let mut all: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
        all.sort_unstable();
        assert_eq!(sorted, all, "every fault exactly once");
        assert_ne!(
            first,
            schedule(8, Fault::ALL.len()),
            "another seed, another order"
        );
        assert_eq!(schedule(7, 3), first[..3]);
    }
}
