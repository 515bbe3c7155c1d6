#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::record::decode_event;
use super::*;
use crate::types::Header;
use std::time::Duration;

fn event(key: Option<&str>, payload: &str) -> NewEvent {
    NewEvent {
        key: key.map(|k| k.as_bytes().to_vec()),
        payload: payload.as_bytes().to_vec(),
        headers: vec![Header::text("h", payload)],
    }
}

fn with_id(mut e: NewEvent, id: &str) -> NewEvent {
    e.headers.push(Header::text(headers::IDEMPOTENCY_ID, id));
    e
}

fn open(dir: &Path) -> Arc<EmbeddedLog> {
    EmbeddedLog::open(dir, LogConfig::default()).unwrap()
}

async fn next_events(sub: &mut Box<dyn Subscription>) -> Vec<Event> {
    match tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("no message within 10 s")
        .unwrap()
    {
        SourceMessage::Events(events) => events,
        other => panic!("expected events, got {other:?}"),
    }
}

async fn assigned(sub: &mut Box<dyn Subscription>) -> Vec<(TopicPartition, u64)> {
    match sub.next().await.unwrap() {
        SourceMessage::Assigned(a) => a,
        other => panic!("expected assignment, got {other:?}"),
    }
}

#[tokio::test]
async fn append_partitions_by_key_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    assert_eq!(log.ensure_topic("orders", 3).await.unwrap(), 3);
    assert_eq!(log.ensure_topic("orders", 9).await.unwrap(), 3);

    let keys = ["alice", "bob", "carol", "dave", "erin", "alice", "bob"];
    let events: Vec<_> = keys.iter().map(|k| event(Some(k), k)).collect();
    let appended = log.append("orders", events).await.unwrap();
    assert_eq!(appended.len(), keys.len());

    let mut expected_next = [0u64; 3];
    for (key, a) in keys.iter().zip(&appended) {
        assert_eq!(a.partition, partition_for_key(key.as_bytes(), 3));
        assert_eq!(a.offset, expected_next[a.partition as usize]);
        expected_next[a.partition as usize] += 1;
    }
    assert_eq!(log.end_offsets("orders").await.unwrap(), expected_next);

    let alice = partition_for_key(b"alice", 3);
    let read = log.read("orders", alice, 0, 100).await.unwrap();
    let alice_events: Vec<_> = read
        .iter()
        .filter(|e| e.key.as_deref() == Some(b"alice"))
        .collect();
    assert_eq!(alice_events.len(), 2);
    let first = alice_events[0];
    assert_eq!(first.topic, "orders");
    assert_eq!(first.payload, b"alice");
    assert_eq!(first.headers, vec![Header::text("h", "alice")]);
    assert!(first.timestamp_ms > 0);
    assert!(read.windows(2).all(|w| w[0].offset + 1 == w[1].offset));

    // `from` and `max` bound the read.
    let tail = log.read("orders", alice, 1, 1).await.unwrap();
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].offset, 1);
    assert!(log.read("orders", alice, 99, 10).await.unwrap().is_empty());
    assert!(matches!(
        log.read("orders", 3, 0, 10).await,
        Err(BackendError::Invalid(_))
    ));
    assert!(matches!(
        log.read("nope", 0, 0, 10).await,
        Err(BackendError::UnknownTopic(_))
    ));
    assert_eq!(log.partitions("orders").await.unwrap(), Some(3));
    assert_eq!(log.partitions("nope").await.unwrap(), None);
}

#[tokio::test]
async fn keyless_events_spread_round_robin() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    log.ensure_topic("t", 4).await.unwrap();
    let events = (0..8).map(|i| event(None, &i.to_string())).collect();
    log.append("t", events).await.unwrap();
    assert_eq!(log.end_offsets("t").await.unwrap(), vec![2, 2, 2, 2]);
}

#[tokio::test]
async fn auto_create_uses_default_partitions_and_can_be_off() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    log.append("auto", vec![event(Some("k"), "v")])
        .await
        .unwrap();
    assert_eq!(log.partitions("auto").await.unwrap(), Some(4));
    drop(log);

    let strict = LogConfig {
        auto_create_topics: false,
        ..LogConfig::default()
    };
    let log = EmbeddedLog::open(dir.path(), strict).unwrap();
    assert!(matches!(
        log.append("missing", vec![event(None, "x")]).await,
        Err(BackendError::UnknownTopic(t)) if t == "missing"
    ));
    assert!(matches!(
        log.subscribe("g", &["missing".into()], StartPosition::Earliest)
            .await,
        Err(BackendError::UnknownTopic(_))
    ));
    assert_eq!(log.partitions("missing").await.unwrap(), None);
    log.append("auto", vec![event(None, "x")]).await.unwrap();
    assert!(matches!(
        log.append("bad topic!", vec![event(None, "x")]).await,
        Err(BackendError::Invalid(_))
    ));
}

