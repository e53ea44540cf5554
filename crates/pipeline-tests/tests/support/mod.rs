//! What the poison and security tests share: a device that speaks MQTT 5 byte by byte, and a
//! Mosquitto with the local stack's password file and access rules.
//!
//! The device is hand-written rather than a client library because the tests must send what a
//! library refuses to send (a topic with `+`, invalid UTF-8, a packet larger than the broker's
//! Maximum Packet Size) and must see the reason code the broker answers with.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use test_servers::{unique_name, Mosquitto};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long the broker may take to answer one packet.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// The stack's access rules, as scripts/stack.sh gives them to Mosquitto.
pub fn acl_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/mosquitto-acl.conf")
}

/// Writes a Mosquitto password file for `users` (name, password) with `mosquitto_passwd`, as
/// scripts/stack.sh does. Returns where, or the tool's complaint for a name it refuses.
pub fn password_file(users: &[(&str, &str)]) -> Result<PathBuf, String> {
    let path = test_servers::log_dir().join(format!("{}.passwd", unique_name("passwd")));
    for (i, (user, password)) in users.iter().enumerate() {
        let mut command = Command::new("mosquitto_passwd");
        if i == 0 {
            command.arg("-c");
        }
        let output = command
            .arg("-b")
            .arg(&path)
            .args([user, password])
            .output()
            .expect("mosquitto_passwd (sudo apt-get install -y mosquitto)");
        if !output.status.success() {
            return Err(format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    Ok(path)
}

/// A private Mosquitto configured like the local stack's: no anonymous clients, a password per
/// user, and scripts/mosquitto-acl.conf.
pub fn broker_with_access_rules(users: &[(&str, &str)]) -> Mosquitto {
    let passwords = password_file(users).expect("password file");
    Mosquitto::start_with_config(&format!(
        "allow_anonymous false\npassword_file {}\nacl_file {}\n",
        passwords.display(),
        acl_file().display()
    ))
    .expect("private Mosquitto with access rules")
}

/// MQTT 5 reason codes the tests meet (MQTT 5.0, section 2.4).
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    pub const MALFORMED_PACKET: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
}

/// What the broker answered to one QoS 1 PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// PUBACK with this reason code (0x00 and 0x10 are successes).
    PubAck(u8),
    /// DISCONNECT with this reason code; the connection is gone.
    Disconnect(u8),
    /// The broker closed the connection without a DISCONNECT.
    Closed,
}

impl Answer {
    /// Whether the broker took the message.
    pub fn accepted(self) -> bool {
        matches!(self, Answer::PubAck(code) if code < 0x80)
    }
}

/// One device connection speaking MQTT 5, publishing QoS 1 one message at a time.
#[derive(Debug)]
pub struct Device {
    stream: TcpStream,
    next_packet_id: u16,
}

/// Appends an MQTT variable byte integer.
fn push_varint(out: &mut Vec<u8>, mut value: usize) {
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if value == 0 {
            return;
        }
    }
}

