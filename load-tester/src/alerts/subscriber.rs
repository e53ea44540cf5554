//! Subscribes to the run's alert topics and records what arrives, and when.
//!
//! Under `--mqtt-credentials-per-user` every user gets its own connection, logged in as that
//! user and subscribed to `users/{user}/devices/+/alerts` only: exactly what a device owner may
//! do on a broker with a per-user ACL, so the check also proves that each user's alerts reach
//! that user. Otherwise one connection (with `--mqtt-username`, or anonymous) subscribes to the
//! alert topics of all of the run's users.
//!
//! The subscriptions are in place (SUBACK received) before the first reading is published, so
//! no alert can be missed for being early. Sessions are persistent, as an owner who wants every
//! alert keeps them: the broker queues the alerts published while a connection is down (a broker
//! restart included, when it persists sessions) and sends them on reconnect, and the
//! subscriptions are made again too in case the broker forgot the session. An alert the broker
//! did not keep counts as not received.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeFilter, SubscribeReasonCode,
};
use telemetry_core::Shutdown;
use tokio::task::JoinSet;

use crate::config::{Config, Credentials};
use crate::Error;

/// How long to wait for the broker's CONNACK and SUBACK.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Keep-alive of the subscriber connections; short, so a dead broker is noticed quickly.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// Pause between reconnection attempts.
const RECONNECT_DELAY: Duration = Duration::from_millis(500);

/// How long to wait for the broker to take the DISCONNECT at the end.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One alert message as it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub topic: String,
    /// The message's `alert_id` and `event`; empty when it has none (not an alert message).
    pub alert_id: String,
    pub event: String,
    /// When it arrived, on the tester's clock.
    pub at: SystemTime,
}

impl Receipt {
    /// Reads `alert_id` and `event` from an alert message's JSON.
    pub fn new(topic: impl Into<String>, payload: &[u8], at: SystemTime) -> Receipt {
        let body: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
        let text = |field: &str| body[field].as_str().unwrap_or_default().to_owned();
        Receipt {
            topic: topic.into(),
            alert_id: text("alert_id"),
            event: text("event"),
            at,
        }
    }
}

/// Every alert message received so far, shared between the subscriber connections and the
/// check. Alerts are few next to readings, so one lock is no contention.
#[derive(Debug, Clone, Default)]
pub struct Receipts {
    inner: Arc<Mutex<Vec<Receipt>>>,
}

impl Receipts {
    pub fn record(&self, receipt: Receipt) {
        self.inner.lock().unwrap().push(receipt);
    }

