//! Opaque page cursors for keyset pagination.
//!
//! A cursor holds the sort key of the last row of a page; the next page starts strictly after
//! it. Sort keys are unique per row, so no row is skipped or repeated across pages even when rows
//! share a timestamp, and new rows arriving meanwhile do not shift later pages (unlike OFFSET):
//!
//! - telemetry: `(received_at, kafka_partition, kafka_offset)`, newest first; a Kafka position is
//!   stored once, so the triple is unique;
//! - alerts: `(occurred_at, id)`, newest first;
//! - devices: `device_id`, in name order.
//!
//! The encoding (a version byte, a kind byte, the fields big-endian, as hex) is not part of the
//! API: callers pass `next_cursor` back unchanged, and a cursor from one listing is refused by
//! another.

use chrono::{DateTime, Utc};

const VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cursor {
    Telemetry {
        received_at: DateTime<Utc>,
        partition: i32,
        offset: i64,
    },
    Alert {
        occurred_at: DateTime<Utc>,
        id: i64,
    },
    Device {
        device: String,
    },
}

impl Cursor {
    fn kind(&self) -> u8 {
        match self {
            Cursor::Telemetry { .. } => b't',
            Cursor::Alert { .. } => b'a',
            Cursor::Device { .. } => b'd',
        }
    }

    /// Which listing the cursor pages through, for error messages.
    pub fn listing(&self) -> &'static str {
        match self {
            Cursor::Telemetry { .. } => "telemetry",
            Cursor::Alert { .. } => "alerts",
            Cursor::Device { .. } => "devices",
        }
    }

    pub fn encode(&self) -> String {
        let mut bytes = vec![VERSION, self.kind()];
        match self {
            Cursor::Telemetry {
                received_at,
                partition,
                offset,
            } => {
                bytes.extend(received_at.timestamp_micros().to_be_bytes());
                bytes.extend(partition.to_be_bytes());
                bytes.extend(offset.to_be_bytes());
            }
            Cursor::Alert { occurred_at, id } => {
                bytes.extend(occurred_at.timestamp_micros().to_be_bytes());
                bytes.extend(id.to_be_bytes());
            }
            Cursor::Device { device } => bytes.extend(device.as_bytes()),
        }
        to_hex(&bytes)
    }

    /// Decodes a cursor made by [`Cursor::encode`]; the error says why it is not one.
    pub fn decode(text: &str) -> Result<Cursor, &'static str> {
        const NOT_OURS: &str = "is not a cursor from this API; pass next_cursor back unchanged";
        let bytes = from_hex(text).ok_or(NOT_OURS)?;
        let (&[version, kind], fields) = bytes.split_first_chunk::<2>().ok_or(NOT_OURS)?;
        if version != VERSION {
            return Err("comes from another version of this API; start again from the first page");
        }
        let time = |micros: &[u8]| {
            DateTime::from_timestamp_micros(i64::from_be_bytes(micros.try_into().ok()?))
        };
        let cursor = match (kind, fields.len()) {
            (b't', 20) => Cursor::Telemetry {
                received_at: time(&fields[..8]).ok_or(NOT_OURS)?,
                partition: i32::from_be_bytes(fields[8..12].try_into().map_err(|_| NOT_OURS)?),
                offset: i64::from_be_bytes(fields[12..].try_into().map_err(|_| NOT_OURS)?),
            },
            (b'a', 16) => Cursor::Alert {
                occurred_at: time(&fields[..8]).ok_or(NOT_OURS)?,
                id: i64::from_be_bytes(fields[8..].try_into().map_err(|_| NOT_OURS)?),
            },
            (b'd', 1..) => Cursor::Device {
                device: String::from_utf8(fields.to_vec()).map_err(|_| NOT_OURS)?,
            },
            _ => return Err(NOT_OURS),
        };
        Ok(cursor)
    }
}

/// Lowercase hex, for cursors and tokens: both travel in URLs and headers, where hex needs no
/// escaping.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(DIGITS[(byte >> 4) as usize] as char);
        text.push(DIGITS[(byte & 0xf) as usize] as char);
    }
    text
}

pub(crate) fn from_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    text.as_bytes()
        .chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_cursor_survives_a_round_trip() {
        let at = DateTime::from_timestamp_micros(1_764_000_000_123_456).unwrap();
        for cursor in [
            Cursor::Telemetry {
                received_at: at,
                partition: 7,
                offset: 1 << 40,
            },
            Cursor::Alert {
                occurred_at: at,
                id: 42,
            },
            Cursor::Device {
                device: "thermo-1/ü".into(),
            },
        ] {
            assert_eq!(Cursor::decode(&cursor.encode()), Ok(cursor));
        }
    }

    #[test]
    fn tampered_or_foreign_cursors_are_refused() {
        let good = Cursor::Alert {
            occurred_at: DateTime::from_timestamp_micros(0).unwrap(),
            id: 1,
        }
        .encode();
        for bad in ["", "zz", "0174", &good[..good.len() - 2], "02740000"] {
            assert!(Cursor::decode(bad).is_err(), "{bad}");
        }
        assert!(Cursor::decode("0274")
            .unwrap_err()
            .contains("another version"));
    }

    #[test]
    fn hex_round_trips_and_rejects_non_hex() {
        assert_eq!(to_hex(&[0x00, 0xab, 0xff]), "00abff");
        assert_eq!(from_hex("00ABff"), Some(vec![0x00, 0xab, 0xff]));
        assert_eq!(from_hex("0g"), None);
        assert_eq!(from_hex("abc"), None);
    }
}
