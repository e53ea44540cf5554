//! Flags and the checked configuration built from them.
//!
//! Parsing ([`Args`], clap) is kept apart from validation ([`Config::from_args`]) so that every
//! rule clap cannot express (a rate above zero, a fraction within 0..1, flags that only make
//! sense together) lives in one place and names the flag it is about.

use std::time::Duration;

use clap::Parser;
use telemetry_core::contract::{DeviceId, DEFAULT_MAX_PAYLOAD_BYTES};

use crate::payload::{AlertPhase, AlertPlan};

/// Default cap on MQTT connections when `--connections` is not given: one per user is what a
/// real fleet looks like, but past a few dozen sockets the tester's own event loops, not the
/// broker, become the bottleneck on a small machine.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;

/// Messages per device when neither `--messages` nor `--duration` is given.
pub const DEFAULT_MESSAGES: u64 = 100;

/// The rule in `deploy/alerts/rules.toml` that `--alert-fraction` readings cross.
pub const DEFAULT_ALERT_RULE: &str = "high-temperature";

/// Highest rate per device that `--verify-alerts` accepts. Alerts are matched to the reading
/// that caused them by its time, which the payload carries in whole milliseconds; two readings
/// of a device that raise (or clear) are at least two periods apart, so at up to 1000 msg/s
/// per device they never share a millisecond.
pub const MAX_ALERTS_RATE: f64 = 1000.0;

/// Publishes telemetry as a fleet of simulated devices and measures the pipeline.
///
/// Every device sends on a fixed timetable (message k is due at start + k / rate), so a slow
/// broker shows up as latency and lateness instead of silently lowering the load. Latencies are
/// measured from the time a message was due, not from when it was finally sent.
#[derive(Debug, Clone, Parser)]
// Negative numbers are let through as values so that `--rate -5` gets the range check's
// message instead of "unexpected argument".
#[command(
    name = "load-tester",
    version,
    about,
    long_about,
    allow_negative_numbers = true
)]
pub struct Args {
    /// Number of users; their ids are `<user-prefix>1`, `<user-prefix>2`, ...
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub users: u64,

    /// Devices per user; their ids are `dev-1`, `dev-2`, ...
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub devices_per_user: u64,

    /// Messages per second FOR EACH DEVICE (not for the fleet). The fleet's target rate is
    /// users x devices-per-user x rate. Fractions are allowed (0.5 = one message every 2 s).
    #[arg(long, default_value_t = 10.0, value_name = "MSG_PER_S")]
    pub rate: f64,

    /// How long each device publishes (e.g. `30s`, `2m`); becomes ceil(duration x rate)
    /// messages per device. Ramp-up is added on top.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "messages")]
    pub duration: Option<Duration>,

    /// Messages per device, then stop [default: 100 unless --duration is given].
    #[arg(long, value_name = "N")]
    pub messages: Option<u64>,

    /// MQTT QoS of the publishes: 0 (fire and forget) or 1 (acknowledged; PUBACK latency is
    /// measured).
    #[arg(long, default_value = "1", value_parser = ["0", "1"])]
    pub qos: String,

    /// Pad each payload with numeric readings `p0`, `p1`, ... until it is at least this many
    /// bytes of JSON. 0 sends the bare reading.
    #[arg(long, default_value_t = 0, value_name = "BYTES")]
    pub payload_bytes: usize,

    /// Spread the devices' first messages evenly over this time (e.g. `10s`) instead of starting
    /// them all at once.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub ramp_up: Duration,

    /// Share of messages, between 0 and 1, whose `temperature` is above 80.0 (the alert
    /// threshold used in the examples); the rest stay between 15 and 30.
    #[arg(long, default_value_t = 0.0, value_name = "FRACTION")]
    pub alert_fraction: f64,

    /// Where each device is in its cycle of alert readings: `spread` shifts each device's
    /// cycle by its place in the fleet, so alert readings arrive at a steady rate; `aligned`
    /// gives every device the same cycle, so the whole fleet crosses the threshold at once.
    #[arg(long, value_enum, default_value = "spread")]
    pub alert_phase: AlertPhase,

    /// MQTT broker host.
    #[arg(long, default_value = "localhost")]
    pub mqtt_host: String,

