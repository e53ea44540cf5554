//! Checks that the pipeline stored every message exactly once, and measures end-to-end latency.
//!
//! The check is scoped to this run: rows of the run's users (`<user-prefix>1..N`) whose `seq`
//! lies within the range the run sent, plus rows of those users without a `seq`. Within that
//! scope, every message the broker confirmed must be stored exactly once, a message written
//! but never acknowledged at most once, and nothing else may be there. [`preflight`] refuses to
//! start a run whose scope already holds rows, because earlier rows would read as duplicates.
//!
//! End-to-end latency is `ingested_at - device_time` of the first stored copy: the payload's
//! `ts` is the time the message was due, so this is the full path from the device's timetable
//! to a committed row, on the clocks of the tester and the database (keep them in sync).
//!
//! Only unnamed statements are used (`query_typed`), so the check works through PgBouncer in
//! transaction mode, which cannot keep named prepared statements across transactions.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use telemetry_core::Shutdown;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls};

use crate::config::Config;
use crate::stats::{Latency, Ledger, Outcome};

/// How many examples of each kind of mismatch the report names.
pub const EXAMPLES: usize = 5;

/// How often to count the stored rows while waiting for them.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Distinct messages of the run that are stored, whatever their copies.
const COUNT_PRESENT: &str =
    "SELECT count(*) FROM (SELECT DISTINCT user_id, device_id, seq FROM raw_telemetry \
     WHERE user_id = ANY($1) AND seq BETWEEN $2 AND $3) AS present";

/// Every stored message of the run with its number of copies and the latency of the first.
const STORED_MESSAGES: &str = "SELECT user_id, device_id, seq, count(*), \
     (extract(epoch FROM min(ingested_at) - min(device_time)) * 1000)::float8 \
     FROM raw_telemetry WHERE user_id = ANY($1) AND (seq IS NULL OR seq BETWEEN $2 AND $3) \
     GROUP BY user_id, device_id, seq";

/// Rows already in the run's scope before it starts.
const COUNT_IN_SCOPE: &str =
    "SELECT count(*) FROM raw_telemetry WHERE user_id = ANY($1) AND (seq IS NULL OR seq BETWEEN $2 AND $3)";

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("could not connect to PostgreSQL (check --database-url; TLS is not supported)")]
    Connect(#[source] tokio_postgres::Error),
    #[error(
        "table raw_telemetry does not exist in this database: start the worker once (it creates \
         the table) or point --database-url at the worker's database"
    )]
    MissingTable,
    #[error("could not query raw_telemetry")]
    Query(#[source] tokio_postgres::Error),
    #[error(
        "raw_telemetry already holds {rows} rows for users '{first_user}'..'{last_user}' with seq \
         {seq_start}..={seq_end}, which this run's rows could not be told apart from; pass a \
         fresh --user-prefix (e.g. '--user-prefix {run_id}-user-') or a --seq-start above the \
         earlier runs"
    )]
    ScopeNotEmpty {
        rows: i64,
        first_user: String,
        last_user: String,
        seq_start: i64,
        seq_end: i64,
        run_id: String,
    },
    #[error(
        "table alerts does not exist in this database: the worker creates it at start-up (its \
         migrations include the alerts schema); start the worker with alert rules \
         (alerts.rules.path) or point --database-url at the worker's database"
    )]
    MissingAlertsTable,
    #[error("could not query the alerts table")]
    QueryAlerts(#[source] tokio_postgres::Error),
    #[error(
        "the alerts table already holds {alerts} '{rule}' alerts for users '{first_user}'..\
         '{last_user}', which this run's alerts could not be told apart from; pass a fresh \
         --user-prefix (e.g. '--user-prefix {run_id}-user-')"
    )]
    AlertsScopeNotEmpty {
        alerts: i64,
        rule: String,
        first_user: String,
        last_user: String,
        run_id: String,
    },
}

/// What the run sent, and so what the database should hold.
#[derive(Debug, Clone)]
pub struct Expectation {
    users: Vec<String>,
    devices: Vec<String>,
    seq_start: i64,
    messages: u64,
    /// One per (user, device), user-major.
    ledgers: Vec<Ledger>,
}

