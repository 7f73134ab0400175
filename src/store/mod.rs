//! The durable store: sled trees behind a short list of domain operations.
//!
//! Trees, one per access path (keys in `keys`):
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `records` | id | `RequestRecord` |
//! | `body_refs` | body segment, id, kind | — (which segments are in use) |
//! | `responses` | id | `ResponseHead` |
//! | `sealed` | id | the sealed credential |
//! | `lanes` | lane, seq | id — the per-credential FIFO queues |
//! | `by_status` | status, id | — (recovery, admin listing) |
//! | `expiry` | expires at, id | — (retention sweep) |
//! | `callbacks` | due at, id | attempts so far |
//! | `counters` | status, or `p` + lane | count (sled's `len()` walks a tree) |
//!
//! Bodies live in segment files (`bodies`), referenced from the records.
//! Every change touching several trees is one transaction (`tx`). Nothing
//! is durable until its `Ticket` is waited for (`flusher`).

mod bodies;
mod codec;
mod combine;
mod fatal;
mod flusher;
mod keys;
mod lanes;
mod settle;
mod tx;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use sled::IVec;

pub use fatal::Fatal;
pub use flusher::Ticket;
pub use lanes::Claim;
pub use settle::Settle;
pub use tx::{Completion, NewRequest, Recovered};

use crate::model::{BodyRef, LaneKey, RequestId, RequestRecord, ResponseHead, Status};
use bodies::Bodies;
use flusher::Flusher;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("stored value unreadable: {0}")]
    Codec(String),
    #[error("data dir {0} is in use by another running gateway")]
    Locked(PathBuf),
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
}

/// The largest value kept in sled. sled writes a node whose encoding passes
/// a quarter segment (256 KiB with our 1 MiB segments) as a blob file it
/// never fsyncs. A leaf splits past 16 entries, only on a later traversal,
/// and a merge can add a few more: about 20 at worst, so 22 × 11 KiB
/// still stays under that and every value is power-cut safe. Bodies and
/// responses have no such limit: they live in segment files.
pub const MAX_VALUE: usize = 11 * 1024;

/// sled's log segment size (its default is 512 KiB): sets the blob
/// threshold `MAX_VALUE` is measured against.
const SEGMENT_SIZE: usize = 1 << 20;

pub struct StoreConfig {
    pub path: PathBuf,
    /// Bytes of sled's page cache (its default, 1 GiB, grows with the queue).
    pub cache_capacity: u64,
}

const TREES: [&str; 9] = [
    "records",
    "body_refs",
    "responses",
    "sealed",
    "lanes",
    "by_status",
    "expiry",
    "callbacks",
    "counters",
];

pub struct Store {
    db: sled::Db,
    /// In `TREES` order; `tx::Tx` names them.
    trees: Vec<sled::Tree>,
    flusher: Arc<Flusher>,
    /// Request and response bodies, outside sled.
    bodies: Arc<Bodies>,
    /// Gathers concurrent submissions into one transaction.
    submitter: combine::Combiner<NewRequest, Result<RequestRecord, StoreError>>,
    /// Gathers attempts finishing together into one transaction.
    settler: combine::Combiner<Settle, bool>,
    flusher_thread: Mutex<Option<JoinHandle<()>>>,
    /// Per data dir: credentials hash differently in every installation.
    salt: [u8; 32],
    /// Set once a write could not be made durable: nothing more is.
    fatal: Fatal,
    /// The data dir (its file system's free space is watched).
    path: PathBuf,
}