    /// MQTT broker port.
    #[arg(long, default_value_t = 1883)]
    pub mqtt_port: u16,

    /// One username for every connection.
    #[arg(long, conflicts_with = "mqtt_credentials_per_user")]
    pub mqtt_username: Option<String>,

    /// Password for --mqtt-username.
    #[arg(
        long,
        env = "LOAD_TESTER_MQTT_PASSWORD",
        hide_env_values = true,
        requires = "mqtt_username"
    )]
    pub mqtt_password: Option<String>,

    /// Log in as each user: `USERNAME:PASSWORD`, where `{user}` is replaced by the user id and
    /// the first `:` separates the two (e.g. `{user}:secret-{user}`). Implies one connection
    /// per user, so that no connection publishes for a user it did not log in as.
    #[arg(long, value_name = "TEMPLATE")]
    pub mqtt_credentials_per_user: Option<String>,

    /// Identifies this run in MQTT client ids (`load-tester-<run-id>-<n>`), so that parallel
    /// runs do not kick each other off the broker [default: random].
    #[arg(long)]
    pub run_id: Option<String>,

    /// How many MQTT connections carry the fleet. A user's devices share one connection while
    /// there are no more connections than users [default: one per user, at most 64].
    #[arg(long, value_name = "N")]
    pub connections: Option<usize>,

    /// QoS 1 publishes a connection may have waiting for PUBACK; more are queued.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub inflight: u16,

    /// Prefix of the user ids. Use a fresh one per run (e.g. `run42-user-`) when verifying
    /// against a database that already holds rows from earlier runs.
    #[arg(long, default_value = "user-")]
    pub user_prefix: String,

    /// First sequence number of every device.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub seq_start: i64,

    /// After the last publish, how long to wait for outstanding PUBACKs.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub drain_timeout: Duration,

    /// After the run, check that every message sent is stored exactly once in `raw_telemetry`
    /// and measure end-to-end latency. Needs --database-url.
    #[arg(long)]
    pub verify: bool,

    /// PostgreSQL (or PgBouncer) URL of the database the worker writes to.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// How long --verify waits for the rows to arrive, and --verify-alerts for the alerts.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub verify_timeout: Duration,

    /// After the run, check in the `alerts` table that every alert the readings should have
    /// raised or cleared (rule: temperature above 80.0, clear below 75.0) is stored exactly
    /// once and published, and that a subscriber on the users' alert topics received it;
    /// measures alert latency. Needs --database-url.
    #[arg(long)]
    pub verify_alerts: bool,

    /// Name of the alert rule the alert readings cross (temperature above 80.0, clear below
    /// 75.0); --verify-alerts looks only at this rule's alerts.
    #[arg(long, default_value = DEFAULT_ALERT_RULE, value_name = "NAME")]
    pub alert_rule: String,

    /// Print one JSON object with every figure as the last line of stdout (the table goes to
    /// stderr).
    #[arg(long)]
    pub json: bool,
}

/// MQTT QoS levels the tester can publish with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Qos {
    AtMostOnce,
    AtLeastOnce,
}

impl Qos {
    pub fn level(self) -> u8 {
        match self {
            Qos::AtMostOnce => 0,
            Qos::AtLeastOnce => 1,
        }
    }
}

/// How connections log in to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    None,
    Shared {
        username: String,
        password: String,
    },
    /// Templates in which `{user}` stands for the user id.
    PerUser {
        username: String,
        password: String,
    },
}

impl Credentials {
    /// The username and password a connection carrying `user`'s devices logs in with.
    pub fn for_user(&self, user: &str) -> Option<(String, String)> {
        match self {
            Credentials::None => None,
            Credentials::Shared { username, password } => {
                Some((username.clone(), password.clone()))
            }
            Credentials::PerUser { username, password } => Some((
                username.replace("{user}", user),
                password.replace("{user}", user),
            )),
        }
    }
}

