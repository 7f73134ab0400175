//! The store's domain operations that change something. Each goes to the
//! writer (`writer`) and returns once its change is durable, or refused:
//! there is nothing more to wait for. `async` for the HTTP handlers and
//! the dispatcher; `_blocking` twins for threads outside the runtime (the
//! sweeper, start-up recovery, tests).

use tokio::sync::oneshot;

use super::change::{Applied, Change};
use super::writer::{Op, WithBlobs};
use super::{Claim, NewRequest, Recovered, Settle, SledStore, StoreError, Submitted, codec};
use crate::model::{LaneKey, RequestId, RequestRecord, ResponseHead, Status};

type Answer = oneshot::Receiver<Result<Vec<Applied>, StoreError>>;

async fn one(answer: Answer) -> Result<Applied, StoreError> {
    first(answer.await.map_err(|_| StoreError::Closed)??)
}

fn one_blocking(answer: Answer) -> Result<Applied, StoreError> {
    first(answer.blocking_recv().map_err(|_| StoreError::Closed)??)
}

fn first(applied: Vec<Applied>) -> Result<Applied, StoreError> {
    match applied.into_iter().next() {
        Some(Applied::Refused(e)) => Err(e),
        Some(a) => Ok(a),
        None => Err(StoreError::Closed),
    }
}

fn submitted(a: Applied) -> Result<Submitted, StoreError> {
    match a {
        Applied::Stored(rec) => Ok(Submitted::New(*rec)),
        Applied::Duplicate(rec) => Ok(Submitted::Again(*rec)),
        other => Err(StoreError::Codec(format!(
            "a submission answered {other:?}"
        ))),
    }
}

fn changed(a: Applied) -> bool {
    matches!(a, Applied::Changed(true))
}

impl Settle {
    fn into_change(self) -> Result<WithBlobs, StoreError> {
        Ok(match self {
            Settle::Requeue { id, claims, sent } => (Change::Requeue { id, claims, sent }, vec![]),
            Settle::Unknown {
                id,
                claims,
                now_ms,
                keep_ms,
            } => (
                Change::Unknown {
                    id,
                    claims,
                    now_ms,
                    keep_ms,
                },
                vec![],
            ),
            Settle::Complete {
                id,
                claims,
                done,
                now_ms,
                retention_ms,
            } => {
                // The head goes to the journal too: upstream headers can be
                // large, and sled writes big values as files it never fsyncs.
                let head = ResponseHead {
                    body: None,
                    ..done.head
                };
                let mut blobs = vec![codec::encode(&head)?];
                if !done.body.is_empty() {
                    blobs.push(done.body);
                }
                let change = Change::Complete {
                    id,
                    claims,
                    sent_ms: done.sent_ms,
                    outcome: done.outcome,
                    now_ms,
                    retention_ms,
                };
                (change, blobs)
            }
        })
    }
}

impl NewRequest {
    #[cfg(test)]
    pub(super) fn into_op_for_tests(self) -> Op {
        self.into_op().expect("a valid request")
    }

    fn into_op(self) -> Result<Op, StoreError> {
        if self.sealed_credential.len() > super::MAX_VALUE {
            return Err(StoreError::TooLarge(self.sealed_credential.len()));
        }
        let rec = RequestRecord {
            id: self.id,
            seq: 0, // given by the writer
            lane: self.lane,
            method: self.method,
            target: self.target,
            headers: self.headers,
            body: None,
            callback: self.callback,
            created_ms: self.now_ms,
            status: Status::Enqueued,
            started_ms: None,
            claims: 0,
            outcome: None,
            finished_ms: None,
            expires_ms: None,
            sealed: self.sealed_credential,
            response: None,
            attempts: 0,
            idempotency: self.idempotency,
            callback_state: None,
        };
        let size = codec::encode(&rec)?.len() + 64; // + the body's reference
        if size > super::MAX_VALUE {
            return Err(StoreError::TooLarge(size));
        }
        let change = Change::Submit {
            rec: Box::new(rec),
            max_pending: self.max_pending,
        };
        Ok(Op::Submit(Box::new(change), self.body))
    }
}

impl SledStore {
    fn send(&self, op: Op) -> Answer {
        self.writer.send(op)
    }

    fn change(&self, change: Change) -> Answer {
        self.send(Op::Changes(vec![(change, vec![])]))
    }

    /// Stores a new request at the tail of its lane, durably. `LaneFull`
    /// when its lane already holds `NewRequest::max_pending` requests,
    /// `NoSpace` when the disk cannot take it: refused alone.
    pub async fn submit(&self, new: NewRequest) -> Result<Submitted, StoreError> {
        submitted(one(self.send(new.into_op()?)).await?)
    }

    #[cfg(test)]
    pub fn submit_blocking(&self, new: NewRequest) -> Result<RequestRecord, StoreError> {
        match submitted(one_blocking(self.send(new.into_op()?))?)? {
            Submitted::New(rec) | Submitted::Again(rec) => Ok(rec),
        }
    }

    fn claim_op(lanes: &[LaneKey], now_ms: u64) -> Op {
        Op::Claim {
            lanes: lanes.to_vec(),
            now_ms,
        }
    }

    fn claims(applied: Vec<Applied>) -> Vec<Claim> {
        applied
            .into_iter()
            .map(|a| match a {
                Applied::Claimed(c) => c,
                _ => Claim::Skipped,
            })
            .collect()
    }

    /// Claims the heads of `lanes`; a lane named k times gives its first k
    /// queued requests. One `Claim` per slot, in order, durable: send a
    /// `Got` at once.
    pub async fn claim_batch(
        &self,
        lanes: &[LaneKey],
        now_ms: u64,
    ) -> Result<Vec<Claim>, StoreError> {
        let answer = self.send(Self::claim_op(lanes, now_ms));
        Ok(Self::claims(answer.await.map_err(|_| StoreError::Closed)??))
    }

