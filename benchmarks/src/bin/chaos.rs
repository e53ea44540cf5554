//! `make chaos`: the local stack under steady load from the load-tester while a seeded schedule
//! of faults runs, each at least once, and then the promise checked: every reading a device got
//! a PUBACK for stored exactly once, every alert raised once and received once.
//!
//! The drill runs on a stack of its own (`STACK_DIR=/tmp/telemetry-pipeline-chaos-<offset>`,
//! every port shifted by `--port-offset`), with Kafka on Tansu's PostgreSQL storage so that a
//! broker restart loses nothing, behind a TCP proxy the drill can cut. Each fault gets a round
//! of its own: fresh device owners publish for the whole fault, the fault is injected after a
//! few seconds and cleared, and the load-tester then verifies every reading and alert of the
//! round. Per fault it prints the time from clearing the fault to a healthy pipeline (stages
//! ready, Kafka lag and the bridge's held messages back under two seconds of load) and the peak
//! lag meanwhile.
//!
//! The last line is one JSON object: `{"bench":"chaos","faults":N,"lost":0,"duplicated":0,
//! "alerts_lost":0,"alerts_duplicated":0,"max_recovery_s":S,...}`. The exit code is 1 when a
//! guarantee broke or a fault did not recover, so `make test` can run a short drill.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use benchmarks::chaos::{schedule, Drill, Fault, Holds, KafkaProxy, Probe, ProbeTargets};
use benchmarks::stack::{round2, LoadRun, LocalStack};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(about = "Faults under load on the local stack: lost, duplicated, time to recover")]
struct Args {
    /// Orders the faults; the same seed gives the same schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run only the first N faults of the schedule [default: all 12].
    #[arg(long)]
    faults: Option<usize>,
    /// Run these faults in this order instead of a seeded schedule (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Fault>,
    /// Fleet rate in messages per second, held through every fault.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Device owners per round (one MQTT connection each, logged in as that user).
    #[arg(long, default_value_t = 10)]
    users: u64,
    #[arg(long, default_value_t = 5)]
    devices_per_user: u64,
    /// Share of readings above the alert threshold.
    #[arg(long, default_value_t = 0.02)]
    alert_fraction: f64,
    /// Added to every port of the local stack's defaults, so the drill's stack runs beside it.
    #[arg(long, default_value_t = 100)]
    port_offset: u16,
    /// Seconds of load before each fault.
    #[arg(long, default_value_t = 5)]
    lead_s: u64,
    /// Seconds of load after each fault is cleared.
    #[arg(long, default_value_t = 15)]
    tail_s: u64,
    /// Seconds a fault may take to recover before the drill calls it failed.
    #[arg(long, default_value_t = 180)]
    recovery_limit_s: u64,
    #[arg(long, default_value_t = 65)]
    freeze_kafka_s: u64,
    #[arg(long, default_value_t = 50)]
    stop_worker_s: u64,
    #[arg(long, default_value_t = 20)]
    cut_kafka_s: u64,
    #[arg(long, default_value_t = 20)]
    exhaust_postgres_s: u64,
    #[arg(long, default_value_t = 20)]
    scaled_s: u64,
    /// Leave the drill's stack running afterwards (`STACK_DIR=... scripts/stack.sh down`).
    #[arg(long)]
    keep: bool,
}

/// The load-tester's exit code when not every message was sent and acknowledged.
const EXIT_INCOMPLETE: i32 = 4;

/// One fault's round.
struct Round {
    fault: Fault,
    /// Why the fault could not be injected or cleared, if it could not.
    error: Option<String>,
    recovered_s: Option<f64>,
    /// Stages that exited after the fault and were started again (a restart policy's work).
    restarts: Vec<String>,
    peak_kafka_lag: f64,
    peak_bridge_held: f64,
    load: Option<LoadRun>,
}

impl Round {
    fn count(&self, field: &str) -> u64 {
        self.load
            .as_ref()
            .and_then(|run| run.report[field].as_u64())
            .unwrap_or(0)
    }

    fn alerts_lost(&self) -> u64 {
        self.count("alerts_missing") + self.count("alerts_not_received")
    }

    fn alerts_duplicated(&self) -> u64 {
        self.count("alerts_duplicated") + self.count("alerts_received_twice")
    }

    fn passed(&self) -> bool {
        self.error.is_none()
            && self.recovered_s.is_some()
            && self.load.as_ref().is_some_and(|run| {
                run.exit_code == 0
                    || (run.exit_code == EXIT_INCOMPLETE && self.devices_were_cut_off())
            })
    }

