//! Binary COPY encoding for `raw_telemetry`.
//!
//! The rows of a batch are encoded into one contiguous buffer and sent as a few 64 KiB chunks.
//! tokio-postgres' `BinaryCopyInWriter` instead hands every row to the connection task through
//! a channel and flushes about 4 KiB at a time: measured in `make bench-worker`, that costs
//! about twice the client CPU per row (1.0 against 0.6 us), while on one connection PostgreSQL,
//! not the client, bounds the rate of both (see `docs/performance.md`). The CPU saved is what
//! the reader needs to decode the next batch. Encoding by hand is a few lines per type, and the
//! format is fixed by PostgreSQL's protocol
//! (<https://www.postgresql.org/docs/15/sql-copy.html>, "Binary Format").

use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, Utc};

use crate::record::Row;

/// The statement the buffer is written for; column order must match [`encode_row`].
pub const COPY_RAW_TELEMETRY: &str = "COPY raw_telemetry (device_time, received_at, user_id, \
     device_id, seq, payload, kafka_partition, kafka_offset) FROM STDIN (FORMAT binary)";

const COLUMNS: i16 = 8;
const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 UTC).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;
/// `jsonb` binary format version, the only one PostgreSQL defines.
const JSONB_VERSION: u8 = 1;

/// Size of the CopyData messages a buffer is sent in. One message of the whole batch (about
/// 200 KiB) makes PostgreSQL wait for all of it before parsing a row; chunks let it parse
/// while the rest arrives, and slicing `Bytes` copies nothing.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// The buffer cut into [`CHUNK_BYTES`] pieces, without copying.
pub fn chunks(buffer: Bytes) -> impl Iterator<Item = Bytes> {
    (0..buffer.len())
        .step_by(CHUNK_BYTES)
        .map(move |start| buffer.slice(start..(start + CHUNK_BYTES).min(buffer.len())))
}

/// Encodes rows into one COPY stream: header, tuples, trailer.
pub fn encode<'a>(rows: impl IntoIterator<Item = &'a Row>) -> Bytes {
    let rows = rows.into_iter();
    let mut buf = BytesMut::with_capacity(19 + rows.size_hint().0 * 256);
    buf.put_slice(SIGNATURE);
    buf.put_i32(0); // flags: no OIDs
    buf.put_i32(0); // header extension length
    for row in rows {
        encode_row(&mut buf, row);
    }
    buf.put_i16(-1);
    buf.freeze()
}

fn encode_row(buf: &mut BytesMut, row: &Row) {
    buf.put_i16(COLUMNS);
    put_timestamp(buf, row.device_time);
    put_timestamp(buf, Some(row.received_at));
    put_text(buf, &row.device.user);
    put_text(buf, &row.device.device);
    match row.seq {
        Some(seq) => {
            buf.put_i32(8);
            buf.put_i64(seq);
        }
        None => buf.put_i32(-1),
    }
    buf.put_i32(1 + row.payload.len() as i32);
    buf.put_u8(JSONB_VERSION);
    buf.put_slice(&row.payload);
    buf.put_i32(4);
    buf.put_i32(row.partition);
    buf.put_i32(8);
    buf.put_i64(row.offset);
}

fn put_timestamp(buf: &mut BytesMut, time: Option<DateTime<Utc>>) {
    match time {
        Some(time) => {
            buf.put_i32(8);
            buf.put_i64(time.timestamp_micros() - PG_EPOCH_OFFSET_MICROS);
        }
        None => buf.put_i32(-1),
    }
}

fn put_text(buf: &mut BytesMut, text: &str) {
    buf.put_i32(text.len() as i32);
    buf.put_slice(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_buffer_in_order_and_in_bounded_pieces() {
        let buffer = Bytes::from(
            (0..(2 * CHUNK_BYTES + 10))
                .map(|i| i as u8)
                .collect::<Vec<_>>(),
        );
        let pieces: Vec<Bytes> = chunks(buffer.clone()).collect();
        assert_eq!(
            pieces.iter().map(Bytes::len).collect::<Vec<_>>(),
            [CHUNK_BYTES, CHUNK_BYTES, 10]
        );
        assert_eq!(pieces.concat(), buffer.to_vec());
        assert_eq!(chunks(Bytes::new()).count(), 0);
    }
}
