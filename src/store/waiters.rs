//! Long-polls waiting for one request to finish (SPEC §10 `Prefer: wait`):
//! each registers for its own id, and only the change that finishes (or
//! removes) that request wakes it — no timer loop, no broadcast.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use tokio::sync::oneshot;

use crate::model::RequestId;

type Map = HashMap<RequestId, Vec<oneshot::Sender<()>>>;

#[derive(Default)]
pub struct Waiters(Mutex<Map>);

impl Waiters {
    fn lock(&self) -> MutexGuard<'_, Map> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves when `id` may have finished (`done`, `unknown`) or gone:
    /// look again then. Register before looking at the status, so that a
    /// change in between is not missed.
    pub fn watch(&self, id: &RequestId) -> oneshot::Receiver<()> {
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

    /// Wakes whoever waits on these requests.
    pub fn wake(&self, ids: impl IntoIterator<Item = RequestId>) {
        let mut w = self.lock();
        if w.is_empty() {
            return;
        }
        for id in ids {
            for tx in w.remove(&id).into_iter().flatten() {
                let _ = tx.send(());
            }
        }
    }
}
