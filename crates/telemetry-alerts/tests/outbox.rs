//! The outbox on real servers: PostgreSQL through PgBouncer (transaction mode) and Mosquitto.
//! Alert events are produced by the real engine, stored with `insert_events` as the worker
//! does, and published by `Outbox`; a subscriber on the device owner's topic checks what
//! arrives.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::DateTime;
use deadpool_postgres::Pool;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use telemetry_alerts::outbox::session::{Outgoing, Session};
use telemetry_alerts::outbox::{self, MqttConfig};
use telemetry_alerts::{
    evaluate, AlertEvent, DeviceState, EventKind, Outbox, OutboxConfig, Reading, RuleSet,
    RELEASE_SQL, SCHEMA_SQL,
};
use telemetry_core::contract::DeviceId;
use telemetry_core::Shutdown;
use telemetry_worker::config::PostgresConfig;
use test_servers::{shared, unique_name, Mosquitto};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const A_MINUTE: Duration = Duration::from_secs(60);

const HIGH_TEMPERATURE: &str = r#"
[[rule]]
name = "high-temperature"
reading = "/temperature"
op = ">"
value = 80.0
clear = 75.0
severity = "warning"
"#;

/// A fresh database with the alerts schema: a pool through PgBouncer, as the worker has, and a
/// direct connection for the test's own checks.
struct Database {
    pool: Pool,
    direct: tokio_postgres::Client,
    /// The publishing sessions' client id prefix, shared by every publisher on this table as
    /// replicas share it.
    sessions: String,
}

