//! `telemetry-worker`: consume `iot-stream` and store it in PostgreSQL.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use telemetry_core::config::{self, flag, Sources};
use telemetry_core::Shutdown;
use telemetry_core::{cli, observe};
use telemetry_worker::WorkerConfig;

/// Settings come from flags, then `TELEMETRY_WORKER_*` environment variables (nested fields with
/// `__`, e.g. TELEMETRY_WORKER_BATCH__MAX_RECORDS), then the TOML file, then defaults.
#[derive(Debug, Parser)]
#[command(
    name = "telemetry-worker",
    version,
    about = "Consume iot-stream and store every record exactly once in PostgreSQL"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file.
    #[arg(long, global = true, env = "TELEMETRY_WORKER_CONFIG")]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers (kafka.brokers).
    #[arg(long, global = true)]
    brokers: Option<String>,
    /// Telemetry topic (kafka.topic).
    #[arg(long, global = true)]
    topic: Option<String>,
    /// Dead-letter topic (kafka.dlq_topic).
    #[arg(long, global = true)]
    dlq_topic: Option<String>,
    /// Consumer group (group_id).
    #[arg(long, global = true)]
    group_id: Option<String>,
    /// PostgreSQL URL, normally PgBouncer's (postgres.url).
    #[arg(long, global = true)]
    database_url: Option<String>,
    /// Records per batch (batch.max_records).
    #[arg(long, global = true)]
    batch_max_records: Option<usize>,
    /// Bytes of keys, payloads and headers per batch (batch.max_bytes).
    #[arg(long, global = true)]
    batch_max_bytes: Option<usize>,
    /// Milliseconds a batch may wait for more records (batch.max_wait_ms).
    #[arg(long, global = true)]
    batch_max_wait_ms: Option<u64>,
    /// Milliseconds a batch waits for more records while its writer is idle (batch.linger_ms).
    #[arg(long, global = true)]
    batch_linger_ms: Option<u64>,
    /// Batches written at once, each on its own connection (batch.writers).
    #[arg(long, global = true)]
    batch_writers: Option<usize>,
    /// Address of the /metrics, /healthz and /readyz server (http.listen).
    #[arg(long, global = true)]
    http_listen: Option<SocketAddr>,
    /// Do not apply migrations at start-up (migrate_on_start = false).
    #[arg(long, global = true)]
    no_migrate: bool,
    /// Log format: text or json (log_format).
    #[arg(long, global = true)]
    log_format: Option<String>,
    /// Alert rules file; alerts are off without one (alerts.rules.path).
    #[arg(long, global = true)]
    alert_rules: Option<PathBuf>,
    /// MQTT broker host that alerts are published to (alerts.outbox.mqtt.host).
    #[arg(long, global = true)]
    alerts_mqtt_host: Option<String>,
    /// MQTT broker port that alerts are published to (alerts.outbox.mqtt.port).
    #[arg(long, global = true)]
    alerts_mqtt_port: Option<u16>,
    /// Prefix of the alert publisher's MQTT sessions, `{id}-p{partition}`; the same on every
    /// replica (alerts.outbox.mqtt.client_id).
    #[arg(long, global = true)]
    alerts_mqtt_client_id: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Consume and store until SIGTERM or SIGINT (the default).
    Run,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Print the effective configuration as TOML and exit.
    PrintConfig,
    /// Read history again without duplicating it (stop every worker of the group first).
    ///
    /// With --to-*: rows that are missing (deleted, lost in a restore) in the chosen range of
    /// offsets are stored again; rows present are skipped. With --rebuild: the rows received
    /// between --from and --to are deleted and ingested again from Kafka.
    Replay(ReplayArgs),
    /// Copy dead letters back into the topic they came from, once their cause is fixed.
    ///
    /// Reads the dead-letter topic from --from-offset (the oldest kept by default) up to where
    /// it ends now (or --to-offset), and produces the letters of the chosen reasons to the
    /// telemetry topic with their value, original headers and contract key. Prints, per
    /// partition, the offset before which every selected letter was copied and confirmed:
    /// start the next redrive there. Each source record is copied once, however many letters
    /// it has and however often it is redriven (the table `redriven_letters` remembers).
    Redrive(RedriveArgs),
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("which").args(["reasons", "all_reasons"]).required(true)))]
struct RedriveArgs {
    /// Copy the letters with this dlq_reason (repeat for several), e.g. invalid_reading.
    #[arg(long = "reason", value_name = "REASON", value_parser = dead_letter_reason)]
    reasons: Vec<String>,
    /// Copy the letters of every reason.
    #[arg(long)]
    all_reasons: bool,
    /// Only letters this stage rejected.
    #[arg(long, value_parser = ["bridge", "worker"])]
    stage: Option<String>,
    /// First offset to read in each partition of the dead-letter topic.
    #[arg(long, value_name = "OFFSET")]
    from_offset: Option<i64>,
    /// Offset to stop at in each partition, exclusive.
    #[arg(long, value_name = "OFFSET")]
    to_offset: Option<i64>,
    /// Only this partition of the dead-letter topic (repeat for several); all by default.
    #[arg(long = "partition", value_name = "P")]
    partitions: Vec<i32>,
}

