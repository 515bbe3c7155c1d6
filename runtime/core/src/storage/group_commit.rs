//! Group commit for a `redb` file: one writer thread, one transaction and one fsync per
//! burst of queued requests.
//!
//! Callers send requests over a bounded channel and wait for their answer. The writer
//! takes every request queued (up to a cap), applies them in order inside one write
//! transaction with [`Durability::Immediate`], commits, and only then answers them, so an
//! answer means "durable". A request that is refused (bad input, failed condition) must
//! refuse before writing anything, so the rest of its group still commits. If the
//! transaction itself fails, the group is retried one request per transaction, so one
//! bad request cannot fail its neighbours.
//!
//! An I/O failure (a full disk) is different: `redb` then refuses every write until the
//! file is reopened. The writer answers the group `Unavailable`, marks the file degraded,
//! drops the database and reopens it every [`REOPEN_INTERVAL`], answering everything
//! queued meanwhile `Unavailable` at once (callers retry), until a probe write succeeds.
//! The batcher then reloads what it keeps in memory from the file ([`Batcher::reopened`]).
//!
//! Maintenance that needs the database to itself (compaction) runs on the same thread
//! between groups ([`GroupWriter::exclusive`]), so writers simply wait for it.

use super::db::{SharedDb, is_io};
use crate::{BackendError, BackendResult};
use redb::{Database, Durability, WriteTransaction};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};

/// Requests waiting for the writer before callers are made to wait for room.
const QUEUE_DEPTH: usize = 4096;
/// How often a failed file is reopened.
pub(crate) const REOPEN_INTERVAL: Duration = Duration::from_millis(500);
/// Longest wait for readers to let go of the database before exclusive work is skipped.
const EXCLUSIVE_WAIT: Duration = Duration::from_secs(10);

/// What the writer thread does with each request.
pub(crate) trait Batcher: Send + 'static {
    /// A write request.
    type Op: Send + 'static;
    /// Its answer.
    type Out: Send + 'static;
    /// In-memory effects of the group's requests, published only after the commit.
    type Staged: Default;

    /// Apply `op` within `txn`. `Err` is a storage failure and aborts the whole group;
    /// `Ok(Err(..))` refuses this request alone and must not have written anything.
    fn apply(
        &mut self,
        txn: &WriteTransaction,
        op: &Self::Op,
        staged: &mut Self::Staged,
    ) -> Result<BackendResult<Self::Out>, redb::Error>;

    /// Housekeeping done in the group's transaction just before it commits.
    fn before_commit(
        &mut self,
        _txn: &WriteTransaction,
        _staged: &mut Self::Staged,
    ) -> Result<(), redb::Error> {
        Ok(())
    }

    /// The group committed: make its staged effects visible.
    fn committed(&mut self, staged: Self::Staged);

    /// The file was reopened after a failure: reload what is kept in memory from it (a
    /// commit that reported an error may still have reached the disk).
    fn reopened(&mut self, _db: &Database) -> BackendResult<()> {
        Ok(())
    }
}

struct Request<B: Batcher> {
    op: B::Op,
    reply: oneshot::Sender<BackendResult<B::Out>>,
}

/// Work that needs the database to itself; answers how many bytes it freed or the like.
type ExclusiveFn = Box<dyn FnOnce(&mut Database) -> BackendResult<u64> + Send>;

enum Job<B: Batcher> {
    Write(Request<B>),
    Exclusive(ExclusiveFn, oneshot::Sender<BackendResult<u64>>),
}

/// Handle to a writer thread. Dropping it lets the thread finish what is queued and
/// waits for it, so the database file is closed once the owner is gone.
pub(crate) struct GroupWriter<B: Batcher> {
    tx: Option<mpsc::Sender<Job<B>>>,
    thread: Option<JoinHandle<()>>,
    commits: Arc<AtomicU64>,
}

