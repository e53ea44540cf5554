//! The rules file: what to alert on, for which devices, and how eagerly.
//!
//! A file holds `[[rule]]` tables (a reading compared with a threshold or a range) and
//! `[[geofence]]` tables (a position inside or outside a circle or polygon). Everything is
//! checked when the file is loaded, so evaluation never meets a rule it cannot apply; an error
//! names the rule and the field (`rule 'high-temp': field 'clear' must be below 'value' for
//! '>'`). `examples/rules.toml` documents every field.
//!
//! Rules that share a `name` are one rule with several scopes: for a device, the most specific
//! scope wins (device, then user, then all devices). Alert state is kept per rule name, so an
//! override takes over the state of the rule it replaces.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use telemetry_core::contract::{DeviceId, MAX_ID_BYTES};

use crate::error::AlertError;

/// How urgent an alert is; carried in the alert message and as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 3] = [Severity::Info, Severity::Warning, Severity::Critical];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A comparison between a reading and a threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = ">")]
    Above,
    #[serde(rename = ">=")]
    AtLeast,
    #[serde(rename = "<")]
    Below,
    #[serde(rename = "<=")]
    AtMost,
}

impl Op {
    pub fn symbol(self) -> &'static str {
        match self {
            Op::Above => ">",
            Op::AtLeast => ">=",
            Op::Below => "<",
            Op::AtMost => "<=",
        }
    }

    /// Whether `value op threshold` holds.
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Op::Above => value > threshold,
            Op::AtLeast => value >= threshold,
            Op::Below => value < threshold,
            Op::AtMost => value <= threshold,
        }
    }

    /// True for `>` and `>=`: the alert is about values that are too high.
    pub fn is_upper(self) -> bool {
        matches!(self, Op::Above | Op::AtLeast)
    }
}

/// Which devices a rule applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    All,
    User(String),
    Device(DeviceId),
}

impl Scope {
    /// Higher is more specific; the most specific rule of a name wins.
    fn rank(&self) -> u8 {
        match self {
            Scope::All => 0,
            Scope::User(_) => 1,
            Scope::Device(_) => 2,
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::All => f.write_str("all devices"),
            Scope::User(user) => write!(f, "user '{user}'"),
            Scope::Device(device) => {
                write!(f, "user '{}', device '{}'", device.user, device.device)
            }
        }
    }
}

/// A point on Earth, in degrees.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatLon {
    pub lat: f64,
    pub lon: f64,
}

/// What a rule tests. Serialized only to fingerprint a rule (see [`Rule::fingerprint`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Condition {
    /// One numeric reading, found by a JSON pointer into the payload.
    Threshold {
        reading: String,
        test: Test,
    },
    Geofence(Geofence),
}

/// A numeric test, with its optional hysteresis (`clear`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Test {
    /// Alert while `reading op value`; clear once the reading is back past `clear` (below it for
    /// `>`/`>=`, above it for `<`/`<=`), or once the comparison fails when `clear` is not set.
    Compare {
        op: Op,
        value: f64,
        clear: Option<f64>,
    },
    /// Alert while the reading is below `low` or above `high`; clear once it is back within
    /// `clear` (a narrower range), or within `[low, high]` when `clear` is not set.
    Outside {
        low: f64,
        high: f64,
        clear: Option<[f64; 2]>,
    },
    /// Alert while `low <= reading <= high`; clear once the reading leaves `clear` (a wider
    /// range), or `[low, high]` when `clear` is not set.
    Inside {
        low: f64,
        high: f64,
        clear: Option<[f64; 2]>,
    },
}

/// A position test on two readings (latitude and longitude).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Geofence {
    pub latitude: String,
    pub longitude: String,
    pub shape: Shape,
    pub trigger: Trigger,
    /// Hysteresis in metres: an alert clears only once the position is this far back on the
    /// allowed side of the boundary, so GPS jitter along the fence does not flap.
    pub margin_m: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Shape {
    Circle {
        center: LatLon,
        radius_m: f64,
    },
    /// Vertices in order; the last connects back to the first.
    Polygon(Vec<LatLon>),
}

/// When a geofence alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// While the device is outside the shape (it left its area).
    Exit,
    /// While the device is inside the shape (it entered a forbidden area).
    Enter,
}

