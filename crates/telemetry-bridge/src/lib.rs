//! The native bridge: MQTT -> Kafka with at-least-once delivery end to end.
//!
//! Guarantee: an MQTT message is acknowledged (PUBACK) to the broker only after Kafka has
//! confirmed its record (`acks=all`, idempotent producer), on the connection it arrived on. The
//! MQTT 5 session is persistent (Clean Start off, a Session Expiry Interval, a stable client
//! id), so whatever the bridge had not acknowledged when it crashed or lost the broker is
//! delivered again by the broker. A message can therefore reach Kafka twice, never zero times;
//! the worker stores a reading that carries `seq` once however often it reaches Kafka (see
//! `telemetry_worker::sink`), and readings without `seq` stay at-least-once.
//!
//! - [`config`]: settings and their checks.
//! - [`route`]: MQTT topic filters -> Kafka topic and key.
//! - [`schema`]: JSON Schema checks for routes that name a schema.
//! - [`forward`]: one MQTT message -> Kafka record or dead letter.
//! - [`mqtt`]: the MQTT 5 session options (credentials, TLS, flow control).
//! - [`session`]: the task that polls the MQTT event loop and nothing else.
//! - [`metrics`]: every metric's name.
//!
//! Three tasks, none of which waits on another without a bound:
//! 1. the session driver ([`session`]) polls rumqttc's event loop all the time, on a thread of
//!    its own, so keep-alive, acknowledgements and subscriptions go on whatever Kafka does and
//!    however busy the forwarder is;
//! 2. the forwarder (this module's [`run`]) hands each message to librdkafka and queues it for
//!    the acknowledger;
//! 3. the acknowledger sends PUBACKs in arrival order (as MQTT requires for QoS 1), each after
//!    Kafka confirmed its record.
//!
//! Backpressure is the MQTT 5 Receive Maximum: the broker sends at most `max_in_flight` messages
//! the bridge has not acknowledged, so when Kafka is slow the broker holds the rest and the
//! bridge's memory stays bounded; when Kafka returns, the acknowledgements resume the flow by
//! themselves. A broker that sends more than that (Mosquitto 2.0.11 with a backlog) is not
//! refused: the bridge holds what it sends, in order, counts it in
//! `telemetry_bridge_held_messages`, and paces its acknowledgements so the broker sends less
//! (see `acknowledge_in_order`); only the forwarder falls behind, never the session.
//!
//! The one exception to "acknowledged only after Kafka confirmed": a record Kafka refuses for
//! good (larger than the topic's `max.message.bytes`, an invalid record, no right to write to
//! the topic; see `telemetry_core::kafka::is_permanent_produce_error`) goes to the dead-letter
//! topic with reason `rejected_by_kafka` instead, without its payload if the dead-letter topic
//! refuses it whole; and if that is refused too, it is logged, counted in
//! `telemetry_bridge_dropped_total` and acknowledged. Holding it would stop every message behind
//! it (QoS 1 acknowledgements go in order), and stopping the bridge would only have the broker
//! deliver it again after the restart, in a loop.
//!
//! Nothing may wedge unseen: a watchdog fails `/healthz` when messages are held but none has been
//! settled for `stall_timeout_secs`, so an orchestrator restarts the bridge, and shutdown is
//! bounded by the drain timeout whatever Kafka or the broker do.

pub mod config;
pub mod forward;
pub mod metrics;
pub mod mqtt;
pub mod route;
pub mod schema;
pub mod session;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, RetainForwardRule, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::AsyncClient;
use telemetry_core::kafka::{is_permanent_produce_error, permanent_error_fix};
use telemetry_core::observe::{self, Health};
use telemetry_core::Shutdown;
use tokio::sync::mpsc;

pub use config::BridgeConfig;
use metrics::BROKER_STATS;
use route::Router;
use session::{Connections, SessionEvent};

/// How long Kafka may leave the oldest record unconfirmed before the bridge reports itself not
/// ready: longer than a leader election, short enough for an orchestrator to notice an outage.
const KAFKA_STALL: Duration = Duration::from_secs(10);