fn push_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn packet(first_byte: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(first_byte);
    push_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

impl Device {
    /// Connects with Clean Start and the given login; returns the CONNACK reason code when the
    /// broker refuses.
    pub async fn connect(port: u16, login: Option<(&str, &str)>) -> Result<Device, u8> {
        Self::connect_as(port, &unique_name("device"), login).await
    }

    pub async fn connect_as(
        port: u16,
        client_id: &str,
        login: Option<(&str, &str)>,
    ) -> Result<Device, u8> {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("tcp connect to the broker");
        stream.set_nodelay(true).unwrap();
        let mut body = Vec::new();
        push_bytes(&mut body, b"MQTT");
        body.push(5);
        let mut flags = 0x02; // Clean Start
        if login.is_some() {
            flags |= 0x80 | 0x40;
        }
        body.push(flags);
        body.extend_from_slice(&30u16.to_be_bytes()); // keep-alive
        body.push(0); // no properties
        push_bytes(&mut body, client_id.as_bytes());
        if let Some((user, password)) = login {
            push_bytes(&mut body, user.as_bytes());
            push_bytes(&mut body, password.as_bytes());
        }
        let mut device = Device {
            stream,
            next_packet_id: 1,
        };
        device
            .stream
            .write_all(&packet(0x10, &body))
            .await
            .expect("send CONNECT");
        match device.read_packet().await {
            Some((0x20, body)) if body.len() >= 2 && body[1] == 0 => Ok(device),
            Some((0x20, body)) if body.len() >= 2 => Err(body[1]),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Publishes with QoS 1 and returns the broker's answer. The packet is written while the
    /// answer is read, so a broker that refuses a large packet half way is heard.
    pub async fn publish(&mut self, topic: &[u8], payload: &[u8]) -> Answer {
        let packet_id = self.next_packet_id;
        self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
        let mut body = Vec::with_capacity(payload.len() + topic.len() + 8);
        push_bytes(&mut body, topic);
        body.extend_from_slice(&packet_id.to_be_bytes());
        body.push(0); // no properties
        body.extend_from_slice(payload);
        let bytes = packet(0x32, &body);
        let (mut reader, mut writer) = self.stream.split();
        let write = async {
            // A broker that stops reading (and closes) mid-packet is an answer, not a failure.
            let _ = writer.write_all(&bytes).await;
            std::future::pending::<()>().await
        };
        let read = async {
            loop {
                match read_packet_from(&mut reader).await {
                    Some((0x40, body)) if body.len() >= 2 => {
                        let id = u16::from_be_bytes([body[0], body[1]]);
                        assert_eq!(id, packet_id, "PUBACK for another packet");
                        return Answer::PubAck(body.get(2).copied().unwrap_or(0));
                    }
                    Some((0xE0, body)) => {
                        return Answer::Disconnect(body.first().copied().unwrap_or(0))
                    }
                    Some(_) => continue,
                    None => return Answer::Closed,
                }
            }
        };
        let answer = tokio::select! {
            answer = read => answer,
            _ = write => unreachable!(),
        };
        answer
    }

    /// Subscribes to `filter` with QoS 0 and returns the SUBACK's reason code.
    pub async fn subscribe(&mut self, filter: &str) -> u8 {
        let packet_id = self.next_packet_id;
        self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
        let mut body = Vec::new();
        body.extend_from_slice(&packet_id.to_be_bytes());
        body.push(0); // no properties
        push_bytes(&mut body, filter.as_bytes());
        body.push(0); // QoS 0
        self.stream
            .write_all(&packet(0x82, &body))
            .await
            .expect("send SUBSCRIBE");
        match self.read_packet().await {
            // Packet id, properties length (0 from Mosquitto), then one code per filter.
            Some((0x90, body)) if body.len() >= 4 => body[body.len() - 1],
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// The next message the broker delivers: its topic and payload. Panics when none comes in
    /// time; `None` when the broker closed the connection.
    pub async fn next_message(&mut self) -> Option<(String, Vec<u8>)> {
        loop {
            let (kind, body) = self.read_packet().await?;
            if kind == 0x30 {
                return Some(publish_parts(&body));
            }
        }
    }

    /// Sends PINGREQ and returns the messages that arrive before the PINGRESP: the broker answers
    /// in order, so whatever it had queued for this client by then is among them.
    pub async fn messages_before_ping(&mut self) -> Vec<(String, Vec<u8>)> {
        self.stream
            .write_all(&[0xC0, 0])
            .await
            .expect("send PINGREQ");
        let mut messages = Vec::new();
        loop {
            match self.read_packet().await {
                Some((0xD0, _)) => return messages,
                Some((0x30, body)) => messages.push(publish_parts(&body)),
                Some(_) => {}
                None => panic!("the broker closed the connection before PINGRESP"),
            }
        }
    }

    /// Sends DISCONNECT (normal) and closes.
    pub async fn disconnect(mut self) {
        let _ = self.stream.write_all(&[0xE0, 0]).await;
        let _ = self.stream.shutdown().await;
    }

    async fn read_packet(&mut self) -> Option<(u8, Vec<u8>)> {
        read_packet_from(&mut self.stream).await
    }
}

/// The topic and payload of a QoS 0 PUBLISH (as subscribed): topic, properties, payload.
fn publish_parts(body: &[u8]) -> (String, Vec<u8>) {
    let length = u16::from_be_bytes([body[0], body[1]]) as usize;
    let topic = String::from_utf8_lossy(&body[2..2 + length]).into_owned();
    let mut at = 2 + length;
    let mut properties = 0usize;
    let mut shift = 0;
    loop {
        let byte = body[at];
        at += 1;
        properties |= ((byte & 0x7F) as usize) << shift;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    (topic, body[at + properties..].to_vec())
}

/// Reads one packet: its first byte's type nibble (shifted back into place) and its body.
/// `None` when the connection closes; panics when nothing arrives in time.
async fn read_packet_from<R: AsyncReadExt + Unpin>(reader: &mut R) -> Option<(u8, Vec<u8>)> {
    let read = async {
        let first = reader.read_u8().await.ok()?;
        let mut length = 0usize;
        let mut shift = 0;
        loop {
            let byte = reader.read_u8().await.ok()?;
            length |= ((byte & 0x7F) as usize) << shift;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).await.ok()?;
        Some((first & 0xF0, body))
    };
    tokio::time::timeout(ANSWER_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| panic!("the broker sent nothing within {ANSWER_TIMEOUT:?}"))
}