    pub fn snapshot(&self) -> Vec<Receipt> {
        self.inner.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The subscriber connections; records into [`Receipts`] until [`Subscriber::stop`].
#[derive(Debug)]
pub struct Subscriber {
    receipts: Receipts,
    stop: Shutdown,
    tasks: JoinSet<()>,
}

impl Subscriber {
    /// Connects and subscribes; returns once the broker confirmed every subscription.
    pub async fn start(config: &Config) -> Result<Subscriber, Error> {
        let users: Vec<String> = (0..config.users).map(|u| config.user_id(u)).collect();
        let filter = |user: &str| format!("users/{user}/devices/+/alerts");
        let connections: Vec<Plan> = match &config.credentials {
            Credentials::PerUser { .. } => users
                .iter()
                .enumerate()
                .map(|(n, user)| Plan {
                    client_id: format!("load-tester-{}-alerts-{n}", config.run_id),
                    login: config.credentials.for_user(user),
                    filters: vec![filter(user)],
                })
                .collect(),
            _ => vec![Plan {
                client_id: format!("load-tester-{}-alerts", config.run_id),
                login: config.credentials.for_user(""),
                filters: users.iter().map(|u| filter(u)).collect(),
            }],
        };

        let receipts = Receipts::default();
        let stop = Shutdown::new();
        let mut subscribing = JoinSet::new();
        for Plan {
            client_id,
            login,
            filters,
        } in connections
        {
            let mut options = MqttOptions::new(
                client_id.clone(),
                config.mqtt_host.clone(),
                config.mqtt_port,
            );
            options.set_keep_alive(KEEP_ALIVE).set_clean_session(false);
            if let Some((username, password)) = login {
                options.set_credentials(username, password);
            }
            let (client, mut eventloop) = AsyncClient::new(options, 16);
            subscribing.spawn(async move {
                let subscribed = subscribe(&client, &mut eventloop, &filters).await;
                (client_id, client, eventloop, filters, subscribed)
            });
        }
        let mut tasks = JoinSet::new();
        while let Some(joined) = subscribing.join_next().await {
            let (client_id, client, eventloop, filters, subscribed) = joined?;
            if let Err(reason) = subscribed {
                stop.trigger();
                return Err(Error::AlertSubscribe {
                    host: config.mqtt_host.clone(),
                    port: config.mqtt_port,
                    client_id,
                    reason,
                });
            }
            let connection = Connection {
                client,
                eventloop,
                filters,
                receipts: receipts.clone(),
                stop: stop.clone(),
            };
            tasks.spawn(connection.run());
        }
        Ok(Subscriber {
            receipts,
            stop,
            tasks,
        })
    }

    pub fn receipts(&self) -> Receipts {
        self.receipts.clone()
    }

    /// Disconnects every connection.
    pub async fn stop(mut self) {
        self.stop.trigger();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// One subscriber connection to open.
struct Plan {
    client_id: String,
    /// Username and password, if the broker wants a login.
    login: Option<(String, String)>,
    filters: Vec<String>,
}

/// Sends the subscriptions and waits until the broker accepted all of them.
async fn subscribe(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    filters: &[String],
) -> Result<(), String> {
    let request = filters
        .iter()
        .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
    client
        .try_subscribe_many(request)
        .map_err(|e| e.to_string())?;
    let handshake = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    return match ack
                        .return_codes
                        .iter()
                        .position(|code| *code == SubscribeReasonCode::Failure)
                    {
                        Some(i) => Err(format!(
                            "the broker refused the subscription to '{}'; check the login and \
                             the broker's ACL (a user may read users/<user>/devices/+/alerts)",
                            filters.get(i).map_or("?", |f| f.as_str())
                        )),
                        None => Ok(()),
                    };
                }
                Ok(_) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    match tokio::time::timeout(SUBSCRIBE_TIMEOUT, handshake).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no CONNACK and SUBACK within {}s",
            SUBSCRIBE_TIMEOUT.as_secs()
        )),
    }
}

struct Connection {
    client: AsyncClient,
    eventloop: EventLoop,
    filters: Vec<String>,
    receipts: Receipts,
    stop: Shutdown,
}

impl Connection {
    async fn run(mut self) {
        loop {
            let event = tokio::select! {
                biased;
                _ = self.stop.wait() => break,
                event = self.eventloop.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    // Taken before anything else, so parsing is not counted as latency.
                    let at = SystemTime::now();
                    self.receipts
                        .record(Receipt::new(publish.topic, &publish.payload, at));
                }
                // A broker that forgot the session has no subscriptions after a reconnect.
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let filters = self
                        .filters
                        .iter()
                        .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                    let _ = self.client.try_subscribe_many(filters);
                }
                Ok(_) => {}
                Err(_) => {
                    tokio::select! {
                        _ = self.stop.wait() => break,
                        _ = tokio::time::sleep(RECONNECT_DELAY) => {}
                    }
                }
            }
        }
        if self.client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, async {
                loop {
                    match self.eventloop.poll().await {
                        Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            })
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receipt_reads_the_alert_id_and_event_and_tolerates_anything_else() {
        let at = SystemTime::UNIX_EPOCH;
        let receipt = Receipt::new(
            "users/u/devices/d/alerts",
            br#"{"alert_id":"ab12","event":"raised","value":85.1}"#,
            at,
        );
        assert_eq!(
            (receipt.alert_id.as_str(), receipt.event.as_str()),
            ("ab12", "raised")
        );
        let junk = Receipt::new("users/u/devices/d/alerts", b"not json", at);
        assert_eq!((junk.alert_id.as_str(), junk.event.as_str()), ("", ""));
    }
}
