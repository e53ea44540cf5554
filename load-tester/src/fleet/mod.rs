//! The simulated fleet: MQTT connections and the devices they publish for.
//!
//! Each connection has two tasks. The publisher ([`publisher`]) walks the timetable of its
//! devices and hands each message to rumqttc when it is due. The driver ([`connection`]) polls
//! rumqttc's event loop, which must never be blocked, and turns its events into measurements:
//! a message counts as sent when rumqttc writes it to the socket, and as confirmed when its
//! PUBACK arrives.
//!
//! rumqttc reports a write as `Outgoing::Publish(pkid)` with no way to attach our own data, so
//! the two tasks share an [`Outbox`]: the publisher appends a message to it under the same lock
//! in which it hands the publish to rumqttc, and rumqttc writes requests in the order it
//! received them, so the front of the outbox is always the message being written. The packet id
//! then links the PUBACK to the message.

mod connection;
mod publisher;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use telemetry_core::contract::DeviceId;
use telemetry_core::Shutdown;
use tokio::task::JoinSet;

use crate::config::{Config, Qos};
use crate::schedule::Schedule;
use crate::stats::{Counters, Latency, Ledger};
use crate::Error;

/// A publish written later than this after its due time counts as late. Tokio's timers tick in
/// whole milliseconds and a busy machine adds a little scheduling noise on top; 5 ms stays
/// clear of that noise while still catching a sender that cannot keep up.
pub const LATE_AFTER: Duration = Duration::from_millis(5);

/// How long to wait for the broker's CONNACK before declaring the broker unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests rumqttc may queue before the publisher has to wait. Large enough to absorb a
/// burst at start-up or after a slow PUBACK, small enough that a dropped connection loses
/// (and reports) at most this many queued messages.
const REQUEST_CAPACITY: usize = 1024;

/// MQTT keep-alive. Short, because the driver treats a silent event loop as a stalled
/// connection: pings guarantee an event at least this often while the broker is alive.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// Delay between the tasks being ready and the first message being due, so that no publisher
/// starts out behind schedule because it was spawned a little after the others.
const START_DELAY: Duration = Duration::from_millis(50);

/// A message handed to rumqttc and not yet written to the socket.
#[derive(Debug, Clone, Copy)]
struct Queued {
    /// Index of the device within its connection.
    local: usize,
    /// Message number within the device.
    k: u64,
    /// When the message was due.
    due: Instant,
}

/// What the publisher and the driver of one connection share. Held only for a few non-async
/// steps at a time, so a plain mutex serves.
#[derive(Debug, Default)]
struct Outbox {
    /// Messages handed to rumqttc, in the order rumqttc will write them.
    queued: VecDeque<Queued>,
    /// The publisher has handed over its last message and the end-of-run marker.
    finished: bool,
    /// The driver has stopped (the connection failed for good, or the run is over); the
    /// publisher must not hand over anything more.
    closed: bool,
}

/// The devices one connection publishes for.
#[derive(Debug)]
struct Member {
    /// Fleet index (`user * devices_per_user + device`).
    fleet_index: u64,
    topic: String,
}

/// What one connection measured.
#[derive(Debug, Default)]
struct ConnectionOutcome {
    ledgers: Vec<Ledger>,
    puback: Latency,
    lag: Latency,
    sent: u64,
    acked: u64,
    late: u64,
    errors: u64,
    first_error: Option<String>,
    last_write: Option<Instant>,
}

/// What the fleet did.
#[derive(Debug)]
pub struct FleetOutcome {
    /// One ledger per device, in fleet order (user-major).
    pub ledgers: Vec<Ledger>,
    /// From due time to PUBACK (QoS 1 only).
    pub puback: Latency,
    /// From due time to the write to the socket.
    pub lag: Latency,
    pub sent: u64,
    pub acked: u64,
    pub late: u64,
    /// Connection outages, one per outage.
    pub errors: u64,
    pub first_error: Option<String>,
    /// From the first due time to the last write.
    pub publish_elapsed: Duration,
    /// From the first due time until every connection finished draining.
    pub elapsed: Duration,
    /// The run was stopped by a signal before the timetable ran out.
    pub interrupted: bool,
    /// The timetable the fleet followed, and when it started as time since the epoch: message
    /// `k` of device `g` was due at `wall_start + schedule.due(g, k)`, the `ts` of its payload.
    pub schedule: Schedule,
    pub wall_start: Duration,
}

