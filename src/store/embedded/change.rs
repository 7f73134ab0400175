//! Every change the store makes, as the journal records it, and `apply`,
//! the one function that turns a change into writes on sled's trees. The
//! writer applies each change after the journal holding it is durable, and
//! recovery applies the journal's tail again after a crash: the trees are
//! a pure function of the journal. So `apply` reads nothing but the trees
//! and the change, and a change that no longer fits the state (a stale
//! claim, a full lane) is refused the same way both times.

use std::cell::RefCell;
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError as Conflict, TransactionalTree};

use super::keyed::{self, Index, Key};
use super::keyfile::KeyFile;
use super::keys;
use super::{Claim, StoreError, codec};
use crate::model::{
    BodyRef, Idempotency, LaneKey, Outcome, RequestId, RequestRecord, ResponseRefs, Status,
};

pub(super) const RECORDS: usize = 0;
pub(super) const LANES: usize = 1;
/// `started` and `unknown` requests only: recovery and the operator's list.
pub(super) const BY_STATUS: usize = 2;
pub(super) const EXPIRY: usize = 3;
pub(super) const CALLBACKS: usize = 4;
pub(super) const COUNTERS: usize = 5;
pub(super) const META: usize = 6;
/// The idempotency index of formats 2 and 3, emptied on open (`keyed`):
/// the last tree, outside every transaction.
pub(super) const IDEMPOTENCY: usize = 7;

pub(super) const TREES: [&str; 8] = [
    "records",
    "lanes",
    "by_status",
    "expiry",
    "callbacks",
    "counters",
    "meta",
    "idempotency",
];

/// The statuses with an index entry (`BY_STATUS`): few, and listed often.
pub(super) fn indexed(status: Status) -> bool {
    matches!(status, Status::Started | Status::Unknown)
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) enum Change {
    /// A new request; its body is the entry's one blob.
    Submit {
        rec: Box<RequestRecord>,
        max_pending: Option<u64>,
    },
    /// The request `id` at `(lane, seq)` becomes `started`.
    Claim {
        lane: LaneKey,
        seq: u64,
        id: RequestId,
        now_ms: u64,
    },
    /// Back to its place in its lane; `sent`: the attempt may have
    /// written bytes (it counts in `attempts`).
    Requeue {
        id: RequestId,
        claims: u32,
        sent: bool,
    },
    /// Answered; blobs: the encoded response head, then the body (if kept).
    Complete {
        id: RequestId,
        claims: u32,
        sent_ms: u64,
        outcome: Outcome,
        now_ms: u64,
        retention_ms: u64,
    },
    Unknown {
        id: RequestId,
        claims: u32,
        now_ms: u64,
        keep_ms: u64,
    },
    /// A `done` or `unknown` request and all it holds.
    Delete { id: RequestId },
    /// The owner's cancel: an `enqueued` request too (never sent then);
    /// a `started` one is refused (`InFlight`).
    Cancel { id: RequestId },
    /// Whatever of `due` (expiry entries) is past retention at `now_ms`.
    Expire {
        now_ms: u64,
        due: Vec<(u64, RequestId)>,
    },
    /// An operator's requeue of an `unknown` request, to its lane's tail.
    RequeueUnknown { id: RequestId, seq: u64 },
    /// Delivered (a 2xx with `code`), or moot (`None`: the request is
    /// gone).
    CallbackDone {
        due_ms: u64,
        id: RequestId,
        code: Option<u16>,
    },
    CallbackRetry {
        due_ms: u64,
        id: RequestId,
        next_ms: u64,
        code: Option<u16>,
    },
    /// Its retention ended before any receiver took it.
    /// `last`: the final attempt that failed (with the receiver's code, if
    /// it answered), or `None` when no attempt was made.
    CallbackGaveUp {
        due_ms: u64,
        id: RequestId,
        last: Option<Option<u16>>,
    },
}

