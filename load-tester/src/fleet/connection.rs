//! Drives one connection's rumqttc event loop and records what happened to each message.
//!
//! A message is *sent* when rumqttc writes it to the socket and *confirmed* when its PUBACK
//! arrives (QoS 1) or as soon as it is written (QoS 0). When the connection drops, rumqttc
//! would replay unacknowledged publishes on a resumed session, but the tester connects with a
//! clean session, so the broker keeps nothing: the driver discards everything rumqttc still
//! holds, leaving written-but-unacknowledged messages `Unconfirmed` and queued ones `NotSent`,
//! and reconnects. A message is never sent twice, so every stored duplicate is the pipeline's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, Outgoing, Packet, QoS};

use super::{ConnectionOutcome, Outbox, Queued, LATE_AFTER};
use crate::stats::{Counters, Ledger, Outcome};

/// With keep-alive pings every 5 s, an event loop that yields nothing for this long is stuck
/// (typically the broker stopped reading and the socket buffer is full).
const STALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Pause between reconnection attempts, so a broker that is down is not hammered.
const RECONNECT_DELAY: Duration = Duration::from_millis(500);

/// A connection that cannot be re-established for this long is given up, and the rest of its
/// timetable is reported as not sent.
const GIVE_UP_AFTER: Duration = Duration::from_secs(10);

/// How long to wait for the broker to take the DISCONNECT at the end.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) struct Driver {
    pub eventloop: EventLoop,
    pub client: AsyncClient,
    pub outbox: Arc<Mutex<Outbox>>,
    pub qos: QoS,
    pub drain_timeout: Duration,
    pub counters: Arc<Counters>,
    /// One per device of this connection, by local index.
    pub ledgers: Vec<Ledger>,
}

// rumqttc's EventLoop has no Debug.
impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("qos", &self.qos)
            .field("devices", &self.ledgers.len())
            .finish_non_exhaustive()
    }
}

/// Why the driver stopped polling.
enum Stop {
    /// Everything handed over was written and acknowledged.
    Drained,
    /// Some PUBACKs did not come within the drain timeout; they stay Unconfirmed.
    DrainTimedOut,
    /// The connection is gone and not worth waiting for.
    Lost,
}

impl Driver {
    pub async fn run(mut self) -> ConnectionOutcome {
        let mut outcome = ConnectionOutcome::default();
        // Written QoS 1 publishes awaiting PUBACK, by packet id.
        let mut awaiting_ack: HashMap<u16, Queued> = HashMap::new();
        let mut end_marker_written = false;
        let mut drain_deadline: Option<Instant> = None;
        let mut down_since: Option<Instant> = None;

        let stop = loop {
            if end_marker_written && awaiting_ack.is_empty() {
                break Stop::Drained;
            }
            let wait = match drain_deadline {
                Some(deadline) => deadline
                    .saturating_duration_since(Instant::now())
                    .min(STALL_TIMEOUT),
                None => STALL_TIMEOUT,
            };
            // Giving up on poll() drops a future that may be half-way through a write, so the
            // event loop is not polled again afterwards.
            let event = match tokio::time::timeout(wait, self.eventloop.poll()).await {
                Ok(event) => event,
                Err(_) if drain_deadline.is_some_and(|d| Instant::now() >= d) => {
                    break Stop::DrainTimedOut
                }
                Err(_) => {
                    self.record_error(
                        &mut outcome,
                        format!(
                            "no traffic on the connection for {}s",
                            STALL_TIMEOUT.as_secs()
                        ),
                    );
                    break Stop::Lost;
                }
            };
            let now = Instant::now();
            match event {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    let Some(message) = self.outbox.lock().unwrap().queued.pop_front() else {
                        // Every publish is queued in the outbox before rumqttc can see it.
                        continue;
                    };
                    let lag = now.saturating_duration_since(message.due);
                    outcome.lag.record(lag);
                    if lag > LATE_AFTER {
                        outcome.late += 1;
                        Counters::add(&self.counters.late, 1);
                    }
                    outcome.sent += 1;
                    outcome.last_write = Some(now);
                    Counters::add(&self.counters.sent, 1);
                    match self.qos {
                        QoS::AtMostOnce => {
                            self.ledgers[message.local].set(message.k, Outcome::Confirmed)
                        }
                        _ => {
                            self.ledgers[message.local].set(message.k, Outcome::Unconfirmed);
                            awaiting_ack.insert(pkid, message);
                        }
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(message) = awaiting_ack.remove(&ack.pkid) {
                        outcome
                            .puback
                            .record(now.saturating_duration_since(message.due));
                        self.ledgers[message.local].set(message.k, Outcome::Confirmed);
                        outcome.acked += 1;
                        Counters::add(&self.counters.acked, 1);
                    }
                }
                Ok(Event::Outgoing(Outgoing::Unsubscribe(_))) => {
                    end_marker_written = true;
                    drain_deadline = Some(now + self.drain_timeout);
                }
                Ok(Event::Incoming(Packet::ConnAck(_))) => down_since = None,
                Ok(_) => {}
                Err(e) => {
                    // One outage is one error, however many reconnection attempts it takes.
                    if down_since.is_none() {
                        self.record_error(&mut outcome, e.to_string());
                    }
                    let finished = self.discard_in_flight(&mut awaiting_ack);
                    if finished || end_marker_written {
                        // Nothing left to send, and nothing left to wait for.
                        break Stop::Lost;
                    }
                    if down_since.get_or_insert(now).elapsed() >= GIVE_UP_AFTER {
                        break Stop::Lost;
                    }
                    tokio::time::sleep(RECONNECT_DELAY).await;
                }
            }
        };

        // From here on the publisher hands over nothing more; whatever it queued but rumqttc did
        // not write stays NotSent.
        {
            let mut outbox = self.outbox.lock().unwrap();
            outbox.closed = true;
            outbox.queued.clear();
        }
        // After a timed-out poll the event loop may be mid-write, so only a cleanly drained
        // connection says goodbye; the others just close the socket.
        if let Stop::Drained = stop {
            self.disconnect().await;
        }
        outcome.ledgers = self.ledgers;
        outcome
    }

    fn record_error(&self, outcome: &mut ConnectionOutcome, error: String) {
        outcome.errors += 1;
        outcome.first_error.get_or_insert(error);
        Counters::add(&self.counters.errors, 1);
    }

    /// Forgets every message rumqttc still holds after the connection failed, and returns
    /// whether the publisher had already finished. The outbox lock keeps the publisher from
    /// handing over a message between draining rumqttc and clearing the outbox.
    fn discard_in_flight(&mut self, awaiting_ack: &mut HashMap<u16, Queued>) -> bool {
        let mut outbox = self.outbox.lock().unwrap();
        // rumqttc moved unacknowledged publishes into its pending list and would replay them;
        // with a clean session the broker has forgotten them, so a replay would be a second,
        // distinct delivery. clean() also pulls in requests still in the channel.
        self.eventloop.clean();
        self.eventloop.pending.clear();
        self.eventloop.state.collision = None;
        outbox.queued.clear();
        // Written but unacknowledged messages keep their Unconfirmed outcome.
        awaiting_ack.clear();
        outbox.finished
    }

    async fn disconnect(&mut self) {
        if self.client.try_disconnect().is_err() {
            return;
        }
        let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
            loop {
                match self.eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}
