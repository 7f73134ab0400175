//! Every state change, each one sled transaction over the trees it touches.
//! Closures have no side effects (sled may run them again) and every status
//! change is fenced: it checks the record's status and claim count first, so
//! a stale claim can never overwrite a newer state.

use sled::transaction::{
    ConflictableTransactionError as Conflict, TransactionError, TransactionalTree,
};
use sled::{IVec, Transactional};

use super::keys::{self, Body};
use super::{Store, StoreError, Ticket, codec};
use crate::model::{
    BodyRef, Callback, Header, LaneKey, Outcome, RequestId, RequestRecord, ResponseHead, Status,
};

pub(super) const RECORDS: usize = 0;
pub(super) const BODY_REFS: usize = 1;
pub(super) const RESPONSES: usize = 2;
pub(super) const SEALED: usize = 3;
pub(super) const LANES: usize = 4;
pub(super) const BY_STATUS: usize = 5;
pub(super) const EXPIRY: usize = 6;
pub(super) const CALLBACKS: usize = 7;
pub(super) const COUNTERS: usize = 8;

pub(super) type TxResult<T> = Result<T, Conflict<StoreError>>;

/// The transactional view of all trees.
pub(super) struct Tx<'a>(&'a [TransactionalTree]);

impl Tx<'_> {
    pub(super) fn t(&self, i: usize) -> &TransactionalTree {
        &self.0[i]
    }

    pub(super) fn record(&self, id: &RequestId) -> TxResult<Option<RequestRecord>> {
        match self.t(RECORDS).get(id.as_bytes())? {
            Some(v) => Ok(Some(codec::decode(&v).map_err(Conflict::Abort)?)),
            None => Ok(None),
        }
    }

    pub(super) fn put(&self, rec: &RequestRecord) -> TxResult<()> {
        let v = codec::encode(rec).map_err(Conflict::Abort)?;
        self.t(RECORDS).insert(rec.id.as_bytes(), v)?;
        Ok(())
    }

    /// Moves `rec` to `to`, keeping the status index and counters in step.
    /// Only the transitions `Status::can_become` allows; anything else is
    /// a bug, and the transaction is aborted rather than the data bent.
    pub(super) fn set_status(&self, rec: &mut RequestRecord, to: Status) -> TxResult<()> {
        if !rec.status.can_become(to) {
            let why = format!(
                "{}: {} cannot become {}",
                rec.id,
                rec.status.as_str(),
                to.as_str()
            );
            return Err(Conflict::Abort(StoreError::Transition(why)));
        }
        self.index_status(rec.status, &rec.id, false)?;
        rec.status = to;
        self.index_status(to, &rec.id, true)
    }

    pub(super) fn index_status(&self, status: Status, id: &RequestId, add: bool) -> TxResult<()> {
        let key = keys::status(status, id);
        let present = self.t(BY_STATUS).get(key)?.is_some();
        if present == add {
            return Ok(());
        }
        if add {
            self.t(BY_STATUS).insert(&key, &[][..])?;
        } else {
            self.t(BY_STATUS).remove(&key)?;
        }
        let counter = [status.code()];
        let n = self
            .t(COUNTERS)
            .get(counter)?
            .map(|v| codec::u64_be(&v))
            .unwrap_or(0);
        let n = if add { n + 1 } else { n.saturating_sub(1) };
        self.t(COUNTERS).insert(&counter, &n.to_be_bytes())?;
        Ok(())
    }

    pub(super) fn add_body(&self, id: &RequestId, body: Body, r: Option<BodyRef>) -> TxResult<()> {
        if let Some(r) = r {
            self.t(BODY_REFS)
                .insert(&keys::body_ref(r.segment, id, body), &[][..])?;
        }
        Ok(())
    }

    pub(super) fn drop_body(&self, id: &RequestId, body: Body, r: Option<BodyRef>) -> TxResult<()> {
        if let Some(r) = r {
            self.t(BODY_REFS)
                .remove(&keys::body_ref(r.segment, id, body))?;
        }
        Ok(())
    }

    /// Ends a request's life in `status` at `now_ms`; retention starts.
    pub(super) fn finish(
        &self,
        rec: &mut RequestRecord,
        status: Status,
        now_ms: u64,
        keep_ms: u64,
    ) -> TxResult<()> {
        let expires = now_ms.saturating_add(keep_ms);
        rec.finished_ms = Some(now_ms);
        rec.expires_ms = Some(expires);
        self.t(EXPIRY)
            .insert(&keys::timed(expires, &rec.id), &[][..])?;
        self.set_status(rec, status)
    }

    /// The record, if it is in `status` under claim `claims`.
    pub(super) fn fenced(
        &self,
        id: &RequestId,
        status: Status,
        claims: Option<u32>,
    ) -> TxResult<Option<RequestRecord>> {
        Ok(self
            .record(id)?
            .filter(|r| r.status == status && claims.is_none_or(|c| c == r.claims)))
    }
}

