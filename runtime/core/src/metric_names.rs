//! Every metric the runtime records, in one place: its name (the constant the recording
//! site uses), its kind and its HELP text. `spate`'s telemetry describes them all from
//! [`ALL`]; `scripts/validate-deploy` reads this file to check the alert rules and
//! dashboards name real metrics. A new metric is a line here and a `metrics::…!(NAME, …)`
//! where it happens.

/// What a metric is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution (buckets, sum, count).
    Histogram,
}

/// One metric's name, kind and HELP text.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    /// The exposed name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// The HELP line.
    pub help: &'static str,
}

macro_rules! metrics_table {
    ($($id:ident = $name:literal, $kind:ident, $help:literal;)*) => {
        $(
            #[doc = $help]
            pub const $id: &str = $name;
        )*
        /// Every metric, in the order they are described.
        pub const ALL: &[Metric] = &[$(Metric { name: $name, kind: Kind::$kind, help: $help },)*];
    };
}

metrics_table! {
    EVENTS_TOTAL = "spate_events_total", Counter,
        "Events finished per plugin, by outcome (ok, dead-lettered, parked, filtered).";
    HANDLER_DURATION_SECONDS = "spate_handler_duration_seconds", Histogram,
        "Wall-clock time of one handler call, including instantiation.";
    RETRIES_TOTAL = "spate_retries_total", Counter,
        "Handler attempts that failed and were retried.";
    DEAD_LETTERS_TOTAL = "spate_dead_letters_total", Counter,
        "Events sent to the dead-letter topic, by failure kind.";
    TRAPS_TOTAL = "spate_traps_total", Counter,
        "Handler calls that trapped, by kind (deadline, memory, panic, ...).";
    PARTITION_PAUSES_TOTAL = "spate_partition_pauses_total", Counter,
        "Times a partition was paused because its unfinished events reached dispatch.max-buffered-per-partition (backpressure).";
    INFRASTRUCTURE_ERRORS_TOTAL = "spate_infrastructure_errors_total", Counter,
        "Backend failures (state, emit, source) that made an event be retried without counting an attempt.";
    CONSUMER_LAG = "spate_consumer_lag", Gauge,
        "Events appended to a subscribed topic but not yet committed by the plugin.";
    PARKED_EVENTS_TOTAL = "spate_parked_events_total", Counter,
        "Events parked (a failed event, or one queued behind its parked key), by kind.";
    PARKED_KEYS_TOTAL = "spate_parked_keys_total", Counter,
        "Keys that became parked.";
    PARKED_KEYS = "spate_parked_keys", Gauge,
        "Keys of a park-key plugin parked after a failure, waiting for a redrive or a discard (cluster-wide).";
    PARKED_EVENTS = "spate_parked_events", Gauge,
        "Events waiting in the parked keys' queues (cluster-wide).";
    PARKED_OLDEST_SECONDS = "spate_parked_oldest_seconds", Gauge,
        "Age of the oldest parked key (cluster-wide).";
    REDRIVES_TOTAL = "spate_redrives_total", Counter,
        "Operators' requests carried out, by action (redrive, discard, redrive-dead-letters) and outcome.";
    REDRIVEN_EVENTS_TOTAL = "spate_redriven_events_total", Counter,
        "Events handled by a redrive, by outcome (handled, failed, already-redriven).";
    SHADOW_EVENTS_TOTAL = "spate_shadow_events_total", Counter,
        "Events a shadow candidate ran on, by result (identical, differing, trap, skipped).";
    EMIT_RETRIES_TOTAL = "spate_emit_retries_total", Counter,
        "Emits the checkpoint's sender sent again after the bus refused them.";
    TRANSACTION_FAILURES_TOTAL = "spate_transaction_failures_total", Counter,
        "Exactly-once checkpoints whose Kafka transaction failed (the plugin restarts from its last one).";
    CACHE_ERRORS_TOTAL = "spate_cache_errors_total", Counter,
        "Cache writes that failed after an event's durable effects were applied.";
    CACHE_DEGRADED = "spate_cache_degraded", Gauge,
        "1 while the cache backend is unreachable (reads are misses, writes are skipped), else 0.";
    CACHE_UNAVAILABLE_TOTAL = "spate_cache_unavailable_total", Counter,
        "Cache calls that found the backend unreachable.";
    STATE_READS_TOTAL = "spate_state_reads_total", Counter,
        "state.get calls per plugin (compare-and-swap reads included).";
    STATE_STORE_READS_TOTAL = "spate_state_store_reads_total", Counter,
        "state.get calls per plugin that read the state store (not answered by the read-through cache).";
    STATE_CACHE_HITS_TOTAL = "spate_state_cache_hits_total", Counter,
        "state.get calls per plugin answered by the read-through cache.";
    STATE_CACHE_MISSES_TOTAL = "spate_state_cache_misses_total", Counter,
        "state.get calls per plugin the read-through cache could not answer.";
    STATE_CACHE_ERRORS_TOTAL = "spate_state_cache_errors_total", Counter,
        "Read-through cache calls per plugin that failed (reads fall back to the store).";
    STORAGE_FILE_BYTES = "spate_storage_file_bytes", Gauge,
        "Size on disk of each embedded database file (file = log | state).";
    STORAGE_DEGRADED = "spate_storage_degraded", Gauge,
        "1 while an embedded database file cannot be written (a full disk) and is being reopened.";
    STORAGE_COMPACTIONS_TOTAL = "spate_storage_compactions_total", Counter,
        "Compactions of an embedded database file after retention freed space.";
    LOG_RETAINED_BYTES = "spate_log_retained_bytes", Gauge,
        "Bytes of the records the embedded log keeps per topic.";
    LOG_RETAINED_EVENTS = "spate_log_retained_events", Gauge,
        "Events the embedded log keeps per topic.";
    LOG_RETENTION_DELETED_EVENTS_TOTAL = "spate_log_retention_deleted_events_total", Counter,
        "Events the embedded log's retention deleted per topic.";
    GUEST_LOG_LINES_DROPPED_TOTAL = "spate_guest_log_lines_dropped_total", Counter,
        "Guest log lines dropped over the per-event log limits.";
    KAFKA_REBALANCES_TOTAL = "spate_kafka_rebalances_total", Counter,
        "Partition assignments and revocations a Kafka consumer went through, by kind.";
    KAFKA_PRODUCER_RESETS_TOTAL = "spate_kafka_producer_resets_total", Counter,
        "Times the Kafka producer was rebuilt after a fatal error.";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_prometheus_shaped() {
        let mut seen = std::collections::HashSet::new();
        for m in ALL {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(m.name.starts_with("spate_"), "{}", m.name);
            assert!(
                m.name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{}",
                m.name
            );
            assert_eq!(
                m.kind == Kind::Counter,
                m.name.ends_with("_total"),
                "{}",
                m.name
            );
            assert!(!m.help.is_empty(), "{}", m.name);
        }
    }
}