/// A checked configuration: every field is within range and consistent with the others.
#[derive(Debug, Clone)]
pub struct Config {
    /// Number of users, at least 1.
    pub users: u64,
    /// Devices per user, at least 1.
    pub devices_per_user: u64,
    /// Messages per device per second, finite and above 0.
    pub rate: f64,
    /// Messages each device sends, at least 1 (from --messages or --duration).
    pub messages_per_device: u64,
    pub qos: Qos,
    /// Minimum JSON size of a payload; 0 for no padding.
    pub payload_bytes: usize,
    pub ramp_up: Duration,
    /// Within 0..=1.
    pub alert_fraction: f64,
    pub alert_phase: AlertPhase,
    pub mqtt_host: String,
    pub mqtt_port: u16,
    pub credentials: Credentials,
    /// Only `[A-Za-z0-9_-]`, so it is safe inside a client id.
    pub run_id: String,
    /// Between 1 and the number of devices.
    pub connections: usize,
    /// At least 1.
    pub inflight: u16,
    pub user_prefix: String,
    pub seq_start: i64,
    pub drain_timeout: Duration,
    /// Set when `--verify` was given.
    pub verify: Option<VerifyConfig>,
    /// Set when `--verify-alerts` was given.
    pub verify_alerts: Option<VerifyAlertsConfig>,
    pub json: bool,
}

/// Where and how long to look for the stored rows.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    pub database_url: String,
    pub timeout: Duration,
}

/// Where to look for the alerts, which rule's, and how long to wait for them.
#[derive(Debug, Clone)]
pub struct VerifyAlertsConfig {
    pub database_url: String,
    pub rule: String,
    pub timeout: Duration,
}

/// A flag value that cannot work, named with the flag and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid value '{value}' for '{flag}': {why}")]
    Invalid {
        flag: &'static str,
        value: String,
        why: String,
    },
    #[error(
        "'--verify' needs a database: pass '--database-url postgres://...' or set DATABASE_URL"
    )]
    VerifyWithoutDatabase,
    #[error(
        "'--verify-alerts' needs a database: pass '--database-url postgres://...' or set DATABASE_URL"
    )]
    VerifyAlertsWithoutDatabase,
}

fn invalid(flag: &'static str, value: impl ToString, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        value: value.to_string(),
        why: why.into(),
    }
}

