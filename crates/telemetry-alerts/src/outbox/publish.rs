//! The outbox publisher: unpublished rows of `alerts` -> MQTT, QoS 2, exactly once, in order
//! per device.
//!
//! Each round is one transaction that
//!
//! 1. finds the partitions with unpublished alerts and takes `pg_try_advisory_xact_lock` on
//!    each, skipping those another replica is publishing right now;
//! 2. opens each locked partition's persistent MQTT session (`{client_id}-p{partition}`, the
//!    same on every replica), or reuses the one it kept; taking a session over cuts off a
//!    previous holder that lost the lock but not its connection;
//! 3. reads the locked partitions' unpublished rows in `id` order (after the lock and the
//!    takeover, so it sees whatever the previous holder committed);
//! 4. publishes each partition's rows on its session, in groups: PUBLISH with QoS 2 under a
//!    packet id derived from the event id ([`packet_id`]), wait for every PUBREC, commit
//!    `released_at` (on a second connection, so the locks stay held), send PUBREL, wait for
//!    every PUBCOMP;
//! 5. sets `published_at` on the rows that completed and commits, which releases the locks.
//!
//! Why that is exactly once: the broker delivers a QoS 2 message once, and until it is
//! released it recognises a PUBLISH under the same packet id as the one it holds. A publisher
//! that dies at any step leaves rows that the next lock holder, on the same session, finishes:
//! a row without `released_at` was never released, so publishing it again under its packet id
//! cannot make a second copy; a row with it may have been delivered, so it is only released
//! again, which delivers nothing new. Mosquitto delivers on release and holds unreleased
//! messages without a time limit; EMQX delivers on receipt and recognises a resend for
//! `mqtt.await_rel_timeout` (300 s by default), so a publisher gone longer than that on EMQX
//! can repeat an alert. A broker that loses its sessions (restarted without persistence)
//! makes the publisher resend rows whose release was unconfirmed, at least once: logged.
//!
//! Restores: the packet id depends on the event, not on the row, so a database restored from a
//! backup, whose worker generates the alerts after the backup again (under row ids that other
//! alerts had before), publishes each under the packet id it had: a message the broker still
//! holds from before is recognised as the same alert, never taken for another. What the broker
//! already delivered, the restored database does not know: those alerts are delivered again,
//! with the same `event_id`, which subscribers deduplicate on.
//!
//! Order: a partition's rows are published in `id` order, one group after the other, and a
//! device's rows are in one partition (the worker writes a partition's batches one at a time,
//! so ids follow the readings). A broker outage leaves the rows waiting.
//!
//! A replica runs `alerts.outbox.publishers` such rounds side by side, each on its own share of
//! the partitions (partition mod publishers), so alerts of one partition never wait for a
//! round busy with another share.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Object, Pool};
use telemetry_core::backoff::Backoff;
use telemetry_core::config::Validate;
use telemetry_core::contract::DeviceId;
use telemetry_core::kafka;
use telemetry_core::Shutdown;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_postgres::types::Type;

use super::config::OutboxConfig;
use super::session::{Outgoing, Session};
use crate::error::{step, AlertError};
use crate::metrics;

/// Class of the advisory locks that keep two replicas from publishing one partition; the value
/// is arbitrary ("alrt") but fixed, and apart from the worker's single-key migration lock.
const PUBLISH_LOCK_CLASS: i32 = 0x616c_7274;

/// The partitions with unpublished alerts, found with a loose index scan (one index probe per
/// partition, however long the backlog); each of this publisher's share (`p % $2 = $3`) is
/// locked unless another publisher holds it. The CASE keeps the lock from being tried on
/// partitions outside the share, whatever order the planner evaluates conditions in.
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
SELECT p FROM pending
WHERE p IS NOT NULL AND CASE WHEN p % $2 = $3 THEN pg_try_advisory_xact_lock($1, p) ELSE false END";

/// The oldest unpublished rows of the locked partitions, each partition read in index order.
const SELECT_UNPUBLISHED: &str = "
SELECT a.id, a.kafka_partition, a.user_id, a.device_id, a.body, a.released_at IS NOT NULL,
       a.body->>'event_id'
FROM unnest($1::int4[]) AS l(p)
CROSS JOIN LATERAL (
    SELECT id, kafka_partition, user_id, device_id, body, released_at FROM alerts
    WHERE published_at IS NULL AND kafka_partition = l.p
    ORDER BY id LIMIT $2
) AS a
ORDER BY a.id LIMIT $2";

