//! The local stack (`scripts/stack.sh`) and the `load-tester` binary, as the end-to-end
//! benchmarks (`bench_e2e`, `bench_alerts`) drive them.
//!
//! The benchmarks measure the whole pipeline as users run it without Docker: release builds of
//! the bridge, the worker and the API next to Mosquitto (per-user logins and ACL), Tansu,
//! PgBouncer and PostgreSQL, all on this machine. Load comes from the load-tester binary, whose
//! last line of stdout (`--json`) carries every figure.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

/// The devices' MQTT logins on the stack (`scripts/stack.sh users`).
pub const CREDENTIALS: &str = "{user}:secret-{user}";

/// The running local stack: where its scripts, binaries and data are, and its ports (the same
/// environment variables as `scripts/stack.sh`, with the same defaults).
#[derive(Debug, Clone)]
pub struct LocalStack {
    /// The workspace root.
    pub root: PathBuf,
    /// Release binaries: the directory the benchmark itself runs from.
    pub bin_dir: PathBuf,
    /// `STACK_DIR`: data and logs; benchmark results are kept here until `make down`.
    pub dir: PathBuf,
    pub mqtt_port: u16,
    /// PostgreSQL directly (not PgBouncer), where the load-tester checks rows and alerts.
    pub database_url: String,
    /// The bridge's and the worker's /metrics servers.
    pub bridge_http: String,
    pub worker_http: String,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

impl LocalStack {
    pub fn from_env() -> anyhow::Result<LocalStack> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("the benchmarks crate lives in the workspace root")?
            .to_path_buf();
        let exe = std::env::current_exe().context("cannot find the benchmark's own binary")?;
        let bin_dir = exe
            .parent()
            .context("the benchmark binary has no directory")?
            .to_path_buf();
        let pg_port = env_or("PG_PORT", "55432");
        Ok(LocalStack {
            root,
            bin_dir,
            dir: PathBuf::from(env_or("STACK_DIR", "/tmp/telemetry-pipeline-stack")),
            mqtt_port: env_or("MQTT_PORT", "51883")
                .parse()
                .context("MQTT_PORT is not a port number")?,
            database_url: format!("postgres://postgres@127.0.0.1:{pg_port}/telemetry"),
            bridge_http: env_or("BRIDGE_HTTP", "127.0.0.1:9102"),
            worker_http: env_or("WORKER_HTTP", "127.0.0.1:9101"),
        })
    }

    /// Runs `scripts/stack.sh` with `args` (its progress lines go to stderr).
    pub fn script(&self, args: &[&str]) -> anyhow::Result<()> {
        let status = Command::new(self.root.join("scripts/stack.sh"))
            .args(args)
            .env("BIN_DIR", &self.bin_dir)
            // Its progress lines go with the benchmark's own commentary, on stderr, so that
            // stdout ends with the benchmark's JSON line.
            .stdout(Stdio::from(std::io::stderr()))
            .status()
            .context("cannot run scripts/stack.sh")?;
        if !status.success() {
            bail!("scripts/stack.sh {} failed ({status})", args.join(" "));
        }
        Ok(())
    }

    /// Starts whatever part of the stack is not running (`scripts/stack.sh up`).
    pub fn up(&self) -> anyhow::Result<()> {
        for binary in [
            "telemetry-worker",
            "telemetry-bridge",
            "telemetry-api",
            "load-tester",
        ] {
            if !self.bin_dir.join(binary).exists() {
                bail!(
                    "{} is missing: cargo build --release -p telemetry-worker -p telemetry-bridge \
                     -p telemetry-api -p load-tester",
                    self.bin_dir.join(binary).display()
                );
            }
        }
        self.script(&["up"])
    }

    /// Restarts Tansu with empty topics, and the stages that use it (`scripts/stack.sh
    /// fresh-kafka`). Tansu's memory storage slows down as it fills up, which would make each
    /// step of a benchmark pay for the ones before it.
    pub fn fresh_kafka(&self) -> anyhow::Result<()> {
        self.script(&["fresh-kafka"])
    }

