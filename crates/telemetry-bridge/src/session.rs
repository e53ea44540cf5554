//! The MQTT session's driver: the one task that polls rumqttc's event loop.
//!
//! rumqttc answers pings, sends the acknowledgements queued by the client and notices a dead
//! peer only while its event loop is polled, so this task does nothing else: it never waits on
//! Kafka, on the acknowledger or on the forwarder. Every incoming packet goes into an unbounded
//! channel, tagged with the number of the connection it arrived on. The channel's length is
//! bounded by the broker, not by the bridge: the broker sends at most Receive Maximum
//! messages the bridge has not acknowledged, and a broker that overshoots it (Mosquitto 2.0.11
//! on a session resume, eclipse-mosquitto/mosquitto#2301) sends at most the messages it holds
//! in flight for the session. The bridge holds them all rather than stop reading the socket,
//! which would silence keep-alive and make the broker cut the session and deliver everything in
//! flight again. `telemetry_bridge_held_messages` shows how many it holds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use telemetry_core::backoff::Backoff;
use telemetry_core::Shutdown;
use tokio::sync::mpsc;

use crate::{metrics, Progress};

/// How long the final DISCONNECT may take to reach the broker.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What the driver reports.
// Nearly every event is a packet: boxing it to shrink the rare `Lost` would cost an allocation
// per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum SessionEvent {
    /// A packet from the broker, on connection number `connection`.
    Packet { connection: u64, packet: Packet },
    /// The connection was lost; the driver reconnects by itself after `retry_in`.
    Lost { error: String, retry_in: Duration },
}

/// Counts MQTT connections. A packet id is only meaningful on the connection that used it: after
/// a reconnect the broker sends the unacknowledged messages again and may give a freed id to a
/// new message, so an acknowledgement for a message of an earlier connection is skipped (the
/// message's second delivery is acknowledged instead) rather than risk acknowledging another.
#[derive(Debug, Clone, Default)]
pub struct Connections(Arc<AtomicU64>);

impl Connections {
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    fn ended(&self) -> u64 {
        self.0.fetch_add(1, Ordering::AcqRel) + 1
    }
}

/// Starts [`drive`] on a thread of its own with a runtime of its own: the forwarder and the
/// acknowledger share the bridge's runtime, and under a flood of messages they would otherwise
/// take turns with the driver, which then reads the socket, answers pings and sends
/// acknowledgements only as fast as they work.
pub(crate) fn spawn(
    eventloop: EventLoop,
    client: AsyncClient,
    events: mpsc::UnboundedSender<SessionEvent>,
    connections: Connections,
    progress: Progress,
    stop: Shutdown,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("mqtt-session".into())
        .spawn(move || {
            runtime.block_on(drive(
                eventloop,
                client,
                events,
                connections,
                progress,
                stop,
            ))
        })
}

/// Polls the event loop until `stop`, then sends DISCONNECT and polls until it is out.
async fn drive(
    mut eventloop: EventLoop,
    client: AsyncClient,
    events: mpsc::UnboundedSender<SessionEvent>,
    connections: Connections,
    progress: Progress,
    stop: Shutdown,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut connection = connections.current();
    loop {
        let polled = tokio::select! {
            biased;
            _ = stop.wait() => break,
            polled = eventloop.poll() => polled,
        };
        match polled {
            Ok(Event::Incoming(packet)) => {
                match &packet {
                    Packet::ConnAck(_) => backoff.reset(),
                    // Counted here, the moment it arrives, so that the acknowledger's pacing
                    // sees every message the broker has sent.
                    // The broker's own counters: recorded here, never forwarded to Kafka.
                    Packet::Publish(publish) if publish.topic.starts_with(b"$SYS/") => {
                        metrics::broker_stat(&publish.topic, &publish.payload);
                        continue;
                    }
                    Packet::Publish(publish) => {
                        progress.received();
                        metrics::received();
                        if publish.dup {
                            metrics::redelivered();
                        }
                    }
                    _ => {}
                }
                // The receiver is gone only when the bridge is stopping; keep polling so
                // that the acknowledgements still queued reach the broker.
                let _ = events.send(SessionEvent::Packet { connection, packet });
            }
            Ok(Event::Outgoing(_)) => {}
            Err(error) => {
                connection = connections.ended();
                let retry_in = backoff.next_delay();
                let _ = events.send(SessionEvent::Lost {
                    error: error.to_string(),
                    retry_in,
                });
                tokio::select! {
                    biased;
                    _ = stop.wait() => break,
                    _ = tokio::time::sleep(retry_in) => {}
                }
            }
        }
    }
    disconnect(eventloop, client).await;
}

async fn disconnect(mut eventloop: EventLoop, client: AsyncClient) {
    if client.try_disconnect().is_err() {
        return;
    }
    let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}
