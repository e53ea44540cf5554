//! A short fault drill in `make test`: the local stack's debug builds, on Kafka with durable
//! storage, under load while the worker and the bridge are killed with kill -9 and the Kafka
//! broker is killed and started again. The drill's own verdict (every acknowledged reading
//! stored once, every alert raised and received once, each fault recovered) decides; `make
//! chaos` runs all twelve faults on release builds.

use std::process::Command;

use serde_json::Value;

#[test]
fn three_faults_lose_and_repeat_nothing() {
    let output = Command::new(env!("CARGO_BIN_EXE_chaos"))
        .args(["--only", "kill-worker,restart-kafka,kill-bridge"])
        .args(["--rate", "300", "--users", "5", "--devices-per-user", "4"])
        .args([
            "--lead-s",
            "4",
            "--tail-s",
            "8",
            "--recovery-limit-s",
            "120",
        ])
        // Apart from `make chaos`'s stack (offset 100) and the local stack (0).
        .args(["--port-offset", "300"])
        .output()
        .expect("the chaos binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line: Value = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("no JSON line from the drill:\n{stdout}\n{stderr}"));
    let report = format!("{stdout}\n--- stderr (tail) ---\n{}", tail(&stderr, 60));
    assert_eq!(line["faults"], 3, "{report}");
    for field in [
        "lost",
        "duplicated",
        "alerts_lost",
        "alerts_duplicated",
        "unrecovered",
        "failed_rounds",
    ] {
        assert_eq!(line[field], 0, "{field} is not 0:\n{report}");
    }
    assert!(
        line["acked"].as_u64().unwrap_or(0) > 0,
        "nothing was published:\n{report}"
    );
    assert!(output.status.success(), "the drill failed:\n{report}");
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
