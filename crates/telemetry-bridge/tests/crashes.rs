//! The bridge process dies with SIGKILL under load, on the shared Mosquitto and Kafka: nothing a
//! device got a PUBACK for may be missing from Kafka afterwards. Duplicates are allowed by the
//! at-least-once guarantee; each test prints how many it saw.

mod common;

use std::time::Duration;

use common::{bridge_config, tally, topics, BridgeProcess, Fleet};
use telemetry_bridge::metrics::MESSAGES_RECEIVED;
use test_servers::{shared, unique_name};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_bridge_during_load_loses_nothing_a_device_got_a_puback_for() {
    let servers = shared();
    let kafka = topics(&servers.kafka, 3);
    let port = servers.mosquitto.port();
    let mut fleet = Fleet::new(4);
    let mut bridge = BridgeProcess::start(&bridge_config(&kafka, port, vec![fleet.filter()]), &[]);
    bridge.wait_ready().await;

    fleet.start(port, 1500, Duration::from_millis(1));
    fleet.wait_for_acks(2000).await;
    bridge.kill9();
    // The broker queues for the bridge's session while it is dead.
    fleet.wait_for_acks(3000).await;
    bridge.restart();
    bridge.wait_ready().await;
    let acked = fleet.finish().await;

    let tally = tally(&kafka, &fleet.user, &acked);
    bridge.terminate();
    tally.assert_nothing_lost("kill -9 during load");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_a_shared_subscription_split_the_load_and_one_dying_loses_nothing() {
    let servers = shared();
    let kafka = topics(&servers.kafka, 3);
    let port = servers.mosquitto.port();
    let mut fleet = Fleet::new(4);
    let mut config = bridge_config(&kafka, port, vec![fleet.filter()]);
    config.mqtt.shared_group = Some(unique_name("bridges"));
    let mut first = BridgeProcess::start(&config, &[]);
    config.mqtt.client_id = unique_name("bridge");
    let mut second = BridgeProcess::start(&config, &[]);
    first.wait_ready().await;
    second.wait_ready().await;

    fleet.start(port, 1500, Duration::from_millis(1));
    fleet.wait_for_acks(1500).await;
    let (first_share, second_share) = (
        first.metric(MESSAGES_RECEIVED).await,
        second.metric(MESSAGES_RECEIVED).await,
    );
    println!("shared subscription: replica 1 received {first_share}, replica 2 {second_share}");
    assert!(
        first_share > 0.0 && second_share > 0.0,
        "both replicas take part: {first_share} and {second_share}"
    );

    second.kill9();
    fleet.wait_for_acks(3500).await;
    // What the broker had handed the dead replica waits in its session until it comes back.
    second.restart();
    second.wait_ready().await;
    let acked = fleet.finish().await;

    let tally = tally(&kafka, &fleet.user, &acked);
    println!(
        "after the kill: replica 1 received {} in all, replica 2 {} since its restart",
        first.metric(MESSAGES_RECEIVED).await,
        second.metric(MESSAGES_RECEIVED).await
    );
    first.terminate();
    second.terminate();
    tally.assert_nothing_lost("two replicas, one killed with -9 during load");
}