    /// While the MQTT broker restarts, devices cannot publish and PUBACKs in flight are lost, so
    /// the load-tester reports its run incomplete (unsent and unacknowledged messages, which the
    /// promise does not cover); the verification of everything acknowledged must still pass.
    fn devices_were_cut_off(&self) -> bool {
        self.fault == Fault::RestartMqtt
            && ["lost", "duplicated", "unexpected"]
                .iter()
                .all(|field| self.count(field) == 0)
            && self.alerts_lost() == 0
            && self.alerts_duplicated() == 0
            && self.count("alerts_unexpected") == 0
            && self.count("alerts_misdelivered") == 0
    }

    fn summary(&self) -> Value {
        json!({
            "fault": self.fault.name(),
            "recovered_s": self.recovered_s.map(round2),
            "restarts": self.restarts,
            "peak_kafka_lag": self.peak_kafka_lag,
            "peak_bridge_held": self.peak_bridge_held,
            "acked": self.count("acked"),
            "unacked": self.count("unacked"),
            "stored": self.count("stored_rows"),
            "lost": self.count("lost"),
            "duplicated": self.count("duplicated"),
            "alerts_expected": self.count("alerts_expected"),
            "alerts_lost": self.alerts_lost(),
            "alerts_duplicated": self.alerts_duplicated(),
            "load_tester_exit": self.load.as_ref().map(|run| run.exit_code),
            "error": self.error,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ports = StackPorts::from_offset(args.port_offset);
    ports.export();
    let stack = LocalStack::from_env()?;
    let proxy = KafkaProxy::start(ports.kafka_client, ports.kafka)?;
    // A drill starts from nothing: no records, offsets or sessions of an earlier one.
    stack.script(&["down"])?;
    stack.up()?;
    let faults = if args.only.is_empty() {
        schedule(args.seed, args.faults.unwrap_or(Fault::ALL.len()))
    } else {
        args.only.clone()
    };
    let names: Vec<&str> = faults.iter().map(|f| f.name()).collect();
    println!(
        "chaos: seed {}, {} faults: {}; {} msg/s from {} devices",
        args.seed,
        faults.len(),
        names.join(", "),
        args.rate,
        args.users * args.devices_per_user
    );
    let holds = Holds {
        freeze_kafka: Duration::from_secs(args.freeze_kafka_s),
        stop_worker: Duration::from_secs(args.stop_worker_s),
        cut_kafka: Duration::from_secs(args.cut_kafka_s),
        exhaust_postgres: Duration::from_secs(args.exhaust_postgres_s),
        scaled: Duration::from_secs(args.scaled_s),
    };
    let drill = Drill {
        stack: &stack,
        proxy: &proxy,
        holds,
        restart_limit: Duration::from_secs(args.recovery_limit_s),
        pg_port: ports.pg,
    };
    let targets = ProbeTargets {
        pipeline_db: stack.database_url.clone(),
        kafka_db: format!("postgres://postgres@127.0.0.1:{}/tansu", ports.kafka_pg),
        worker_http: stack.worker_http.clone(),
        bridge_http: stack.bridge_http.clone(),
        topic: "iot-stream".to_owned(),
        group: "telemetry-worker".to_owned(),
    };
    let started = Instant::now();
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut rounds = Vec::new();
    for (index, fault) in faults.iter().copied().enumerate() {
        let round = run_round(&args, &stack, &drill, &targets, fault, stamp, index)?;
        print_round(&round, index + 1, faults.len());
        rounds.push(round);
    }
    if !args.keep {
        stack.script(&["down"])?;
    }
    let line = summary(&args, &rounds, started.elapsed());
    let passed = rounds.iter().all(Round::passed);
    println!("{line}");
    if !passed {
        std::process::exit(1);
    }
    Ok(())
}

fn run_round(
    args: &Args,
    stack: &LocalStack,
    drill: &Drill,
    targets: &ProbeTargets,
    fault: Fault,
    stamp: u64,
    index: usize,
) -> anyhow::Result<Round> {
    let prefix = format!("chaos{stamp}r{index}-u");
    stack.add_users(&prefix, args.users)?;
    let seconds = args.lead_s + drill.holds.of(fault).as_secs() + args.tail_s;
    let flags = load_flags(args, &prefix, seconds, &format!("chaos{stamp}r{index}"));
    let load = {
        let stack = stack.clone();
        std::thread::spawn(move || stack.load_test(&flags))
    };
    std::thread::sleep(Duration::from_secs(args.lead_s));
    let watch = Watch::start(targets.clone());
    println!("chaos: {} ...", fault.name());
    let error = drill.run(fault).err().map(|e| format!("{e:#}"));
    let lag_limit = (args.rate * 2.0).max(500.0);
    let (recovered_s, restarts) = wait_healthy(
        drill,
        targets,
        lag_limit,
        Duration::from_secs(args.recovery_limit_s),
    );
    let probes = watch.stop();
    let load = load
        .join()
        .map_err(|_| anyhow::anyhow!("the load-tester thread panicked"))?
        .map_err(|e| eprintln!("chaos: {e:#}"))
        .ok();
    let peak = |field: fn(&Probe) -> f64| probes.iter().map(field).fold(0.0f64, f64::max);
    Ok(Round {
        fault,
        error,
        recovered_s,
        restarts,
        peak_kafka_lag: peak(|p| p.kafka_lag.unwrap_or(0.0)),
        peak_bridge_held: peak(|p| p.bridge_held),
        load,
    })
}

fn load_flags(args: &Args, prefix: &str, seconds: u64, run_id: &str) -> Vec<String> {
    let devices = args.users * args.devices_per_user;
    [
        "--users",
        &args.users.to_string(),
        "--devices-per-user",
        &args.devices_per_user.to_string(),
        "--rate",
        &format!("{}", args.rate / devices as f64),
        "--duration",
        &format!("{seconds}s"),
        "--user-prefix",
        prefix,
        "--run-id",
        run_id,
        "--alert-fraction",
        &args.alert_fraction.to_string(),
        "--verify",
        "--verify-alerts",
        "--verify-timeout",
        "5m",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// How long Tansu's group may stay wedged before the drill clears it: longer than the
/// session time-out (45 s), after which Tansu itself would have expired the members that left.
const KAFKA_GROUP_WEDGE: Duration = Duration::from_secs(60);

/// How a repair of Tansu's wedged group is named among a round's restarts.
const KAFKA_GROUP_REPAIR: &str = "tansu-group-repair";

/// Seconds from now until the pipeline is healthy (`None` past `limit`), and the stages that
/// exited meanwhile and were started again.
fn wait_healthy(
    drill: &Drill,
    targets: &ProbeTargets,
    lag_limit: f64,
    limit: Duration,
) -> (Option<f64>, Vec<String>) {
    let cleared = Instant::now();
    let mut restarts = Vec::new();
    let mut wedged_since: Option<Instant> = None;
    while cleared.elapsed() < limit {
        if targets.probe().healthy(lag_limit) {
            return (Some(cleared.elapsed().as_secs_f64()), restarts);
        }
        restarts.extend(drill.restart_exited());
        // A wedge that outlasts the session time-out is the broker's; a shorter one is a rebalance.
        wedged_since = match (targets.kafka_group_wedged(), wedged_since) {
            (false, _) => None,
            (true, None) => Some(Instant::now()),
            (true, Some(since)) if since.elapsed() > KAFKA_GROUP_WEDGE => {
                eprintln!("chaos: Tansu's coordinator wedged the worker's group; clearing it");
                if let Err(error) = drill.repair_kafka_group(&targets.kafka_db, &targets.group) {
                    eprintln!("chaos: {error:#}");
                }
                restarts.push(KAFKA_GROUP_REPAIR.to_owned());
                None
            }
            (true, since) => since,
        };
        std::thread::sleep(Duration::from_millis(250));
    }
    (None, restarts)
}

/// Probes the pipeline every half second in the background, for the peaks of a round.
struct Watch {
    stop: Arc<AtomicBool>,
    probes: Arc<Mutex<Vec<Probe>>>,
    thread: std::thread::JoinHandle<()>,
}

impl Watch {
    fn start(targets: ProbeTargets) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let probes = Arc::new(Mutex::new(Vec::new()));
        let (flag, sink) = (stop.clone(), probes.clone());
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Acquire) {
                let probe = targets.probe();
                if let Ok(mut probes) = sink.lock() {
                    probes.push(probe);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        Watch {
            stop,
            probes,
            thread,
        }
    }

    fn stop(self) -> Vec<Probe> {
        self.stop.store(true, Ordering::Release);
        let _ = self.thread.join();
        self.probes.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

fn print_round(round: &Round, number: usize, of: usize) {
    let mut recovered = round.recovered_s.map_or("did NOT recover".to_owned(), |s| {
        format!("recovered in {s:.1} s")
    });
    if !round.restarts.is_empty() {
        recovered += &format!(" (restarted: {})", round.restarts.join(", "));
    }
    println!(
        "chaos: [{number}/{of}] {}: {recovered}, peak Kafka lag {:.0}, peak bridge held {:.0}; \
         readings acked {} (unacked {}), stored {}, lost {}, duplicated {}; alerts expected {}, \
         lost {}, duplicated {}{}",
        round.fault.name(),
        round.peak_kafka_lag,
        round.peak_bridge_held,
        round.count("acked"),
        round.count("unacked"),
        round.count("stored_rows"),
        round.count("lost"),
        round.count("duplicated"),
        round.count("alerts_expected"),
        round.alerts_lost(),
        round.alerts_duplicated(),
        round
            .error
            .as_ref()
            .map_or(String::new(), |e| format!("; FAULT ERROR: {e}")),
    );
    if let Some(run) = round.load.as_ref().filter(|run| run.exit_code != 0) {
        println!(
            "chaos: the load-tester's verification failed (exit {}):\n{}",
            run.exit_code, run.stderr
        );
    }
}

fn summary(args: &Args, rounds: &[Round], elapsed: Duration) -> Value {
    let sum = |f: &dyn Fn(&Round) -> u64| rounds.iter().map(f).sum::<u64>();
    let max_recovery = rounds
        .iter()
        .filter_map(|r| r.recovered_s)
        .fold(0.0f64, f64::max);
    json!({
        "bench": "chaos",
        "faults": rounds.len(),
        "lost": sum(&|r| r.count("lost")),
        "duplicated": sum(&|r| r.count("duplicated")),
        "alerts_lost": sum(&|r| r.alerts_lost()),
        "alerts_duplicated": sum(&|r| r.alerts_duplicated()),
        "max_recovery_s": round2(max_recovery),
        "unrecovered": rounds.iter().filter(|r| r.recovered_s.is_none()).count(),
        "tansu_group_repairs": rounds
            .iter()
            .flat_map(|r| &r.restarts)
            .filter(|name| *name == KAFKA_GROUP_REPAIR)
            .count(),
        "failed_rounds": rounds.iter().filter(|r| !r.passed()).count(),
        "acked": sum(&|r| r.count("acked")),
        "stored": sum(&|r| r.count("stored_rows")),
        "alerts_expected": sum(&|r| r.count("alerts_expected")),
        "peak_kafka_lag": rounds.iter().map(|r| r.peak_kafka_lag).fold(0.0f64, f64::max),
        "seed": args.seed,
        "rate_msgs_per_s": args.rate,
        "seconds": round2(elapsed.as_secs_f64()),
        "per_fault": rounds.iter().map(Round::summary).collect::<Vec<_>>(),
    })
}

/// The drill's stack: the local stack's default ports shifted by an offset, Kafka durable and
/// behind the drill's proxy.
struct StackPorts {
    pg: u16,
    kafka: u16,
    kafka_client: u16,
    kafka_pg: u16,
    offset: u16,
}

impl StackPorts {
    fn from_offset(offset: u16) -> StackPorts {
        StackPorts {
            pg: 55432 + offset,
            kafka: 59092 + offset,
            kafka_client: 59092 + offset + 1,
            kafka_pg: 55433 + offset,
            offset,
        }
    }

    /// Sets the environment `scripts/stack.sh` and [`LocalStack::from_env`] read. Called first
    /// thing in `main`, before any other thread exists.
    fn export(&self) {
        let offset = self.offset;
        let port = |base: u16| (base + offset).to_string();
        let vars = [
            (
                "STACK_DIR",
                format!("/tmp/telemetry-pipeline-chaos-{offset}"),
            ),
            ("PG_PORT", self.pg.to_string()),
            ("PGBOUNCER_PORT", port(56432)),
            ("MQTT_PORT", port(51883)),
            ("KAFKA_PORT", self.kafka.to_string()),
            ("KAFKA_CLIENT_PORT", self.kafka_client.to_string()),
            ("KAFKA_PG_PORT", self.kafka_pg.to_string()),
            ("KAFKA_STORAGE", "postgres".to_owned()),
            ("WORKER_HTTP", format!("127.0.0.1:{}", port(9101))),
            ("BRIDGE_HTTP", format!("127.0.0.1:{}", port(9102))),
            ("API_HTTP", format!("127.0.0.1:{}", port(9103))),
            ("API_LISTEN", format!("127.0.0.1:{}", port(8081))),
        ];
        for (name, value) in vars {
            std::env::set_var(name, value);
        }
    }
}
