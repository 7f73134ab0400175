//! The store's reads: straight from sled's trees and the journal, never
//! through the writer. What they see is durable: a change is applied to
//! the trees only once its journal entry is.

use sled::IVec;

use super::CallbackEntry;
use super::change::{self, BY_STATUS, CALLBACKS, COUNTERS, EXPIRY, LANES, RECORDS};
use super::{SledStore, StoreError, callbacks, codec, keys};
use crate::model::{Idempotency, LaneKey, RequestId, RequestRecord, ResponseHead, Status};

impl super::Core {
    pub(super) fn record(&self, id: &RequestId) -> Result<Option<RequestRecord>, StoreError> {
        match self.tree(RECORDS).get(id.as_bytes())? {
            Some(v) => Ok(Some(codec::decode(&v)?)),
            None => Ok(None),
        }
    }
}

impl SledStore {
    pub fn get(&self, id: &RequestId) -> Result<Option<RequestRecord>, StoreError> {
        self.core.record(id)
    }

    pub fn request_body(&self, rec: &RequestRecord) -> Result<Vec<u8>, StoreError> {
        match rec.body {
            Some(r) => Ok(self.core.journal.read(&r)?),
            None => Ok(Vec::new()),
        }
    }

    pub fn sealed_credential(&self, id: &RequestId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.get(id)?.map(|r| r.sealed).filter(|s| !s.is_empty()))
    }

    /// One sealed credential with its request id: the start-up check that
    /// the key file is the one these were sealed with. Looks where sealed
    /// credentials are (queued, started, unknown), never at every record.
    pub fn first_sealed(&self) -> Result<Option<(RequestId, Vec<u8>)>, StoreError> {
        let queued = self.tree(LANES).iter().values().take(1);
        let indexed = self.tree(BY_STATUS).iter().keys().take(16);
        for key in queued.chain(indexed) {
            let key = key?;
            let id = if key.len() == 16 { &key[..] } else { &key[1..] };
            if let Some(id) = keys::id_from(id)
                && let Some(sealed) = self.sealed_credential(&id)?
            {
                return Ok(Some((id, sealed)));
            }
        }
        Ok(None)
    }

    /// The stored response head and, unless it was too large, its body.
    pub fn response(&self, id: &RequestId) -> Result<Option<(ResponseHead, Vec<u8>)>, StoreError> {
        let Some(refs) = self.get(id)?.and_then(|r| r.response) else {
            return Ok(None);
        };
        let mut head: ResponseHead = codec::decode(&self.core.journal.read(&refs.head)?)?;
        head.body = refs.body;
        let body = match refs.body {
            Some(r) => self.core.journal.read(&r)?,
            None => Vec::new(),
        };
        Ok(Some((head, body)))
    }

    /// Lanes with queued requests: one seek per lane, not a scan of queues.
    pub fn pending_lanes(&self) -> Result<Vec<LaneKey>, StoreError> {
        let lanes = self.tree(LANES);
        let mut out = Vec::new();
        let mut next = lanes.first()?;
        while let Some((k, _)) = next {
            let Ok(lane) = <LaneKey>::try_from(&k[..32.min(k.len())]) else {
                break;
            };
            out.push(lane);
            next = match keys::lane_end(&lane) {
                Some(end) => lanes.range(end..).next().transpose()?,
                None => None,
            };
        }
        Ok(out)
    }

    /// Requests queued in `lane`.
    pub fn pending_in_lane(&self, lane: &LaneKey) -> Result<u64, StoreError> {
        Ok(self
            .tree(COUNTERS)
            .get(keys::pending(lane))?
            .map_or(0, |v| codec::u64_be(&v)))
    }

    /// Requests in a status, oldest first for `started` and `unknown` (by
    /// id for the others), after `after` (paging).
    pub fn list(
        &self,
        status: Status,
        after: Option<&RequestId>,
        limit: usize,
    ) -> Result<Vec<RequestRecord>, StoreError> {
        let mut out = Vec::new();
        if change::indexed(status) {
            let start = match after {
                Some(id) => keys::status(status, id).to_vec(),
                None => vec![status.code()],
            };
            for item in self.tree(BY_STATUS).range(start..).keys() {
                let k = item?;
                if k.first() != Some(&status.code()) || out.len() >= limit {
                    break;
                }
                match keys::id_from(&k[1..]) {
                    Some(id) if Some(&id) != after => out.extend(self.get(&id)?),
                    _ => {}
                }
            }
            return Ok(out);
        }
        // Unindexed (queued or done: the many): a walk of the records.
        let start = after.map_or_else(Vec::new, |id| id.as_bytes().to_vec());
        for item in self.tree(RECORDS).range(start..).values() {
            if out.len() >= limit {
                break;
            }
            let rec: RequestRecord = codec::decode(&item?)?;
            if rec.status == status && Some(&rec.id) != after {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// How many requests are in each status, from the persisted counters.
    pub fn counts(&self) -> Result<Vec<(Status, u64)>, StoreError> {
        Status::ALL
            .iter()
            .map(|&s| {
                let n = self.tree(COUNTERS).get([s.code()])?;
                Ok((s, n.map(|v| codec::u64_be(&v)).unwrap_or(0)))
            })
            .collect()
    }

    /// When the earliest pending callback is due.
    pub fn next_callback_due(&self) -> Result<Option<u64>, StoreError> {
        self.first_due(CALLBACKS)
    }

    /// Callback events due by `now_ms`: (due at, id, the event).
    pub fn due_callbacks(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, RequestId, CallbackEntry)>, StoreError> {
        Ok(self
            .due(CALLBACKS, now_ms, limit)?
            .into_iter()
            .map(|(at, id, v)| (at, id, callbacks::callback_entry(&v)))
            .collect())
    }

    /// The request an `Idempotency-Key` of `lane` names, if it still
    /// exists: `Ok` if it asked for the same, `IdempotencyReused` if not.
    /// A look before the writer's own check (which decides).
    pub fn idempotent(
        &self,
        lane: &LaneKey,
        idem: &Idempotency,
    ) -> Result<Option<Result<RequestRecord, StoreError>>, StoreError> {
        let key = keys::idempotency(lane, &idem.key);
        let Some(id) = self.core.keyed.lookup(&key)? else {
            return Ok(None);
        };
        Ok(self
            .get(&id)?
            .and_then(|first| super::keyed::judge(first, lane, idem)))
    }

    /// Requests before `rec` in its lane (SPEC §10 `ahead`), exact: the
    /// lane's per-bucket counts before its bucket, then a walk of at most
    /// one bucket. Past `MAX_BUCKETS` non-empty buckets (a queue spread
    /// very thin over the sequence), the lane's length less one, which is
    /// never below the truth.
    pub fn ahead(&self, rec: &RequestRecord) -> Result<u64, StoreError> {
        const MAX_BUCKETS: usize = 100_000;
        let first_of_bucket = rec.seq - rec.seq % keys::BUCKET_SEQS;
        let buckets = keys::bucket(&rec.lane, 0)..keys::bucket(&rec.lane, first_of_bucket);
        let mut n = 0u64;
        for (i, v) in self.tree(COUNTERS).range(buckets).values().enumerate() {
            if i >= MAX_BUCKETS {
                return Ok(self.pending_in_lane(&rec.lane)?.saturating_sub(1));
            }
            n += codec::u64_be(&v?);
        }
        let within = keys::lane(&rec.lane, first_of_bucket)..keys::lane(&rec.lane, rec.seq);
        for key in self.tree(LANES).range(within).keys() {
            key?;
            n += 1;
        }
        Ok(n)
    }

    /// When the earliest retention ends.
    pub fn next_expiry(&self) -> Result<Option<u64>, StoreError> {
        self.first_due(EXPIRY)
    }

    /// Expiry entries due by `now_ms`, oldest first.
    pub fn expired(&self, now_ms: u64, limit: usize) -> Result<Vec<(u64, RequestId)>, StoreError> {
        Ok(self
            .due(EXPIRY, now_ms, limit)?
            .into_iter()
            .map(|(at, id, _)| (at, id))
            .collect())
    }

    /// The earliest time in a time-ordered index (`keys::timed`).
    fn first_due(&self, tree: usize) -> Result<Option<u64>, StoreError> {
        Ok(self
            .tree(tree)
            .first()?
            .and_then(|(k, _)| keys::split_timed(&k))
            .map(|(at, _)| at))
    }

    /// Up to `limit` entries of a time-ordered index due by `now_ms`.
    fn due(
        &self,
        tree: usize,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, RequestId, IVec)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree(tree).iter() {
            let (k, v) = item?;
            let Some((at, id)) = keys::split_timed(&k) else {
                continue;
            };
            if at > now_ms || out.len() >= limit {
                break;
            }
            out.push((at, id, v));
        }
        Ok(out)
    }
}
