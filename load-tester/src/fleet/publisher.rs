//! Hands each message to rumqttc when the timetable says it is due.
//!
//! The publisher never waits for the broker, only for due times; when rumqttc's request queue is
//! full it retries shortly after, and the delay shows up as lateness at the driver. It stops
//! early when shutdown is asked for or the driver closes the outbox.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;
use rumqttc::{AsyncClient, ClientError, QoS, Request};
use telemetry_core::Shutdown;

use super::{Outbox, Queued};
use crate::payload;
use crate::schedule::Timetable;

/// Unsubscribing from this topic marks the end of a connection's messages: rumqttc reports it
/// as an outgoing event once every publish handed over before it has been written. The topic
/// is never subscribed to, so the broker just acknowledges it.
pub(super) const END_MARKER_TOPIC: &str = "load-tester/end-of-run";

/// How long to wait before retrying when rumqttc's request queue is full: about the time the
/// event loop needs to write a few messages.
const RETRY_FULL_AFTER: Duration = Duration::from_millis(1);

#[derive(Debug)]
pub(super) struct Publisher {
    pub client: AsyncClient,
    pub outbox: Arc<Mutex<Outbox>>,
    /// Telemetry topic of each device, by local index.
    pub topics: Vec<String>,
    pub qos: QoS,
    /// When the timetable starts.
    pub start: Instant,
    /// `start` as wall-clock time since the epoch, for the payload's `ts`.
    pub wall_start: Duration,
    pub seq_start: i64,
    pub alerts: payload::AlertPlan,
    pub payload_bytes: usize,
    pub shutdown: Shutdown,
}

impl Publisher {
    pub async fn run(self, timetable: Timetable) {
        let mut rng = StdRng::from_rng(&mut rand::rng());
        let mut json = String::with_capacity(self.payload_bytes.max(128) + 32);
        'timetable: for slot in timetable {
            let due = self.start + slot.due;
            tokio::select! {
                biased;
                _ = self.shutdown.wait() => break,
                _ = tokio::time::sleep_until(due.into()) => {}
            }
            let ts_ms = (self.wall_start + slot.due).as_millis() as i64;
            let alert = self.alerts.is_alert(slot.device, slot.k);
            payload::write(
                &mut json,
                ts_ms,
                self.seq_start + slot.k as i64,
                alert,
                self.payload_bytes,
                &mut rng,
            );
            let mut bytes = json.as_bytes().to_vec();
            loop {
                {
                    let mut outbox = self.outbox.lock().unwrap();
                    if outbox.closed {
                        break 'timetable;
                    }
                    match self.client.try_publish(
                        self.topics[slot.local].as_str(),
                        self.qos,
                        false,
                        bytes,
                    ) {
                        Ok(()) => {
                            outbox.queued.push_back(Queued {
                                local: slot.local,
                                k: slot.k,
                                due,
                            });
                            break;
                        }
                        // Topics were checked against the contract up front, so a refusal means
                        // the queue is full.
                        Err(
                            ClientError::TryRequest(Request::Publish(p))
                            | ClientError::Request(Request::Publish(p)),
                        ) => {
                            bytes = p.payload.to_vec();
                        }
                        Err(_) => break 'timetable,
                    }
                }
                if self.shutdown.is_triggered() {
                    break 'timetable;
                }
                tokio::time::sleep(RETRY_FULL_AFTER).await;
            }
        }
        self.finish().await;
    }

    /// Queues the end marker after the last publish, so the driver knows when everything
    /// handed over has been written.
    async fn finish(&self) {
        loop {
            {
                let mut outbox = self.outbox.lock().unwrap();
                if outbox.closed || self.client.try_unsubscribe(END_MARKER_TOPIC).is_ok() {
                    outbox.finished = true;
                    return;
                }
            }
            tokio::time::sleep(RETRY_FULL_AFTER).await;
        }
    }
}