/// A `--reason` must be one of the contract's dead-letter reasons.
fn dead_letter_reason(value: &str) -> Result<String, String> {
    use telemetry_core::contract::DeadLetterReason;
    let codes: Vec<&str> = DeadLetterReason::ALL.iter().map(|r| r.code()).collect();
    if codes.contains(&value) {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "not a dead-letter reason; one of {}",
            codes.join(", ")
        ))
    }
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("start").args(["to_earliest", "to_offset", "to_timestamp", "rebuild", "new_log"]).required(true)))]
struct ReplayArgs {
    /// Replay from the oldest record Kafka keeps.
    #[arg(long)]
    to_earliest: bool,
    /// Replay from this offset (in every chosen partition).
    #[arg(long, value_name = "OFFSET")]
    to_offset: Option<i64>,
    /// Replay from the first record at or after this time (RFC 3339, e.g. 2026-11-23T10:00:00Z).
    #[arg(long, value_name = "TIME")]
    to_timestamp: Option<chrono::DateTime<chrono::Utc>>,
    /// The topic was created again or moved to another cluster: forget the stored position of
    /// each partition whose log now ends below it, and read that log from its oldest record.
    #[arg(long)]
    new_log: bool,
    /// Delete the rows received in [--from, --to) and ingest them again.
    #[arg(long, requires_all = ["from", "to"])]
    rebuild: bool,
    /// Start of the range to rebuild (RFC 3339).
    #[arg(long, value_name = "TIME", requires = "rebuild")]
    from: Option<chrono::DateTime<chrono::Utc>>,
    /// End of the range to rebuild, exclusive (RFC 3339).
    #[arg(long, value_name = "TIME", requires = "rebuild")]
    to: Option<chrono::DateTime<chrono::Utc>>,
    /// Only this partition (repeat for several); all partitions by default.
    #[arg(long = "partition", value_name = "P")]
    partitions: Vec<i32>,
}

fn main() -> ExitCode {
    cli::exit_code("telemetry-worker", run(Cli::parse()))
}

