//! Outages of the servers around the bridge, each on a private server so that freezing or
//! restarting it disturbs no other test: Kafka frozen under load, the MQTT broker restarted
//! under load. Nothing a device got a PUBACK for may be lost, and the bridge must resume by
//! itself.

mod common;

use std::time::{Duration, Instant};

use common::{bridge_config, tally, topics, BridgeProcess, Fleet};
use telemetry_bridge::metrics::{MESSAGES_FORWARDED, MESSAGES_RECEIVED, MQTT_RECONNECTS};
use test_servers::{shared, Mosquitto, Tansu};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_broker_frozen_for_ten_seconds_under_load_loses_nothing_and_holds_messages_at_the_mqtt_broker(
) {
    let tansu = Tansu::start().expect("private Kafka broker");
    let kafka = topics(&tansu, 3);
    let port = shared().mosquitto.port();
    let mut fleet = Fleet::new(4);
    let mut config = bridge_config(&kafka, port, vec![fleet.filter()]);
    config.max_in_flight = 200;
    let mut bridge = BridgeProcess::start(&config, &[]);
    bridge.wait_ready().await;

    fleet.start(port, 2000, Duration::from_millis(2));
    // Freeze once records flow, so that produce requests are on the wire when it stops.
    let flowing = Instant::now();
    while bridge.metric(MESSAGES_FORWARDED).await < 500.0 {
        assert!(
            flowing.elapsed() < Duration::from_secs(60),
            "no records reached Kafka"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tansu.pause();
    let frozen = Instant::now();
    let mut widest_gap = 0.0f64;
    while frozen.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let counts = bridge
            .metrics(&[MESSAGES_RECEIVED, MESSAGES_FORWARDED])
            .await;
        widest_gap = widest_gap.max(counts[0] - counts[1]);
    }
    let acked_while_frozen = fleet.acked_so_far();
    tansu.resume();
    println!(
        "kafka frozen 10 s: devices had {acked_while_frozen} PUBACKs by the end of it; \
         the bridge held at most {widest_gap} messages unconfirmed (max_in_flight {})",
        config.max_in_flight
    );
    // The Receive Maximum asks the broker for at most `max_in_flight` unacknowledged messages.
    // Mosquitto 2.0.11 answers an acknowledgement with up to a window more, so the bridge paces
    // its acknowledgements: none while a window is unconfirmed, and none at all once Kafka stops
    // confirming. The thousands published during the freeze wait at the broker, not in the
    // bridge.
    let bound = 2 * config.max_in_flight + 2;
    assert!(
        widest_gap <= bound as f64,
        "the bridge took {widest_gap} messages it could not deliver; its bound is {bound}"
    );
    let acked = fleet.finish().await;

    let tally = tally(&kafka, &fleet.user, &acked);
    bridge.terminate();
    tally.assert_nothing_lost("kafka frozen for 10 s during load");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_reconnects_and_resumes_after_the_mqtt_broker_restarts_under_load() {
    let mosquitto = Mosquitto::start().expect("private MQTT broker");
    let kafka = topics(&shared().kafka, 3);
    let port = mosquitto.port();
    let mut fleet = Fleet::new(4);
    let mut bridge = BridgeProcess::start(&bridge_config(&kafka, port, vec![fleet.filter()]), &[]);
    bridge.wait_ready().await;

    fleet.start(port, 1500, Duration::from_millis(1));
    fleet.wait_for_acks(2000).await;
    // A clean stop: Mosquitto saves its sessions, including messages queued for the bridge and
    // those the bridge had not acknowledged yet.
    mosquitto.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    mosquitto.start_again().expect("MQTT broker restarts");
    let acked = fleet.finish().await;
    bridge.wait_ready().await;

    let tally = tally(&kafka, &fleet.user, &acked);
    let reconnects = bridge.metric(MQTT_RECONNECTS).await;
    bridge.terminate();
    println!("MQTT broker restart: the bridge reconnected after {reconnects} failed polls");
    assert!(reconnects >= 1.0, "the bridge noticed the restart");
    tally.assert_nothing_lost("MQTT broker restarted during load");
}

/// Kafka stops answering for longer than the stall timeout while messages are held: the bridge
/// says so on /healthz (so an orchestrator restarts it), still stops on SIGTERM within its drain
/// timeout, and after Kafka returns a new bridge delivers everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_that_settles_nothing_for_its_stall_timeout_fails_healthz_and_stops_on_sigterm() {
    let tansu = Tansu::start().expect("private Kafka broker");
    let kafka = topics(&tansu, 3);
    let port = shared().mosquitto.port();
    let mut fleet = Fleet::new(4);
    let mut config = bridge_config(&kafka, port, vec![fleet.filter()]);
    config.stall_timeout_secs = 30;
    let mut bridge = BridgeProcess::start(&config, &[]);
    bridge.wait_ready().await;
    fleet.start(port, 1500, Duration::from_millis(2));
    fleet.wait_for_acks(500).await;
    assert_eq!(
        common::http_get(bridge.http_port, "/healthz")
            .await
            .map(|(s, _)| s),
        Some(200)
    );

    tansu.pause();
    let frozen = Instant::now();
    loop {
        let health = common::http_get(bridge.http_port, "/healthz").await;
        if health.as_ref().map(|(status, _)| *status) == Some(503) {
            let (_, body) = health.unwrap();
            assert!(body.contains("progress: failing"), "{body}");
            break;
        }
        assert!(
            frozen.elapsed() < Duration::from_secs(90),
            "/healthz still answers {health:?} after {:?} with nothing settled; log:\n{}",
            frozen.elapsed(),
            bridge.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    println!("/healthz failed {:?} after Kafka froze", frozen.elapsed());
    // SIGTERM with Kafka still frozen: the drain gives up after its timeout, nothing is
    // acknowledged that Kafka did not confirm, and the process exits (within 40 s, or
    // `terminate` fails the test).
    bridge.terminate();
    tansu.resume();

    bridge.restart();
    bridge.wait_ready().await;
    let acked = fleet.finish().await;
    let tally = tally(&kafka, &fleet.user, &acked);
    bridge.terminate();
    tally.assert_nothing_lost("kafka frozen past the stall timeout, bridge stopped and restarted");
}
