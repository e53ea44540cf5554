//! Writing alert events and device state inside the caller's transaction.
//!
//! The worker calls these in the transaction that stores a batch, so alerts, rule state, rows
//! and Kafka offsets commit together or not at all. Each is one statement with array
//! parameters (`query_typed`, no named statements), which PgBouncer's transaction mode allows.
//!
//! Guarantee: one device's state moves one transaction at a time. [`load_states`] takes a
//! transaction-scoped lock per device before it reads, so a writer whose batch shares devices
//! with another's (a device's readings in two partitions, after partitions were added, written
//! by two writers) waits for that one's commit and carries on from the state it left: a
//! condition is raised once, and a clear is not lost. Within a batch, [`evaluate_batch`] takes
//! a device's readings in time order across partitions (offset order within one).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use sha2::{Digest, Sha256};
use telemetry_core::contract::DeviceId;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Transaction;

use crate::engine::{evaluate, AlertEvent, DeviceState, Reading};
use crate::error::{step, AlertError};
use crate::rules::RuleSet;

/// Class of the advisory locks that serialise the evaluation of one device's readings; the
/// value is arbitrary ("alst") but fixed, and apart from the publisher's class.
const STATE_LOCK_CLASS: i32 = 0x616c_7374;

/// Evaluates a batch's newly stored readings against the rules, with each device's state locked,
/// loaded and saved in the caller's transaction, and stores the events in the outbox. Pass the
/// readings stored for the first time only (a re-delivered one must not move a state twice),
/// each partition's in offset order. Returns the events, in the order stored.
pub async fn evaluate_batch(
    tx: &Transaction<'_>,
    rules: &RuleSet,
    readings: &[Reading<'_>],
) -> Result<Vec<AlertEvent>, AlertError> {
    if readings.is_empty() || rules.is_empty() {
        return Ok(Vec::new());
    }
    let mut states = load_states(tx, readings.iter().map(|r| r.device)).await?;
    let mut events = Vec::new();
    for index in evaluation_order(readings) {
        let reading = &readings[index];
        if let Some(state) = states.get_mut(reading.device) {
            events.extend(evaluate(rules, state, reading));
        }
    }
    insert_events(tx, &events).await?;
    save_states(tx, states.iter().filter(|(_, s)| s.changed())).await?;
    Ok(events)
}

/// The order to evaluate readings in: device by device (in order of first appearance), each
/// device's readings merged across partitions by time, ties to the lower partition. Within a
/// partition the offset order stands even when device time goes back (a clock reset): that
/// order does not depend on how records were batched, so a replay gives the same alerts. Only
/// after partitions are added does a device have readings in two, and their interleaving
/// comes from the readings' times.
fn evaluation_order(readings: &[Reading<'_>]) -> Vec<usize> {
    // Per device, per partition: indexes in the order given.
    let mut devices: Vec<(&DeviceId, BTreeMap<i32, VecDeque<usize>>)> = Vec::new();
    let mut slot: HashMap<&DeviceId, usize> = HashMap::new();
    for (index, reading) in readings.iter().enumerate() {
        let at = *slot.entry(reading.device).or_insert_with(|| {
            devices.push((reading.device, BTreeMap::new()));
            devices.len() - 1
        });
        devices[at]
            .1
            .entry(reading.partition)
            .or_default()
            .push_back(index);
    }
    let mut order = Vec::with_capacity(readings.len());
    for (_, mut partitions) in devices {
        // Almost always one partition; the merge looks at each's next reading.
        while let Some(queue) = partitions
            .values_mut()
            .filter(|queue| !queue.is_empty())
            .min_by_key(|queue| readings[queue[0]].time)
        {
            order.extend(queue.pop_front());
        }
    }
    order
}

/// The advisory lock key of a device: 32 bits of SHA-256 over its user and name, the same in
/// every replica and version. Two devices that share a key only wait for each other.
fn state_lock_key(device: &DeviceId) -> i32 {
    let mut hash = Sha256::new();
    for part in [device.user.as_bytes(), device.device.as_bytes()] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part);
    }
    let digest = hash.finalize();
    i32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// Stores a batch's events in the outbox, in order (their ids follow the slice), skipping events
/// already stored (same alert id and kind, e.g. from a replayed batch). Returns how many rows
/// were inserted.
pub async fn insert_events(tx: &Transaction<'_>, events: &[AlertEvent]) -> Result<u64, AlertError> {
    if events.is_empty() {
        return Ok(0);
    }
    let mut alert_ids = Vec::with_capacity(events.len());
    let mut kinds = Vec::with_capacity(events.len());
    let mut rules = Vec::with_capacity(events.len());
    let mut severities = Vec::with_capacity(events.len());
    let mut users = Vec::with_capacity(events.len());
    let mut devices = Vec::with_capacity(events.len());
    let mut partitions = Vec::with_capacity(events.len());
    let mut offsets = Vec::with_capacity(events.len());
    let mut times = Vec::with_capacity(events.len());
    let mut bodies = Vec::with_capacity(events.len());
    for event in events {
        alert_ids.push(event.alert_id.as_str());
        kinds.push(event.kind.as_str());
        rules.push(event.rule.as_str());
        severities.push(event.severity.as_str());
        users.push(event.device.user.as_str());
        devices.push(event.device.device.as_str());
        partitions.push(event.partition);
        offsets.push(event.offset);
        times.push(event.occurred_at);
        bodies.push(event.body());
    }
    let params: [(&(dyn ToSql + Sync), Type); 10] = [
        (&alert_ids, Type::TEXT_ARRAY),
        (&kinds, Type::TEXT_ARRAY),
        (&rules, Type::TEXT_ARRAY),
        (&severities, Type::TEXT_ARRAY),
        (&users, Type::TEXT_ARRAY),
        (&devices, Type::TEXT_ARRAY),
        (&partitions, Type::INT4_ARRAY),
        (&offsets, Type::INT8_ARRAY),
        (&times, Type::TIMESTAMPTZ_ARRAY),
        (&bodies, Type::JSONB_ARRAY),
    ];
    tx.execute_typed(
        "INSERT INTO alerts (alert_id, event, rule, severity, user_id, device_id,
                             kafka_partition, kafka_offset, occurred_at, body)
         SELECT a, e, r, s, u, d, p, o, t, b
         FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::int4[], $8::int8[], $9::timestamptz[], $10::jsonb[])
              WITH ORDINALITY AS v(a, e, r, s, u, d, p, o, t, b, n)
         ORDER BY n
         ON CONFLICT (alert_id, event) DO NOTHING",
        &params,
    )
    .await
    .map_err(step("storing alert events"))
}

