//! What the run shows: a live progress line while it runs, then a summary table and, with
//! `--json`, one JSON object holding every figure.

use std::fmt::{self, Write as _};
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::alerts::AlertVerification;
use crate::config::{Config, Qos};
use crate::fleet::{FleetOutcome, LATE_AFTER};
use crate::payload::AlertPhase;
use crate::stats::{Counters, Outcome, Percentiles};
use crate::verify::Verification;

/// Exit code when verification found lost, duplicated or unexpected rows, or alerts that are
/// missing, duplicated, unexpected, unpublished or not received once.
pub const EXIT_VERIFY_FAILED: u8 = 3;
/// Exit code when messages were not sent or not acknowledged, or a connection failed.
pub const EXIT_INCOMPLETE: u8 = 4;
/// Exit code when the run was interrupted by a signal (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;

/// Share of late sends above which the table warns that the tester, not the system under
/// test, set the pace. A few late sends are timer noise; 1% is a pattern.
const BEHIND_WARNING_SHARE: f64 = 0.01;

/// How often the progress line redraws on a terminal.
const TERMINAL_REFRESH: Duration = Duration::from_millis(200);
/// How often a progress line is printed when stderr is not a terminal (a CI log, a file):
/// often enough to show a run is alive, rarely enough not to flood the log.
const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Every figure of a run. Serialized as the `--json` line; field names are part of the
/// tester's interface, so change them only with the README.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub run_id: String,
    pub users: u64,
    pub devices_per_user: u64,
    pub devices: u64,
    pub connections: usize,
    /// Messages per device per second, as asked.
    pub rate_per_device: f64,
    /// devices x rate_per_device.
    pub target_rate: f64,
    pub qos: u8,
    pub payload_bytes: usize,
    pub messages_per_device: u64,
    pub user_prefix: String,
    pub seq_start: i64,
    /// Messages on the timetable.
    pub planned: u64,
    /// Messages written to a broker connection.
    pub sent: u64,
    /// PUBACKs received; `null` for QoS 0.
    pub acked: Option<u64>,
    /// Sent but never acknowledged; `null` for QoS 0.
    pub unacked: Option<u64>,
    /// Planned but never written (run interrupted, connection lost).
    pub not_sent: u64,
    /// Connection outages (dropped or stalled), one per outage however many reconnection
    /// attempts it took.
    pub errors: u64,
    pub first_error: Option<String>,
    /// Seconds from the first due time to the last write.
    pub duration_s: f64,
    /// sent / duration_s.
    pub publish_rate: f64,
    /// Messages written more than `late_after_ms` after they were due.
    pub late: u64,
    pub late_after_ms: f64,
    /// How far behind its due time each message was written.
    pub behind_schedule_ms: Option<Percentiles>,
    pub behind_schedule_max_ms: f64,
    /// From due time to PUBACK; `null` for QoS 0.
    pub puback_ms: Option<Percentiles>,
    /// Whether --verify ran.
    pub verified: bool,
    /// From due time to the row's `ingested_at`; `null` unless verified.
    pub e2e_ms: Option<Percentiles>,
    /// The verification figures below are `null` unless verified.
    pub expected: Option<u64>,
    pub stored_rows: Option<u64>,
    pub lost: Option<u64>,
    pub duplicated: Option<u64>,
    pub duplicate_rows: Option<u64>,
    pub unexpected: Option<u64>,
    pub unconfirmed_stored: Option<u64>,
    pub unconfirmed_missing: Option<u64>,
    pub lost_examples: Vec<String>,
    pub duplicated_examples: Vec<String>,
    pub unexpected_examples: Vec<String>,
    pub verify_waited_s: Option<f64>,
    pub verify_timed_out: Option<bool>,
    /// Share of readings above the alert threshold, as asked.
    pub alert_fraction: f64,
    /// Whether every device crosses the threshold at its own time or all at once; `null`
    /// without alert readings.
    pub alert_phase: Option<AlertPhase>,
    /// Whether --verify-alerts ran; the alert figures below are `null` unless it did.
    pub alerts_verified: bool,
    pub alert_rule: Option<String>,
    /// From the due time of the reading that raised or cleared an alert to the alert's first
    /// arrival at the subscriber.
    pub alert_ms: Option<Percentiles>,
    /// Alert events the readings must cause.
    pub alerts_expected: Option<u64>,
    /// Rows of the run's users in `alerts`, for the rule.
    pub alerts_stored: Option<u64>,
    pub alerts_missing: Option<u64>,
    pub alerts_duplicated: Option<u64>,
    pub alerts_unexpected: Option<u64>,
    pub alerts_unpublished: Option<u64>,
    pub alerts_received: Option<u64>,
    pub alerts_not_received: Option<u64>,
    pub alerts_received_twice: Option<u64>,
    pub alerts_misdelivered: Option<u64>,
    /// Devices left out of the alert check: some of their readings were never acknowledged.
    pub alerts_unchecked_devices: Option<u64>,
    pub alerts_missing_examples: Vec<String>,
    pub alerts_duplicated_examples: Vec<String>,
    pub alerts_unexpected_examples: Vec<String>,
    pub alerts_not_received_examples: Vec<String>,
    pub alerts_misdelivered_examples: Vec<String>,
    pub alerts_waited_s: Option<f64>,
    pub alerts_timed_out: Option<bool>,
    pub interrupted: bool,
    /// Everything planned was sent and confirmed, no connection failed, and (if verified)
    /// every message is stored exactly once.
    pub passed: bool,
}