/// Connects the fleet, publishes the whole timetable, waits for the acknowledgements and
/// disconnects. Fails only if a connection cannot be opened at the start; failures later on
/// are counted in the outcome, because a load test that loses its connection has a result
/// worth reporting.
pub async fn run(
    config: &Config,
    counters: Arc<Counters>,
    shutdown: &Shutdown,
) -> Result<FleetOutcome, Error> {
    let schedule = Schedule::new(
        config.rate,
        config.ramp_up,
        config.devices(),
        config.messages_per_device,
    );
    let qos = match config.qos {
        Qos::AtMostOnce => QoS::AtMostOnce,
        Qos::AtLeastOnce => QoS::AtLeastOnce,
    };

    let mut connecting = JoinSet::new();
    for (index, devices) in assign(config.users, config.devices_per_user, config.connections)
        .into_iter()
        .enumerate()
    {
        let client_id = format!("load-tester-{}-{index}", config.run_id);
        let mut options = MqttOptions::new(
            client_id.clone(),
            config.mqtt_host.clone(),
            config.mqtt_port,
        );
        options
            .set_keep_alive(KEEP_ALIVE)
            .set_clean_session(true)
            .set_inflight(config.inflight);
        // rumqttc refuses to send packets above 10 KiB by default; leave room for the topic.
        options.set_max_packet_size(64 * 1024, config.payload_bytes.max(10 * 1024) + 1024);
        let first_user = config.user_id(devices[0] / config.devices_per_user);
        if let Some((username, password)) = config.credentials.for_user(&first_user) {
            options.set_credentials(username, password);
        }
        let members: Vec<Member> = devices
            .iter()
            .map(|&g| {
                let id = DeviceId {
                    user: config.user_id(g / config.devices_per_user),
                    device: Config::device_id(g % config.devices_per_user),
                };
                Member {
                    fleet_index: g,
                    topic: id.telemetry_topic(),
                }
            })
            .collect();
        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_CAPACITY);
        connecting.spawn(async move {
            let connected = connect(&mut eventloop).await;
            (index, client_id, client, eventloop, members, connected)
        });
    }

    let mut connections = Vec::with_capacity(config.connections);
    while let Some(joined) = connecting.join_next().await {
        let (index, client_id, client, eventloop, members, connected) = joined?;
        connected.map_err(|reason| Error::MqttConnect {
            host: config.mqtt_host.clone(),
            port: config.mqtt_port,
            client_id,
            reason,
        })?;
        connections.push((index, client, eventloop, members));
    }
    connections.sort_by_key(|(index, ..)| *index);

    let start = Instant::now() + START_DELAY;
    let wall_start = SystemTime::now() + START_DELAY;
    let wall_start_ms = wall_start.duration_since(UNIX_EPOCH).unwrap_or_default();

    let mut running = JoinSet::new();
    for (index, client, eventloop, members) in connections {
        let outbox = Arc::new(Mutex::new(Outbox::default()));
        let fleet_indices: Vec<u64> = members.iter().map(|m| m.fleet_index).collect();
        let timetable = schedule.timetable(fleet_indices.clone());
        let publisher = publisher::Publisher {
            client: client.clone(),
            outbox: outbox.clone(),
            topics: members.into_iter().map(|m| m.topic).collect(),
            qos,
            start,
            wall_start: wall_start_ms,
            seq_start: config.seq_start,
            alerts: config.alert_plan(),
            payload_bytes: config.payload_bytes,
            shutdown: shutdown.clone(),
        };
        let driver = connection::Driver {
            eventloop,
            client,
            outbox,
            qos,
            drain_timeout: config.drain_timeout,
            counters: counters.clone(),
            ledgers: (0..fleet_indices.len())
                .map(|_| Ledger::new(schedule.messages_per_device()))
                .collect(),
        };
        let publishing = tokio::spawn(publisher.run(timetable));
        running.spawn(async move {
            let outcome = driver.run().await;
            // The driver stops only after the publisher finished or after the connection was
            // given up, and then it has closed the outbox. A publisher still sleeping towards
            // its next due time (minutes, at low rates) has nothing left to do, and it holds no
            // lock across an await, so it is stopped rather than waited for.
            publishing.abort();
            (index, fleet_indices, outcome)
        });
    }

    let mut fleet = FleetOutcome {
        ledgers: vec![Ledger::new(0); config.devices() as usize],
        puback: Latency::default(),
        lag: Latency::default(),
        sent: 0,
        acked: 0,
        late: 0,
        errors: 0,
        first_error: None,
        publish_elapsed: Duration::ZERO,
        elapsed: Duration::ZERO,
        interrupted: false,
        schedule,
        wall_start: wall_start_ms,
    };
    let mut first_errors = Vec::new();
    let mut last_write = None;
    while let Some(joined) = running.join_next().await {
        let (index, fleet_indices, outcome) = joined?;
        for (g, ledger) in fleet_indices.into_iter().zip(outcome.ledgers) {
            fleet.ledgers[g as usize] = ledger;
        }
        fleet.puback.merge(&outcome.puback);
        fleet.lag.merge(&outcome.lag);
        fleet.sent += outcome.sent;
        fleet.acked += outcome.acked;
        fleet.late += outcome.late;
        fleet.errors += outcome.errors;
        if let Some(error) = outcome.first_error {
            first_errors.push((index, error));
        }
        last_write = last_write.max(outcome.last_write);
    }
    // Report the lowest-numbered connection's error so that reruns name the same one.
    first_errors.sort();
    fleet.first_error = first_errors
        .into_iter()
        .next()
        .map(|(index, e)| format!("connection {index}: {e}"));
    fleet.publish_elapsed = last_write
        .map(|t| t.saturating_duration_since(start))
        .unwrap_or_default();
    fleet.elapsed = start.elapsed();
    fleet.interrupted = shutdown.is_triggered();
    Ok(fleet)
}

