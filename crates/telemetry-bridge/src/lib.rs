//! The native bridge: MQTT -> Kafka with at-least-once delivery end to end.
//!
//! Guarantee: an MQTT message is acknowledged (PUBACK) to the broker only after Kafka has
//! confirmed its record (`acks=all`, idempotent producer), on the connection it arrived on. The
//! MQTT 5 session is persistent (Clean Start off, a Session Expiry Interval, a stable client
//! id), so whatever the bridge had not acknowledged when it crashed or lost the broker is
//! delivered again by the broker. A message can therefore reach Kafka twice, never zero times;
//! the worker's exactly-once store absorbs the duplicates only when they share an offset, so a
//! device's `seq` lets readers spot the rest.
//!
//! - [`config`]: settings and their checks.
//! - [`route`]: MQTT topic filters -> Kafka topic and key.
//! - [`schema`]: JSON Schema checks for routes that name a schema.
//! - [`forward`]: one MQTT message -> Kafka record or dead letter.
//! - [`mqtt`]: the MQTT 5 session options (credentials, TLS, flow control).
//! - [`metrics`]: every metric's name.
//!
//! Acknowledgements go out in the order the messages came (as MQTT requires for QoS 1) from a
//! task of their own, so the MQTT event loop is never blocked waiting for Kafka. Backpressure is
//! the MQTT 5 Receive Maximum: the broker sends at most `max_in_flight` messages the bridge has
//! not acknowledged, so when Kafka stalls the broker holds the rest and the bridge's memory
//! stays bounded; when Kafka returns, the acknowledgements resume the flow by themselves.

pub mod config;
pub mod forward;
pub mod metrics;
pub mod mqtt;
pub mod route;
pub mod schema;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use telemetry_core::backoff::Backoff;
use telemetry_core::observe::{self, Health};
use telemetry_core::Shutdown;
use tokio::sync::mpsc;

pub use config::BridgeConfig;
use route::Router;

/// How long Kafka may leave the oldest record unconfirmed before the bridge reports itself not
/// ready: longer than a leader election, short enough for an orchestrator to notice an outage.
const KAFKA_STALL: Duration = Duration::from_secs(10);

