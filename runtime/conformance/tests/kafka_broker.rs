//! The Kafka test harness against a real Apache Kafka broker (KRaft, from its Maven Central
//! jars): topics, batched produce and read-back with headers, consumer-group commits,
//! cooperative-sticky rebalancing, the idempotent producer, end offsets, resuming inside a
//! record batch, a restart that keeps the data, and cutting the network through the fault
//! proxy. Timings are printed (`--nocapture`) so they can be re-measured.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use spate_conformance::kafka::{
    KafkaBroker, NewRecord, committed_offsets, consume_all, end_offsets, produce, produce_records,
};
use spate_conformance::unique_id;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

fn keyed(n: usize) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    (0..n)
        .map(|i| {
            (
                Some(format!("key-{}", i % 10).into_bytes()),
                format!("value-{i}").into_bytes(),
            )
        })
        .collect()
}

/// Produce `n` records to partition 0 of `topic` as one batch: a long linger collects them
/// all before the first request. Returns their offsets.
async fn produce_one_batch(bootstrap: &str, topic: &str, n: usize) -> Vec<i64> {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "1000")
        .create()
        .unwrap();
    let deliveries: Vec<_> = (0..n)
        .map(|i| {
            producer
                .send_result(
                    FutureRecord::to(topic)
                        .partition(0)
                        .key("k")
                        .payload(&format!("value-{i}")),
                )
                .map_err(|(e, _)| e)
                .unwrap()
        })
        .collect();
    let mut offsets = Vec::new();
    for d in deliveries {
        offsets.push(d.await.unwrap().map_err(|(e, _)| e).unwrap().offset);
    }
    offsets
}