impl Expectation {
    /// `ledgers` holds one ledger of `messages` outcomes per (user, device), user-major.
    pub fn new(
        users: Vec<String>,
        devices: Vec<String>,
        seq_start: i64,
        messages: u64,
        ledgers: Vec<Ledger>,
    ) -> Self {
        assert_eq!(
            ledgers.len(),
            users.len() * devices.len(),
            "one ledger per device"
        );
        assert!(
            ledgers.iter().all(|l| l.len() == messages),
            "every ledger covers every message"
        );
        Expectation {
            users,
            devices,
            seq_start,
            messages,
            ledgers,
        }
    }

    /// The expectation of a run with these flags and outcomes.
    pub fn from_config(config: &Config, ledgers: Vec<Ledger>) -> Self {
        Self::new(
            (0..config.users).map(|u| config.user_id(u)).collect(),
            (0..config.devices_per_user)
                .map(Config::device_id)
                .collect(),
            config.seq_start,
            config.messages_per_device,
            ledgers,
        )
    }

    fn seq_end(&self) -> i64 {
        self.seq_start + self.messages as i64 - 1
    }

    fn count(&self, outcome: Outcome) -> u64 {
        self.ledgers.iter().map(|l| l.count(outcome)).sum()
    }
}

/// The result of the check.
#[derive(Debug, Clone)]
pub struct Verification {
    /// Confirmed messages: each must be stored exactly once.
    pub expected: u64,
    /// Rows found in the run's scope.
    pub stored_rows: u64,
    /// Confirmed messages not stored.
    pub lost: u64,
    /// Messages stored more than once.
    pub duplicated: u64,
    /// Extra copies of those messages.
    pub duplicate_rows: u64,
    /// Rows in scope for messages the run never sent (or without a `seq`).
    pub unexpected: u64,
    /// Messages written without a PUBACK (connection lost, drain timed out) that are stored;
    /// the rest of them are allowed to be missing.
    pub unconfirmed_stored: u64,
    pub unconfirmed_missing: u64,
    pub lost_examples: Vec<String>,
    pub duplicated_examples: Vec<String>,
    pub unexpected_examples: Vec<String>,
    /// `ingested_at - device_time` of the first copy of each stored message.
    pub e2e: Latency,
    /// How long the check waited for rows to arrive.
    pub waited: Duration,
    /// The wait ended at --verify-timeout (or on shutdown) with messages still missing.
    pub timed_out: bool,
}

impl Verification {
    /// No loss, no duplicate, nothing unexpected.
    pub fn passed(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.unexpected == 0
    }
}

pub(crate) async fn connect(database_url: &str) -> Result<Client, VerifyError> {
    let (client, connection) = tokio_postgres::connect(database_url, NoTls)
        .await
        .map_err(VerifyError::Connect)?;
    // The connection future does the I/O and ends when the client is dropped; its error, if
    // any, also surfaces on the next query.
    tokio::spawn(connection);
    Ok(client)
}

fn query_error(error: tokio_postgres::Error) -> VerifyError {
    match error.code() {
        Some(code) if *code == SqlState::UNDEFINED_TABLE => VerifyError::MissingTable,
        _ => VerifyError::Query(error),
    }
}

/// Fails if the run's scope already holds rows, before anything is published.
pub async fn preflight(database_url: &str, config: &Config) -> Result<(), VerifyError> {
    let client = connect(database_url).await?;
    let users: Vec<String> = (0..config.users).map(|u| config.user_id(u)).collect();
    let rows = count(
        &client,
        COUNT_IN_SCOPE,
        &users,
        config.seq_start,
        config.seq_end(),
    )
    .await?;
    if rows > 0 {
        return Err(VerifyError::ScopeNotEmpty {
            rows,
            first_user: users[0].clone(),
            last_user: users[users.len() - 1].clone(),
            seq_start: config.seq_start,
            seq_end: config.seq_end(),
            run_id: config.run_id.clone(),
        });
    }
    Ok(())
}

async fn count(
    client: &Client,
    sql: &str,
    users: &[String],
    seq_start: i64,
    seq_end: i64,
) -> Result<i64, VerifyError> {
    let users = users.to_vec();
    let params: [(&(dyn ToSql + Sync), Type); 3] = [
        (&users, Type::TEXT_ARRAY),
        (&seq_start, Type::INT8),
        (&seq_end, Type::INT8),
    ];
    let rows = client
        .query_typed(sql, &params)
        .await
        .map_err(query_error)?;
    Ok(rows.first().map(|row| row.get::<_, i64>(0)).unwrap_or(0))
}

