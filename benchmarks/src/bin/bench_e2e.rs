//! `make bench-e2e`: the sustained MQTT -> PostgreSQL rate of the local stack, and the
//! end-to-end latency at half of it.
//!
//! Starts the local stack (`scripts/stack.sh up`, release builds) and drives it with the
//! load-tester (`--verify`, per-user logins) at increasing fleet rates, each for a fixed time on
//! a fresh Tansu (`scripts/stack.sh fresh-kafka`: its memory storage slows as it fills) after a
//! short warm-up, multiplying the rate by `--factor` until a step fails, then bisecting between
//! the last pass and the first failure. A step passes when every message was acknowledged and stored exactly
//! once, the end-to-end p99 (due time -> row committed) stayed under 1 s, the load-tester
//! published within 3% of the asked rate, so the load was really offered, and what the pipeline
//! holds (Mosquitto's stored messages, the bridge's held messages, the worker's Kafka lag,
//! sampled every second) did not grow over the step's second half. Steps publish for 60 s, so a
//! rate counts as sustained only when it held that long. The sustained rate is the highest
//! passing one; a last, longer run at half of it gives the latencies.
//!
//! The last line printed is one JSON object:
//! `{"bench":"e2e","sustained_msgs_per_s":N,"e2e_p50_ms":A,"e2e_p99_ms":B,"lost":0,"duplicated":0,...}`
//! with the half-rate run's figures. Target at half the sustained rate: e2e p99 <= 250 ms and
//! lost = duplicated = 0; reported, never asserted. The line is also kept in the stack's
//! directory for `bench_alerts`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use benchmarks::stack::{
    backlog_growth, round2, BacklogSample, BacklogSampler, LoadRun, LocalStack,
};
use clap::Parser;
use serde_json::json;

/// A step passes only if the end-to-end p99 stays under this.
const MAX_E2E_P99_MS: f64 = 1000.0;
/// Target for the e2e p99 at half the sustained rate.
const TARGET_E2E_P99_MS: f64 = 250.0;
/// A step whose publish rate fell short of the asked one by more than this share measured the
/// tester (or a machine too busy to run it), not the pipeline. Late sends alone do not fail a
/// step: latency is measured from the due time, so they already count in the e2e figures.
const MAX_RATE_SHORTFALL: f64 = 0.03;
/// Each step's sequence numbers start this far above the previous step's, so a step's rows are
/// told apart from earlier steps' of the same users.
const SEQ_STRIDE: i64 = 1_000_000_000;
/// A step fails when the backlog grew over its second half by more than this share of the
/// messages offered in that half: a queue that grows is a rate that is not sustained.
const MAX_BACKLOG_GROWTH: f64 = 0.02;

#[derive(Debug, Parser)]
#[command(about = "Sustained rate and end-to-end latency of the local stack")]
struct Args {
    /// Users in the fleet (one MQTT connection each, logged in as that user).
    #[arg(long, default_value_t = 30)]
    users: u64,
    /// Devices per user.
    #[arg(long, default_value_t = 3)]
    devices_per_user: u64,
    /// Fleet rate of the first step, in messages per second.
    #[arg(long, default_value_t = 500.0)]
    start_rate: f64,
    /// Each step's rate is the previous one's times this, until a step fails.
    #[arg(long, default_value_t = 1.5)]
    factor: f64,
    /// No step goes above this fleet rate.
    #[arg(long, default_value_t = 50_000.0)]
    max_rate: f64,
    /// Bisection steps between the last passing and the first failing rate.
    #[arg(long, default_value_t = 2)]
    refine: u32,
    /// Seconds each step publishes (at least 60 for a rate to count as sustained).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Seconds the run at half the sustained rate publishes.
    #[arg(long, default_value_t = 30)]
    half_seconds: u64,
}

/// What one step showed.
struct Step {
    rate: f64,
    run: LoadRun,
    /// How much the backlog grew over the second half of the step.
    growth: f64,
    /// Why it failed; `None` when it passed.
    failure: Option<String>,
}

fn judge(run: &LoadRun, growth: f64, rate: f64, seconds: u64) -> Option<String> {
    let allowed = MAX_BACKLOG_GROWTH * rate * seconds as f64 / 2.0;
    if let Some(why) = judge_run(run) {
        return Some(why);
    }
    (growth > allowed).then(|| {
        format!(
            "the backlog grew by {growth:.0} messages over the second half (allowed {allowed:.0})"
        )
    })
}

