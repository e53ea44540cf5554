//! The native bridge: MQTT -> Kafka with at-least-once delivery end to end.
//!
//! Guarantee: an MQTT message is acknowledged (PUBACK) to the broker only after Kafka has
//! confirmed its record (`acks=all`, idempotent producer). The session is persistent (clean
//! session off, stable client id), so whatever the bridge had not acknowledged when it crashed or
//! lost the broker is delivered again by the broker. A message can therefore reach Kafka twice,
//! never zero times; the worker's exactly-once store absorbs the duplicates only when they share
//! an offset, so a device's `seq` lets readers spot the rest.
//!
//! - [`config`]: settings and their checks.
//! - [`forward`]: MQTT message -> Kafka record or dead letter.
//!
//! Acknowledgements go out in the order the messages came (as MQTT requires for QoS 1) from a
//! task of their own, so the MQTT event loop is never blocked waiting for Kafka.

pub mod config;
pub mod forward;

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use telemetry_core::backoff::Backoff;
use telemetry_core::observe::{self, Health};
use telemetry_core::Shutdown;
use tokio::sync::mpsc;

pub use config::BridgeConfig;
use forward::Destination;

pub const MESSAGES_RECEIVED: &str = "telemetry_bridge_messages_received_total";
pub const MESSAGES_FORWARDED: &str = "telemetry_bridge_messages_forwarded_total";
pub const DEAD_LETTERS: &str = "telemetry_bridge_dead_letters_total";
pub const MQTT_RECONNECTS: &str = "telemetry_bridge_mqtt_reconnects_total";

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Observe(#[from] observe::ObserveError),
    #[error("cannot create the Kafka producer: {0}")]
    Producer(KafkaError),
    #[error("kafka refused a record for good ({0}); the message was not acknowledged and the broker will deliver it again after restart")]
    Delivery(KafkaError),
}

/// A message on its way: acknowledged to MQTT once `delivery` resolves.
struct InFlight {
    publish: Publish,
    delivery: DeliveryFuture,
}

/// Runs the bridge until shutdown, then acknowledges what Kafka confirmed and disconnects.
pub async fn run(config: BridgeConfig, shutdown: Shutdown) -> Result<(), BridgeError> {
    let health = Health::new();
    health.set("mqtt", false);
    observe::serve_http(config.http.listen, health.clone(), shutdown.clone()).await?;
    let producer: FutureProducer = config
        .kafka
        .durable_producer_config()
        .create()
        .map_err(BridgeError::Producer)?;
    let (client, mut eventloop) = AsyncClient::new(mqtt_options(&config), 64);
    let (in_flight, acks) = mpsc::channel::<InFlight>(config.max_in_flight);
    let acker = tokio::spawn(acknowledge_in_order(acks, client.clone(), shutdown.clone()));

    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    while !shutdown.is_triggered() {
        let event = tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff.reset();
                health.set("mqtt", true);
                tracing::info!(
                    session_present = ack.session_present,
                    "connected to MQTT broker"
                );
                // Subscribing again on every connect is harmless and covers a broker that lost
                // the session.
                for filter in config.mqtt.subscription_filters() {
                    if let Err(error) = client.subscribe(&filter, QoS::AtLeastOnce).await {
                        tracing::error!(%error, %filter, "cannot subscribe");
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                metrics::counter!(MESSAGES_RECEIVED).increment(1);
                let delivery = produce(&producer, &config, &publish)
                    .await
                    .map_err(BridgeError::Delivery)?;
                if in_flight
                    .send(InFlight { publish, delivery })
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Ok(_) => {}
            Err(error) => {
                health.set("mqtt", false);
                metrics::counter!(MQTT_RECONNECTS).increment(1);
                let delay = backoff.next_delay();
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "MQTT connection lost; reconnecting");
                tokio::select! {
                    _ = shutdown.wait() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    drain_and_disconnect(in_flight, acker, client, eventloop).await
}

fn mqtt_options(config: &BridgeConfig) -> MqttOptions {
    let mqtt = &config.mqtt;
    let mut options = MqttOptions::new(&mqtt.client_id, &mqtt.host, mqtt.port);
    options
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_keep_alive(Duration::from_secs(mqtt.keep_alive_secs))
        .set_max_packet_size(config.max_payload_bytes + 64 * 1024, 64 * 1024);
    if let Some(username) = &mqtt.username {
        options.set_credentials(username, mqtt.password.as_deref().unwrap_or_default());
    }
    options
}

/// Hands the record to librdkafka and returns the future of its delivery report. Waits while
/// librdkafka's queue is full, which stalls MQTT reading: that is the backpressure.
async fn produce(
    producer: &FutureProducer,
    config: &BridgeConfig,
    publish: &Publish,
) -> Result<DeliveryFuture, KafkaError> {
    let outgoing = forward::route(publish, config.max_payload_bytes);
    let topic = match outgoing.topic {
        Destination::Telemetry => &config.kafka.topic,
        Destination::DeadLetters => {
            metrics::counter!(DEAD_LETTERS, "reason" => outgoing.reason.map_or("", |r| r.code()))
                .increment(1);
            &config.kafka.dlq_topic
        }
    };
    let mut record = FutureRecord::to(topic)
        .key(&outgoing.key)
        .payload(&publish.payload[..])
        .headers(outgoing.headers);
    loop {
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((error, _)) => return Err(error),
        }
    }
}

/// Acknowledges messages in arrival order, each after Kafka confirmed it.
async fn acknowledge_in_order(
    mut acks: mpsc::Receiver<InFlight>,
    client: AsyncClient,
    shutdown: Shutdown,
) -> Result<(), BridgeError> {
    while let Some(InFlight { publish, delivery }) = acks.recv().await {
        match delivery.await {
            Ok(Ok(_)) => {
                metrics::counter!(MESSAGES_FORWARDED).increment(1);
                if publish.qos != QoS::AtMostOnce {
                    // Fails only when the event loop is gone; the broker then redelivers.
                    let _ = client.ack(&publish).await;
                }
            }
            Ok(Err((error, _))) => {
                tracing::error!(%error, topic = %publish.topic, "kafka refused a record; stopping without acknowledging it");
                shutdown.trigger();
                return Err(BridgeError::Delivery(error));
            }
            Err(_canceled) => return Ok(()),
        }
    }
    Ok(())
}

/// Lets the acknowledger finish what Kafka confirms, keeps the event loop turning so the
/// acknowledgements reach the broker, then disconnects cleanly.
async fn drain_and_disconnect(
    in_flight: mpsc::Sender<InFlight>,
    acker: tokio::task::JoinHandle<Result<(), BridgeError>>,
    client: AsyncClient,
    mut eventloop: EventLoop,
) -> Result<(), BridgeError> {
    drop(in_flight);
    let acked = async {
        let mut acker = acker;
        loop {
            tokio::select! {
                result = &mut acker => return result.unwrap_or(Ok(())),
                // Publishes arriving now are left unacknowledged; the broker keeps them.
                _ = eventloop.poll() => {}
            }
        }
    };
    let result = match tokio::time::timeout(Duration::from_secs(30), acked).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!("kafka did not confirm the messages in flight within 30 s; the broker will deliver them again");
            Ok(())
        }
    };
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    tracing::info!("bridge stopped");
    result
}
