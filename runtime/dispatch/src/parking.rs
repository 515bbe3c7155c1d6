//! `on-failure = "park-key"` and the operators' requests: parking a failed event with its
//! key's later events, and carrying out redrives and discards in the key's lane (see
//! [`spate_core::state::parked`] for the layout and why it is all state).

use super::DeadLetterKind;
use super::checkpoint::Effects;
use super::pipeline::{
    At, Call, Called, Finish, WarmInstance, WorkerCtx, apply_until_taken, attempts_cleared,
    dead_letter, instance_of, sleep_or_shutdown,
};
use spate_core::host::record::{self, Outcome};
use spate_core::host::{MAX_REASON_LEN, PluginInfo, truncate_reason};
use spate_core::plugin::{Instance, PluginVersion};
use spate_core::state::parked::{self, Action, ParkedEvent, ParkedKey, Request};
use spate_core::types::Event;
use spate_core::{BackendResult, StateStore, StateWrite};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Whether `event`'s key is parked, and if so queue the event behind its parked events.
/// `Some(true)`: queued (done); `Some(false)`: not parked, handle it; `None`: given up
/// (shutdown).
pub(super) async fn queue_if_parked(
    ctx: &WorkerCtx,
    info: &PluginInfo,
    event: &Event,
) -> Option<bool> {
    let Some(raw_key) = event.key.as_deref() else {
        return Some(false);
    };
    if !ctx.may_be_parked(event.partition, raw_key) {
        return Some(false);
    }
    let ns = parked::namespace(&info.namespace);
    let id = parked::key_id(Some(raw_key));
    let key = read(ctx, || parked::key(&*ctx.services.state, &ns, &id)).await?;
    let Some(key) = key else {
        // Unparked meanwhile.
        ctx.set_parked(event.partition, raw_key, false);
        return Some(false);
    };
    let queued = ParkAs {
        kind: "queued",
        reason: "queued behind a parked event of its key",
        attempts: 0,
    };
    Some(park(ctx, info, event, queued, Some(key)).await)
}

/// Park `event`, which failed for good, with its key (parked from now on, if it was not).
pub(super) async fn park_failed(
    ctx: &WorkerCtx,
    info: &PluginInfo,
    event: &Event,
    kind: DeadLetterKind,
    reason: &str,
    attempts: u32,
) -> bool {
    let ns = parked::namespace(&info.namespace);
    let id = parked::key_id(event.key.as_deref());
    let Some(existing) = read(ctx, || parked::key(&*ctx.services.state, &ns, &id)).await else {
        return false;
    };
    let failed = ParkAs {
        kind: kind.as_str(),
        reason,
        attempts,
    };
    park(ctx, info, event, failed, existing).await
}

/// Read the store, retrying an outage until it answers or the pipeline gives up.
async fn read<T, F, Fut>(ctx: &WorkerCtx, f: F) -> Option<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = BackendResult<T>>,
{
    let mut delay = Duration::from_millis(50);
    loop {
        match f().await {
            Ok(v) => return Some(v),
            Err(e) => {
                warn!(error = %e, ?delay, "cannot read the parked entries; retrying");
                if !sleep_or_shutdown(ctx, delay).await {
                    return None;
                }
                delay = (delay * 2).min(ctx.max_infra_backoff);
            }
        }
    }
}

/// How an event is parked: its failure, or `queued` behind its key's parked events.
struct ParkAs<'a> {
    kind: &'a str,
    reason: &'a str,
    attempts: u32,
}

