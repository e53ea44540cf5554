//! The alert check against the `alerts` table and the subscriber's receipts.
//!
//! Scope: rows of the run's users for the checked rule. [`preflight`] refuses to start a run
//! whose scope already holds alerts (they would read as duplicates or strangers). [`verify`]
//! polls until every expected event is stored, published and received, or the timeout passes,
//! then [`compare`] judges, per expected event:
//!
//! - stored: exactly once (no row is **missing**, none **duplicated**);
//! - published: `published_at` set (else **unpublished**);
//! - received: at least once on `users/{user}/devices/{device}/alerts` (else **not received**),
//!   and not more than once (else **received twice**).
//!
//! Rows that match no expected event are **unexpected** (an extra raise would be a flapping
//! alert), and messages that match no row of the run, or arrived on another device's topic, are
//! **misdelivered**. Only unnamed statements are used, so PgBouncer in transaction mode works.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use telemetry_core::Shutdown;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};

use super::{AlertExpectation, EventKind, Receipt, Receipts};
use crate::stats::Latency;
use crate::verify::{connect, VerifyError, EXAMPLES};

/// How often to look at the table and the receipts while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Alerts already in the run's scope before it starts.
const COUNT_IN_SCOPE: &str = "SELECT count(*) FROM alerts WHERE user_id = ANY($1) AND rule = $2";

/// Every alert in the run's scope. `occurred_at` is the reading's `ts`, a whole millisecond.
const STORED_ALERTS: &str = "SELECT alert_id, event, user_id, device_id, \
     round(extract(epoch FROM occurred_at) * 1000)::int8, published_at IS NOT NULL \
     FROM alerts WHERE user_id = ANY($1) AND rule = $2 ORDER BY id";

/// One row of `alerts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAlert {
    pub alert_id: String,
    pub event: String,
    pub user: String,
    pub device: String,
    pub occurred_at_ms: i64,
    pub published: bool,
}

/// The result of the alert check.
#[derive(Debug, Clone)]
pub struct AlertVerification {
    /// Events the readings must cause.
    pub expected: u64,
    /// Rows in the run's scope.
    pub stored: u64,
    /// Expected events without a row.
    pub missing: u64,
    /// Expected events with more than one row.
    pub duplicated: u64,
    /// Rows of the run that match no expected event.
    pub unexpected: u64,
    /// Expected events whose row has no `published_at`.
    pub unpublished: u64,
    /// Expected events that the subscriber received.
    pub received: u64,
    /// Stored expected events that the subscriber never received.
    pub not_received: u64,
    /// Expected events that the subscriber received more than once.
    pub received_twice: u64,
    /// Messages that match no row of the run, or arrived on a topic other than their device's.
    pub misdelivered: u64,
    /// Devices left out because some of their readings were never acknowledged.
    pub unchecked_devices: u64,
    pub missing_examples: Vec<String>,
    pub duplicated_examples: Vec<String>,
    pub unexpected_examples: Vec<String>,
    pub not_received_examples: Vec<String>,
    pub misdelivered_examples: Vec<String>,
    /// From the crossing reading's due time to the first arrival of its alert.
    pub latency: Latency,
    /// How long the check waited for the alerts.
    pub waited: Duration,
    /// The wait ended at the timeout (or on shutdown) with alerts outstanding.
    pub timed_out: bool,
}

impl AlertVerification {
    /// Every expected alert stored once, published and received once; nothing else.
    pub fn passed(&self) -> bool {
        self.missing
            + self.duplicated
            + self.unexpected
            + self.unpublished
            + self.not_received
            + self.received_twice
            + self.misdelivered
            == 0
    }

    /// Nothing is outstanding any more: waiting longer cannot change the verdict.
    fn complete(&self) -> bool {
        self.missing == 0 && self.unpublished == 0 && self.not_received == 0
    }
}

fn query_error(error: tokio_postgres::Error) -> VerifyError {
    match error.code() {
        Some(code) if *code == SqlState::UNDEFINED_TABLE => VerifyError::MissingAlertsTable,
        _ => VerifyError::QueryAlerts(error),
    }
}

