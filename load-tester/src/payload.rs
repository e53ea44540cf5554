//! What a simulated device publishes.
//!
//! Payloads follow the wire contract in `telemetry_core::contract`: `ts` is the time the message
//! was due, in epoch milliseconds (so `ingested_at - device_time` of the stored row is the
//! end-to-end latency measured from the timetable, lateness of the sender included), `seq`
//! counts from `--seq-start` without gaps, and every other member is a numeric reading.

use std::fmt::Write;

use rand::Rng;

/// Temperature above which the examples raise an alert. Alert readings are drawn above it and
/// normal ones well below, so that no rounding can move a reading across.
pub const ALERT_THRESHOLD: f64 = 80.0;

/// Whether message `k` of a device carries an alert-level temperature. Spreads exactly
/// `floor(n * fraction)` alerts evenly over the first `n` messages, so a later alerts check can
/// know which messages should have raised one without replaying a random generator.
pub fn is_alert(k: u64, fraction: f64) -> bool {
    is_alert_from(k, fraction, 0.0)
}

/// [`is_alert`] with the count of alert readings started `phase` (in [0, 1)) of one reading
/// ahead: the same share, the pattern shifted by `phase` of a cycle.
fn is_alert_from(k: u64, fraction: f64, phase: f64) -> bool {
    ((k + 1) as f64 * fraction + phase).floor() > (k as f64 * fraction + phase).floor()
}

/// When in its cycle of alert readings each device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertPhase {
    /// Each device at its own point of the cycle, evenly over the fleet: alert readings arrive
    /// at a steady rate, as when independent devices cross a threshold.
    Spread,
    /// Every device at the same point: the whole fleet crosses the threshold within one
    /// message period, a burst of one alert per device (a fleet-wide event).
    Aligned,
}

/// Which messages of which device carry alert-level temperatures: `fraction` of each device's
/// messages, spread as evenly as [`is_alert`] spreads them, with each device's pattern shifted by
/// its place in the fleet unless the phase is aligned.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlertPlan {
    pub fraction: f64,
    pub phase: AlertPhase,
    /// Devices in the fleet, over which a spread phase is shared out.
    pub devices: u64,
}

impl AlertPlan {
    /// The same messages of every device: the plan of tests that count alerts per device.
    pub fn aligned(fraction: f64) -> AlertPlan {
        AlertPlan {
            fraction,
            phase: AlertPhase::Aligned,
            devices: 1,
        }
    }

    /// Whether message `k` of fleet device `device` carries an alert-level temperature:
    /// device g of n has its pattern `g / n` of a cycle later than device 0, whatever the
    /// fraction. A device gets `floor(n * fraction)` alert readings in its first `n`, or one
    /// more.
    pub fn is_alert(&self, device: u64, k: u64) -> bool {
        is_alert_from(k, self.fraction, self.phase(device))
    }

    /// Device `device`'s place in the fleet, in [0, 1).
    fn phase(&self, device: u64) -> f64 {
        match self.phase {
            AlertPhase::Spread if self.devices > 0 => device as f64 / self.devices as f64,
            _ => 0.0,
        }
    }
}

