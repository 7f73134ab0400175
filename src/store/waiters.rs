//! Long-polls waiting for one request to finish (SPEC §10 `Prefer: wait`):
//! each registers for its own id, and only the change that finishes (or
//! removes) that request wakes it — no timer loop, no broadcast. A store
//! that can read the record as the change left it sends it with the
//! wake-up: the waiter then answers without reading it again (with sled,
//! a read on an HTTP worker waits while the applier's transaction holds
//! sled's lock).

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::model::{RequestId, RequestRecord};

/// What a wake-up carries: the record as the change left it (`None`: it
/// is gone), or nothing known (look again). Behind an `Arc`: every held
/// request's channel has room for one, and a request's waiters share it.
pub type Woken = Option<Option<Arc<RequestRecord>>>;

type Map = HashMap<RequestId, Vec<oneshot::Sender<Woken>>>;

#[derive(Default)]
pub struct Waiters(Mutex<Map>);

impl Waiters {
    fn lock(&self) -> MutexGuard<'_, Map> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves when `id` may have finished (`done`, `unknown`) or gone:
    /// look again then. Register before looking at the status, so that a
    /// change in between is not missed.
    pub fn watch(&self, id: &RequestId) -> oneshot::Receiver<Woken> {
        let (tx, rx) = oneshot::channel();
        self.lock().entry(*id).or_default().push(tx);
        rx
    }

    /// Forgets the waiters of `id` that gave up (a timeout, a closed
    /// connection).
    pub fn unwatch(&self, id: &RequestId) {
        let mut w = self.lock();
        if let Some(list) = w.get_mut(id) {
            list.retain(|tx| !tx.is_closed());
            if list.is_empty() {
                w.remove(id);
            }
        }
    }

    /// The requests someone waits for.
    pub fn watched(&self) -> Vec<RequestId> {
        self.lock().keys().copied().collect()
    }

    /// Long-polls waiting now (a metric).
    pub fn watching(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    /// Wakes whoever waits on these requests, to look again.
    pub fn wake(&self, ids: impl IntoIterator<Item = RequestId>) {
        for (_, list) in self.take(ids) {
            for tx in list {
                let _ = tx.send(None);
            }
        }
    }

    /// Wakes whoever waits on these requests with each one's record as
    /// `read` finds it now (read only for requests someone waits on, and
    /// outside the lock). A failed read wakes them to look again.
    pub fn wake_with<E: Display>(
        &self,
        ids: impl IntoIterator<Item = RequestId>,
        read: impl Fn(&RequestId) -> Result<Option<RequestRecord>, E>,
    ) {
        for (id, list) in self.take(ids) {
            let woken = match read(&id) {
                Ok(rec) => Some(rec.map(Arc::new)),
                Err(e) => {
                    log::warn!("reading request {id} for its waiters failed: {e}");
                    None
                }
            };
            for tx in list {
                let _ = tx.send(woken.clone());
            }
        }
    }

    fn take(
        &self,
        ids: impl IntoIterator<Item = RequestId>,
    ) -> Vec<(RequestId, Vec<oneshot::Sender<Woken>>)> {
        let mut w = self.lock();
        if w.is_empty() {
            return Vec::new();
        }
        ids.into_iter()
            .filter_map(|id| w.remove(&id).map(|list| (id, list)))
            .collect()
    }
}