/// Park `event` in its key's queue, with the checkpoint like a state write, so its
/// position moves past it only once it is durable.
async fn park(
    ctx: &WorkerCtx,
    info: &PluginInfo,
    event: &Event,
    how: ParkAs<'_>,
    existing: Option<ParkedKey>,
) -> bool {
    let ns = parked::namespace(&info.namespace);
    let now = parked::now_ms();
    let version = info.manifest.version.to_string();
    let reason = truncate_reason(how.reason.to_owned(), MAX_REASON_LEN);
    let entry = parked::queue_entry(event);
    // A replayed event (after a restart) lands on its own entry and is not counted twice.
    let Some(replayed) = read(ctx, || ctx.services.state.get(&ns, &entry)).await else {
        return false;
    };
    let new_key = existing.is_none();
    let id = parked::key_id(event.key.as_deref());
    let mut key = existing.unwrap_or_else(|| ParkedKey {
        key: parked::display_key(event.key.as_deref()),
        key_id: id.clone(),
        topic: event.topic.clone(),
        partition: event.partition,
        since_ms: now,
        first_reason: reason.clone(),
        version: version.clone(),
        events: 0,
        redrives: 0,
        last_reason: None,
    });
    if replayed.is_none() {
        key.events += 1;
    }
    let record = ParkedEvent {
        event: event.clone(),
        reason: reason.clone(),
        kind: how.kind.to_owned(),
        attempts: how.attempts,
        version,
        parked_at_ms: now,
    };
    let mut effects = Effects {
        side: vec![
            (ns.clone(), parked::put(entry, &record, None)),
            (ns.clone(), parked::put(parked::key_entry(&id), &key, None)),
            attempts_cleared(info, event),
        ],
        ..Effects::default()
    };
    let outcome = Outcome::Failed {
        kind: how.kind.to_owned(),
        reason: reason.clone(),
        then: "parked".into(),
    };
    effects
        .side
        .extend(record::write_for(info, event, outcome, how.attempts, None));
    if !apply_until_taken(ctx, At::Event(event), &effects).await {
        return false;
    }
    if let Some(k) = event.key.as_deref() {
        ctx.set_parked(event.partition, k, true);
    }
    let plugin = ctx.plugin.clone();
    metrics::counter!(spate_core::metric_names::PARKED_EVENTS_TOTAL, "plugin" => plugin.clone(), "kind" => how.kind.to_owned()).increment(1);
    metrics::counter!(spate_core::metric_names::EVENTS_TOTAL, "plugin" => plugin.clone(), "outcome" => "parked")
        .increment(1);
    if new_key {
        metrics::counter!(spate_core::metric_names::PARKED_KEYS_TOTAL, "plugin" => plugin)
            .increment(1);
        warn!(kind = how.kind, %reason, attempts = how.attempts, "event failed; its key is parked");
    }
    true
}

/// Carry out an operator's request in its key's lane.
pub(super) async fn carry_out(
    ctx: &WorkerCtx,
    entry: &str,
    request: Request,
    warm: Option<WarmInstance>,
) -> (Finish, Option<WarmInstance>) {
    let Some(version) = ctx.active.load() else {
        return (Finish::Abandoned, None);
    };
    let mut instance = instance_of(&version, warm);
    let job = Job {
        ctx,
        version: &version,
        info: Arc::clone(version.info()),
        ns: parked::namespace(&version.info().namespace),
        request: &request,
        entry,
    };
    let done = match request.action {
        Action::Redrive => job.redrive(&mut instance).await,
        Action::Discard => job.discard().await,
        Action::RedriveDeadLetters => job.redrive_dead_letters(&mut instance).await,
    };
    match done {
        true => (Finish::Done, Some((version, instance))),
        false => (Finish::Abandoned, None),
    }
}

/// One request being carried out.
struct Job<'a> {
    ctx: &'a WorkerCtx,
    version: &'a Arc<dyn PluginVersion>,
    info: Arc<PluginInfo>,
    /// The plugin's parked namespace.
    ns: String,
    request: &'a Request,
    /// The request's entry, removed with its last step.
    entry: &'a str,
}