#[tokio::test]
async fn topics_events_and_positions_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path());
        log.ensure_topic("a", 2).await.unwrap();
        let events = (0..10)
            .map(|i| event(Some(&format!("k{i}")), "x"))
            .collect();
        log.append("a", events).await.unwrap();
        let mut sub = log
            .subscribe("g", &["a".into()], StartPosition::Earliest)
            .await
            .unwrap();
        assert_eq!(
            assigned(&mut sub).await,
            vec![
                (TopicPartition::new("a", 0), 0),
                (TopicPartition::new("a", 1), 0)
            ]
        );
        let got = next_events(&mut sub).await;
        assert_eq!(got.len(), 10);
        sub.commit(&[(TopicPartition::new("a", 0), 2)])
            .await
            .unwrap();
    }
    let log = open(dir.path());
    assert_eq!(log.topics(), vec![("a".to_owned(), 2)]);
    let ends = log.end_offsets("a").await.unwrap();
    assert_eq!(ends.iter().sum::<u64>(), 10);
    assert_eq!(
        log.read("a", 0, 0, 100).await.unwrap().len() as u64,
        ends[0]
    );
    assert_eq!(
        log.committed("g", "a").await.unwrap(),
        vec![Some(2), Some(0)]
    );
    assert_eq!(log.committed("other", "a").await.unwrap(), vec![None, None]);
    let mut sub = log
        .subscribe("g", &["a".into()], StartPosition::Latest)
        .await
        .unwrap();
    assert_eq!(
        assigned(&mut sub).await,
        vec![
            (TopicPartition::new("a", 0), 2),
            (TopicPartition::new("a", 1), 0)
        ]
    );
    let got = next_events(&mut sub).await;
    assert_eq!(got.len() as u64, 10 - 2);
    assert!(got.iter().all(|e| e.partition == 1 || e.offset >= 2));
}

#[tokio::test]
async fn latest_start_is_persisted_at_subscribe() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = open(dir.path());
        log.ensure_topic("t", 1).await.unwrap();
        log.append("t", vec![event(None, "old1"), event(None, "old2")])
            .await
            .unwrap();
        let mut sub = log
            .subscribe("g", &["t".into()], StartPosition::Latest)
            .await
            .unwrap();
        assert_eq!(
            assigned(&mut sub).await,
            vec![(TopicPartition::new("t", 0), 2)]
        );
        // Nothing committed before the "crash"; the start position must still hold.
        log.append("t", vec![event(None, "new1")]).await.unwrap();
    }
    let log = open(dir.path());
    log.append("t", vec![event(None, "new2")]).await.unwrap();
    assert_eq!(log.committed("g", "t").await.unwrap(), vec![Some(2)]);
    let mut sub = log
        .subscribe("g", &["t".into()], StartPosition::Latest)
        .await
        .unwrap();
    assert_eq!(
        assigned(&mut sub).await,
        vec![(TopicPartition::new("t", 0), 2)]
    );
    let payloads: Vec<_> = next_events(&mut sub)
        .await
        .into_iter()
        .map(|e| e.payload)
        .collect();
    assert_eq!(payloads, vec![b"new1".to_vec(), b"new2".to_vec()]);
}

#[tokio::test]
async fn fetching_does_not_commit() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    log.ensure_topic("t", 1).await.unwrap();
    log.append("t", vec![event(None, "a"), event(None, "b")])
        .await
        .unwrap();
    let mut sub = log
        .subscribe("g", &["t".into()], StartPosition::Earliest)
        .await
        .unwrap();
    assigned(&mut sub).await;
    assert_eq!(next_events(&mut sub).await.len(), 2);
    assert_eq!(log.committed("g", "t").await.unwrap(), vec![Some(0)]);
    sub.commit(&[(TopicPartition::new("t", 0), 2)])
        .await
        .unwrap();
    assert_eq!(log.committed("g", "t").await.unwrap(), vec![Some(2)]);
}