    /// Takes the head of `lane` (tests). `None` when it is empty.
    #[cfg(test)]
    pub fn claim_next_blocking(
        &self,
        lane: &LaneKey,
        now_ms: u64,
    ) -> Result<Option<RequestRecord>, StoreError> {
        loop {
            let answer = self.send(Self::claim_op(&[*lane], now_ms));
            let got = Self::claims(answer.blocking_recv().map_err(|_| StoreError::Closed)??);
            match got.into_iter().next() {
                Some(Claim::Got(rec)) => return Ok(Some(*rec)),
                Some(Claim::Skipped) => continue,
                _ => return Ok(None),
            }
        }
    }

    /// Settles one attempt; false if its claim was stale (nothing changed).
    pub async fn settle(&self, op: Settle) -> Result<bool, StoreError> {
        let change = op.into_change()?;
        Ok(changed(one(self.send(Op::Changes(vec![change]))).await?))
    }

    pub fn settle_blocking(&self, op: Settle) -> Result<bool, StoreError> {
        let change = op.into_change()?;
        Ok(changed(one_blocking(self.send(Op::Changes(vec![change])))?))
    }

    /// Start-up recovery: whatever was `started` when the last process died
    /// goes back to its lane (idempotent methods) or becomes `unknown`, in
    /// one durable round. Reads only the `started` index.
    pub async fn recover(
        &self,
        now_ms: u64,
        unknown_keep_ms: u64,
    ) -> Result<Recovered, StoreError> {
        let mut report = Recovered::default();
        let mut changes = Vec::new();
        for rec in self.list(Status::Started, None, usize::MAX)? {
            let op = report.settle(&rec, now_ms, unknown_keep_ms);
            changes.push(op.into_change()?);
        }
        if !changes.is_empty() {
            let answer = self.send(Op::Changes(changes));
            for a in answer.await.map_err(|_| StoreError::Closed)?? {
                if let Applied::Refused(e) = a {
                    log::error!("recovering a started request: {e}");
                }
            }
        }
        Ok(report)
    }

    /// An operator's requeue of an `unknown` request: back to the tail of
    /// its lane, retention cleared. `None` for any other status.
    pub async fn requeue_unknown(
        &self,
        id: &RequestId,
    ) -> Result<Option<RequestRecord>, StoreError> {
        let seq = self.core.db.generate_id()?;
        match one(self.change(Change::RequeueUnknown { id: *id, seq })).await? {
            Applied::Requeued(rec) => Ok(rec.map(|r| *r)),
            _ => Ok(None),
        }
    }

    /// Deletes a `done` or `unknown` request and everything stored for it;
    /// false (nothing changed) for any other status.
    pub async fn delete(&self, id: &RequestId) -> Result<bool, StoreError> {
        Ok(changed(one(self.change(Change::Delete { id: *id })).await?))
    }

    /// The owner's cancel (SPEC §10): an `enqueued` request is removed and
    /// never sent, a `done` or `unknown` one deleted; false if there is
    /// none; `InFlight` for a `started` one.
    pub async fn cancel(&self, id: &RequestId) -> Result<bool, StoreError> {
        Ok(changed(one(self.change(Change::Cancel { id: *id })).await?))
    }

    /// Deletes up to `limit` requests whose retention ended by `now_ms`
    /// (a time-ordered run of the expiry index, one change); returns how
    /// many entries it took (`limit`: there may be more).
    pub async fn expire(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let due = self.expired(now_ms, limit)?;
        let n = due.len();
        if n > 0
            && let Applied::Expired(gone) = one(self.change(Change::Expire { now_ms, due })).await?
        {
            log::debug!("retention: {gone} of {n} due requests deleted");
        }
        Ok(n)
    }

    /// Deletes the requests of `due` (expiry entries) whose retention
    /// ended by `now_ms`, in one change, and drops the entries. Returns how
    /// many requests went. Blocks (the sweeper's thread).
    #[cfg(test)]
    pub fn expire_blocking(
        &self,
        now_ms: u64,
        due: Vec<(u64, RequestId)>,
    ) -> Result<usize, StoreError> {
        match one_blocking(self.change(Change::Expire { now_ms, due }))? {
            Applied::Expired(n) => Ok(n),
            _ => Ok(0),
        }
    }

    /// The callback was answered 2xx (`code`), or is moot (`None`: its
    /// request is gone).
    pub async fn callback_finished(
        &self,
        due_ms: u64,
        id: &RequestId,
        code: Option<u16>,
    ) -> Result<(), StoreError> {
        let change = Change::CallbackDone {
            due_ms,
            id: *id,
            code,
        };
        one(self.change(change)).await?;
        Ok(())
    }

    /// Moves a failed callback to its next due time; `code`: what the
    /// receiver answered, if it answered.
    pub async fn callback_retry(
        &self,
        due_ms: u64,
        id: &RequestId,
        next_ms: u64,
        code: Option<u16>,
    ) -> Result<(), StoreError> {
        let change = Change::CallbackRetry {
            due_ms,
            id: *id,
            next_ms,
            code,
        };
        one(self.change(change)).await?;
        Ok(())
    }

    /// The request's retention ended before any receiver took its callback.
    pub async fn callback_gave_up(
        &self,
        due_ms: u64,
        id: &RequestId,
        last: Option<Option<u16>>,
    ) -> Result<(), StoreError> {
        let change = Change::CallbackGaveUp {
            due_ms,
            id: *id,
            last,
        };
        one(self.change(change)).await?;
        Ok(())
    }
}
