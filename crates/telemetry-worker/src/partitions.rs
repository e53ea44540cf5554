//! The partitions an operator command (`replay`, `redrive`) works on.

use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::KafkaError;

#[derive(Debug, thiserror::Error)]
pub enum PartitionsError {
    #[error("cannot talk to Kafka while reading the partitions of '{topic}': {source}")]
    Kafka {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("topic '{0}' does not exist or has no partitions")]
    NoTopic(String),
    #[error("topic '{topic}' has no partition {partition} (it has {count})")]
    NoSuchPartition {
        topic: String,
        partition: i32,
        count: usize,
    },
}

/// The chosen partitions of `topic`, sorted and checked against it; all of them when none is
/// chosen.
pub fn chosen_partitions<C: ConsumerContext>(
    consumer: &impl Consumer<C>,
    topic: &str,
    chosen: &[i32],
    timeout: Duration,
) -> Result<Vec<i32>, PartitionsError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|source| PartitionsError::Kafka {
            topic: topic.to_owned(),
            source,
        })?;
    let mut existing: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    existing.sort_unstable();
    if existing.is_empty() {
        return Err(PartitionsError::NoTopic(topic.to_owned()));
    }
    if chosen.is_empty() {
        return Ok(existing);
    }
    if let Some(&missing) = chosen.iter().find(|p| !existing.contains(p)) {
        return Err(PartitionsError::NoSuchPartition {
            topic: topic.to_owned(),
            partition: missing,
            count: existing.len(),
        });
    }
    let mut chosen = chosen.to_vec();
    chosen.sort_unstable();
    chosen.dedup();
    Ok(chosen)
}
