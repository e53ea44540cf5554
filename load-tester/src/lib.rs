//! Load tester for the telemetry pipeline: a fleet of simulated devices publishing over MQTT on
//! a fixed timetable, with the pipeline's delivery checked at the far end in PostgreSQL.
//!
//! - [`config`]: flags, and the checks that turn them into a [`config::Config`].
//! - [`schedule`]: the open-loop timetable (when each message is due).
//! - [`payload`]: the JSON a device publishes.
//! - [`fleet`]: the MQTT connections and their publishers; counts what was sent and acknowledged.
//! - [`stats`]: latency histograms, live counters and the per-message ledger.
//! - [`verify`]: compares the rows in `raw_telemetry` with what was sent.
//! - [`alerts`]: subscribes to the users' alert topics and checks the alerts the readings
//!   should have caused against the `alerts` table and what arrived.
//! - [`report`]: the progress line, the summary table and the JSON line.
//!
//! [`run`] ties them together; the binary only parses flags and prints.

pub mod alerts;
pub mod config;
pub mod fleet;
pub mod payload;
pub mod report;
pub mod schedule;
pub mod stats;
pub mod verify;

use std::sync::Arc;

use telemetry_core::Shutdown;

use crate::alerts::{AlertExpectation, Subscriber};
use crate::config::Config;
use crate::report::{Progress, Report};
use crate::stats::Counters;
use crate::verify::Expectation;

/// Why a run could not produce a report. Problems during the run (a dropped connection, lost
/// messages) are not errors: they are figures in the report.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "could not connect to the MQTT broker at {host}:{port} as client '{client_id}': {reason}"
    )]
    MqttConnect {
        host: String,
        port: u16,
        client_id: String,
        reason: String,
    },
    #[error(
        "could not subscribe to the alerts at the MQTT broker {host}:{port} as client '{client_id}': {reason}"
    )]
    AlertSubscribe {
        host: String,
        port: u16,
        client_id: String,
        reason: String,
    },
    #[error(transparent)]
    Verify(#[from] verify::VerifyError),
    #[error("a fleet task failed")]
    Task(#[from] tokio::task::JoinError),
}

/// Runs the whole test: checks the database is ready (with `--verify` and `--verify-alerts`),
/// subscribes to the alert topics (with `--verify-alerts`), publishes the timetable, waits for
/// the acknowledgements, and verifies the stored rows and alerts. Stops early, with a partial
/// report, when `shutdown` is triggered; verification is then skipped, because a cut timetable
/// says nothing about the pipeline.
pub async fn run(config: &Config, shutdown: &Shutdown) -> Result<Report, Error> {
    if let Some(verify) = &config.verify {
        verify::preflight(&verify.database_url, config).await?;
    }
    let subscriber = match &config.verify_alerts {
        Some(alerts) => {
            let users: Vec<String> = (0..config.users).map(|u| config.user_id(u)).collect();
            alerts::preflight(&alerts.database_url, &users, &alerts.rule, &config.run_id).await?;
            Some(Subscriber::start(config).await?)
        }
        None => None,
    };

    let counters = Arc::new(Counters::default());
    let progress = Progress::start(counters.clone(), config.planned_messages());
    let fleet = fleet::run(config, counters, shutdown).await;
    progress.finish().await;
    let fleet = fleet?;

    let verification = match &config.verify {
        Some(verify) if !fleet.interrupted => {
            eprintln!(
                "verifying: waiting up to {} for the rows in raw_telemetry",
                humantime::format_duration(verify.timeout)
            );
            let expectation = Expectation::from_config(config, fleet.ledgers.clone());
            Some(
                verify::verify(&verify.database_url, &expectation, verify.timeout, shutdown)
                    .await?,
            )
        }
        _ => None,
    };
    let alert_verification = match (&config.verify_alerts, &subscriber) {
        (Some(alerts), Some(subscriber)) if !fleet.interrupted => {
            let expectation = AlertExpectation::from_config(config, &alerts.rule, &fleet);
            eprintln!(
                "verifying alerts: waiting up to {} for {} '{}' alerts in the alerts table and at the subscriber",
                humantime::format_duration(alerts.timeout),
                expectation.events().len(),
                alerts.rule
            );
            let receipts = subscriber.receipts();
            Some(
                alerts::verify(
                    &alerts.database_url,
                    &expectation,
                    &receipts,
                    alerts.timeout,
                    shutdown,
                )
                .await?,
            )
        }
        _ => None,
    };
    if let Some(subscriber) = subscriber {
        subscriber.stop().await;
    }
    Ok(Report::new(
        config,
        &fleet,
        verification.as_ref(),
        alert_verification.as_ref(),
    ))
}
