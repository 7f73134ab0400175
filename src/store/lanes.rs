//! The per-credential FIFO queues (`lanes`): every entry added or taken
//! goes through here, so the persisted per-lane count of queued requests
//! (`--max-pending-per-credential`) stays exact; and the one claim, which
//! takes a lane's head and makes it `started`.

use std::collections::HashMap;

use sled::IVec;

use super::keys;
use super::tx::{COUNTERS, LANES, Tx, TxResult};
use super::{Store, StoreError, Ticket, codec};
use crate::model::{LaneKey, RequestRecord, Status};

/// What a claim found for one dispatch slot.
#[derive(Debug)]
pub enum Claim {
    /// The request, now `started`: send it once the ticket is durable.
    Got(Box<RequestRecord>),
    /// The lane has nothing (more) queued.
    Empty,
    /// A stale lane entry was dropped; the lane may hold more.
    Skipped,
}

impl Tx<'_> {
    /// Puts `rec` in its lane at its sequence number, and counts it.
    pub(super) fn lane_push(&self, rec: &RequestRecord) -> TxResult<()> {
        let key = keys::lane(&rec.lane, rec.seq);
        if self.t(LANES).insert(&key[..], rec.id.as_bytes())?.is_none() {
            self.count_pending(&rec.lane, true)?;
        }
        Ok(())
    }

    /// Takes the lane entry `key` out, if it is there.
    pub(super) fn lane_take(&self, key: &[u8]) -> TxResult<()> {
        if self.t(LANES).remove(key)?.is_some()
            && let Some(lane) = keys::lane_of(key)
        {
            self.count_pending(&lane, false)?;
        }
        Ok(())
    }

    pub(super) fn lane_remove(&self, lane: &LaneKey, seq: u64) -> TxResult<()> {
        self.lane_take(&keys::lane(lane, seq))
    }

    /// Requests queued in `lane`.
    pub(super) fn pending(&self, lane: &LaneKey) -> TxResult<u64> {
        Ok(self
            .t(COUNTERS)
            .get(keys::pending(lane))?
            .map_or(0, |v| codec::u64_be(&v)))
    }

    /// A lane's count goes away at zero: no state for idle credentials.
    fn count_pending(&self, lane: &LaneKey, add: bool) -> TxResult<()> {
        let n = self.pending(lane)?;
        let n = if add { n + 1 } else { n.saturating_sub(1) };
        let key = keys::pending(lane);
        if n == 0 {
            self.t(COUNTERS).remove(&key[..])?;
        } else {
            self.t(COUNTERS).insert(&key[..], &n.to_be_bytes())?;
        }
        Ok(())
    }

    /// Claims the request the lane entry `(key, id)` names: the entry is
    /// taken and the request becomes `started`, its claim count raised
    /// (the fencing token of the settle that follows).
    fn claim(&self, key: &[u8], id: &[u8], now_ms: u64) -> TxResult<Claim> {
        if self.t(LANES).get(key)?.is_none() {
            return Ok(Claim::Skipped); // taken meanwhile
        }
        self.lane_take(key)?;
        let Some(id) = keys::id_from(id) else {
            return Ok(Claim::Skipped);
        };
        let Some(mut rec) = self.fenced(&id, Status::Enqueued, None)? else {
            return Ok(Claim::Skipped); // a stale entry: dropped
        };
        rec.claims += 1;
        rec.started_ms = Some(now_ms);
        self.set_status(&mut rec, Status::Started)?;
        self.put(&rec)?;
        Ok(Claim::Got(Box::new(rec)))
    }
}

impl Store {
    /// Requests queued in `lane` (outside a transaction: a fast look).
    pub fn pending_in_lane(&self, lane: &LaneKey) -> Result<u64, StoreError> {
        Ok(self
            .tree(COUNTERS)
            .get(keys::pending(lane))?
            .map_or(0, |v| codec::u64_be(&v)))
    }

    /// Claims the heads of `lanes` in one transaction; a lane named k times
    /// gives its first k queued requests. One `Claim` per slot, in order.
    /// Send a claimed request only once the ticket is durable.
    pub fn claim_batch(
        &self,
        lanes: &[LaneKey],
        now_ms: u64,
    ) -> Result<(Vec<Claim>, Ticket), StoreError> {
        // sled's transactions have no range scan: the heads are read first
        // and re-checked inside.
        let mut heads: HashMap<LaneKey, std::vec::IntoIter<(IVec, IVec)>> = HashMap::new();
        for lane in lanes {
            if !heads.contains_key(lane) {
                let wanted = lanes.iter().filter(|l| *l == lane).count();
                let found = self
                    .tree(LANES)
                    .scan_prefix(lane)
                    .take(wanted)
                    .collect::<Result<Vec<_>, _>>()?;
                heads.insert(*lane, found.into_iter());
            }
        }
        let picks: Vec<Option<(IVec, IVec)>> = lanes
            .iter()
            .map(|l| heads.get_mut(l).and_then(|h| h.next()))
            .collect();
        let claim_all = |tx: &Tx| -> TxResult<Vec<Claim>> {
            picks
                .iter()
                .map(|pick| match pick {
                    Some((key, id)) => tx.claim(key, id, now_ms),
                    None => Ok(Claim::Empty),
                })
                .collect()
        };
        let claims = match self.transact(claim_all) {
            Ok(c) => c,
            // An unreadable record fails the whole batch: claim one by one,
            // which quarantines it.
            Err(StoreError::Codec(_)) => picks
                .iter()
                .map(|pick| self.claim_alone(pick.as_ref(), now_ms))
                .collect::<Result<_, _>>()?,
            Err(e) => return Err(e),
        };
        Ok((claims, self.flusher.ticket()))
    }

    /// One claim in its own transaction; an unreadable record's entry is
    /// taken off its lane (quarantined) rather than blocking the lane.
    fn claim_alone(&self, pick: Option<&(IVec, IVec)>, now_ms: u64) -> Result<Claim, StoreError> {
        let Some((key, id)) = pick else {
            return Ok(Claim::Empty);
        };
        match self.transact(|tx| tx.claim(key, id, now_ms)) {
            Err(StoreError::Codec(e)) => {
                log::error!(
                    "request {:?} is unreadable ({e}); quarantined off its lane",
                    keys::id_from(id)
                );
                self.transact(|tx| tx.lane_take(key))?;
                Ok(Claim::Skipped)
            }
            other => other,
        }
    }

    /// Takes the head of `lane`: it becomes `started`. Send it only once
    /// the ticket is durable. `None` when the lane is empty.
    pub fn claim_next(
        &self,
        lane: &LaneKey,
        now_ms: u64,
    ) -> Result<Option<(RequestRecord, Ticket)>, StoreError> {
        loop {
            let (mut claims, ticket) = self.claim_batch(&[*lane], now_ms)?;
            match claims.pop() {
                Some(Claim::Got(rec)) => return Ok(Some((*rec, ticket))),
                Some(Claim::Skipped) => continue,
                _ => return Ok(None),
            }
        }
    }
}
