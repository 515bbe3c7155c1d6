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

use crate::backend::{BackendError, BackendResult};
use redb::{Database, Durability, WriteTransaction};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use tokio::sync::{mpsc, oneshot};

/// Requests waiting for the writer before callers are made to wait for room.
const QUEUE_DEPTH: usize = 4096;

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
    fn before_commit(&mut self, _txn: &WriteTransaction) -> Result<(), redb::Error> {
        Ok(())
    }

    /// The group committed: make its staged effects visible.
    fn committed(&mut self, staged: Self::Staged);
}

struct Request<B: Batcher> {
    op: B::Op,
    reply: oneshot::Sender<BackendResult<B::Out>>,
}

/// Handle to a writer thread. Dropping it lets the thread finish what is queued and
/// waits for it, so the database file is closed once the owner is gone.
pub(crate) struct GroupWriter<B: Batcher> {
    tx: Option<mpsc::Sender<Request<B>>>,
    thread: Option<JoinHandle<()>>,
    commits: Arc<AtomicU64>,
}

impl<B: Batcher> GroupWriter<B> {
    /// Starts the writer thread, committing at most `max_group` requests per transaction.
    pub(crate) fn spawn(
        name: &str,
        db: Arc<Database>,
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
        tx.send(Request { op, reply }).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
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
    db: &Database,
    mut batcher: B,
    mut rx: mpsc::Receiver<Request<B>>,
    max_group: usize,
    commits: &AtomicU64,
) {
    let mut group: Vec<Request<B>> = Vec::with_capacity(max_group.min(QUEUE_DEPTH));
    while let Some(first) = rx.blocking_recv() {
        group.push(first);
        while group.len() < max_group {
            match rx.try_recv() {
                Ok(request) => group.push(request),
                Err(_) => break,
            }
        }
        match commit_group(db, &mut batcher, &group) {
            Ok(outs) => {
                commits.fetch_add(1, Ordering::Relaxed);
                answer(group.drain(..), outs);
            }
            Err(e) if group.len() > 1 => {
                tracing::warn!(error = %e, requests = group.len(),
                    "group commit failed; retrying its requests one by one");
                for request in group.drain(..) {
                    let out = match commit_group(db, &mut batcher, std::slice::from_ref(&request)) {
                        Ok(mut outs) => {
                            commits.fetch_add(1, Ordering::Relaxed);
                            outs.pop().unwrap_or_else(|| Err(closed()))
                        }
                        Err(e) => Err(super::redb_error(e)),
                    };
                    // The caller may have stopped waiting; its write stands either way.
                    let _ = request.reply.send(out);
                }
            }
            Err(e) => {
                let e = super::redb_error(e);
                for request in group.drain(..) {
                    let _ = request.reply.send(Err(clone_error(&e)));
                }
            }
        }
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
    batcher.before_commit(&txn)?;
    txn.commit()?;
    batcher.committed(staged);
    Ok(outs)
}