/// How long a condition must hold before the alert is raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Hold {
    /// At the first reading that meets the condition.
    Immediately,
    /// After this many consecutive readings meet it.
    Samples(u32),
    /// Once it has held for this long since the first reading that met it (record time).
    Duration(Duration),
}

/// One validated rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub name: String,
    pub scope: Scope,
    pub severity: Severity,
    pub condition: Condition,
    pub hold: Hold,
    /// Minimum record time between two raises of this rule for one device.
    pub cooldown: Option<Duration>,
    fingerprint: String,
}

impl Rule {
    /// A short, stable hash of what decides when this rule raises and clears (its condition and
    /// hold, not its scope, severity or cooldown). Stored with a device's state: when it changes,
    /// a half-counted streak starts over instead of being finished under different terms.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

/// A validated rules file, indexed by scope for per-reading lookups.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleSet {
    rules: Vec<Rule>,
    for_all: Vec<usize>,
    by_user: HashMap<String, Vec<usize>>,
    by_device: HashMap<String, HashMap<String, Vec<usize>>>,
}

impl RuleSet {
    /// No rules: nothing ever alerts.
    pub fn empty() -> RuleSet {
        RuleSet::default()
    }

    /// Parses and checks a rules file's text.
    pub fn from_toml(text: &str) -> Result<RuleSet, AlertError> {
        let file: RulesFile =
            toml::from_str(text).map_err(|e| AlertError::RulesSyntax(Box::new(e)))?;
        let mut rules = Vec::with_capacity(file.rule.len() + file.geofence.len());
        for (i, raw) in file.rule.into_iter().enumerate() {
            rules.push(raw.validate(i)?);
        }
        for (i, raw) in file.geofence.into_iter().enumerate() {
            rules.push(raw.validate(i)?);
        }
        RuleSet::new(rules)
    }

    /// Reads and checks a rules file; errors name the file.
    pub fn load(path: &Path) -> Result<RuleSet, AlertError> {
        let text = std::fs::read_to_string(path).map_err(|source| AlertError::ReadRules {
            path: path.to_owned(),
            source,
        })?;
        RuleSet::from_toml(&text).map_err(|e| AlertError::RulesFile {
            path: path.to_owned(),
            source: Box::new(e),
        })
    }

    fn new(rules: Vec<Rule>) -> Result<RuleSet, AlertError> {
        let mut seen = HashSet::new();
        let mut set = RuleSet::default();
        for (i, rule) in rules.iter().enumerate() {
            if !seen.insert((rule.name.as_str(), &rule.scope)) {
                return Err(AlertError::invalid_rule(
                    &rule.name,
                    "name",
                    format!(
                        "is used twice for {}; rules that share a name must differ in scope",
                        rule.scope
                    ),
                ));
            }
            match &rule.scope {
                Scope::All => set.for_all.push(i),
                Scope::User(user) => set.by_user.entry(user.clone()).or_default().push(i),
                Scope::Device(id) => set
                    .by_device
                    .entry(id.user.clone())
                    .or_default()
                    .entry(id.device.clone())
                    .or_default()
                    .push(i),
            }
        }
        set.rules = rules;
        Ok(set)
    }

    /// Every rule, in file order (`[[rule]]` tables, then `[[geofence]]` tables).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules that apply to a device: per name, the one with the most specific scope. Sorted
    /// by name, which is also the order in which their events are produced.
    pub fn for_device(&self, device: &DeviceId) -> Vec<&Rule> {
        if self.rules.is_empty() {
            return Vec::new();
        }
        let user = self.by_user.get(&device.user).into_iter().flatten();
        let own = self
            .by_device
            .get(&device.user)
            .and_then(|devices| devices.get(&device.device))
            .into_iter()
            .flatten();
        let mut chosen: BTreeMap<&str, &Rule> = BTreeMap::new();
        for rule in self
            .for_all
            .iter()
            .chain(user)
            .chain(own)
            .map(|&i| &self.rules[i])
        {
            // Scopes come least specific first, so a later insert is an override.
            debug_assert!(chosen
                .get(rule.name.as_str())
                .is_none_or(|r| r.scope.rank() < rule.scope.rank()));
            chosen.insert(&rule.name, rule);
        }
        chosen.into_values().collect()
    }
}

