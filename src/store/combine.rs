//! Write combining for submissions. Each sled transaction rolls sled's log
//! buffer (a write) and holds a global lock, so the store would accept at
//! most one request per transaction time. Concurrent submissions are
//! therefore gathered: the first caller to find no batch in progress leads,
//! writing every request queued meanwhile in one transaction, round after
//! round, until the queue is empty; the others wait for their answer.

use std::sync::Mutex;

use tokio::sync::oneshot;

use super::{NewRequest, Store, StoreError, Ticket};
use crate::model::RequestRecord;

/// Requests per transaction, at most.
const MAX_BATCH: usize = 256;

type Reply = oneshot::Sender<Result<RequestRecord, StoreError>>;

#[derive(Default)]
pub(super) struct Combiner {
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<(NewRequest, Reply)>,
    /// A caller is writing batches right now.
    leading: bool,
}

impl Store {
    /// Stores a new request at the tail of its lane, batched with the
    /// submissions arriving at the same time. Durable once the ticket is.
    pub async fn submit(&self, new: NewRequest) -> Result<(RequestRecord, Ticket), StoreError> {
        let (reply, answer) = oneshot::channel();
        let lead = {
            let mut q = self.combiner.lock();
            q.waiting.push((new, reply));
            !std::mem::replace(&mut q.leading, true)
        };
        if lead {
            self.lead();
        }
        let rec = answer.await.map_err(|_| StoreError::Closed)??;
        Ok((rec, self.flusher.ticket()))
    }

    /// Writes batches until nobody waits.
    fn lead(&self) {
        loop {
            let batch: Vec<(NewRequest, Reply)> = {
                let mut q = self.combiner.lock();
                if q.waiting.is_empty() {
                    q.leading = false;
                    return;
                }
                let n = q.waiting.len().min(MAX_BATCH);
                q.waiting.drain(..n).collect()
            };
            let (news, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            match self.enqueue_batch(news) {
                Ok(recs) => {
                    for (rec, reply) in recs.into_iter().zip(replies) {
                        let _ = reply.send(Ok(rec));
                    }
                }
                Err(e) => {
                    log::error!("storing {} submissions failed: {e}", replies.len());
                    for reply in replies {
                        let _ = reply.send(Err(StoreError::Unavailable(e.to_string())));
                    }
                }
            }
        }
    }
}

impl Combiner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}
