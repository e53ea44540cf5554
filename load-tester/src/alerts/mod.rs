//! Checks the alerts that the run's readings should have caused, and measures alert latency.
//!
//! The tester knows which readings cross the alert rule (`--alert-fraction`, see
//! [`crate::payload::is_alert`]): an alert reading's temperature is above the rule's 80.0, and
//! a normal reading's (15 to 30) is below its clear threshold of 75.0. So for each device, every
//! maximal run of consecutive alert readings must give exactly one `raised` event, at its first
//! reading, and, when a normal reading follows, exactly one `cleared` event, at that reading.
//! [`AlertExpectation`] lists those events.
//!
//! - [`subscriber`]: subscribes to the run's users' alert topics before the first publish (under
//!   `--mqtt-credentials-per-user` with each user's own login, as the device's owner would) and
//!   records every alert message with the time it arrived.
//! - [`check`]: after the run, waits until the `alerts` table and the subscriber have caught up,
//!   then matches stored rows and received messages to the expected events: each one stored
//!   exactly once, published, and received exactly once on its own device's topic.
//!
//! A stored alert is matched to its reading by device, event and `occurred_at`, which is the
//! reading's `ts`: the time it was due, in whole milliseconds (the config's rate limit keeps it
//! unique per device and event). Alert latency runs from that due time to the alert's arrival
//! at the subscriber, both on the tester's clock, so it needs no clock sync.

pub mod check;
pub mod subscriber;

use std::collections::HashMap;
use std::time::Duration;

use crate::config::Config;
use crate::fleet::FleetOutcome;
use crate::payload::AlertPlan;
use crate::stats::{Ledger, Outcome};

pub use check::{preflight, verify, AlertVerification};
pub use subscriber::{Receipt, Receipts, Subscriber};

/// Whether an alert event opens or closes an alert; spelled as in `alerts.event`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    Raised,
    Cleared,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Raised => "raised",
            EventKind::Cleared => "cleared",
        }
    }

    pub fn parse(text: &str) -> Option<EventKind> {
        match text {
            "raised" => Some(EventKind::Raised),
            "cleared" => Some(EventKind::Cleared),
            _ => None,
        }
    }
}

/// One alert event that the run's readings must cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpectedAlert {
    /// Fleet index of the device (user-major).
    pub device: usize,
    /// Message number of the reading that raises or clears.
    pub k: u64,
    pub kind: EventKind,
    /// The reading's `ts`, which the alert carries as `occurred_at` (epoch milliseconds).
    pub occurred_at_ms: i64,
    /// When the reading was due, as time since the epoch, to the nanosecond.
    pub due: Duration,
}

/// The alert events per device for the readings the pipeline received, in reading order.
///
/// Readings never sent are skipped (the pipeline never saw them). The caller leaves out devices
/// with unacknowledged readings, which may or may not have reached the pipeline.
pub fn expected_events(ledger: &Ledger, is_alert: impl Fn(u64) -> bool) -> Vec<(u64, EventKind)> {
    let mut events = Vec::new();
    let mut open = false;
    for k in 0..ledger.len() {
        if ledger.get(k) == Outcome::NotSent {
            continue;
        }
        match (is_alert(k), open) {
            (true, false) => events.push((k, EventKind::Raised)),
            (false, true) => events.push((k, EventKind::Cleared)),
            _ => continue,
        }
        open = !open;
    }
    events
}

/// What the alerts table and the subscriber should hold after the run.
#[derive(Debug, Clone)]
pub struct AlertExpectation {
    users: Vec<String>,
    devices: Vec<String>,
    seq_start: i64,
    rule: String,
    events: Vec<ExpectedAlert>,
    /// Per fleet device: left out of the check because some of its readings were written but
    /// never acknowledged, so which alerts they caused is unknown.
    unchecked: Vec<bool>,
    /// Position of each user and device id, to place stored rows quickly.
    user_index: HashMap<String, usize>,
    device_index: HashMap<String, usize>,
}

impl AlertExpectation {
    /// `ledgers` holds one ledger per (user, device), user-major; `due(g, k)` is when message
    /// `k` of fleet device `g` was due, as time since the epoch (its payload's `ts`).
    pub fn new(
        users: Vec<String>,
        devices: Vec<String>,
        seq_start: i64,
        rule: String,
        alerts: AlertPlan,
        ledgers: &[Ledger],
        due: impl Fn(usize, u64) -> Duration,
    ) -> AlertExpectation {
        assert_eq!(
            ledgers.len(),
            users.len() * devices.len(),
            "one ledger per device"
        );
        let mut events = Vec::new();
        let mut unchecked = Vec::with_capacity(ledgers.len());
        for (device, ledger) in ledgers.iter().enumerate() {
            let skip = ledger.count(Outcome::Unconfirmed) > 0;
            unchecked.push(skip);
            if skip {
                continue;
            }
            let is_alert = |k| alerts.is_alert(device as u64, k);
            for (k, kind) in expected_events(ledger, is_alert) {
                let due = due(device, k);
                events.push(ExpectedAlert {
                    device,
                    k,
                    kind,
                    occurred_at_ms: due.as_millis() as i64,
                    due,
                });
            }
        }
        let position = |ids: &[String]| {
            ids.iter()
                .enumerate()
                .map(|(i, id)| (id.clone(), i))
                .collect()
        };
        AlertExpectation {
            user_index: position(&users),
            device_index: position(&devices),
            users,
            devices,
            seq_start,
            rule,
            events,
            unchecked,
        }
    }