fn group_consumer<C: ConsumerContext>(
    bootstrap: &str,
    group: &str,
    extra: &[(&str, &str)],
    context: C,
) -> BaseConsumer<C> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("broker.address.family", "v4")
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "500");
    for (k, v) in extra {
        config.set(*k, *v);
    }
    config.create_with_context(context).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_records_round_trip_with_headers_across_partitions() {
    let broker = KafkaBroker::start();
    assert!(broker.is_running());
    let topic = unique_id();
    let started = Instant::now();
    broker.create_topic(&topic, 3).await;
    eprintln!(
        "kafka: create_topic (3 partitions, until metadata shows them) took {:?}",
        started.elapsed()
    );

    let records: Vec<NewRecord> = keyed(100)
        .into_iter()
        .enumerate()
        .map(|(i, (key, payload))| NewRecord {
            key,
            payload: Some(payload),
            headers: vec![
                ("seq".into(), i.to_string().into_bytes()),
                ("empty".into(), Vec::new()),
            ],
            partition: None,
        })
        .collect();
    let positions = produce_records(
        &broker.bootstrap(),
        &topic,
        &records,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_eq!(positions.len(), 100);

    let read = consume_all(&broker.bootstrap(), &topic, 100, WAIT);
    assert_eq!(read.len(), 100, "every record reads back");
    let partitions: BTreeSet<i32> = read.iter().map(|r| r.partition).collect();
    assert_eq!(
        partitions,
        BTreeSet::from([0, 1, 2]),
        "10 keys spread over 3"
    );
    for r in &read {
        let seq: usize = String::from_utf8(r.headers[0].1.clone())
            .unwrap()
            .parse()
            .unwrap();
        let (key, payload) = &keyed(100)[seq];
        assert_eq!(&r.key, key);
        assert_eq!(r.payload.as_ref(), Some(payload));
        assert_eq!(
            r.headers,
            vec![
                ("seq".to_owned(), seq.to_string().into_bytes()),
                ("empty".to_owned(), Vec::new()),
            ]
        );
        assert_eq!(
            positions[seq],
            (r.partition, r.offset),
            "produce reported it"
        );
        assert!(r.timestamp.is_some());
    }
    // One key, one partition; offsets from 0 with no gaps; watermarks are the next offset.
    for key in 0..10 {
        let key = format!("key-{key}").into_bytes();
        let parts: BTreeSet<i32> = read
            .iter()
            .filter(|r| r.key.as_deref() == Some(&key[..]))
            .map(|r| r.partition)
            .collect();
        assert_eq!(parts.len(), 1);
    }
    let ends = end_offsets(&broker.bootstrap(), &topic);
    for (p, end) in ends.iter().enumerate() {
        let offsets: Vec<i64> = read
            .iter()
            .filter(|r| r.partition == p as i32)
            .map(|r| r.offset)
            .collect();
        assert_eq!(offsets, (0..*end).collect::<Vec<_>>(), "partition {p}");
    }
    assert_eq!(ends.iter().sum::<i64>(), 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commits_round_trip_through_committed_offsets() {
    let broker = KafkaBroker::start();
    let bootstrap = broker.bootstrap();
    let topic = unique_id();
    let group = unique_id();
    broker.create_topic(&topic, 3).await;
    produce(&bootstrap, &topic, &keyed(30)).await;
    assert_eq!(
        committed_offsets(&bootstrap, &group, &topic),
        vec![None, None, None],
        "no commits yet"
    );

    let (bs, t, g) = (bootstrap.clone(), topic.clone(), group.clone());
    tokio::task::spawn_blocking(move || {
        let consumer = group_consumer(&bs, &g, &[], rdkafka::consumer::DefaultConsumerContext);
        let started = Instant::now();
        consumer.subscribe(&[&t]).unwrap();
        let mut seen = 0;
        let mut first = None;
        while seen < 30 {
            assert!(started.elapsed() < WAIT, "read {seen} of 30");
            if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                m.unwrap();
                first.get_or_insert_with(|| started.elapsed());
                seen += 1;
            }
        }
        eprintln!(
            "kafka: one member's first record after subscribe: {:?}",
            first.unwrap()
        );
        consumer.commit_consumer_state(CommitMode::Sync).unwrap();
        // Also an explicit offset on one partition, as a consumer tracking its own does.
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(&t, 0, rdkafka::Offset::Offset(1))
            .unwrap();
        consumer.commit(&tpl, CommitMode::Sync).unwrap();
    })
    .await
    .unwrap();

    // The committing consumer is gone (it left the group); the commits stay.
    let ends = end_offsets(&bootstrap, &topic);
    let mut expected: Vec<Option<i64>> = ends.iter().map(|e| Some(*e)).collect();
    expected[0] = Some(1);
    assert_eq!(committed_offsets(&bootstrap, &group, &topic), expected);
    assert_eq!(
        committed_offsets(&bootstrap, &unique_id(), &topic),
        vec![None, None, None],
        "another group has none"
    );
}

/// Records every rebalance callback of one member.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl ClientContext for Recorder {}

impl ConsumerContext for Recorder {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let event = match rebalance {
            Rebalance::Assign(tpl) => format!("assign {:?}", partitions(tpl)),
            Rebalance::Revoke(tpl) => format!("revoke {:?}", partitions(tpl)),
            Rebalance::Error(e) => format!("error {e}"),
        };
        self.0.lock().unwrap().push(event);
    }
}

fn partitions(tpl: &rdkafka::TopicPartitionList) -> BTreeSet<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

fn assigned<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> BTreeSet<i32> {
    partitions(&consumer.assignment().unwrap())
}

/// Polls every consumer until `done` holds of their assignments; returns the time taken.
fn poll_until<C: ConsumerContext>(
    consumers: &[&BaseConsumer<C>],
    what: &str,
    done: impl Fn(&[BTreeSet<i32>]) -> bool,
) -> Duration {
    let started = Instant::now();
    loop {
        for c in consumers {
            if let Some(m) = c.poll(Duration::from_millis(50)) {
                m.unwrap();
            }
        }
        let now: Vec<BTreeSet<i32>> = consumers.iter().map(|c| assigned(c)).collect();
        if done(&now) {
            return started.elapsed();
        }
        assert!(started.elapsed() < WAIT, "{what}: assignments {now:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cooperative_sticky_group_splits_partitions_between_members() {
    let broker = KafkaBroker::start();
    let bootstrap = broker.bootstrap();
    let topic = unique_id();
    broker.create_topic(&topic, 3).await;
    produce(&bootstrap, &topic, &keyed(30)).await;

    tokio::task::spawn_blocking(move || {
        let group = unique_id();
        let extra = [("partition.assignment.strategy", "cooperative-sticky")];
        let (a_events, b_events) = (Recorder::default(), Recorder::default());
        let a = group_consumer(&bootstrap, &group, &extra, a_events.clone());
        a.subscribe(&[&topic]).unwrap();
        let alone = poll_until(&[&a], "first member", |s| s[0].len() == 3);
        eprintln!("kafka: first member of a group assigned all 3 partitions after {alone:?}");
        assert!(matches!(
            a.rebalance_protocol(),
            rdkafka::consumer::RebalanceProtocol::Cooperative
        ));

        let b = group_consumer(&bootstrap, &group, &extra, b_events.clone());
        b.subscribe(&[&topic]).unwrap();
        let split = poll_until(&[&a, &b], "split", |s| {
            !s[0].is_empty()
                && !s[1].is_empty()
                && s[0].is_disjoint(&s[1])
                && s[0].union(&s[1]).count() == 3
        });
        eprintln!(
            "kafka: second member joined and partitions split {:?} / {:?} after {split:?}",
            assigned(&a),
            assigned(&b)
        );
        // Incremental: the first member only lost what moved, it never had everything revoked.
        let a_log = a_events.0.lock().unwrap().clone();
        let b_log = b_events.0.lock().unwrap().clone();
        eprintln!("kafka: rebalance callbacks: a {a_log:?}, b {b_log:?}");
        assert!(a_log.iter().any(|e| e.starts_with("revoke")), "{a_log:?}");
        assert!(!a_log.contains(&"revoke {0, 1, 2}".to_owned()), "{a_log:?}");
        assert!(b_log.iter().any(|e| e.starts_with("assign")), "{b_log:?}");

        // The second member leaves (close sends LeaveGroup): the first takes everything back.
        drop(b);
        let back = poll_until(&[&a], "after leave", |s| s[0].len() == 3);
        eprintln!("kafka: after the second member left, the first had all 3 again after {back:?}");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_producer_writes_each_record_once_in_order() {
    let broker = KafkaBroker::start();
    let bootstrap = broker.bootstrap();
    let topic = unique_id();
    broker.create_topic(&topic, 1).await;

    // Two producer sessions (two producer ids), each idempotent with acks=all.
    let first = produce(&bootstrap, &topic, &keyed(50)).await;
    let second = produce(&bootstrap, &topic, &keyed(50)).await;
    let offsets: Vec<i64> = first.iter().chain(&second).map(|(_, o)| *o).collect();
    assert_eq!(offsets, (0..100).collect::<Vec<_>>());
    // One partition whose end is 100 after offsets 0..100 holds no duplicate.
    assert_eq!(end_offsets(&bootstrap, &topic), vec![100]);
    // Every record reads back, however slow the reader (it was one 5 s read for a 101st
    // record, which a slow fresh consumer could end before it had all 100).
    let read = consume_all(&bootstrap, &topic, 100, WAIT);
    let read: Vec<i64> = read.iter().map(|r| r.offset).collect();
    assert_eq!(read, (0..100).collect::<Vec<_>>(), "no duplicates");
}

/// The registry's control topic is compacted: it takes tombstones (a `None` payload), and
/// its active segment — never compacted — reads back every record in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_topic_takes_tombstones() {
    let broker = KafkaBroker::start();
    let bootstrap = broker.bootstrap();
    let topic = unique_id();
    broker.create_compacted_topic(&topic, 1).await;
    let versions = [Some(b"v1".to_vec()), Some(b"v2".to_vec()), None];
    let records: Vec<NewRecord> = versions
        .iter()
        .map(|payload| NewRecord {
            key: Some(b"k".to_vec()),
            payload: payload.clone(),
            ..NewRecord::default()
        })
        .collect();
    produce_records(&bootstrap, &topic, &records, Duration::from_secs(30))
        .await
        .unwrap();
    let read = consume_all(&bootstrap, &topic, 3, WAIT);
    let payloads: Vec<Option<Vec<u8>>> = read.into_iter().map(|r| r.payload).collect();
    assert_eq!(payloads, versions, "a tombstone reads as None");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_are_never_auto_created() {
    // The harness's broker runs with auto.create.topics.enable=false, as most managed
    // clusters do: a missing topic is an error a test can see.
    let broker = KafkaBroker::start();
    let bootstrap = broker.bootstrap();
    let missing = unique_id();

    let started = Instant::now();
    let err = produce_records(
        &bootstrap,
        &missing,
        &[NewRecord {
            payload: Some(b"x".to_vec()),
            ..NewRecord::default()
        }],
        Duration::from_secs(3),
    )
    .await
    .unwrap_err();
    eprintln!(
        "kafka: producing to a missing topic failed after {:?} with {err}",
        started.elapsed()
    );
    assert!(
        matches!(
            err,
            KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageTimedOut | RDKafkaErrorCode::UnknownTopicOrPartition
            )
        ),
        "{err:?}"
    );

    // A consumer that asks for auto-creation does not get it either.
    let (bs, t) = (bootstrap.clone(), missing.clone());
    tokio::task::spawn_blocking(move || {
        let consumer = group_consumer(
            &bs,
            &unique_id(),
            &[("allow.auto.create.topics", "true")],
            rdkafka::consumer::DefaultConsumerContext,
        );
        consumer.subscribe(&[&t]).unwrap();
        let until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < until {
            if let Some(Err(e)) = consumer.poll(Duration::from_millis(100)) {
                eprintln!("kafka: subscribing to a missing topic: {e}");
            }
        }
        let metadata = consumer
            .fetch_metadata(Some(&t), Duration::from_secs(5))
            .unwrap();
        let topic = &metadata.topics()[0];
        eprintln!(
            "kafka: metadata for a missing topic: error {:?}, {} partitions",
            topic.error(),
            topic.partitions().len()
        );
        assert!(topic.partitions().is_empty(), "the topic was not created");
    })
    .await
    .unwrap();
    assert!(consume_all(&bootstrap, &missing, 1, Duration::from_secs(1)).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_network_stalls_producers_and_restore_keeps_the_data() {
    let (broker, proxy) = KafkaBroker::start_behind_proxy();
    let bootstrap = broker.bootstrap();
    assert_eq!(bootstrap, proxy.addr().to_string());
    let topic = unique_id();
    broker.create_topic(&topic, 3).await;
    produce(&bootstrap, &topic, &keyed(10)).await;

    proxy.cut();
    let one = [NewRecord {
        key: Some(b"k".to_vec()),
        payload: Some(b"during the cut".to_vec()),
        ..NewRecord::default()
    }];
    let started = Instant::now();
    let err = produce_records(&bootstrap, &topic, &one, Duration::from_secs(2))
        .await
        .unwrap_err();
    eprintln!(
        "kafka: produce while cut failed after {:?} with {err}",
        started.elapsed()
    );
    assert!(
        matches!(
            err,
            KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut)
        ),
        "{err:?}"
    );
    assert!(broker.is_running(), "the broker itself was never touched");

    proxy.restore();
    let started = Instant::now();
    produce(&bootstrap, &topic, &keyed(10)).await;
    eprintln!("kafka: produce after restore took {:?}", started.elapsed());
    let read = consume_all(&bootstrap, &topic, 20, WAIT);
    assert_eq!(
        read.len(),
        20,
        "the records from before the cut are still there"
    );
    assert_eq!(end_offsets(&bootstrap, &topic).iter().sum::<i64>(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_topics_records_and_committed_offsets() {
    let mut broker = KafkaBroker::start();
    let bootstrap = broker.bootstrap();
    let topic = unique_id();
    let group = unique_id();
    broker.create_topic(&topic, 2).await;
    produce(&bootstrap, &topic, &keyed(500)).await;
    let (bs, t, g) = (bootstrap.clone(), topic.clone(), group.clone());
    tokio::task::spawn_blocking(move || {
        let committer = group_consumer(&bs, &g, &[], rdkafka::consumer::DefaultConsumerContext);
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(&t, 1, rdkafka::Offset::Offset(7))
            .unwrap();
        committer.commit(&tpl, CommitMode::Sync).unwrap();
    })
    .await
    .unwrap();
    let ends = end_offsets(&bootstrap, &topic);

    // SIGKILL: no clean shutdown, the log is recovered at start.
    broker.stop();
    assert!(!broker.is_running());
    let started = Instant::now();
    broker.restart();
    eprintln!("kafka: restart after SIGKILL took {:?}", started.elapsed());
    assert!(broker.is_running());
    assert_eq!(broker.bootstrap(), bootstrap);
    assert_eq!(end_offsets(&bootstrap, &topic), ends, "every record kept");
    assert_eq!(consume_all(&bootstrap, &topic, 500, WAIT).len(), 500);
    assert_eq!(
        committed_offsets(&bootstrap, &group, &topic),
        vec![None, Some(7)],
        "committed offsets kept"
    );
    produce(&bootstrap, &topic, &keyed(10)).await;
    assert_eq!(end_offsets(&bootstrap, &topic).iter().sum::<i64>(), 510);
}

/// The end offsets the broker answers (`ListOffsets(latest)`) are the records produced,
/// also when thousands share a batch — what lag and the API's topic view are built on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_offsets_count_every_record_of_large_batches() {
    let broker = KafkaBroker::start();
    let bootstrap = broker.bootstrap();
    let topic = unique_id();
    broker.create_topic(&topic, 1).await;
    let offsets = produce_one_batch(&bootstrap, &topic, 5_000).await;
    assert_eq!(offsets, (0..5_000).collect::<Vec<_>>());
    let batches = broker.record_batches(&topic, 0);
    eprintln!("kafka: 5,000 records stored as batches {batches:?}");
    assert!(
        batches.iter().any(|(_, n)| *n >= 1_000),
        "the producer did not batch: {batches:?}"
    );
    assert_eq!(
        batches.iter().map(|(_, n)| i64::from(*n)).sum::<i64>(),
        5_000
    );
    assert_eq!(end_offsets(&bootstrap, &topic), vec![5_000]);
    let (bs, t) = (bootstrap.clone(), topic.clone());
    let (low, high) = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bs)
            .create()
            .unwrap();
        consumer
            .fetch_watermarks(&t, 0, Duration::from_secs(10))
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!((low, high), (0, 5_000));
}

/// What a consumer resuming from committed offset `at` reads, on a fresh one-partition
/// topic whose first `batch` records were produced as one batch and the next `batch` as
/// another.
async fn resume_inside_a_batch(broker: &KafkaBroker, batch: usize, at: i64) -> Vec<i64> {
    let bootstrap = broker.bootstrap();
    let topic = unique_id();
    broker.create_topic(&topic, 1).await;
    produce_one_batch(&bootstrap, &topic, batch).await;
    produce_one_batch(&bootstrap, &topic, batch).await;
    let stored = broker.record_batches(&topic, 0);
    assert!(
        stored.len() <= 4
            && stored
                .iter()
                .any(|(base, n)| *base < at && at < base + i64::from(*n)),
        "offset {at} is not inside a stored batch: {stored:?}"
    );
    let last = i64::try_from(2 * batch).unwrap() - 1;
    tokio::task::spawn_blocking(move || {
        let group = unique_id();
        let committer = group_consumer(
            &bootstrap,
            &group,
            &[],
            rdkafka::consumer::DefaultConsumerContext,
        );
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, rdkafka::Offset::Offset(at))
            .unwrap();
        committer.commit(&tpl, CommitMode::Sync).unwrap();
        drop(committer);
        let consumer = group_consumer(
            &bootstrap,
            &group,
            &[],
            rdkafka::consumer::DefaultConsumerContext,
        );
        consumer.subscribe(&[&topic]).unwrap();
        let started = Instant::now();
        let mut offsets = Vec::new();
        // Until the last offset arrives, then a little longer to catch duplicates.
        let mut until = WAIT;
        while started.elapsed() < until {
            if let Some(m) = consumer.poll(Duration::from_millis(50)) {
                let offset = rdkafka::Message::offset(&m.unwrap());
                offsets.push(offset);
                if offset == last {
                    until = started.elapsed() + Duration::from_secs(1);
                }
            }
        }
        offsets
    })
    .await
    .unwrap()
}

/// A consumer group that resumes at a committed offset inside a record batch reads the rest
/// of that batch and everything after, once — what Spate's consumer does after every
/// restart, rebalance and pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_inside_a_batch_reads_the_rest_of_it() {
    let broker = KafkaBroker::start();
    let read = resume_inside_a_batch(&broker, 10, 5).await;
    assert_eq!(read, (5..20).collect::<Vec<_>>());
    let read = resume_inside_a_batch(&broker, 3_000, 1_234).await;
    assert_eq!(read, (1_234..6_000).collect::<Vec<_>>());
}
