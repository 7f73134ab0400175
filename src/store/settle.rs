//! How a claimed (`started`) attempt ends: back to the head of its lane,
//! `done` with its response, or `unknown`. Each change is fenced by the
//! claim count, so a stale claim never overwrites a newer state. The
//! dispatcher settles through `Store::settle`, which gathers the attempts
//! finishing together into one transaction (see `combine`).

use sled::transaction::ConflictableTransactionError as Conflict;

use super::keys::{self, Body};
use super::tx::{CALLBACKS, RESPONSES, SEALED, Tx, TxResult};
use super::{Completion, Store, StoreError, Ticket, codec};
use crate::model::{BodyRef, RequestId, Status};

/// One attempt's end.
pub enum Settle {
    /// Refused (429) or never sent: back to the head of its lane.
    Requeue { id: RequestId, claims: u32 },
    /// Answered: `done`, the response kept, the credential deleted, the
    /// callback scheduled.
    Complete {
        id: RequestId,
        claims: u32,
        done: Completion,
        now_ms: u64,
        retention_ms: u64,
    },
    /// A non-idempotent request that may have run waits for an operator.
    Unknown {
        id: RequestId,
        claims: u32,
        now_ms: u64,
        keep_ms: u64,
    },
}

impl Settle {
    fn id(&self) -> RequestId {
        match self {
            Settle::Requeue { id, .. }
            | Settle::Complete { id, .. }
            | Settle::Unknown { id, .. } => *id,
        }
    }
}

/// A completion's response head, encoded before the transaction.
struct Prepared {
    /// The `responses` value: where the encoded head and the body live.
    value: Vec<u8>,
    head: BodyRef,
    body: Option<BodyRef>,
}

impl Tx<'_> {
    fn settle(&self, op: &Settle, prepared: Option<&Prepared>) -> TxResult<bool> {
        let (id, claims) = match op {
            Settle::Requeue { id, claims }
            | Settle::Complete { id, claims, .. }
            | Settle::Unknown { id, claims, .. } => (id, *claims),
        };
        let Some(mut rec) = self.fenced(id, Status::Started, Some(claims))? else {
            return Ok(false);
        };
        match op {
            Settle::Requeue { .. } => {
                rec.started_ms = None;
                self.lane_push(&rec)?;
                self.set_status(&mut rec, Status::Enqueued)?;
            }
            Settle::Complete {
                done,
                now_ms,
                retention_ms,
                ..
            } => {
                let p = prepared.ok_or_else(|| Conflict::Abort(StoreError::Closed))?;
                rec.started_ms = Some(done.sent_ms);
                rec.outcome = Some(done.outcome.clone());
                self.t(RESPONSES)
                    .insert(id.as_bytes(), p.value.as_slice())?;
                self.add_body(id, Body::ResponseHead, Some(p.head))?;
                self.add_body(id, Body::Response, p.body)?;
                self.drop_body(id, Body::Request, rec.body.take())?;
                self.t(SEALED).remove(id.as_bytes())?;
                if rec.callback.is_some() {
                    let attempts = codec::encode(&0u32).map_err(Conflict::Abort)?;
                    self.t(CALLBACKS)
                        .insert(&keys::timed(*now_ms, id), attempts)?;
                }
                self.finish(&mut rec, Status::Done, *now_ms, *retention_ms)?;
            }
            Settle::Unknown {
                now_ms, keep_ms, ..
            } => {
                self.finish(&mut rec, Status::Unknown, *now_ms, *keep_ms)?;
            }
        }
        self.put(&rec)?;
        Ok(true)
    }
}

