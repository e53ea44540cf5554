//! Exactly once from device to row, for readings that carry `seq`.
//!
//! The sink stores each Kafka record once (see [`crate::sink`]), but one reading can reach
//! Kafka as two records: MQTT delivers a message again when the bridge crashed or lost its
//! connection before acknowledging it (or Vector did), and a device that missed its PUBACK
//! publishes again. Guarantee: a reading that carries `seq` is stored, and its alerts are
//! evaluated, once, whichever copy comes first. Two readings are the same when their user,
//! device, `seq` and payload are equal, so a device that restarts its sequence (after a
//! reboot) still has every new reading stored. Readings without `seq` stay at-least-once:
//! nothing tells a copy from a reading that happens to be equal.
//!
//! The common path costs one primary-key read and one upsert per device per batch, not a
//! look-up per reading: `device_sequences` holds each device's highest stored `seq`, and a
//! reading above it, in order, is new. Only the others (a copy, a late reading, a sequence
//! restarted) are looked up in `raw_telemetry`, by the partial index on (user, device, seq).
//! All of it runs in the batch's transaction, after its partitions are locked: one device's
//! readings stay in one partition, so no other replica stores that device meanwhile.

use std::collections::{HashMap, HashSet};

use telemetry_core::contract::DeviceId;
use tokio_postgres::types::Type;
use tokio_postgres::Transaction;

use crate::record::Row;
use crate::sink::SinkError;

/// The rows without the copies of readings already stored, or stored earlier in `rows`; the
/// second value counts the copies dropped.
pub async fn drop_copies<'a>(
    tx: &Transaction<'_>,
    rows: Vec<&'a Row>,
) -> Result<(Vec<&'a Row>, usize), SinkError> {
    let devices = devices_with_seq(&rows);
    if devices.is_empty() {
        return Ok((rows, 0));
    }
    let mut highest = highest_stored(tx, &devices).await?;
    // Readings of this batch by (device, seq), to catch two copies in one batch.
    let mut in_batch: HashMap<(&DeviceId, i64), Vec<&[u8]>> = HashMap::new();
    let mut copies: HashSet<usize> = HashSet::new();
    let mut suspects: Vec<usize> = Vec::new();
    for (index, row) in rows.iter().enumerate() {
        let Some(seq) = row.seq else { continue };
        let seen = in_batch.entry((&row.device, seq)).or_default();
        if seen.contains(&&row.payload[..]) {
            copies.insert(index);
            continue;
        }
        seen.push(&row.payload);
        match highest.get(&row.device) {
            Some(&high) if seq <= high => suspects.push(index),
            _ => {
                highest.insert(&row.device, seq);
            }
        }
    }
    copies.extend(stored_already(tx, &rows, &suspects).await?);
    let dropped = copies.len();
    let kept = rows
        .into_iter()
        .enumerate()
        .filter(|(index, _)| !copies.contains(index))
        .map(|(_, row)| row)
        .collect();
    Ok((kept, dropped))
}

/// Moves each device's highest stored `seq` up to the highest of `stored`.
pub async fn advance_sequences<'a>(
    tx: &Transaction<'_>,
    stored: impl Iterator<Item = &'a Row>,
) -> Result<(), SinkError> {
    let mut highest: HashMap<&DeviceId, i64> = HashMap::new();
    for row in stored {
        if let Some(seq) = row.seq {
            let high = highest.entry(&row.device).or_insert(seq);
            *high = (*high).max(seq);
        }
    }
    if highest.is_empty() {
        return Ok(());
    }
    let mut highest: Vec<(&DeviceId, i64)> = highest.into_iter().collect();
    // A fixed order, so two replicas updating the same devices cannot deadlock.
    highest.sort();
    let users: Vec<&str> = highest.iter().map(|(d, _)| d.user.as_str()).collect();
    let devices: Vec<&str> = highest.iter().map(|(d, _)| d.device.as_str()).collect();
    let seqs: Vec<i64> = highest.iter().map(|(_, seq)| *seq).collect();
    tx.query_typed(
        "INSERT INTO device_sequences AS s (user_id, device_id, max_seq)
         SELECT * FROM unnest($1::text[], $2::text[], $3::int8[])
         ON CONFLICT (user_id, device_id) DO UPDATE SET max_seq = EXCLUDED.max_seq
         WHERE s.max_seq < EXCLUDED.max_seq",
        &[
            (&users, Type::TEXT_ARRAY),
            (&devices, Type::TEXT_ARRAY),
            (&seqs, Type::INT8_ARRAY),
        ],
    )
    .await
    .map_err(crate::sink::step("advancing device sequences"))?;
    Ok(())
}

fn devices_with_seq<'a>(rows: &[&'a Row]) -> Vec<&'a DeviceId> {
    let mut devices: Vec<&DeviceId> = rows
        .iter()
        .filter(|row| row.seq.is_some())
        .map(|row| &row.device)
        .collect();
    devices.sort();
    devices.dedup();
    devices
}

async fn highest_stored<'a>(
    tx: &Transaction<'_>,
    devices: &[&'a DeviceId],
) -> Result<HashMap<&'a DeviceId, i64>, SinkError> {
    let users: Vec<&str> = devices.iter().map(|d| d.user.as_str()).collect();
    let names: Vec<&str> = devices.iter().map(|d| d.device.as_str()).collect();
    let found = tx
        .query_typed(
            "SELECT v.i, s.max_seq
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS v(u, d, i)
             JOIN device_sequences AS s ON s.user_id = v.u AND s.device_id = v.d",
            &[(&users, Type::TEXT_ARRAY), (&names, Type::TEXT_ARRAY)],
        )
        .await
        .map_err(crate::sink::step("reading device sequences"))?;
    Ok(found
        .iter()
        .map(|row| {
            let ordinal: i64 = row.get(0);
            (devices[(ordinal - 1) as usize], row.get(1))
        })
        .collect())
}

/// Of `suspects` (indexes into `rows`), those whose reading is in `raw_telemetry` already.
async fn stored_already(
    tx: &Transaction<'_>,
    rows: &[&Row],
    suspects: &[usize],
) -> Result<Vec<usize>, SinkError> {
    if suspects.is_empty() {
        return Ok(Vec::new());
    }
    let users: Vec<&str> = suspects
        .iter()
        .map(|&i| rows[i].device.user.as_str())
        .collect();
    let devices: Vec<&str> = suspects
        .iter()
        .map(|&i| rows[i].device.device.as_str())
        .collect();
    let seqs: Vec<Option<i64>> = suspects.iter().map(|&i| rows[i].seq).collect();
    let payloads: Vec<&str> = suspects
        .iter()
        .map(|&i| crate::sink::payload_text(&rows[i].payload))
        .collect();
    let found = tx
        .query_typed(
            "SELECT v.i FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[])
                 WITH ORDINALITY AS v(u, d, s, p, i)
             WHERE EXISTS (SELECT 1 FROM raw_telemetry AS t
                           WHERE t.user_id = v.u AND t.device_id = v.d AND t.seq = v.s
                             AND t.seq IS NOT NULL
                             AND t.payload = v.p::jsonb)",
            &[
                (&users, Type::TEXT_ARRAY),
                (&devices, Type::TEXT_ARRAY),
                (&seqs, Type::INT8_ARRAY),
                (&payloads, Type::TEXT_ARRAY),
            ],
        )
        .await
        .map_err(crate::sink::step("looking up readings stored already"))?;
    Ok(found
        .iter()
        .map(|row| suspects[(row.get::<_, i64>(0) - 1) as usize])
        .collect())
}
