//! Outages during load, on servers of the tests' own: PgBouncer and PostgreSQL restarts, a
//! PostgreSQL crash and a frozen Kafka broker. Nothing is lost, nothing duplicated, nothing
//! dead-lettered, and the worker resumes by itself.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::Fixture;
use test_servers::{shared, unique_name, PgBouncer, Postgres, Tansu};

const TWO_MINUTES: Duration = Duration::from_secs(120);

/// Waits until the worker's /readyz answers `status`, within 30 s; returns whether it did.
async fn readiness_becomes(http: SocketAddr, status: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if test_servers::http_get(http, "/readyz")
            .await
            .map(|(s, _)| s)
            == Some(status)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// (name, stop, start, whether the worker must notice)
type Outage<'a> = (&'a str, &'a dyn Fn(), &'a dyn Fn(), bool);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_restarts_and_a_crash_during_load_lose_duplicate_and_dead_letter_nothing() {
    let postgres = Postgres::start().expect("private PostgreSQL");
    let pgbouncer = PgBouncer::start(&postgres).expect("private PgBouncer");
    let fixture = Fixture::on(&postgres, &pgbouncer, &shared().kafka, 3);
    let records = fixture.records(16_000, 30);
    let mut config = fixture.worker_config(&unique_name("group"));
    // PgBouncer holds queries while PostgreSQL is away; the write timeout turns that into
    // retries and readiness false.
    config.postgres.write_timeout_ms = 3_000;
    let http = config.http.listen;
    let worker = fixture.start_worker_with(config);
    let producing = fixture.produce_at(records.clone(), 1_000);
    assert!(readiness_becomes(http, 200).await, "ready at start");

    // (name, stop, start, whether the worker must notice). After a crash of the postmaster its
    // backends may keep serving open connections until they notice, so the worker may never
    // see that one; it must only lose nothing.
    let outages: [Outage; 3] = [
        (
            "PgBouncer restart",
            &|| pgbouncer.stop(),
            &|| pgbouncer.start_again().expect("PgBouncer back"),
            true,
        ),
        (
            "PostgreSQL restart",
            &|| postgres.stop(),
            &|| postgres.start_again().expect("PostgreSQL back"),
            true,
        ),
        (
            "PostgreSQL crash",
            &|| postgres.kill9(),
            &|| postgres.start_again().expect("PostgreSQL recovered"),
            false,
        ),
    ];
    for (name, down, up, noticed) in outages {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = fixture.row_count().await;
        down();
        if noticed {
            assert!(
                readiness_becomes(http, 503).await,
                "{name}: not ready while down"
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        up();
        assert!(
            readiness_becomes(http, 200).await,
            "{name}: ready again by itself"
        );
        println!("{name}: {before} rows before, resumed");
    }
    producing.await.unwrap();

    let stored = fixture
        .wait_for_rows(records.len() as i64, TWO_MINUTES)
        .await;
    worker.stop().await;
    assert_eq!(stored, records.len() as i64);
    fixture.assert_stored_exactly_once(&records).await;
    assert_eq!(
        fixture.count_dead_letters(),
        0,
        "an outage never sends records to the DLQ"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_frozen_for_ten_seconds_during_load_loses_and_duplicates_nothing() {
    let kafka = Tansu::start().expect("private Tansu");
    let servers = shared();
    let fixture = Fixture::on(&servers.postgres, &servers.pgbouncer, &kafka, 3);
    let records = fixture.records(12_000, 30);
    let worker = fixture.start_worker(&unique_name("group"));
    let producing = fixture.produce_at(records.clone(), 1_000);

    tokio::time::sleep(Duration::from_secs(3)).await;
    kafka.pause();
    let frozen_at = fixture.row_count().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    kafka.resume();
    println!("broker frozen with {frozen_at} rows stored");
    producing.await.unwrap();

    let stored = fixture
        .wait_for_rows(records.len() as i64, TWO_MINUTES)
        .await;
    worker.stop().await;
    assert_eq!(stored, records.len() as i64);
    fixture.assert_stored_exactly_once(&records).await;
}
