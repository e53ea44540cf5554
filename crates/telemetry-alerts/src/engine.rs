//! Evaluation: one reading, one device's state, the rules -> alert events. Pure, no I/O.
//!
//! Guarantee: the same readings, in the same order, from the same state, give the same events
//! with the same ids. Time comes from the record (device time, else receive time), never from
//! the clock, and an alert's id is derived from the rule, the device and the Kafka position of
//! the reading that started it, so a replayed batch reproduces its alerts exactly and the
//! outbox's `UNIQUE (alert_id, event)` drops the repeats. Each event also has an id of its own
//! ([`event_id`], derived from the alert id and the kind), which survives a database restore:
//! the readings read again after it give the same events with the same ids, so subscribers and
//! the broker recognise what they already have.
//!
//! Lifecycle of one rule on one device:
//!
//! - A reading that meets the condition starts a streak (its partition and offset name the
//!   alert). The alert is raised when the streak is long enough (`for_samples`, `for_duration`)
//!   and no raise happened within `cooldown`; a cooled-down streak raises as soon as the
//!   cooldown is over, if it still holds. A reading that does not meet it ends the streak.
//! - While raised, readings that still meet it produce nothing. The alert clears at the first
//!   reading past the clear threshold (`clear`, else the condition itself), with the same id.
//! - A reading without the rule's reading (missing pointer, not a number) changes nothing.
//!
//! The state of each device is small and serde-serializable, so the worker stores it with each
//! batch and the next owner of the partition loads it.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use telemetry_core::contract::DeviceId;

use crate::error::AlertError;
use crate::geo;
use crate::rules::{Condition, Geofence, Hold, LatLon, Rule, RuleSet, Severity, Test, Trigger};

/// One stored reading, as the engine needs it.
#[derive(Debug, Clone, Copy)]
pub struct Reading<'a> {
    pub device: &'a DeviceId,
    /// The payload as stored: a JSON object.
    pub payload: &'a [u8],
    /// Device time when the payload has `ts`, else the receive time.
    pub time: DateTime<Utc>,
    pub partition: i32,
    pub offset: i64,
}

/// Whether an event opens or closes an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Raised,
    Cleared,
}

impl EventKind {
    /// As stored in `alerts.event` and sent in the message's `event`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Raised => "raised",
            EventKind::Cleared => "cleared",
        }
    }
}

/// An alert raised or cleared by one reading.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertEvent {
    pub kind: EventKind,
    /// Same for the raise and the clear of one alert; see [`alert_id`].
    pub alert_id: String,
    pub rule: String,
    /// The raise's severity; a clear carries the severity it was raised with.
    pub severity: Severity,
    pub device: DeviceId,
    /// The reading's value; for a geofence, metres outside the fence (negative inside).
    pub value: f64,
    /// The threshold that was crossed: the rule's value (or range bound) for a raise, the clear
    /// threshold for a clear; for a geofence, metres from the boundary (0, or the margin).
    pub threshold: f64,
    /// For a geofence: where the device was.
    pub position: Option<LatLon>,
    /// The reading's time.
    pub occurred_at: DateTime<Utc>,
    /// Where the reading that produced this event was.
    pub partition: i32,
    pub offset: i64,
}

impl AlertEvent {
    /// See [`event_id`].
    pub fn event_id(&self) -> String {
        event_id(&self.alert_id, self.kind)
    }

    /// The MQTT message for this event, also stored as `alerts.body`.
    pub fn body(&self) -> Value {
        let mut body = serde_json::json!({
            "event_id": self.event_id(),
            "alert_id": self.alert_id,
            "event": self.kind.as_str(),
            "rule": self.rule,
            "severity": self.severity.as_str(),
            "user": self.device.user,
            "device": self.device.device,
            "value": self.value,
            "threshold": self.threshold,
            "occurred_at": self.occurred_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            "kafka_partition": self.partition,
            "kafka_offset": self.offset,
        });
        if let (Some(position), Some(map)) = (self.position, body.as_object_mut()) {
            map.insert("latitude".into(), position.lat.into());
            map.insert("longitude".into(), position.lon.into());
        }
        body
    }
}

/// The id of an alert: 32 hex digits of SHA-256 over the rule name, the device and the Kafka
/// partition and offset of the reading that started the alert. Stable across processes and
/// versions, so a replay recognises what it already raised.
pub fn alert_id(rule: &str, device: &DeviceId, partition: i32, offset: i64) -> String {
    let mut hash = Sha256::new();
    // Length prefixes keep ("ab", "c") and ("a", "bc") apart.
    for part in [
        rule.as_bytes(),
        device.user.as_bytes(),
        device.device.as_bytes(),
    ] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    hash.update(partition.to_be_bytes());
    hash.update(offset.to_be_bytes());
    crate::rules::hex(&hash.finalize()[..16])
}

/// The id of one event (a raise or a clear): 32 hex digits of SHA-256 over
/// `{alert_id}/{event}`, e.g. `823f85c6ae9e8721d4de0697fd175b11/raised`. It depends on nothing
/// but the event's cause, so the same event regenerated (a replay, or the readings read again
/// after the database was restored from a backup) has the same id: subscribers deduplicate on
/// it, and the outbox derives the MQTT packet id from it. In SQL:
/// `encode(substr(sha256(convert_to(alert_id || '/' || event, 'UTF8')), 1, 16), 'hex')`.
pub fn event_id(alert_id: &str, kind: EventKind) -> String {
    let mut hash = Sha256::new();
    hash.update(alert_id.as_bytes());
    hash.update(b"/");
    hash.update(kind.as_str().as_bytes());
    crate::rules::hex(&hash.finalize()[..16])
}

