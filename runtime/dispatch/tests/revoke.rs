//! The dispatcher's side of a consumer group, driven by a scripted subscription: a
//! revocation lets the revoked partition's running events finish (or abandons them at the
//! revoke timeout) and hands back offsets that cover exactly what finished; a partition
//! with too many unfinished events is paused, and resumed once they drain.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use async_trait::async_trait;
use spate_core::host::Invocation;
use spate_core::state::tiered::StateTier;
use spate_core::test_kit::{FnPlugin, echo};
use spate_core::types::{Event, TopicPartition};
use spate_core::{
    BackendResult, EventBus, EventSource, SourceMessage, StartPosition, Subscription,
};
use spate_core::{
    cache::MokaCache,
    events::{EmbeddedLog, LogConfig},
    state::EmbeddedStateStore,
};
use spate_dispatch::{
    ActiveVersion, CallOutcome, DispatchContext, DispatchSettings, PluginVersion,
};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

/// What the pipeline did to its subscription, in order.
#[derive(Clone, Debug, PartialEq)]
enum Call {
    Commit(Vec<(u32, u64)>),
    Release(Vec<(u32, u64)>, Duration),
    Pause(u32),
    Resume(u32),
}

#[derive(Clone)]
struct Script {
    calls: Arc<Mutex<Vec<Call>>>,
    started: Instant,
}

impl Script {
    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

struct ScriptedSource {
    script: Script,
    rx: Mutex<Option<mpsc::UnboundedReceiver<SourceMessage>>>,
}

struct ScriptedSub {
    script: Script,
    rx: mpsc::UnboundedReceiver<SourceMessage>,
}

fn offsets(o: &[(TopicPartition, u64)]) -> Vec<(u32, u64)> {
    o.iter().map(|(tp, n)| (tp.partition, *n)).collect()
}

#[async_trait]
impl Subscription for ScriptedSub {
    async fn next(&mut self) -> BackendResult<SourceMessage> {
        match self.rx.recv().await {
            Some(m) => Ok(m),
            None => std::future::pending().await,
        }
    }
    async fn next_control(&mut self) -> BackendResult<SourceMessage> {
        std::future::pending().await
    }
    async fn commit(&mut self, o: &[(TopicPartition, u64)]) -> BackendResult<()> {
        self.script
            .calls
            .lock()
            .unwrap()
            .push(Call::Commit(offsets(o)));
        Ok(())
    }
    async fn release(
        &mut self,
        _revoked: &[TopicPartition],
        o: &[(TopicPartition, u64)],
    ) -> BackendResult<()> {
        let at = self.script.started.elapsed();
        self.script
            .calls
            .lock()
            .unwrap()
            .push(Call::Release(offsets(o), at));
        Ok(())
    }
    fn pause(&mut self, p: &TopicPartition) {
        self.script
            .calls
            .lock()
            .unwrap()
            .push(Call::Pause(p.partition));
    }
    fn resume(&mut self, p: &TopicPartition) {
        self.script
            .calls
            .lock()
            .unwrap()
            .push(Call::Resume(p.partition));
    }
}

#[async_trait]
impl EventSource for ScriptedSource {
    async fn subscribe(
        &self,
        _group: &str,
        _topics: &[String],
        _start: StartPosition,
    ) -> BackendResult<Box<dyn Subscription>> {
        let rx = self.rx.lock().unwrap().take().expect("subscribed once");
        Ok(Box::new(ScriptedSub {
            script: self.script.clone(),
            rx,
        }))
    }
    async fn committed(&self, _group: &str, _topic: &str) -> BackendResult<Vec<Option<u64>>> {
        Ok(vec![])
    }
}

/// The payload delay that means "until the test opens [`GATE`]".
const GATED: u16 = u16::MAX;

/// Shut until a test adds a permit: a gated call runs exactly until the test lets it end,
/// however slow the machine. One test uses it.
static GATE: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(0));

/// Sleeps for the milliseconds its payload names (u16, big-endian; [`GATED`] waits for the
/// gate instead), then emits it.
async fn sleep_then_echo(inv: Invocation) -> CallOutcome {
    let payload = &inv.event().payload;
    let ms = u16::from_be_bytes([payload[0], payload[1]]);
    if ms == GATED {
        let _open = GATE.acquire().await;
    } else {
        tokio::time::sleep(Duration::from_millis(u64::from(ms))).await;
    }
    echo(inv, "out")
}

fn event(partition: u32, offset: u64, key: &str, sleep_ms: u16) -> Event {
    let mut payload = sleep_ms.to_be_bytes().to_vec();
    payload.extend_from_slice(format!("{partition}/{offset}").as_bytes());
    Event {
        topic: "in".into(),
        partition,
        offset,
        key: Some(key.as_bytes().to_vec()),
        payload,
        headers: vec![],
        timestamp_ms: 0,
    }
}