/// The file as written, before checks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    rule: Vec<RawRule>,
    #[serde(default)]
    geofence: Vec<RawGeofence>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    reading: String,
    op: Option<Op>,
    value: Option<f64>,
    outside: Option<[f64; 2]>,
    inside: Option<[f64; 2]>,
    /// A number for a comparison, `[low, high]` for a range: checked by hand for a clearer
    /// message than an untagged enum would give.
    clear: Option<toml::Value>,
    severity: Severity,
    user: Option<String>,
    device: Option<String>,
    for_samples: Option<u32>,
    for_duration: Option<String>,
    cooldown: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGeofence {
    name: String,
    latitude: String,
    longitude: String,
    center: Option<[f64; 2]>,
    radius_m: Option<f64>,
    polygon: Option<Vec<[f64; 2]>>,
    trigger: Trigger,
    margin_m: Option<f64>,
    severity: Severity,
    user: Option<String>,
    device: Option<String>,
    for_samples: Option<u32>,
    for_duration: Option<String>,
    cooldown: Option<String>,
}

/// The fields every kind of rule has.
struct Common<'a> {
    name: &'a str,
    user: Option<&'a str>,
    device: Option<&'a str>,
    for_samples: Option<u32>,
    for_duration: Option<&'a str>,
    cooldown: Option<&'a str>,
}

/// Names the rule in every error.
struct Check<'a> {
    rule: &'a str,
}

impl Check<'_> {
    fn fail<T>(&self, field: &'static str, message: impl Into<String>) -> Result<T, AlertError> {
        Err(AlertError::invalid_rule(self.rule, field, message))
    }

    fn finite(&self, field: &'static str, value: f64) -> Result<f64, AlertError> {
        if value.is_finite() {
            Ok(value)
        } else {
            self.fail(field, format!("must be a finite number, got {value}"))
        }
    }

    fn pointer(&self, field: &'static str, pointer: &str) -> Result<String, AlertError> {
        let escapes_ok = pointer
            .split('~')
            .skip(1)
            .all(|rest| rest.starts_with(['0', '1']));
        if !pointer.starts_with('/') || pointer.len() < 2 || !escapes_ok {
            return self.fail(
                field,
                format!(
                    "'{pointer}' is not a JSON pointer to a reading; write it like \
                     \"/temperature\" or \"/env/humidity\""
                ),
            );
        }
        Ok(pointer.to_owned())
    }

    fn range(&self, field: &'static str, [low, high]: [f64; 2]) -> Result<(f64, f64), AlertError> {
        let low = self.finite(field, low)?;
        let high = self.finite(field, high)?;
        if low >= high {
            return self.fail(
                field,
                format!("must be [low, high] with low below high, got [{low}, {high}]"),
            );
        }
        Ok((low, high))
    }

    fn position(&self, field: &'static str, [lat, lon]: [f64; 2]) -> Result<LatLon, AlertError> {
        if !(-90.0..=90.0).contains(&lat) {
            return self.fail(
                field,
                format!("has latitude {lat}, outside -90..90; points are [lat, lon]"),
            );
        }
        if !(-180.0..=180.0).contains(&lon) {
            return self.fail(
                field,
                format!("has longitude {lon}, outside -180..180; points are [lat, lon]"),
            );
        }
        Ok(LatLon { lat, lon })
    }

    fn duration(&self, field: &'static str, text: &str) -> Result<Duration, AlertError> {
        match parse_duration(text) {
            Some(d) if !d.is_zero() => Ok(d),
            Some(_) => self.fail(field, "must be longer than zero; leave it out instead"),
            None => self.fail(
                field,
                format!(
                    "'{text}' is not a duration; write e.g. \"30s\", \"5m\", \"1h30m\" or \"500ms\""
                ),
            ),
        }
    }
}