impl Job<'_> {
    fn at(&self) -> At<'_> {
        At::Partition(&self.request.topic, self.request.partition)
    }

    fn state(&self) -> &dyn StateStore {
        &*self.ctx.services.state
    }

    /// The request is done: with `writes`, its entry goes.
    async fn close(&self, mut writes: Vec<(String, StateWrite)>, outcome: &'static str) -> bool {
        writes.push((self.ns.clone(), parked::delete(self.entry.to_owned())));
        let effects = Effects {
            side: writes,
            ..Effects::default()
        };
        if !apply_until_taken(self.ctx, self.at(), &effects).await {
            return false;
        }
        metrics::counter!(spate_core::metric_names::REDRIVES_TOTAL, "plugin" => self.ctx.plugin.clone(), "action" => self.request.action.as_str(), "outcome" => outcome).increment(1);
        info!(
            action = self.request.action.as_str(),
            key = %self.request.key_id,
            outcome,
            "request carried out"
        );
        true
    }

    /// The key's queue is empty: [`Job::close`] with `unpark`, and its events are handled
    /// as they come from now on.
    async fn unpark(&self, unpark: (String, StateWrite), outcome: &'static str) -> bool {
        let closed = self.close(vec![unpark], outcome).await;
        if closed && let Some(k) = self.request.key() {
            self.ctx.set_parked(self.request.partition, &k, false);
        }
        closed
    }

    /// The first `n` events of the key's queue; `None` when the pipeline is stopping.
    async fn next_parked(&self, n: u32) -> Option<Vec<(String, ParkedEvent)>> {
        if self.stopping() {
            return None;
        }
        read(self.ctx, || {
            parked::queue(self.state(), &self.ns, &self.request.key_id, n)
        })
        .await
    }

    /// Call the active version with a redriven `event` (going on from the attempts a cut
    /// short redrive made), applying `side` with its effects; the outcome is counted.
    async fn call(
        &self,
        instance: &mut Box<dyn Instance>,
        event: &Arc<Event>,
        side: Vec<(String, StateWrite)>,
    ) -> Called {
        let Some(prior) = self.prior(event).await else {
            return Called::Abandoned;
        };
        let call = Call {
            version: self.version,
            info: &self.info,
            event,
            prior,
            at: self.at(),
            side,
        };
        let called = call.run(self.ctx, instance).await;
        match &called {
            Called::Done => self.redriven("handled"),
            Called::Failed { .. } => self.redriven("failed"),
            Called::Abandoned => {}
        }
        called
    }

    /// Count a redriven event's outcome.
    fn redriven(&self, outcome: &'static str) {
        metrics::counter!(spate_core::metric_names::REDRIVEN_EVENTS_TOTAL, "plugin" => self.ctx.plugin.clone(), "outcome" => outcome).increment(1);
    }

    /// Whether the pipeline is stopping: a request stops between two events (each one's
    /// step is durable) and goes on after the restart.
    fn stopping(&self) -> bool {
        self.ctx.stop.is_cancelled()
    }

    /// Attempts already made on a redriven event (by a redrive a restart cut short).
    async fn prior(&self, event: &Event) -> Option<u32> {
        let entry = parked::attempts_entry(event);
        let raw = read(self.ctx, || self.state().get(&self.ns, &entry)).await?;
        Some(
            raw.and_then(|r| serde_json::from_slice(&r).ok())
                .unwrap_or(0),
        )
    }

    /// Handle the key's parked events in order through the active version; unpark the
    /// key once its queue is empty, or park it again at the first event that fails.
    async fn redrive(&self, instance: &mut Box<dyn Instance>) -> bool {
        let key_id = &self.request.key_id;
        loop {
            let Some(head) = self.next_parked(1).await else {
                return false;
            };
            let Some(key) = read(self.ctx, || parked::key(self.state(), &self.ns, key_id)).await
            else {
                return false;
            };
            let Some((entry, parked_event)) = head.into_iter().next() else {
                // Drained: the key's new events are handled as they come from now on.
                let unpark = (self.ns.clone(), parked::delete(parked::key_entry(key_id)));
                let outcome = if key.is_some() {
                    "drained"
                } else {
                    "not-parked"
                };
                return self.unpark(unpark, outcome).await;
            };
            let event = Arc::new(parked_event.event.clone());
            let mut key = key.unwrap_or_else(|| ParkedKey {
                key: parked::display_key(event.key.as_deref()),
                key_id: key_id.clone(),
                topic: event.topic.clone(),
                partition: event.partition,
                since_ms: parked_event.parked_at_ms,
                first_reason: parked_event.reason.clone(),
                version: parked_event.version.clone(),
                events: 1,
                redrives: 0,
                last_reason: None,
            });
            key.events = key.events.saturating_sub(1);
            let side = vec![
                (self.ns.clone(), parked::delete(entry.clone())),
                (
                    self.ns.clone(),
                    parked::put(parked::key_entry(key_id), &key, None),
                ),
            ];
            match self.call(instance, &event, side).await {
                Called::Done => {}
                Called::Abandoned => return false,
                Called::Failed {
                    kind,
                    reason,
                    attempts,
                } => {
                    let reason = truncate_reason(reason, MAX_REASON_LEN);
                    warn!(kind = kind.as_str(), %reason, attempts, offset = event.offset, "redriven event failed again; the key stays parked");
                    key.events += 1;
                    key.redrives += 1;
                    key.last_reason = Some(reason.clone());
                    key.version = self.info.manifest.version.to_string();
                    let record = ParkedEvent {
                        event: parked_event.event.clone(),
                        reason,
                        kind: kind.as_str().to_owned(),
                        attempts: parked_event.attempts.saturating_add(attempts),
                        version: self.info.manifest.version.to_string(),
                        parked_at_ms: parked_event.parked_at_ms,
                    };
                    let writes = vec![
                        (self.ns.clone(), parked::put(entry, &record, None)),
                        (
                            self.ns.clone(),
                            parked::put(parked::key_entry(key_id), &key, None),
                        ),
                        attempts_cleared(&self.info, &event),
                    ];
                    return self.close(writes, "reparked").await;
                }
            }
        }
    }

    /// Send the key's parked events to the dead-letter topic, in order, and unpark it.
    async fn discard(&self) -> bool {
        let key_id = &self.request.key_id;
        loop {
            let Some(batch) = self.next_parked(64).await else {
                return false;
            };
            if batch.is_empty() {
                let unpark = (self.ns.clone(), parked::delete(parked::key_entry(key_id)));
                return self.unpark(unpark, "discarded").await;
            }
            for (entry, parked_event) in batch {
                let reason = format!(
                    "discarded while parked ({}): {}",
                    parked_event.kind, parked_event.reason
                );
                let side = vec![
                    (self.ns.clone(), parked::delete(entry)),
                    attempts_cleared(&self.info, &parked_event.event),
                ];
                let failure = (
                    DeadLetterKind::Discarded,
                    reason.as_str(),
                    parked_event.attempts,
                );
                if !dead_letter(
                    self.ctx,
                    &self.info,
                    &parked_event.event,
                    failure,
                    side,
                    self.at(),
                )
                .await
                {
                    return false;
                }
            }
        }
    }

    /// Handle the dead letters the request carries, in order, each at most once.
    async fn redrive_dead_letters(&self, instance: &mut Box<dyn Instance>) -> bool {
        for event in &self.request.events {
            if self.stopping() {
                return false;
            }
            let marker = parked::redriven_entry(event);
            let Some(seen) = read(self.ctx, || self.state().get(&self.ns, &marker)).await else {
                return false;
            };
            if seen.is_some() {
                self.redriven("already-redriven");
                continue;
            }
            let event = Arc::new(event.clone());
            let done = (
                self.ns.clone(),
                parked::put(marker, &parked::now_ms(), Some(parked::REDRIVEN_TTL)),
            );
            match self.call(instance, &event, vec![done]).await {
                Called::Done => {}
                Called::Abandoned => return false,
                Called::Failed {
                    kind,
                    reason,
                    attempts,
                } => {
                    let side = vec![attempts_cleared(&self.info, &event)];
                    if !dead_letter(
                        self.ctx,
                        &self.info,
                        &event,
                        (kind, &reason, attempts),
                        side,
                        self.at(),
                    )
                    .await
                    {
                        return false;
                    }
                }
            }
        }
        self.close(Vec::new(), "done").await
    }
}