impl Report {
    pub fn new(
        config: &Config,
        fleet: &FleetOutcome,
        verification: Option<&Verification>,
        alerts: Option<&AlertVerification>,
    ) -> Report {
        let confirmed: u64 = fleet
            .ledgers
            .iter()
            .map(|l| l.count(Outcome::Confirmed))
            .sum();
        let planned = config.planned_messages();
        let qos1 = config.qos == Qos::AtLeastOnce;
        let duration_s = fleet.publish_elapsed.as_secs_f64();
        let behind = fleet.lag.summary();
        let mut report = Report {
            run_id: config.run_id.clone(),
            users: config.users,
            devices_per_user: config.devices_per_user,
            devices: config.devices(),
            connections: config.connections,
            rate_per_device: config.rate,
            target_rate: config.target_rate(),
            qos: config.qos.level(),
            payload_bytes: config.payload_bytes,
            messages_per_device: config.messages_per_device,
            user_prefix: config.user_prefix.clone(),
            seq_start: config.seq_start,
            planned,
            sent: fleet.sent,
            acked: qos1.then_some(fleet.acked),
            unacked: qos1.then_some(fleet.sent - confirmed),
            not_sent: planned - fleet.sent,
            errors: fleet.errors,
            first_error: fleet.first_error.clone(),
            duration_s,
            publish_rate: if duration_s > 0.0 {
                fleet.sent as f64 / duration_s
            } else {
                0.0
            },
            late: fleet.late,
            late_after_ms: LATE_AFTER.as_secs_f64() * 1000.0,
            behind_schedule_ms: behind,
            behind_schedule_max_ms: behind.map_or(0.0, |b| b.max),
            puback_ms: if qos1 { fleet.puback.summary() } else { None },
            verified: verification.is_some(),
            e2e_ms: None,
            expected: None,
            stored_rows: None,
            lost: None,
            duplicated: None,
            duplicate_rows: None,
            unexpected: None,
            unconfirmed_stored: None,
            unconfirmed_missing: None,
            lost_examples: Vec::new(),
            duplicated_examples: Vec::new(),
            unexpected_examples: Vec::new(),
            verify_waited_s: None,
            verify_timed_out: None,
            alert_fraction: config.alert_fraction,
            alert_phase: (config.alert_fraction > 0.0).then_some(config.alert_phase),
            alerts_verified: alerts.is_some(),
            alert_rule: None,
            alert_ms: None,
            alerts_expected: None,
            alerts_stored: None,
            alerts_missing: None,
            alerts_duplicated: None,
            alerts_unexpected: None,
            alerts_unpublished: None,
            alerts_received: None,
            alerts_not_received: None,
            alerts_received_twice: None,
            alerts_misdelivered: None,
            alerts_unchecked_devices: None,
            alerts_missing_examples: Vec::new(),
            alerts_duplicated_examples: Vec::new(),
            alerts_unexpected_examples: Vec::new(),
            alerts_not_received_examples: Vec::new(),
            alerts_misdelivered_examples: Vec::new(),
            alerts_waited_s: None,
            alerts_timed_out: None,
            interrupted: fleet.interrupted,
            passed: false,
        };
        if let Some(v) = verification {
            report.e2e_ms = v.e2e.summary();
            report.expected = Some(v.expected);
            report.stored_rows = Some(v.stored_rows);
            report.lost = Some(v.lost);
            report.duplicated = Some(v.duplicated);
            report.duplicate_rows = Some(v.duplicate_rows);
            report.unexpected = Some(v.unexpected);
            report.unconfirmed_stored = Some(v.unconfirmed_stored);
            report.unconfirmed_missing = Some(v.unconfirmed_missing);
            report.lost_examples = v.lost_examples.clone();
            report.duplicated_examples = v.duplicated_examples.clone();
            report.unexpected_examples = v.unexpected_examples.clone();
            report.verify_waited_s = Some(v.waited.as_secs_f64());
            report.verify_timed_out = Some(v.timed_out);
        }
        if let Some(a) = alerts {
            report.alert_rule = config.verify_alerts.as_ref().map(|c| c.rule.clone());
            report.alert_ms = a.latency.summary();
            report.alerts_expected = Some(a.expected);
            report.alerts_stored = Some(a.stored);
            report.alerts_missing = Some(a.missing);
            report.alerts_duplicated = Some(a.duplicated);
            report.alerts_unexpected = Some(a.unexpected);
            report.alerts_unpublished = Some(a.unpublished);
            report.alerts_received = Some(a.received);
            report.alerts_not_received = Some(a.not_received);
            report.alerts_received_twice = Some(a.received_twice);
            report.alerts_misdelivered = Some(a.misdelivered);
            report.alerts_unchecked_devices = Some(a.unchecked_devices);
            report.alerts_missing_examples = a.missing_examples.clone();
            report.alerts_duplicated_examples = a.duplicated_examples.clone();
            report.alerts_unexpected_examples = a.unexpected_examples.clone();
            report.alerts_not_received_examples = a.not_received_examples.clone();
            report.alerts_misdelivered_examples = a.misdelivered_examples.clone();
            report.alerts_waited_s = Some(a.waited.as_secs_f64());
            report.alerts_timed_out = Some(a.timed_out);
        }
        report.passed = report.exit_code() == 0;
        report
    }