impl Config {
    /// Checks the flags against each other and against the wire contract.
    pub fn from_args(args: Args) -> Result<Config, ConfigError> {
        if args.users == 0 {
            return Err(invalid(
                "--users",
                args.users,
                "at least one user is needed",
            ));
        }
        if args.devices_per_user == 0 {
            return Err(invalid(
                "--devices-per-user",
                args.devices_per_user,
                "at least one device per user is needed",
            ));
        }
        let devices = args
            .users
            .checked_mul(args.devices_per_user)
            .filter(|&d| d <= u32::MAX as u64)
            .ok_or_else(|| {
                invalid(
                    "--devices-per-user",
                    args.devices_per_user,
                    format!("{} users x this is too many devices", args.users),
                )
            })?;
        if !(args.rate.is_finite() && args.rate > 0.0) {
            return Err(invalid(
                "--rate",
                args.rate,
                "must be a number of messages per device per second above 0",
            ));
        }
        let messages_per_device = match (args.messages, args.duration) {
            (Some(0), _) => {
                return Err(invalid(
                    "--messages",
                    0,
                    "each device must send at least one message",
                ))
            }
            (Some(n), _) => n,
            (None, Some(d)) if d.is_zero() => {
                return Err(invalid(
                    "--duration",
                    humantime::format_duration(d),
                    "must be longer than 0",
                ))
            }
            (None, Some(d)) => (d.as_secs_f64() * args.rate).ceil() as u64,
            (None, None) => DEFAULT_MESSAGES,
        };
        // The ledger of one device is indexed by u32, and the whole plan must fit in memory.
        if messages_per_device > u32::MAX as u64 {
            let (flag, value) = match args.duration {
                Some(d) => ("--duration", humantime::format_duration(d).to_string()),
                None => ("--messages", messages_per_device.to_string()),
            };
            return Err(invalid(
                flag,
                value,
                format!("more than {} messages per device", u32::MAX),
            ));
        }
        if args.seq_start < 0 {
            return Err(invalid(
                "--seq-start",
                args.seq_start,
                "sequence numbers start at 0 or above",
            ));
        }
        if args
            .seq_start
            .checked_add(messages_per_device as i64)
            .is_none()
        {
            return Err(invalid(
                "--seq-start",
                args.seq_start,
                "the last sequence number would overflow a 64-bit integer",
            ));
        }
        if !(0.0..=1.0).contains(&args.alert_fraction) {
            return Err(invalid(
                "--alert-fraction",
                args.alert_fraction,
                "must be between 0 and 1 (a share of messages)",
            ));
        }
        if args.payload_bytes > DEFAULT_MAX_PAYLOAD_BYTES {
            return Err(invalid(
                "--payload-bytes",
                args.payload_bytes,
                format!("the contract's payload limit is {DEFAULT_MAX_PAYLOAD_BYTES} bytes; the bridge would dead-letter every message"),
            ));
        }
        let qos = match args.qos.as_str() {
            "0" => Qos::AtMostOnce,
            "1" => Qos::AtLeastOnce,
            other => return Err(invalid("--qos", other, "must be 0 or 1")),
        };
        if args.inflight == 0 {
            return Err(invalid(
                "--inflight",
                0,
                "at least one publish must be allowed in flight",
            ));
        }
        if args.drain_timeout.is_zero() {
            return Err(invalid("--drain-timeout", "0s", "must be longer than 0"));
        }
        if args.mqtt_host.is_empty() {
            return Err(invalid("--mqtt-host", "", "must not be empty"));
        }
        // DeviceId checks segments taken from a topic, which cannot hold '/'; an id we put into
        // a topic can, and would shift every level after it.
        if args.user_prefix.contains('/') {
            return Err(invalid(
                "--user-prefix",
                &args.user_prefix,
                "a user id may not contain '/', which separates topic levels",
            ));
        }
        // The first and last ids are the longest and shortest; checking both covers the range.
        for user in [
            format!("{}1", args.user_prefix),
            format!("{}{}", args.user_prefix, args.users),
        ] {
            let device = format!("dev-{}", args.devices_per_user);
            DeviceId::new(&user, &device)
                .map_err(|e| invalid("--user-prefix", &args.user_prefix, e.to_string()))?;
        }
        let run_id = match args.run_id {
            Some(id)
                if id.is_empty()
                    || id.len() > 64
                    || !id
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') =>
            {
                return Err(invalid(
                    "--run-id",
                    id,
                    "use 1 to 64 letters, digits, '-' or '_'",
                ))
            }
            Some(id) => id,
            None => format!("{:08x}", rand::random::<u32>()),
        };

        let credentials = match (args.mqtt_username, args.mqtt_password, args.mqtt_credentials_per_user) {
            (_, _, Some(template)) => match template.split_once(':') {
                Some((username, password)) if !username.is_empty() => {
                    Credentials::PerUser { username: username.to_owned(), password: password.to_owned() }
                }
                _ => {
                    return Err(invalid(
                        "--mqtt-credentials-per-user",
                        template,
                        "expected USERNAME:PASSWORD with {user} standing for the user id, e.g. '{user}:secret-{user}'",
                    ))
                }
            },
            (Some(username), password, None) => Credentials::Shared { username, password: password.unwrap_or_default() },
            (None, _, None) => Credentials::None,
        };

        let connections = match (args.connections, &credentials) {
            (Some(0), _) => return Err(invalid("--connections", 0, "at least one connection is needed")),
            (Some(n), Credentials::PerUser { .. }) if n as u64 != args.users => {
                return Err(invalid(
                    "--connections",
                    n,
                    format!("with --mqtt-credentials-per-user every user needs its own connection; leave it out or pass {}", args.users),
                ))
            }
            (Some(n), _) if n as u64 > devices => {
                return Err(invalid("--connections", n, format!("more connections than devices ({devices}) would leave some idle")))
            }
            (Some(n), _) => n,
            (None, Credentials::PerUser { .. }) => args.users as usize,
            (None, _) => (args.users as usize).min(DEFAULT_MAX_CONNECTIONS),
        };

        let database_url = args.database_url.filter(|url| !url.is_empty());
        if (args.verify || args.verify_alerts) && args.verify_timeout.is_zero() {
            return Err(invalid("--verify-timeout", "0s", "must be longer than 0"));
        }
        let verify = match (args.verify, &database_url) {
            (false, _) => None,
            (true, None) => return Err(ConfigError::VerifyWithoutDatabase),
            (true, Some(database_url)) => Some(VerifyConfig {
                database_url: database_url.clone(),
                timeout: args.verify_timeout,
            }),
        };
        let verify_alerts = match (args.verify_alerts, database_url) {
            (false, _) => None,
            (true, None) => return Err(ConfigError::VerifyAlertsWithoutDatabase),
            (true, Some(database_url)) => {
                if args.rate > MAX_ALERTS_RATE {
                    return Err(invalid(
                        "--rate",
                        args.rate,
                        format!(
                            "--verify-alerts tells readings apart by their millisecond timestamps, \
                             which needs at most {MAX_ALERTS_RATE} msg/s per device; add devices instead"
                        ),
                    ));
                }
                if args.alert_rule.is_empty() {
                    return Err(invalid(
                        "--alert-rule",
                        "",
                        "name the rule the alert readings cross, e.g. 'high-temperature'",
                    ));
                }
                Some(VerifyAlertsConfig {
                    database_url,
                    rule: args.alert_rule,
                    timeout: args.verify_timeout,
                })
            }
        };

        Ok(Config {
            users: args.users,
            devices_per_user: args.devices_per_user,
            rate: args.rate,
            messages_per_device,
            qos,
            payload_bytes: args.payload_bytes,
            ramp_up: args.ramp_up,
            alert_fraction: args.alert_fraction,
            alert_phase: args.alert_phase,
            mqtt_host: args.mqtt_host,
            mqtt_port: args.mqtt_port,
            credentials,
            run_id,
            connections,
            inflight: args.inflight,
            user_prefix: args.user_prefix,
            seq_start: args.seq_start,
            drain_timeout: args.drain_timeout,
            verify,
            verify_alerts,
            json: args.json,
        })
    }