fn load_config(cli: &Cli) -> Result<WorkerConfig, config::ConfigError> {
    config::load(Sources {
        file: cli.config.as_deref(),
        env_prefix: "TELEMETRY_WORKER_",
        overrides: vec![
            ("kafka.brokers", flag(cli.brokers.clone())),
            ("kafka.topic", flag(cli.topic.clone())),
            ("kafka.dlq_topic", flag(cli.dlq_topic.clone())),
            ("group_id", flag(cli.group_id.clone())),
            ("postgres.url", flag(cli.database_url.clone())),
            ("batch.max_records", flag(cli.batch_max_records)),
            ("batch.max_bytes", flag(cli.batch_max_bytes)),
            ("batch.max_wait_ms", flag(cli.batch_max_wait_ms)),
            ("batch.linger_ms", flag(cli.batch_linger_ms)),
            ("batch.writers", flag(cli.batch_writers)),
            ("http.listen", flag(cli.http_listen.map(|a| a.to_string()))),
            ("migrate_on_start", flag(cli.no_migrate.then_some(false))),
            ("log_format", flag(cli.log_format.clone())),
            (
                "alerts.rules.path",
                flag(cli.alert_rules.as_ref().map(|p| p.display().to_string())),
            ),
            (
                "alerts.outbox.mqtt.host",
                flag(cli.alerts_mqtt_host.clone()),
            ),
            ("alerts.outbox.mqtt.port", flag(cli.alerts_mqtt_port)),
            (
                "alerts.outbox.mqtt.client_id",
                flag(cli.alerts_mqtt_client_id.clone()),
            ),
        ],
    })
}

#[tokio::main]
async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = load_config(&cli)?;
    observe::init_logging(config.log_format);
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => telemetry_worker::run(config, Shutdown::on_signals()).await?,
        Command::Migrate => {
            let pool = telemetry_worker::create_pool(&config.postgres)?;
            let mut client = pool.get().await.context("cannot connect to the database")?;
            let applied = telemetry_worker::schema::migrate(&mut client).await?;
            println!("applied migrations: {applied:?}");
        }
        Command::Replay(args) => {
            let replays = replay(&config, &args).await?;
            println!("partition  from_offset  to_offset  rows_deleted");
            for r in &replays {
                println!(
                    "{:>9}  {:>11}  {:>9}  {:>12}",
                    r.partition, r.from, r.to, r.deleted
                );
            }
            println!("start the workers: they read each partition again from from_offset");
        }
        Command::Redrive(args) => {
            let selection = telemetry_worker::redrive::Selection {
                reasons: args.reasons,
                stage: args.stage,
                from_offset: args.from_offset,
                to_offset: args.to_offset,
                partitions: args.partitions,
            };
            let shutdown = Shutdown::on_signals();
            let done = telemetry_worker::redrive::redrive(&config, &selection, &shutdown).await?;
            println!("partition  letters_read  redriven  skipped  duplicates  next_offset");
            for p in &done {
                let next = p.next_offset.map_or("-".to_owned(), |o| o.to_string());
                println!(
                    "{:>9}  {:>12}  {:>8}  {:>7}  {:>10}  {:>11}",
                    p.partition, p.read, p.redriven, p.skipped, p.duplicates, next
                );
            }
            println!(
                "the next redrive of {} starts at next_offset (--partition P --from-offset N)",
                config.kafka.dlq_topic
            );
        }
        Command::PrintConfig => {
            // Secrets and the database URL's password serialize as "***": what is printed may
            // end up in a ticket or a log.
            print!(
                "{}",
                toml::to_string_pretty(&config).context("cannot print the config")?
            );
        }
    }
    Ok(())
}

async fn replay(
    config: &WorkerConfig,
    args: &ReplayArgs,
) -> anyhow::Result<Vec<telemetry_worker::replay::PartitionReplay>> {
    use telemetry_worker::replay::{self, ReplayStart};
    if args.new_log {
        return Ok(replay::start_new_log(config, &args.partitions).await?);
    }
    if args.rebuild {
        let (Some(from), Some(to)) = (args.from, args.to) else {
            anyhow::bail!("--rebuild needs --from and --to");
        };
        return Ok(replay::rebuild(config, from, to, &args.partitions).await?);
    }
    let start = match (args.to_offset, args.to_timestamp) {
        (Some(offset), _) => ReplayStart::Offset(offset),
        (_, Some(time)) => ReplayStart::Timestamp(time),
        _ => ReplayStart::Earliest,
    };
    Ok(replay::replay(config, start, &args.partitions).await?)
}