    fn verification_failed(&self) -> bool {
        let alerts = [
            self.alerts_missing,
            self.alerts_duplicated,
            self.alerts_unexpected,
            self.alerts_unpublished,
            self.alerts_not_received,
            self.alerts_received_twice,
            self.alerts_misdelivered,
        ];
        self.lost.unwrap_or(0)
            + self.duplicated.unwrap_or(0)
            + self.unexpected.unwrap_or(0)
            + alerts.iter().map(|n| n.unwrap_or(0)).sum::<u64>()
            > 0
    }

    fn incomplete(&self) -> bool {
        self.not_sent > 0 || self.unacked.unwrap_or(0) > 0 || self.errors > 0
    }

    /// 0 when the run passed; otherwise the most important reason it did not.
    pub fn exit_code(&self) -> u8 {
        if self.verification_failed() {
            EXIT_VERIFY_FAILED
        } else if self.interrupted {
            EXIT_INTERRUPTED
        } else if self.incomplete() {
            EXIT_INCOMPLETE
        } else {
            0
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a report holds only plain numbers and strings")
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let qos = self.qos;
        writeln!(
            f,
            "run {}: {} users x {} devices = {} devices on {} connections, QoS {qos}",
            self.run_id, self.users, self.devices_per_user, self.devices, self.connections
        )?;
        writeln!(
            f,
            "  target      {:.1} msg/s ({} msg/s per device), {} messages per device, {} planned",
            self.target_rate, self.rate_per_device, self.messages_per_device, self.planned
        )?;
        writeln!(
            f,
            "  sent        {} in {:.2} s = {:.1} msg/s",
            self.sent, self.duration_s, self.publish_rate
        )?;
        let mut line = String::new();
        if let (Some(acked), Some(unacked)) = (self.acked, self.unacked) {
            let _ = write!(line, "acked {acked}, unacked {unacked}, ");
        }
        let _ = write!(
            line,
            "not sent {}, connection errors {}",
            self.not_sent, self.errors
        );
        writeln!(f, "  delivery    {line}")?;
        if let Some(error) = &self.first_error {
            writeln!(f, "  first error {error}")?;
        }
        writeln!(
            f,
            "  late        {} sends more than {} ms behind schedule",
            self.late, self.late_after_ms
        )?;
        if self.sent > 0 && self.late as f64 > self.sent as f64 * BEHIND_WARNING_SHARE {
            writeln!(
                f,
                "  warning     the tester fell behind its timetable ({:.1}% late, up to {:.0} ms); \
                 the load was lower than asked: use a release build, fewer devices per process \
                 or more machines",
                self.late as f64 * 100.0 / self.sent as f64,
                self.behind_schedule_max_ms
            )?;
        }
        writeln!(
            f,
            "  latency (ms)         p50        p90        p99        max"
        )?;
        let row = |f: &mut fmt::Formatter<'_>, name: &str, p: Option<Percentiles>| match p {
            Some(p) => writeln!(
                f,
                "  {name:<15} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
                p.p50, p.p90, p.p99, p.max
            ),
            None => writeln!(f, "  {name:<15} {:>10}", "-"),
        };
        row(f, "behind schedule", self.behind_schedule_ms)?;
        if self.qos == 1 {
            row(f, "puback", self.puback_ms)?;
        }
        if self.verified {
            row(f, "end to end", self.e2e_ms)?;
        }
        if self.alerts_verified {
            row(f, "alert", self.alert_ms)?;
        }
        if self.verified {
            writeln!(
                f,
                "  verify      {} expected, {} rows stored: lost {}, duplicated {}, unexpected {} (waited {:.1} s{})",
                self.expected.unwrap_or(0),
                self.stored_rows.unwrap_or(0),
                self.lost.unwrap_or(0),
                self.duplicated.unwrap_or(0),
                self.unexpected.unwrap_or(0),
                self.verify_waited_s.unwrap_or(0.0),
                if self.verify_timed_out == Some(true) { ", timed out" } else { "" },
            )?;
            if self.unconfirmed_stored.unwrap_or(0) + self.unconfirmed_missing.unwrap_or(0) > 0 {
                writeln!(
                    f,
                    "              unacknowledged messages: {} stored, {} missing (allowed)",
                    self.unconfirmed_stored.unwrap_or(0),
                    self.unconfirmed_missing.unwrap_or(0)
                )?;
            }
            for (kind, examples) in [
                ("lost", &self.lost_examples),
                ("duplicated", &self.duplicated_examples),
                ("unexpected", &self.unexpected_examples),
            ] {
                if !examples.is_empty() {
                    writeln!(f, "  {kind:<11} e.g. {}", examples.join(", "))?;
                }
            }
        }
        if self.alerts_verified {
            let n = |x: Option<u64>| x.unwrap_or(0);
            writeln!(
                f,
                "  alerts      {} expected ('{}'), {} stored: missing {}, duplicated {}, unexpected {}, unpublished {} (waited {:.1} s{})",
                n(self.alerts_expected),
                self.alert_rule.as_deref().unwrap_or(""),
                n(self.alerts_stored),
                n(self.alerts_missing),
                n(self.alerts_duplicated),
                n(self.alerts_unexpected),
                n(self.alerts_unpublished),
                self.alerts_waited_s.unwrap_or(0.0),
                if self.alerts_timed_out == Some(true) { ", timed out" } else { "" },
            )?;
            writeln!(
                f,
                "              received {}: not received {}, received twice {}, misdelivered {}",
                n(self.alerts_received),
                n(self.alerts_not_received),
                n(self.alerts_received_twice),
                n(self.alerts_misdelivered),
            )?;
            if n(self.alerts_unchecked_devices) > 0 {
                writeln!(
                    f,
                    "              {} devices left out: some of their readings were never acknowledged",
                    n(self.alerts_unchecked_devices)
                )?;
            }
            for (kind, examples) in [
                ("missing", &self.alerts_missing_examples),
                ("duplicated", &self.alerts_duplicated_examples),
                ("unexpected", &self.alerts_unexpected_examples),
                ("not received", &self.alerts_not_received_examples),
                ("misdelivered", &self.alerts_misdelivered_examples),
            ] {
                if !examples.is_empty() {
                    writeln!(f, "  alert {kind:<13} e.g. {}", examples.join(", "))?;
                }
            }
        }
        let verdict = match self.exit_code() {
            0 => "PASS",
            EXIT_VERIFY_FAILED => {
                "FAIL: the pipeline lost, duplicated or invented messages or alerts"
            }
            EXIT_INTERRUPTED => "INTERRUPTED: the timetable was cut short",
            _ => "INCOMPLETE: not every message was sent and acknowledged",
        };
        writeln!(f, "  result      {verdict}")
    }
}