/// Every rule's state for one device. Stored as `alert_state.state` (jsonb).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceState {
    /// Per rule name; rules with nothing to remember have no entry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    rules: BTreeMap<String, RuleState>,
    /// Set when evaluation changed the state since it was loaded or last saved.
    #[serde(skip)]
    changed: bool,
}

impl PartialEq for DeviceState {
    fn eq(&self, other: &Self) -> bool {
        self.rules == other.rules
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleState {
    /// [`Rule::fingerprint`] of the rule this state was built under.
    rule: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    active: Option<ActiveAlert>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    streak: Option<Streak>,
    /// Kept only while a cooldown is running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_raised_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActiveAlert {
    alert_id: String,
    severity: Severity,
    raised_at: DateTime<Utc>,
}

/// Consecutive readings meeting the condition while no alert is raised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Streak {
    since: DateTime<Utc>,
    partition: i32,
    offset: i64,
    samples: u32,
}

impl RuleState {
    fn is_empty(&self) -> bool {
        self.active.is_none() && self.streak.is_none() && self.last_raised_at.is_none()
    }
}

impl DeviceState {
    pub fn new() -> DeviceState {
        DeviceState::default()
    }

    /// Reads a stored state (`alert_state.state`).
    pub fn from_json(value: &Value) -> Result<DeviceState, AlertError> {
        DeviceState::deserialize(value).map_err(AlertError::InvalidState)
    }

    /// The state to store; `{}` when there is nothing to remember.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("alert state serializes to JSON")
    }

    /// True when no rule has anything to remember (no streak, open alert or cooldown).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// True when evaluation changed the state since it was created, loaded or marked saved.
    pub fn changed(&self) -> bool {
        self.changed
    }

    /// Call once the state is stored.
    pub fn mark_saved(&mut self) {
        self.changed = false;
    }

    /// The alerts currently raised: `(rule name, alert id)`.
    pub fn active_alerts(&self) -> impl Iterator<Item = (&str, &str)> {
        self.rules.iter().filter_map(|(name, state)| {
            state
                .active
                .as_ref()
                .map(|active| (name.as_str(), active.alert_id.as_str()))
        })
    }

    /// Forgets the state of rules that no longer apply to the device (removed from the rules
    /// file, or scoped elsewhere). An alert open under such a rule is dropped without a clear.
    /// [`evaluate`] does this itself; call it to tidy states of devices that send nothing.
    pub fn retain_rules(&mut self, rules: &RuleSet, device: &DeviceId) {
        if self.rules.is_empty() {
            return;
        }
        let applicable = rules.for_device(device);
        self.retain_applicable(&applicable);
    }

    fn retain_applicable(&mut self, applicable: &[&Rule]) {
        let before = self.rules.len();
        self.rules
            .retain(|name, _| applicable.iter().any(|rule| rule.name == *name));
        if self.rules.len() != before {
            self.changed = true;
        }
    }
}

/// What one reading means for one rule.
#[derive(Debug, Clone, Copy)]
struct Observation {
    value: f64,
    position: Option<LatLon>,
}

/// Evaluates one reading of `state`'s device against the rules that apply to it, updating the
/// state. Returns the events in rule-name order (empty almost always).
pub fn evaluate(
    rules: &RuleSet,
    state: &mut DeviceState,
    reading: &Reading<'_>,
) -> Vec<AlertEvent> {
    let applicable = rules.for_device(reading.device);
    state.retain_applicable(&applicable);
    if applicable.is_empty() {
        return Vec::new();
    }
    // The worker hands only payloads that passed the contract; anything else has no readings.
    let Ok(payload) = serde_json::from_slice::<Value>(reading.payload) else {
        return Vec::new();
    };
    let mut events = Vec::new();
    for rule in applicable {
        let Some(observation) = observe(&rule.condition, &payload) else {
            continue;
        };
        let before = state.rules.remove(&rule.name);
        let mut rule_state = before.clone().unwrap_or_else(|| RuleState {
            rule: rule.fingerprint().to_owned(),
            active: None,
            streak: None,
            last_raised_at: None,
        });
        step(rule, &mut rule_state, observation, reading, &mut events);
        let after = (!rule_state.is_empty()).then_some(rule_state);
        if after != before {
            state.changed = true;
        }
        if let Some(after) = after {
            state.rules.insert(rule.name.clone(), after);
        }
    }
    events
}