    /// The expectation of a run with these flags and this outcome.
    pub fn from_config(config: &Config, rule: &str, fleet: &FleetOutcome) -> AlertExpectation {
        AlertExpectation::new(
            (0..config.users).map(|u| config.user_id(u)).collect(),
            (0..config.devices_per_user)
                .map(Config::device_id)
                .collect(),
            config.seq_start,
            rule.to_owned(),
            config.alert_plan(),
            &fleet.ledgers,
            |g, k| fleet.wall_start + fleet.schedule.due(g as u64, k),
        )
    }

    pub fn events(&self) -> &[ExpectedAlert] {
        &self.events
    }

    pub fn users(&self) -> &[String] {
        &self.users
    }

    pub fn rule(&self) -> &str {
        &self.rule
    }

    /// Devices left out of the check.
    pub fn unchecked_devices(&self) -> u64 {
        self.unchecked.iter().filter(|&&u| u).count() as u64
    }

    fn is_unchecked(&self, device: usize) -> bool {
        self.unchecked[device]
    }

    /// `(user, device)` of a fleet device.
    fn ids(&self, device: usize) -> (&str, &str) {
        let per_user = self.devices.len();
        (
            &self.users[device / per_user],
            &self.devices[device % per_user],
        )
    }

    /// How reports name an expected event: `user-1/dev-2 seq 17 raised`.
    fn name(&self, event: &ExpectedAlert) -> String {
        let (user, device) = self.ids(event.device);
        format!(
            "{user}/{device} seq {} {}",
            self.seq_start + event.k as i64,
            event.kind.as_str()
        )
    }

    /// The fleet index of `(user, device)`, if it is one of the run's devices.
    fn index(&self, user: &str, device: &str) -> Option<usize> {
        let u = self.user_index.get(user)?;
        let d = self.device_index.get(device)?;
        Some(u * self.devices.len() + d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload;

    fn confirmed(n: u64) -> Ledger {
        Ledger::confirmed(n)
    }

    #[test]
    fn each_run_of_alert_readings_raises_once_and_the_next_normal_reading_clears() {
        // A quarter: readings 3, 7, 11 are alerts, each followed by a normal one.
        assert_eq!(
            expected_events(&confirmed(12), |k| payload::is_alert(k, 0.25)),
            [
                (3, EventKind::Raised),
                (4, EventKind::Cleared),
                (7, EventKind::Raised),
                (8, EventKind::Cleared),
                (11, EventKind::Raised),
            ],
            "the last alert stays open: no reading follows it"
        );
        // Three quarters: runs of three alert readings raise once each.
        assert_eq!(
            expected_events(&confirmed(8), |k| payload::is_alert(k, 0.75)),
            [
                (1, EventKind::Raised),
                (4, EventKind::Cleared),
                (5, EventKind::Raised),
            ]
        );
        assert!(expected_events(&confirmed(50), |k| payload::is_alert(k, 0.0)).is_empty());
        assert_eq!(
            expected_events(&confirmed(50), |k| payload::is_alert(k, 1.0)),
            [(0, EventKind::Raised)]
        );
    }

    #[test]
    fn readings_never_sent_are_skipped_as_the_pipeline_never_saw_them() {
        let mut ledger = confirmed(12);
        // Without reading 4, the alert of reading 3 clears at reading 5.
        ledger.set(4, Outcome::NotSent);
        // Without reading 7, nothing happens between 5 and 11.
        ledger.set(7, Outcome::NotSent);
        assert_eq!(
            expected_events(&ledger, |k| payload::is_alert(k, 0.25)),
            [
                (3, EventKind::Raised),
                (5, EventKind::Cleared),
                (11, EventKind::Raised),
            ]
        );
    }

    #[test]
    fn events_carry_their_readings_time_and_devices_with_unknown_readings_are_left_out() {
        let mut unsure = confirmed(8);
        unsure.set(2, Outcome::Unconfirmed);
        let expectation = AlertExpectation::new(
            vec!["u1".into()],
            vec!["dev-1".into(), "dev-2".into()],
            100,
            "high-temperature".into(),
            AlertPlan::aligned(0.25),
            &[confirmed(8), unsure],
            |g, k| {
                Duration::from_millis(1_000_000 + 10 * k + g as u64) + Duration::from_micros(700)
            },
        );
        assert_eq!(expectation.unchecked_devices(), 1);
        let events = expectation.events();
        assert_eq!(events.len(), 3, "{events:?}");
        assert_eq!(events[0].occurred_at_ms, 1_000_030, "the ts, in whole ms");
        assert_eq!(expectation.name(&events[1]), "u1/dev-1 seq 104 cleared");
        assert_eq!(expectation.index("u1", "dev-2"), Some(1));
        assert_eq!(expectation.index("u2", "dev-1"), None);
    }
}
