//! The outbox publisher: unpublished rows of `alerts` -> MQTT, QoS 1, in order per device.
//!
//! Each round is one transaction that
//!
//! 1. finds the partitions with unpublished alerts and takes `pg_try_advisory_xact_lock` on
//!    each, skipping those another replica is publishing right now;
//! 2. reads the locked partitions' unpublished rows in `id` order (a later statement than the
//!    lock, so it sees whatever the previous lock holder committed);
//! 3. publishes each body to `users/{user}/devices/{device}/alerts` with QoS 1 and waits until
//!    the broker acknowledged every one;
//! 4. sets `published_at` and commits, which releases the locks.
//!
//! Guarantee: every stored alert is published at least once, and in `id` order per partition,
//! hence per device (the worker writes a partition's batches one at a time, so ids follow the
//! readings). It is published exactly once unless the round fails after the broker accepted a
//! message (connection lost before all PUBACKs, or the commit failed): the round is then
//! published again in full, and the subscriber sees the repeat under the same `alert_id`. A
//! broker outage leaves the rows waiting; a failed round drops its MQTT connection, so the
//! client library never resends on its own behalf what the next round will send anyway.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet, QoS};
use telemetry_core::backoff::Backoff;
use telemetry_core::config::Validate;
use telemetry_core::contract::DeviceId;
use telemetry_core::Shutdown;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_postgres::types::Type;

use super::config::{MqttConfig, OutboxConfig};
use crate::error::{step, AlertError};
use crate::metrics;

/// Class of the advisory locks that keep two replicas from publishing one partition; the value
/// is arbitrary ("alrt") but fixed, and apart from the worker's single-key migration lock.
const PUBLISH_LOCK_CLASS: i32 = 0x616c_7274;

/// The partitions with unpublished alerts, found with a loose index scan (one index probe per
/// partition, however long the backlog), each locked unless another replica holds it.
const LOCK_PARTITIONS: &str = "
WITH RECURSIVE pending(p) AS (
    (SELECT kafka_partition FROM alerts WHERE published_at IS NULL
     ORDER BY kafka_partition LIMIT 1)
    UNION ALL
    SELECT (SELECT a.kafka_partition FROM alerts a
            WHERE a.published_at IS NULL AND a.kafka_partition > pending.p
            ORDER BY a.kafka_partition LIMIT 1)
    FROM pending WHERE pending.p IS NOT NULL
)
SELECT p FROM pending WHERE p IS NOT NULL AND pg_try_advisory_xact_lock($1, p)";

/// The oldest unpublished rows of the locked partitions, each partition read in index order.
const SELECT_UNPUBLISHED: &str = "
SELECT a.id, a.user_id, a.device_id, a.body
FROM unnest($1::int4[]) AS l(p)
CROSS JOIN LATERAL (
    SELECT id, user_id, device_id, body FROM alerts
    WHERE published_at IS NULL AND kafka_partition = l.p
    ORDER BY id LIMIT $2
) AS a
ORDER BY a.id LIMIT $2";

/// Publishes the outbox until shutdown.
#[derive(Debug)]
pub struct Outbox {
    config: OutboxConfig,
    wake: Arc<Notify>,
}

/// Starts a publishing round now instead of at the next poll. Cheap to clone and to call; the
/// worker calls it after committing a batch that produced alerts.
#[derive(Debug, Clone)]
pub struct OutboxWaker {
    wake: Arc<Notify>,
}

impl OutboxWaker {
    pub fn wake(&self) {
        // A permit is stored when the publisher is busy, so the alerts of a batch committed
        // during a round are picked up by the next round, right after.
        self.wake.notify_one();
    }
}

/// Why a round failed; decides whether the MQTT connection is kept.
#[derive(Debug)]
enum RoundError {
    Database(AlertError),
    Mqtt(String),
}

impl From<AlertError> for RoundError {
    fn from(error: AlertError) -> Self {
        RoundError::Database(error)
    }
}

