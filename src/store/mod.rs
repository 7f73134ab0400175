//! The durable store: a short list of domain operations (submit, claim,
//! settle, cancel, expire...) behind one type, on one of two backends:
//!
//! - `embedded` (the default): a journal of our own with sled as its index,
//!   in `--data-dir`: one node;
//! - `pg`: one PostgreSQL database (`--store postgres://...`), SPEC §12.
//!
//! Both decide the same way: the policy (round-robin, pacing, backoff) is
//! the scheduler's, and every operation here is durable when it returns.

mod codec;
mod embedded;
mod fatal;
mod pg;
mod types;
mod waiters;

pub use embedded::{SledConfig, SledStore, create_dir_durably};
pub use fatal::Fatal;
pub use pg::PgConfig;
pub use types::{CallbackEntry, Completion, NewRequest, Recovered, Settle, Submitted};

use std::path::PathBuf;

use tokio::sync::oneshot;

use crate::model::{Idempotency, LaneKey, RequestId, RequestRecord, ResponseHead, Status};
use pg::PgStore;
use waiters::Waiters;
pub use waiters::Woken;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    #[error("database: {0}")]
    Postgres(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("stored value unreadable: {0}")]
    Codec(String),
    #[error("data dir {0} is in use by another running gateway")]
    Locked(PathBuf),
    #[error("{0}")]
    Format(String),
    #[error("the write did not reach the disk")]
    NotDurable,
    #[error("the store is closed")]
    Closed,
    #[error("the store failed: {0}")]
    Unavailable(String),
    #[error("refused status change: {0}")]
    Transition(String),
    #[error("the credential's queue holds {0} requests already")]
    LaneFull(u64),
    #[error("no space left for the body")]
    NoSpace,
    #[error("a stored value would be {0} bytes, over the {MAX_VALUE}-byte limit")]
    TooLarge(usize),
    #[error("the Idempotency-Key was used for a different request")]
    IdempotencyReused,
    #[error("the request is being sent upstream")]
    InFlight,
}

/// The `asyncgate_meta` key of the key canary.
const CANARY: &str = "key_canary";

/// What a claim found for one dispatch slot.
#[derive(Debug)]
pub enum Claim {
    /// The request, now `started` (durably): send it. The lane may hold
    /// more.
    Got(Box<RequestRecord>),
    /// As `Got`, and nothing was queued behind it in its lane when it was
    /// claimed: the scheduler need not come back to find the lane empty
    /// (a claim costs a database round on a shared store).
    Last(Box<RequestRecord>),
    /// The lane has nothing (more) queued.
    Empty,
    /// A stale lane entry was dropped; the lane may hold more.
    Skipped,
    /// The lane's limits, as every node shares them, allow nothing more
    /// for `after` (held by `reason` when a pause holds it).
    Later {
        after: std::time::Duration,
        reason: Option<crate::scheduler::PauseReason>,
    },
}

/// The largest record (without its body) either store keeps. sled writes a
/// node whose encoding passes a quarter segment (256 KiB with our 1 MiB
/// segments) as a blob file it never fsyncs. A leaf splits past 16
/// entries, only on a later traversal, and a merge can add a few more:
/// about 20 at worst, so 22 × 11 KiB still stays under that and every
/// value is power-cut safe. Bodies and responses have no such limit: they
/// live in the journal (or in their own columns).
pub const MAX_VALUE: usize = 11 * 1024;

/// Which backend, with its settings.
pub enum StoreConfig {
    Sled(SledConfig),
    Postgres(PgConfig),
}

pub struct Store {
    backend: Backend,
}

enum Backend {
    Sled(SledStore),
    Pg(Box<PgStore>),
}

impl Store {
    /// Opens (and on PostgreSQL migrates) the store. Start-up recovery of
    /// what a crash left `started` is `recover`'s.
    pub async fn open(config: StoreConfig) -> Result<Store, StoreError> {
        let backend = match config {
            StoreConfig::Sled(c) => Backend::Sled(SledStore::open(&c)?),
            StoreConfig::Postgres(c) => Backend::Pg(Box::new(PgStore::open(c).await?)),
        };
        Ok(Store { backend })
    }

    /// Per installation (data dir or database): credentials hash
    /// differently in every one.
    pub fn salt(&self) -> &[u8; 32] {
        match &self.backend {
            Backend::Sled(s) => s.salt(),
            Backend::Pg(s) => s.salt(),
        }
    }