/// What applying a change did.
#[derive(Debug)]
pub(super) enum Applied {
    Stored(Box<RequestRecord>),
    /// A submission whose `Idempotency-Key` named this request already:
    /// nothing was stored.
    Duplicate(Box<RequestRecord>),
    Claimed(Claim),
    /// Whether the change applied (false: stale or not allowed; nothing
    /// changed).
    Changed(bool),
    Requeued(Option<Box<RequestRecord>>),
    Expired(usize),
    /// Refused on its own (a full lane, an unreadable record).
    Refused(StoreError),
}

pub(super) type TxResult<T> = Result<T, Conflict<StoreError>>;

/// One transaction over all trees, with the round's counter changes
/// gathered and written once at the end (`finish`), and its changes to the
/// idempotency index gathered for the applier to make once it commits
/// (`keyed`: sled may run a transaction's closure more than once).
pub(super) struct Tx<'a> {
    trees: &'a [TransactionalTree],
    deltas: RefCell<HashMap<Vec<u8>, i64>>,
    index: &'a Index,
    disk: &'a KeyFile,
    keyed: RefCell<HashMap<Key, Option<RequestId>>>,
}

impl<'a> Tx<'a> {
    pub(super) fn new(
        trees: &'a [TransactionalTree],
        index: &'a Index,
        disk: &'a KeyFile,
    ) -> Tx<'a> {
        Tx {
            trees,
            deltas: RefCell::default(),
            index,
            disk,
            keyed: RefCell::default(),
        }
    }

    /// The index changes this transaction made.
    pub(super) fn keyed(self) -> HashMap<Key, Option<RequestId>> {
        self.keyed.into_inner()
    }

    /// The request `key` names as this transaction sees it.
    fn key_get(&self, key: &Key) -> TxResult<Option<RequestId>> {
        // This round's changes, then the index's in memory, then the
        // table on disk.
        if let Some(to) = self.keyed.borrow().get(key) {
            return Ok(*to);
        }
        if let Some(known) = self.index.known(key) {
            return Ok(known);
        }
        self.disk.get(key).map_err(Conflict::Abort)
    }

    fn key_set(&self, key: Key, to: Option<RequestId>) {
        self.keyed.borrow_mut().insert(key, to);
    }

    pub(super) fn t(&self, i: usize) -> &TransactionalTree {
        &self.trees[i]
    }

    fn add(&self, key: &[u8], by: i64) {
        *self.deltas.borrow_mut().entry(key.to_vec()).or_default() += by;
    }

    /// A counter as this transaction sees it.
    pub(super) fn count(&self, key: &[u8]) -> TxResult<u64> {
        let stored = self.t(COUNTERS).get(key)?.map_or(0, |v| codec::u64_be(&v));
        let delta = self.deltas.borrow().get(key).copied().unwrap_or(0);
        Ok(stored.saturating_add_signed(delta))
    }

    /// Writes the gathered counters; zero ones (lanes, segments) vanish.
    pub(super) fn finish(&self) -> TxResult<()> {
        for (key, delta) in self.deltas.borrow().iter() {
            if *delta == 0 {
                continue;
            }
            let stored = self.t(COUNTERS).get(key)?.map_or(0, |v| codec::u64_be(&v));
            let n = stored.saturating_add_signed(*delta);
            if n == 0 && key.len() > 1 {
                self.t(COUNTERS).remove(key.as_slice())?;
            } else {
                self.t(COUNTERS).insert(key.as_slice(), &n.to_be_bytes())?;
            }
        }
        Ok(())
    }

    pub(super) fn record(
        &self,
        id: &RequestId,
    ) -> TxResult<Result<Option<RequestRecord>, StoreError>> {
        Ok(match self.t(RECORDS).get(id.as_bytes())? {
            Some(v) => codec::decode(&v).map(Some),
            None => Ok(None),
        })
    }

    pub(super) fn put(&self, rec: &RequestRecord) -> TxResult<()> {
        let v = codec::encode(rec).map_err(Conflict::Abort)?;
        self.t(RECORDS).insert(rec.id.as_bytes(), v)?;
        Ok(())
    }

    /// The record, if it is in `status` (under claim `claims`, if given).
    fn fenced(
        &self,
        id: &RequestId,
        status: Status,
        claims: Option<u32>,
    ) -> TxResult<Result<Option<RequestRecord>, StoreError>> {
        Ok(self
            .record(id)?
            .map(|r| r.filter(|r| r.status == status && claims.is_none_or(|c| c == r.claims))))
    }

    fn set_status(&self, rec: &mut RequestRecord, to: Status) -> TxResult<Result<(), StoreError>> {
        if !rec.status.can_become(to) {
            return Ok(Err(StoreError::Transition(format!(
                "{}: {} cannot become {}",
                rec.id,
                rec.status.as_str(),
                to.as_str()
            ))));
        }
        self.unindex(rec)?;
        rec.status = to;
        self.index(rec)?;
        Ok(Ok(()))
    }

    fn index(&self, rec: &RequestRecord) -> TxResult<()> {
        if indexed(rec.status) {
            self.t(BY_STATUS)
                .insert(&keys::status(rec.status, &rec.id), &[][..])?;
        }
        self.add(&[rec.status.code()], 1);
        Ok(())
    }

    fn unindex(&self, rec: &RequestRecord) -> TxResult<()> {
        if indexed(rec.status) {
            self.t(BY_STATUS)
                .remove(&keys::status(rec.status, &rec.id))?;
        }
        self.add(&[rec.status.code()], -1);
        Ok(())
    }

    fn lane_push(&self, rec: &RequestRecord) -> TxResult<()> {
        let key = keys::lane(&rec.lane, rec.seq);
        if self.t(LANES).insert(&key[..], rec.id.as_bytes())?.is_none() {
            self.add(&keys::pending(&rec.lane), 1);
            self.add(&keys::bucket(&rec.lane, rec.seq), 1);
        }
        Ok(())
    }

    fn lane_take(&self, lane: &LaneKey, seq: u64) -> TxResult<()> {
        if self.t(LANES).remove(&keys::lane(lane, seq)[..])?.is_some() {
            self.add(&keys::pending(lane), -1);
            self.add(&keys::bucket(lane, seq), -1);
        }
        Ok(())
    }

    /// Counts a blob in (or out of) its segment: a segment with none is
    /// deleted once recovery can no longer need it.
    fn blob(&self, r: Option<BodyRef>, by: i64) {
        if let Some(r) = r {
            self.add(&keys::segment(r.segment), by);
        }
    }

    fn finish_as(
        &self,
        rec: &mut RequestRecord,
        to: Status,
        now_ms: u64,
        keep_ms: u64,
    ) -> TxResult<Result<(), StoreError>> {
        let expires = now_ms.saturating_add(keep_ms);
        rec.finished_ms = Some(now_ms);
        rec.expires_ms = Some(expires);
        self.t(EXPIRY)
            .insert(&keys::timed(expires, &rec.id), &[][..])?;
        self.set_status(rec, to)
    }

    /// Applies one change; `blobs` are where its blobs are in the journal.
    pub(super) fn apply(&self, change: &Change, blobs: &[BodyRef]) -> TxResult<Applied> {
        Ok(match change {
            Change::Submit { rec, max_pending } => {
                let mut rec = RequestRecord::clone(rec);
                // A repeat is answered before any cap: it stores nothing.
                if let Some(idem) = rec.idempotency {
                    match self.idempotent(&rec.lane, &idem, rec.created_ms)? {
                        Some(Ok(first)) => return Ok(Applied::Duplicate(Box::new(first))),
                        Some(Err(e)) => return Ok(Applied::Refused(e)),
                        None => {}
                    }
                }
                if let Some(cap) = max_pending
                    && self.count(&keys::pending(&rec.lane))? >= *cap
                {
                    return Ok(Applied::Refused(StoreError::LaneFull(*cap)));
                }
                if let Some(idem) = rec.idempotency {
                    self.key_set(keys::idempotency(&rec.lane, &idem.key), Some(rec.id));
                }
                rec.body = blobs.first().copied();
                self.blob(rec.body, 1);
                self.lane_push(&rec)?;
                self.index(&rec)?;
                self.put(&rec)?;
                Applied::Stored(Box::new(rec))
            }
            Change::Claim {
                lane,
                seq,
                id,
                now_ms,
            } => Applied::Claimed(self.claim(lane, *seq, id, *now_ms)?),
            Change::Requeue { id, claims, sent } => {
                let mut rec = match self.fenced(id, Status::Started, Some(*claims))? {
                    Ok(Some(r)) => r,
                    Ok(None) => return Ok(Applied::Changed(false)),
                    Err(e) => return Ok(Applied::Refused(e)),
                };
                rec.attempts += u32::from(*sent);
                rec.started_ms = None;
                self.lane_push(&rec)?;
                if let Err(e) = self.set_status(&mut rec, Status::Enqueued)? {
                    return Ok(Applied::Refused(e));
                }
                self.put(&rec)?;
                Applied::Changed(true)
            }
            Change::Complete {
                id,
                claims,
                sent_ms,
                outcome,
                now_ms,
                retention_ms,
            } => {
                let mut rec = match self.fenced(id, Status::Started, Some(*claims))? {
                    Ok(Some(r)) => r,
                    Ok(None) => return Ok(Applied::Changed(false)),
                    Err(e) => return Ok(Applied::Refused(e)),
                };
                let Some(&head) = blobs.first() else {
                    return Ok(Applied::Refused(StoreError::Codec(
                        "a completion without its head".into(),
                    )));
                };
                let refs = ResponseRefs {
                    head,
                    body: blobs.get(1).copied(),
                };
                self.blob(Some(refs.head), 1);
                self.blob(refs.body, 1);
                self.blob(rec.body.take(), -1);
                rec.response = Some(refs);
                rec.started_ms = Some(*sent_ms);
                rec.outcome = Some(outcome.clone());
                rec.sealed = Vec::new();
                rec.attempts += 1;
                self.call_back(&mut rec, Status::Done, *now_ms)?;
                if let Err(e) = self.finish_as(&mut rec, Status::Done, *now_ms, *retention_ms)? {
                    return Ok(Applied::Refused(e));
                }
                self.put(&rec)?;
                Applied::Changed(true)
            }
            Change::Unknown {
                id,
                claims,
                now_ms,
                keep_ms,
            } => {
                let mut rec = match self.fenced(id, Status::Started, Some(*claims))? {
                    Ok(Some(r)) => r,
                    Ok(None) => return Ok(Applied::Changed(false)),
                    Err(e) => return Ok(Applied::Refused(e)),
                };
                if let Err(e) = self.finish_as(&mut rec, Status::Unknown, *now_ms, *keep_ms)? {
                    return Ok(Applied::Refused(e));
                }
                rec.attempts += 1;
                self.call_back(&mut rec, Status::Unknown, *now_ms)?;
                self.put(&rec)?;
                Applied::Changed(true)
            }
            Change::Delete { id } => Applied::Changed(
                self.delete_if(id, |r| matches!(r.status, Status::Done | Status::Unknown))?,
            ),
            Change::Cancel { id } => match self.record(id)? {
                Ok(Some(r)) if r.status == Status::Started => {
                    Applied::Refused(StoreError::InFlight)
                }
                Ok(Some(_)) => {
                    Applied::Changed(self.delete_if(id, |r| r.status != Status::Started)?)
                }
                Ok(None) => Applied::Changed(false),
                Err(e) => Applied::Refused(e),
            },
            Change::Expire { now_ms, due } => {
                let mut n = 0;
                for (at, id) in due {
                    let expired = |r: &RequestRecord| {
                        matches!(r.status, Status::Done | Status::Unknown) && r.is_expired(*now_ms)
                    };
                    if self.delete_if(id, expired)? {
                        n += 1;
                    }
                    // Gone, or requeued by an operator meanwhile: the
                    // entry names nothing either way.
                    if *at <= *now_ms {
                        self.t(EXPIRY).remove(&keys::timed(*at, id)[..])?;
                    }
                }
                Applied::Expired(n)
            }
            Change::RequeueUnknown { id, seq } => {
                let mut rec = match self.fenced(id, Status::Unknown, None)? {
                    Ok(Some(r)) => r,
                    Ok(None) => return Ok(Applied::Requeued(None)),
                    Err(e) => return Ok(Applied::Refused(e)),
                };
                if let Some(e) = rec.expires_ms.take() {
                    self.t(EXPIRY).remove(&keys::timed(e, id)[..])?;
                }
                rec.finished_ms = None;
                rec.started_ms = None;
                rec.seq = *seq;
                self.lane_push(&rec)?;
                if let Err(e) = self.set_status(&mut rec, Status::Enqueued)? {
                    return Ok(Applied::Refused(e));
                }
                self.put(&rec)?;
                Applied::Requeued(Some(Box::new(rec)))
            }
            Change::CallbackDone { .. }
            | Change::CallbackRetry { .. }
            | Change::CallbackGaveUp { .. } => self.apply_callback(change)?,
        })
    }

    /// The request an `Idempotency-Key` of `lane` names, if it still
    /// exists and is not past its retention at `now_ms`: `Ok` if it was the
    /// same request, `IdempotencyReused` if not.
    pub(super) fn idempotent(
        &self,
        lane: &LaneKey,
        idem: &Idempotency,
        now_ms: u64,
    ) -> TxResult<Option<Result<RequestRecord, StoreError>>> {
        let Some(id) = self.key_get(&keys::idempotency(lane, &idem.key))? else {
            return Ok(None);
        };
        Ok(match self.record(&id)? {
            Ok(Some(f)) if f.is_expired(now_ms) => None,
            Ok(Some(f)) => keyed::judge(f, lane, idem),
            // A stale entry: taken over.
            _ => None,
        })
    }

    /// Takes the lane entry `(lane, seq)` if it still names `id`, and makes
    /// the request `started`, its claim count raised (the fencing token of
    /// the settle that follows). An unreadable record's entry is taken
    /// off its lane all the same (quarantined) rather than block it.
    fn claim(&self, lane: &LaneKey, seq: u64, id: &RequestId, now_ms: u64) -> TxResult<Claim> {
        let key = keys::lane(lane, seq);
        match self.t(LANES).get(&key[..])? {
            Some(v) if v.as_ref() == id.as_bytes() => {}
            _ => return Ok(Claim::Skipped),
        }
        self.lane_take(lane, seq)?;
        let mut rec = match self.fenced(id, Status::Enqueued, None)? {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(Claim::Skipped),
            Err(e) => {
                log::error!("request {id} is unreadable ({e}); quarantined off its lane");
                return Ok(Claim::Skipped);
            }
        };
        rec.claims += 1;
        rec.started_ms = Some(now_ms);
        if self.set_status(&mut rec, Status::Started)?.is_err() {
            return Ok(Claim::Skipped);
        }
        self.put(&rec)?;
        Ok(Claim::Got(Box::new(rec)))
    }

    /// Deletes a request and all it holds, if `allowed` says so of it.
    fn delete_if(
        &self,
        id: &RequestId,
        allowed: impl Fn(&RequestRecord) -> bool,
    ) -> TxResult<bool> {
        let rec = match self.record(id)? {
            Ok(Some(r)) if allowed(&r) => r,
            _ => return Ok(false),
        };
        if rec.status == Status::Enqueued {
            self.lane_take(&rec.lane, rec.seq)?;
        }
        self.unindex(&rec)?;
        self.blob(rec.body, -1);
        if let Some(r) = rec.response {
            self.blob(Some(r.head), -1);
            self.blob(r.body, -1);
        }
        if let Some(e) = rec.expires_ms {
            self.t(EXPIRY).remove(&keys::timed(e, id)[..])?;
        }
        if let Some(idem) = rec.idempotency {
            let key = keys::idempotency(&rec.lane, &idem.key);
            if self.key_get(&key)? == Some(*id) {
                self.key_set(key, None);
            }
        }
        self.t(RECORDS).remove(id.as_bytes())?;
        Ok(true)
    }
}