/// Locks the rule state of each device until the transaction ends, then loads it; a device
/// without stored state gets an empty one. A stored state that cannot be read (e.g. edited by
/// hand) is logged and replaced by an empty one, rather than stopping the partition.
///
/// The locks are advisory, one per device, because a device's row may not exist yet (a state
/// with nothing to remember has none) and `FOR UPDATE` cannot lock a missing row. They are
/// taken in key order, so two writers never wait for each other in a cycle, and are
/// transaction-scoped, which PgBouncer's transaction mode allows. The state is read by the next
/// statement: under READ COMMITTED (the default the worker uses) that one sees every commit made
/// before the locks were granted.
pub async fn load_states<'a>(
    tx: &Transaction<'_>,
    devices: impl IntoIterator<Item = &'a DeviceId>,
) -> Result<HashMap<DeviceId, DeviceState>, AlertError> {
    let mut states: HashMap<DeviceId, DeviceState> = devices
        .into_iter()
        .map(|device| (device.clone(), DeviceState::new()))
        .collect();
    if states.is_empty() {
        return Ok(states);
    }
    let users: Vec<&str> = states.keys().map(|d| d.user.as_str()).collect();
    let names: Vec<&str> = states.keys().map(|d| d.device.as_str()).collect();
    let keys: Vec<i32> = states
        .keys()
        .map(state_lock_key)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // Sent together; the lock statement runs first and the read waits for it. unnest yields the
    // sorted keys in order, and each lock is taken as its row is produced.
    let lock = async {
        tx.execute_typed(
            "SELECT pg_advisory_xact_lock($1, k) FROM unnest($2::int4[]) AS k",
            &[(&STATE_LOCK_CLASS, Type::INT4), (&keys, Type::INT4_ARRAY)],
        )
        .await
        .map_err(step("locking alert state"))
    };
    let load = async {
        tx.query_typed(
            "SELECT s.user_id, s.device_id, s.state
             FROM unnest($1::text[], $2::text[]) AS d(u, dev)
             JOIN alert_state s ON s.user_id = d.u AND s.device_id = d.dev",
            &[(&users, Type::TEXT_ARRAY), (&names, Type::TEXT_ARRAY)],
        )
        .await
        .map_err(step("loading alert state"))
    };
    let (_, rows) = futures::try_join!(lock, load)?;
    for row in rows {
        let device = DeviceId {
            user: row.get(0),
            device: row.get(1),
        };
        let stored: serde_json::Value = row.get(2);
        match DeviceState::from_json(&stored) {
            Ok(state) => {
                states.insert(device, state);
            }
            Err(error) => {
                tracing::warn!(%device, %error, "ignoring unreadable alert state; the device's rules start afresh");
            }
        }
    }
    Ok(states)
}