    /// Bytes free where bodies are written: the data dir's file system.
    /// PostgreSQL's disk is the database's: a full one refuses the insert
    /// (`NoSpace`, SQLSTATE 53100), so there is nothing to watch here.
    pub fn free_space(&self) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.free_space(),
            Backend::Pg(_) => Ok(u64::MAX),
        }
    }

    /// Whether a submission with a new `Idempotency-Key` is refused for
    /// want of disk space (the embedded key index cannot grow); decided
    /// before the journal, so a replay stores what was stored.
    pub fn keys_crowded(&self) -> bool {
        match &self.backend {
            Backend::Sled(s) => s.keys_crowded(),
            Backend::Pg(_) => false,
        }
    }

    /// The failure switch: the app stops the process once it is set.
    pub fn fatal(&self) -> &Fatal {
        match &self.backend {
            Backend::Sled(s) => s.fatal(),
            Backend::Pg(s) => s.fatal(),
        }
    }

    /// Why the store cannot serve now, if it cannot: it failed (a failed
    /// fsync...), or its database does not answer.
    pub async fn unhealthy(&self) -> Option<String> {
        if let Some(why) = self.fatal().failed() {
            return Some(why);
        }
        match &self.backend {
            Backend::Sled(_) => None,
            Backend::Pg(s) => s.ping().await.err().map(|e| e.to_string()),
        }
    }

    /// Finishes what is queued and closes.
    pub fn close(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.close(),
            Backend::Pg(s) => s.close(),
        }
    }

    /// How often the dispatcher looks for lanes with queued requests on
    /// its own: never on the embedded store (its one writer hands every
    /// claim the head it asked for); on PostgreSQL a claim skips rows
    /// another transaction has locked, so a lane it found empty may not be.
    pub fn rescan_every(&self) -> Option<std::time::Duration> {
        match &self.backend {
            Backend::Sled(_) => None,
            Backend::Pg(_) => Some(std::time::Duration::from_secs(2)),
        }
    }

    fn waiters(&self) -> &Waiters {
        match &self.backend {
            Backend::Sled(s) => s.waiters(),
            Backend::Pg(s) => s.waiters(),
        }
    }

    /// Resolves when `id` may have finished or gone, with its record as
    /// the change left it where the store has it at hand (else look
    /// again). Register before looking at the status, so that a change in
    /// between is not missed. Only that request's waiters are woken.
    pub fn watch(&self, id: &RequestId) -> oneshot::Receiver<Woken> {
        self.waiters().watch(id)
    }

    /// Forgets the waiters of `id` that gave up.
    pub fn unwatch(&self, id: &RequestId) {
        self.waiters().unwatch(id)
    }

    /// Long-polls waiting now (a metric).
    pub fn watching(&self) -> usize {
        self.waiters().watching()
    }
}