impl Store {
    pub fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        bodies::create_dir_durably(&config.path)?;
        let db = sled::Config::new()
            .path(&config.path)
            .cache_capacity(config.cache_capacity)
            .segment_size(SEGMENT_SIZE)
            // No flusher thread of sled's own: it only logs the errors of
            // its periodic fsync. Our flusher flushes and fsyncs on every
            // round and treats a failure as fatal.
            .flush_every_ms(None)
            .open()
            .map_err(|e| classify_open_error(e, &config.path))?;
        let trees = TREES
            .iter()
            .map(|name| db.open_tree(name))
            .collect::<Result<Vec<_>, _>>()?;
        let salt = load_or_make_salt(&db)?;
        let log = OpenOptions::new()
            .read(true)
            .write(true)
            .open(config.path.join("db"))?;
        let bodies = Arc::new(Bodies::open(&config.path.join("bodies"))?);
        // sled writes its `conf` file without an fsync: make it durable, and
        // sled's own files (`conf`, `db`, `blobs/`), new entries, with it.
        std::fs::File::open(config.path.join("conf"))?.sync_all()?;
        std::fs::File::open(&config.path)?.sync_all()?;
        let fatal = Fatal::default();
        let (flusher, thread) = Flusher::start(db.clone(), log, bodies.clone(), fatal.clone());
        let store = Store {
            db,
            trees,
            flusher,
            bodies,
            submitter: Default::default(),
            settler: Default::default(),
            flusher_thread: Mutex::new(Some(thread)),
            salt,
            fatal,
            path: config.path.clone(),
        };
        // The salt (and anything else written on open) is durable at once.
        store.flusher.wait_blocking(store.flusher.ticket())?;
        Ok(store)
    }

    pub fn salt(&self) -> &[u8; 32] {
        &self.salt
    }

    /// Bytes free for an unprivileged writer on the data dir's file system.
    pub fn free_space(&self) -> Result<u64, StoreError> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.path.as_os_str().as_bytes())
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
        // SAFETY: `path` is a valid C string and `stat` a plain struct that
        // statvfs fills in; nothing is kept past the call.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
            return Err(StoreError::Io(std::io::Error::last_os_error()));
        }
        Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
    }

    /// The failure switch: the app stops the process once it is set.
    pub fn fatal(&self) -> &Fatal {
        &self.fatal
    }

    /// Makes every body appended so far durable: call before writing a
    /// record that names one. A failure is fatal.
    pub(super) fn sync_bodies(&self) -> Result<(), StoreError> {
        self.bodies.sync().map_err(|e| {
            self.fatal
                .fail(format!("fsync of the body files failed: {e}"));
            StoreError::NotDurable
        })
    }

    fn tree(&self, i: usize) -> &sled::Tree {
        &self.trees[i]
    }

    /// Waits until every write made before `ticket` was taken is on disk.
    pub async fn durable(&self, ticket: Ticket) -> Result<(), StoreError> {
        self.flusher.wait(ticket).await
    }

    /// A ticket for everything written so far.
    pub fn ticket(&self) -> Ticket {
        self.flusher.ticket()
    }

    /// Flushes everything and stops the flusher thread.
    pub fn close(&self) -> Result<(), StoreError> {
        let t = self.flusher.ticket();
        let r = self.flusher.wait_blocking(t);
        self.flusher.stop();
        let thread = self
            .flusher_thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
        r
    }

    pub fn get(&self, id: &RequestId) -> Result<Option<RequestRecord>, StoreError> {
        match self.tree(tx::RECORDS).get(id.as_bytes())? {
            Some(v) => Ok(Some(codec::decode(&v)?)),
            None => Ok(None),
        }
    }

    pub fn request_body(&self, rec: &RequestRecord) -> Result<Vec<u8>, StoreError> {
        self.read_body(rec.body)
    }

    pub fn sealed_credential(&self, id: &RequestId) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree(tx::SEALED)
            .get(id.as_bytes())?
            .map(|v| v.to_vec()))
    }

    /// Whether any credential is sealed: then the key file must exist.
    pub fn has_sealed_credentials(&self) -> Result<bool, StoreError> {
        Ok(self.first_sealed()?.is_some())
    }

    /// One sealed credential with its request id: the start-up check that
    /// the key file is the one these were sealed with.
    pub fn first_sealed(&self) -> Result<Option<(RequestId, Vec<u8>)>, StoreError> {
        Ok(self
            .tree(tx::SEALED)
            .first()?
            .and_then(|(k, v)| Some((keys::id_from(&k)?, v.to_vec()))))
    }

    /// The stored response head and, unless it was too large, its body.
    pub fn response(&self, id: &RequestId) -> Result<Option<(ResponseHead, Vec<u8>)>, StoreError> {
        let Some(head) = self.response_head(id)? else {
            return Ok(None);
        };
        let body = self.read_body(head.body)?;
        Ok(Some((head, body)))
    }

    /// The response head.
    fn response_head(&self, id: &RequestId) -> Result<Option<ResponseHead>, StoreError> {
        let Some((at, _)) = self.response_refs(id)? else {
            return Ok(None);
        };
        Ok(Some(codec::decode(&self.bodies.read(&at)?)?))
    }

    /// Where the response head and body are, without reading either.
    fn response_refs(
        &self,
        id: &RequestId,
    ) -> Result<Option<(BodyRef, Option<BodyRef>)>, StoreError> {
        match self.tree(tx::RESPONSES).get(id.as_bytes())? {
            Some(v) => Ok(Some(codec::decode(&v)?)),
            None => Ok(None),
        }
    }

    fn read_body(&self, body: Option<BodyRef>) -> Result<Vec<u8>, StoreError> {
        match body {
            Some(r) => Ok(self.bodies.read(&r)?),
            None => Ok(Vec::new()),
        }
    }

    /// Deletes body segments no request references any more, once the
    /// changes that dropped the references are durable: a power cut must
    /// never bring back a record pointing at a deleted file. Blocks (the
    /// sweeper's thread).
    pub fn delete_unused_bodies(&self) -> Result<usize, StoreError> {
        let refs = self.tree(tx::BODY_REFS);
        let unused = self
            .bodies
            .unused(|segment| refs.scan_prefix(segment.to_be_bytes()).next().is_some())?;
        if unused.is_empty() {
            return Ok(0);
        }
        self.flusher.wait_blocking(self.flusher.ticket())?;
        Ok(self.bodies.remove(&unused)?)
    }

    /// Lanes with queued requests: one seek per lane, not a scan of queues.
    pub fn pending_lanes(&self) -> Result<Vec<LaneKey>, StoreError> {
        let lanes = self.tree(tx::LANES);
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

    /// Requests in a status, oldest first, after `after` (paging).
    pub fn list(
        &self,
        status: Status,
        after: Option<&RequestId>,
        limit: usize,
    ) -> Result<Vec<RequestRecord>, StoreError> {
        let start = match after {
            Some(id) => keys::status(status, id).to_vec(),
            None => vec![status.code()],
        };
        let mut out = Vec::new();
        for item in self.tree(tx::BY_STATUS).range(start..) {
            let (k, _) = item?;
            if k.first() != Some(&status.code()) || out.len() >= limit {
                break;
            }
            let Some(id) = keys::id_from(&k[1..]) else {
                continue;
            };
            if Some(&id) == after {
                continue;
            }
            if let Some(rec) = self.get(&id)? {
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
                let n = self.tree(tx::COUNTERS).get([s.code()])?;
                Ok((s, n.map(|v| codec::u64_be(&v)).unwrap_or(0)))
            })
            .collect()
    }

    /// When the earliest pending callback is due.
    pub fn next_callback_due(&self) -> Result<Option<u64>, StoreError> {
        self.first_due(tx::CALLBACKS)
    }

    /// Callbacks due by `now_ms`: (due at, id, attempts so far).
    pub fn due_callbacks(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, RequestId, u32)>, StoreError> {
        Ok(self
            .due(tx::CALLBACKS, now_ms, limit)?
            .into_iter()
            .map(|(at, id, v)| (at, id, codec::decode(&v).unwrap_or(0)))
            .collect())
    }

    /// When the earliest retention ends.
    pub fn next_expiry(&self) -> Result<Option<u64>, StoreError> {
        self.first_due(tx::EXPIRY)
    }

    /// Ids whose retention ended by `now_ms`, oldest first.
    pub fn expired(&self, now_ms: u64, limit: usize) -> Result<Vec<(u64, RequestId)>, StoreError> {
        Ok(self
            .due(tx::EXPIRY, now_ms, limit)?
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

fn classify_open_error(e: sled::Error, path: &Path) -> StoreError {
    match &e {
        sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
            StoreError::Locked(path.to_path_buf())
        }
        sled::Error::Io(io) if io.to_string().contains("lock") => {
            StoreError::Locked(path.to_path_buf())
        }
        _ => StoreError::Sled(e),
    }
}

fn load_or_make_salt(db: &sled::Db) -> Result<[u8; 32], StoreError> {
    if let Some(v) = db.get("salt")? {
        return <[u8; 32]>::try_from(v.as_ref())
            .map_err(|_| StoreError::Codec("salt has the wrong length".into()));
    }
    let mut salt = [0u8; 32];
    getrandom::getrandom(&mut salt)
        .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?;
    db.insert("salt", &salt[..])?;
    Ok(salt)
}

#[cfg(test)]
mod tests;
