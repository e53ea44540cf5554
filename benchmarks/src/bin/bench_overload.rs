//! `make bench-overload`: the local stack offered 1.5 times its sustained rate for 60 s, then
//! left to drain, counting what was acknowledged, stored, lost and stored twice.
//!
//! The sustained rate is the last `bench_e2e` result on this stack (measured first when there is
//! none), or `--sustained-rate`. The load-tester publishes at `--factor` times it (per-user
//! logins, `--verify` with a long timeout), on a fresh Tansu after a warm-up, as a `bench_e2e`
//! step; its verification waits for the backlog to drain into the table and then checks every
//! reading by device and `seq`. Meanwhile the backlog (Mosquitto's stored messages, the bridge's
//! held messages, the worker's Kafka lag), the bridge's reconnects and its memory are sampled
//! every second.
//!
//! The last line printed is one JSON object:
//! `{"bench":"overload","offered":N,"acked":N,"stored":N,"lost":0,"duplicated":0,"drain_s":S,
//! "bridge_reconnects":0,"bridge_peak_rss_mb":M,...}`. The guarantee (lost = duplicated =
//! reconnects = 0) is reported, never asserted; `make test` asserts it on its own servers.

use std::time::{SystemTime, UNIX_EPOCH};

use benchmarks::stack::{round2, BacklogSample, BacklogSampler, LocalStack};
use clap::Parser;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about = "The local stack above capacity: lost, duplicated, drain time")]
struct Args {
    /// Sustained fleet rate in messages per second [default: the last `bench_e2e` result, which
    /// is measured first when there is none].
    #[arg(long)]
    sustained_rate: Option<f64>,
    /// The offered rate is the sustained rate times this.
    #[arg(long, default_value_t = 1.5)]
    factor: f64,
    /// Seconds the load is offered.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Users in the fleet (one MQTT connection each, logged in as that user).
    #[arg(long, default_value_t = 30)]
    users: u64,
    /// Devices per user.
    #[arg(long, default_value_t = 3)]
    devices_per_user: u64,
    /// How long the backlog may take to drain before verification gives up.
    #[arg(long, default_value = "20m")]
    drain_timeout: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let stack = LocalStack::from_env()?;
    stack.up()?;
    let sustained = stack.sustained_rate(args.sustained_rate, "bench-overload")?;
    let offered = (sustained * args.factor).round();
    let devices = args.users * args.devices_per_user;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let prefix = format!("overload{stamp}-u");
    stack.add_users(&prefix, args.users)?;
    stack.fresh_kafka()?;
    stack.warm_up(args.users, args.devices_per_user, &prefix, 1_000_000_000)?;
    println!(
        "bench-overload: {offered:.0} msg/s offered ({} x the sustained {sustained:.0}) for {} s by {devices} devices",
        args.factor, args.seconds
    );
    let flags: Vec<String> = [
        "--users",
        &args.users.to_string(),
        "--devices-per-user",
        &args.devices_per_user.to_string(),
        "--rate",
        &format!("{}", offered / devices as f64),
        "--duration",
        &format!("{}s", args.seconds),
        "--user-prefix",
        &prefix,
        "--run-id",
        &format!("overload-{stamp}"),
        "--verify",
        "--verify-timeout",
        &args.drain_timeout,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let sampler = BacklogSampler::start(&stack);
    let run = stack.load_test(&flags);
    let samples: Vec<BacklogSample> = sampler.stop();
    let run = run?;
    let peak = |field: fn(&BacklogSample) -> f64| samples.iter().map(field).fold(0.0f64, f64::max);
    let reconnects = samples.last().map_or(0.0, |s| s.bridge_reconnects)
        - samples.first().map_or(0.0, |s| s.bridge_reconnects);
    let report = &run.report;
    println!(
        "published {:.0} msg/s; acked {}, stored {}, lost {}, duplicated {}; peak backlog {:.0} \
         (broker {:.0}, bridge {:.0}, kafka lag {:.0}); drained and verified {:.0} s after the last \
         publish; bridge reconnects {reconnects}, peak RSS {:.0} MB",
        run.number("publish_rate"),
        report["acked"],
        report["stored_rows"],
        report["lost"],
        report["duplicated"],
        peak(BacklogSample::total),
        peak(|s| s.broker),
        peak(|s| s.bridge_held),
        peak(|s| s.kafka_lag),
        run.number("verify_waited_s"),
        peak(|s| s.bridge_rss_mb),
    );
    let line = json!({
        "bench": "overload",
        "offered": report["planned"],
        "acked": report["acked"],
        "stored": report["stored_rows"],
        "lost": report["lost"],
        "duplicated": report["duplicated"],
        "drain_s": round2(run.number("verify_waited_s")),
        "bridge_reconnects": reconnects,
        "bridge_peak_rss_mb": round2(peak(|s| s.bridge_rss_mb)),
        "offered_msgs_per_s": offered,
        "published_msgs_per_s": round2(run.number("publish_rate")),
        "sustained_msgs_per_s": sustained,
        "seconds": args.seconds,
        "peak_backlog": peak(BacklogSample::total),
        "peak_broker_stored": peak(|s| s.broker),
        "peak_bridge_held": peak(|s| s.bridge_held),
        "peak_kafka_lag": peak(|s| s.kafka_lag),
        "broker_rss_mb_before": samples.first().map(|s| round2(s.broker_rss_mb)),
        "broker_peak_rss_mb": round2(peak(|s| s.broker_rss_mb)),
        "unacked": report["unacked"],
        "verify_timed_out": report["verify_timed_out"],
        "load_tester_exit": run.exit_code,
    });
    stack.save_result("overload", &line)?;
    println!("{line}");
    Ok(())
}