/// Fails if the run's scope already holds alerts, before anything is published.
pub async fn preflight(
    database_url: &str,
    users: &[String],
    rule: &str,
    run_id: &str,
) -> Result<(), VerifyError> {
    let client = connect(database_url).await?;
    let users = users.to_vec();
    let rule = rule.to_owned();
    let params: [(&(dyn ToSql + Sync), Type); 2] =
        [(&users, Type::TEXT_ARRAY), (&rule, Type::TEXT)];
    let rows = client
        .query_typed(COUNT_IN_SCOPE, &params)
        .await
        .map_err(query_error)?;
    let alerts: i64 = rows.first().map(|row| row.get(0)).unwrap_or(0);
    if alerts > 0 {
        return Err(VerifyError::AlertsScopeNotEmpty {
            alerts,
            rule,
            first_user: users[0].clone(),
            last_user: users[users.len() - 1].clone(),
            run_id: run_id.to_owned(),
        });
    }
    Ok(())
}

/// Waits (up to `timeout`, or until shutdown) until every expected alert is stored, published
/// and received, then compares.
pub async fn verify(
    database_url: &str,
    expectation: &AlertExpectation,
    receipts: &Receipts,
    timeout: Duration,
    shutdown: &Shutdown,
) -> Result<AlertVerification, VerifyError> {
    let client = connect(database_url).await?;
    let users = expectation.users().to_vec();
    let rule = expectation.rule().to_owned();
    let params: [(&(dyn ToSql + Sync), Type); 2] =
        [(&users, Type::TEXT_ARRAY), (&rule, Type::TEXT)];

    let started = Instant::now();
    let deadline = started + timeout;
    loop {
        let rows = client
            .query_typed(STORED_ALERTS, &params)
            .await
            .map_err(query_error)?;
        let stored = rows.iter().map(|row| StoredAlert {
            alert_id: row.get(0),
            event: row.get(1),
            user: row.get(2),
            device: row.get(3),
            occurred_at_ms: row.get(4),
            published: row.get(5),
        });
        let mut verification = compare(expectation, stored, &receipts.snapshot());
        let now = Instant::now();
        let out_of_time = now >= deadline || shutdown.is_triggered();
        if verification.complete() || out_of_time {
            verification.waited = started.elapsed();
            verification.timed_out = !verification.complete();
            return Ok(verification);
        }
        tokio::select! {
            _ = shutdown.wait() => {}
            _ = tokio::time::sleep(POLL_INTERVAL.min(deadline - now)) => {}
        }
    }
}

