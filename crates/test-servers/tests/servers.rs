//! The servers are real: SQL directly and through PgBouncer, an MQTT QoS 1 round trip, a Kafka
//! record round trip, and the restart and crash paths that outage tests rely on.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use test_servers::{shared, unique_name, Mosquitto, PgBouncer, Postgres, Tansu};
use tokio_postgres::{NoTls, SimpleQueryMessage};

/// Connects to `url` and returns the first column of the first row of `sql`.
async fn query_text(url: &str, sql: &str) -> Result<String, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    let connection = tokio::spawn(connection);
    let messages = client.simple_query(sql).await?;
    drop(client);
    let _ = connection.await;
    Ok(messages
        .iter()
        .find_map(|message| match message {
            SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .expect("the query returns a row"))
}

#[tokio::test]
async fn shared_postgres_answers_directly_and_through_pgbouncer() {
    let servers = shared();
    let db = unique_name("answers");
    servers.postgres.create_database(&db).unwrap();
    // Twice: create_database must replace a database that already exists.
    servers.postgres.create_database(&db).unwrap();

    let direct = query_text(&servers.postgres.url(&db), "SELECT current_database()").await;
    let pooled = query_text(&servers.pgbouncer.url(&db), "SELECT current_database()").await;

    assert_eq!(direct.unwrap(), db);
    assert_eq!(pooled.unwrap(), db);
    assert_ne!(servers.postgres.port(), servers.pgbouncer.port());
}

#[tokio::test]
async fn shared_mosquitto_round_trips_a_qos1_message_over_mqtt5() {
    let mosquitto = &shared().mosquitto;
    let topic = format!("test/{}", unique_name("round_trip"));
    let options = MqttOptions::new(unique_name("client"), mosquitto.host(), mosquitto.port());
    let (client, mut events) = AsyncClient::new(options, 10);
    client.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();

    let received = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await.unwrap() {
                Event::Incoming(Packet::SubAck(_)) => client
                    .publish(&topic, QoS::AtLeastOnce, false, "hello")
                    .await
                    .unwrap(),
                Event::Incoming(Packet::Publish(publish)) => return publish,
                _ => {}
            }
        }
    })
    .await
    .expect("the message comes back within 10 s");

    assert_eq!(received.qos, QoS::AtLeastOnce);
    assert_eq!(&received.topic[..], topic.as_bytes());
    assert_eq!(&received.payload[..], b"hello");
}

#[tokio::test]
async fn shared_tansu_creates_a_topic_and_round_trips_a_record() {
    let kafka = &shared().kafka;
    let topic = unique_name("round_trip");
    kafka.create_topic(&topic, 3).unwrap();

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("message.timeout.ms", "10000")
        .create()
        .unwrap();
    let delivery = producer
        .send(
            FutureRecord::to(&topic)
                .partition(2)
                .key("device-1")
                .payload("reading"),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(delivery.partition, 2);

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("group.id", unique_name("group"))
        .set("isolation.level", "read_uncommitted")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let record = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Some(result) = consumer.poll(Duration::from_millis(500)) {
                let message = result.unwrap();
                return Some((
                    message.partition(),
                    message.offset(),
                    message.key().map(<[u8]>::to_vec),
                    message.payload().map(<[u8]>::to_vec),
                ));
            }
        }
        None
    })
    .await
    .unwrap()
    .expect("the record is consumed within 30 s");

    assert_eq!(
        record,
        (
            2,
            delivery.offset,
            Some(b"device-1".to_vec()),
            Some(b"reading".to_vec())
        )
    );
}

#[tokio::test]
async fn pgbouncer_answers_again_after_restart_on_the_same_port() {
    let postgres = Postgres::start().unwrap();
    let pgbouncer = PgBouncer::start(&postgres).unwrap();
    let port = pgbouncer.port();
    let url = pgbouncer.url("postgres");
    assert_eq!(query_text(&url, "SELECT 1").await.unwrap(), "1");

    pgbouncer.stop();
    assert!(query_text(&url, "SELECT 1").await.is_err());

    pgbouncer.start_again().unwrap();
    assert_eq!(pgbouncer.port(), port);
    assert_eq!(query_text(&url, "SELECT 1").await.unwrap(), "1");
}

#[tokio::test]
async fn pgbouncer_restarted_while_postgres_is_down_holds_clients_until_postgres_is_back() {
    let postgres = Postgres::start().unwrap();
    let pgbouncer = PgBouncer::start(&postgres).unwrap();
    let url = pgbouncer.url("postgres");

    postgres.stop();
    pgbouncer.stop();
    pgbouncer.start_again().unwrap();
    let waiting = tokio::spawn(async move { query_text(&url, "SELECT 1").await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !waiting.is_finished(),
        "pgbouncer answered without postgres"
    );

    postgres.start_again().unwrap();
    // PgBouncer retries the server login every second (server_login_retry).
    let answer = tokio::time::timeout(Duration::from_secs(10), waiting).await;
    assert_eq!(answer.unwrap().unwrap().unwrap(), "1");
}

#[tokio::test]
async fn postgres_keeps_committed_rows_after_kill9_and_start_again() {
    let postgres = Postgres::start().unwrap();
    postgres.create_database("kept").unwrap();
    let url = postgres.url("kept");
    query_text(
        &url,
        "CREATE TABLE readings AS SELECT n FROM generate_series(1, 1000) AS n; SELECT 1",
    )
    .await
    .unwrap();

    postgres.kill9();
    assert!(query_text(&url, "SELECT 1").await.is_err());
    postgres.start_again().unwrap();

    let count = query_text(&url, "SELECT count(*) FROM readings").await;
    assert_eq!(count.unwrap(), "1000");
}

#[test]
fn mosquitto_answers_again_after_kill9_and_start_again_on_the_same_port() {
    let mosquitto = Mosquitto::start().unwrap();
    let port = mosquitto.port();

    mosquitto.kill9();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    mosquitto.start_again().unwrap();

    assert_eq!(mosquitto.port(), port);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
}

#[test]
fn tansu_answers_again_after_a_pause_and_after_a_restart() {
    let kafka = Tansu::start().unwrap();
    let topic = unique_name("restart");

    kafka.pause();
    std::thread::scope(|scope| {
        let creating = scope.spawn(|| kafka.create_topic(&topic, 1));
        std::thread::sleep(Duration::from_secs(1));
        assert!(!creating.is_finished(), "a paused broker answered");
        kafka.resume();
        creating.join().unwrap().unwrap();
    });

    kafka.stop();
    kafka.start_again().unwrap();
    // Memory storage starts empty, so the topic has to be created again.
    kafka.create_topic(&topic, 1).unwrap();
}