/// How long shutdown waits for Kafka to confirm the messages in flight; what is still
/// unconfirmed then is left unacknowledged and the broker delivers it again. With the final
/// DISCONNECT (2 s) it stays inside the deployments' grace periods (compose 40 s, Kubernetes 45 s).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// While the broker overshoots the Receive Maximum, the gap between two rounds of
/// acknowledgements, long enough for the broker's answer to one round to arrive before the next
/// (see `acknowledge_in_order`): several broker round trips on one network.
const ACK_PACE: Duration = Duration::from_millis(5);

/// How long an acknowledgement may wait for room in the client's request queue before the
/// bridge gives it up (the broker then delivers the message again): far longer than the
/// session driver needs to drain it, unless the driver is gone.
const ACK_QUEUE_TIMEOUT: Duration = Duration::from_secs(10);

/// Room in the client's request queue: every packet id (plus subscriptions). Every
/// acknowledgement goes through it and the session driver drains it all the time, but one request
/// per turn of its loop, so under a flood of messages the acknowledger can still wait for room
/// (bounded by ACK_QUEUE_TIMEOUT). The queue grows only as far as it is used.
const REQUEST_QUEUE: usize = u16::MAX as usize + 64;

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
    #[error("cannot start the MQTT session's thread: {0}")]
    SessionThread(std::io::Error),
    #[error("kafka refused a record for topic '{topic}' for good ({error}); check that the topic exists and the bridge may write to it. The message was not acknowledged and the broker will deliver it again after restart")]
    Delivery { topic: String, error: KafkaError },
}

/// A message on its way: acknowledged to MQTT once `delivery` resolves.
struct InFlight {
    publish: Publish,
    delivery: Delivery,
    /// The MQTT connection it arrived on; see [`Connections`].
    connection: u64,
    received: Instant,
}

/// A message's record: handed to librdkafka, or refused by it at once for good.
enum Delivery {
    Sent(DeliveryFuture),
    Refused { topic: String, error: KafkaError },
}

/// Where a message Kafka refuses for good goes instead: see the module's documentation.
#[derive(Clone)]
struct Rescue {
    producer: FutureProducer,
    dlq_topic: String,
}

impl Rescue {
    /// Sends the dead letter of a message Kafka refused for good on `refused_topic`, without
    /// its payload if the dead-letter topic refuses it whole. False when it could not be sent.
    async fn send(&self, publish: &Publish, refused_topic: &str, error: &KafkaError) -> bool {
        let mqtt_topic = String::from_utf8_lossy(&publish.topic).into_owned();
        let reason = error.to_string();
        if refused_topic == self.dlq_topic {
            // The refused record was a dead letter already: no second letter for it.
            self.give_up(&mqtt_topic, refused_topic, error);
            return false;
        }
        let whole = forward::refused_by_kafka_headers(publish, refused_topic, &reason, None);
        let refusal = match self
            .produce(&mqtt_topic, whole, Some(&publish.payload))
            .await
        {
            Ok(()) => return self.sent(),
            Err(refusal) if is_permanent_produce_error(&refusal) => refusal,
            Err(other) => {
                self.give_up(&mqtt_topic, &self.dlq_topic, &other);
                return false;
            }
        };
        let note = format!(
            "payload of {} bytes dropped: '{}' refused the whole letter ({refusal}); {}",
            publish.payload.len(),
            self.dlq_topic,
            permanent_error_fix(&refusal, &self.dlq_topic)
        );
        let bare = forward::refused_by_kafka_headers(publish, refused_topic, &reason, Some(&note));
        match self.produce(&mqtt_topic, bare, None).await {
            Ok(()) => self.sent(),
            Err(refusal) => {
                self.give_up(&mqtt_topic, &self.dlq_topic, &refusal);
                false
            }
        }
    }

    fn sent(&self) -> bool {
        metrics::dead_letter(telemetry_core::contract::DeadLetterReason::RejectedByKafka);
        true
    }