impl Outbox {
    pub fn new(config: OutboxConfig) -> Result<Outbox, AlertError> {
        config.validate()?;
        Ok(Outbox {
            config,
            wake: Arc::new(Notify::new()),
        })
    }

    pub fn waker(&self) -> OutboxWaker {
        OutboxWaker {
            wake: self.wake.clone(),
        }
    }

    /// Publishes rounds until shutdown: at once when woken, else every poll interval; waits
    /// out database and broker outages. Finishes the round in progress before returning.
    pub async fn run(self, pool: Pool, shutdown: Shutdown) -> Result<(), AlertError> {
        let mut session: Option<Session> = None;
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut gauge_due = Instant::now();
        tracing::info!(
            broker = %format!("{}:{}", self.config.mqtt.host, self.config.mqtt.port),
            client_id = %self.config.mqtt.client_id,
            "alert outbox publishing"
        );
        while !shutdown.is_triggered() {
            let current = session.get_or_insert_with(|| Session::open(&self.config));
            current.drain_events();
            if !current.connected {
                // Keep the pending gauge fresh while the broker is away: it is what shows the
                // backlog growing.
                if Instant::now() >= gauge_due {
                    gauge_due = Instant::now() + self.config.poll_interval();
                    // The database may be away too; shutdown must not wait for it.
                    tokio::select! {
                        biased;
                        _ = shutdown.wait() => break,
                        counted = refresh_pending(&pool) => if let Err(error) = counted {
                            tracing::debug!(%error, "cannot count unpublished alerts");
                        },
                    }
                }
                let driver_gone = tokio::select! {
                    biased;
                    _ = shutdown.wait() => break,
                    event = current.events.recv() => match event {
                        Some(event) => {
                            current.apply(event);
                            false
                        }
                        None => true,
                    },
                    _ = tokio::time::sleep_until(gauge_due) => false,
                };
                if driver_gone {
                    session = None;
                }
                continue;
            }
            let count_pending = Instant::now() >= gauge_due;
            match self.round(&pool, current, count_pending).await {
                Ok(published) => {
                    backoff.reset();
                    if count_pending {
                        gauge_due = Instant::now() + self.config.poll_interval();
                    }
                    if published == self.config.batch_size {
                        continue; // more may be waiting
                    }
                    tokio::select! {
                        biased;
                        _ = shutdown.wait() => break,
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(self.config.poll_interval()) => {}
                    }
                }
                Err(error) => {
                    let (cause, message) = match error {
                        RoundError::Database(e) => ("postgres", e.to_string()),
                        RoundError::Mqtt(e) => {
                            // A new connection, so nothing of this round is resent behind our
                            // back; the next round sends it again from the table.
                            session = None;
                            ("mqtt", e)
                        }
                    };
                    metrics::outbox_retry(cause);
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %message, retry_in_ms = delay.as_millis() as u64,
                        "alerts not published; they stay in the outbox and are retried");
                    tokio::select! {
                        biased;
                        _ = shutdown.wait() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        if let Some(session) = session {
            session.close().await;
        }
        tracing::info!("alert outbox stopped");
        Ok(())
    }

    /// One transaction: lock partitions, publish their oldest unpublished rows, mark them.
    /// Returns how many alerts were published.
    async fn round(
        &self,
        pool: &Pool,
        session: &mut Session,
        count_pending: bool,
    ) -> Result<usize, RoundError> {
        let mut client = pool.get().await.map_err(AlertError::Pool)?;
        let tx = client
            .transaction()
            .await
            .map_err(step("beginning an outbox transaction"))?;
        let partitions: Vec<i32> = tx
            .query_typed(LOCK_PARTITIONS, &[(&PUBLISH_LOCK_CLASS, Type::INT4)])
            .await
            .map_err(step("locking partitions with unpublished alerts"))?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let mut published = Vec::new();
        if !partitions.is_empty() {
            let limit = self.config.batch_size as i64;
            let rows = tx
                .query_typed(
                    SELECT_UNPUBLISHED,
                    &[(&partitions, Type::INT4_ARRAY), (&limit, Type::INT8)],
                )
                .await
                .map_err(step("reading unpublished alerts"))?;
            let mut messages = Vec::with_capacity(rows.len());
            for row in &rows {
                published.push(row.get::<_, i64>(0));
                let device = DeviceId {
                    user: row.get(1),
                    device: row.get(2),
                };
                let body: serde_json::Value = row.get(3);
                let payload = serde_json::to_vec(&body).expect("a JSON value serializes");
                messages.push((device.alerts_topic(), payload));
            }
            session
                .publish_all(messages, self.config.ack_timeout())
                .await
                .map_err(RoundError::Mqtt)?;
            if !published.is_empty() {
                tx.execute_typed(
                    "UPDATE alerts SET published_at = clock_timestamp() WHERE id = ANY($1)",
                    &[(&published, Type::INT8_ARRAY)],
                )
                .await
                .map_err(step("marking alerts published"))?;
            }
        }
        let pending = if count_pending {
            Some(count_unpublished(&tx).await?)
        } else {
            None
        };
        tx.commit()
            .await
            .map_err(step("committing published alerts"))?;
        metrics::published(published.len());
        if let Some(pending) = pending {
            metrics::pending(pending);
        }
        if !published.is_empty() {
            tracing::debug!(published = published.len(), ?partitions, client_id = %self.config.mqtt.client_id,
                "alerts published");
        }
        Ok(published.len())
    }
}

async fn count_unpublished(tx: &tokio_postgres::Transaction<'_>) -> Result<i64, AlertError> {
    let row = tx
        .query_typed_one(
            "SELECT count(*) FROM alerts WHERE published_at IS NULL",
            &[],
        )
        .await
        .map_err(step("counting unpublished alerts"))?;
    Ok(row.get(0))
}

async fn refresh_pending(pool: &Pool) -> Result<(), AlertError> {
    let mut client = pool.get().await?;
    let tx = client
        .transaction()
        .await
        .map_err(step("beginning a transaction"))?;
    let pending = count_unpublished(&tx).await?;
    tx.commit().await.map_err(step("committing"))?;
    metrics::pending(pending);
    Ok(())
}

/// What the MQTT event loop reports to the publisher.
#[derive(Debug)]
enum MqttEvent {
    Connected,
    Disconnected(String),
    /// A publish went out with this packet id.
    Sent(u16),
    /// The broker acknowledged this packet id.
    Acked(u16),
}

/// One MQTT connection (with its reconnects) and the task that drives its event loop, which
/// must never be blocked.
#[derive(Debug)]
struct Session {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<MqttEvent>,
    driver: JoinHandle<()>,
    connected: bool,
    /// The last connection error, so a broker that stays down is reported once.
    last_error: Option<String>,
}

impl Session {
    fn open(config: &OutboxConfig) -> Session {
        let (client, mut eventloop) = AsyncClient::new(mqtt_options(&config.mqtt), 64);
        // Without TCP_NODELAY a round's small publishes wait on Nagle's algorithm for the
        // broker's delayed ACK, about 40 ms a round: most of the alert latency budget.
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        // Unbounded so the driver never waits on the publisher; it holds at most a round's
        // worth of events (two per message) plus connection changes.
        let (sender, events) = mpsc::unbounded_channel();
        let driver = tokio::spawn(drive(eventloop, sender));
        Session {
            client,
            events,
            driver,
            connected: false,
            last_error: None,
        }
    }

    fn apply(&mut self, event: MqttEvent) {
        match event {
            MqttEvent::Connected => {
                self.connected = true;
                self.last_error = None;
                tracing::info!("alert outbox connected to the MQTT broker");
            }
            MqttEvent::Disconnected(error) => {
                if self.connected || self.last_error.as_ref() != Some(&error) {
                    tracing::warn!(%error, "alert outbox has no MQTT connection; alerts wait in the outbox");
                }
                self.connected = false;
                self.last_error = Some(error);
            }
            // Outside a round there is nothing to match them with.
            MqttEvent::Sent(_) | MqttEvent::Acked(_) => {}
        }
    }

    fn drain_events(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            self.apply(event);
        }
    }

    /// Publishes every message with QoS 1 and returns once the broker acknowledged them all.
    async fn publish_all(
        &mut self,
        messages: Vec<(String, Vec<u8>)>,
        timeout: Duration,
    ) -> Result<(), String> {
        let total = messages.len();
        let deadline = Instant::now() + timeout;
        let mut unacked: HashSet<u16> = HashSet::new();
        let mut acked = 0;
        for (topic, payload) in messages {
            // Stop early when the connection is gone rather than at the deadline.
            while let Ok(event) = self.events.try_recv() {
                self.track(event, &mut unacked, &mut acked)?;
            }
            let publish = self.client.publish(topic, QoS::AtLeastOnce, false, payload);
            match tokio::time::timeout_at(deadline, publish).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    return Err(format!("cannot hand a message to the MQTT client: {error}"))
                }
                Err(_) => {
                    return Err(format!(
                        "the MQTT client did not take the messages within {timeout:?}"
                    ))
                }
            }
        }
        while acked < total {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(event)) => self.track(event, &mut unacked, &mut acked)?,
                Ok(None) => return Err("the MQTT event loop stopped".into()),
                Err(_) => {
                    return Err(format!(
                        "the broker acknowledged {acked} of {total} alerts within {timeout:?}"
                    ))
                }
            }
        }
        Ok(())
    }

    fn track(
        &mut self,
        event: MqttEvent,
        unacked: &mut HashSet<u16>,
        acked: &mut usize,
    ) -> Result<(), String> {
        match event {
            // Packet ids are reused once acknowledged, so a set of those in flight suffices;
            // the event loop reports a publish before its acknowledgement.
            MqttEvent::Sent(pkid) => {
                unacked.insert(pkid);
            }
            MqttEvent::Acked(pkid) => {
                if unacked.remove(&pkid) {
                    *acked += 1;
                }
            }
            MqttEvent::Connected => self.apply(MqttEvent::Connected),
            MqttEvent::Disconnected(error) => {
                let message = format!("lost the MQTT connection: {error}");
                self.apply(MqttEvent::Disconnected(error));
                return Err(message);
            }
        }
        Ok(())
    }

    /// Disconnects cleanly, giving the event loop a moment to send the DISCONNECT.
    async fn close(mut self) {
        if self.connected && self.client.disconnect().await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Some(event) = self.events.recv().await {
                    if matches!(event, MqttEvent::Disconnected(_)) {
                        break;
                    }
                }
            })
            .await;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

fn mqtt_options(config: &MqttConfig) -> MqttOptions {
    let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
    // A clean session: the outbox table, not the broker, remembers what is left to send.
    options
        .set_clean_session(true)
        .set_keep_alive(Duration::from_secs(config.keep_alive_secs));
    if let Some(username) = &config.username {
        options.set_credentials(username, config.password.as_deref().unwrap_or_default());
    }
    options
}

/// Polls the event loop until the session is dropped, reporting what the publisher needs and
/// reconnecting with back-off.
async fn drive(mut eventloop: EventLoop, events: mpsc::UnboundedSender<MqttEvent>) {
    // Short and capped low: alerts wait while the broker is away, so it is worth noticing its
    // return within a couple of seconds.
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let event = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                MqttEvent::Connected
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => MqttEvent::Acked(ack.pkid),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => MqttEvent::Sent(pkid),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                let _ = events.send(MqttEvent::Disconnected("disconnected on shutdown".into()));
                return;
            }
            Ok(_) => continue,
            Err(error) => {
                if events
                    .send(MqttEvent::Disconnected(error.to_string()))
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        if events.send(event).is_err() {
            return;
        }
    }
}