/// The reads. sled's are synchronous (a lookup in memory-mapped trees);
/// PostgreSQL's are queries.
impl Store {
    pub async fn get(&self, id: &RequestId) -> Result<Option<RequestRecord>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.get(id),
            Backend::Pg(s) => s.get(*id).await,
        }
    }

    pub async fn request_body(&self, rec: &RequestRecord) -> Result<Vec<u8>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.request_body(rec),
            Backend::Pg(s) => s.request_body(rec.id).await,
        }
    }

    /// One sealed credential with its request id: the start-up check that
    /// the key file is the one these were sealed with.
    pub async fn first_sealed(&self) -> Result<Option<(RequestId, Vec<u8>)>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.first_sealed(),
            Backend::Pg(s) => s.first_sealed().await,
        }
    }

    /// The stored response head and, unless it was too large, its body.
    pub async fn response(
        &self,
        id: &RequestId,
    ) -> Result<Option<(ResponseHead, Vec<u8>)>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.response(id),
            Backend::Pg(s) => s.response(*id).await,
        }
    }

    /// Lanes with queued requests.
    pub async fn pending_lanes(&self) -> Result<Vec<LaneKey>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.pending_lanes(),
            Backend::Pg(s) => s.pending_lanes().await,
        }
    }

    /// Whether `lane` holds at least `n` queued requests (the pending
    /// cap): on PostgreSQL a count that stops at `n`.
    pub async fn pending_at_least(&self, lane: &LaneKey, n: u64) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Sled(s) => Ok(s.pending_in_lane(lane)? >= n),
            Backend::Pg(s) => s.pending_at_least(*lane, n).await,
        }
    }

    /// Requests in a status, oldest first for `started` and `unknown` (by
    /// id for the others), after `after` (paging).
    pub async fn list(
        &self,
        status: Status,
        after: Option<&RequestId>,
        limit: usize,
    ) -> Result<Vec<RequestRecord>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.list(status, after, limit),
            Backend::Pg(s) => s.list(status, after.copied(), limit).await,
        }
    }

    /// How many requests are in each status.
    pub async fn counts(&self) -> Result<Vec<(Status, u64)>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.counts(),
            Backend::Pg(s) => s.counts().await,
        }
    }

    /// Callback events due by `now_ms`: (due at, id, the event).
    pub async fn due_callbacks(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, RequestId, CallbackEntry)>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.due_callbacks(now_ms, limit),
            Backend::Pg(s) => s.due_callbacks(now_ms, limit).await,
        }
    }

    /// The request an `Idempotency-Key` of `lane` names, if it still
    /// exists: `Ok` if it asked for the same, `IdempotencyReused` if not.
    /// A look before the submission's own check (which decides).
    pub async fn idempotent(
        &self,
        lane: &LaneKey,
        idem: &Idempotency,
    ) -> Result<Option<Result<RequestRecord, StoreError>>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.idempotent(lane, idem),
            Backend::Pg(s) => s.idempotent(*lane, *idem).await,
        }
    }

    /// Requests before `rec` in its lane (SPEC §10 `ahead`).
    pub async fn ahead(&self, rec: &RequestRecord) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.ahead(rec),
            Backend::Pg(s) => s.ahead(rec.lane, rec.seq).await,
        }
    }

    /// When the earliest retention ends.
    pub async fn next_expiry(&self) -> Result<Option<u64>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.next_expiry(),
            Backend::Pg(s) => s.next_expiry().await,
        }
    }
}