    async fn produce(
        &self,
        key: &str,
        headers: rdkafka::message::OwnedHeaders,
        payload: Option<&[u8]>,
    ) -> Result<(), KafkaError> {
        let mut record = FutureRecord::<str, [u8]>::to(&self.dlq_topic)
            .key(key)
            .headers(headers);
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        self.producer
            .send(record, Timeout::Never)
            .await
            .map(|_| ())
            .map_err(|(error, _)| error)
    }

    fn give_up(&self, mqtt_topic: &str, topic: &str, error: &KafkaError) {
        metrics::dropped();
        tracing::error!(%error, %mqtt_topic, %topic, fix = %permanent_error_fix(error, topic),
            "kafka refused a message and its dead letter for good; acknowledging it so that the messages behind it flow (counted in telemetry_bridge_dropped_total)");
    }
}

/// Where the messages the broker sent stand. Each is received (by the session driver), then
/// confirmed by Kafka, then settled: acknowledged to the broker, or left for it to deliver again
/// (its connection is gone). `received - confirmed` messages are in the pipeline and hold their
/// payload; `confirmed - settled` are acknowledgements owed, a packet id each.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    started: Instant,
    received: Arc<AtomicU64>,
    confirmed: Arc<AtomicU64>,
    settled: Arc<AtomicU64>,
    /// Milliseconds after `started` of the last confirmation or settlement.
    last_progress_ms: Arc<AtomicU64>,
}

impl Progress {
    fn new() -> Self {
        Progress {
            started: Instant::now(),
            received: Arc::default(),
            confirmed: Arc::default(),
            settled: Arc::default(),
            last_progress_ms: Arc::default(),
        }
    }

    pub(crate) fn received(&self) {
        if self.held() == 0 {
            // Idle until now: the stall clock starts with this message, not at the last one.
            self.touch();
        }
        self.received.fetch_add(1, Ordering::AcqRel);
        metrics::held(self.in_pipeline());
    }

    fn confirmed(&self) {
        self.confirmed.fetch_add(1, Ordering::AcqRel);
        self.touch();
        metrics::held(self.in_pipeline());
    }

    fn settled(&self) {
        self.settled.fetch_add(1, Ordering::AcqRel);
        self.touch();
    }

    /// Messages received so far, to tell whether any arrived since.
    fn received_so_far(&self) -> u64 {
        self.received.load(Ordering::Acquire)
    }

    fn touch(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_progress_ms.store(now, Ordering::Release);
    }

    /// Messages received and not yet confirmed by Kafka.
    fn in_pipeline(&self) -> u64 {
        let confirmed = self.confirmed.load(Ordering::Acquire);
        self.received
            .load(Ordering::Acquire)
            .saturating_sub(confirmed)
    }

    /// Messages received and not yet settled.
    fn held(&self) -> u64 {
        let settled = self.settled.load(Ordering::Acquire);
        self.received
            .load(Ordering::Acquire)
            .saturating_sub(settled)
    }

    /// How long messages have been held with no progress; zero when none are held.
    fn stalled_for(&self) -> Duration {
        if self.held() == 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_progress_ms.load(Ordering::Acquire));
        self.started.elapsed().saturating_sub(last)
    }
}