    /// Total number of devices in the fleet.
    pub fn devices(&self) -> u64 {
        self.users * self.devices_per_user
    }

    /// Messages the whole fleet is meant to send.
    pub fn planned_messages(&self) -> u64 {
        self.devices() * self.messages_per_device
    }

    /// The fleet's target rate in messages per second, once every device has started.
    pub fn target_rate(&self) -> f64 {
        self.devices() as f64 * self.rate
    }

    /// Which messages of which device carry alert-level temperatures.
    pub fn alert_plan(&self) -> AlertPlan {
        AlertPlan {
            fraction: self.alert_fraction,
            phase: self.alert_phase,
            devices: self.devices(),
        }
    }

    /// The id of user `index` (0-based).
    pub fn user_id(&self, index: u64) -> String {
        format!("{}{}", self.user_prefix, index + 1)
    }

    /// The id of device `index` (0-based) within its user.
    pub fn device_id(index: u64) -> String {
        format!("dev-{}", index + 1)
    }

    /// The last sequence number a device sends.
    pub fn seq_end(&self) -> i64 {
        self.seq_start + self.messages_per_device as i64 - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(flags: &[&str]) -> Result<Config, ConfigError> {
        let args =
            Args::try_parse_from(std::iter::once("load-tester").chain(flags.iter().copied()))
                .unwrap();
        Config::from_args(args)
    }

    fn rejected_flag(flags: &[&str]) -> &'static str {
        match parse(flags) {
            Err(ConfigError::Invalid { flag, .. }) => flag,
            other => panic!("{flags:?} should be rejected, got {other:?}"),
        }
    }