struct Rig {
    tx: mpsc::UnboundedSender<SourceMessage>,
    script: Script,
    bus: Arc<dyn EventBus>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Rig {
    fn start(tune: impl FnOnce(&mut DispatchSettings)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedLog::open(dir.path(), LogConfig::default()).unwrap();
        let state = EmbeddedStateStore::open(&dir.path().join("state")).unwrap();
        let bus: Arc<dyn EventBus> = log;
        let script = Script {
            calls: Arc::default(),
            started: Instant::now(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let source = Arc::new(ScriptedSource {
            script: script.clone(),
            rx: Mutex::new(Some(rx)),
        });
        // Calls get 30 s: a held (gated) or long call never ends at its own deadline here.
        let version: Arc<dyn PluginVersion> = FnPlugin::new(
            "name = \"sleeper\"\nversion = \"1.0.0\"\nsubscriptions = [{ topic = \"in\" }]\n[capabilities]\nemit-topics = [\"out\"]\n[limits]\nconcurrency = 8\ntimeout-ms = 30000\n",
            sleep_then_echo,
        );
        let mut settings = DispatchSettings {
            commit_interval: Duration::from_secs(3600), // only revocations commit here
            ..DispatchSettings::default()
        };
        tune(&mut settings);
        let cx = DispatchContext::new(
            source,
            Arc::clone(&bus),
            StateTier::direct(state),
            Arc::new(MokaCache::new(1 << 20)),
            settings,
        );
        let shutdown = cx.shutdown.clone();
        let mut pipelines = cx.pipelines("sleeper", &ActiveVersion::new(version), &shutdown);
        assert_eq!(pipelines.len(), 1);
        let pipeline = pipelines.remove(0);
        let task = tokio::spawn(async move {
            pipeline.run().await.unwrap();
        });
        Self {
            tx,
            script,
            bus,
            shutdown,
            task,
            _dir: dir,
        }
    }

    fn send(&self, m: SourceMessage) {
        self.tx.send(m).unwrap();
    }

    fn assign(&self, partitions: &[u32]) {
        self.send(SourceMessage::Assigned(
            partitions
                .iter()
                .map(|p| (TopicPartition::new("in", *p), 0))
                .collect(),
        ));
    }

    async fn wait_for(&self, what: &str, f: impl Fn(&[Call]) -> bool) -> Vec<Call> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let calls = self.script.calls();
            if f(&calls) {
                return calls;
            }
            assert!(Instant::now() < deadline, "never saw {what}: {calls:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until every one of `tags` was emitted to `out`.
    async fn wait_emitted(&self, tags: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.emitted().await;
            if tags.iter().all(|t| out.iter().any(|o| o.as_str() == *t)) {
                return;
            }
            assert!(Instant::now() < deadline, "never emitted {tags:?}: {out:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Payload tags (`partition/offset`) emitted to `out`.
    async fn emitted(&self) -> Vec<String> {
        let mut out = Vec::new();
        let parts = self.bus.partitions("out").await.unwrap().unwrap_or(0);
        for p in 0..parts {
            for e in self.bus.read("out", p, 0, 10_000).await.unwrap() {
                out.push(String::from_utf8_lossy(&e.payload[2..]).into_owned());
            }
        }
        out.sort();
        out
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_waits_for_running_events_and_releases_what_finished() {
    // The revoke timeout only has to outlast the test's hold on event 0 below.
    let rig = Rig::start(|c| c.revoke_timeout = Duration::from_secs(60));
    rig.assign(&[0, 1]);
    rig.send(SourceMessage::Events(vec![
        event(0, 0, "a", GATED), // running when the revocation comes
        event(0, 1, "a", 0),     // queued behind it in lane `a`: left to the next owner
        event(0, 2, "b", 0),     // finishes at once
        event(1, 0, "c", 0),     // another partition, unaffected
    ]));
    // Event 0 runs until the gate opens (it was a 300 ms sleep against an 80 ms wait here,
    // which a stalled machine could overrun: event 0 done, and 1 run, before the revocation).
    rig.wait_emitted(&["0/2", "1/0"]).await;
    rig.send(SourceMessage::Revoked(vec![TopicPartition::new("in", 0)]));
    // Time for a release that does not wait for event 0 to show.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let early = rig.script.calls();
    assert!(
        !early.iter().any(|x| matches!(x, Call::Release(..))),
        "released while event 0 was running: {early:?}"
    );
    let opened_at = rig.script.started.elapsed();
    GATE.add_permits(1);
    let calls = rig
        .wait_for("the release", |c| {
            c.iter().any(|x| matches!(x, Call::Release(..)))
        })
        .await;
    let Some(Call::Release(offsets, at)) = calls.iter().find(|x| matches!(x, Call::Release(..)))
    else {
        unreachable!()
    };
    // Offset 0 finished and 2 finished, but 1 was never run: the next owner resumes at 1.
    assert_eq!(offsets, &vec![(0, 1)]);
    assert!(
        *at >= opened_at,
        "released at {at:?}, before the running event finished (at {opened_at:?} or later)"
    );
    assert_eq!(rig.emitted().await, ["0/0", "0/2", "1/0"]);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_still_running_at_the_revoke_timeout_is_abandoned_uncommitted() {
    let rig = Rig::start(|c| c.revoke_timeout = Duration::from_millis(150));
    rig.assign(&[0]);
    // Offset 1 would run 9 s (inside its 30 s deadline) if the revocation waited for it.
    rig.send(SourceMessage::Events(vec![
        event(0, 0, "a", 0),
        event(0, 1, "b", 9000),
    ]));
    // Offset 0 is finished once it is out (an 80 ms sleep here left it to the pace of
    // the machine); offset 1 is running, dispatched with it.
    rig.wait_emitted(&["0/0"]).await;
    rig.send(SourceMessage::Revoked(vec![TopicPartition::new("in", 0)]));
    let calls = rig
        .wait_for("the release", |c| {
            c.iter().any(|x| matches!(x, Call::Release(..)))
        })
        .await;
    let Some(Call::Release(offsets, at)) = calls.iter().find(|x| matches!(x, Call::Release(..)))
    else {
        unreachable!()
    };
    assert_eq!(offsets, &vec![(0, 1)], "only the finished prefix");
    // At the 150 ms revoke timeout, not when offset 1 would end (9 s after the start at
    // the earliest); the bound leaves a loaded machine room.
    assert!(*at < Duration::from_secs(6), "released at {at:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        rig.emitted().await,
        ["0/0"],
        "the abandoned call applied nothing"
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_partition_is_paused_and_resumed_once_it_drains() {
    let rig = Rig::start(|c| c.max_buffered_per_partition = 4);
    rig.assign(&[0, 1]);
    // One key: ten events queue in one lane of partition 0.
    rig.send(SourceMessage::Events(
        (0..10).map(|o| event(0, o, "a", 10)).collect(),
    ));
    rig.send(SourceMessage::Events(vec![event(1, 0, "z", 0)]));
    let calls = rig
        .wait_for("pause then resume of partition 0", |c| {
            c.contains(&Call::Pause(0)) && c.contains(&Call::Resume(0))
        })
        .await;
    let pause = calls.iter().position(|c| *c == Call::Pause(0)).unwrap();
    let resume = calls.iter().position(|c| *c == Call::Resume(0)).unwrap();
    assert!(pause < resume);
    assert!(
        !calls.contains(&Call::Pause(1)),
        "the other partition flows"
    );
    rig.wait_for("every event", |_| true).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while rig.emitted().await.len() < 11 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rig.stop().await;
}

/// A lost assignment (a session that expired while the broker was unreachable) releases
/// without committing; when the partition comes back at the source's older position, the
/// events the last checkpoint covers are skipped, and the next commit tick commits that
/// checkpoint's position rather than leaving the source behind for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_reassigned_behind_its_checkpoint_commits_the_checkpoint() {
    let rig = Rig::start(|c| c.commit_interval = Duration::from_millis(50));
    rig.assign(&[0]);
    let batch: Vec<Event> = (0..3).map(|o| event(0, o, "a", 0)).collect();
    rig.send(SourceMessage::Events(batch.clone()));
    let deadline = Instant::now() + Duration::from_secs(5);
    while rig.emitted().await.len() < 3 {
        assert!(Instant::now() < deadline, "the events were not handled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    rig.send(SourceMessage::Revoked(vec![TopicPartition::new("in", 0)]));
    rig.wait_for("the release", |c| {
        c.iter().any(|x| matches!(x, Call::Release(..)))
    })
    .await;
    // The scripted source committed nothing on release: it comes back at 0.
    rig.assign(&[0]);
    rig.send(SourceMessage::Events(batch));
    rig.wait_for("a commit of the checkpoint's position", |c| {
        c.contains(&Call::Commit(vec![(0, 3)]))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        rig.emitted().await,
        ["0/0", "0/1", "0/2"],
        "the redelivered events were not handled again"
    );
    rig.stop().await;
}
