//! Who may do what, on real servers: the broker's logins and access rules as the local stack
//! sets them (and the Docker stack's EMQX files, read statically), usernames that try to widen
//! their access, secrets kept out of logs and metrics, and the API's database role.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{reason, Answer, Device};
use test_servers::{free_addr, http_get, shared, unique_name};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_clients_and_wrong_passwords_are_refused() {
    // The local stack writes these lines into its mosquitto.conf; the broker below has them too.
    let stack = repo_file("scripts/stack.sh");
    for line in [
        "echo \"allow_anonymous false\"",
        "echo \"password_file $passwords\"",
        "echo \"acl_file $here/scripts/mosquitto-acl.conf\"",
    ] {
        assert!(stack.contains(line), "scripts/stack.sh lost `{line}`");
    }
    // The Docker stack's EMQX: a password check for every client, and the ACL has the last word.
    let emqx = repo_file("deploy/emqx/emqx.conf");
    assert!(
        emqx.contains("mechanism = password_based"),
        "EMQX authentication"
    );
    assert!(
        !emqx.contains("allow_anonymous = true"),
        "EMQX allows anonymous"
    );
    assert!(
        emqx.contains("no_match = deny"),
        "EMQX authorization default"
    );
    let acl = repo_file("deploy/emqx/acl.conf");
    let rules: Vec<&str> = acl
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(str::trim)
        .collect();
    assert_eq!(rules.last(), Some(&"{deny, all}."), "EMQX ACL ends in deny");
    for rule in &rules {
        if rule.contains("{allow, all") {
            assert!(rule.contains("users/${username}/"), "{rule} is open to all");
        }
    }

    let user = unique_name("owner");
    let broker = support::broker_with_access_rules(&[(&user, "right-password")]);
    assert_eq!(
        Device::connect(broker.port(), None).await.unwrap_err(),
        reason::NOT_AUTHORIZED,
        "an anonymous client"
    );
    assert_eq!(
        Device::connect(broker.port(), Some((&user, "wrong-password")))
            .await
            .unwrap_err(),
        reason::NOT_AUTHORIZED,
        "a wrong password"
    );
    assert!(
        Device::connect(broker.port(), Some((&user, "right-password")))
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_owner_can_neither_write_as_another_user_nor_write_alerts_nor_read_another_users_alerts(
) {
    let (alice, bob) = (unique_name("alice"), unique_name("bob"));
    let broker = support::broker_with_access_rules(&[
        (&alice, "alice-pw"),
        (&bob, "bob-pw"),
        ("telemetry-worker", "worker-pw"),
    ]);
    let port = broker.port();
    let mut device = Device::connect(port, Some((&alice, "alice-pw")))
        .await
        .unwrap();
    let reading = br#"{"v":1}"#;
    let own = format!("users/{alice}/devices/d1/telemetry");
    assert!(device.publish(own.as_bytes(), reading).await.accepted());
    for topic in [
        format!("users/{bob}/devices/d1/telemetry"),
        format!("users/{alice}/devices/d1/alerts"),
        format!("users/{bob}/devices/d1/alerts"),
        format!("users/{alice}/devices/d1/telemetry/extra"),
    ] {
        assert_eq!(
            device.publish(topic.as_bytes(), reading).await,
            Answer::PubAck(reason::NOT_AUTHORIZED),
            "{alice} publishing to {topic}"
        );
    }

    // Alice subscribes to bob's alerts and her own; Mosquitto 2.0 grants both and checks read
    // access per message. An alert for bob, then one for alice: she sees only hers, and since the
    // broker sends in order, bob's would have come first.
    let mut reader = Device::connect(port, Some((&alice, "alice-pw")))
        .await
        .unwrap();
    reader
        .subscribe(&format!("users/{bob}/devices/+/alerts"))
        .await;
    reader
        .subscribe(&format!("users/{alice}/devices/+/alerts"))
        .await;
    let mut bob_reader = Device::connect(port, Some((&bob, "bob-pw"))).await.unwrap();
    bob_reader
        .subscribe(&format!("users/{bob}/devices/+/alerts"))
        .await;
    let mut worker = Device::connect(port, Some(("telemetry-worker", "worker-pw")))
        .await
        .unwrap();
    let bobs = format!("users/{bob}/devices/d1/alerts");
    let alices = format!("users/{alice}/devices/d1/alerts");
    assert!(worker.publish(bobs.as_bytes(), b"for bob").await.accepted());
    assert!(worker
        .publish(alices.as_bytes(), b"for alice")
        .await
        .accepted());
    assert_eq!(
        bob_reader.next_message().await,
        Some((bobs, b"for bob".to_vec()))
    );
    assert_eq!(
        reader.next_message().await,
        Some((alices, b"for alice".to_vec())),
        "alice must get her own alert and nothing of bob's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usernames_with_wildcards_or_slashes_gain_no_access_beyond_their_own_topics() {
    let alice = unique_name("alice");
    let logins = [
        (alice.as_str(), "alice-pw"),
        ("+", "plus-pw"),
        ("u+x", "plus-pw"),
        ("a/b", "slash-pw"),
        ("telemetry-worker", "worker-pw"),
    ];
    let broker = support::broker_with_access_rules(&logins);
    let port = broker.port();
    // A password file line starting with '#' is a comment: such a user cannot exist.
    let passwords = support::password_file(&[("#", "hash-pw")]).unwrap();
    let hash_broker = test_servers::Mosquitto::start_with_config(&format!(
        "allow_anonymous false\npassword_file {}\nacl_file {}\n",
        passwords.display(),
        support::acl_file().display()
    ))
    .unwrap();
    assert_eq!(
        Device::connect(hash_broker.port(), Some(("#", "hash-pw")))
            .await
            .unwrap_err(),
        reason::NOT_AUTHORIZED
    );

    let alices_device = format!("users/{alice}/devices/d1/telemetry");
    // `users/%u/devices/+/telemetry` with %u = "+" would be every user's telemetry; Mosquitto
    // denies a username holding '+' or '#' every pattern rule ("dangerous username").
    for user in ["+", "u+x"] {
        let mut device = Device::connect(port, Some((user, "plus-pw")))
            .await
            .unwrap();
        assert_eq!(
            device.publish(alices_device.as_bytes(), b"{\"v\":1}").await,
            Answer::PubAck(reason::NOT_AUTHORIZED),
            "{user} publishing as {alice}"
        );
        let own = format!("users/{user}/devices/d1/telemetry");
        assert_eq!(
            device.publish(own.as_bytes(), b"{\"v\":1}").await,
            Answer::Disconnect(reason::PROTOCOL_ERROR),
            "{user}: its own topic holds a wildcard"
        );
    }
    // With a '/' the pattern gains levels: "a/b" may write users/a/b/devices/+/telemetry,
    // which no contract topic (five levels) and no other user's topic is.
    let mut slash = Device::connect(port, Some(("a/b", "slash-pw")))
        .await
        .unwrap();
    assert!(slash
        .publish(b"users/a/b/devices/d1/telemetry", b"{\"v\":1}")
        .await
        .accepted());
    assert!(
        telemetry_core::contract::parse_telemetry_topic(b"users/a/b/devices/d1/telemetry").is_err()
    );
    for topic in [
        alices_device.as_str(),
        "users/a/devices/b/telemetry",
        "users/b/devices/d1/telemetry",
    ] {
        assert_eq!(
            slash.publish(topic.as_bytes(), b"{\"v\":1}").await,
            Answer::PubAck(reason::NOT_AUTHORIZED),
            "a/b publishing to {topic}"
        );
    }

    // Reading: "+" subscribes to alice's alerts but gets nothing; alice, reading hers, gets the
    // alert, and the broker's answer to a ping after that shows nothing was queued for "+".
    let mut plus = Device::connect(port, Some(("+", "plus-pw"))).await.unwrap();
    plus.subscribe(&format!("users/{alice}/devices/+/alerts"))
        .await;
    plus.subscribe("users/+/devices/+/alerts").await;
    let mut alice_reader = Device::connect(port, Some((&alice, "alice-pw")))
        .await
        .unwrap();
    alice_reader
        .subscribe(&format!("users/{alice}/devices/+/alerts"))
        .await;
    let mut worker = Device::connect(port, Some(("telemetry-worker", "worker-pw")))
        .await
        .unwrap();
    let alert = format!("users/{alice}/devices/d1/alerts");
    assert!(worker.publish(alert.as_bytes(), b"alert").await.accepted());
    assert!(alice_reader.next_message().await.is_some());
    assert_eq!(
        plus.messages_before_ping().await,
        Vec::<(String, Vec<u8>)>::new()
    );
}

/// A stage's real binary, built beside this test (`cargo build -p <name>`), with its stderr in
/// a file the test reads back.
struct Stage {
    name: &'static str,
    child: Child,
    log: PathBuf,
    http: SocketAddr,
}

fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let binary = exe.parent().unwrap().parent().unwrap().join(name);
    assert!(
        binary.exists(),
        "{} is missing: run `cargo build -p {name}` first",
        binary.display()
    );
    binary
}

impl Stage {
    fn start(name: &'static str, args: &[String], env: &[(&str, &str)]) -> Stage {
        let http = free_addr();
        let log = test_servers::log_dir().join(format!("{}.log", unique_name(name)));
        let child = Command::new(binary(name))
            .args(args)
            .args(["--http-listen", &http.to_string()])
            // Debug logs: a secret must not show even there.
            .env("RUST_LOG", "debug,librdkafka=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        Stage {
            name,
            child,
            log,
            http,
        }
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while http_get(self.http, "/readyz").await.map(|(s, _)| s) != Some(200) {
            assert!(
                Instant::now() < deadline && self.child.try_wait().unwrap().is_none(),
                "{} not ready; log:\n{}",
                self.name,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Its /metrics page, then SIGTERM and its whole log.
    async fn finish(mut self) -> (String, String) {
        let metrics = http_get(self.http, "/metrics")
            .await
            .map(|(_, page)| page)
            .unwrap_or_default();
        test_servers::terminate(&mut self.child, Duration::from_secs(40));
        (metrics, std::fs::read_to_string(&self.log).unwrap())
    }
}

/// GET with a bearer token; returns the status.
async fn get_with_token(address: SocketAddr, path: &str, token: &str) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("API answers within 30 s")
    .unwrap();
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_and_tokens_never_show_in_logs_or_metrics() {
    let servers = shared();
    let mqtt_secret = format!("mqtt-{}", unique_name("s3cret"));
    let db_secret = format!("db-{}", unique_name("s3cret"));
    let reader_secret = format!("reader-{}", unique_name("s3cret"));
    let admin_secret = format!("admin-{}", unique_name("s3cret"));
    let user = unique_name("owner");
    let broker = support::broker_with_access_rules(&[
        (&user, "device-pw"),
        ("telemetry-bridge", &mqtt_secret),
    ]);
    let database = unique_name("secrets");
    servers.postgres.create_database(&database).unwrap();
    let topic = unique_name("iot_stream");
    let dlq = format!("{topic}_dlq");
    servers.kafka.create_topic(&topic, 1).unwrap();
    servers.kafka.create_topic(&dlq, 1).unwrap();
    let brokers = servers.kafka.bootstrap();
    let kafka_args = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = ["--brokers", &brokers, "--topic", &topic]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };

    // The servers trust local logins, so any password gets in: what matters is where it shows.
    let pgbouncer_port = servers.pgbouncer.port();
    let worker_url =
        format!("postgres://postgres:{db_secret}@127.0.0.1:{pgbouncer_port}/{database}");
    let pg_port = servers.postgres.port();
    let admin_url = format!("postgres://postgres:{admin_secret}@127.0.0.1:{pg_port}/{database}");
    let reader_url =
        format!("postgres://telemetry_reader:{reader_secret}@127.0.0.1:{pg_port}/{database}");

    let mut worker = Stage::start(
        "telemetry-worker",
        &kafka_args(&[
            "--dlq-topic",
            &dlq,
            "--group-id",
            &unique_name("group"),
            "--database-url",
            &worker_url,
        ]),
        &[],
    );
    let config = test_servers::log_dir().join(format!("{}.toml", unique_name("bridge")));
    std::fs::write(
        &config,
        format!(
            "[mqtt]\nhost = \"127.0.0.1\"\nport = {}\nclient_id = \"{}\"\nusername = \"telemetry-bridge\"\n",
            broker.port(),
            unique_name("bridge")
        ),
    )
    .unwrap();
    let mut bridge_args = kafka_args(&["--dlq-topic", &dlq]);
    bridge_args.extend(["--config".into(), config.display().to_string()]);
    let mut bridge = Stage::start(
        "telemetry-bridge",
        &bridge_args,
        &[("TELEMETRY_BRIDGE_MQTT__PASSWORD", &mqtt_secret)],
    );
    worker.wait_ready().await;
    bridge.wait_ready().await;

    let mut device = Device::connect(broker.port(), Some((&user, "device-pw")))
        .await
        .unwrap();
    let device_topic = format!("users/{user}/devices/d1/telemetry");
    assert!(device
        .publish(device_topic.as_bytes(), br#"{"seq":0,"v":1}"#)
        .await
        .accepted());
    let (client, connection) =
        tokio_postgres::connect(&servers.postgres.url(&database), tokio_postgres::NoTls)
            .await
            .unwrap();
    tokio::spawn(connection);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stored = client
            .query_one("SELECT count(*) FROM raw_telemetry", &[])
            .await
            .map(|row| row.get::<_, i64>(0))
            .unwrap_or(0);
        if stored == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the reading was not stored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The API: migrations and a token through the admin URL, queries as the reader.
    let api_args = |extra: &[&str]| -> Vec<String> {
        let mut args = kafka_args(&[
            "--database-url",
            &reader_url,
            "--admin-database-url",
            &admin_url,
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let created = Command::new(binary("telemetry-api"))
        .args(["token", "create", "--user", &user])
        .args(api_args(&[]))
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let token_log = String::from_utf8_lossy(&created.stderr).into_owned();
    assert!(created.status.success(), "token create: {token_log}");
    let token = String::from_utf8_lossy(&created.stdout)
        .split_whitespace()
        .find(|word| word.starts_with("tpa_"))
        .expect("a token on stdout")
        .to_owned();
    let listen = free_addr();
    let mut api = Stage::start(
        "telemetry-api",
        &api_args(&["--listen", &listen.to_string()]),
        &[],
    );
    api.wait_ready().await;
    let path = format!("/v1/devices/{user}/d1/latest");
    assert_eq!(get_with_token(listen, &path, &token).await, 200);
    let forged = format!("{token}x");
    assert_eq!(get_with_token(listen, &path, &forged).await, 401);

    let secrets = [
        ("MQTT password", mqtt_secret.as_str()),
        ("worker database password", db_secret.as_str()),
        ("API reader password", reader_secret.as_str()),
        ("API admin password", admin_secret.as_str()),
        ("API token", token.trim_start_matches("tpa_")),
    ];
    let mut outputs = vec![("telemetry-api token create log".to_owned(), token_log)];
    for stage in [worker, bridge, api] {
        let name = stage.name;
        let (metrics, log) = stage.finish().await;
        assert!(
            !log.is_empty() && !metrics.is_empty(),
            "{name}: no log or metrics"
        );
        outputs.push((format!("{name} /metrics"), metrics));
        outputs.push((format!("{name} log"), log));
    }
    for (what, text) in &outputs {
        for (secret_name, secret) in secrets {
            assert!(
                !text.contains(secret),
                "the {secret_name} shows in the {what}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_role_reads_the_telemetry_and_can_write_nothing() {
    let servers = shared();
    let database = unique_name("roles");
    servers.postgres.create_database(&database).unwrap();
    let connect = |url: String| async move {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    };
    let mut owner = connect(servers.postgres.url(&database)).await;
    telemetry_worker::schema::migrate(&mut owner).await.unwrap();
    telemetry_api::schema::migrate(&mut owner, "telemetry_reader")
        .await
        .unwrap();
    owner
        .batch_execute(
            "INSERT INTO raw_telemetry (received_at, ingested_at, user_id, device_id, payload, kafka_partition, kafka_offset) \
             VALUES (now(), now(), 'u', 'd', '{\"v\":1}', 0, 0)",
        )
        .await
        .unwrap();

    let reader = connect(format!(
        "postgres://telemetry_reader@127.0.0.1:{}/{database}",
        servers.postgres.port()
    ))
    .await;
    let rows: i64 = reader
        .query_one("SELECT count(*) FROM raw_telemetry", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
    let refused = |sql: &'static str| {
        let reader = &reader;
        async move {
            // READ WRITE overrides the role's read-only default: the grants must hold alone.
            let error = reader
                .batch_execute(&format!("BEGIN READ WRITE; {sql}; COMMIT"))
                .await
                .expect_err(sql);
            let _ = reader.batch_execute("ROLLBACK").await;
            let code = error
                .code()
                .map(|c| c.code().to_owned())
                .unwrap_or_default();
            assert_eq!(code, "42501", "{sql}: {error}"); // insufficient_privilege
        }
    };
    refused("INSERT INTO raw_telemetry (received_at, user_id, device_id, payload, kafka_partition, kafka_offset) VALUES (now(), 'u', 'd', '{}', 0, 1)").await;
    refused("UPDATE raw_telemetry SET device_id = 'x'").await;
    refused("DELETE FROM raw_telemetry").await;
    refused("TRUNCATE raw_telemetry").await;
    refused("UPDATE ingest_offsets SET next_offset = 0").await;
    refused("CREATE TABLE sneaky (x int)").await;
    refused("DROP TABLE raw_telemetry").await;
    // And by default the role cannot even start a write.
    let error = reader
        .batch_execute("INSERT INTO raw_telemetry (received_at, user_id, device_id, payload, kafka_partition, kafka_offset) VALUES (now(), 'u', 'd', '{}', 0, 2)")
        .await
        .unwrap_err();
    assert_eq!(
        error.code().map(|c| c.code()),
        Some("25006"),
        "read_only_sql_transaction: {error}"
    );
}