/// The changes: each returns once it is durable, or refused.
impl Store {
    /// Stores a new request at the tail of its lane. `LaneFull` when its
    /// lane already holds `NewRequest::max_pending` requests, `NoSpace`
    /// when the disk cannot take it: refused alone.
    pub async fn submit(&self, new: NewRequest) -> Result<Submitted, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.submit(new).await,
            Backend::Pg(s) => s.submit(new).await,
        }
    }

    /// Claims the heads of `lanes`; a lane named k times gives its first k
    /// queued requests. One `Claim` per slot, in order: send a `Got` at
    /// once.
    pub async fn claim_batch(
        &self,
        lanes: &[LaneKey],
        now_ms: u64,
    ) -> Result<Vec<Claim>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.claim_batch(lanes, now_ms).await,
            Backend::Pg(s) => s.claim_batch(lanes, now_ms).await,
        }
    }

    /// On a store several nodes share, the lane's pause as the upstream
    /// taught any node (until, in wall-clock ms, and why), if it lasts
    /// beyond `now_ms`; `None` on the embedded store (its one dispatcher
    /// knows).
    pub async fn lane_pause(
        &self,
        lane: &LaneKey,
        now_ms: u64,
    ) -> Result<Option<(u64, crate::scheduler::PauseReason)>, StoreError> {
        match &self.backend {
            Backend::Sled(_) => Ok(None),
            Backend::Pg(s) => s.lane_pause(*lane, now_ms).await,
        }
    }

    /// On a store several nodes share: the value every node's key file
    /// must unseal (`None` before the first node sealed it). The embedded
    /// store has its own check (`first_sealed`).
    pub async fn key_canary(&self) -> Result<Option<Vec<u8>>, StoreError> {
        match &self.backend {
            Backend::Sled(_) => Ok(None),
            Backend::Pg(s) => s.meta(CANARY).await,
        }
    }

    /// Keeps `sealed` as the key canary unless one is there already;
    /// returns the one kept (the first node's, when two race).
    pub async fn set_key_canary(&self, sealed: Vec<u8>) -> Result<Option<Vec<u8>>, StoreError> {
        match &self.backend {
            Backend::Sled(_) => Ok(None),
            Backend::Pg(s) => s.set_meta(CANARY, sealed).await,
        }
    }

    /// Teaches the lane's limits, as every node shares them, what an
    /// attempt's end says (one node's scheduler knows it already).
    pub async fn paced(
        &self,
        lane: LaneKey,
        feedback: crate::scheduler::Feedback,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(_) => Ok(()),
            Backend::Pg(s) => s.paced(lane, feedback).await,
        }
    }

    /// Whether this node may send upstream now: `Err` once the other
    /// nodes may have presumed it dead (its heartbeat is overdue).
    pub fn may_send(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(_) => Ok(()),
            Backend::Pg(s) => s.may_send(),
        }
    }

    /// Lanes other nodes queued requests in (`None` on a store of one
    /// node); once.
    pub fn remote_queued(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<LaneKey>> {
        match &self.backend {
            Backend::Sled(_) => None,
            Backend::Pg(s) => Some(s.remote_queued()),
        }
    }

    /// A clean stop's last change: on a store several nodes share, this
    /// node leaves at once (what it still had started is settled as a
    /// restart would), rather than when its heartbeat times out.
    pub async fn leave(&self) -> Result<Recovered, StoreError> {
        match &self.backend {
            Backend::Sled(_) => Ok(Recovered::default()),
            Backend::Pg(s) => s.leave().await,
        }
    }

    /// Up to `free` callbacks due now that no one is delivering (the
    /// `busy` ones are this node's). On a store several nodes share, each
    /// is leased to this node for `lease_ms`.
    pub async fn take_due_callbacks(
        &self,
        now_ms: u64,
        busy: &std::collections::HashSet<RequestId>,
        free: usize,
        lease_ms: u64,
    ) -> Result<Vec<(u64, RequestId, CallbackEntry)>, StoreError> {
        let due = match &self.backend {
            // Entries being delivered stay in the index at their due time.
            Backend::Sled(s) => s.due_callbacks(now_ms, busy.len() + free)?,
            Backend::Pg(s) => {
                let busy = busy.iter().map(|id| id.0.to_vec()).collect();
                s.lease_callbacks(now_ms, free, lease_ms, busy).await?
            }
        };
        Ok(due
            .into_iter()
            .filter(|(_, id, _)| !busy.contains(id))
            .take(free)
            .collect())
    }

    /// Settles one attempt; false if its claim was stale (nothing changed).
    pub async fn settle(&self, op: Settle) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.settle(op).await,
            Backend::Pg(s) => s.settle(op).await,
        }
    }

    /// Start-up recovery (SPEC §6): what was `started` goes back to its
    /// lane (idempotent methods) or becomes `unknown`.
    pub async fn recover(
        &self,
        now_ms: u64,
        unknown_keep_ms: u64,
    ) -> Result<Recovered, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.recover(now_ms, unknown_keep_ms).await,
            Backend::Pg(s) => s.recover(now_ms, unknown_keep_ms).await,
        }
    }

    /// An operator's requeue of an `unknown` request: back to the tail of
    /// its lane, retention cleared. `None` for any other status.
    pub async fn requeue_unknown(
        &self,
        id: &RequestId,
    ) -> Result<Option<RequestRecord>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.requeue_unknown(id).await,
            Backend::Pg(s) => s.requeue_unknown(*id).await,
        }
    }

    /// Deletes a `done` or `unknown` request and everything stored for it;
    /// false (nothing changed) for any other status.
    pub async fn delete(&self, id: &RequestId) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.delete(id).await,
            Backend::Pg(s) => s.delete(*id).await,
        }
    }

    /// The owner's cancel (SPEC §10): an `enqueued` request is removed and
    /// never sent, a `done` or `unknown` one deleted; false if there is
    /// none; `InFlight` for a `started` one.
    pub async fn cancel(&self, id: &RequestId) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.cancel(id).await,
            Backend::Pg(s) => s.cancel(*id).await,
        }
    }

    /// Deletes up to `limit` requests whose retention ended by `now_ms`;
    /// returns how many went (0: nothing is due).
    pub async fn expire(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.expire(now_ms, limit).await,
            Backend::Pg(s) => s.expire(now_ms, limit).await,
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
        match &self.backend {
            Backend::Sled(s) => s.callback_finished(due_ms, id, code).await,
            Backend::Pg(s) => s.callback_finished(due_ms, *id, code).await,
        }
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
        match &self.backend {
            Backend::Sled(s) => s.callback_retry(due_ms, id, next_ms, code).await,
            Backend::Pg(s) => s.callback_retry(due_ms, *id, next_ms, code).await,
        }
    }

    /// The request's retention ended before any receiver took its callback.
    pub async fn callback_gave_up(
        &self,
        due_ms: u64,
        id: &RequestId,
        last: Option<Option<u16>>,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.callback_gave_up(due_ms, id, last).await,
            Backend::Pg(s) => s.callback_gave_up(due_ms, *id, last).await,
        }
    }
}