#[tokio::test]
async fn subscription_wakes_on_new_data() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    let mut sub = log
        .subscribe("g", &["a".into(), "b".into()], StartPosition::Earliest)
        .await
        .unwrap();
    assert_eq!(assigned(&mut sub).await.len(), 8);
    let waiter = tokio::spawn(async move { next_events(&mut sub).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished(), "next() returned without data");
    log.append("b", vec![event(Some("k"), "hello")])
        .await
        .unwrap();
    let got = waiter.await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].topic, "b");
    assert_eq!(got[0].payload, b"hello");
}

#[tokio::test]
async fn paused_partitions_are_not_fetched_until_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    log.ensure_topic("t", 2).await.unwrap();
    let mut sub = log
        .subscribe("g", &["t".into()], StartPosition::Earliest)
        .await
        .unwrap();
    assigned(&mut sub).await;
    let p0 = TopicPartition::new("t", 0);
    sub.pause(&p0);
    // Keyless events alternate partitions: two land in each.
    log.append("t", (0..4).map(|i| event(None, &i.to_string())).collect())
        .await
        .unwrap();
    let got = next_events(&mut sub).await;
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|e| e.partition == 1));
    let idle = tokio::time::timeout(Duration::from_millis(100), sub.next()).await;
    assert!(idle.is_err(), "a paused partition was fetched");
    sub.resume(&p0);
    let got = next_events(&mut sub).await;
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|e| e.partition == 0));
}

#[tokio::test]
async fn busy_partitions_do_not_starve_others() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    log.ensure_topic("busy", 1).await.unwrap();
    log.ensure_topic("quiet", 1).await.unwrap();
    let flood: Vec<_> = (0..2000).map(|i| event(None, &i.to_string())).collect();
    log.append("busy", flood).await.unwrap();
    log.append("quiet", vec![event(None, "q1"), event(None, "q2")])
        .await
        .unwrap();
    let mut sub = log
        .subscribe(
            "g",
            &["busy".into(), "quiet".into()],
            StartPosition::Earliest,
        )
        .await
        .unwrap();
    assigned(&mut sub).await;
    let first = next_events(&mut sub).await;
    assert_eq!(first.len(), 512);
    assert_eq!(first.iter().filter(|e| e.topic == "quiet").count(), 2);
    let busy: Vec<u64> = first
        .iter()
        .filter(|e| e.topic == "busy")
        .map(|e| e.offset)
        .collect();
    assert_eq!(busy, (0..510).collect::<Vec<_>>());
    let mut total = first.len();
    while total < 2002 {
        total += next_events(&mut sub).await.len();
    }
    assert_eq!(total, 2002);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_share_commits_and_are_durable() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path());
    log.ensure_topic("t", 4).await.unwrap();
    let before = log.commits();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move {
                log.append("t", vec![event(Some(&format!("k{i}")), &i.to_string())])
                    .await
            })
        })
        .collect();
    let mut coords = HashSet::new();
    for task in tasks {
        let appended = task.await.unwrap().unwrap();
        assert!(coords.insert((appended[0].partition, appended[0].offset)));
    }
    let commits = log.commits() - before;
    assert!(
        commits <= 50,
        "{commits} transactions for 200 concurrent appends: not group-committed"
    );
    drop(log);

    let log = open(dir.path());
    assert_eq!(log.end_offsets("t").await.unwrap().iter().sum::<u64>(), 200);
    let mut payloads = HashSet::new();
    for p in 0..4 {
        for e in log.read("t", p, 0, 1000).await.unwrap() {
            assert!(coords.contains(&(e.partition, e.offset)));
            payloads.insert(e.payload);
        }
    }
    assert_eq!(payloads.len(), 200);
}