fn judge_run(run: &LoadRun) -> Option<String> {
    let p99 = run.latency("e2e_ms", "p99");
    let shortfall = 1.0 - run.number("publish_rate") / run.number("target_rate").max(1.0);
    if run.exit_code != 0 {
        let mut why = format!(
            "load-tester exit {}: lost {}, duplicated {}, unacked {}, not sent {}, errors {}",
            run.exit_code,
            run.number("lost"),
            run.number("duplicated"),
            run.number("unacked"),
            run.number("not_sent"),
            run.number("errors")
        );
        if run.report["verify_timed_out"] == true {
            why.push_str(" (rows still arriving when the verify timeout ran out)");
        }
        Some(why)
    } else if p99.is_none_or(|p| p >= MAX_E2E_P99_MS) {
        Some(format!(
            "e2e p99 {:.0} ms >= {MAX_E2E_P99_MS:.0} ms",
            p99.unwrap_or(f64::NAN)
        ))
    } else if shortfall > MAX_RATE_SHORTFALL {
        Some(format!(
            "the load-tester published only {:.1} msg/s ({:.1}% short)",
            run.number("publish_rate"),
            shortfall * 100.0
        ))
    } else {
        None
    }
}

fn describe(step: &Step) -> String {
    let ms = |p: &str| step.run.latency("e2e_ms", p).unwrap_or(f64::NAN);
    format!(
        "{:.0} msg/s: {} (published {:.1} msg/s, e2e p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; lost {}, duplicated {}; backlog growth over the second half {:.0})",
        step.rate,
        step.failure
            .as_deref()
            .map_or("pass".to_owned(), |why| format!("FAIL, {why}")),
        step.run.number("publish_rate"),
        ms("p50"),
        ms("p99"),
        ms("max"),
        step.run.number("lost"),
        step.run.number("duplicated"),
        step.growth,
    )
}

struct Bench {
    stack: LocalStack,
    args: Args,
    prefix: String,
    steps: usize,
}

