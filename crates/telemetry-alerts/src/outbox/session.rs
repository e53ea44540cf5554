//! A minimal MQTT 3.1.1 client for publishing with QoS 2 under packet ids the caller chooses.
//!
//! The outbox needs two things a general client library keeps to itself: the packet id of
//! each publish (it is derived from the alert's row, so a publisher that crashed can be
//! succeeded by one that resends the same id), and control over when PUBREL goes out (only
//! after the outbox has recorded that it may have). So it speaks the four packets of the QoS 2
//! exchange itself, over rumqttc's packet codec, on a persistent session (`clean_session`
//! off) whose broker-side state outlives the connection.
//!
//! A connection never reconnects by itself, so a publisher that lost its partition cannot
//! disturb the session's next owner; the publisher keeps it between rounds and checks it with
//! [`Session::reusable`] before using it again.

use std::collections::HashSet;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::Error as CodecError;
use rumqttc::{Connect, ConnectReturnCode, Packet, PubRel, Publish, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use telemetry_core::config::Secret;

use super::config::MqttConfig;

/// Largest packet accepted from the broker; it only sends small acknowledgements.
const MAX_INCOMING: usize = 64 * 1024;
/// Largest packet sent; an alert body is far smaller.
const MAX_OUTGOING: usize = 1024 * 1024;

/// One message of an exchange.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub pkid: u16,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// An open connection on the persistent session `client_id`.
#[derive(Debug)]
pub struct Session {
    stream: TcpStream,
    read: BytesMut,
    write: BytesMut,
    /// False when the broker had no state for this client id: whatever an earlier owner left
    /// half-done is unknown to it.
    pub session_present: bool,
    /// When the broker last answered.
    last_used: Instant,
}

impl Session {
    /// Connects and waits for the broker's CONNACK, all before `deadline`.
    pub async fn connect(
        config: &MqttConfig,
        client_id: &str,
        deadline: Instant,
    ) -> Result<Session, String> {
        let address = format!("{}:{}", config.host, config.port);
        let stream = tokio::time::timeout_at(deadline, TcpStream::connect(&address))
            .await
            .map_err(|_| format!("connecting to {address} timed out"))?
            .map_err(|error| format!("cannot connect to {address}: {error}"))?;
        // Small packets answered one exchange at a time: Nagle's algorithm would hold each
        // for the broker's delayed ACK.
        stream
            .set_nodelay(true)
            .map_err(|error| format!("cannot set TCP_NODELAY: {error}"))?;
        let mut session = Session {
            stream,
            read: BytesMut::with_capacity(4096),
            write: BytesMut::with_capacity(4096),
            session_present: false,
            last_used: Instant::now(),
        };
        let mut connect = Connect::new(client_id);
        connect.clean_session = false;
        connect.keep_alive = config.keep_alive_secs.min(u16::MAX as u64) as u16;
        if let Some(username) = &config.username {
            let password = config.password.as_ref().map(Secret::expose);
            connect.set_login(username, password.unwrap_or_default());
        }
        session.send(&[Packet::Connect(connect)], deadline).await?;
        match session.receive(deadline).await? {
            Packet::ConnAck(ack) if ack.code == ConnectReturnCode::Success => {
                session.session_present = ack.session_present;
                Ok(session)
            }
            Packet::ConnAck(ack) => Err(format!(
                "the broker refused the connection as {client_id}: {:?}",
                ack.code
            )),
            other => Err(format!("expected CONNACK, got {other:?}")),
        }
    }

    /// Publishes each message with QoS 2 and returns once the broker received them all
    /// (PUBREC). The broker holds them, undelivered, until they are released; a message
    /// published again under a packet id it still holds is recognised and not stored twice.
    pub async fn publish(
        &mut self,
        messages: Vec<Outgoing>,
        deadline: Instant,
    ) -> Result<(), String> {
        let packets: Vec<Packet> = messages
            .into_iter()
            .map(|message| {
                let mut publish = Publish::new(message.topic, QoS::ExactlyOnce, message.payload);
                publish.pkid = message.pkid;
                Packet::Publish(publish)
            })
            .collect();
        self.exchange(&packets, "PUBREC", deadline, |packet| match packet {
            Packet::PubRec(rec) => Some(rec.pkid),
            _ => None,
        })
        .await
    }

    /// Releases the messages held under these packet ids and returns once the broker
    /// confirmed each (PUBCOMP). Releasing an id the broker no longer holds is harmless: it
    /// confirms and delivers nothing.
    pub async fn release(&mut self, pkids: &[u16], deadline: Instant) -> Result<(), String> {
        let packets: Vec<Packet> = pkids
            .iter()
            .map(|&pkid| Packet::PubRel(PubRel::new(pkid)))
            .collect();
        self.exchange(&packets, "PUBCOMP", deadline, |packet| match packet {
            Packet::PubComp(comp) => Some(comp.pkid),
            _ => None,
        })
        .await
    }

    /// Sends `packets`, each carrying a packet id, and waits until the broker answered every
    /// id with the packet `answer` recognises.
    async fn exchange(
        &mut self,
        packets: &[Packet],
        expected: &str,
        deadline: Instant,
        answer: impl Fn(&Packet) -> Option<u16>,
    ) -> Result<(), String> {
        let mut waiting: HashSet<u16> = packets.iter().filter_map(packet_id).collect();
        self.send(packets, deadline).await?;
        while !waiting.is_empty() {
            let packet = self.receive(deadline).await?;
            match answer(&packet) {
                Some(pkid) => {
                    waiting.remove(&pkid);
                }
                None => return Err(format!("expected {expected}, got {packet:?}")),
            }
        }
        self.last_used = Instant::now();
        Ok(())
    }

    /// Whether this connection can carry another round: the broker has not closed it (it does
    /// when another client takes the session over), sent nothing unasked, and it was last used
    /// within `max_idle`, well inside the keep-alive the broker enforces (no PINGREQ is sent
    /// between rounds).
    pub fn reusable(&mut self, max_idle: Duration) -> bool {
        if self.last_used.elapsed() > max_idle {
            return false;
        }
        match self.stream.try_read_buf(&mut self.read) {
            Err(error) => error.kind() == std::io::ErrorKind::WouldBlock,
            // Closed (0), or data nobody asked for.
            Ok(_) => false,
        }
    }

    /// Ends the connection with DISCONNECT, which keeps the session on the broker.
    pub async fn disconnect(mut self) {
        let deadline = Instant::now() + Duration::from_secs(1);
        let _ = self.send(&[Packet::Disconnect], deadline).await;
        let _ = self.stream.shutdown().await;
    }

    async fn send(&mut self, packets: &[Packet], deadline: Instant) -> Result<(), String> {
        self.write.clear();
        for packet in packets {
            packet
                .write(&mut self.write, MAX_OUTGOING)
                .map_err(|error| format!("cannot encode an MQTT packet: {error}"))?;
        }
        tokio::time::timeout_at(deadline, self.stream.write_all(&self.write))
            .await
            .map_err(|_| "the broker did not take our packets in time".to_owned())?
            .map_err(|error| format!("lost the MQTT connection while sending: {error}"))
    }

    async fn receive(&mut self, deadline: Instant) -> Result<Packet, String> {
        loop {
            match Packet::read(&mut self.read, MAX_INCOMING) {
                Ok(Packet::PingResp) => continue,
                Ok(packet) => return Ok(packet),
                Err(CodecError::InsufficientBytes(_)) => {}
                Err(error) => return Err(format!("the broker sent a malformed packet: {error}")),
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.read))
                .await
                .map_err(|_| "the broker did not answer in time".to_owned())?
                .map_err(|error| format!("lost the MQTT connection: {error}"))?;
            if read == 0 {
                return Err("the broker closed the connection".into());
            }
        }
    }
}

fn packet_id(packet: &Packet) -> Option<u16> {
    match packet {
        Packet::Publish(publish) => Some(publish.pkid),
        Packet::PubRel(rel) => Some(rel.pkid),
        _ => None,
    }
}