    /// Sends a few readings per device through the pipeline and waits until they are stored.
    /// A pipeline that just started still looks up topics and joins its consumer group, which
    /// would otherwise land on the first messages measured.
    pub fn warm_up(
        &self,
        users: u64,
        devices_per_user: u64,
        prefix: &str,
        seq_start: i64,
    ) -> anyhow::Result<()> {
        let flags: Vec<String> = [
            "--users",
            &users.to_string(),
            "--devices-per-user",
            &devices_per_user.to_string(),
            "--rate",
            "1",
            "--duration",
            "3s",
            "--user-prefix",
            prefix,
            "--seq-start",
            &seq_start.to_string(),
            "--verify",
            "--verify-timeout",
            "60s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let run = self.load_test(&flags)?;
        if run.exit_code != 0 {
            bail!(
                "the warm-up run failed (load-tester exit {}):\n{}",
                run.exit_code,
                run.stderr
            );
        }
        Ok(())
    }

    /// Adds the MQTT logins `{prefix}1..{prefix}{count}` (password `secret-<user>`).
    pub fn add_users(&self, prefix: &str, count: u64) -> anyhow::Result<()> {
        self.script(&["users", prefix, &count.to_string()])
    }

    /// Runs the load-tester against the stack with per-user logins and `args`, and returns its
    /// JSON report. A run that verified and failed is a result, not an error; a run that could
    /// not report (broker or database unreachable, bad flags) is an error with its stderr.
    pub fn load_test(&self, args: &[String]) -> anyhow::Result<LoadRun> {
        let port = self.mqtt_port.to_string();
        let output = Command::new(self.bin_dir.join("load-tester"))
            .args(["--mqtt-host", "127.0.0.1", "--mqtt-port", &port])
            .args(["--mqtt-credentials-per-user", CREDENTIALS])
            .args(["--database-url", &self.database_url, "--json"])
            .args(args)
            .env_remove("DATABASE_URL")
            .output()
            .context("cannot run the load-tester")?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let report = stdout
            .lines()
            .last()
            .and_then(|line| serde_json::from_str::<Value>(line).ok());
        match report {
            Some(report) => Ok(LoadRun {
                report,
                exit_code: output.status.code().unwrap_or(-1),
                stderr,
            }),
            None => bail!(
                "the load-tester gave no report ({}):\n{stderr}",
                output.status
            ),
        }
    }

    /// Waits until the rows of users `{prefix}*` stop growing, so that a backlog left by an
    /// overloaded run does not slow the next one. Gives up after `limit`.
    pub fn wait_until_drained(&self, prefix: &str, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        let mut last = None;
        while Instant::now() < deadline {
            let rows = self.psql(&format!(
                "SELECT count(*) FROM raw_telemetry WHERE starts_with(user_id, '{}')",
                prefix.replace('\'', "''")
            ))?;
            if last.as_deref() == Some(rows.as_str()) {
                return Ok(());
            }
            last = Some(rows);
            std::thread::sleep(Duration::from_secs(3));
        }
        Ok(())
    }

    fn psql(&self, sql: &str) -> anyhow::Result<String> {
        let output = Command::new("psql")
            .args([&self.database_url, "-qAtc", sql])
            .output()
            .context("cannot run psql")?;
        if !output.status.success() {
            bail!(
                "psql failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// The sustained fleet rate: `given`, else the last `bench_e2e` result on this stack, which
    /// is measured first when there is none. `who` names the benchmark in its commentary.
    pub fn sustained_rate(&self, given: Option<f64>, who: &str) -> anyhow::Result<f64> {
        if let Some(rate) = given {
            return Ok(rate);
        }
        let saved = || {
            self.saved_result("e2e")
                .and_then(|line| line["sustained_msgs_per_s"].as_f64())
        };
        if let Some(rate) = saved() {
            println!(
                "{who}: sustained rate {rate:.0} msg/s from {}",
                self.result_path("e2e").display()
            );
            return Ok(rate);
        }
        println!("{who}: no sustained rate measured yet on this stack; running bench_e2e first");
        let status = Command::new(self.bin_dir.join("bench_e2e"))
            // Its lines, JSON included, are commentary here; stdout ends with the caller's line.
            .stdout(Stdio::from(std::io::stderr()))
            .status()
            .context(
                "cannot run bench_e2e (cargo build --release -p benchmarks --bin bench_e2e)",
            )?;
        if !status.success() {
            bail!("bench_e2e failed ({status})");
        }
        saved().context("bench_e2e left no result")
    }

    /// Where a benchmark keeps its last JSON line for the others (until `make down`).
    pub fn result_path(&self, bench: &str) -> PathBuf {
        self.dir.join(format!("bench-{bench}.json"))
    }

    pub fn save_result(&self, bench: &str, line: &Value) -> anyhow::Result<()> {
        std::fs::write(self.result_path(bench), format!("{line}\n"))
            .with_context(|| format!("cannot write {}", self.result_path(bench).display()))
    }

    pub fn saved_result(&self, bench: &str) -> Option<Value> {
        let text = std::fs::read_to_string(self.result_path(bench)).ok()?;
        serde_json::from_str(text.trim()).ok()
    }
}

/// What the pipeline holds between the devices' PUBACKs and the worker: the messages Mosquitto
/// stores (its `$SYS` count, exported by the bridge), those the bridge holds, and the worker's
/// consumer lag. Sampled once a second in the background until [`BacklogSampler::stop`].
#[derive(Debug)]
pub struct BacklogSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<BacklogSample>>,
}

#[derive(Debug, Clone, Copy)]
pub struct BacklogSample {
    /// Seconds since sampling started.
    pub at_s: f64,
    pub broker: f64,
    pub bridge_held: f64,
    pub kafka_lag: f64,
    /// The bridge's reconnects so far.
    pub bridge_reconnects: f64,
    /// The bridge's resident memory, from /proc, in MB.
    pub bridge_rss_mb: f64,
    /// Mosquitto's resident memory, in MB: with the stored count, what a queued message costs.
    pub broker_rss_mb: f64,
}

impl BacklogSample {
    pub fn total(&self) -> f64 {
        self.broker + self.bridge_held + self.kafka_lag
    }
}

impl BacklogSampler {
    pub fn start(stack: &LocalStack) -> BacklogSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (bridge, worker) = (stack.bridge_http.clone(), stack.worker_http.clone());
        let pid = |name: &str| {
            std::fs::read_to_string(stack.dir.join(format!("{name}.pid")))
                .ok()
                .and_then(|pid| pid.trim().parse::<u32>().ok())
        };
        let (bridge_pid, broker_pid) = (pid("telemetry-bridge"), pid("mosquitto"));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut samples = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::Acquire) {
                let bridge_page = metrics_page(&bridge);
                let worker_page = metrics_page(&worker);
                samples.push(BacklogSample {
                    at_s: started.elapsed().as_secs_f64(),
                    broker: test_servers::metric_value(
                        &bridge_page,
                        "telemetry_bridge_broker_messages_stored",
                    ),
                    bridge_held: test_servers::metric_value(
                        &bridge_page,
                        "telemetry_bridge_held_messages",
                    ),
                    kafka_lag: test_servers::metric_value(
                        &worker_page,
                        "telemetry_worker_consumer_lag",
                    ),
                    bridge_reconnects: test_servers::metric_value(
                        &bridge_page,
                        "telemetry_bridge_mqtt_reconnects_total",
                    ),
                    bridge_rss_mb: bridge_pid.map_or(0.0, rss_mb),
                    broker_rss_mb: broker_pid.map_or(0.0, rss_mb),
                });
                std::thread::sleep(Duration::from_secs(1));
            }
            samples
        });
        BacklogSampler { stop, thread }
    }

    pub fn stop(self) -> Vec<BacklogSample> {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.thread.join().unwrap_or_default()
    }
}