async fn fresh_database() -> Database {
    let servers = shared();
    let name = unique_name("alerts");
    servers.postgres.create_database(&name).unwrap();
    let (direct, connection) =
        tokio_postgres::connect(&servers.postgres.url(&name), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    direct.batch_execute(SCHEMA_SQL).await.unwrap();
    direct.batch_execute(RELEASE_SQL).await.unwrap();
    let pool = telemetry_worker::create_pool(&PostgresConfig {
        url: servers.pgbouncer.url(&name),
        ..PostgresConfig::default()
    })
    .unwrap();
    Database {
        pool,
        direct,
        sessions: unique_name("outbox"),
    }
}

impl Database {
    /// Stores events in one transaction, as the worker does with a batch; returns rows inserted.
    async fn store(&self, events: &[AlertEvent]) -> u64 {
        let mut client = self.pool.get().await.unwrap();
        let tx = client.transaction().await.unwrap();
        let inserted = outbox::insert_events(&tx, events).await.unwrap();
        tx.commit().await.unwrap();
        inserted
    }

    async fn unpublished(&self) -> i64 {
        self.direct
            .query_one(
                "SELECT count(*) FROM alerts WHERE published_at IS NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    async fn wait_until_all_published(&self) {
        let deadline = Instant::now() + A_MINUTE;
        while self.unpublished().await > 0 {
            assert!(
                Instant::now() < deadline,
                "alerts still unpublished after a minute"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Readings of `devices` devices of `user`, alternating hot and cold so that every reading
/// raises or clears an alert, interleaved across devices as in a real batch. Device `d` is on
/// partition `d % partitions`; offsets count up per partition from `first_offset`.
struct Fleet {
    rules: RuleSet,
    devices: Vec<(DeviceId, DeviceState)>,
    partitions: i32,
    next_offset: BTreeMap<i32, i64>,
    readings: usize,
}

impl Fleet {
    fn new(user: &str, devices: usize, partitions: i32) -> Fleet {
        Fleet {
            rules: RuleSet::from_toml(HIGH_TEMPERATURE).unwrap(),
            devices: (0..devices)
                .map(|d| {
                    (
                        DeviceId::new(user, &format!("thermo-{d}")).unwrap(),
                        DeviceState::new(),
                    )
                })
                .collect(),
            partitions,
            next_offset: BTreeMap::new(),
            readings: 0,
        }
    }

    /// `rounds` readings per device; one event each.
    fn events(&mut self, rounds: usize) -> Vec<AlertEvent> {
        let mut events = Vec::new();
        for _ in 0..rounds {
            let temperature = if self.readings % 2 == 0 { 90.0 } else { 20.0 };
            self.readings += 1;
            for (d, (device, state)) in self.devices.iter_mut().enumerate() {
                let partition = d as i32 % self.partitions;
                let offset = self.next_offset.entry(partition).or_insert(0);
                let payload = format!(r#"{{"temperature":{temperature}}}"#);
                let reading = Reading {
                    device,
                    payload: payload.as_bytes(),
                    time: DateTime::from_timestamp_millis(1_764_000_000_000 + *offset * 1_000)
                        .unwrap(),
                    partition,
                    offset: *offset,
                };
                *offset += 1;
                let produced = evaluate(&self.rules, state, &reading);
                assert_eq!(produced.len(), 1);
                events.extend(produced);
            }
        }
        events
    }
}

/// What a subscriber saw: `(topic, body)` in arrival order.
struct Subscriber {
    messages: mpsc::UnboundedReceiver<(String, Value)>,
    task: JoinHandle<()>,
}

impl Subscriber {
    /// Subscribes to every alert of `user` with QoS 1 and returns once the broker confirmed the
    /// subscription. A persistent session keeps receiving across broker restarts.
    async fn start(host: &str, port: u16, user: &str, persistent: bool) -> Subscriber {
        let mut options = MqttOptions::new(unique_name("subscriber"), host, port);
        options.set_clean_session(!persistent);
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        client
            .subscribe(format!("users/{user}/devices/+/alerts"), QoS::AtLeastOnce)
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Event::Incoming(Packet::SubAck(_)) = eventloop.poll().await.unwrap() {
                    return;
                }
            }
        })
        .await
        .expect("subscribed within 10 s");
        let (sender, messages) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let _client = client;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let body = serde_json::from_slice(&publish.payload).unwrap();
                        if sender.send((publish.topic, body)).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // The broker is down: keep trying, as a device owner's app would.
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Subscriber { messages, task }
    }

    /// Waits for `expected` messages (a minute at most), then a little longer so that any
    /// duplicate would show.
    async fn receive(&mut self, expected: usize) -> Vec<(String, Value)> {
        let mut received = Vec::new();
        let deadline = Instant::now() + A_MINUTE;
        while received.len() < expected {
            match tokio::time::timeout_at(deadline, self.messages.recv()).await {
                Ok(Some(message)) => received.push(message),
                _ => break,
            }
        }
        let linger = Instant::now() + Duration::from_millis(700);
        while let Ok(Some(message)) = tokio::time::timeout_at(linger, self.messages.recv()).await {
            received.push(message);
        }
        received
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A running outbox publisher.
struct Publisher {
    shutdown: Shutdown,
    task: JoinHandle<()>,
    waker: telemetry_alerts::OutboxWaker,
}

impl Publisher {
    fn start(
        db: &Database,
        host: &str,
        port: u16,
        tune: impl FnOnce(&mut OutboxConfig),
    ) -> Publisher {
        let mut config = OutboxConfig {
            mqtt: MqttConfig {
                host: host.to_owned(),
                port,
                client_id: db.sessions.clone(),
                ..MqttConfig::default()
            },
            ..OutboxConfig::default()
        };
        tune(&mut config);
        let outbox = Outbox::new(config).unwrap();
        let waker = outbox.waker();
        let shutdown = Shutdown::new();
        let task = tokio::spawn({
            let (pool, shutdown) = (db.pool.clone(), shutdown.clone());
            async move { outbox.run(pool, shutdown).await.unwrap() }
        });
        Publisher {
            shutdown,
            task,
            waker,
        }
    }

    async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the outbox stops within 30 s")
            .unwrap();
    }
}

/// A stored row as the outbox publishes it: under the packet id of its row id and event id.
fn as_published(row_id: i64, device: &DeviceId, body: Value) -> Outgoing {
    Outgoing {
        pkid: outbox::packet_id(row_id, body["event_id"].as_str()),
        topic: device.alerts_topic(),
        payload: serde_json::to_vec(&body).unwrap(),
    }
}

/// Checks that `received` holds every event exactly once, each on its device's topic with its
/// stored body, and in the order the events were stored for each device.
fn assert_delivered_once_in_order(received: &[(String, Value)], stored: &[AlertEvent]) {
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    for (_, body) in received {
        let key = (
            body["alert_id"].as_str().unwrap().to_owned(),
            body["event"].as_str().unwrap().to_owned(),
        );
        *seen.entry(key).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "published more than once: {twice:?}");
    assert_eq!(
        received.len(),
        stored.len(),
        "every stored alert, nothing else"
    );

    let per_device = |bodies: Vec<(&str, Value)>| {
        let mut map: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for (topic, body) in bodies {
            map.entry(topic.to_owned()).or_default().push(body);
        }
        map
    };
    let got = per_device(
        received
            .iter()
            .map(|(t, b)| (t.as_str(), b.clone()))
            .collect(),
    );
    let topics: Vec<String> = stored.iter().map(|e| e.device.alerts_topic()).collect();
    let expected = per_device(
        stored
            .iter()
            .zip(&topics)
            .map(|(e, t)| (t.as_str(), e.body()))
            .collect(),
    );
    assert_eq!(got, expected, "per device: same messages, same order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_alerts_are_published_once_in_order_and_seen_by_the_owner() {
    let servers = shared();
    let db = fresh_database().await;
    let user = unique_name("owner");
    let (host, port) = (servers.mosquitto.host(), servers.mosquitto.port());
    let mut subscriber = Subscriber::start(host, port, &user, false).await;
    // Another user's alerts are not this subscriber's business, and do not reach it.
    let other = unique_name("neighbour");
    let mut neighbour = Fleet::new(&other, 1, 1);

    let mut fleet = Fleet::new(&user, 3, 2);
    let first = fleet.events(4);
    let second = fleet.events(2);
    assert_eq!(db.store(&first).await, 12);
    assert_eq!(db.store(&neighbour.events(2)).await, 2);
    // A long poll interval: only the wake-up can explain a quick publish.
    let publisher = Publisher::start(&db, host, port, |c| c.poll_interval_ms = 600_000);
    assert_eq!(db.store(&second).await, 6);
    publisher.waker.wake();

    let stored: Vec<AlertEvent> = first.iter().chain(&second).cloned().collect();
    let received = subscriber.receive(stored.len()).await;
    assert_delivered_once_in_order(&received, &stored);
    for (topic, _) in &received {
        assert!(
            topic.starts_with(&format!("users/{user}/devices/")),
            "{topic}"
        );
    }
    db.wait_until_all_published().await;

    // The events of a replayed batch are recognised and neither stored nor sent again.
    assert_eq!(db.store(&first).await, 0);
    publisher.waker.wake();
    assert!(subscriber.receive(0).await.is_empty());
    publisher.stop().await;

    let kinds: Vec<String> = db
        .direct
        .query(
            "SELECT event FROM alerts WHERE device_id = 'thermo-0' AND user_id = $1 ORDER BY id",
            &[&user],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        kinds,
        ["raised", "cleared", "raised", "cleared", "raised", "cleared"]
    );
    let stored_body: Value = db
        .direct
        .query_one("SELECT body FROM alerts ORDER BY id LIMIT 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored_body, first[0].body());
    assert_eq!(first[0].kind, EventKind::Raised);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_wait_in_the_outbox_while_the_broker_is_down_and_go_out_once_when_it_returns() {
    // A broker of our own, since this test stops it.
    let mosquitto = Mosquitto::start().unwrap();
    let (host, port) = (mosquitto.host().to_owned(), mosquitto.port());
    let db = fresh_database().await;
    let user = unique_name("owner");
    let mut subscriber = Subscriber::start(&host, port, &user, true).await;
    let publisher = Publisher::start(&db, &host, port, |c| c.poll_interval_ms = 200);
    let mut fleet = Fleet::new(&user, 4, 2);

    let before = fleet.events(3);
    db.store(&before).await;
    publisher.waker.wake();
    let received_before = subscriber.receive(before.len()).await;
    assert_delivered_once_in_order(&received_before, &before);

    tokio::task::block_in_place(|| mosquitto.stop());
    let during = fleet.events(5);
    db.store(&during).await;
    publisher.waker.wake();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        db.unpublished().await,
        during.len() as i64,
        "with the broker down, the alerts wait in the table"
    );

    tokio::task::block_in_place(|| mosquitto.start_again()).unwrap();
    let received_after = subscriber.receive(during.len()).await;
    assert_delivered_once_in_order(&received_after, &during);
    db.wait_until_all_published().await;
    publisher.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_publishers_on_one_table_publish_every_alert_once_and_in_order() {
    // Mosquitto's default Nagle delays all but the first PUBACK of a round until the client's
    // delayed ACK (~40 ms), which would make the two publishers take turns rather than publish
    // partitions side by side; with TCP_NODELAY they really run concurrently.
    let mosquitto = Mosquitto::start_with_config("set_tcp_nodelay true").unwrap();
    let db = fresh_database().await;
    let user = unique_name("owner");
    let (host, port) = (mosquitto.host(), mosquitto.port());
    let mut subscriber = Subscriber::start(host, port, &user, false).await;
    // Small rounds and fast polling, so the two compete for the same partitions all the time.
    let tune = |c: &mut OutboxConfig| {
        c.batch_size = 7;
        c.poll_interval_ms = 10;
    };
    let one = Publisher::start(&db, host, port, tune);
    let two = Publisher::start(&db, host, port, tune);
    let mut fleet = Fleet::new(&user, 12, 4);

    let mut stored = Vec::new();
    for _ in 0..10 {
        let batch = fleet.events(3);
        db.store(&batch).await;
        stored.extend(batch);
        one.waker.wake();
        two.waker.wake();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stored.len(), 360);
    let received = subscriber.receive(stored.len()).await;
    assert_delivered_once_in_order(&received, &stored);
    db.wait_until_all_published().await;
    one.stop().await;
    two.stop().await;
}

/// A publisher killed in the middle of a round leaves each row at one of three points. The
/// next publisher, on the same sessions, finishes every one without a repeat:
/// - received by the broker and never released (no `released_at`): published again under the
///   same packet id, which the broker recognises as the message it holds;
/// - `released_at` committed, PUBREL never sent: released;
/// - released and confirmed, `published_at` never set: released again, which delivers nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_killed_at_any_step_of_a_round_is_finished_by_the_next_without_repeats() {
    let servers = shared();
    let db = fresh_database().await;
    let user = unique_name("owner");
    let (host, port) = (servers.mosquitto.host(), servers.mosquitto.port());
    let mut subscriber = Subscriber::start(host, port, &user, false).await;
    // One partition, three devices: one per point, so each device's order stands alone.
    let mut fleet = Fleet::new(&user, 3, 1);
    let events = fleet.events(4);
    assert_eq!(db.store(&events).await, 12);
    let of = |device: &str| -> Vec<AlertEvent> {
        events
            .iter()
            .filter(|e| e.device.device == device)
            .cloned()
            .collect()
    };
    let rows = db
        .direct
        .query("SELECT id, device_id, body FROM alerts ORDER BY id", &[])
        .await
        .unwrap();
    let outgoing: Vec<(String, Outgoing)> = rows
        .iter()
        .map(|row| {
            let device = DeviceId::new(&user, row.get::<_, &str>(1)).unwrap();
            (
                device.device.clone(),
                as_published(row.get(0), &device, row.get(2)),
            )
        })
        .collect();

    // The killed publisher, step by step, on partition 0's session.
    let config = MqttConfig {
        host: host.to_owned(),
        port,
        ..MqttConfig::default()
    };
    let deadline = || Instant::now() + Duration::from_secs(10);
    let mut session = Session::connect(&config, &format!("{}-p0", db.sessions), deadline())
        .await
        .unwrap();
    let all: Vec<Outgoing> = outgoing.iter().map(|(_, m)| m.clone()).collect();
    session.publish(all, deadline()).await.unwrap();
    db.direct
        .execute(
            "UPDATE alerts SET released_at = now() WHERE device_id IN ('thermo-1', 'thermo-2')",
            &[],
        )
        .await
        .unwrap();
    let confirmed: Vec<u16> = outgoing
        .iter()
        .filter(|(device, _)| device == "thermo-2")
        .map(|(_, m)| m.pkid)
        .collect();
    session.release(&confirmed, deadline()).await.unwrap();
    // No DISCONNECT: the connection just ends, as when the process is killed.
    drop(session);

    // Mosquitto delivers a QoS 2 message when it is released: so far only thermo-2's.
    let early = subscriber.receive(4).await;
    assert_delivered_once_in_order(&early, &of("thermo-2"));

    let publisher = Publisher::start(&db, host, port, |c| c.poll_interval_ms = 100);
    db.wait_until_all_published().await;
    let late = subscriber.receive(8).await;
    let rest: Vec<AlertEvent> = of("thermo-0").into_iter().chain(of("thermo-1")).collect();
    assert_delivered_once_in_order(&late, &rest);
    publisher.stop().await;
}

/// Rows an earlier publisher released on a session the broker no longer has (a broker
/// restarted without persistence, an expired session) may never have been delivered: they are
/// published again on the new session rather than only released, which would lose them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_released_on_a_session_the_broker_lost_are_published_again_not_lost() {
    let servers = shared();
    let db = fresh_database().await;
    let user = unique_name("owner");
    let (host, port) = (servers.mosquitto.host(), servers.mosquitto.port());
    let mut subscriber = Subscriber::start(host, port, &user, false).await;
    let mut fleet = Fleet::new(&user, 2, 1);
    let events = fleet.events(3);
    db.store(&events).await;
    // Released by a publisher whose session the broker never saw (this prefix is new to it).
    db.direct
        .execute("UPDATE alerts SET released_at = now()", &[])
        .await
        .unwrap();

    let publisher = Publisher::start(&db, host, port, |c| c.poll_interval_ms = 100);
    db.wait_until_all_published().await;
    let received = subscriber.receive(events.len()).await;
    assert_delivered_once_in_order(&received, &events);
    publisher.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_state_is_saved_and_loaded_inside_the_callers_transaction() {
    let db = fresh_database().await;
    let rules = RuleSet::from_toml(
        r#"
[[rule]]
name = "hot"
reading = "/temperature"
op = ">"
value = 80.0
severity = "warning"
for_samples = 3
"#,
    )
    .unwrap();
    let user = unique_name("owner");
    let quiet = DeviceId::new(&user, "quiet").unwrap();
    let busy = DeviceId::new(&user, "busy").unwrap();
    let reading = |device: &DeviceId, offset: i64, temperature: f64| {
        let payload = format!(r#"{{"temperature":{temperature}}}"#);
        (device.clone(), payload, offset, temperature)
    };

    // Batch 1: two of three hot readings; the streak is saved.
    let mut client = db.pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let mut states = outbox::load_states(&tx, [&quiet, &busy]).await.unwrap();
    assert_eq!(states.len(), 2);
    assert!(states.values().all(DeviceState::is_empty));
    for (device, payload, offset, _) in [reading(&busy, 0, 90.0), reading(&busy, 1, 91.0)] {
        let state = states.get_mut(&device).unwrap();
        let events = evaluate(
            &rules,
            state,
            &Reading {
                device: &device,
                payload: payload.as_bytes(),
                time: DateTime::from_timestamp_millis(1_764_000_000_000 + offset).unwrap(),
                partition: 0,
                offset,
            },
        );
        assert!(events.is_empty());
    }
    let changed: Vec<_> = states.iter().filter(|(_, s)| s.changed()).collect();
    assert_eq!(changed.len(), 1);
    assert_eq!(outbox::save_states(&tx, changed).await.unwrap(), 1);
    tx.commit().await.unwrap();

    // Batch 2, on "another replica": the loaded streak completes with the third reading.
    let tx = client.transaction().await.unwrap();
    let mut states = outbox::load_states(&tx, [&busy]).await.unwrap();
    let state = states.get_mut(&busy).unwrap();
    assert!(!state.is_empty() && !state.changed());
    let events = evaluate(
        &rules,
        state,
        &Reading {
            device: &busy,
            payload: br#"{"temperature":92}"#,
            time: DateTime::from_timestamp_millis(1_764_000_000_002).unwrap(),
            partition: 0,
            offset: 2,
        },
    );
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].alert_id,
        telemetry_alerts::alert_id("hot", &busy, 0, 0)
    );
    // Cleared in the same batch: the state empties and its row goes away.
    let events = evaluate(
        &rules,
        state,
        &Reading {
            device: &busy,
            payload: br#"{"temperature":20}"#,
            time: DateTime::from_timestamp_millis(1_764_000_000_003).unwrap(),
            partition: 0,
            offset: 3,
        },
    );
    assert_eq!(events[0].kind, EventKind::Cleared);
    assert!(state.is_empty());
    outbox::save_states(&tx, states.iter()).await.unwrap();
    tx.rollback().await.unwrap();

    // The rolled-back batch left the saved streak in place.
    let rows: i64 = db
        .direct
        .query_one("SELECT count(*) FROM alert_state", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
    let tx = client.transaction().await.unwrap();
    let mut states = outbox::load_states(&tx, [&busy]).await.unwrap();
    let state = states.get_mut(&busy).unwrap();
    assert!(!state.is_empty());
    // Committed this time: the empty state deletes the row.
    *state = DeviceState::new();
    outbox::save_states(&tx, states.iter()).await.unwrap();
    tx.commit().await.unwrap();
    let rows: i64 = db
        .direct
        .query_one("SELECT count(*) FROM alert_state", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);

    // A state nobody can read is replaced by an empty one instead of stopping the partition.
    db.direct
        .execute(
            "INSERT INTO alert_state (user_id, device_id, state) VALUES ($1, 'busy', '{\"bogus\": 1}')",
            &[&user],
        )
        .await
        .unwrap();
    let tx = client.transaction().await.unwrap();
    let states = outbox::load_states(&tx, [&busy]).await.unwrap();
    assert!(states[&busy].is_empty());
    tx.commit().await.unwrap();
}

/// After the database is restored from a backup, the worker generates the alerts stored since
/// the backup again (their readings are read again from Kafka), under row ids other alerts had
/// before. Each keeps its `event_id`, so the owner recognises what it already received, and
/// its packet id, so the broker recognises a message it still holds from before the restore as
/// the same alert: Mosquitto holds it unreleased and delivers it once; EMQX, which delivers on
/// receipt, would otherwise deliver it a second time and drop the alert that took over its
/// packet id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_generated_again_after_a_restore_keep_their_event_ids_and_packet_ids() {
    let servers = shared();
    let db = fresh_database().await;
    let user = unique_name("owner");
    let (host, port) = (servers.mosquitto.host(), servers.mosquitto.port());
    let mut subscriber = Subscriber::start(host, port, &user, false).await;
    // Three devices on two partitions: thermo-0 and thermo-2 on 0, thermo-1 on 1.
    let mut fleet = Fleet::new(&user, 3, 2);
    let raised = fleet.events(1);
    let cleared = fleet.events(1);

    // Before the restore: the raises are published; the clears reach the broker but the
    // publisher is killed before it releases them.
    db.store(&raised).await;
    let publisher = Publisher::start(&db, host, port, |c| c.poll_interval_ms = 100);
    db.wait_until_all_published().await;
    publisher.stop().await;
    db.store(&cleared).await;
    let packet_ids = |rows: Vec<tokio_postgres::Row>| -> BTreeMap<String, u16> {
        rows.iter()
            .map(|row| {
                let body: Value = row.get(1);
                let event = body["event_id"].as_str().unwrap_or_default().to_owned();
                (
                    event,
                    outbox::packet_id(row.get(0), body["event_id"].as_str()),
                )
            })
            .collect()
    };
    let all_rows = "SELECT id, body, device_id, kafka_partition FROM alerts ORDER BY id";
    let before = db.direct.query(all_rows, &[]).await.unwrap();
    let config = MqttConfig {
        host: host.to_owned(),
        port,
        ..MqttConfig::default()
    };
    let deadline = || Instant::now() + Duration::from_secs(10);
    let mut killed = Session::connect(&config, &format!("{}-p0", db.sessions), deadline())
        .await
        .unwrap();
    let held: Vec<Outgoing> = before
        .iter()
        .filter(|row| row.get::<_, i32>(3) == 0 && row.get::<_, Value>(1)["event"] == "cleared")
        .map(|row| {
            let device = DeviceId::new(&user, row.get::<_, &str>(2)).unwrap();
            as_published(row.get(0), &device, row.get(1))
        })
        .collect();
    assert_eq!(held.len(), 2);
    killed.publish(held, deadline()).await.unwrap();
    drop(killed); // no DISCONNECT, no release: the broker holds both, undelivered
    let first = subscriber.receive(raised.len()).await;
    assert_delivered_once_in_order(&first, &raised);
    let before = packet_ids(before);

    // The restore: the backup was taken before any of these alerts, so the rows are gone and
    // the row ids start again. Reading the records again, the worker stores partition 1's
    // alerts first this time (its writer happened to commit first): every row id now belongs
    // to another alert than before.
    db.direct
        .batch_execute("TRUNCATE alerts RESTART IDENTITY")
        .await
        .unwrap();
    let on = |partition: i32| -> Vec<AlertEvent> {
        raised
            .iter()
            .chain(&cleared)
            .filter(|e| e.partition == partition)
            .cloned()
            .collect()
    };
    db.store(&on(1)).await;
    db.store(&on(0)).await;
    let after = packet_ids(db.direct.query(all_rows, &[]).await.unwrap());
    assert_eq!(
        after, before,
        "each alert keeps its event id and packet id across the restore"
    );

    let publisher = Publisher::start(&db, host, port, |c| c.poll_interval_ms = 100);
    db.wait_until_all_published().await;
    publisher.stop().await;
    let again = subscriber.receive(raised.len() + cleared.len()).await;
    // The raises were delivered before the restore and, as the restored database cannot know
    // that, are delivered again: the same messages, the same event ids. The clears the broker
    // held are the messages it receives now, and are delivered once.
    let mut received: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (_, body) in first.iter().chain(&again) {
        let event_id = body["event_id"]
            .as_str()
            .expect("every alert has an event_id");
        received
            .entry(event_id.to_owned())
            .or_default()
            .push(body.clone());
    }
    let expected: BTreeMap<String, Value> = raised
        .iter()
        .chain(&cleared)
        .map(|e| (e.event_id(), e.body()))
        .collect();
    assert_eq!(
        received.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "deduplicated on event_id: every alert, nothing else"
    );
    for event in raised.iter().chain(&cleared) {
        let copies = &received[&event.event_id()];
        assert!(
            copies.iter().all(|body| *body == event.body()),
            "{copies:?}"
        );
        let times = if event.kind == EventKind::Raised {
            2
        } else {
            1
        };
        assert_eq!(copies.len(), times, "{copies:?}");
    }
}
