//! Credentials and TLS against a private Mosquitto: the bridge logs in with a password kept in a
//! file, and connects over TLS with a private CA and a client certificate. Secrets never show in
//! `print-config` or in the logs.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{bridge_config, read_topic, toml_of, topics, BridgeProcess};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use telemetry_bridge::config::MqttTlsConfig;
use test_servers::{shared, unique_name, Mosquitto};

/// Publishes one message with QoS 1 (as `credentials` when given) and waits for its PUBACK.
async fn publish_one(port: u16, credentials: Option<(&str, &str)>, topic: &str, payload: &str) {
    let mut options = MqttOptions::new(unique_name("device"), "127.0.0.1", port);
    if let Some((username, password)) = credentials {
        options.set_credentials(username, password);
    }
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    client
        .publish(topic, QoS::AtLeastOnce, false, payload.to_owned())
        .await
        .unwrap();
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), eventloop.poll())
            .await
            .expect("PUBACK within 30 s")
            .expect("device connection");
        if let Event::Incoming(Packet::PubAck(_)) = event {
            break;
        }
    }
    client.disconnect().await.unwrap();
}

fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn print_config(config_file: &Path, env: &[(&str, &str)]) -> String {
    run(Command::new(env!("CARGO_BIN_EXE_telemetry-bridge"))
        .arg("--config")
        .arg(config_file)
        .arg("print-config")
        .envs(env.iter().copied()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_from_a_file_logs_in_and_shows_neither_in_print_config_nor_in_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let secret = format!("pw-{}", unique_name("secret"));
    let passwords = dir.path().join("mosquitto.passwd");
    run(Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&passwords)
        .args(["bridge", &secret]));
    run(Command::new("mosquitto_passwd")
        .arg("-b")
        .arg(&passwords)
        .args(["device", "device-password"]));
    let mosquitto = Mosquitto::start_with_config(&format!(
        "allow_anonymous false\npassword_file {}\n",
        passwords.display()
    ))
    .expect("Mosquitto with a password file");
    let kafka = topics(&shared().kafka, 1);
    let user = unique_name("u");
    let password_file = dir.path().join("bridge-password");
    std::fs::write(&password_file, format!("{secret}\n")).unwrap();
    let kafka_secret = dir.path().join("kafka-password");
    std::fs::write(&kafka_secret, "kafka-s3cr3t-from-file\n").unwrap();

    let mut config = bridge_config(
        &kafka,
        mosquitto.port(),
        vec![format!("users/{user}/devices/+/telemetry")],
    );
    config.mqtt.username = Some("bridge".into());
    config.mqtt.password_file = Some(password_file.clone());

    // print-config shows where secrets come from, never what they are.
    let mut shown_config = config.clone();
    shown_config
        .kafka
        .secret_files
        .insert("sasl.password".into(), kafka_secret.clone());
    shown_config
        .kafka
        .properties
        .insert("ssl.key.password".into(), "inline-kafka-s3cr3t".into());
    let shown_file = dir.path().join("shown.toml");
    std::fs::write(&shown_file, toml_of(&shown_config)).unwrap();
    let printed = print_config(&shown_file, &[]);
    assert!(
        printed.contains(&password_file.display().to_string()),
        "{printed}"
    );
    assert!(!printed.contains(&secret), "{printed}");
    assert!(!printed.contains("s3cr3t"), "{printed}");
    // The same password given through the environment prints as stars.
    let mut from_env = config.clone();
    from_env.mqtt.password_file = None;
    let env_file = dir.path().join("env.toml");
    std::fs::write(&env_file, toml_of(&from_env)).unwrap();
    let printed = print_config(&env_file, &[("TELEMETRY_BRIDGE_MQTT__PASSWORD", &secret)]);
    assert!(printed.contains("password = \"***\""), "{printed}");
    assert!(!printed.contains(&secret), "{printed}");

    let mut bridge = BridgeProcess::start(&config, &[("RUST_LOG", "debug")]);
    bridge.wait_ready().await;
    publish_one(
        mosquitto.port(),
        Some(("device", "device-password")),
        &format!("users/{user}/devices/d1/telemetry"),
        r#"{"v":1}"#,
    )
    .await;
    let records = read_topic(&kafka, &kafka.topic, Duration::from_secs(60), |r| {
        !r.is_empty()
    });
    bridge.terminate();

    assert_eq!(records.len(), 1, "the bridge logged in and forwarded");
    let log = bridge.log_text();
    assert!(log.contains("connected to the MQTT broker"), "{log}");
    assert!(
        !log.contains(&secret),
        "the password leaked into the log:\n{log}"
    );
}

/// A throwaway CA with a server certificate for 127.0.0.1 and a client certificate, made with
/// the openssl command line tool (Debian's `openssl` package).
fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        run(Command::new("openssl").current_dir(dir).args(args));
    };
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"],
            &ec[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "1",
                "-subj",
                "/CN=telemetry test CA",
            ],
        ]
        .concat(),
    );
    for (name, subject) in [
        ("server", "/CN=127.0.0.1"),
        ("client", "/CN=telemetry-bridge"),
    ] {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let pem = format!("{name}.pem");
        let ext = format!("{name}.ext");
        openssl(
            &[
                &["req"],
                &ec[..],
                &["-keyout", &key, "-out", &csr, "-subj", subject],
            ]
            .concat(),
        );
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "1",
            "-extfile",
            &ext,
        ]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_and_a_client_certificate_reaches_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let tls_port = common::free_port();
    let path = |name: &str| dir.path().join(name).display().to_string();
    // A second listener that speaks only TLS and wants a client certificate from our CA; the
    // first, plain one is where the devices publish.
    let mosquitto = Mosquitto::start_with_config(&format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        path("ca.pem"),
        path("server.pem"),
        path("server.key"),
    ))
    .expect("Mosquitto with a TLS listener");
    let kafka = topics(&shared().kafka, 1);
    let user = unique_name("u");
    let mut config = bridge_config(
        &kafka,
        tls_port,
        vec![format!("users/{user}/devices/+/telemetry")],
    );
    config.mqtt.tls = Some(MqttTlsConfig {
        ca_file: dir.path().join("ca.pem"),
        client_cert_file: Some(dir.path().join("client.pem")),
        client_key_file: Some(dir.path().join("client.key")),
    });

    let mut bridge = BridgeProcess::start(&config, &[]);
    bridge.wait_ready().await;
    publish_one(
        mosquitto.port(),
        None,
        &format!("users/{user}/devices/d1/telemetry"),
        r#"{"v":1}"#,
    )
    .await;
    let records = read_topic(&kafka, &kafka.topic, Duration::from_secs(60), |r| {
        !r.is_empty()
    });
    bridge.terminate();
    assert_eq!(
        records.len(),
        1,
        "the bridge forwarded over TLS:\n{}",
        bridge.log_text()
    );
    assert_eq!(records[0].key, format!("{user}/d1"));
}
