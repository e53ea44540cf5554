//! Writing alert events and device state inside the caller's transaction.
//!
//! The worker calls these in the transaction that stores a batch, so alerts, rule state, rows
//! and Kafka offsets commit together or not at all. Each is one statement with array
//! parameters (`query_typed`, no named statements), which PgBouncer's transaction mode allows.

use std::collections::{BTreeMap, HashMap};

use telemetry_core::contract::DeviceId;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Transaction;

use crate::engine::{AlertEvent, DeviceState};
use crate::error::{step, AlertError};

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

/// Loads the rule state of each device; a device without stored state gets an empty one. A
/// stored state that cannot be read (e.g. edited by hand) is logged and replaced by an empty
/// one, rather than stopping the partition.
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
    let rows = tx
        .query_typed(
            "SELECT s.user_id, s.device_id, s.state
             FROM unnest($1::text[], $2::text[]) AS d(u, dev)
             JOIN alert_state s ON s.user_id = d.u AND s.device_id = d.dev",
            &[(&users, Type::TEXT_ARRAY), (&names, Type::TEXT_ARRAY)],
        )
        .await
        .map_err(step("loading alert state"))?;
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
