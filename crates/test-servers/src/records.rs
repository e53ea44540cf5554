//! Reading a topic back in a test, to check what a stage produced.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message};

use crate::unique_name;

/// A record read back from Kafka, as text.
#[derive(Debug, Clone)]
pub struct KafkaRecord {
    pub key: String,
    pub payload: String,
    pub headers: BTreeMap<String, String>,
    pub partition: i32,
    pub offset: i64,
}

impl KafkaRecord {
    /// The headers, plus "key" and "payload", in one map: handy for asserting on dead letters.
    pub fn into_fields(self) -> BTreeMap<String, String> {
        let mut fields = self.headers;
        fields.insert("key".into(), self.key);
        fields.insert("payload".into(), self.payload);
        fields
    }
}

/// Reads `topic` until at least `count` records are there; panics if they are not within
/// `wait`. Blocks.
pub fn read_at_least(
    bootstrap: &str,
    topic: &str,
    count: usize,
    wait: Duration,
) -> Vec<KafkaRecord> {
    let records = read_topic(bootstrap, topic, wait, |records| records.len() >= count);
    assert!(
        records.len() >= count,
        "{} of {count} records on {topic} within {wait:?}",
        records.len()
    );
    records
}

/// Reads a dead-letter topic until at least `count` letters are there (panics after a minute),
/// each as its headers plus "key" and "payload". Callable from a multi-threaded tokio test: the
/// blocking read runs in place without stalling the runtime's other tasks.
pub fn read_dead_letters(
    bootstrap: &str,
    dlq_topic: &str,
    count: usize,
) -> Vec<BTreeMap<String, String>> {
    let read = || read_at_least(bootstrap, dlq_topic, count, Duration::from_secs(60));
    let records = match tokio::runtime::Handle::try_current() {
        Ok(_) => tokio::task::block_in_place(read),
        Err(_) => read(),
    };
    records.into_iter().map(KafkaRecord::into_fields).collect()
}

/// Reads `topic` from the start, in a group of its own, until `done` says enough arrived (or
/// `wait` passes), then one more second so that records beyond it would show. Blocks.
pub fn read_topic(
    bootstrap: &str,
    topic: &str,
    wait: Duration,
    done: impl Fn(&[KafkaRecord]) -> bool,
) -> Vec<KafkaRecord> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique_name("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_uncommitted")
        .set("fetch.wait.max.ms", "50")
        .create()
        .expect("kafka reader");
    consumer
        .subscribe(&[topic])
        .expect("subscribe to the topic");
    let mut records = Vec::new();
    let deadline = Instant::now() + wait;
    let mut settle_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if settle_until.is_some_and(|t| now > t) || (settle_until.is_none() && now > deadline) {
            return records;
        }
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message.expect("kafka read");
            records.push(KafkaRecord {
                key: text(message.key()),
                payload: text(message.payload()),
                headers: message
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| (h.key.to_owned(), text(h.value)))
                            .collect()
                    })
                    .unwrap_or_default(),
                partition: message.partition(),
                offset: message.offset(),
            });
        }
        if settle_until.is_none() && done(&records) {
            settle_until = Some(Instant::now() + Duration::from_secs(1));
        }
    }
}

fn text(bytes: Option<&[u8]>) -> String {
    String::from_utf8_lossy(bytes.unwrap_or_default()).into_owned()
}