#[tokio::test]
async fn idempotency_ids_dedupe_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let first = {
        let log = open(dir.path());
        log.ensure_topic("out", 4).await.unwrap();
        let a = log
            .append(
                "out",
                vec![
                    with_id(event(None, "one"), "id-1"),
                    with_id(event(None, "two"), "id-2"),
                    // A repeat inside one call lands once too.
                    with_id(event(None, "one again"), "id-1"),
                ],
            )
            .await
            .unwrap();
        assert_eq!(a[0], a[2]);
        assert_ne!(a[0], a[1]);
        assert_eq!(log.end_offsets("out").await.unwrap().iter().sum::<u64>(), 2);
        let again = log
            .append("out", vec![with_id(event(None, "one"), "id-1")])
            .await
            .unwrap();
        assert_eq!(again[0], a[0]);
        a
    };
    let log = open(dir.path());
    let replay = log
        .append(
            "out",
            vec![
                with_id(event(None, "two"), "id-2"),
                with_id(event(None, "three"), "id-3"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(replay[0], first[1]);
    assert_eq!(log.end_offsets("out").await.unwrap().iter().sum::<u64>(), 3);
    // The id is per topic: the same id on another topic is a new event.
    log.append("other", vec![with_id(event(None, "one"), "id-1")])
        .await
        .unwrap();
    assert_eq!(
        log.end_offsets("other").await.unwrap().iter().sum::<u64>(),
        1
    );
    let stored = log
        .read("out", first[0].partition, first[0].offset, 1)
        .await
        .unwrap();
    assert_eq!(stored[0].payload, b"one");
}

fn retained(retention: TopicRetention, compact_min_bytes: u64) -> LogConfig {
    LogConfig {
        retention: RetentionConfig {
            default: retention,
            // The tests run passes themselves.
            interval: Duration::from_secs(3600),
            compact_min_bytes,
            max_deletes_per_commit: 7,
            ..RetentionConfig::default()
        },
        ..LogConfig::default()
    }
}

fn sized(i: usize, len: usize) -> NewEvent {
    NewEvent {
        key: None,
        payload: format!("{i:0len$}").into_bytes(),
        headers: Vec::new(),
    }
}

async fn offsets(log: &EmbeddedLog, topic: &str) -> Vec<u64> {
    log.read(topic, 0, 0, 10_000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.offset)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_size_never_passes_committed_positions() {
    let dir = tempfile::tempdir().unwrap();
    let policy = TopicRetention {
        max_age: None,
        max_partition_bytes: Some(10 * 118),
    };
    let log = EmbeddedLog::open(dir.path(), retained(policy, u64::MAX)).unwrap();
    log.ensure_topic("t", 1).await.unwrap();
    log.ensure_topic("free", 1).await.unwrap();
    let record = encode_record(&sized(0, 100), 0).unwrap().len() as u64;
    assert_eq!(record, 118);
    log.append("t", (0..100).map(|i| sized(i, 100)).collect())
        .await
        .unwrap();
    log.append("free", (0..100).map(|i| sized(i, 100)).collect())
        .await
        .unwrap();
    // Two groups on `t`: the slower one's position bounds what is deleted.
    for group in ["fast", "slow"] {
        let mut sub = log
            .subscribe(group, &["t".into()], StartPosition::Earliest)
            .await
            .unwrap();
        assigned(&mut sub).await;
        let committed = if group == "fast" { 90 } else { 60 };
        sub.commit(&[(TopicPartition::new("t", 0), committed)])
            .await
            .unwrap();
    }

    let report = log.enforce_retention(now_ms()).await.unwrap();
    // `t` stops at the slow group's position; `free` (no group) keeps its last 10.
    assert_eq!(log.start_offsets("t").unwrap(), vec![60]);
    assert_eq!(log.start_offsets("free").unwrap(), vec![90]);
    assert_eq!(report.deleted_events, 60 + 90);
    assert_eq!(report.deleted_bytes, 150 * record);
    assert_eq!(offsets(&log, "t").await, (60..100).collect::<Vec<_>>());
    assert_eq!(offsets(&log, "free").await, (90..100).collect::<Vec<_>>());
    let usage = log.usage();
    assert_eq!(usage[0].topic, "free");
    assert_eq!((usage[0].events, usage[0].bytes), (10, 10 * record));
    assert_eq!((usage[1].events, usage[1].bytes), (40, 40 * record));

    // The slow group catches up: `t` shrinks to its limit too.
    let mut sub = log
        .subscribe("slow", &["t".into()], StartPosition::Earliest)
        .await
        .unwrap();
    assert_eq!(
        assigned(&mut sub).await,
        vec![(TopicPartition::new("t", 0), 60)]
    );
    sub.commit(&[(TopicPartition::new("t", 0), 100)])
        .await
        .unwrap();
    log.enforce_retention(now_ms()).await.unwrap();
    assert_eq!(log.start_offsets("t").unwrap(), vec![90]);
    // A new group starting from the earliest begins at the first event kept.
    let mut late = log
        .subscribe("late", &["t".into()], StartPosition::Earliest)
        .await
        .unwrap();
    assert_eq!(
        assigned(&mut late).await,
        vec![(TopicPartition::new("t", 0), 90)]
    );
    assert_eq!(next_events(&mut late).await.len(), 10);
    drop((sub, late));
    drop(log);

    // Starts and sizes survive a reopen; offsets keep counting from the end.
    let log = EmbeddedLog::open(dir.path(), retained(policy, u64::MAX)).unwrap();
    assert_eq!(log.start_offsets("t").unwrap(), vec![90]);
    assert_eq!(log.usage()[1].bytes, 10 * record);
    let a = log.append("t", vec![sized(100, 100)]).await.unwrap();
    assert_eq!(a[0].offset, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_time_keeps_recent_and_uncommitted_events_and_ids() {
    let dir = tempfile::tempdir().unwrap();
    let policy = TopicRetention {
        max_age: Some(Duration::from_secs(3600)),
        max_partition_bytes: None,
    };
    let log = EmbeddedLog::open(dir.path(), retained(policy, u64::MAX)).unwrap();
    log.ensure_topic("t", 1).await.unwrap();
    log.ensure_topic("out", 1).await.unwrap();
    log.append("t", (0..20).map(|i| sized(i, 10)).collect())
        .await
        .unwrap();
    let first = log
        .append("out", vec![with_id(event(None, "once"), "id-1")])
        .await
        .unwrap();
    let mut sub = log
        .subscribe("g", &["t".into()], StartPosition::Earliest)
        .await
        .unwrap();
    assigned(&mut sub).await;
    sub.commit(&[(TopicPartition::new("t", 0), 12)])
        .await
        .unwrap();

    // Nothing is an hour old yet.
    let now = now_ms();
    assert_eq!(log.enforce_retention(now).await.unwrap().deleted_events, 0);
    // Two hours later: everything is old, but `g` has not handled 12.. yet.
    let later = now + 2 * 3600 * 1000;
    assert_eq!(
        log.enforce_retention(later).await.unwrap().deleted_events,
        12 + 1
    );
    assert_eq!(offsets(&log, "t").await, (12..20).collect::<Vec<_>>());
    assert_eq!(log.start_offsets("out").unwrap(), vec![1]);
    // A fetch still sees every event the group has not committed.
    let got = next_events(&mut sub).await;
    assert_eq!(
        got.iter().map(|e| e.offset).collect::<Vec<_>>(),
        (12..20).collect::<Vec<_>>()
    );
    // The idempotency id outlives its event: a replayed emit still lands once.
    let again = log
        .append("out", vec![with_id(event(None, "once"), "id-1")])
        .await
        .unwrap();
    assert_eq!(again, first);
    assert_eq!(log.end_offsets("out").await.unwrap(), vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_compacts_the_file_once_enough_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let policy = TopicRetention {
        max_age: None,
        max_partition_bytes: Some(64 << 10),
    };
    let mut config = retained(policy, 4 << 20);
    config.retention.max_deletes_per_commit = 1000;
    let log = EmbeddedLog::open(dir.path(), config).unwrap();
    log.ensure_topic("t", 1).await.unwrap();
    for batch in 0..40 {
        let events = (0..64).map(|i| sized(batch * 64 + i, 4096)).collect();
        log.append("t", events).await.unwrap();
    }
    let before = log.health().file_bytes();
    assert!(before > 10 << 20, "file is {before} bytes");
    let started = std::time::Instant::now();
    let report = log.enforce_retention(now_ms()).await.unwrap();
    let took = started.elapsed();
    let after = log.health().file_bytes();
    assert!(report.deleted_bytes > 9 << 20, "{report:?}");
    assert!(report.compacted_bytes > 0, "{report:?}");
    eprintln!("file {before} -> {after} bytes in {took:?}; {report:?}");
    assert!(after < before / 4, "file {before} -> {after} bytes");
    assert_eq!(before - after, report.compacted_bytes);
    // Still a working log.
    let kept = log.start_offsets("t").unwrap()[0];
    assert_eq!(
        log.read("t", 0, 0, 100).await.unwrap()[0].offset,
        kept,
        "reads start at the first event kept"
    );
    log.append("t", vec![sized(0, 10)]).await.unwrap();
}

#[test]
fn corrupt_records_are_reported_not_panicked() {
    let record = encode_record(&event(Some("k"), "payload"), 7).unwrap();
    let back = decode_event("t", 1, 2, &record).unwrap();
    assert_eq!(back.key.as_deref(), Some(&b"k"[..]));
    assert_eq!(back.timestamp_ms, 7);
    for cut in 0..record.len() {
        assert!(matches!(
            decode_event("t", 1, 2, &record[..cut]),
            Err(BackendError::Corrupt(_))
        ));
    }
    let mut bad = record.clone();
    bad[0] = 9;
    assert!(matches!(
        decode_event("t", 1, 2, &bad),
        Err(BackendError::Corrupt(_))
    ));
}