impl Common<'_> {
    fn check(&self) -> Check<'_> {
        Check { rule: self.name }
    }

    /// Checks the shared fields and builds the rule around `condition`.
    fn into_rule(self, condition: Condition, severity: Severity) -> Result<Rule, AlertError> {
        let check = self.check();
        let scope = match (self.user, self.device) {
            (None, None) => Scope::All,
            (Some(user), None) => {
                DeviceId::new(user, "-").map_err(|e| {
                    AlertError::invalid_rule(self.name, "user", format!("'{user}': {e}"))
                })?;
                Scope::User(user.to_owned())
            }
            (Some(user), Some(device)) => {
                Scope::Device(DeviceId::new(user, device).map_err(|e| {
                    AlertError::invalid_rule(self.name, "device", format!("'{device}': {e}"))
                })?)
            }
            (None, Some(_)) => {
                return check.fail(
                    "device",
                    "needs 'user' as well: a device id is only unique within its user",
                )
            }
        };
        let hold = match (self.for_samples, self.for_duration) {
            (None, None) => Hold::Immediately,
            (Some(0), _) => return check.fail("for_samples", "must be at least 1"),
            (Some(n), None) => Hold::Samples(n),
            (None, Some(text)) => Hold::Duration(check.duration("for_duration", text)?),
            (Some(_), Some(_)) => {
                return check.fail(
                    "for_duration",
                    "cannot be combined with 'for_samples'; keep one of them",
                )
            }
        };
        let cooldown = self
            .cooldown
            .map(|text| check.duration("cooldown", text))
            .transpose()?;
        let fingerprint = fingerprint(&condition, &hold);
        Ok(Rule {
            name: self.name.to_owned(),
            scope,
            severity,
            condition,
            hold,
            cooldown,
            fingerprint,
        })
    }
}

fn check_name(name: &str, kind: &str, index: usize) -> Result<(), AlertError> {
    let problem = if name.trim().is_empty() {
        "is empty"
    } else if name.len() > MAX_ID_BYTES {
        "is longer than 128 bytes"
    } else if name.chars().any(char::is_control) {
        "contains a control character"
    } else {
        return Ok(());
    };
    Err(AlertError::invalid_rule(
        name,
        "name",
        format!("{problem} (in [[{kind}]] number {})", index + 1),
    ))
}

impl RawRule {
    fn validate(self, index: usize) -> Result<Rule, AlertError> {
        check_name(&self.name, "rule", index)?;
        let check = Check { rule: &self.name };
        let reading = check.pointer("reading", &self.reading)?;
        let test = match (self.op, self.value, self.outside, self.inside) {
            (Some(op), Some(value), None, None) => {
                let value = check.finite("value", value)?;
                let clear = match &self.clear {
                    None => None,
                    Some(clear) => Some(check.compare_clear(clear, op, value)?),
                };
                Test::Compare { op, value, clear }
            }
            (None, None, Some(range), None) => {
                let (low, high) = check.range("outside", range)?;
                let clear = match &self.clear {
                    None => None,
                    Some(clear) => {
                        let (cl, ch) = check.range_clear(clear)?;
                        if cl < low || ch > high {
                            return check.fail(
                                "clear",
                                format!(
                                    "must lie within 'outside' [{low}, {high}] (the alert clears \
                                     once the reading is back inside it), got [{cl}, {ch}]"
                                ),
                            );
                        }
                        Some([cl, ch])
                    }
                };
                Test::Outside { low, high, clear }
            }
            (None, None, None, Some(range)) => {
                let (low, high) = check.range("inside", range)?;
                let clear = match &self.clear {
                    None => None,
                    Some(clear) => {
                        let (cl, ch) = check.range_clear(clear)?;
                        if cl > low || ch < high {
                            return check.fail(
                                "clear",
                                format!(
                                    "must enclose 'inside' [{low}, {high}] (the alert clears once \
                                     the reading leaves it), got [{cl}, {ch}]"
                                ),
                            );
                        }
                        Some([cl, ch])
                    }
                };
                Test::Inside { low, high, clear }
            }
            (Some(_), None, None, None) => {
                return check.fail("value", "is missing; 'op' compares the reading with it")
            }
            (None, Some(_), None, None) => {
                return check.fail(
                    "op",
                    "is missing; 'value' needs a comparison: \">\", \">=\", \"<\" or \"<=\"",
                )
            }
            (None, None, None, None) => {
                return check.fail(
                    "op",
                    "is missing: give 'op' and 'value' (e.g. op = \">\", value = 80.0), or \
                     'outside' or 'inside' = [low, high]",
                )
            }
            (op, _, outside, _) => {
                let field = if op.is_some() { "op" } else { "outside" };
                let others = match (op.is_some(), outside.is_some()) {
                    (true, true) => "'outside'",
                    _ => "'inside'",
                };
                return check.fail(
                    field,
                    format!("cannot be combined with {others}; a rule has one condition"),
                );
            }
        };
        Common {
            name: &self.name,
            user: self.user.as_deref(),
            device: self.device.as_deref(),
            for_samples: self.for_samples,
            for_duration: self.for_duration.as_deref(),
            cooldown: self.cooldown.as_deref(),
        }
        .into_rule(Condition::Threshold { reading, test }, self.severity)
    }
}