/// Advances one rule's state by one reading that carries its value.
fn step(
    rule: &Rule,
    state: &mut RuleState,
    observation: Observation,
    reading: &Reading<'_>,
    events: &mut Vec<AlertEvent>,
) {
    let now = reading.time;
    if state.rule != rule.fingerprint() {
        // The rule's terms changed: a half-counted streak starts over. An open alert stays open
        // and clears under the new terms, so its subscribers still see it end.
        state.rule = rule.fingerprint().to_owned();
        state.streak = None;
    }
    state.last_raised_at = match (state.last_raised_at, rule.cooldown) {
        (Some(last), Some(cooldown)) if now < last + delta(cooldown) => Some(last),
        _ => None,
    };
    let event = |kind, alert_id: &str, severity, threshold| AlertEvent {
        kind,
        alert_id: alert_id.to_owned(),
        rule: rule.name.clone(),
        severity,
        device: reading.device.clone(),
        value: observation.value,
        threshold,
        position: observation.position,
        occurred_at: now,
        partition: reading.partition,
        offset: reading.offset,
    };
    if let Some(active) = &state.active {
        if clears(&rule.condition, observation) {
            events.push(event(
                EventKind::Cleared,
                &active.alert_id,
                active.severity,
                clear_threshold(&rule.condition, observation),
            ));
            state.active = None;
        }
        return;
    }
    if !breaches(&rule.condition, observation) {
        state.streak = None;
        return;
    }
    let streak = state.streak.get_or_insert(Streak {
        since: now,
        partition: reading.partition,
        offset: reading.offset,
        samples: 0,
    });
    streak.samples = streak.samples.saturating_add(1);
    let held = match rule.hold {
        Hold::Immediately => true,
        Hold::Samples(n) => streak.samples >= n,
        Hold::Duration(d) => now - streak.since >= delta(d),
    };
    if !held || state.last_raised_at.is_some() {
        return;
    }
    let id = alert_id(&rule.name, reading.device, streak.partition, streak.offset);
    events.push(event(
        EventKind::Raised,
        &id,
        rule.severity,
        raise_threshold(&rule.condition, observation),
    ));
    state.active = Some(ActiveAlert {
        alert_id: id,
        severity: rule.severity,
        raised_at: now,
    });
    state.streak = None;
    state.last_raised_at = rule.cooldown.map(|_| now);
}

fn delta(duration: std::time::Duration) -> TimeDelta {
    // Rule durations are checked at load time and are far below TimeDelta's range.
    TimeDelta::from_std(duration).unwrap_or(TimeDelta::MAX)
}

fn number(payload: &Value, pointer: &str) -> Option<f64> {
    payload.pointer(pointer)?.as_f64().filter(|v| v.is_finite())
}

fn observe(condition: &Condition, payload: &Value) -> Option<Observation> {
    match condition {
        Condition::Threshold { reading, .. } => Some(Observation {
            value: number(payload, reading)?,
            position: None,
        }),
        Condition::Geofence(fence) => {
            let position = LatLon {
                lat: number(payload, &fence.latitude)?,
                lon: number(payload, &fence.longitude)?,
            };
            if !(-90.0..=90.0).contains(&position.lat) || !(-180.0..=180.0).contains(&position.lon)
            {
                return None;
            }
            Some(Observation {
                value: geo::signed_distance_m(&fence.shape, position),
                position: Some(position),
            })
        }
    }
}

fn breaches(condition: &Condition, observation: Observation) -> bool {
    let v = observation.value;
    match condition {
        Condition::Threshold { test, .. } => match *test {
            Test::Compare { op, value, .. } => op.holds(v, value),
            Test::Outside { low, high, .. } => v < low || v > high,
            Test::Inside { low, high, .. } => (low..=high).contains(&v),
        },
        // `value` is the signed distance outside the fence; the boundary counts as inside.
        Condition::Geofence(Geofence { trigger, .. }) => match trigger {
            Trigger::Exit => v > 0.0,
            Trigger::Enter => v <= 0.0,
        },
    }
}

/// Whether a raised alert ends with this observation.
fn clears(condition: &Condition, observation: Observation) -> bool {
    let v = observation.value;
    match condition {
        Condition::Threshold { test, .. } => match *test {
            Test::Compare {
                op,
                clear: Some(clear),
                ..
            } => {
                if op.is_upper() {
                    v < clear
                } else {
                    v > clear
                }
            }
            Test::Outside {
                clear: Some([low, high]),
                ..
            } => (low..=high).contains(&v),
            Test::Inside {
                clear: Some([low, high]),
                ..
            } => v < low || v > high,
            _ => !breaches(condition, observation),
        },
        Condition::Geofence(Geofence {
            trigger, margin_m, ..
        }) => match trigger {
            Trigger::Exit => v <= -margin_m,
            Trigger::Enter => v > *margin_m,
        },
    }
}

/// The bound of `[low, high]` nearer to `v`.
fn nearer(v: f64, low: f64, high: f64) -> f64 {
    if (v - low).abs() <= (v - high).abs() {
        low
    } else {
        high
    }
}

fn raise_threshold(condition: &Condition, observation: Observation) -> f64 {
    let v = observation.value;
    match condition {
        Condition::Threshold { test, .. } => match *test {
            Test::Compare { value, .. } => value,
            Test::Outside { low, high, .. } | Test::Inside { low, high, .. } => {
                nearer(v, low, high)
            }
        },
        Condition::Geofence(_) => 0.0,
    }
}