/// Publishes the outbox until shutdown.
#[derive(Debug)]
pub struct Outbox {
    config: OutboxConfig,
    /// One per publisher, in share order.
    wakes: Arc<[Notify]>,
}

/// Starts a publishing round now instead of at the next poll. Cheap to clone and to call; the
/// worker calls it after committing a batch that produced alerts.
#[derive(Debug, Clone)]
pub struct OutboxWaker {
    wakes: Arc<[Notify]>,
}

impl OutboxWaker {
    /// Wakes every publisher.
    pub fn wake(&self) {
        self.wakes.iter().for_each(Notify::notify_one);
    }

    /// Wakes the publishers of these partitions' shares only.
    pub fn wake_partitions(&self, partitions: impl IntoIterator<Item = i32>) {
        let mut woken = vec![false; self.wakes.len()];
        for partition in partitions {
            let share = kafka::share_of(partition, self.wakes.len());
            if !std::mem::replace(&mut woken[share], true) {
                // A permit is stored when the publisher is busy, so the alerts of a batch
                // committed during a round are picked up by the next round, right after.
                self.wakes[share].notify_one();
            }
        }
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

/// One unpublished row, as a round reads it.
#[derive(Debug, Clone)]
struct Pending {
    id: i64,
    /// See [`packet_id`].
    pkid: u16,
    topic: String,
    payload: Vec<u8>,
    /// PUBREL may already have gone out for it (`released_at` is set).
    released: bool,
}

impl Pending {
    fn pkid(&self) -> u16 {
        self.pkid
    }

    fn outgoing(&self) -> Outgoing {
        Outgoing {
            pkid: self.pkid(),
            topic: self.topic.clone(),
            payload: self.payload.clone(),
        }
    }
}

/// The packet id a row is always published under, so that any publisher resending it uses the
/// one the broker may still hold. MQTT packet ids are 1..=65535.
///
/// Derived from the row's `event_id` (the body's), which depends only on the alert's cause: the
/// same alert generated again after a database restore, under another row id, keeps its packet
/// id, and a row id reused by another alert brings no packet id with it. Rows stored before
/// messages carried `event_id` keep the packet id of their row id, under which the broker may
/// hold them.
pub fn packet_id(row_id: i64, event_id: Option<&str>) -> u16 {
    let key = event_id
        .and_then(|id| id.get(..8))
        .and_then(|prefix| u32::from_str_radix(prefix, 16).ok())
        .map_or(row_id, i64::from);
    (key.rem_euclid(65_535) + 1) as u16
}

/// Splits a partition's rows, in order, into groups of at most `max` that the broker holds
/// unreleased at once. The rows stop before the first packet id the round already uses (two
/// events share one in 65,535): releasing the earlier row again after a crash would release
/// the later one, early, and it would then be published a second time. The rest wait for the
/// next round, which starts at once, when the earlier row is marked published.
fn in_flight_groups(rows: &[Pending], max: usize) -> Vec<&[Pending]> {
    let mut used = HashSet::new();
    let usable = rows
        .iter()
        .position(|row| !used.insert(row.pkid()))
        .unwrap_or(rows.len());
    rows[..usable].chunks(max).collect()
}

impl Outbox {
    pub fn new(config: OutboxConfig) -> Result<Outbox, AlertError> {
        config.validate()?;
        let wakes = (0..config.publishers).map(|_| Notify::new()).collect();
        Ok(Outbox { config, wakes })
    }

    pub fn waker(&self) -> OutboxWaker {
        OutboxWaker {
            wakes: self.wakes.clone(),
        }
    }

    /// Runs the publishers until shutdown; each finishes the round it is in before returning.
    pub async fn run(self, pool: Pool, shutdown: Shutdown) -> Result<(), AlertError> {
        tracing::info!(
            broker = %format!("{}:{}", self.config.mqtt.host, self.config.mqtt.port),
            sessions = %format!("{}-p{{partition}}", self.config.mqtt.client_id),
            publishers = self.config.publishers,
            "alert outbox publishing"
        );
        let share = |index| Share {
            index,
            of: self.config.publishers,
        };
        let publishers = (0..self.config.publishers)
            .map(|index| self.publish_share(share(index), &pool, &shutdown));
        futures::future::join_all(publishers).await;
        tracing::info!("alert outbox stopped");
        Ok(())
    }

    /// One publisher: rounds on its share of the partitions, at once when woken, else every
    /// poll interval; waits out database and broker outages.
    async fn publish_share(&self, share: Share, pool: &Pool, shutdown: &Shutdown) {
        // Capped low: alerts wait while the broker is away, so it is worth noticing its return
        // within a couple of seconds.
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut gauge_due = Instant::now();
        let mut failing: Option<String> = None;
        let mut sessions = Sessions::new();
        let wake = &self.wakes[share.index];
        while !shutdown.is_triggered() {
            // The gauge counts every partition; one publisher keeps it.
            let count_pending = share.index == 0 && Instant::now() >= gauge_due;
            if count_pending {
                gauge_due = Instant::now() + self.config.poll_interval();
            }
            match self.round(pool, share, count_pending, &mut sessions).await {
                Ok(round) => {
                    backoff.reset();
                    if failing.take().is_some() {
                        tracing::info!("alert outbox publishing again");
                    }
                    // A full read, or rows held back for a packet id the round already used.
                    if round.read == self.config.batch_size || round.published < round.read {
                        continue;
                    }
                    tokio::select! {
                        biased;
                        _ = shutdown.wait() => break,
                        _ = wake.notified() => {}
                        _ = tokio::time::sleep(self.config.poll_interval()) => {}
                    }
                }
                Err(error) => {
                    let (cause, message) = match error {
                        RoundError::Database(e) => ("postgres", e.to_string()),
                        RoundError::Mqtt(e) => ("mqtt", e),
                    };
                    metrics::outbox_retry(cause);
                    let delay = backoff.next_delay();
                    // A broker that stays down fails every round the same way: say it once.
                    if failing.as_ref() != Some(&message) {
                        tracing::warn!(error = %message, retry_in_ms = delay.as_millis() as u64,
                            publisher = share.index,
                            "alerts not published; they stay in the outbox and are retried");
                        failing = Some(message);
                    }
                    tokio::select! {
                        biased;
                        _ = shutdown.wait() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        futures::future::join_all(sessions.into_values().map(Session::disconnect)).await;
    }

    /// One transaction: lock partitions, publish their oldest unpublished rows (each partition
    /// on its own session, all at once), mark those that completed. Returns how many alerts
    /// were read and published; an error after some partitions completed still marks those.
    async fn round(
        &self,
        pool: &Pool,
        share: Share,
        count_pending: bool,
        sessions: &mut Sessions,
    ) -> Result<Round, RoundError> {
        let started = Instant::now();
        let mut client = pool.get().await.map_err(AlertError::Pool)?;
        let tx = client
            .transaction()
            .await
            .map_err(step("beginning an outbox transaction"))?;
        let partitions: Vec<i32> = tx
            .query_typed(
                LOCK_PARTITIONS,
                &[
                    (&PUBLISH_LOCK_CLASS, Type::INT4),
                    (&(share.of as i32), Type::INT4),
                    (&(share.index as i32), Type::INT4),
                ],
            )
            .await
            .map_err(step("locking partitions with unpublished alerts"))?
            .iter()
            .map(|row| row.get(0))
            .collect();
        if count_pending {
            // Counted before publishing, so the gauge also shows a backlog the broker's
            // absence keeps from shrinking.
            metrics::pending(count_unpublished(&tx).await?);
        }
        if partitions.is_empty() {
            tx.commit().await.map_err(step("ending an outbox round"))?;
            return Ok(Round::default());
        }
        // Release marks must be durable before PUBREL goes out, while this transaction keeps
        // holding the partitions' locks; so they are committed on a second connection.
        let recorder = pool.get().await.map_err(AlertError::Pool)?;
        // Sessions before rows. Taking a partition's session over cuts off a publisher that
        // lost the partition's lock but not its MQTT connection; whatever it released before
        // that, it had marked released first, so the rows read next show it.
        let (opened, mut failure) = self.open_sessions(&partitions, sessions, &recorder).await?;
        let connected: Vec<i32> = opened.keys().copied().collect();
        let by_partition = self.read_unpublished(&tx, &connected).await?;
        let read = by_partition.values().map(Vec::len).sum();
        let mut published = Vec::new();
        if let Err(error) = self
            .publish_partitions(&recorder, &by_partition, opened, sessions, &mut published)
            .await
        {
            failure.get_or_insert(error);
        }
        drop(recorder);
        if !published.is_empty() {
            tx.execute_typed(
                "UPDATE alerts SET published_at = clock_timestamp() WHERE id = ANY($1)",
                &[(&published, Type::INT8_ARRAY)],
            )
            .await
            .map_err(step("marking alerts published"))?;
        }
        tx.commit()
            .await
            .map_err(step("committing published alerts"))?;
        metrics::published(published.len());
        if !published.is_empty() {
            metrics::outbox_round(started.elapsed());
            tracing::debug!(published = published.len(), ?partitions, "alerts published");
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(Round {
                read,
                published: published.len(),
            }),
        }
    }

    async fn read_unpublished(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        partitions: &[i32],
    ) -> Result<BTreeMap<i32, Vec<Pending>>, AlertError> {
        let limit = self.config.batch_size as i64;
        let rows = tx
            .query_typed(
                SELECT_UNPUBLISHED,
                &[(&partitions, Type::INT4_ARRAY), (&limit, Type::INT8)],
            )
            .await
            .map_err(step("reading unpublished alerts"))?;
        let mut by_partition: BTreeMap<i32, Vec<Pending>> = BTreeMap::new();
        for row in &rows {
            let device = DeviceId {
                user: row.get(2),
                device: row.get(3),
            };
            let body: serde_json::Value = row.get(4);
            // jsonb reads back byte-for-byte the same each time, so a resent message matches
            // the one the broker may hold, as the broker checks.
            let payload = serde_json::to_vec(&body).expect("a JSON value serializes");
            let id = row.get(0);
            by_partition.entry(row.get(1)).or_default().push(Pending {
                id,
                pkid: packet_id(id, row.get(6)),
                topic: device.alerts_topic(),
                payload,
                released: row.get(5),
            });
        }
        Ok(by_partition)
    }

    /// A session for each locked partition: the one kept from an earlier round when still
    /// usable, else a new connection. Returns them with the first connection error, if any;
    /// partitions without a session sit this round out.
    ///
    /// A session the broker did not have (new, or lost in a restart without persistence)
    /// holds nothing an earlier publisher left: rows released but not confirmed may never
    /// have been delivered. Their release marks are cleared, so they are published again:
    /// at least once, never lost.
    async fn open_sessions(
        &self,
        partitions: &[i32],
        sessions: &mut Sessions,
        recorder: &Object,
    ) -> Result<(BTreeMap<i32, Session>, Option<RoundError>), RoundError> {
        let timeout = self.config.ack_timeout();
        let max_idle = self.max_idle();
        // Connections of partitions this round did not lock idle on; let them go in time.
        sessions.retain(|partition, session| {
            partitions.contains(partition) || session.reusable(max_idle)
        });
        let connecting = partitions.iter().map(|&partition| {
            let kept = sessions
                .remove(&partition)
                .and_then(|mut session| session.reusable(max_idle).then_some(session));
            async move {
                let session = match kept {
                    Some(session) => Ok(session),
                    None => {
                        let client_id = self.client_id(partition);
                        Session::connect(&self.config.mqtt, &client_id, Instant::now() + timeout)
                            .await
                    }
                };
                (partition, session)
            }
        });
        let mut opened = BTreeMap::new();
        let mut failure = None;
        for (partition, session) in futures::future::join_all(connecting).await {
            match session {
                Ok(session) => {
                    opened.insert(partition, session);
                }
                Err(error) => {
                    failure.get_or_insert(RoundError::Mqtt(error));
                }
            }
        }
        let forgotten: Vec<i32> = opened
            .iter()
            .filter(|(_, session)| !session.session_present)
            .map(|(&partition, _)| partition)
            .collect();
        if !forgotten.is_empty() {
            let cleared = recorder
                .execute_typed(
                    "UPDATE alerts SET released_at = NULL
                     WHERE published_at IS NULL AND released_at IS NOT NULL
                       AND kafka_partition = ANY($1)",
                    &[(&forgotten, Type::INT4_ARRAY)],
                )
                .await
                .map_err(step("clearing release marks of a session the broker lost"))?;
            if cleared > 0 {
                tracing::warn!(partitions = ?forgotten, alerts = cleared,
                    "the broker had lost these publishing sessions; alerts whose release was unconfirmed are published again and may arrive twice");
            }
            // The broker holds the session from now on.
            for partition in &forgotten {
                if let Some(session) = opened.get_mut(partition) {
                    session.session_present = true;
                }
            }
        }
        Ok((opened, failure))
    }

    /// Publishes every partition's rows on its session, the partitions side by side and in
    /// step, a group of each at a time: publish (PUBREC), record the release of all of them in
    /// one commit, release (PUBCOMP). Adds the ids that completed to `done`; a partition whose
    /// broker exchange fails stops there, the others go on, and the first such error is
    /// returned at the end. Sessions that did not fail go back to `sessions`.
    async fn publish_partitions(
        &self,
        recorder: &Object,
        by_partition: &BTreeMap<i32, Vec<Pending>>,
        opened: BTreeMap<i32, Session>,
        sessions: &mut Sessions,
        done: &mut Vec<i64>,
    ) -> Result<(), RoundError> {
        let timeout = self.config.ack_timeout();
        let mut failure: Option<String> = None;
        let mut lanes: Vec<Lane> = opened
            .into_iter()
            .map(|(partition, session)| {
                let rows = by_partition.get(&partition).map_or(&[][..], Vec::as_slice);
                Lane {
                    partition,
                    session,
                    groups: in_flight_groups(rows, self.config.max_in_flight).into_iter(),
                    failed: false,
                }
            })
            .collect();
        loop {
            let due: Vec<(&mut Lane, &[Pending])> = lanes
                .iter_mut()
                .filter_map(|lane| lane.groups.next().map(|group| (lane, group)))
                .collect();
            if due.is_empty() {
                break;
            }
            let received =
                futures::future::join_all(due.into_iter().map(|(lane, group)| async move {
                    let outcome = lane.publish(group, Instant::now() + timeout).await;
                    (lane, group, outcome)
                }))
                .await;
            let mut releasing = Vec::new();
            for (lane, group, outcome) in received {
                match outcome {
                    Ok(()) => releasing.push((lane, group)),
                    Err(error) => {
                        lane.fail();
                        failure.get_or_insert(error);
                    }
                }
            }
            // What was just published must be marked released before PUBREL goes out.
            let newly_released: Vec<i64> = releasing
                .iter()
                .flat_map(|(_, group)| unreleased(group).map(|row| row.id))
                .collect();
            if !newly_released.is_empty() {
                recorder
                    .execute_typed(
                        "UPDATE alerts SET released_at = clock_timestamp() WHERE id = ANY($1)",
                        &[(&newly_released, Type::INT8_ARRAY)],
                    )
                    .await
                    .map_err(step("recording alerts about to be released"))?;
            }
            let released =
                futures::future::join_all(releasing.into_iter().map(|(lane, group)| async move {
                    let pkids: Vec<u16> = group.iter().map(Pending::pkid).collect();
                    let outcome = lane.session.release(&pkids, Instant::now() + timeout).await;
                    (lane, group, outcome)
                }))
                .await;
            for (lane, group, outcome) in released {
                match outcome {
                    Ok(()) => done.extend(group.iter().map(|row| row.id)),
                    Err(error) => {
                        lane.fail();
                        failure.get_or_insert(error);
                    }
                }
            }
        }
        // A connection whose exchange failed may hold answers of its own; it is dropped.
        for lane in lanes.into_iter().filter(|lane| !lane.failed) {
            sessions.insert(lane.partition, lane.session);
        }
        match failure {
            Some(error) => Err(RoundError::Mqtt(error)),
            None => Ok(()),
        }
    }

    fn client_id(&self, partition: i32) -> String {
        format!("{}-p{partition}", self.config.mqtt.client_id)
    }

    /// How long a kept session may idle: well inside the keep-alive the broker enforces, since
    /// no PINGREQ is sent between rounds.
    fn max_idle(&self) -> Duration {
        Duration::from_secs(self.config.mqtt.keep_alive_secs) / 2
    }
}

/// What one round did.
#[derive(Debug, Default, Clone, Copy)]
struct Round {
    /// Unpublished rows read.
    read: usize,
    /// Of those, the ones published.
    published: usize,
}

/// Open publishing sessions, by partition, kept between rounds.
type Sessions = HashMap<i32, Session>;

/// A publisher's share of the partitions: those whose number mod `of` is `index`.
#[derive(Debug, Clone, Copy)]
struct Share {
    index: usize,
    of: usize,
}

/// One partition's session within a round, and its groups still to publish.
struct Lane<'a> {
    partition: i32,
    session: Session,
    groups: std::vec::IntoIter<&'a [Pending]>,
    failed: bool,
}

impl<'a> Lane<'a> {
    /// Stops this partition for the round after a failed exchange.
    fn fail(&mut self) {
        self.groups = Vec::new().into_iter();
        self.failed = true;
    }

    /// Publishes the rows of `group` not yet marked released: the broker holds them, or never
    /// got them.
    async fn publish(&mut self, group: &[Pending], deadline: Instant) -> Result<(), String> {
        let outgoing: Vec<Outgoing> = unreleased(group).map(Pending::outgoing).collect();
        self.session.publish(outgoing, deadline).await
    }
}

/// The rows of a group that PUBREL may not have gone out for yet.
fn unreleased(group: &[Pending]) -> impl Iterator<Item = &Pending> {
    group.iter().filter(|row| !row.released)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(ids: &[i64]) -> Vec<Pending> {
        ids.iter()
            .map(|&id| Pending {
                id,
                pkid: packet_id(id, None),
                topic: String::new(),
                payload: Vec::new(),
                released: false,
            })
            .collect()
    }

    fn group_ids(groups: Vec<&[Pending]>) -> Vec<Vec<i64>> {
        groups
            .iter()
            .map(|g| g.iter().map(|r| r.id).collect())
            .collect()
    }

    #[test]
    fn a_waker_wakes_only_the_publishers_of_its_partitions() {
        let outbox = Outbox::new(OutboxConfig {
            publishers: 3,
            ..OutboxConfig::default()
        })
        .unwrap();
        outbox.waker().wake_partitions([1, 4, 7]);
        let woken = |share: usize| {
            futures::FutureExt::now_or_never(outbox.wakes[share].notified()).is_some()
        };
        assert_eq!((woken(0), woken(1), woken(2)), (false, true, false));
        outbox.waker().wake();
        assert_eq!((woken(0), woken(1), woken(2)), (true, true, true));
    }

    #[test]
    fn packet_ids_follow_the_event_id_and_rows_without_one_keep_their_row_ids() {
        let event = "cedc2ea8fc9cb3af9ac0df189785e188";
        // The first 32 bits of the event id, 0xcedc2ea8, mod 65,535, plus one.
        assert_eq!(
            packet_id(1, Some(event)),
            0xcedc_2ea8_u32.rem_euclid(65_535) as u16 + 1
        );
        assert_eq!(packet_id(1, Some(event)), packet_id(2, Some(event)));
        assert_ne!(
            packet_id(1, Some(event)),
            packet_id(1, Some("0000000000000000000000000000000a"))
        );
        assert_eq!(packet_id(0, None), 1);
        assert_eq!(packet_id(65_534, None), 65_535);
        assert_eq!(packet_id(65_535, None), 1);
        assert_eq!(packet_id(7, None), packet_id(7 + 65_535 * 3, None));
        assert_ne!(packet_id(7, None), packet_id(8, None));
        // Never zero, whatever the id.
        assert_eq!(packet_id(9, Some("ffffffff")), 1);
        assert_eq!(packet_id(9, Some("not hex")), packet_id(9, None));
    }

    #[test]
    fn groups_hold_at_most_max_rows_in_order() {
        let all = rows(&[1, 2, 3, 4, 5, 9]);
        assert_eq!(
            group_ids(in_flight_groups(&all, 2)),
            vec![vec![1, 2], vec![3, 4], vec![5, 9]]
        );
        assert_eq!(
            group_ids(in_flight_groups(&all, 10)),
            vec![vec![1, 2, 3, 4, 5, 9]]
        );
        assert!(in_flight_groups(&[], 3).is_empty());
    }

    #[test]
    fn a_round_stops_before_a_packet_id_it_already_uses() {
        let all = rows(&[5, 6, 7, 5 + 65_535, 8]);
        assert_eq!(group_ids(in_flight_groups(&all, 10)), vec![vec![5, 6, 7]]);
        // Whichever group the earlier row is in.
        assert_eq!(
            group_ids(in_flight_groups(&all, 2)),
            vec![vec![5, 6], vec![7]]
        );
    }
}
