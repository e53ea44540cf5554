//! Threshold and geofence alerts: rules, their evaluation, and delivery over MQTT.
//!
//! - [`rules`]: the TOML rules file, checked on load ([`RuleSet`]).
//! - [`engine`]: pure evaluation of one reading against the rules and the device's state
//!   ([`evaluate`], [`DeviceState`], [`AlertEvent`]); deterministic, so replays reproduce
//!   alerts with the same ids.
//! - [`watch`]: reloading the rules file without restart ([`RulesWatcher`]).
//! - [`outbox`]: the `alerts` table as an outbox ([`SCHEMA_SQL`], [`outbox::insert_events`],
//!   [`outbox::load_states`], [`outbox::save_states`]) and its MQTT publisher ([`Outbox`]).
//! - [`config`]: the `[alerts]` settings section.
//! - [`metrics`]: every metric's name.
//!
//! The worker ties them together: inside the transaction that stores a batch it loads the
//! batch's device states, evaluates each reading, inserts the events and saves the states;
//! after the commit it wakes the outbox, which publishes the new alerts.

pub mod config;
pub mod engine;
mod error;
mod geo;
pub mod metrics;
pub mod outbox;
pub mod rules;
pub mod watch;

pub use config::AlertsConfig;
pub use engine::{alert_id, evaluate, event_id, AlertEvent, DeviceState, EventKind, Reading};
pub use error::AlertError;
pub use outbox::{Outbox, OutboxConfig, OutboxWaker, RELEASE_SQL, SCHEMA_SQL};
pub use rules::{RuleSet, Severity};
pub use watch::{RulesConfig, RulesWatcher};
