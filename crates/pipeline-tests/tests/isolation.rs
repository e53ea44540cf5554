//! The local stack's broker access rules (scripts/mosquitto-acl.conf) on a real Mosquitto: a user
//! reads only their own devices' alerts and writes only their own devices' telemetry.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use test_servers::{unique_name, Mosquitto};
use tokio::sync::mpsc;

const USERS: [(&str, &str); 4] = [
    ("alice", "alice-secret"),
    ("bob", "bob-secret"),
    ("telemetry-bridge", "bridge-secret"),
    ("telemetry-worker", "worker-secret"),
];

fn acl_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/mosquitto-acl.conf")
}

/// A Mosquitto of the test's own with a password per user and the stack's ACL file.
fn broker_with_access_rules() -> Mosquitto {
    let passwords = test_servers::log_dir().join(format!("{}.passwd", unique_name("passwd")));
    for (i, (user, password)) in USERS.iter().enumerate() {
        let mut command = Command::new("mosquitto_passwd");
        if i == 0 {
            command.arg("-c");
        }
        let status = command
            .arg("-b")
            .arg(&passwords)
            .args([user, password])
            .status()
            .expect("mosquitto_passwd (sudo apt-get install -y mosquitto)");
        assert!(status.success(), "mosquitto_passwd for {user}");
    }
    Mosquitto::start_with_config(&format!(
        "allow_anonymous false\npassword_file {}\nacl_file {}\n",
        passwords.display(),
        acl_file().display()
    ))
    .expect("private Mosquitto with access rules")
}

/// A connected client of `user`; returns it and the messages it receives.
async fn connect(
    broker: &Mosquitto,
    user: &str,
) -> (AsyncClient, mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
    let password = USERS.iter().find(|(u, _)| *u == user).unwrap().1;
    let mut options = MqttOptions::new(unique_name(user), broker.host(), broker.port());
    options
        .set_credentials(user, password)
        .set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let (sender, received) = mpsc::unbounded_channel();
    let (connected, on_connected) = tokio::sync::oneshot::channel();
    let mut connected = Some(connected);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(connected) = connected.take() {
                        let _ = connected.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = sender.send((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(_) => {}
                Err(error) => panic!("{error}"),
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), on_connected)
        .await
        .expect("CONNACK within 10 s")
        .unwrap();
    (client, received)
}

async fn received_within(
    messages: &mut mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    wait: Duration,
) -> Vec<String> {
    let mut topics = Vec::new();
    while let Ok(Some((topic, _))) = tokio::time::timeout(wait, messages.recv()).await {
        topics.push(topic);
    }
    topics.sort();
    topics
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_receives_only_their_own_alerts_and_cannot_write_another_users_telemetry() {
    let broker = broker_with_access_rules();
    let (alice, mut to_alice) = connect(&broker, "alice").await;
    let (bob, mut to_bob) = connect(&broker, "bob").await;
    let (bridge, mut to_bridge) = connect(&broker, "telemetry-bridge").await;
    let (worker, _) = connect(&broker, "telemetry-worker").await;
    // Alice tries to read Bob's alerts and everything else; only her own may reach her.
    for filter in [
        "users/bob/devices/+/alerts",
        "users/+/devices/+/alerts",
        "#",
    ] {
        alice.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    }
    alice
        .subscribe("users/alice/devices/+/alerts", QoS::AtLeastOnce)
        .await
        .unwrap();
    bob.subscribe("users/bob/devices/+/alerts", QoS::AtLeastOnce)
        .await
        .unwrap();
    bridge
        .subscribe("users/+/devices/+/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    for owner in ["alice", "bob"] {
        worker
            .publish(
                format!("users/{owner}/devices/d1/alerts"),
                QoS::AtLeastOnce,
                false,
                r#"{"event":"raised"}"#,
            )
            .await
            .unwrap();
    }
    // Alice writes telemetry for her device and, refused, for Bob's.
    for owner in ["alice", "bob"] {
        alice
            .publish(
                format!("users/{owner}/devices/d1/telemetry"),
                QoS::AtLeastOnce,
                false,
                r#"{"v":1}"#,
            )
            .await
            .unwrap();
    }

    let wait = Duration::from_secs(2);
    assert_eq!(
        received_within(&mut to_alice, wait).await,
        ["users/alice/devices/d1/alerts"]
    );
    assert_eq!(
        received_within(&mut to_bob, wait).await,
        ["users/bob/devices/d1/alerts"]
    );
    assert_eq!(
        received_within(&mut to_bridge, wait).await,
        ["users/alice/devices/d1/telemetry"],
        "Alice's publish to Bob's device is dropped"
    );
}