/// The live progress display. On a terminal it is a redrawn bar; elsewhere a plain line every
/// few seconds, which reads well in CI logs.
#[derive(Debug)]
pub struct Progress {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Progress {
    pub fn start(counters: Arc<Counters>, planned: u64) -> Progress {
        let (stop, mut stopped) = oneshot::channel();
        let terminal = std::io::stderr().is_terminal();
        let task = tokio::spawn(async move {
            let bar = terminal.then(|| {
                let bar =
                    ProgressBar::with_draw_target(Some(planned), ProgressDrawTarget::stderr());
                let style =
                    ProgressStyle::with_template("{elapsed_precise} [{bar:20}] {pos}/{len}  {msg}")
                        .map(|s| s.progress_chars("=> "))
                        .unwrap_or_else(|_| ProgressStyle::default_bar());
                bar.set_style(style);
                bar
            });
            let interval = if terminal {
                TERMINAL_REFRESH
            } else {
                LOG_INTERVAL
            };
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = (Instant::now(), 0u64);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = ticker.tick() => {}
                }
                let sent = Counters::get(&counters.sent);
                let now = Instant::now();
                let elapsed = now.duration_since(last.0).as_secs_f64();
                let rate = if elapsed > 0.0 {
                    (sent - last.1) as f64 / elapsed
                } else {
                    0.0
                };
                // A rate over 200 ms jumps around; smooth it over a second on the terminal.
                let window = if terminal {
                    Duration::from_secs(1)
                } else {
                    Duration::ZERO
                };
                if now.duration_since(last.0) >= window {
                    last = (now, sent);
                }
                let status = format!(
                    "{rate:.0} msg/s, acked {}, late {}, errors {}",
                    Counters::get(&counters.acked),
                    Counters::get(&counters.late),
                    Counters::get(&counters.errors)
                );
                match &bar {
                    Some(bar) => {
                        bar.set_position(sent);
                        bar.set_message(status);
                    }
                    None if sent > 0 => eprintln!("progress: sent {sent}/{planned}, {status}"),
                    None => {}
                }
            }
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
        });
        Progress { stop, task }
    }

    /// Stops and clears the display.
    pub async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}