/// Stores device states: empty ones are deleted, the rest upserted. Pass the states whose
/// [`DeviceState::changed`] is true, and call [`DeviceState::mark_saved`] after the commit.
/// Returns how many rows were written or deleted.
pub async fn save_states<'a>(
    tx: &Transaction<'_>,
    states: impl IntoIterator<Item = (&'a DeviceId, &'a DeviceState)>,
) -> Result<u64, AlertError> {
    // Sorted and deduplicated, so that concurrent writers lock rows in the same order and one
    // statement never touches a row twice.
    let states: BTreeMap<&DeviceId, &DeviceState> = states.into_iter().collect();
    let (empty, kept): (Vec<_>, Vec<_>) = states.into_iter().partition(|(_, s)| s.is_empty());
    let mut written = 0;
    if !kept.is_empty() {
        let users: Vec<&str> = kept.iter().map(|(d, _)| d.user.as_str()).collect();
        let names: Vec<&str> = kept.iter().map(|(d, _)| d.device.as_str()).collect();
        let values: Vec<serde_json::Value> = kept.iter().map(|(_, s)| s.to_json()).collect();
        written += tx
            .execute_typed(
                "INSERT INTO alert_state (user_id, device_id, state)
                 SELECT u, d, s FROM unnest($1::text[], $2::text[], $3::jsonb[]) AS v(u, d, s)
                 ORDER BY u, d
                 ON CONFLICT (user_id, device_id)
                 DO UPDATE SET state = EXCLUDED.state, updated_at = now()",
                &[
                    (&users, Type::TEXT_ARRAY),
                    (&names, Type::TEXT_ARRAY),
                    (&values, Type::JSONB_ARRAY),
                ],
            )
            .await
            .map_err(step("saving alert state"))?;
    }
    if !empty.is_empty() {
        let users: Vec<&str> = empty.iter().map(|(d, _)| d.user.as_str()).collect();
        let names: Vec<&str> = empty.iter().map(|(d, _)| d.device.as_str()).collect();
        written += tx
            .execute_typed(
                "DELETE FROM alert_state s
                 USING unnest($1::text[], $2::text[]) AS d(u, dev)
                 WHERE s.user_id = d.u AND s.device_id = d.dev",
                &[(&users, Type::TEXT_ARRAY), (&names, Type::TEXT_ARRAY)],
            )
            .await
            .map_err(step("deleting empty alert state"))?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;

    use super::*;

    fn reading(device: &DeviceId, partition: i32, offset: i64, second: i64) -> Reading<'_> {
        Reading {
            device,
            payload: b"{}",
            time: DateTime::from_timestamp(1_764_000_000 + second, 0).unwrap(),
            partition,
            offset,
        }
    }

    #[test]
    fn a_devices_readings_from_two_partitions_are_evaluated_in_time_order() {
        let a = DeviceId::new("alice", "thermo-1").unwrap();
        let b = DeviceId::new("bob", "thermo-2").unwrap();
        // As a batch holds them: partition 7's records, then partition 2's.
        let batch = [
            reading(&a, 7, 100, 3),
            reading(&b, 7, 101, 1),
            reading(&a, 7, 102, 5),
            reading(&a, 2, 40, 1),
            reading(&a, 2, 41, 4),
        ];
        assert_eq!(evaluation_order(&batch), [3, 0, 4, 2, 1]);
    }

    #[test]
    fn within_a_partition_offset_order_stands_even_when_time_goes_back() {
        let a = DeviceId::new("alice", "thermo-1").unwrap();
        let batch = [
            reading(&a, 0, 1, 50),
            reading(&a, 0, 2, 10), // the device's clock was reset
            reading(&a, 0, 3, 11),
        ];
        assert_eq!(evaluation_order(&batch), [0, 1, 2]);
        // Across partitions, a partition's next reading is compared as it comes.
        let batch = [
            reading(&a, 0, 1, 50),
            reading(&a, 0, 2, 10),
            reading(&a, 1, 1, 20),
        ];
        assert_eq!(evaluation_order(&batch), [2, 0, 1]);
    }

    #[test]
    fn lock_keys_are_stable_and_tell_devices_apart() {
        let a = DeviceId::new("alice", "thermo-1").unwrap();
        assert_eq!(state_lock_key(&a), state_lock_key(&a.clone()));
        let others = [
            DeviceId::new("alice", "thermo-2").unwrap(),
            DeviceId::new("alicet", "hermo-1").unwrap(),
        ];
        for other in others {
            assert_ne!(state_lock_key(&other), state_lock_key(&a));
        }
    }
}