impl Check<'_> {
    fn compare_clear(&self, clear: &toml::Value, op: Op, value: f64) -> Result<f64, AlertError> {
        let clear = match clear {
            toml::Value::Float(f) => self.finite("clear", *f)?,
            toml::Value::Integer(i) => *i as f64,
            other => {
                return self.fail(
                    "clear",
                    format!(
                        "must be a number for a comparison ('op' = \"{}\"), got {other}",
                        op.symbol()
                    ),
                )
            }
        };
        let (ok, side) = if op.is_upper() {
            (clear < value, "below")
        } else {
            (clear > value, "above")
        };
        if !ok {
            return self.fail(
                "clear",
                format!(
                    "must be {side} 'value' for '{}' (got clear = {clear}, value = {value})",
                    op.symbol()
                ),
            );
        }
        Ok(clear)
    }

    fn range_clear(&self, clear: &toml::Value) -> Result<(f64, f64), AlertError> {
        let number = |v: &toml::Value| match v {
            toml::Value::Float(f) => Some(*f),
            toml::Value::Integer(i) => Some(*i as f64),
            _ => None,
        };
        match clear {
            toml::Value::Array(items) if items.len() == 2 => {
                match (number(&items[0]), number(&items[1])) {
                    (Some(low), Some(high)) => {
                        let low = self.finite("clear", low)?;
                        let high = self.finite("clear", high)?;
                        if low > high {
                            return self.fail(
                                "clear",
                                format!(
                                    "must be [low, high] with low <= high, got [{low}, {high}]"
                                ),
                            );
                        }
                        Ok((low, high))
                    }
                    _ => self.fail("clear", "must be [low, high] of two numbers for a range"),
                }
            }
            other => self.fail(
                "clear",
                format!("must be [low, high] for a range rule, got {other}"),
            ),
        }
    }
}

impl RawGeofence {
    fn validate(self, index: usize) -> Result<Rule, AlertError> {
        check_name(&self.name, "geofence", index)?;
        let check = Check { rule: &self.name };
        let latitude = check.pointer("latitude", &self.latitude)?;
        let longitude = check.pointer("longitude", &self.longitude)?;
        let margin_m = match self.margin_m {
            None => 0.0,
            Some(m) if m.is_finite() && m >= 0.0 => m,
            Some(m) => return check.fail("margin_m", format!("must be 0 or more metres, got {m}")),
        };
        let shape =
            match (self.center, self.radius_m, self.polygon) {
                (Some(center), Some(radius_m), None) => {
                    let center = check.position("center", center)?;
                    if !(radius_m.is_finite() && radius_m > 0.0) {
                        return check.fail(
                            "radius_m",
                            format!("must be more than 0 metres, got {radius_m}"),
                        );
                    }
                    if self.trigger == Trigger::Exit && margin_m >= radius_m {
                        return check.fail(
                            "margin_m",
                            format!(
                            "must be smaller than 'radius_m' ({radius_m}) for trigger \"exit\", \
                             or the alert could never clear"
                        ),
                        );
                    }
                    Shape::Circle { center, radius_m }
                }
                (None, None, Some(points)) => {
                    if points.len() < 3 {
                        return check.fail(
                            "polygon",
                            format!("needs at least 3 points [lat, lon], got {}", points.len()),
                        );
                    }
                    let points = points
                        .into_iter()
                        .map(|p| check.position("polygon", p))
                        .collect::<Result<Vec<_>, _>>()?;
                    Shape::Polygon(points)
                }
                (Some(_), None, None) => {
                    return check.fail(
                        "radius_m",
                        "is missing; a circle needs 'center' and 'radius_m'",
                    )
                }
                (None, Some(_), None) => {
                    return check.fail(
                        "center",
                        "is missing; a circle needs 'center' and 'radius_m'",
                    )
                }
                (None, None, None) => {
                    return check.fail(
                        "center",
                        "is missing: give 'center' = [lat, lon] with 'radius_m', or 'polygon' = \
                     [[lat, lon], ...]",
                    )
                }
                (_, _, Some(_)) => return check.fail(
                    "polygon",
                    "cannot be combined with 'center' or 'radius_m'; a geofence is a circle or a \
                     polygon",
                ),
            };
        let geofence = Geofence {
            latitude,
            longitude,
            shape,
            trigger: self.trigger,
            margin_m,
        };
        Common {
            name: &self.name,
            user: self.user.as_deref(),
            device: self.device.as_deref(),
            for_samples: self.for_samples,
            for_duration: self.for_duration.as_deref(),
            cooldown: self.cooldown.as_deref(),
        }
        .into_rule(Condition::Geofence(geofence), self.severity)
    }
}

