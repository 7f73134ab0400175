//! Write combining. Each sled transaction rolls sled's log buffer (a
//! write) and holds a global lock, so one transaction per operation bounds
//! the store's rate. Operations arriving together are gathered instead:
//! the first caller to find no batch in progress leads, applying every
//! operation queued meanwhile in one transaction, round after round, until
//! the queue is empty; the others wait for their answer.

use std::sync::Mutex;

use tokio::sync::oneshot;

use super::{NewRequest, Store, StoreError, Ticket};
use crate::model::RequestRecord;

/// Operations per transaction, at most.
const MAX_BATCH: usize = 256;

type Reply<Out> = oneshot::Sender<Result<Out, StoreError>>;

pub(super) struct Combiner<Op, Out> {
    queue: Mutex<Queue<Op, Out>>,
}

struct Queue<Op, Out> {
    waiting: Vec<(Op, Reply<Out>)>,
    /// A caller is applying batches right now.
    leading: bool,
}

impl<Op, Out> Default for Combiner<Op, Out> {
    fn default() -> Self {
        Combiner {
            queue: Mutex::new(Queue {
                waiting: Vec::new(),
                leading: false,
            }),
        }
    }
}

impl<Op, Out> Combiner<Op, Out> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue<Op, Out>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `op` with whatever else is queued. With `gather`, the caller
    /// first yields once, so tasks of the same thread (the dispatcher's)
    /// can join the batch.
    pub async fn combine(
        &self,
        op: Op,
        gather: bool,
        apply: impl Fn(Vec<Op>) -> Result<Vec<Out>, StoreError>,
    ) -> Result<Out, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.lock().waiting.push((op, reply));
        if gather {
            tokio::task::yield_now().await;
        }
        // Leadership is taken and given up under the lock, with no await
        // in between: a queued operation always finds a leader, even if
        // this caller's future is dropped at the yield above.
        let lead = !std::mem::replace(&mut self.lock().leading, true);
        if lead {
            self.lead(&apply);
        }
        answer.await.map_err(|_| StoreError::Closed)?
    }

    fn lead(&self, apply: &impl Fn(Vec<Op>) -> Result<Vec<Out>, StoreError>) {
        loop {
            let batch: Vec<(Op, Reply<Out>)> = {
                let mut q = self.lock();
                if q.waiting.is_empty() {
                    q.leading = false;
                    return;
                }
                let n = q.waiting.len().min(MAX_BATCH);
                q.waiting.drain(..n).collect()
            };
            let (ops, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            match apply(ops) {
                Ok(outs) => {
                    for (out, reply) in outs.into_iter().zip(replies) {
                        let _ = reply.send(Ok(out));
                    }
                }
                Err(e) => {
                    log::error!("a batch of {} store writes failed: {e}", replies.len());
                    for reply in replies {
                        let _ = reply.send(Err(StoreError::Unavailable(e.to_string())));
                    }
                }
            }
        }
    }
}

impl Store {
    /// Stores a new request at the tail of its lane, in one transaction
    /// with the submissions arriving at the same time (on other HTTP
    /// worker threads). Durable once the ticket is. `LaneFull` when its
    /// lane already holds `NewRequest::max_pending` requests.
    pub async fn submit(&self, new: NewRequest) -> Result<(RequestRecord, Ticket), StoreError> {
        let rec = self
            .submitter
            .combine(new, false, |news| self.enqueue_batch(news))
            .await??;
        Ok((rec, self.flusher.ticket()))
    }
}