/// Waits (up to `timeout`, or until shutdown) until every confirmed message is stored, then
/// compares what is stored with what was sent.
pub async fn verify(
    database_url: &str,
    expectation: &Expectation,
    timeout: Duration,
    shutdown: &Shutdown,
) -> Result<Verification, VerifyError> {
    let client = connect(database_url).await?;
    let expected = expectation.count(Outcome::Confirmed);
    let (seq_start, seq_end) = (expectation.seq_start, expectation.seq_end());

    let started = Instant::now();
    let deadline = started + timeout;
    let mut timed_out = false;
    loop {
        let present = count(
            &client,
            COUNT_PRESENT,
            &expectation.users,
            seq_start,
            seq_end,
        )
        .await?;
        if present as u64 >= expected {
            break;
        }
        let now = Instant::now();
        if now >= deadline || shutdown.is_triggered() {
            timed_out = true;
            break;
        }
        tokio::select! {
            _ = shutdown.wait() => {}
            _ = tokio::time::sleep(POLL_INTERVAL.min(deadline - now)) => {}
        }
    }
    let waited = started.elapsed();

    let params: [(&(dyn ToSql + Sync), Type); 3] = [
        (&expectation.users, Type::TEXT_ARRAY),
        (&seq_start, Type::INT8),
        (&seq_end, Type::INT8),
    ];
    let rows = client
        .query_typed(STORED_MESSAGES, &params)
        .await
        .map_err(query_error)?;
    let stored = rows.iter().map(|row| StoredMessage {
        user: row.get(0),
        device: row.get(1),
        seq: row.get(2),
        copies: row.get::<_, i64>(3) as u64,
        latency_ms: row.get(4),
    });
    let mut verification = compare(expectation, stored);
    verification.waited = waited;
    verification.timed_out = timed_out;
    Ok(verification)
}

/// One stored message and its copies.
struct StoredMessage {
    user: String,
    device: String,
    seq: Option<i64>,
    copies: u64,
    /// Of the first copy; `None` when the row has no device time.
    latency_ms: Option<f64>,
}