/// Writes the JSON payload of one message into `out` (cleared first).
pub fn write(
    out: &mut String,
    ts_ms: i64,
    seq: i64,
    alert: bool,
    min_bytes: usize,
    rng: &mut impl Rng,
) {
    out.clear();
    let temperature = if alert {
        rng.random_range(80.5..95.0)
    } else {
        rng.random_range(15.0..30.0)
    };
    let humidity: f64 = rng.random_range(30.0..60.0);
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        r#"{{"ts":{ts_ms},"seq":{seq},"temperature":{temperature:.1},"humidity":{humidity:.1}"#
    );
    let mut pad = 0;
    // The closing brace counts towards the size.
    while out.len() + 1 < min_bytes {
        let reading: f64 = rng.random_range(0.0..1000.0);
        let _ = write!(out, r#","p{pad}":{reading:.3}"#);
        pad += 1;
    }
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use telemetry_core::contract::{decode_payload, DEFAULT_MAX_PAYLOAD_BYTES};

    #[test]
    fn payloads_satisfy_the_contract() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut out = String::new();
        for (min_bytes, alert) in [(0, false), (200, true), (4096, false)] {
            write(&mut out, 1_764_000_000_123, 41, alert, min_bytes, &mut rng);
            let telemetry = decode_payload(out.as_bytes(), DEFAULT_MAX_PAYLOAD_BYTES).expect(&out);
            assert_eq!(telemetry.seq, Some(41));
            assert_eq!(
                telemetry.device_time.unwrap().timestamp_millis(),
                1_764_000_000_123
            );
            assert!(out.len() >= min_bytes, "{} < {min_bytes}", out.len());
            assert!(
                out.len() < min_bytes.max(60) + 20,
                "padding overshoots: {}",
                out.len()
            );
        }
    }

    #[test]
    fn alert_readings_are_above_the_threshold_and_others_well_below() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut out = String::new();
        for alert in [true, false] {
            for _ in 0..200 {
                write(&mut out, 0, 0, alert, 0, &mut rng);
                let value: serde_json::Value = serde_json::from_str(&out).unwrap();
                let temperature = value["temperature"].as_f64().unwrap();
                assert_eq!(temperature > ALERT_THRESHOLD, alert, "{out}");
                assert!(alert || (15.0..=30.0).contains(&temperature), "{out}");
            }
        }
    }

    #[test]
    fn a_spread_plan_shifts_each_devices_alerts_and_keeps_their_share() {
        let plan = |fraction: f64, phase: AlertPhase, devices: u64| AlertPlan {
            fraction,
            phase,
            devices,
        };
        let alerts = |plan: &AlertPlan, device: u64, n: u64| -> Vec<u64> {
            (0..n).filter(|&k| plan.is_alert(device, k)).collect()
        };
        // One device per message of the four-message cycle.
        let spread = plan(0.25, AlertPhase::Spread, 4);
        assert_eq!(alerts(&spread, 0, 12), [3, 7, 11]);
        assert_eq!(alerts(&spread, 1, 12), [2, 6, 10]);
        assert_eq!(alerts(&spread, 2, 12), [1, 5, 9]);
        assert_eq!(alerts(&spread, 3, 12), [0, 4, 8]);
        // Aligned: every device as `is_alert`.
        let aligned = plan(0.25, AlertPhase::Aligned, 4);
        for device in 0..4 {
            assert_eq!(alerts(&aligned, device, 12), [3, 7, 11]);
        }
        // Above one half the normal readings are the rare ones: each of four devices has its
        // one normal reading in four at a different place.
        let mostly_hot = plan(0.75, AlertPhase::Spread, 4);
        let normal = |device: u64| -> Vec<u64> {
            (0..8)
                .filter(|&k| !mostly_hot.is_alert(device, k))
                .collect()
        };
        let mut firsts: Vec<u64> = (0..4).map(|device| normal(device)[0]).collect();
        firsts.sort();
        assert_eq!(firsts, [0, 1, 2, 3]);
        // The share holds for every device: floor(n x f) alert readings, or one more.
        for (fraction, devices) in [
            (0.0, 5),
            (1.0, 5),
            (0.02, 90),
            (0.3, 7),
            (0.9, 13),
            (1e-30, 3),
        ] {
            let plan = plan(fraction, AlertPhase::Spread, devices);
            let floor = (1000.0 * fraction).floor() as usize;
            for device in 0..devices {
                let count = alerts(&plan, device, 1000).len();
                assert!(
                    count == floor || count == floor + 1,
                    "{fraction} device {device}: {count}"
                );
            }
        }
    }

    #[test]
    fn the_alert_fraction_is_met_exactly_and_spread_out() {
        let count = |n: u64, f: f64| (0..n).filter(|&k| is_alert(k, f)).count();
        assert_eq!(count(1000, 0.0), 0);
        assert_eq!(count(1000, 1.0), 1000);
        assert_eq!(count(1000, 0.25), 250);
        assert_eq!(count(1000, 0.013), 13);
        let alerts: Vec<u64> = (0..20).filter(|&k| is_alert(k, 0.25)).collect();
        assert_eq!(alerts, [3, 7, 11, 15, 19]);
    }
}