    #[test]
    fn defaults_make_a_small_acknowledged_run() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.devices(), 1);
        assert_eq!(config.messages_per_device, DEFAULT_MESSAGES);
        assert_eq!(config.qos, Qos::AtLeastOnce);
        assert_eq!(config.connections, 1);
        assert_eq!(config.run_id.len(), 8);
        assert!(config.verify.is_none());
    }

    #[test]
    fn duration_becomes_messages_per_device() {
        let config = parse(&["--rate", "200", "--duration", "30s"]).unwrap();
        assert_eq!(config.messages_per_device, 6000);
        let config = parse(&["--rate", "0.4", "--duration", "3s"]).unwrap();
        assert_eq!(
            config.messages_per_device, 2,
            "a started second still sends"
        );
    }

    #[test]
    fn connections_default_to_one_per_user_up_to_a_cap() {
        assert_eq!(
            parse(&["--users", "30", "--devices-per-user", "3"])
                .unwrap()
                .connections,
            30
        );
        assert_eq!(
            parse(&["--users", "100"]).unwrap().connections,
            DEFAULT_MAX_CONNECTIONS
        );
        let per_user =
            parse(&["--users", "100", "--mqtt-credentials-per-user", "{user}:pw"]).unwrap();
        assert_eq!(per_user.connections, 100);
        assert_eq!(
            per_user.credentials.for_user("u7"),
            Some(("u7".into(), "pw".into()))
        );
    }

    #[test]
    fn out_of_range_values_name_their_flag() {
        assert_eq!(rejected_flag(&["--rate", "0"]), "--rate");
        assert_eq!(rejected_flag(&["--rate", "NaN"]), "--rate");
        assert_eq!(rejected_flag(&["--users", "0"]), "--users");
        assert_eq!(
            rejected_flag(&["--devices-per-user", "0"]),
            "--devices-per-user"
        );
        assert_eq!(
            rejected_flag(&["--alert-fraction", "2"]),
            "--alert-fraction"
        );
        assert_eq!(
            rejected_flag(&["--alert-fraction", "-0.1"]),
            "--alert-fraction"
        );
        assert_eq!(rejected_flag(&["--messages", "0"]), "--messages");
        assert_eq!(rejected_flag(&["--duration", "0s"]), "--duration");
        assert_eq!(
            rejected_flag(&["--payload-bytes", "1000000"]),
            "--payload-bytes"
        );
        assert_eq!(rejected_flag(&["--user-prefix", "a/b"]), "--user-prefix");
        assert_eq!(rejected_flag(&["--user-prefix", "+"]), "--user-prefix");
        assert_eq!(rejected_flag(&["--run-id", "has space"]), "--run-id");
        assert_eq!(rejected_flag(&["--connections", "5"]), "--connections");
        assert_eq!(
            rejected_flag(&[
                "--users",
                "3",
                "--connections",
                "2",
                "--mqtt-credentials-per-user",
                "{user}:x"
            ]),
            "--connections"
        );
        assert_eq!(
            rejected_flag(&["--mqtt-credentials-per-user", "no-colon"]),
            "--mqtt-credentials-per-user"
        );
        assert_eq!(rejected_flag(&["--seq-start", "-1"]), "--seq-start");
        assert_eq!(rejected_flag(&["--rate", "-5"]), "--rate");
    }

    #[test]
    fn verify_and_verify_alerts_need_a_database() {
        for (flag, error) in [
            ("--verify", ConfigError::VerifyWithoutDatabase),
            ("--verify-alerts", ConfigError::VerifyAlertsWithoutDatabase),
        ] {
            let args = Args::try_parse_from(["load-tester", flag]).unwrap();
            let args = Args {
                database_url: None,
                ..args
            };
            assert_eq!(Config::from_args(args).unwrap_err(), error);
        }
    }

    #[test]
    fn verify_alerts_takes_the_rule_and_a_rate_it_can_tell_apart() {
        let config = parse(&[
            "--verify-alerts",
            "--database-url",
            "postgres://db/telemetry",
            "--alert-fraction",
            "0.1",
        ])
        .unwrap();
        let alerts = config.verify_alerts.unwrap();
        assert_eq!(alerts.rule, DEFAULT_ALERT_RULE);
        assert!(
            config.verify.is_none(),
            "rows are checked only with --verify"
        );
        let too_fast = [
            "--verify-alerts",
            "--database-url",
            "postgres://db/telemetry",
            "--rate",
            "1500",
        ];
        assert_eq!(rejected_flag(&too_fast), "--rate");
    }

    #[test]
    fn clap_rejects_what_it_can_check_itself() {
        for flags in [
            &["--qos", "2"][..],
            &["--messages", "5", "--duration", "1s"],
            &["--mqtt-password", "secret"],
            &[
                "--mqtt-username",
                "a",
                "--mqtt-credentials-per-user",
                "{user}:x",
            ],
            &["--duration", "soon"],
        ] {
            let argv = std::iter::once("load-tester").chain(flags.iter().copied());
            assert!(Args::try_parse_from(argv).is_err(), "{flags:?}");
        }
    }
}