/// How much the backlog grew over the second half of `[0, until_s]`: the mean of the last
/// quarter minus the mean of the third quarter, so one noisy sample decides nothing. Positive
/// when it grew.
pub fn backlog_growth(samples: &[BacklogSample], until_s: f64) -> f64 {
    let mean = |from: f64, to: f64| {
        let window: Vec<f64> = samples
            .iter()
            .filter(|s| s.at_s >= from && s.at_s < to)
            .map(BacklogSample::total)
            .collect();
        window.iter().sum::<f64>() / window.len().max(1) as f64
    };
    mean(0.75 * until_s, until_s) - mean(0.5 * until_s, 0.75 * until_s)
}

/// The Prometheus page at `addr`, or empty when it does not answer.
pub fn metrics_page(addr: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return String::new();
    }
    let mut page = String::new();
    let _ = stream.read_to_string(&mut page);
    page
}

/// A process's resident memory in MB, from /proc; 0 when it is gone.
pub fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// One load-tester run.
#[derive(Debug, Clone)]
pub struct LoadRun {
    /// The `--json` report.
    pub report: Value,
    pub exit_code: i32,
    /// The summary table and progress lines.
    pub stderr: String,
}

impl LoadRun {
    /// A number from the report; 0 when absent or null.
    pub fn number(&self, field: &str) -> f64 {
        self.report[field].as_f64().unwrap_or(0.0)
    }

    /// A percentile (`p50`, `p90`, `p99`, `max`) of a latency in the report, in ms.
    pub fn latency(&self, field: &str, percentile: &str) -> Option<f64> {
        self.report[field][percentile].as_f64()
    }
}

/// Rounds to two decimals, for JSON figures that are read by people.
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}