/// How long shutdown waits for Kafka to confirm the messages in flight; what is still
/// unconfirmed then is left unacknowledged and the broker delivers it again.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(transparent)]
    Observe(#[from] observe::ObserveError),
    #[error("invalid routes: {0}")]
    Route(#[from] route::RouteError),
    #[error("cannot set up the MQTT session: {0}")]
    Mqtt(#[from] mqtt::MqttSetupError),
    #[error("cannot create the Kafka producer: {0}")]
    Producer(KafkaError),
    #[error("kafka refused a record for topic '{topic}' for good ({error}); check that the topic exists and the bridge may write to it. The message was not acknowledged and the broker will deliver it again after restart")]
    Delivery { topic: String, error: KafkaError },
}

/// A message on its way: acknowledged to MQTT once `delivery` resolves.
struct InFlight {
    publish: Publish,
    delivery: DeliveryFuture,
    /// The MQTT connection it arrived on; see [`Connections`].
    connection: u64,
    received: Instant,
}

/// Counts MQTT connections. A packet id is only meaningful on the connection that used it: after
/// a reconnect the broker sends the unacknowledged messages again and may give a freed id to a
/// new message, so an acknowledgement for a message of an earlier connection is skipped (the
/// message's second delivery is acknowledged instead) rather than risk acknowledging another.
#[derive(Debug, Clone, Default)]
struct Connections(Arc<AtomicU64>);

impl Connections {
    fn current(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    fn ended(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// Runs the bridge until shutdown, then acknowledges what Kafka confirmed and disconnects.
pub async fn run(config: BridgeConfig, shutdown: Shutdown) -> Result<(), BridgeError> {
    let router = Arc::new(Router::new(&config.routes, &config.kafka)?);
    let options = mqtt::options(&config)?;
    let health = Health::new();
    health.set("mqtt", false);
    health.set("kafka", true);
    observe::serve_http(config.http.listen, health.clone(), shutdown.clone()).await?;
    let producer: FutureProducer = config
        .kafka
        .durable_producer_config()
        .create()
        .map_err(BridgeError::Producer)?;
    // Every acknowledgement goes through the client's request queue, which only drains while
    // the event loop is polled. A session cannot have more unacknowledged messages than there
    // are packet ids, so a queue with room for all of them (plus subscriptions) never fills,
    // and the acknowledger can never wait on an event loop that waits on it. The queue grows
    // only as far as it is used.
    let (client, mut eventloop) = AsyncClient::new(options, u16::MAX as usize + 64);
    let (in_flight, acks) = mpsc::channel::<InFlight>(2 * config.max_in_flight);
    let connections = Connections::default();
    let acker = tokio::spawn(acknowledge_in_order(
        acks,
        client.clone(),
        connections.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    tracing::info!(
        host = %config.mqtt.host,
        port = config.mqtt.port,
        client_id = %config.mqtt.client_id,
        tls = config.mqtt.tls.is_some(),
        routes = config.routes.len(),
        "bridge starting"
    );

    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut result = Ok(());
    // One shutdown future for the whole loop, rather than one per event.
    let stop = shutdown.wait();
    tokio::pin!(stop);
    // Subscriptions of the current connection not yet confirmed by a SUBACK.
    let mut unsubscribed = usize::MAX;
    while !shutdown.is_triggered() {
        let event = tokio::select! {
            biased;
            _ = &mut stop => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff.reset();
                unsubscribed = config.mqtt.subscriptions.len();
                tracing::info!(
                    session_present = ack.session_present,
                    "connected to the MQTT broker"
                );
                // Subscribing again on every connect is harmless and covers a broker that lost
                // the session. From a task of its own: the request queue drains only while
                // this loop polls.
                let subscriber = client.clone();
                let filters = config.mqtt.subscription_filters();
                tokio::spawn(async move {
                    for filter in filters {
                        if let Err(error) = subscriber.subscribe(&filter, QoS::AtLeastOnce).await {
                            tracing::error!(%error, %filter, "cannot subscribe");
                        }
                    }
                });
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                metrics::received();
                let delivery = match produce(&producer, &router, &config, &publish).await {
                    Ok(delivery) => delivery,
                    Err(error) => {
                        result = Err(error);
                        break;
                    }
                };
                let message = InFlight {
                    publish,
                    delivery,
                    connection: connections.current(),
                    received: Instant::now(),
                };
                // Blocks only when the broker sent more than its Receive Maximum allows (seen
                // with Mosquitto 2.0.11 after a long Kafka stall): then the bridge stops reading
                // the socket until Kafka confirms, and TCP holds the broker back.
                if in_flight.send(message).await.is_err() {
                    break;
                }
            }
            Ok(Event::Incoming(Packet::SubAck(suback))) => {
                let refused: Vec<_> = suback
                    .return_codes
                    .iter()
                    .filter(|code| !matches!(code, SubscribeReasonCode::Success(_)))
                    .collect();
                if refused.is_empty() {
                    unsubscribed = unsubscribed.saturating_sub(suback.return_codes.len());
                    // Ready only once every subscription holds: before that, messages would
                    // reach no one.
                    if unsubscribed == 0 {
                        health.set("mqtt", true);
                    }
                } else {
                    tracing::error!(?refused, "the MQTT broker refused a subscription; check the filters, the shared group and the broker's ACL");
                }
            }
            Ok(Event::Incoming(Packet::Disconnect(disconnect))) => {
                tracing::warn!(reason = ?disconnect.reason_code, "the MQTT broker closed the session");
            }
            Ok(_) => {}
            Err(error) => {
                connections.ended();
                health.set("mqtt", false);
                metrics::reconnect();
                let delay = backoff.next_delay();
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "MQTT connection lost; reconnecting");
                tokio::select! {
                    _ = shutdown.wait() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    let drained = drain_and_disconnect(in_flight, acker, client, eventloop).await;
    result.and(drained)
}

/// Hands the record to librdkafka and returns the future of its delivery report. Waits while
/// librdkafka's queue is full, which stalls MQTT reading: backpressure of last resort, as the
/// Receive Maximum normally keeps the queue far from full.
async fn produce(
    producer: &FutureProducer,
    router: &Router,
    config: &BridgeConfig,
    publish: &Publish,
) -> Result<DeliveryFuture, BridgeError> {
    let outgoing = forward::route(
        publish,
        router,
        config.max_payload_bytes,
        &config.kafka.dlq_topic,
    );
    if let Some(reason) = outgoing.reason {
        metrics::dead_letter(reason);
    }
    let mut record = FutureRecord::to(outgoing.topic)
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
            Err((error, _)) => {
                return Err(BridgeError::Delivery {
                    topic: outgoing.topic.to_owned(),
                    error,
                })
            }
        }
    }
}

/// Acknowledges messages in arrival order, each after Kafka confirmed it.
async fn acknowledge_in_order(
    mut acks: mpsc::Receiver<InFlight>,
    client: AsyncClient,
    connections: Connections,
    health: Health,
    shutdown: Shutdown,
) -> Result<(), BridgeError> {
    let mut kafka_ready = true;
    while let Some(message) = acks.recv().await {
        metrics::in_flight(acks.len() + 1);
        let mut delivery = message.delivery;
        // Most reports are in by now: take them without arming a timer.
        let ready = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::pin::Pin::new(&mut delivery).poll(cx))
        })
        .await;
        let report = match ready {
            std::task::Poll::Ready(report) => report,
            std::task::Poll::Pending => loop {
                match tokio::time::timeout(KAFKA_STALL, &mut delivery).await {
                    Ok(report) => break report,
                    Err(_) if kafka_ready => {
                        kafka_ready = false;
                        health.set("kafka", false);
                        tracing::warn!(
                            waited_s = KAFKA_STALL.as_secs(),
                            "kafka has not confirmed a record; holding further MQTT messages at the broker"
                        );
                    }
                    Err(_) => {}
                }
            },
        };
        match report {
            Ok(Ok(_)) => {
                if !kafka_ready {
                    kafka_ready = true;
                    health.set("kafka", true);
                    tracing::info!("kafka confirms records again");
                }
                metrics::delivered(message.received.elapsed());
                if message.publish.qos == QoS::AtMostOnce {
                    continue;
                }
                if message.connection != connections.current() {
                    metrics::stale_ack_skipped();
                    continue;
                }
                // Fails only when the event loop is gone; the broker then delivers it again.
                let _ = client.ack(&message.publish).await;
            }
            Ok(Err((error, record))) => {
                let topic = rdkafka::Message::topic(&record).to_owned();
                tracing::error!(%error, %topic, "kafka refused a record; stopping without acknowledging it");
                shutdown.trigger();
                return Err(BridgeError::Delivery { topic, error });
            }
            // The producer is gone, which only happens on the way out.
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
                polled = eventloop.poll() => {
                    if polled.is_err() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    };
    let result = match tokio::time::timeout(DRAIN_TIMEOUT, acked).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                waited_s = DRAIN_TIMEOUT.as_secs(),
                "kafka did not confirm the messages in flight; the broker will deliver them again"
            );
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