/// Polls a new event loop until the broker accepts the connection.
async fn connect(eventloop: &mut EventLoop) -> Result<(), String> {
    let handshake = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
        Ok(result) => result,
        Err(_) => Err(format!("no CONNACK within {}s", CONNECT_TIMEOUT.as_secs())),
    }
}

/// Which fleet devices each connection carries. While there are no more connections than
/// users, a user's devices stay together on one connection (so per-user credentials and broker
/// ACLs keyed on the user work); beyond that, devices are dealt out one by one.
pub fn assign(users: u64, devices_per_user: u64, connections: usize) -> Vec<Vec<u64>> {
    let mut assignment = vec![Vec::new(); connections];
    let devices = users * devices_per_user;
    for g in 0..devices {
        let slot = if connections as u64 <= users {
            (g / devices_per_user) % connections as u64
        } else {
            g % connections as u64
        };
        assignment[slot as usize].push(g);
    }
    assignment
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_devices_share_a_connection_while_connections_are_scarce() {
        assert_eq!(assign(3, 2, 3), [vec![0, 1], vec![2, 3], vec![4, 5]]);
        assert_eq!(assign(3, 2, 2), [vec![0, 1, 4, 5], vec![2, 3]]);
        assert_eq!(assign(2, 3, 4), [vec![0, 4], vec![1, 5], vec![2], vec![3]]);
    }

    #[test]
    fn every_device_is_assigned_exactly_once() {
        for (users, per_user, connections) in [(30, 3, 30), (100, 1, 64), (1, 10, 10), (7, 3, 5)] {
            let mut all: Vec<u64> = assign(users, per_user, connections)
                .into_iter()
                .flatten()
                .collect();
            all.sort();
            assert_eq!(all, (0..users * per_user).collect::<Vec<_>>());
        }
    }
}