fn clear_threshold(condition: &Condition, observation: Observation) -> f64 {
    let v = observation.value;
    match condition {
        Condition::Threshold { test, .. } => match *test {
            Test::Compare { value, clear, .. } => clear.unwrap_or(value),
            Test::Outside { low, high, clear } | Test::Inside { low, high, clear } => {
                let [low, high] = clear.unwrap_or([low, high]);
                nearer(v, low, high)
            }
        },
        Condition::Geofence(Geofence {
            trigger, margin_m, ..
        }) => match trigger {
            Trigger::Exit => -margin_m,
            Trigger::Enter => *margin_m,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_764_000_000_000;

    fn rules(text: &str) -> RuleSet {
        RuleSet::from_toml(text).unwrap()
    }

    fn device(user: &str, device: &str) -> DeviceId {
        DeviceId::new(user, device).unwrap()
    }

    /// A device's reading stream: offsets count up from 0 on partition 3, one second apart
    /// unless told otherwise.
    struct Device {
        id: DeviceId,
        state: DeviceState,
        offset: i64,
        time_ms: i64,
    }

    impl Device {
        fn new(user: &str, name: &str) -> Device {
            Device {
                id: device(user, name),
                state: DeviceState::new(),
                offset: 0,
                time_ms: T0,
            }
        }

        /// Sends one payload, one second after the previous one.
        fn send(&mut self, rules: &RuleSet, payload: &str) -> Vec<AlertEvent> {
            self.send_after(rules, 1_000, payload)
        }

        fn send_after(&mut self, rules: &RuleSet, after_ms: i64, payload: &str) -> Vec<AlertEvent> {
            self.time_ms += after_ms;
            let reading = Reading {
                device: &self.id,
                payload: payload.as_bytes(),
                time: DateTime::from_timestamp_millis(self.time_ms).unwrap(),
                partition: 3,
                offset: self.offset,
            };
            self.offset += 1;
            evaluate(rules, &mut self.state, &reading)
        }

        /// Sends `temperature` values and returns `(offset, kind)` of every event.
        fn temperatures(&mut self, rules: &RuleSet, values: &[f64]) -> Vec<(i64, EventKind)> {
            let mut events = Vec::new();
            for v in values {
                let offset = self.offset;
                for event in self.send(rules, &format!(r#"{{"temperature":{v}}}"#)) {
                    events.push((offset, event.kind));
                }
            }
            events
        }
    }

    const HIGH_TEMP: &str = r#"
[[rule]]
name = "high-temp"
reading = "/temperature"
op = ">"
value = 80.0
severity = "warning"
"#;

    const HIGH_TEMP_WITH_CLEAR: &str = r#"
[[rule]]
name = "high-temp"
reading = "/temperature"
op = ">"
value = 80.0
clear = 75.0
severity = "warning"
"#;

    #[test]
    fn an_alert_is_raised_once_and_cleared_once_with_the_same_id() {
        let rules = rules(HIGH_TEMP);
        let mut d = Device::new("alice", "thermo-1");
        assert!(d.send(&rules, r#"{"temperature":20}"#).is_empty());
        let raised = d.send(&rules, r#"{"temperature":85.5}"#);
        assert_eq!(raised.len(), 1);
        let raised = &raised[0];
        assert_eq!(raised.kind, EventKind::Raised);
        assert_eq!(raised.rule, "high-temp");
        assert_eq!(raised.severity, Severity::Warning);
        assert_eq!(raised.value, 85.5);
        assert_eq!(raised.threshold, 80.0);
        assert_eq!((raised.partition, raised.offset), (3, 1));
        assert_eq!(
            raised.occurred_at,
            DateTime::from_timestamp_millis(T0 + 2_000).unwrap()
        );
        assert_eq!(raised.alert_id, alert_id("high-temp", &d.id, 3, 1));
        // Still too hot: nothing new.
        assert!(d.send(&rules, r#"{"temperature":90}"#).is_empty());
        assert!(d.send(&rules, r#"{"temperature":81}"#).is_empty());
        let cleared = d.send(&rules, r#"{"temperature":70}"#);
        assert_eq!(cleared.len(), 1);
        assert_eq!(cleared[0].kind, EventKind::Cleared);
        assert_eq!(cleared[0].alert_id, raised.alert_id);
        assert_eq!(cleared[0].offset, 4);
        assert_eq!(cleared[0].value, 70.0);
        assert!(d.state.is_empty());
    }

    #[test]
    fn a_value_oscillating_around_the_threshold_gives_one_alert_with_hysteresis() {
        let oscillating = [79.0, 81.0, 79.5, 80.5, 78.0, 82.0, 76.0, 81.0, 79.0, 80.1];
        let mut with = Device::new("alice", "thermo-1");
        let events = with.temperatures(&rules(HIGH_TEMP_WITH_CLEAR), &oscillating);
        assert_eq!(events, [(1, EventKind::Raised)]);
        // Below the clear threshold it ends, once.
        let end = with.temperatures(&rules(HIGH_TEMP_WITH_CLEAR), &[74.9, 76.0, 74.0]);
        assert_eq!(end, [(10, EventKind::Cleared)]);

        // Without hysteresis the same readings flap: this is what `clear` is for.
        let mut without = Device::new("alice", "thermo-2");
        let flaps = without.temperatures(&rules(HIGH_TEMP), &oscillating);
        assert_eq!(flaps.len(), 9, "{flaps:?}");
    }

    #[test]
    fn the_clear_event_reports_the_clear_threshold() {
        let rules = rules(HIGH_TEMP_WITH_CLEAR);
        let mut d = Device::new("alice", "thermo-1");
        d.send(&rules, r#"{"temperature":85}"#);
        let cleared = d.send(&rules, r#"{"temperature":60}"#);
        assert_eq!(cleared[0].threshold, 75.0);
    }

    #[test]
    fn for_samples_waits_for_n_consecutive_readings_and_names_the_alert_after_the_first() {
        let rules = rules(
            r#"
[[rule]]
name = "hot"
reading = "/temperature"
op = ">="
value = 80
severity = "critical"
for_samples = 3
"#,
        );
        let mut d = Device::new("alice", "thermo-1");
        // Two in a row, then a break: the streak starts over.
        let events = d.temperatures(&rules, &[80.0, 85.0, 70.0, 81.0, 82.0]);
        assert!(events.is_empty(), "{events:?}");
        let raised = d.send(&rules, r#"{"temperature":83}"#);
        assert_eq!(raised.len(), 1);
        assert_eq!(raised[0].offset, 5, "raised by the third reading");
        assert_eq!(
            raised[0].alert_id,
            alert_id("hot", &d.id, 3, 3),
            "named after the reading that started the streak"
        );
        assert!(d.temperatures(&rules, &[90.0, 95.0]).is_empty());
        // The clear does not wait for three readings.
        assert_eq!(d.temperatures(&rules, &[79.0]), [(8, EventKind::Cleared)]);
    }

    #[test]
    fn for_duration_waits_until_the_condition_has_held_that_long_in_record_time() {
        let rules = rules(
            r#"
[[rule]]
name = "hot"
reading = "/temperature"
op = ">"
value = 80
severity = "warning"
for_duration = "30s"
"#,
        );
        let mut d = Device::new("alice", "thermo-1");
        let hot = r#"{"temperature":90}"#;
        assert!(d.send_after(&rules, 1_000, hot).is_empty());
        assert!(d.send_after(&rules, 20_000, hot).is_empty());
        assert!(d.send_after(&rules, 9_999, hot).is_empty(), "29.999 s");
        let raised = d.send_after(&rules, 1, hot);
        assert_eq!(raised.len(), 1, "30 s after the first breaching reading");
        assert_eq!(raised[0].alert_id, alert_id("hot", &d.id, 3, 0));

        // A break resets the clock.
        let mut d = Device::new("alice", "thermo-2");
        d.send_after(&rules, 1_000, hot);
        d.send_after(&rules, 20_000, r#"{"temperature":20}"#);
        assert!(d.send_after(&rules, 1_000, hot).is_empty());
        assert!(d.send_after(&rules, 29_000, hot).is_empty());
        assert_eq!(d.send_after(&rules, 1_000, hot).len(), 1);
    }

    #[test]
    fn cooldown_suppresses_a_raise_until_it_has_passed_then_raises_if_still_breaching() {
        let rules = rules(
            r#"
[[rule]]
name = "hot"
reading = "/temperature"
op = ">"
value = 80
severity = "warning"
cooldown = "1m"
"#,
        );
        let mut d = Device::new("alice", "thermo-1");
        let (hot, cold) = (r#"{"temperature":90}"#, r#"{"temperature":20}"#);
        assert_eq!(d.send_after(&rules, 0, hot)[0].kind, EventKind::Raised);
        assert_eq!(
            d.send_after(&rules, 10_000, cold)[0].kind,
            EventKind::Cleared
        );
        // Hot again 20 s after the raise: suppressed, and stays suppressed while it holds...
        assert!(d.send_after(&rules, 10_000, hot).is_empty());
        assert!(d.send_after(&rules, 30_000, hot).is_empty());
        // ...until the minute since the last raise is over.
        let raised = d.send_after(&rules, 20_000, hot);
        assert_eq!(raised.len(), 1);
        assert_eq!(
            raised[0].alert_id,
            alert_id("hot", &d.id, 3, 2),
            "named after the reading that started the suppressed streak"
        );
        assert_eq!(
            d.send_after(&rules, 1_000, cold)[0].kind,
            EventKind::Cleared
        );
        // A breach that ends within the cooldown never raises.
        assert!(d.send_after(&rules, 1_000, hot).is_empty());
        assert!(d.send_after(&rules, 1_000, cold).is_empty());
        // Once the cooldown is over the state is empty again.
        d.send_after(&rules, 120_000, cold);
        assert!(d.state.is_empty());
    }

    #[test]
    fn the_most_specific_rule_of_a_name_decides_for_each_device() {
        let rules = rules(
            r#"
[[rule]]
name = "hot"
reading = "/temperature"
op = ">"
value = 30
severity = "info"

[[rule]]
name = "hot"
reading = "/temperature"
op = ">"
value = 60
severity = "warning"
user = "alice"

[[rule]]
name = "hot"
reading = "/temperature"
op = ">"
value = 250
severity = "critical"
user = "alice"
device = "oven"
"#,
        );
        let at_100 = |user: &str, name: &str| {
            let mut d = Device::new(user, name);
            d.send(&rules, r#"{"temperature":100}"#)
                .iter()
                .map(|e| e.severity)
                .collect::<Vec<_>>()
        };
        assert_eq!(at_100("bob", "thermo"), [Severity::Info]);
        assert_eq!(at_100("alice", "thermo"), [Severity::Warning]);
        assert_eq!(at_100("alice", "oven"), []);
    }

    #[test]
    fn readings_without_the_value_leave_the_state_untouched() {
        let rules = rules(
            r#"
[[rule]]
name = "humid"
reading = "/env/humidity"
op = ">"
value = 90
severity = "info"
for_samples = 2
"#,
        );
        let mut d = Device::new("alice", "thermo-1");
        assert!(d.send(&rules, r#"{"env":{"humidity":95}}"#).is_empty());
        let before = d.state.clone();
        d.state.mark_saved();
        for payload in [
            r#"{"temperature":20}"#,
            r#"{"env":{"pressure":1000}}"#,
            r#"{"env":{"humidity":"wet"}}"#,
            r#"{"env":7}"#,
            "not json",
        ] {
            assert!(d.send(&rules, payload).is_empty(), "{payload}");
        }
        assert_eq!(d.state, before);
        assert!(!d.state.changed());
        // The streak carries on across them.
        assert_eq!(d.send(&rules, r#"{"env":{"humidity":96}}"#).len(), 1);
        assert!(d.state.changed());
    }

    #[test]
    fn a_range_rule_alerts_outside_its_band_and_clears_inside_the_clear_band() {
        let rules = rules(
            r#"
[[rule]]
name = "humidity-band"
reading = "/humidity"
outside = [30.0, 60.0]
clear = [35.0, 55.0]
severity = "info"
"#,
        );
        let mut d = Device::new("alice", "greenhouse");
        let mut send = |v: f64| {
            d.send(&rules, &format!(r#"{{"humidity":{v}}}"#))
                .into_iter()
                .map(|e| (e.kind, e.threshold))
                .collect::<Vec<_>>()
        };
        assert_eq!(send(45.0), []);
        assert_eq!(send(25.0), [(EventKind::Raised, 30.0)]);
        assert_eq!(
            send(32.0),
            [],
            "inside the band but not yet inside the clear band"
        );
        assert_eq!(send(40.0), [(EventKind::Cleared, 35.0)]);
        assert_eq!(send(61.0), [(EventKind::Raised, 60.0)]);
        assert_eq!(send(54.0), [(EventKind::Cleared, 55.0)]);
    }

    #[test]
    fn an_inside_rule_alerts_within_its_band() {
        let rules = rules(
            r#"
[[rule]]
name = "resonance"
reading = "/rpm"
inside = [1000, 1200]
severity = "critical"
"#,
        );
        let mut d = Device::new("alice", "motor");
        let mut send = |v: f64| {
            d.send(&rules, &format!(r#"{{"rpm":{v}}}"#))
                .into_iter()
                .map(|e| e.kind)
                .collect::<Vec<_>>()
        };
        assert_eq!(send(900.0), []);
        assert_eq!(send(1000.0), [EventKind::Raised], "bounds are inside");
        assert_eq!(send(1150.0), []);
        assert_eq!(send(1201.0), [EventKind::Cleared]);
    }

    const DEPOT: &str = r#"
[[geofence]]
name = "left-depot"
latitude = "/gps/lat"
longitude = "/gps/lon"
center = [52.0, 5.0]
radius_m = 1000
margin_m = 100
trigger = "exit"
severity = "critical"

[[geofence]]
name = "in-restricted-area"
latitude = "/gps/lat"
longitude = "/gps/lon"
polygon = [[52.10, 5.10], [52.10, 5.12], [52.12, 5.12], [52.12, 5.10]]
trigger = "enter"
severity = "warning"
"#;

    fn at(lat: f64, lon: f64) -> String {
        format!(r#"{{"gps":{{"lat":{lat},"lon":{lon}}}}}"#)
    }

    fn kinds(events: &[AlertEvent]) -> Vec<(&str, EventKind)> {
        events.iter().map(|e| (e.rule.as_str(), e.kind)).collect()
    }

    #[test]
    fn a_circle_geofence_alerts_on_exit_and_clears_once_back_past_the_margin() {
        let rules = rules(DEPOT);
        let mut truck = Device::new("fleet", "truck-7");
        assert!(truck.send(&rules, &at(52.0, 5.0)).is_empty());
        // 0.0135 degrees of latitude is about 1.5 km north: outside the 1 km circle.
        let left = truck.send(&rules, &at(52.0135, 5.0));
        assert_eq!(kinds(&left), [("left-depot", EventKind::Raised)]);
        let position = left[0].position.unwrap();
        assert_eq!((position.lat, position.lon), (52.0135, 5.0));
        assert!((left[0].value - 501.0).abs() < 5.0, "{}", left[0].value);
        let body = left[0].body();
        assert_eq!(body["latitude"], 52.0135);
        // About 950 m from the centre: inside, but not 100 m inside.
        assert!(truck.send(&rules, &at(52.0085, 5.0)).is_empty());
        let back = truck.send(&rules, &at(52.0070, 5.0));
        assert_eq!(kinds(&back), [("left-depot", EventKind::Cleared)]);
        assert_eq!(back[0].threshold, -100.0);
    }

    #[test]
    fn a_polygon_geofence_alerts_on_enter_and_clears_on_leaving() {
        let rules = rules(DEPOT);
        let mut truck = Device::new("fleet", "truck-7");
        // The restricted area is 12 km from the depot, so the depot rule raises first.
        let outside = truck.send(&rules, &at(52.09, 5.11));
        assert_eq!(kinds(&outside), [("left-depot", EventKind::Raised)]);
        let entered = truck.send(&rules, &at(52.11, 5.11));
        assert_eq!(kinds(&entered), [("in-restricted-area", EventKind::Raised)]);
        assert!(
            entered[0].value < 0.0,
            "negative inside: {}",
            entered[0].value
        );
        assert!(truck.send(&rules, &at(52.115, 5.115)).is_empty());
        let left = truck.send(&rules, &at(52.13, 5.11));
        assert_eq!(kinds(&left), [("in-restricted-area", EventKind::Cleared)]);
        // Missing or impossible coordinates are not a position.
        assert!(truck.send(&rules, r#"{"gps":{"lat":52.11}}"#).is_empty());
        assert!(truck.send(&rules, &at(152.11, 5.11)).is_empty());
    }

    #[test]
    fn a_circle_can_forbid_entry_and_a_polygon_can_require_staying_inside() {
        let rules = rules(
            r#"
[[geofence]]
name = "near-the-runway"
latitude = "/lat"
longitude = "/lon"
center = [0.0, 0.0]
radius_m = 500
trigger = "enter"
severity = "critical"

[[geofence]]
name = "left-the-farm"
latitude = "/lat"
longitude = "/lon"
polygon = [[1.0, 1.0], [1.0, 1.1], [1.1, 1.1], [1.1, 1.0]]
trigger = "exit"
severity = "warning"
"#,
        );
        let at = |lat: f64, lon: f64| format!(r#"{{"lat":{lat},"lon":{lon}}}"#);
        let mut drone = Device::new("air", "drone-1");
        // On the farm, far from the runway.
        assert!(drone.send(&rules, &at(1.05, 1.05)).is_empty());
        assert_eq!(
            kinds(&drone.send(&rules, &at(1.2, 1.05))),
            [("left-the-farm", EventKind::Raised)]
        );
        assert_eq!(
            kinds(&drone.send(&rules, &at(0.001, 0.001))),
            [("near-the-runway", EventKind::Raised)],
            "about 157 m from the runway's centre"
        );
        assert_eq!(
            kinds(&drone.send(&rules, &at(0.01, 0.0))),
            [("near-the-runway", EventKind::Cleared)],
            "about 1.1 km away"
        );
        assert_eq!(
            kinds(&drone.send(&rules, &at(1.09, 1.01))),
            [("left-the-farm", EventKind::Cleared)]
        );
    }

    #[test]
    fn state_survives_a_round_trip_through_json_mid_streak_and_mid_alert() {
        let rules = rules(
            r#"
[[rule]]
name = "hot"
reading = "/temperature"
op = ">"
value = 80
clear = 75
severity = "warning"
for_samples = 2
cooldown = "10m"
"#,
        );
        let mut straight = Device::new("alice", "thermo-1");
        let mut restarted = Device::new("alice", "thermo-1");
        let values = [90.0, 95.0, 78.0, 70.0, 85.0, 86.0, 87.0, 60.0];
        let mut expected = Vec::new();
        let mut got = Vec::new();
        for v in values {
            let payload = format!(r#"{{"temperature":{v}}}"#);
            expected.extend(straight.send(&rules, &payload));
            got.extend(restarted.send(&rules, &payload));
            // As if the worker stored the state and another replica loaded it.
            let stored = serde_json::to_string(&restarted.state.to_json()).unwrap();
            let loaded: Value = serde_json::from_str(&stored).unwrap();
            restarted.state = DeviceState::from_json(&loaded).unwrap();
            assert!(!restarted.state.changed());
        }
        assert_eq!(got, expected);
        assert_eq!(
            kinds(&got),
            [("hot", EventKind::Raised), ("hot", EventKind::Cleared)]
        );
        assert_eq!(restarted.state, straight.state);
        assert!(!straight.state.is_empty(), "the cooldown is remembered");
    }

    #[test]
    fn stored_state_has_a_readable_shape_and_rejects_unknown_members() {
        let rules = rules(HIGH_TEMP);
        let mut d = Device::new("alice", "thermo-1");
        assert_eq!(d.state.to_json(), serde_json::json!({}));
        d.send(&rules, r#"{"temperature":90}"#);
        let json = d.state.to_json();
        let hot = &json["rules"]["high-temp"];
        assert_eq!(
            hot["active"]["alert_id"],
            alert_id("high-temp", &d.id, 3, 0)
        );
        assert_eq!(hot["active"]["severity"], "warning");
        assert_eq!(hot["rule"].as_str().unwrap().len(), 16);
        assert_eq!(
            d.state.active_alerts().collect::<Vec<_>>(),
            [("high-temp", alert_id("high-temp", &d.id, 3, 0).as_str())]
        );
        let e = DeviceState::from_json(&serde_json::json!({"rulez": {}})).unwrap_err();
        assert!(e.to_string().contains("rulez"), "{e}");
    }

    #[test]
    fn alert_ids_are_deterministic_and_differ_by_rule_device_and_position() {
        let a = device("alice", "thermo-1");
        let id = alert_id("hot", &a, 0, 42);
        assert_eq!(id, alert_id("hot", &a, 0, 42));
        assert_eq!(id.len(), 32);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        // Pinned (SHA-256 of length-prefixed rule, user, device, then big-endian partition and
        // offset): a change here would make replays raise alerts under new ids.
        assert_eq!(id, "823f85c6ae9e8721d4de0697fd175b11");
        let others = [
            alert_id("hot2", &a, 0, 42),
            alert_id("hot", &device("alice", "thermo-2"), 0, 42),
            alert_id("hot", &a, 1, 42),
            alert_id("hot", &a, 0, 43),
            alert_id("ho", &device("talice", "thermo-1"), 0, 42),
        ];
        for other in others {
            assert_ne!(other, id);
        }

        // Replaying the same readings from the same state gives the same events.
        let rules = rules(HIGH_TEMP_WITH_CLEAR);
        let run = || {
            let mut d = Device::new("alice", "thermo-1");
            let mut events = Vec::new();
            for v in [70.0, 85.0, 90.0, 60.0, 81.0, 50.0] {
                events.extend(d.send(&rules, &format!(r#"{{"temperature":{v}}}"#)));
            }
            events
        };
        let first = run();
        assert_eq!(first.len(), 4);
        assert_eq!(first, run());
    }

    #[test]
    fn event_ids_depend_only_on_the_alert_and_the_kind() {
        let alert = alert_id("hot", &device("alice", "thermo-1"), 0, 42);
        let raised = event_id(&alert, EventKind::Raised);
        assert_eq!(raised, event_id(&alert, EventKind::Raised));
        assert_ne!(raised, event_id(&alert, EventKind::Cleared));
        // Pinned (SHA-256 of "{alert_id}/{event}"): subscribers keep these ids to drop repeats,
        // and the outbox derives packet ids from them, across versions and restores.
        assert_eq!(raised, "cedc2ea8fc9cb3af9ac0df189785e188");
    }

    #[test]
    fn removing_a_rule_drops_its_state_and_unchanged_rules_keep_theirs() {
        let both = rules(
            r#"
[[rule]]
name = "hot"
reading = "/temperature"
op = ">"
value = 80
severity = "warning"

[[rule]]
name = "humid"
reading = "/humidity"
op = ">"
value = 90
severity = "info"
for_samples = 2
"#,
        );
        let mut d = Device::new("alice", "thermo-1");
        let raised = d.send(&both, r#"{"temperature":90,"humidity":95}"#);
        assert_eq!(kinds(&raised), [("hot", EventKind::Raised)]);
        // Reload without "humid": its streak is forgotten, "hot" stays raised.
        let only_hot = rules(HIGH_TEMP.replace("high-temp", "hot").as_str());
        d.state.mark_saved();
        d.state.retain_rules(&only_hot, &d.id.clone());
        assert!(d.state.changed());
        assert_eq!(d.state.active_alerts().count(), 1);
        assert!(d.send(&only_hot, r#"{"temperature":95}"#).is_empty());
        assert_eq!(
            kinds(&d.send(&only_hot, r#"{"temperature":20}"#)),
            [("hot", EventKind::Cleared)]
        );
        // Back with "humid": it starts from scratch (one reading is not two).
        assert!(d.send(&both, r#"{"humidity":95}"#).is_empty());
        assert_eq!(
            kinds(&d.send(&both, r#"{"humidity":95}"#)),
            [("humid", EventKind::Raised)]
        );
    }

    #[test]
    fn changing_a_rules_terms_restarts_its_streak_but_keeps_an_open_alert() {
        let samples = |n: u32, value: u32| {
            rules(&format!(
                "[[rule]]\nname = \"hot\"\nreading = \"/t\"\nop = \">\"\nvalue = {value}\n\
                 severity = \"info\"\nfor_samples = {n}\n"
            ))
        };
        let mut d = Device::new("alice", "thermo-1");
        assert!(d.send(&samples(3, 80), r#"{"t":90}"#).is_empty());
        assert!(d.send(&samples(3, 80), r#"{"t":90}"#).is_empty());
        // Same terms, another severity would keep the streak; new terms restart it.
        assert!(d.send(&samples(3, 85), r#"{"t":90}"#).is_empty());
        assert!(d.send(&samples(3, 85), r#"{"t":90}"#).is_empty());
        let raised = d.send(&samples(3, 85), r#"{"t":90}"#);
        assert_eq!(raised[0].alert_id, alert_id("hot", &d.id, 3, 2));
        // Raised under 85; the rule moves to 95 and the alert clears under the new terms.
        let cleared = d.send(&samples(3, 95), r#"{"t":90}"#);
        assert_eq!(kinds(&cleared), [("hot", EventKind::Cleared)]);
        assert_eq!(cleared[0].alert_id, raised[0].alert_id);
    }

    #[test]
    fn the_message_body_carries_everything_a_subscriber_needs() {
        let rules = rules(HIGH_TEMP);
        let mut d = Device::new("alice", "thermo-1");
        let event = d.send(&rules, r#"{"temperature":81.5}"#).remove(0);
        assert_eq!(
            event.body(),
            serde_json::json!({
                "event_id": event_id(&alert_id("high-temp", &d.id, 3, 0), EventKind::Raised),
                "alert_id": alert_id("high-temp", &d.id, 3, 0),
                "event": "raised",
                "rule": "high-temp",
                "severity": "warning",
                "user": "alice",
                "device": "thermo-1",
                "value": 81.5,
                "threshold": 80.0,
                "occurred_at": "2025-11-24T16:00:01.000Z",
                "kafka_partition": 3,
                "kafka_offset": 0,
            })
        );
    }
}
