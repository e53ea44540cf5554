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
        })
    }

    fn script(&self, args: &[&str]) -> anyhow::Result<()> {
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