/// Runs the bridge until shutdown, then acknowledges what Kafka confirmed and disconnects.
pub async fn run(config: BridgeConfig, shutdown: Shutdown) -> Result<(), BridgeError> {
    let router = Arc::new(Router::new(&config.routes, &config.kafka)?);
    let options = mqtt::options(&config)?;
    let health = Health::new();
    health.set("mqtt", false);
    health.set("kafka", true);
    health.set_live("progress", true);
    observe::serve_http(config.http.listen, health.clone(), shutdown.clone()).await?;
    let producer: FutureProducer = config
        .kafka
        .durable_producer_config()
        .create()
        .map_err(BridgeError::Producer)?;
    let (client, eventloop) = AsyncClient::new(options, REQUEST_QUEUE);
    let connections = Connections::default();
    let progress = Progress::new();
    // The driver outlives `shutdown`: it must keep turning while the drain acknowledges.
    let stop_session = Shutdown::new();
    let (session_events, mut events) = mpsc::unbounded_channel();
    let driver = session::spawn(
        eventloop,
        client.clone(),
        session_events,
        connections.clone(),
        progress.clone(),
        stop_session.clone(),
    )
    .map_err(BridgeError::SessionThread)?;
    let (in_flight, acks) = mpsc::channel::<InFlight>(2 * config.max_in_flight);
    let rescue = Rescue {
        producer: producer.clone(),
        dlq_topic: config.kafka.dlq_topic.clone(),
    };
    let acker = tokio::spawn(acknowledge_in_order(
        acks,
        rescue,
        client.clone(),
        config.max_in_flight as u64,
        connections.clone(),
        progress.clone(),
        health.clone(),
        shutdown.clone(),
    ));
    let watchdog = tokio::spawn(watch_progress(
        progress.clone(),
        Duration::from_secs(config.stall_timeout_secs),
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

    let mut result = Ok(());
    loop {
        let event = tokio::select! {
            biased;
            _ = shutdown.wait() => break,
            event = events.recv() => event,
        };
        let Some(event) = event else { break };
        let (connection, packet) = match event {
            SessionEvent::Packet { connection, packet } => (connection, packet),
            SessionEvent::Lost { error, retry_in } => {
                health.set("mqtt", false);
                metrics::reconnect();
                tracing::warn!(%error, retry_in_ms = retry_in.as_millis() as u64, "MQTT connection lost; reconnecting");
                continue;
            }
        };
        match packet {
            Packet::ConnAck(ack) => {
                tracing::info!(
                    session_present = ack.session_present,
                    "connected to the MQTT broker"
                );
                // Subscribing again on every connect is harmless and covers a broker that lost
                // the session.
                if let Err(error) = client.subscribe_many(subscriptions(&config)).await {
                    tracing::error!(%error, "cannot subscribe");
                }
            }
            Packet::Publish(publish) => {
                let produced = tokio::select! {
                    biased;
                    _ = shutdown.wait() => break,
                    produced = produce(&producer, &router, &config, &publish) => produced,
                };
                let delivery = match produced {
                    Ok(delivery) => delivery,
                    Err(error) => {
                        result = Err(error);
                        break;
                    }
                };
                let message = InFlight {
                    publish,
                    delivery,
                    connection,
                    received: Instant::now(),
                };
                // Waits only while the acknowledger is two windows behind (Kafka slower than
                // the broker): the session driver keeps the MQTT session alive meanwhile.
                let queued = tokio::select! {
                    biased;
                    _ = shutdown.wait() => break,
                    queued = in_flight.send(message) => queued,
                };
                if queued.is_err() {
                    break;
                }
            }
            Packet::SubAck(suback) => {
                // One SUBSCRIBE, one SUBACK: the telemetry filters' codes come first.
                let (telemetry, stats) = suback.return_codes.split_at(
                    config
                        .mqtt
                        .subscriptions
                        .len()
                        .min(suback.return_codes.len()),
                );
                let refused = |codes: &[SubscribeReasonCode]| -> Vec<SubscribeReasonCode> {
                    codes
                        .iter()
                        .filter(|code| !matches!(code, SubscribeReasonCode::Success(_)))
                        .copied()
                        .collect()
                };
                let telemetry_refused = refused(telemetry);
                if telemetry_refused.is_empty() {
                    // Ready only once every subscription holds: before that, messages would
                    // reach no one.
                    health.set("mqtt", true);
                } else {
                    tracing::error!(refused = ?telemetry_refused, "the MQTT broker refused a subscription; check the filters, the shared group and the broker's ACL");
                }
                let stats_refused = refused(stats);
                if !stats_refused.is_empty() {
                    tracing::warn!(refused = ?stats_refused, "the MQTT broker refused its $SYS counters (mqtt.broker_stats); allow the bridge to read them, or turn the setting off");
                }
            }
            Packet::Disconnect(disconnect) => {
                tracing::warn!(reason = ?disconnect.reason_code, "the MQTT broker closed the session");
            }
            _ => {}
        }
    }
    // Messages the forwarder did not take stay unacknowledged: the broker keeps them.
    drop(events);
    watchdog.abort();
    let drained = drain(in_flight, acker).await;
    stop_session.trigger();
    // The driver sends DISCONNECT and exits within its own 2 s bound.
    let _ = tokio::task::spawn_blocking(move || driver.join()).await;
    tracing::info!("bridge stopped");
    result.and(drained)
}

/// The subscriptions, with Retain Handling 2 (send no retained message on subscribe), then the
/// broker's counters when `mqtt.broker_stats` is on. The session is persistent, so every message
/// published while the bridge was away is queued for it anyway; a retained copy sent on each
/// reconnect would be ingested again every time.
fn subscriptions(config: &BridgeConfig) -> Vec<Filter> {
    let telemetry = config.mqtt.subscription_filters().into_iter().map(|path| {
        let mut filter = Filter::new(path, QoS::AtLeastOnce);
        filter.retain_forward_rule = RetainForwardRule::Never;
        filter
    });
    // The counters are retained: the current value arrives at once.
    let stats = BROKER_STATS
        .iter()
        .filter(|_| config.mqtt.broker_stats)
        .map(|(topic, _)| Filter::new(*topic, QoS::AtMostOnce));
    telemetry.chain(stats).collect()
}

/// Hands the record to librdkafka and returns the future of its delivery report, or the
/// refusal when librdkafka refuses it for good at once (larger than `message.max.bytes`): the
/// acknowledger dead-letters it in its turn. Waits while librdkafka's queue is full: the
/// forwarder falls behind, the MQTT session does not.
async fn produce(
    producer: &FutureProducer,
    router: &Router,
    config: &BridgeConfig,
    publish: &Publish,
) -> Result<Delivery, BridgeError> {
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
            Ok(delivery) => return Ok(Delivery::Sent(delivery)),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                record = returned;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((error, _)) if is_permanent_produce_error(&error) => {
                return Ok(Delivery::Refused {
                    topic: outgoing.topic.to_owned(),
                    error,
                })
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

/// How many of the acknowledgements owed may go now (see `acknowledge_in_order`).
#[derive(Debug)]
struct Pacer {
    window: u64,
    /// Whether the broker overshoots: the rounds are paced.
    pacing: bool,
    /// When the last paced round went out, how many acknowledgements it had, and how many
    /// messages had arrived by then: the broker's answer is what arrives after it.
    last_round: Instant,
    last_round_acks: u64,
    received_at_last_round: u64,
}

impl Pacer {
    fn new(window: u64) -> Self {
        Pacer {
            window,
            pacing: false,
            last_round: Instant::now(),
            last_round_acks: 0,
            received_at_last_round: 0,
        }
    }

    fn budget(&mut self, progress: &Progress, owed: usize) -> usize {
        let owed = owed as u64;
        let pipeline = progress.in_pipeline();
        if owed == 0 || pipeline >= self.window {
            return 0;
        }
        let room = self.window - pipeline;
        // A broker that keeps to the window never has more than it unacknowledged.
        if progress.held() <= self.window {
            self.pacing = false;
            return owed.min(room) as usize;
        }
        if self.pacing && self.last_round.elapsed() < ACK_PACE {
            return 0;
        }
        // What one acknowledgement of the last round brought; a full window until measured.
        let answered = progress.received_so_far() - self.received_at_last_round;
        let per_ack = match (self.pacing, self.last_round_acks) {
            (true, acks) if acks > 0 => (answered / acks).max(1),
            _ => self.window,
        };
        self.pacing = true;
        owed.min((room / per_ack).max(1)) as usize
    }

    fn sent(&mut self, progress: &Progress, acks: usize) {
        if self.pacing && acks > 0 {
            self.last_round = Instant::now();
            self.last_round_acks = acks as u64;
            self.received_at_last_round = progress.received_so_far();
        }
    }
}

/// An acknowledgement owed to the broker: the packet id, not the payload.
#[derive(Debug)]
struct Owed {
    pkid: u16,
    qos: QoS,
    connection: u64,
}

/// Acknowledges messages in arrival order, each after Kafka confirmed it, and only while fewer
/// than `window` messages are unconfirmed.
///
/// The second rule is what bounds the bridge's memory on a broker that overshoots the Receive
/// Maximum. Mosquitto 2.0.11, on each in-order PUBACK, moves up to Receive Maximum - 1 queued
/// messages into flight and sends them (`db__message_delete_outgoing`, eclipse-mosquitto/
/// mosquitto#2301), so with a backlog at the broker every acknowledgement brings a window more.
/// So the acknowledgements are paced ([`Pacer`]): none while `window` messages are unconfirmed by
/// Kafka; and once the broker has shown that it overshoots (more than `window` unacknowledged),
/// in rounds [`ACK_PACE`] apart, each as many as the room left in the window divided by what one
/// acknowledgement of the previous round brought (at least one). While the broker has a backlog
/// that is one acknowledgement a round and the pipeline stays near two windows; when it has
/// none, an acknowledgement brings next to nothing and the rounds grow until nothing is owed.
/// The messages waiting for Kafka hold their payload; the acknowledgements owed meanwhile cost a
/// packet id each here (measured in docs/performance.md, "Overload"), and at the broker the
/// messages it keeps until they come: a reconnect then has the broker deliver them again, copies
/// the worker drops. On a broker that keeps to the Receive Maximum none is ever held back.
#[allow(clippy::too_many_arguments)] // the task's whole context, passed once at start-up
async fn acknowledge_in_order(
    mut acks: mpsc::Receiver<InFlight>,
    rescue: Rescue,
    client: AsyncClient,
    window: u64,
    connections: Connections,
    progress: Progress,
    health: Health,
    shutdown: Shutdown,
) -> Result<(), BridgeError> {
    let mut kafka_ready = true;
    let mut owed: std::collections::VecDeque<Owed> = std::collections::VecDeque::new();
    let mut pacer = Pacer::new(window);
    loop {
        let budget = pacer.budget(&progress, owed.len());
        let mut sent = 0;
        while sent < budget {
            let Some(ack) = owed.pop_front() else { break };
            settle(&client, &connections, &progress, ack).await;
            sent += 1;
        }
        pacer.sent(&progress, sent);
        metrics::acks_owed(owed.len());
        let next = if owed.is_empty() {
            acks.recv().await
        } else {
            match tokio::time::timeout(ACK_PACE, acks.recv()).await {
                Ok(next) => next,
                Err(_) => continue,
            }
        };
        let Some(message) = next else {
            break;
        };
        metrics::in_flight(acks.len() + 1);
        let report = match message.delivery {
            Delivery::Sent(delivery) => await_report(delivery, &mut kafka_ready, &health).await,
            Delivery::Refused { topic, error } => Some(Err((topic, error))),
        };
        match report {
            Some(Ok(())) => {
                if !kafka_ready {
                    kafka_ready = true;
                    health.set("kafka", true);
                    tracing::info!("kafka confirms records again");
                }
                metrics::delivered(message.received.elapsed());
            }
            Some(Err((topic, error))) if is_permanent_produce_error(&error) => {
                tracing::warn!(%error, %topic, "kafka refused a record for good; sending it to the dead-letter topic");
                rescue.send(&message.publish, &topic, &error).await;
            }
            Some(Err((topic, error))) => {
                tracing::error!(%error, %topic, "kafka refused a record; stopping without acknowledging it");
                shutdown.trigger();
                flush_owed(&client, &connections, &progress, owed).await;
                return Err(BridgeError::Delivery { topic, error });
            }
            // The producer is gone, which only happens on the way out.
            None => break,
        }
        progress.confirmed();
        owed.push_back(Owed {
            pkid: message.publish.pkid,
            qos: message.publish.qos,
            connection: message.connection,
        });
    }
    // On the way out every confirmed message is acknowledged: nothing more will arrive to be
    // paced, and an acknowledgement left unsent only makes a duplicate.
    flush_owed(&client, &connections, &progress, owed).await;
    Ok(())
}

/// Waits for a record's delivery report; past [`KAFKA_STALL`], reports Kafka not ready. The
/// error comes with the record's topic; None when the producer is gone.
async fn await_report(
    mut delivery: DeliveryFuture,
    kafka_ready: &mut bool,
    health: &Health,
) -> Option<Result<(), (String, KafkaError)>> {
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
                Err(_) if *kafka_ready => {
                    *kafka_ready = false;
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
    let result = report.ok()?;
    Some(
        result
            .map(|_| ())
            .map_err(|(error, record)| (rdkafka::Message::topic(&record).to_owned(), error)),
    )
}

async fn flush_owed(
    client: &AsyncClient,
    connections: &Connections,
    progress: &Progress,
    owed: std::collections::VecDeque<Owed>,
) {
    for ack in owed {
        settle(client, connections, progress, ack).await;
    }
}

/// Sends the acknowledgement, or skips it when its connection is gone (the broker delivers the
/// message again on the new one).
async fn settle(client: &AsyncClient, connections: &Connections, progress: &Progress, ack: Owed) {
    progress.settled();
    if ack.qos == QoS::AtMostOnce {
        return;
    }
    if ack.connection != connections.current() {
        metrics::stale_ack_skipped();
        return;
    }
    // rumqttc reads only the packet id and QoS of the message it acknowledges.
    let mut publish = Publish::new("", ack.qos, Vec::new(), None);
    publish.pkid = ack.pkid;
    // rumqttc sends one request per turn of its event loop, and a turn that reads the network
    // takes in up to ten packets, so under a flood of messages acknowledgements queue up here:
    // wait for room rather than drop one. The session driver drains the queue on its own thread,
    // so the wait ends unless the driver is gone; then the broker delivers the message again.
    match tokio::time::timeout(ACK_QUEUE_TIMEOUT, client.ack(&publish)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) | Err(_) => tracing::warn!(
            "cannot queue an MQTT acknowledgement; the broker will deliver the message again"
        ),
    }
}

/// Fails liveness while messages are held and none has been settled for `limit`: whatever the
/// cause (a wedged task, a Kafka client that stopped answering), a restart hands the held
/// messages back to the broker, which delivers them again.
async fn watch_progress(progress: Progress, limit: Duration, health: Health, shutdown: Shutdown) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stuck = false;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.wait() => return,
            _ = tick.tick() => {}
        }
        let stalled_for = progress.stalled_for();
        if (stalled_for >= limit) != stuck {
            stuck = !stuck;
            health.set_live("progress", !stuck);
            if stuck {
                tracing::error!(
                    held = progress.held(),
                    stalled_s = stalled_for.as_secs(),
                    "no message settled while messages are held; /healthz now fails so the bridge is restarted"
                );
            }
        }
    }
}

/// Lets the acknowledger finish what Kafka confirms within the drain timeout. The session
/// driver is still turning, so the acknowledgements reach the broker.
async fn drain(
    in_flight: mpsc::Sender<InFlight>,
    acker: tokio::task::JoinHandle<Result<(), BridgeError>>,
) -> Result<(), BridgeError> {
    drop(in_flight);
    let abort = acker.abort_handle();
    match tokio::time::timeout(DRAIN_TIMEOUT, acker).await {
        Ok(result) => result.unwrap_or(Ok(())),
        Err(_) => {
            abort.abort();
            tracing::warn!(
                waited_s = DRAIN_TIMEOUT.as_secs(),
                "kafka did not confirm the messages in flight; the broker will deliver them again"
            );
            Ok(())
        }
    }
}