/// What the HTTP layer hands over for a new request.
pub struct NewRequest {
    pub id: RequestId,
    pub lane: LaneKey,
    pub method: String,
    pub target: String,
    pub headers: Vec<Header>,
    pub body: Vec<u8>,
    pub callback: Option<Callback>,
    pub sealed_credential: Vec<u8>,
    pub now_ms: u64,
    /// `--max-pending-per-credential`: refuse it if its lane already holds
    /// this many `enqueued` requests.
    pub max_pending: Option<u64>,
}

/// An upstream answer to store.
pub struct Completion {
    pub sent_ms: u64,
    pub outcome: Outcome,
    pub head: ResponseHead,
    /// Empty when the body was too large to keep.
    pub body: Vec<u8>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    pub requeued: usize,
    pub unknown: usize,
}

impl Store {
    /// Appends a body to the segment files (nothing for an empty one).
    pub(super) fn append_body(&self, bytes: &[u8]) -> Result<Option<BodyRef>, StoreError> {
        if bytes.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.bodies.append(bytes)?))
    }

    /// Runs `f` as one transaction. After a fatal failure nothing is
    /// written; a storage error inside sled (a failed write poisons it) is
    /// itself fatal.
    pub(super) fn transact<T>(&self, f: impl Fn(&Tx) -> TxResult<T>) -> Result<T, StoreError> {
        if let Some(why) = self.fatal.failed() {
            return Err(StoreError::Unavailable(why));
        }
        self.trees[..]
            .transaction(|trees| f(&Tx(trees)))
            .map_err(|e| match e {
                TransactionError::Abort(e) => e,
                TransactionError::Storage(e) => {
                    self.fatal.fail(format!("a write inside sled failed: {e}"));
                    StoreError::Sled(e)
                }
            })
    }

    /// Appends a body, refusing it (`NoSpace`) when the disk is full: only
    /// that submission fails.
    fn append_checked(&self, bytes: &[u8]) -> Result<Option<BodyRef>, StoreError> {
        self.append_body(bytes).map_err(|e| match e {
            StoreError::Io(io)
                if matches!(
                    io.kind(),
                    std::io::ErrorKind::StorageFull
                        | std::io::ErrorKind::QuotaExceeded
                        | std::io::ErrorKind::FileTooLarge
                ) =>
            {
                StoreError::NoSpace
            }
            other => other,
        })
    }

    /// Stores a new request at the tail of its lane; `LaneFull` if its
    /// lane already holds `NewRequest::max_pending` requests.
    pub fn enqueue(&self, new: NewRequest) -> Result<(RequestRecord, Ticket), StoreError> {
        let rec = self
            .enqueue_batch(vec![new])?
            .pop()
            .ok_or(StoreError::Closed)??;
        Ok((rec, self.flusher.ticket()))
    }

    /// Stores new requests, each at the tail of its lane, in one
    /// transaction: sled rolls its log buffer and takes a global lock for
    /// every transaction, so one per request would bound the accept rate.
    /// One answer per request: a request refused on its own (its lane full,
    /// no space for its body, too large) fails alone, never its batch. The
    /// counts are read and raised inside the transaction, so the cap holds
    /// exactly under concurrent submissions.
    pub fn enqueue_batch(
        &self,
        news: Vec<NewRequest>,
    ) -> Result<Vec<Result<RequestRecord, StoreError>>, StoreError> {
        let _gate = self.bodies.gate();
        let mut recs = Vec::with_capacity(news.len());
        let mut extra = Vec::with_capacity(news.len());
        for mut new in news {
            let sealed = std::mem::take(&mut new.sealed_credential);
            let cap = new.max_pending;
            recs.push(self.prepare(new, sealed.len()));
            extra.push((sealed, cap));
        }
        // Bytes before records: no record may reach the disk (sled's log
        // can, at any moment) before the body it names.
        self.sync_bodies()?;
        let stored = self.transact(|tx| {
            let mut stored = Vec::with_capacity(recs.len());
            for (r, (sealed, cap)) in recs.iter().zip(&extra) {
                let Ok(r) = r else {
                    stored.push(false);
                    continue;
                };
                if let Some(cap) = cap
                    && tx.pending(&r.lane)? >= *cap
                {
                    stored.push(false);
                    continue;
                }
                tx.add_body(&r.id, Body::Request, r.body)?;
                tx.t(SEALED).insert(r.id.as_bytes(), sealed.as_slice())?;
                tx.lane_push(r)?;
                tx.index_status(Status::Enqueued, &r.id, true)?;
                tx.put(r)?;
                stored.push(true);
            }
            Ok(stored)
        })?;
        Ok(recs
            .into_iter()
            .zip(stored)
            .zip(extra)
            .map(|((r, ok), (_, cap))| match r {
                Ok(_) if !ok => Err(StoreError::LaneFull(cap.unwrap_or(u64::MAX))),
                other => other,
            })
            .collect())
    }

    /// A new request's record, its body written: refused alone when its
    /// lane is already full (before the body is written), the disk has no
    /// room for the body, or the record would be too large for sled.
    fn prepare(&self, new: NewRequest, sealed_len: usize) -> Result<RequestRecord, StoreError> {
        if let Some(cap) = new.max_pending
            && self.pending_in_lane(&new.lane)? >= cap
        {
            return Err(StoreError::LaneFull(cap));
        }
        let size = sealed_len;
        if size > super::MAX_VALUE {
            return Err(StoreError::TooLarge(size));
        }
        let mut rec = RequestRecord {
            id: new.id,
            seq: self.db.generate_id()?,
            lane: new.lane,
            method: new.method,
            target: new.target,
            headers: new.headers,
            body: None,
            callback: new.callback,
            created_ms: new.now_ms,
            status: Status::Enqueued,
            started_ms: None,
            claims: 0,
            outcome: None,
            finished_ms: None,
            expires_ms: None,
        };
        let size = codec::encode(&rec)?.len() + 64; // + the body's reference
        if size > super::MAX_VALUE {
            return Err(StoreError::TooLarge(size));
        }
        rec.body = self.append_checked(&new.body)?;
        Ok(rec)
    }

    /// Start-up recovery: whatever was `started` when the last process died
    /// goes back to its lane (idempotent methods) or becomes `unknown`.
    /// Reads only the `started` index, never every record.
    pub fn recover(&self, now_ms: u64, unknown_keep_ms: u64) -> Result<Recovered, StoreError> {
        let mut report = Recovered::default();
        let started: Vec<IVec> = self
            .tree(BY_STATUS)
            .scan_prefix([Status::Started.code()])
            .keys()
            .collect::<Result<_, _>>()?;
        for key in started {
            let Some(id) = keys::id_from(&key[1..]) else {
                continue;
            };
            let Some(rec) = self.get(&id)? else {
                self.tree(BY_STATUS).remove(&key)?;
                continue;
            };
            if crate::model::is_idempotent(&rec.method) {
                self.requeue(&id, rec.claims)?;
                report.requeued += 1;
            } else {
                let _ = self.mark_unknown(&id, rec.claims, now_ms, unknown_keep_ms)?;
                report.unknown += 1;
            }
        }
        let ticket = self.flusher.ticket();
        self.flusher.wait_blocking(ticket)?;
        Ok(report)
    }

    /// The callback was answered 2xx (or can no longer be delivered).
    pub fn callback_finished(&self, due_ms: u64, id: &RequestId) -> Result<Ticket, StoreError> {
        self.tree(CALLBACKS).remove(keys::timed(due_ms, id))?;
        Ok(self.flusher.ticket())
    }

    /// Moves a failed callback to its next due time.
    pub fn callback_retry(
        &self,
        due_ms: u64,
        id: &RequestId,
        next_ms: u64,
        attempts: u32,
    ) -> Result<(), StoreError> {
        let attempts = codec::encode(&attempts)?;
        self.transact(|tx| {
            tx.t(CALLBACKS).remove(&keys::timed(due_ms, id))?;
            tx.t(CALLBACKS)
                .insert(&keys::timed(next_ms, id), attempts.as_slice())?;
            Ok(())
        })
    }

    /// Deletes a `done` or `unknown` request and everything stored for it;
    /// false (nothing changed) for any other status.
    pub fn delete(&self, id: &RequestId) -> Result<bool, StoreError> {
        self.delete_if(id, |rec| {
            matches!(rec.status, Status::Done | Status::Unknown)
        })
    }

    /// Deletes a request whose retention ended by `now_ms`, re-checked in
    /// the deleting transaction: an operator's requeue between the sweep's
    /// look at the expiry index and this delete must not lose a request.
    pub fn delete_expired(&self, id: &RequestId, now_ms: u64) -> Result<bool, StoreError> {
        self.delete_if(id, |rec| {
            matches!(rec.status, Status::Done | Status::Unknown) && rec.is_expired(now_ms)
        })
    }

    /// Deletes a request and everything stored for it, if `allowed` says so
    /// of the record as the deleting transaction sees it.
    pub(super) fn delete_if(
        &self,
        id: &RequestId,
        allowed: impl Fn(&RequestRecord) -> bool,
    ) -> Result<bool, StoreError> {
        self.transact(|tx| {
            let Some(rec) = tx.record(id)? else {
                return Ok(false);
            };
            if !allowed(&rec) {
                return Ok(false);
            }
            if rec.status == Status::Enqueued {
                tx.lane_remove(&rec.lane, rec.seq)?;
            }
            tx.index_status(rec.status, id, false)?;
            tx.drop_body(id, Body::Request, rec.body)?;
            // Read here, not before: a requeue-and-complete in between must
            // not leave the new response's references behind. (The
            // references alone: a sweep of many deletes reads no segment.)
            if let Some(v) = tx.t(RESPONSES).remove(id.as_bytes())? {
                let (head, body): (BodyRef, Option<BodyRef>) =
                    codec::decode(&v).map_err(Conflict::Abort)?;
                tx.drop_body(id, Body::ResponseHead, Some(head))?;
                tx.drop_body(id, Body::Response, body)?;
            }
            tx.t(SEALED).remove(id.as_bytes())?;
            if let Some(e) = rec.expires_ms {
                tx.t(EXPIRY).remove(&keys::timed(e, id))?;
            }
            tx.t(RECORDS).remove(id.as_bytes())?;
            Ok(true)
        })
    }

    /// Drops an expiry entry whose record is already gone.
    pub fn forget_expiry(&self, at_ms: u64, id: &RequestId) -> Result<(), StoreError> {
        self.tree(EXPIRY).remove(keys::timed(at_ms, id))?;
        Ok(())
    }

    /// An operator's requeue of an `unknown` request: back to the tail of its
    /// lane, retention cleared. False for any other status.
    pub fn requeue_unknown(
        &self,
        id: &RequestId,
    ) -> Result<Option<(RequestRecord, Ticket)>, StoreError> {
        let seq = self.db.generate_id()?;
        let rec = self.transact(|tx| {
            let Some(mut rec) = tx.fenced(id, Status::Unknown, None)? else {
                return Ok(None);
            };
            if let Some(e) = rec.expires_ms.take() {
                tx.t(EXPIRY).remove(&keys::timed(e, id))?;
            }
            rec.finished_ms = None;
            rec.started_ms = None;
            rec.seq = seq;
            tx.lane_push(&rec)?;
            tx.set_status(&mut rec, Status::Enqueued)?;
            tx.put(&rec)?;
            Ok(Some(rec))
        })?;
        Ok(rec.map(|r| (r, self.flusher.ticket())))
    }
}
