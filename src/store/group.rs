//! Group commit on SQLite: concurrent appends through one store share a write transaction.
//!
//! SQLite lets one writer in at a time, and each commit writes every page its transaction
//! changed (the stream row, the position counter, the message and its indexes: ~17 WAL frames
//! for a one-event append). Writers queuing on the file lock also sleep in SQLite's busy
//! handler. So appends through a store (and its clones) queue in the process instead: one task
//! takes the waiting appends and writes them in one transaction, one commit for all.
//!
//! The stream rows move one by one, then the messages of all the appends go in together, then
//! each store's inline projections fold the rows of all its appends at once. An error anywhere
//! rolls the whole group back, and each of its appends is then written on its own, exactly as
//! without grouping: a failing append (or inline projection) fails with its own error, the
//! others succeed.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use tokio::sync::oneshot;

use super::EventStore;
use crate::backend::{self, Append, Appended};
use crate::error::Result;
use crate::event::StoredMessage;

/// Appends in one group at most (one transaction, so one hold of the write lock).
const MAX_GROUP: usize = 64;

/// The appends waiting to be written, and whether a task is writing them.
#[derive(Default)]
pub(super) struct GroupCommit {
    queue: Mutex<Queue>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (waiting, writing) =
            self.queue.lock().map(|queue| (queue.waiting.len(), queue.writing)).unwrap_or_default();
        f.debug_struct("GroupCommit").field("waiting", &waiting).field("writing", &writing).finish()
    }
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Request>,
    writing: bool,
}

struct Request {
    /// The store that asked (its inline projections run with the append).
    store: EventStore,
    append: Arc<Append>,
    /// `None`: the group was rolled back; write the append alone.
    reply: oneshot::Sender<Option<Result<Option<Appended>>>>,
}

impl GroupCommit {
    /// Writes `append` of `store` (a pooled SQLite store) together with whatever other appends
    /// wait: `None` when its expected version does not hold.
    pub async fn append(self: &Arc<Self>, store: &EventStore, append: &Arc<Append>) -> Result<Option<Appended>> {
        let (reply, written) = oneshot::channel();
        let request = Request { store: store.clone(), append: Arc::clone(append), reply };
        let start_writer = {
            let mut queue = self.queue.lock().expect("not poisoned");
            queue.waiting.push(request);
            !std::mem::replace(&mut queue.writing, true)
        };
        if start_writer {
            // The guard lives in the task from its creation: a task dropped before it first
            // runs (its runtime stopping) still hands the writing over.
            tokio::spawn(Writer(Some(Arc::clone(self))).write());
        }
        match written.await {
            Ok(Some(result)) => result,
            // Rolled back with its group; or the group's task ended without an answer (an inline
            // projection panicked — it will again, here, in the caller's task — or the runtime
            // is stopping).
            Ok(None) | Err(_) => store.append_once(append).await,
        }
    }
}

/// The writer task of a [`GroupCommit`]: if it is dropped before it ends (with its runtime),
/// the next append starts another.
struct Writer(Option<Arc<GroupCommit>>);

impl Writer {
    /// Writes groups until no append waits.
    async fn write(mut self) {
        let commit = Arc::clone(self.0.as_ref().expect("a writer holds its queue"));
        loop {
            let group: Vec<Request> = {
                let mut queue = commit.queue.lock().expect("not poisoned");
                // An append whose caller went away (cancelled) is not written.
                queue.waiting.retain(|request| !request.reply.is_closed());
                if queue.waiting.is_empty() {
                    queue.writing = false;
                    self.0 = None;
                    return;
                }
                let n = queue.waiting.len().min(MAX_GROUP);
                queue.waiting.drain(..n).collect()
            };
            // A panic drops the group's answers: its appends are then written alone.
            let _ = AssertUnwindSafe(write_group(group)).catch_unwind().await;
        }
    }
}

impl Drop for Writer {
    /// Ended before the queue was empty (its runtime stopped): the appends still waiting, some
    /// perhaps queued by callers on another runtime, get no answer (their channels close) and
    /// are written alone by their callers; the next append starts a new writer.
    fn drop(&mut self) {
        let Some(commit) = self.0.take() else { return };
        let stranded = match commit.queue.lock() {
            Ok(mut queue) => {
                queue.writing = false;
                std::mem::take(&mut queue.waiting)
            }
            Err(_) => return,
        };
        drop(stranded);
    }
}

/// Writes `group` in one transaction and answers each request.
async fn write_group(mut group: Vec<Request>) {
    if group.len() == 1 {
        let request = group.pop().expect("one");
        let result = request.store.append_once(&request.append).await;
        let _ = request.reply.send(Some(result));
        return;
    }
    let written: std::result::Result<Vec<Option<Appended>>, ()> = async {
        let pool = group[0].store.pool().ok_or(())?;
        let txn = Arc::new(backend::begin_write(pool).await.map_err(drop)?);
        let appends: Vec<&Append> = group.iter().map(|r| &*r.append).collect();
        let mut written = backend::append_steps(&txn, &appends).await.map_err(drop)?;
        // Each store's inline projections once, over the rows of all its appends.
        let mut runs: Vec<(&EventStore, Vec<StoredMessage>)> = Vec::new();
        for (request, done) in group.iter().zip(&mut written) {
            let (store, rows) = (&request.store, done.as_mut().map(|d| std::mem::take(&mut d.rows)));
            match runs.iter_mut().find(|(other, _)| other.inline.same_as(&store.inline)) {
                Some((_, all)) => all.extend(rows.into_iter().flatten()),
                None if !store.inline.is_empty() => runs.push((store, rows.unwrap_or_default())),
                None => {}
            }
        }
        for (store, mut rows) in runs {
            rows.sort_by_key(|row| row.global_position);
            store.inline.run(&store.bound_to(Arc::clone(&txn)), rows).await.map_err(drop)?;
        }
        Arc::into_inner(txn).ok_or(())?.commit().await.map_err(drop)?;
        Ok(written)
    }
    .await;
    match written {
        Ok(written) => group.into_iter().zip(written).for_each(|(r, w)| drop(r.reply.send(Some(Ok(w))))),
        Err(()) => group.into_iter().for_each(|r| drop(r.reply.send(None))),
    }
}