impl<B: Batcher> GroupWriter<B> {
    /// Starts the writer thread, committing at most `max_group` requests per transaction.
    pub(crate) fn spawn(
        name: &str,
        db: Arc<SharedDb>,
        batcher: B,
        max_group: usize,
    ) -> BackendResult<Self> {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let commits = Arc::new(AtomicU64::new(0));
        let counter = commits.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || run(&db, batcher, rx, max_group.max(1), &counter))
            .map_err(|e| BackendError::Unavailable(format!("cannot start {name}: {e}")))?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            commits,
        })
    }

    /// Queues `op` and waits until it is committed (or refused).
    pub(crate) async fn call(&self, op: B::Op) -> BackendResult<B::Out> {
        let tx = self.tx.as_ref().ok_or_else(closed)?;
        let (reply, answer) = oneshot::channel();
        tx.send(Job::Write(Request { op, reply }))
            .await
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// Queues `op` and returns once it is queued; the returned future resolves when it
    /// is committed (or refused). Ops queued by one caller commit in the order queued.
    pub(crate) async fn submit(
        &self,
        op: B::Op,
    ) -> BackendResult<impl Future<Output = BackendResult<B::Out>> + Send + 'static> {
        let tx = self.tx.as_ref().ok_or_else(closed)?;
        let (reply, answer) = oneshot::channel();
        tx.send(Job::Write(Request { op, reply }))
            .await
            .map_err(|_| closed())?;
        Ok(async move { answer.await.map_err(|_| closed())? })
    }

    /// [`Self::call`] from a thread outside the async runtime.
    pub(crate) fn call_blocking(&self, op: B::Op) -> BackendResult<B::Out> {
        let tx = self.tx.as_ref().ok_or_else(closed)?;
        let (reply, answer) = oneshot::channel();
        tx.blocking_send(Job::Write(Request { op, reply }))
            .map_err(|_| closed())?;
        answer.blocking_recv().map_err(|_| closed())?
    }

    /// Runs `f` on the writer thread with the database to itself (writes queue behind
    /// it, readers wait), from a thread outside the async runtime.
    pub(crate) fn exclusive_blocking(
        &self,
        f: impl FnOnce(&mut Database) -> BackendResult<u64> + Send + 'static,
    ) -> BackendResult<u64> {
        let tx = self.tx.as_ref().ok_or_else(closed)?;
        let (reply, answer) = oneshot::channel();
        tx.blocking_send(Job::Exclusive(Box::new(f), reply))
            .map_err(|_| closed())?;
        answer.blocking_recv().map_err(|_| closed())?
    }

    /// Write transactions committed so far.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}

impl<B: Batcher> Drop for GroupWriter<B> {
    fn drop(&mut self) {
        // Closing the channel ends the thread once it has drained the queue; waiting for
        // it means the file lock is released when the owner is gone (a reopen works).
        drop(self.tx.take());
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("storage writer thread panicked");
        }
    }
}

fn closed() -> BackendError {
    BackendError::Unavailable("storage writer has stopped".into())
}

fn run<B: Batcher>(
    db: &SharedDb,
    mut batcher: B,
    mut rx: mpsc::Receiver<Job<B>>,
    max_group: usize,
    commits: &AtomicU64,
) {
    let mut group: Vec<Request<B>> = Vec::with_capacity(max_group.min(QUEUE_DEPTH));
    // An exclusive job met while gathering a group runs right after that group.
    let mut pending: Option<Job<B>> = None;
    loop {
        let first = match pending.take() {
            Some(job) => job,
            None => match rx.blocking_recv() {
                Some(job) => job,
                None => return,
            },
        };
        match first {
            Job::Exclusive(f, reply) => {
                let out = db.exclusive(EXCLUSIVE_WAIT, f).and_then(|r| r);
                let _ = reply.send(out);
                continue;
            }
            Job::Write(request) => group.push(request),
        }
        while group.len() < max_group {
            match rx.try_recv() {
                Ok(Job::Write(request)) => group.push(request),
                Ok(job) => {
                    pending = Some(job);
                    break;
                }
                Err(_) => break,
            }
        }
        let handle = match db.get() {
            Ok(handle) => handle,
            Err(e) => {
                refuse(group.drain(..), &e);
                continue;
            }
        };
        let result = commit_group(&handle, &mut batcher, &group);
        drop(handle);
        match result {
            Ok(outs) => {
                commits.fetch_add(1, Ordering::Relaxed);
                answer(group.drain(..), outs);
            }
            Err(e) if is_io(&e) => {
                let reason = failure_reason(db, &e);
                db.mark_failed(reason.clone());
                refuse(group.drain(..), &BackendError::Unavailable(reason));
                if !recover(db, &mut batcher, &mut rx, &mut pending) {
                    return;
                }
            }
            Err(e) if group.len() > 1 => {
                tracing::warn!(error = %e, requests = group.len(),
                    "group commit failed; retrying its requests one by one");
                let mut failed_io = None;
                for request in group.drain(..) {
                    if let Some(reason) = &failed_io {
                        let _ = request
                            .reply
                            .send(Err(BackendError::Unavailable(Clone::clone(reason))));
                        continue;
                    }
                    let out = match db.get().and_then(|handle| {
                        commit_group(&handle, &mut batcher, std::slice::from_ref(&request)).map_err(
                            |e| {
                                if is_io(&e) {
                                    let reason = failure_reason(db, &e);
                                    db.mark_failed(reason.clone());
                                    failed_io = Some(reason);
                                }
                                super::redb_error(e)
                            },
                        )
                    }) {
                        Ok(mut outs) => {
                            commits.fetch_add(1, Ordering::Relaxed);
                            outs.pop().unwrap_or_else(|| Err(closed()))
                        }
                        Err(e) => Err(e),
                    };
                    // The caller may have stopped waiting; its write stands either way.
                    let _ = request.reply.send(out);
                }
                if failed_io.is_some() && !recover(db, &mut batcher, &mut rx, &mut pending) {
                    return;
                }
            }
            Err(e) => {
                let e = super::redb_error(e);
                refuse(group.drain(..), &e);
            }
        }
    }
}

