//! `make bench-alerts`: alert latency on the local stack, from a device's publish of a reading
//! that crosses the threshold to the alert's arrival at its owner's subscription, at half the
//! sustained ingest rate.
//!
//! Starts the local stack (`scripts/stack.sh up`: the worker runs the rules of
//! `deploy/alerts/rules.toml`, temperature above 80.0 raises and below 75.0 clears) and runs the
//! load-tester at half the sustained rate that `bench_e2e` found (kept in the stack's
//! directory; `bench_e2e` runs first when there is none, or pass `--sustained-rate`). A share
//! of the readings (`--alert-fraction`) is too hot, each alone between normal ones, so each
//! raises one alert and the next reading clears it. Each device's hot readings come at its own
//! point of the cycle (`--alert-phase spread`), as independent devices cross a threshold;
//! `--alert-phase aligned` makes the whole fleet cross at once, a burst of one alert per device.
//! The load-tester subscribes to every user's
//! `users/{user}/devices/+/alerts`, logged in as that user, and with `--verify-alerts` checks
//! that every expected alert is stored once, published, and received once; latency runs from
//! the crossing reading's due time to the alert's arrival, both on the load-tester's clock.
//!
//! The last line printed is one JSON object:
//! `{"bench":"alerts","p50_ms":A,"p99_ms":B,"alerts":N,"expected":N,...}` where `alerts` is the
//! number of expected alerts received. Target: p99 <= 50 ms and alerts == expected; reported,
//! never asserted.

use std::time::{SystemTime, UNIX_EPOCH};

use benchmarks::stack::{round2, LocalStack};
use clap::Parser;
use serde_json::json;

/// Target for the alert p99.
const TARGET_P99_MS: f64 = 50.0;

#[derive(Debug, Parser)]
#[command(
    about = "Device publish -> alert received, at half the sustained rate of the local stack"
)]
struct Args {
    /// Sustained fleet rate in messages per second [default: the last `bench_e2e` result, which
    /// is measured first when there is none].
    #[arg(long)]
    sustained_rate: Option<f64>,
    /// Users in the fleet; each has its own MQTT connection and alert subscription.
    #[arg(long, default_value_t = 30)]
    users: u64,
    /// Devices per user.
    #[arg(long, default_value_t = 3)]
    devices_per_user: u64,
    /// Share of readings above the alert threshold.
    #[arg(long, default_value_t = 0.02)]
    alert_fraction: f64,
    /// `spread`: each device crosses the threshold at its own time, so alerts come at a steady
    /// rate; `aligned`: every device crosses at once (a fleet-wide event).
    #[arg(long, default_value = "spread", value_parser = ["spread", "aligned"])]
    alert_phase: String,
    /// Seconds the fleet publishes.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let stack = LocalStack::from_env()?;
    stack.up()?;
    let sustained = stack.sustained_rate(args.sustained_rate, "bench-alerts")?;
    let fleet_rate = (sustained / 2.0).round();
    let devices = args.users * args.devices_per_user;

    // On a fresh Tansu after a warm-up, as each step of bench_e2e.
    stack.fresh_kafka()?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    // Fresh users: their devices have no alert state and no alerts yet.
    let prefix = format!("alerts{stamp}-u");
    stack.add_users(&prefix, args.users)?;
    // Normal readings only, so the devices start without alerts; seqs far above the run's.
    stack.warm_up(args.users, args.devices_per_user, &prefix, 1_000_000_000)?;
    println!(
        "bench-alerts: {} users x {} devices at {fleet_rate:.0} msg/s (half of {sustained:.0}) for {} s, {}% of readings too hot, phase {}",
        args.users,
        args.devices_per_user,
        args.seconds,
        args.alert_fraction * 100.0,
        args.alert_phase
    );
    let flags: Vec<String> = [
        "--users",
        &args.users.to_string(),
        "--devices-per-user",
        &args.devices_per_user.to_string(),
        "--rate",
        &format!("{}", fleet_rate / devices as f64),
        "--duration",
        &format!("{}s", args.seconds),
        "--user-prefix",
        &prefix,
        "--run-id",
        &format!("alerts{stamp}"),
        "--alert-fraction",
        &args.alert_fraction.to_string(),
        "--alert-phase",
        &args.alert_phase,
        "--verify",
        "--verify-alerts",
        "--verify-timeout",
        "60s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let run = stack.load_test(&flags)?;
    eprint!("{}", run.stderr);

    let n = |field: &str| run.report[field].as_u64();
    let ms = |p: &str| run.latency("alert_ms", p).map(round2);
    let (expected, received) = (n("alerts_expected"), n("alerts_received"));
    let p99 = ms("p99");
    let met = p99.is_some_and(|p| p <= TARGET_P99_MS) && expected == received && run.exit_code == 0;
    println!(
        "alerts: {} expected, {} received once each; latency p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        expected.unwrap_or(0),
        received.unwrap_or(0),
        ms("p50").unwrap_or(f64::NAN),
        ms("p90").unwrap_or(f64::NAN),
        p99.unwrap_or(f64::NAN),
        ms("max").unwrap_or(f64::NAN),
    );
    println!(
        "target: p99 <= {TARGET_P99_MS:.0} ms and alerts == expected, with every reading stored once: {}",
        if met { "met" } else { "NOT met" }
    );
    let line = json!({
        "bench": "alerts",
        "p50_ms": ms("p50"),
        "p99_ms": p99,
        "alerts": received,
        "expected": expected,
        "p90_ms": ms("p90"),
        "max_ms": ms("max"),
        "missing": n("alerts_missing"),
        "duplicated": n("alerts_duplicated"),
        "unexpected": n("alerts_unexpected"),
        "unpublished": n("alerts_unpublished"),
        "not_received": n("alerts_not_received"),
        "received_twice": n("alerts_received_twice"),
        "misdelivered": n("alerts_misdelivered"),
        "fleet_rate_msgs_per_s": fleet_rate,
        "sustained_msgs_per_s": sustained,
        "publish_rate": round2(run.number("publish_rate")),
        "readings": run.report["sent"],
        "readings_lost": n("lost"),
        "readings_duplicated": n("duplicated"),
        "e2e_p50_ms": run.latency("e2e_ms", "p50").map(round2),
        "e2e_p99_ms": run.latency("e2e_ms", "p99").map(round2),
        "alert_fraction": args.alert_fraction,
        "alert_phase": args.alert_phase,
        "users": args.users,
        "devices": devices,
        "seconds": args.seconds,
        "target_p99_ms": TARGET_P99_MS,
        "target_met": met,
    });
    stack.save_result("alerts", &line)?;
    println!("{line}");
    Ok(())
}