impl Store {
    /// Applies `ops` in one transaction; for each, whether its claim was
    /// still current (false: stale, nothing changed).
    pub fn settle_batch(&self, ops: Vec<Settle>) -> Result<Vec<bool>, StoreError> {
        let _gate = self.bodies.gate();
        let mut prepared = Vec::with_capacity(ops.len());
        for op in &ops {
            prepared.push(match op {
                Settle::Complete { done, .. } => {
                    // The head goes to the segment files too: upstream
                    // headers can be large, and sled writes a leaf whose
                    // values pass ~128 KiB as a blob file it never fsyncs.
                    let mut head = done.head.clone();
                    head.body = self.append_result(&done.body)?;
                    let head_ref = self
                        .append_result(&codec::encode(&head)?)?
                        .ok_or(StoreError::Closed)?;
                    Some(Prepared {
                        value: codec::encode(&(head_ref, head.body))?,
                        head: head_ref,
                        body: head.body,
                    })
                }
                _ => None,
            });
        }
        if prepared.iter().any(Option::is_some) {
            // Bytes before records (see `bodies`).
            self.sync_bodies()?;
        }
        let together = self.transact(|tx| {
            ops.iter()
                .zip(&prepared)
                .map(|(op, p)| tx.settle(op, p.as_ref()))
                .collect()
        });
        match together {
            // One attempt's trouble (an unreadable record, say) must not
            // leave the others of its batch `started`: each alone, then.
            Err(e) if self.fatal.failed().is_none() && ops.len() > 1 => {
                log::warn!(
                    "a batch of {} settles failed ({e}); applying them one by one",
                    ops.len()
                );
                Ok(ops
                    .iter()
                    .zip(&prepared)
                    .map(|(op, p)| {
                        self.transact(|tx| tx.settle(op, p.as_ref()))
                            .unwrap_or_else(|e| {
                                log::error!(
                                    "request {}: its attempt could not be recorded: {e}",
                                    op.id()
                                );
                                false
                            })
                    })
                    .collect())
            }
            other => other,
        }
    }

    /// Appends an upstream answer's bytes. The answer was received: a body
    /// file that cannot take it means results cannot be recorded, which
    /// is as fatal as a failed fsync (a restart recovers the attempt).
    fn append_result(&self, bytes: &[u8]) -> Result<Option<BodyRef>, StoreError> {
        self.append_body(bytes).map_err(|e| {
            self.fatal
                .fail(format!("an upstream answer could not be written: {e}"));
            e
        })
    }

    /// Settles one attempt, together with those finishing at the same
    /// time. `None` if the claim was stale; else wait for the ticket.
    pub async fn settle(&self, op: Settle) -> Result<Option<Ticket>, StoreError> {
        let applied = self
            .settler
            .combine(op, true, |ops| self.settle_batch(ops))
            .await?;
        Ok(applied.then(|| self.flusher.ticket()))
    }

    fn settle_now(&self, op: Settle) -> Result<Option<Ticket>, StoreError> {
        let applied = self.settle_batch(vec![op])?.pop().unwrap_or(false);
        Ok(applied.then(|| self.flusher.ticket()))
    }

    /// `Settle::Requeue`, alone.
    pub fn requeue(&self, id: &RequestId, claims: u32) -> Result<bool, StoreError> {
        Ok(self
            .settle_now(Settle::Requeue { id: *id, claims })?
            .is_some())
    }

    /// `Settle::Complete`, alone.
    pub fn complete(
        &self,
        id: &RequestId,
        claims: u32,
        done: Completion,
        now_ms: u64,
        retention_ms: u64,
    ) -> Result<Option<Ticket>, StoreError> {
        self.settle_now(Settle::Complete {
            id: *id,
            claims,
            done,
            now_ms,
            retention_ms,
        })
    }

    /// `Settle::Unknown`, alone.
    pub fn mark_unknown(
        &self,
        id: &RequestId,
        claims: u32,
        now_ms: u64,
        keep_ms: u64,
    ) -> Result<Option<Ticket>, StoreError> {
        self.settle_now(Settle::Unknown {
            id: *id,
            claims,
            now_ms,
            keep_ms,
        })
    }
}