fn failure_reason(db: &SharedDb, e: &redb::Error) -> String {
    format!(
        "writing {} failed ({e}); reopening it every {} ms until it takes writes again",
        db.health().path().display(),
        REOPEN_INTERVAL.as_millis()
    )
}

/// Drops the database [`SharedDb::mark_failed`] marked and reopens it until a probe
/// write succeeds, refusing whatever is queued meanwhile. False if every sender is gone
/// (shut down).
fn recover<B: Batcher>(
    db: &SharedDb,
    batcher: &mut B,
    rx: &mut mpsc::Receiver<Job<B>>,
    pending: &mut Option<Job<B>>,
) -> bool {
    tracing::error!(file = %db.health().path().display(),
        reason = db.health().degraded().unwrap_or_default(), "embedded storage failed; reopening it");
    let started = Instant::now();
    db.close_failed();
    loop {
        match db.try_reopen() {
            Ok(handle) => match batcher.reopened(&handle) {
                Ok(()) => {
                    tracing::warn!(file = %db.health().path().display(),
                        after_ms = started.elapsed().as_millis() as u64,
                        "embedded storage takes writes again");
                    return true;
                }
                Err(e) => {
                    drop(handle);
                    db.mark_failed(format!("reloading after a reopen failed: {e}"));
                    db.close_failed();
                }
            },
            // The first reason stays: it says what went wrong, this only that it still is.
            Err(e) => tracing::debug!(error = %e, "reopen failed; trying again"),
        }
        let unavailable = || {
            BackendError::Unavailable(
                db.health()
                    .degraded()
                    .unwrap_or_else(|| "storage is reopening".into()),
            )
        };
        let until = Instant::now() + REOPEN_INTERVAL;
        while Instant::now() < until {
            let job = match pending.take() {
                Some(job) => Ok(job),
                None => rx.try_recv(),
            };
            match job {
                Ok(Job::Write(request)) => {
                    let _ = request.reply.send(Err(unavailable()));
                }
                Ok(Job::Exclusive(_, reply)) => {
                    let _ = reply.send(Err(unavailable()));
                }
                Err(TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(20)),
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }
}

fn refuse<B: Batcher>(requests: impl Iterator<Item = Request<B>>, e: &BackendError) {
    for request in requests {
        let _ = request.reply.send(Err(clone_error(e)));
    }
}

fn answer<B: Batcher>(
    requests: impl Iterator<Item = Request<B>>,
    outs: Vec<BackendResult<B::Out>>,
) {
    for (request, out) in requests.zip(outs) {
        let _ = request.reply.send(out);
    }
}

fn clone_error(e: &BackendError) -> BackendError {
    match e {
        BackendError::Unavailable(m) => BackendError::Unavailable(m.clone()),
        BackendError::Invalid(m) => BackendError::Invalid(m.clone()),
        BackendError::UnknownTopic(m) => BackendError::UnknownTopic(m.clone()),
        BackendError::Corrupt(m) => BackendError::Corrupt(m.clone()),
    }
}

fn commit_group<B: Batcher>(
    db: &Database,
    batcher: &mut B,
    group: &[Request<B>],
) -> Result<Vec<BackendResult<B::Out>>, redb::Error> {
    let mut txn = db.begin_write()?;
    // The default, stated on purpose: an answer to a caller promises durability.
    txn.set_durability(Durability::Immediate)?;
    let mut staged = B::Staged::default();
    let mut outs = Vec::with_capacity(group.len());
    for request in group {
        outs.push(batcher.apply(&txn, &request.op, &mut staged)?);
    }
    batcher.before_commit(&txn, &mut staged)?;
    txn.commit()?;
    batcher.committed(staged);
    Ok(outs)
}