/// The judgement itself, apart from the database, so it reads as the rules it applies.
pub fn compare(
    expectation: &AlertExpectation,
    stored: impl Iterator<Item = StoredAlert>,
    receipts: &[Receipt],
) -> AlertVerification {
    let events = expectation.events();
    let mut v = AlertVerification {
        expected: events.len() as u64,
        stored: 0,
        missing: 0,
        duplicated: 0,
        unexpected: 0,
        unpublished: 0,
        received: 0,
        not_received: 0,
        received_twice: 0,
        misdelivered: 0,
        unchecked_devices: expectation.unchecked_devices(),
        missing_examples: Vec::new(),
        duplicated_examples: Vec::new(),
        unexpected_examples: Vec::new(),
        not_received_examples: Vec::new(),
        misdelivered_examples: Vec::new(),
        latency: Latency::default(),
        waited: Duration::ZERO,
        timed_out: false,
    };
    fn example(examples: &mut Vec<String>, text: impl FnOnce() -> String) {
        if examples.len() < EXAMPLES {
            examples.push(text());
        }
    }

    let by_reading: HashMap<(usize, EventKind, i64), usize> = events
        .iter()
        .enumerate()
        .map(|(i, e)| ((e.device, e.kind, e.occurred_at_ms), i))
        .collect();
    // Per expected event, the rows that match it.
    let mut rows_of: Vec<Vec<StoredAlert>> = vec![Vec::new(); events.len()];
    // (alert_id, event) of every row of the run -> its topic, for the receipts.
    let mut topic_of: HashMap<(String, String), String> = HashMap::new();
    for row in stored {
        v.stored += 1;
        let device = expectation.index(&row.user, &row.device);
        topic_of.insert(
            (row.alert_id.clone(), row.event.clone()),
            format!("users/{}/devices/{}/alerts", row.user, row.device),
        );
        if device.is_some_and(|d| expectation.is_unchecked(d)) {
            continue;
        }
        let matched = device
            .zip(EventKind::parse(&row.event))
            .and_then(|(d, kind)| by_reading.get(&(d, kind, row.occurred_at_ms)));
        match matched {
            Some(&i) => rows_of[i].push(row),
            None => {
                v.unexpected += 1;
                example(&mut v.unexpected_examples, || {
                    format!(
                        "{}/{} {} at {} ms (no reading of the run {} there)",
                        row.user,
                        row.device,
                        row.event,
                        row.occurred_at_ms,
                        match EventKind::parse(&row.event) {
                            Some(EventKind::Raised) => "raises",
                            _ => "clears",
                        }
                    )
                });
            }
        }
    }

    // Receipts by (alert_id, event); each checked against the topic of its row.
    let mut arrivals: HashMap<(&str, &str), Vec<SystemTime>> = HashMap::new();
    for receipt in receipts {
        let key = (receipt.alert_id.clone(), receipt.event.clone());
        match topic_of.get(&key) {
            Some(topic) if *topic == receipt.topic => arrivals
                .entry((receipt.alert_id.as_str(), receipt.event.as_str()))
                .or_default()
                .push(receipt.at),
            Some(topic) => {
                v.misdelivered += 1;
                example(&mut v.misdelivered_examples, || {
                    format!(
                        "alert {} {} for {topic} arrived on {}",
                        receipt.alert_id, receipt.event, receipt.topic
                    )
                });
            }
            None => {
                v.misdelivered += 1;
                example(&mut v.misdelivered_examples, || {
                    format!(
                        "alert '{}' '{}' on {} is not stored for this run",
                        receipt.alert_id, receipt.event, receipt.topic
                    )
                });
            }
        }
    }

    for (i, event) in events.iter().enumerate() {
        let rows = &rows_of[i];
        match rows.len() {
            0 => {
                v.missing += 1;
                example(&mut v.missing_examples, || expectation.name(event));
                continue;
            }
            1 => {}
            n => {
                v.duplicated += 1;
                example(&mut v.duplicated_examples, || {
                    format!("{} (stored {n} times)", expectation.name(event))
                });
            }
        }
        if rows.iter().any(|row| !row.published) {
            v.unpublished += 1;
        }
        let mut times: Vec<SystemTime> = rows
            .iter()
            .flat_map(|row| {
                arrivals
                    .get(&(row.alert_id.as_str(), row.event.as_str()))
                    .into_iter()
                    .flatten()
                    .copied()
            })
            .collect();
        times.sort();
        match times.first() {
            None => {
                v.not_received += 1;
                example(&mut v.not_received_examples, || expectation.name(event));
            }
            Some(first) => {
                v.received += 1;
                let due = SystemTime::UNIX_EPOCH + event.due;
                v.latency
                    .record(first.duration_since(due).unwrap_or_default());
                // A duplicated row is already reported; its second message is not news.
                if times.len() > rows.len() {
                    v.received_twice += 1;
                }
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Ledger;

    /// One user, two devices, 8 readings each at 0.25: dev-1 and dev-2 each raise at reading 3,
    /// clear at 4 and raise at 7. Reading k of device g is due at 10 s + k x 100 ms + g ms.
    fn expectation() -> AlertExpectation {
        AlertExpectation::new(
            vec!["u1".into()],
            vec!["dev-1".into(), "dev-2".into()],
            0,
            "high-temperature".into(),
            crate::payload::AlertPlan::aligned(0.25),
            &[Ledger::confirmed(8), Ledger::confirmed(8)],
            |g, k| Duration::from_millis(10_000 + 100 * k + g as u64),
        )
    }

    fn row(device: usize, k: u64, event: &str) -> StoredAlert {
        StoredAlert {
            alert_id: format!("a{device}-{k}"),
            event: event.into(),
            user: "u1".into(),
            device: format!("dev-{}", device + 1),
            occurred_at_ms: (10_000 + 100 * k + device as u64) as i64,
            published: true,
        }
    }

    /// The rows the pipeline should store, and their messages arriving `after` the reading.
    fn everything(after: Duration) -> (Vec<StoredAlert>, Vec<Receipt>) {
        let rows: Vec<StoredAlert> = (0..2)
            .flat_map(|d| {
                [
                    row(d, 3, "raised"),
                    row(d, 4, "cleared"),
                    row(d, 7, "raised"),
                ]
            })
            .collect();
        let receipts = rows.iter().map(|r| receipt(r, after)).collect();
        (rows, receipts)
    }

    fn receipt(row: &StoredAlert, after: Duration) -> Receipt {
        Receipt {
            topic: format!("users/{}/devices/{}/alerts", row.user, row.device),
            alert_id: row.alert_id.clone(),
            event: row.event.clone(),
            at: SystemTime::UNIX_EPOCH + Duration::from_millis(row.occurred_at_ms as u64) + after,
        }
    }

    #[test]
    fn every_alert_stored_published_and_received_once_passes_with_its_latency() {
        let (rows, receipts) = everything(Duration::from_millis(30));
        let v = compare(&expectation(), rows.into_iter(), &receipts);
        assert!(v.passed() && v.complete(), "{v:?}");
        assert_eq!((v.expected, v.stored, v.received), (6, 6, 6));
        let latency = v.latency.summary().unwrap();
        assert!((latency.p50 - 30.0).abs() < 0.1, "{latency:?}");
    }

    #[test]
    fn missing_duplicated_and_flapping_alerts_are_counted_and_named() {
        let (mut rows, receipts) = everything(Duration::from_millis(5));
        rows.retain(|r| !(r.device == "dev-2" && r.event == "cleared"));
        let mut copy = row(0, 7, "raised");
        copy.alert_id = "another-id".into();
        rows.push(copy);
        // A raise at reading 5, which is not an alert reading: the rule flapped.
        rows.push(row(1, 5, "raised"));
        let v = compare(&expectation(), rows.into_iter(), &receipts);
        assert!(!v.passed());
        assert_eq!((v.missing, v.duplicated, v.unexpected), (1, 1, 1), "{v:?}");
        assert_eq!(v.missing_examples, ["u1/dev-2 seq 4 cleared"]);
        assert_eq!(
            v.duplicated_examples,
            ["u1/dev-1 seq 7 raised (stored 2 times)"]
        );
        assert_eq!(
            v.unexpected_examples,
            ["u1/dev-2 raised at 10501 ms (no reading of the run raises there)"]
        );
        // The receipt of the deleted row no longer matches anything stored.
        assert_eq!(v.misdelivered, 1, "{v:?}");
    }

    #[test]
    fn unpublished_unreceived_repeated_and_misrouted_messages_fail_the_check() {
        let (mut rows, mut receipts) = everything(Duration::from_millis(5));
        rows[0].published = false;
        receipts.retain(|r| r.alert_id != "a0-4");
        receipts.push(receipts[0].clone());
        let mut stray = receipts[1].clone();
        stray.topic = "users/u1/devices/dev-2/alerts".into();
        receipts.push(stray);
        let v = compare(&expectation(), rows.into_iter(), &receipts);
        assert_eq!(
            (
                v.unpublished,
                v.not_received,
                v.received_twice,
                v.misdelivered
            ),
            (1, 1, 1, 1),
            "{v:?}"
        );
        assert_eq!(v.not_received_examples, ["u1/dev-1 seq 4 cleared"]);
        assert!(!v.passed() && !v.complete());
    }
}