fn fingerprint(condition: &Condition, hold: &Hold) -> String {
    // serde_json output of these types is deterministic (struct field order, shortest
    // round-trip floats), so the fingerprint is stable across processes and restarts.
    let canonical = serde_json::to_vec(&(condition, hold)).expect("rules serialize to JSON");
    hex(&Sha256::digest(&canonical)[..8])
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// Parses `500ms`, `30s`, `5m`, `2h`, `1d` and sums like `1h30m`. Whole numbers only.
pub(crate) fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let number: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit_ms: u64 = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total = total.checked_add(Duration::from_millis(number.checked_mul(unit_ms)?))?;
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        RuleSet::from_toml(text).unwrap_err().to_string()
    }

    fn device(user: &str, device: &str) -> DeviceId {
        DeviceId::new(user, device).unwrap()
    }

    #[test]
    fn the_example_file_is_valid_and_has_the_load_tester_rule() {
        let rules = RuleSet::from_toml(include_str!("../examples/rules.toml")).unwrap();
        let high = rules
            .for_device(&device("any-user", "any-device"))
            .into_iter()
            .find(|r| r.name == "high-temperature")
            .expect("a rule for every device named high-temperature");
        assert_eq!(high.scope, Scope::All);
        assert_eq!(high.severity, Severity::Warning);
        assert_eq!(
            high.condition,
            Condition::Threshold {
                reading: "/temperature".into(),
                test: Test::Compare {
                    op: Op::Above,
                    value: 80.0,
                    clear: Some(75.0)
                }
            }
        );
        assert!(rules
            .rules()
            .iter()
            .any(|r| matches!(r.condition, Condition::Geofence(_))));
    }

    #[test]
    fn a_clear_threshold_on_the_wrong_side_names_the_rule_and_the_field() {
        let e = error(
            r#"[[rule]]
name = "high-temp"
reading = "/temperature"
op = ">"
value = 80.0
clear = 85.0
severity = "warning"
"#,
        );
        assert_eq!(
            e,
            "rule 'high-temp': field 'clear' must be below 'value' for '>' (got clear = 85, value = 80)"
        );
        let e = error(
            r#"[[rule]]
name = "low-battery"
reading = "/battery"
op = "<="
value = 10
clear = 5
severity = "info"
"#,
        );
        assert!(
            e.starts_with("rule 'low-battery': field 'clear' must be above 'value' for '<='"),
            "{e}"
        );
    }

    #[test]
    fn each_mistake_is_named_by_rule_and_field() {
        let base = |extra: &str| {
            format!("[[rule]]\nname = \"r\"\nreading = \"/t\"\nseverity = \"info\"\n{extra}")
        };
        let cases = [
            ("op = \">\"", "field 'value' is missing"),
            ("value = 3", "field 'op' is missing"),
            ("", "field 'op' is missing: give"),
            (
                "op = \">\"\nvalue = 1\noutside = [0, 1]",
                "field 'op' cannot be combined with 'outside'",
            ),
            (
                "outside = [0, 1]\ninside = [0, 1]",
                "field 'outside' cannot be combined with 'inside'",
            ),
            ("outside = [5, 1]", "field 'outside' must be [low, high]"),
            (
                "outside = [0, 10]\nclear = [-1, 5]",
                "field 'clear' must lie within 'outside'",
            ),
            (
                "inside = [0, 10]\nclear = [1, 11]",
                "field 'clear' must enclose 'inside'",
            ),
            (
                "inside = [0, 10]\nclear = 3",
                "field 'clear' must be [low, high] for a range rule",
            ),
            (
                "op = \">\"\nvalue = 1\nclear = [0, 1]",
                "field 'clear' must be a number",
            ),
            (
                "op = \">\"\nvalue = nan",
                "field 'value' must be a finite number",
            ),
            (
                "op = \">\"\nvalue = 1\ndevice = \"d1\"",
                "field 'device' needs 'user'",
            ),
            (
                "op = \">\"\nvalue = 1\nuser = \"a+b\"",
                "field 'user' 'a+b': the user id",
            ),
            (
                "op = \">\"\nvalue = 1\nfor_samples = 0",
                "field 'for_samples' must be at least 1",
            ),
            (
                "op = \">\"\nvalue = 1\nfor_samples = 2\nfor_duration = \"1s\"",
                "field 'for_duration' cannot be combined with 'for_samples'",
            ),
            (
                "op = \">\"\nvalue = 1\nfor_duration = \"soon\"",
                "field 'for_duration' 'soon' is not a duration",
            ),
            (
                "op = \">\"\nvalue = 1\ncooldown = \"0s\"",
                "field 'cooldown' must be longer than zero",
            ),
        ];
        for (extra, expected) in cases {
            let e = error(&base(extra));
            assert!(
                e.starts_with("rule 'r': ") && e.contains(expected),
                "{extra:?}: {e}"
            );
        }
        let e = error("[[rule]]\nname = \"r\"\nreading = \"temperature\"\nseverity = \"info\"\nop = \">\"\nvalue = 1");
        assert!(
            e.contains("rule 'r': field 'reading' 'temperature' is not a JSON pointer"),
            "{e}"
        );
    }

    #[test]
    fn geofence_mistakes_are_named_by_rule_and_field() {
        let base = |extra: &str| {
            format!(
                "[[geofence]]\nname = \"g\"\nlatitude = \"/lat\"\nlongitude = \"/lon\"\n\
                 severity = \"critical\"\ntrigger = \"exit\"\n{extra}"
            )
        };
        let cases = [
            ("", "field 'center' is missing"),
            ("center = [1, 2]", "field 'radius_m' is missing"),
            ("radius_m = 5", "field 'center' is missing; a circle"),
            (
                "center = [91, 2]\nradius_m = 5",
                "field 'center' has latitude 91",
            ),
            (
                "center = [1, 200]\nradius_m = 5",
                "field 'center' has longitude 200",
            ),
            (
                "center = [1, 2]\nradius_m = 0",
                "field 'radius_m' must be more than 0",
            ),
            (
                "center = [1, 2]\nradius_m = 50\nmargin_m = 50",
                "field 'margin_m' must be smaller than 'radius_m'",
            ),
            (
                "polygon = [[0, 0], [1, 1]]",
                "field 'polygon' needs at least 3 points",
            ),
            (
                "polygon = [[0, 0], [1, 1], [1, 0]]\ncenter = [1, 2]",
                "field 'polygon' cannot be combined",
            ),
        ];
        for (extra, expected) in cases {
            let e = error(&base(extra));
            assert!(
                e.starts_with("rule 'g': ") && e.contains(expected),
                "{extra:?}: {e}"
            );
        }
    }

    #[test]
    fn unknown_fields_and_bad_values_point_at_the_line() {
        let e = error("[[rule]]\nname = \"r\"\nreading = \"/t\"\nseverity = \"info\"\nop = \">\"\nvalue = 1\nthreshold = 3\n");
        assert!(
            e.contains("unknown field `threshold`") && e.contains("line 7"),
            "{e}"
        );
        let e = error("[[rule]]\nname = \"r\"\nreading = \"/t\"\nseverity = \"urgent\"\nop = \">\"\nvalue = 1\n");
        assert!(
            e.contains("urgent") && e.contains("critical") && e.contains("line 4"),
            "{e}"
        );
        let e = error("[[rule]]\nname = \"r\"\nreading = \"/t\"\nseverity = \"info\"\nop = \"=>\"\nvalue = 1\n");
        assert!(e.contains("=>") && e.contains(">="), "{e}");
        let e = error("[[rules]]\nname = \"r\"\n");
        assert!(e.contains("unknown field `rules`"), "{e}");
    }

    #[test]
    fn two_rules_with_the_same_name_and_scope_are_rejected() {
        let rule = "[[rule]]\nname = \"r\"\nreading = \"/t\"\nseverity = \"info\"\nop = \">\"\nvalue = 1\nuser = \"alice\"\n";
        let e = error(&format!("{rule}{rule}"));
        assert_eq!(
            e,
            "rule 'r': field 'name' is used twice for user 'alice'; rules that share a name must differ in scope"
        );
    }

    #[test]
    fn the_most_specific_scope_of_a_name_applies_to_a_device() {
        let rules = RuleSet::from_toml(
            r#"
[[rule]]
name = "hot"
reading = "/t"
op = ">"
value = 80
severity = "warning"
device = "oven"
user = "alice"

[[rule]]
name = "hot"
reading = "/t"
op = ">"
value = 30
severity = "info"

[[rule]]
name = "hot"
reading = "/t"
op = ">"
value = 50
severity = "critical"
user = "alice"

[[rule]]
name = "wet"
reading = "/h"
op = ">"
value = 90
severity = "info"
user = "bob"
"#,
        )
        .unwrap();
        let threshold = |user: &str, dev: &str| {
            rules
                .for_device(&device(user, dev))
                .iter()
                .map(|r| match &r.condition {
                    Condition::Threshold {
                        test: Test::Compare { value, .. },
                        ..
                    } => (r.name.clone(), *value),
                    _ => unreachable!(),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(threshold("alice", "oven"), [("hot".into(), 80.0)]);
        assert_eq!(threshold("alice", "fridge"), [("hot".into(), 50.0)]);
        assert_eq!(threshold("carol", "oven"), [("hot".into(), 30.0)]);
        assert_eq!(
            threshold("bob", "x"),
            [("hot".into(), 30.0), ("wet".into(), 90.0)]
        );
    }

    #[test]
    fn fingerprints_change_with_the_condition_but_not_with_severity_or_scope() {
        let rule = |value: f64, severity: &str, user: &str| {
            RuleSet::from_toml(&format!(
                "[[rule]]\nname = \"r\"\nreading = \"/t\"\nop = \">\"\nvalue = {value}\n\
                 severity = \"{severity}\"\nuser = \"{user}\"\n"
            ))
            .unwrap()
            .rules()[0]
                .fingerprint()
                .to_owned()
        };
        assert_eq!(rule(1.0, "info", "a"), rule(1.0, "critical", "b"));
        assert_ne!(rule(1.0, "info", "a"), rule(1.5, "info", "a"));
        assert_eq!(rule(1.0, "info", "a").len(), 16);
    }

    #[test]
    fn durations_read_like_go_durations() {
        let ms = |s: &str| parse_duration(s).map(|d| d.as_millis());
        assert_eq!(ms("500ms"), Some(500));
        assert_eq!(ms("30s"), Some(30_000));
        assert_eq!(ms("5m"), Some(300_000));
        assert_eq!(ms("1h30m"), Some(5_400_000));
        assert_eq!(ms("2d"), Some(172_800_000));
        for bad in ["", "30", "s", "1.5s", "30 s", "-1s", "1y", "1m1"] {
            assert_eq!(ms(bad), None, "{bad}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(100))]

        /// Loading any text, or a rule with any field values, either works or says why; it
        /// never panics. `make fuzz` (fuzz/fuzz_targets/rules.rs) goes further.
        #[test]
        fn any_rules_file_loads_or_is_refused_without_panicking(
            text in "\\PC{0,200}",
            op in "[<>=!]{0,3}",
            value in proptest::num::f64::ANY,
            clear in proptest::num::f64::ANY,
            duration in "[0-9]{0,4}[a-z]{0,3}",
            reading in "[/a-z~01]{0,10}",
        ) {
            let _ = RuleSet::from_toml(&text);
            let rule = format!(
                "[[rule]]\nname = \"r\"\nreading = \"{reading}\"\nop = \"{op}\"\n\
                 value = {value:?}\nclear = {clear:?}\nseverity = \"info\"\n\
                 for_duration = \"{duration}\"\n"
            );
            if let Ok(rules) = RuleSet::from_toml(&rule) {
                let _ = rules.for_device(&device("u", "d"));
            }
        }
    }
}
