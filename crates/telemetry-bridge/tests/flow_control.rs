//! How the bridge meets a broker that sends too much, too large or too often, on the shared
//! Mosquitto (2.0.11, configured as the local stack's) and Kafka.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{bridge_config, tally, topics, BridgeProcess, Fleet};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use telemetry_bridge::metrics::{HELD, MESSAGES_FORWARDED, MQTT_RECONNECTS, REDELIVERED};
use test_servers::{shared, unique_name};

/// Mosquitto 2.0.11 answers each in-order PUBACK with up to Receive Maximum - 1 more messages
/// (eclipse-mosquitto/mosquitto#2301), so a bridge resuming in front of a backlog is sent far
/// more than its Receive Maximum. It must keep its session (no keep-alive failure), lose and
/// repeat nothing, and not take the whole backlog into memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_overshoots_the_receive_maximum_neither_wedges_nor_swells_the_bridge() {
    const WINDOW: usize = 20;
    const DEVICES: usize = 20;
    const PER_DEVICE: u64 = 1_000;
    let servers = shared();
    let kafka = topics(&servers.kafka, 3);
    let port = servers.mosquitto.port();
    let mut fleet = Fleet::new(DEVICES);
    let mut config = bridge_config(&kafka, port, vec![fleet.filter()]);
    config.max_in_flight = WINDOW;
    // The session and its subscription exist; then the bridge goes away.
    let mut bridge = BridgeProcess::start(&config, &[]);
    bridge.wait_ready().await;
    bridge.terminate();
    let acked = fleet.flood(port, PER_DEVICE).await;
    assert_eq!(acked.len(), DEVICES * PER_DEVICE as usize);

    bridge.restart();
    let peak = Arc::new(std::sync::Mutex::new(0.0f64));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done, port) = (peak.clone(), done.clone(), bridge.http_port);
        tokio::spawn(async move {
            while !done.load(Ordering::Acquire) {
                if let Some((_, page)) = common::http_get(port, "/metrics").await {
                    let held = test_servers::metric_value(&page, HELD);
                    if std::env::var("TRACE_HELD").is_ok() {
                        println!(
                            "held {held} owed {} forwarded {}",
                            test_servers::metric_value(&page, telemetry_bridge::metrics::ACKS_OWED),
                            test_servers::metric_value(&page, MESSAGES_FORWARDED)
                        );
                    }
                    let mut peak = peak.lock().unwrap();
                    *peak = peak.max(held);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    while bridge.metric(MESSAGES_FORWARDED).await < acked.len() as f64 {
        assert!(
            Instant::now() < deadline,
            "backlog not drained in 180 s: {} forwarded; log:\n{}",
            bridge.metric(MESSAGES_FORWARDED).await,
            bridge.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done.store(true, Ordering::Release);
    sampler.await.unwrap();
    let [reconnects, redelivered, dead, received] = bridge
        .metrics(&[
            MQTT_RECONNECTS,
            REDELIVERED,
            telemetry_bridge::metrics::DEAD_LETTERS,
            telemetry_bridge::metrics::MESSAGES_RECEIVED,
        ])
        .await
        .try_into()
        .unwrap();
    println!("received {received}, dead letters {dead}");
    let tally = tally(&kafka, &fleet.user, &acked);
    bridge.terminate();
    let peak = *peak.lock().unwrap();
    println!(
        "backlog of {} at Receive Maximum {WINDOW}: peak held {peak}, {reconnects} reconnects, {redelivered} redelivered",
        acked.len()
    );
    tally.assert_nothing_lost("overshooting broker");
    assert_eq!(reconnects, 0.0, "the session never broke");
    assert_eq!(tally.duplicates, 0, "nothing was forwarded twice");
    // Before the overshoot shows, a window of acknowledgements goes out, each answered with up
    // to a window: the pacing keeps it there, where one acknowledgement per confirmation took in
    // nearly the whole backlog.
    let bound = (WINDOW * WINDOW + WINDOW) as f64;
    assert!(
        peak <= bound,
        "the bridge held {peak} messages unconfirmed of a {} backlog (bound {bound}): acknowledgements must pace the broker",
        acked.len()
    );
}

/// A retained message is delivered to the bridge once, when it is published; with Retain
/// Handling 0 the broker would send it again on every (re)subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_reading_is_ingested_once_however_often_the_bridge_reconnects() {
    let servers = shared();
    let kafka = topics(&servers.kafka, 1);
    let port = servers.mosquitto.port();
    let user = unique_name("u");
    let filter = format!("users/{user}/devices/+/telemetry");
    let mut bridge = BridgeProcess::start(&bridge_config(&kafka, port, vec![filter]), &[]);
    bridge.wait_ready().await;

    let mut options = MqttOptions::new(unique_name("device"), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    let (device, mut eventloop) = AsyncClient::new(options, 10);
    device
        .publish(
            format!("users/{user}/devices/d0/telemetry"),
            QoS::AtLeastOnce,
            true,
            r#"{"seq":1,"temperature":20.5}"#,
        )
        .await
        .unwrap();
    wait_for_puback(&mut eventloop).await;

    for _ in 0..2 {
        bridge.terminate();
        bridge.restart();
        bridge.wait_ready().await;
    }
    // A last message, so that everything before it has reached Kafka when it has.
    device
        .publish(
            format!("users/{user}/devices/d0/telemetry"),
            QoS::AtLeastOnce,
            false,
            r#"{"seq":2,"temperature":21.5}"#,
        )
        .await
        .unwrap();
    wait_for_puback(&mut eventloop).await;
    let records = common::read_topic(&kafka, &kafka.topic, Duration::from_secs(60), |records| {
        records.iter().any(|r| r.payload.contains(r#""seq":2"#))
    });
    bridge.terminate();
    let retained = records
        .iter()
        .filter(|r| r.payload.contains(r#""seq":1"#))
        .count();
    assert_eq!(
        retained, 1,
        "the retained reading reached Kafka {retained} times"
    );
}

/// A payload over the bridge's `max_payload_bytes` but within the broker's limit is
/// dead-lettered with its reason; one over the broker's limit is refused at the door, so the
/// device sees its connection refused instead of a PUBACK. Nothing is dropped in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_payload_is_dead_lettered_or_refused_at_the_broker_never_lost_silently() {
    let servers = shared();
    let kafka = topics(&servers.kafka, 1);
    let port = servers.mosquitto.port();
    let user = unique_name("u");
    let filter = format!("users/{user}/devices/+/telemetry");
    let mut bridge = BridgeProcess::start(&bridge_config(&kafka, port, vec![filter]), &[]);
    bridge.wait_ready().await;
    let topic = format!("users/{user}/devices/d0/telemetry");

    let mut options = MqttOptions::new(unique_name("device"), "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(5))
        .set_max_packet_size(4 << 20, 4 << 20);
    let (device, mut eventloop) = AsyncClient::new(options, 10);
    let large = padded_payload(200_000);
    device
        .publish(&topic, QoS::AtLeastOnce, false, large.clone())
        .await
        .unwrap();
    wait_for_puback(&mut eventloop).await;
    let letters = test_servers::read_dead_letters(&kafka.brokers, &kafka.dlq_topic, 1);
    assert_eq!(letters.len(), 1);
    assert_eq!(
        letters[0].get("dlq_reason").map(String::as_str),
        Some("payload_too_large")
    );
    assert_eq!(
        letters[0].get("payload").map(String::len),
        Some(large.len())
    );

    device
        .publish(&topic, QoS::AtLeastOnce, false, padded_payload(2_000_000))
        .await
        .unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return Err("a PUBACK"),
                Ok(_) => {}
                Err(error) => return Ok(error),
            }
        }
    })
    .await
    .expect("the broker answers a 2 MB publish within 10 s");
    let error = refused.expect("the broker refuses a 2 MB publish");
    println!("a 2 MB publish was refused: {error}");
    let forwarded = bridge.metric(MESSAGES_FORWARDED).await;
    bridge.terminate();
    assert_eq!(forwarded, 1.0, "only the 200 kB payload reached the bridge");
}

fn padded_payload(bytes: usize) -> String {
    let pad = "x".repeat(bytes.saturating_sub(40));
    format!(r#"{{"seq":1,"temperature":1.5,"pad":"{pad}"}}"#)
}

async fn wait_for_puback(eventloop: &mut rumqttc::EventLoop) {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return,
                Ok(_) => {}
                Err(error) => panic!("device connection failed: {error}"),
            }
        }
    })
    .await
    .expect("PUBACK within 10 s");
}