impl Bench {
    /// The load-tester's flags for `rate` msg/s fleet-wide during `seconds`.
    fn flags(
        &self,
        devices: f64,
        rate: f64,
        seconds: u64,
        seq_start: i64,
        what: &str,
    ) -> Vec<String> {
        [
            "--users",
            &self.args.users.to_string(),
            "--devices-per-user",
            &self.args.devices_per_user.to_string(),
            "--rate",
            &format!("{}", rate / devices),
            "--duration",
            &format!("{seconds}s"),
            "--user-prefix",
            &self.prefix,
            "--seq-start",
            &seq_start.to_string(),
            "--run-id",
            &format!("e2e-{what}-{}", self.steps),
            "--verify",
            "--verify-timeout",
            "60s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn run(&mut self, rate: f64, seconds: u64) -> anyhow::Result<Step> {
        let devices = (self.args.users * self.args.devices_per_user) as f64;
        let seq_start = self.steps as i64 * SEQ_STRIDE;
        self.steps += 1;
        self.stack.fresh_kafka()?;
        // Its rows sit in the upper half of the step's seq range.
        self.stack.warm_up(
            self.args.users,
            self.args.devices_per_user,
            &self.prefix,
            seq_start + SEQ_STRIDE / 2,
        )?;
        let flags = self.flags(devices, rate, seconds, seq_start, "step");
        let sampler = BacklogSampler::start(&self.stack);
        let run = self.stack.load_test(&flags);
        let samples: Vec<BacklogSample> = sampler.stop();
        let run = run?;
        let growth = backlog_growth(&samples, seconds as f64);
        let failure = judge(&run, growth, rate, seconds);
        if failure.is_some() {
            // An overloaded pipeline keeps working off its backlog; let it finish before Kafka
            // is replaced, so the next step starts clean.
            self.stack
                .wait_until_drained(&self.prefix, Duration::from_secs(180))?;
        }
        Ok(Step {
            rate,
            run,
            growth,
            failure,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(args.factor > 1.0 && args.start_rate > 0.0 && args.max_rate >= args.start_rate) {
        bail!("--factor must be above 1 and --start-rate above 0 and at most --max-rate");
    }
    let stack = LocalStack::from_env()?;
    stack.up()?;
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let prefix = format!("e2e{stamp}-u");
    stack.add_users(&prefix, args.users)?;
    let devices = args.users * args.devices_per_user;
    println!(
        "bench-e2e: {} users x {} devices = {devices} devices, {} s per step, rates x{} from {} msg/s",
        args.users, args.devices_per_user, args.seconds, args.factor, args.start_rate
    );
    let mut bench = Bench {
        stack,
        args,
        prefix,
        steps: 0,
    };

    let round = |rate: f64| (rate / 10.0).round() * 10.0;
    let mut passed: Option<Step> = None;
    let mut failed: Option<Step> = None;
    let mut rate = round(bench.args.start_rate);
    let mut trail = Vec::new();
    while rate <= bench.args.max_rate {
        let step = bench.run(rate, bench.args.seconds)?;
        println!("step {}: {}", bench.steps, describe(&step));
        trail.push(json!({"rate": step.rate, "passed": step.failure.is_none(),
                          "e2e_p99_ms": step.run.latency("e2e_ms", "p99")}));
        if step.failure.is_some() {
            failed = Some(step);
            break;
        }
        passed = Some(step);
        rate = round(rate * bench.args.factor);
    }
    for _ in 0..bench.args.refine {
        let (Some(low), Some(high)) = (&passed, &failed) else {
            break;
        };
        let middle = round((low.rate + high.rate) / 2.0);
        if middle <= low.rate || middle >= high.rate {
            break;
        }
        let step = bench.run(middle, bench.args.seconds)?;
        println!("step {}: {}", bench.steps, describe(&step));
        trail.push(json!({"rate": step.rate, "passed": step.failure.is_none(),
                          "e2e_p99_ms": step.run.latency("e2e_ms", "p99")}));
        if step.failure.is_some() {
            failed = Some(step);
        } else {
            passed = Some(step);
        }
    }
    let Some(sustained) = passed else {
        let why = failed.and_then(|s| s.failure).unwrap_or_default();
        bail!(
            "not even the first step ({} msg/s) passed: {why}; try --start-rate lower",
            bench.args.start_rate
        );
    };
    match &failed {
        Some(step) => println!(
            "sustained: {:.0} msg/s (the highest passing step; {:.0} msg/s failed: {})",
            sustained.rate,
            step.rate,
            step.failure.as_deref().unwrap_or("")
        ),
        None => println!(
            "sustained: at least {:.0} msg/s (--max-rate reached without a failure)",
            sustained.rate
        ),
    }

    let half_rate = round(sustained.rate / 2.0);
    let half = bench.run(half_rate, bench.args.half_seconds)?;
    println!(
        "at half the sustained rate, {} s: {}",
        bench.args.half_seconds,
        describe(&half)
    );
    let ms = |p: &str| half.run.latency("e2e_ms", p).map(round2);
    let p99 = ms("p99");
    let lost = half.run.report["lost"].as_u64();
    let duplicated = half.run.report["duplicated"].as_u64();
    let met =
        p99.is_some_and(|p| p <= TARGET_E2E_P99_MS) && lost == Some(0) && duplicated == Some(0);
    println!(
        "target at half: e2e p99 <= {TARGET_E2E_P99_MS:.0} ms and lost = duplicated = 0: {}",
        if met { "met" } else { "NOT met" }
    );
    let line = json!({
        "bench": "e2e",
        "sustained_msgs_per_s": sustained.rate,
        "e2e_p50_ms": ms("p50"),
        "e2e_p99_ms": p99,
        "lost": lost,
        "duplicated": duplicated,
        "e2e_p90_ms": ms("p90"),
        "e2e_max_ms": ms("max"),
        "half_rate_msgs_per_s": half_rate,
        "half_publish_rate": round2(half.run.number("publish_rate")),
        "half_messages": half.run.report["sent"],
        "half_seconds": bench.args.half_seconds,
        "puback_p99_ms": half.run.latency("puback_ms", "p99").map(round2),
        "sustained_e2e_p99_ms": sustained.run.latency("e2e_ms", "p99").map(round2),
        "first_failing_msgs_per_s": failed.as_ref().map(|s| s.rate),
        "first_failure": failed.as_ref().and_then(|s| s.failure.clone()),
        "users": bench.args.users,
        "devices": devices,
        "step_seconds": bench.args.seconds,
        "steps": trail,
        "target_e2e_p99_ms": TARGET_E2E_P99_MS,
        "target_met": met,
    });
    bench.stack.save_result("e2e", &line)?;
    println!("{line}");
    Ok(())
}