/// The comparison itself, apart from the database so it reads as the rules it applies.
fn compare(expectation: &Expectation, stored: impl Iterator<Item = StoredMessage>) -> Verification {
    let users: HashMap<&str, usize> = expectation
        .users
        .iter()
        .enumerate()
        .map(|(i, u)| (u.as_str(), i))
        .collect();
    let devices: HashMap<&str, usize> = expectation
        .devices
        .iter()
        .enumerate()
        .map(|(i, d)| (d.as_str(), i))
        .collect();
    let per_device = expectation.messages as usize;
    let mut copies = vec![0u64; expectation.ledgers.len() * per_device];
    let mut v = Verification {
        expected: expectation.count(Outcome::Confirmed),
        stored_rows: 0,
        lost: 0,
        duplicated: 0,
        duplicate_rows: 0,
        unexpected: 0,
        unconfirmed_stored: 0,
        unconfirmed_missing: 0,
        lost_examples: Vec::new(),
        duplicated_examples: Vec::new(),
        unexpected_examples: Vec::new(),
        e2e: Latency::default(),
        waited: Duration::ZERO,
        timed_out: false,
    };
    let name = |d: usize, k: usize| {
        let (u, dev) = (d / expectation.devices.len(), d % expectation.devices.len());
        format!(
            "{}/{} seq {}",
            expectation.users[u],
            expectation.devices[dev],
            expectation.seq_start + k as i64
        )
    };

    for message in stored {
        v.stored_rows += message.copies;
        let device = users
            .get(message.user.as_str())
            .zip(devices.get(message.device.as_str()));
        let why_unexpected = match (device, message.seq) {
            (None, _) => Some("no such device in this run"),
            (_, None) => Some("no seq"),
            (Some((&u, &d)), Some(seq)) => {
                let (d, k) = (
                    u * expectation.devices.len() + d,
                    (seq - expectation.seq_start) as u64,
                );
                if expectation.ledgers[d].get(k) == Outcome::NotSent {
                    Some("never sent")
                } else {
                    copies[d * per_device + k as usize] += message.copies;
                    if let Some(ms) = message.latency_ms {
                        v.e2e.record(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
                    }
                    None
                }
            }
        };
        if let Some(why) = why_unexpected {
            v.unexpected += message.copies;
            if v.unexpected_examples.len() < EXAMPLES {
                let seq = message.seq.map_or("-".to_owned(), |s| s.to_string());
                v.unexpected_examples.push(format!(
                    "{}/{} seq {seq} ({why})",
                    message.user, message.device
                ));
            }
        }
    }

    for (d, ledger) in expectation.ledgers.iter().enumerate() {
        for k in 0..per_device {
            let n = copies[d * per_device + k];
            match (ledger.get(k as u64), n) {
                (Outcome::NotSent, _) => {}
                (Outcome::Confirmed, 0) => {
                    v.lost += 1;
                    if v.lost_examples.len() < EXAMPLES {
                        v.lost_examples.push(name(d, k));
                    }
                }
                (Outcome::Unconfirmed, 0) => v.unconfirmed_missing += 1,
                (outcome, n) => {
                    if outcome == Outcome::Unconfirmed {
                        v.unconfirmed_stored += 1;
                    }
                    if n > 1 {
                        v.duplicated += 1;
                        v.duplicate_rows += n - 1;
                        if v.duplicated_examples.len() < EXAMPLES {
                            v.duplicated_examples
                                .push(format!("{} (stored {n} times)", name(d, k)));
                        }
                    }
                }
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(user: &str, device: &str, seq: Option<i64>, copies: u64) -> StoredMessage {
        StoredMessage {
            user: user.into(),
            device: device.into(),
            seq,
            copies,
            latency_ms: Some(12.0),
        }
    }

    fn expectation(ledgers: Vec<Ledger>) -> Expectation {
        Expectation::new(
            vec!["u1".into()],
            vec!["dev-1".into(), "dev-2".into()],
            10,
            3,
            ledgers,
        )
    }

    #[test]
    fn a_complete_store_passes_and_yields_latencies() {
        let exp = expectation(vec![Ledger::confirmed(3), Ledger::confirmed(3)]);
        let rows = ["dev-1", "dev-2"]
            .into_iter()
            .flat_map(|d| (10..13).map(move |s| stored("u1", d, Some(s), 1)));
        let v = compare(&exp, rows);
        assert!(v.passed(), "{v:?}");
        assert_eq!((v.expected, v.stored_rows, v.e2e.count()), (6, 6, 6));
    }

    #[test]
    fn loss_duplicates_and_strangers_are_counted_and_named() {
        let exp = expectation(vec![Ledger::confirmed(3), Ledger::confirmed(3)]);
        let rows = vec![
            stored("u1", "dev-1", Some(10), 1),
            stored("u1", "dev-1", Some(11), 3),
            stored("u1", "dev-1", Some(12), 1),
            stored("u1", "dev-2", Some(10), 1),
            stored("u1", "dev-2", Some(12), 1),
            stored("u1", "dev-9", Some(10), 1),
            stored("u1", "dev-2", None, 2),
        ];
        let v = compare(&exp, rows.into_iter());
        assert!(!v.passed());
        assert_eq!(
            (v.lost, v.duplicated, v.duplicate_rows, v.unexpected),
            (1, 1, 2, 3)
        );
        assert_eq!(v.lost_examples, ["u1/dev-2 seq 11"]);
        assert_eq!(v.duplicated_examples, ["u1/dev-1 seq 11 (stored 3 times)"]);
        assert_eq!(
            v.unexpected_examples,
            [
                "u1/dev-9 seq 10 (no such device in this run)",
                "u1/dev-2 seq - (no seq)"
            ]
        );
    }

    #[test]
    fn unacknowledged_messages_may_be_missing_but_unsent_ones_must_be() {
        let mut partial = Ledger::new(3);
        partial.set(0, Outcome::Confirmed);
        partial.set(1, Outcome::Unconfirmed);
        let exp = expectation(vec![partial.clone(), partial]);
        let rows = vec![
            stored("u1", "dev-1", Some(10), 1),
            stored("u1", "dev-1", Some(11), 1),
            stored("u1", "dev-2", Some(10), 1),
            stored("u1", "dev-2", Some(12), 1),
        ];
        let v = compare(&exp, rows.into_iter());
        assert_eq!((v.lost, v.duplicated, v.unexpected), (0, 0, 1));
        assert_eq!((v.unconfirmed_stored, v.unconfirmed_missing), (1, 1));
        assert_eq!(v.unexpected_examples, ["u1/dev-2 seq 12 (never sent)"]);
    }
}
