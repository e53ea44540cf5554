//! `redpanda/` creates the topics the code uses, with the partitions and retention the
//! operations guide promises.

use deploy_check::{read, yaml};
use telemetry_core::contract::{DEFAULT_DLQ_TOPIC, DEFAULT_TOPIC};

/// (name, partitions, retention.ms) from redpanda/topics.conf.
fn declared_topics() -> Vec<(String, u32, u64)> {
    read("redpanda/topics.conf")
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(
                fields.len(),
                3,
                "'{line}': want name, partitions, retention.ms"
            );
            (
                fields[0].to_owned(),
                fields[1].parse().expect("partitions is a number"),
                fields[2].parse().expect("retention.ms is a number"),
            )
        })
        .collect()
}

#[test]
fn the_topics_are_the_contract_topics() {
    let topics = declared_topics();
    let names: Vec<&str> = topics.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, [DEFAULT_TOPIC, DEFAULT_DLQ_TOPIC]);
    let (_, partitions, retention) = &topics[0];
    assert_eq!(*partitions, 12, "iot-stream has 12 partitions");
    assert_eq!(*retention, 7 * 24 * 3600 * 1000, "iot-stream keeps 7 days");
    assert!(topics[1].2 > 0, "the dead-letter topic has a retention too");
}

#[test]
fn the_init_script_reads_the_topic_list_and_is_valid_bash() {
    let script = read("redpanda/create-topics.sh").unwrap();
    assert!(script.contains("topics.conf"));
    let status = std::process::Command::new("bash")
        .arg("-n")
        .arg(deploy_check::repo_root().join("redpanda/create-topics.sh"))
        .status()
        .expect("bash runs");
    assert!(
        status.success(),
        "redpanda/create-topics.sh has a syntax error"
    );
}

#[test]
fn the_compose_init_job_runs_the_script_from_the_mounted_directory() {
    let compose = yaml("docker-compose.yml").unwrap();
    let init = &compose["services"]["redpanda-init"];
    assert_eq!(init["volumes"][0], "./redpanda:/redpanda:ro");
    assert_eq!(init["entrypoint"][1], "/redpanda/create-topics.sh");
    assert_eq!(init["image"], compose["services"]["redpanda"]["image"]);
}
