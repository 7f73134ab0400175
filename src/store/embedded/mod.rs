//! The embedded store (the default): a journal of our own as the source of
//! truth, sled as the index behind it.
//!
//! Every change (a submission with its body, a claim, an answer with its
//! response, a delete...) is appended to the journal (`journal`) by the one
//! writer thread (`writer`), in rounds that share one `fdatasync`; only
//! then is it applied to sled (`change::apply`, one transaction a round)
//! and answered. sled is flushed every half second by the checkpointer,
//! with the journal position its trees reflect (`meta/checkpoint`); after
//! a crash, `open` applies the journal from there (`recovery`). So a
//! submission costs one journal append and one shared fsync, and sled
//! never sits on the path to a 202.
//!
//! Trees (keys in `keys`):
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `records` | id | `RequestRecord` (sealed credential, where body and response are) |
//! | `lanes` | lane, seq | id — the per-credential FIFO queues |
//! | `by_status` | status, id | — (`started` and `unknown` only) |
//! | `expiry` | expires at, id | — (retention, oldest first) |
//! | `callbacks` | due at, id | attempts so far |
//! | `counters` | status; `p` + lane; `b` + lane + seq bucket; `s` + segment | count |
//! | `meta` | `format`, `checkpoint` | |
//! | `idempotency` | formats 2 and 3's idempotency index, emptied on open |
//!
//! The idempotency index (hash of lane and `Idempotency-Key` → id) is a
//! table of its own beside them, `idempotency.idx` (`keyfile`), written by
//! the checkpointer (`keyed`).
//!
//! Journal segments are deleted whole, once no record references a blob in
//! them and the checkpoint is past them: retention drops time-ordered
//! ranges of `expiry` in one change each, and the files go with them.

mod callbacks;
mod change;
mod journal;
mod keyed;
mod keyfile;
mod keys;
mod ops;
mod reads;
mod recovery;
mod writer;

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub(super) use super::types::{CallbackEntry, NewRequest, Recovered, Settle, Submitted};
pub(super) use super::{Claim, MAX_VALUE, StoreError, codec};

use super::fatal::Fatal;
use super::waiters::Waiters;
use change::{COUNTERS, IDEMPOTENCY, META, RECORDS, TREES};
use journal::{Journal, Position};
use keyed::Keyed;
use writer::Writer;

/// sled's log segment size (its default is 512 KiB): sets the blob
/// threshold `MAX_VALUE` is measured against.
const SEGMENT_SIZE: usize = 1 << 20;

/// The on-disk format this version writes (`meta/format`). Formats 2 and
/// 3 (the idempotency index in sled) are upgraded on open
/// (`keyed::Keyed::open`); an older asyncgate refuses format 4, whose
/// index it would not see.
const FORMAT: u8 = 4;

/// How often sled is flushed and the checkpoint moved on.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

pub struct SledConfig {
    pub path: PathBuf,
    /// Bytes of sled's page cache (its default, 1 GiB, grows with the queue).
    pub cache_capacity: u64,
}

/// What the writer and checkpointer threads share with the store.
pub(crate) struct Core {
    db: sled::Db,
    /// In `change::TREES` order.
    trees: Vec<sled::Tree>,
    journal: Journal,
    /// sled's log file, fsync'd at each checkpoint.
    log: File,
    /// Set once a write could not be made durable: nothing more is.
    fatal: Fatal,
    /// Long-polls waiting for a request to finish, woken by the applier.
    waiters: Waiters,
    /// The idempotency index: its changes in memory, its table on disk.
    keyed: Keyed,
    /// One checkpoint at a time (the checkpointer's, open's, close's).
    checkpointing: Mutex<()>,
}

pub struct SledStore {
    core: Arc<Core>,
    writer: Arc<Writer>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    checkpoints: Arc<(Mutex<bool>, Condvar)>,
    /// Per data dir: credentials hash differently in every installation.
    salt: [u8; 32],
    /// The data dir (its file system's free space is watched).
    path: PathBuf,
}

impl Core {
    fn tree(&self, i: usize) -> &sled::Tree {
        &self.trees[i]
    }

    /// Flushes sled and moves the durable checkpoint on; then deletes the
    /// journal segments no record needs and recovery can no longer read.
    fn checkpoint(&self) -> Result<(), StoreError> {
        let _one = self.checkpointing.lock().unwrap_or_else(|p| p.into_inner());
        // The trees' checkpoint and the index changes up to it, together.
        let (at, changes) = {
            let mut index = self.keyed.lock();
            let at: Option<Position> = match self.tree(META).get("checkpoint")? {
                Some(v) => Some(codec::decode(&v)?),
                None => None,
            };
            (at, Keyed::take(&mut index))
        };
        let current = self.journal.current();
        let mut dead = Vec::new();
        if let Some(at) = at {
            for s in journal::segments(self.journal.dir())? {
                let unused = self.tree(COUNTERS).get(keys::segment(s))?.is_none();
                if s < at.segment && s != current && unused {
                    dead.push(s);
                }
            }
        }
        let flushed = self
            .db
            .flush()
            .map_err(StoreError::from)
            .and_then(|_| Ok(self.log.sync_data()?));
        if let Err(e) = flushed {
            self.fatal
                .fail(format!("flushing the index to disk failed: {e}"));
            return Err(e);
        }
        // The index's changes only once the trees are durably past them
        // (a round replayed after a crash must not find the index ahead
        // of the trees), then the mark; before the segments go, since the
        // catch-up reads from the mark.
        self.keyed.write(changes)?;
        if let Some(at) = at {
            self.keyed.mark(at)?;
        }
        if !dead.is_empty() {
            self.journal.remove(&dead)?;
        }
        Ok(())
    }
}

impl SledStore {
    pub fn open(config: &SledConfig) -> Result<SledStore, StoreError> {
        create_dir_durably(&config.path)?;
        recovery::refuse_old_format(&config.path)?;
        let db = sled::Config::new()
            .path(&config.path)
            .cache_capacity(config.cache_capacity)
            .segment_size(SEGMENT_SIZE)
            // No flusher thread of sled's own: it only logs the errors of
            // its periodic fsync. The checkpointer flushes and fsyncs, and
            // treats a failure as fatal.
            .flush_every_ms(None)
            .open()
            .map_err(|e| classify_open_error(e, &config.path))?;
        let format = recovery::check_format(&db, &config.path)?;
        let trees = TREES
            .iter()
            .map(|name| db.open_tree(name))
            .collect::<Result<Vec<_>, _>>()?;
        let checkpoint: Position = match trees[META].get("checkpoint")? {
            Some(v) => codec::decode(&v)?,
            None => Position::default(),
        };
        // The new format before the old index is emptied (sled's log keeps
        // that order): a crash between them leaves no data dir of an older
        // format without its index.
        if format < FORMAT {
            trees[META].insert("format", &[FORMAT])?;
        }
        let (keyed, upto) = Keyed::open(
            &config.path,
            &trees[RECORDS],
            &trees[IDEMPOTENCY],
            checkpoint,
            format < FORMAT,
        )?;
        let salt = load_or_make_salt(&db)?;
        let log = OpenOptions::new()
            .read(true)
            .write(true)
            .open(config.path.join("db"))?;
        let journal = Journal::open(&config.path.join("journal"))?;
        let core = Arc::new(Core {
            db,
            trees,
            journal,
            log,
            fatal: Fatal::default(),
            waiters: Waiters::default(),
            keyed,
            checkpointing: Mutex::default(),
        });
        // The journal's tail the trees had not caught up with.
        let replayed = recovery::replay(&core, upto, checkpoint)?;
        if replayed > 0 {
            log::info!("applied {replayed} journal entries written after the last checkpoint");
        }
        core.checkpoint()?;
        // sled writes its `conf` file without an fsync: make it durable, and
        // sled's own files (`conf`, `db`, `blobs/`, `journal/`), new
        // entries, with it.
        File::open(config.path.join("conf"))?.sync_all()?;
        File::open(&config.path)?.sync_all()?;
        let writer = Arc::new(Writer::new());
        let checkpoints = Arc::new((Mutex::new(false), Condvar::new()));
        let threads = vec![
            spawn("asyncgate-writer", {
                let (w, c) = (writer.clone(), core.clone());
                move || w.run(&c)
            }),
            spawn("asyncgate-checkpoint", {
                let (c, stop) = (core.clone(), checkpoints.clone());
                move || checkpoint_loop(&c, &stop)
            }),
        ];
        Ok(SledStore {
            core,
            writer,
            threads: Mutex::new(threads),
            checkpoints,
            salt,
            path: config.path.clone(),
        })
    }

    pub fn salt(&self) -> &[u8; 32] {
        &self.salt
    }

    /// Bytes free for an unprivileged writer on the data dir's file system.
    pub fn free_space(&self) -> Result<u64, StoreError> {
        free_space(&self.path)
    }

    /// The key index is over 3/4 full and cannot be rebuilt for want of
    /// disk space: new keys are refused (507) until it can.
    pub fn keys_crowded(&self) -> bool {
        self.core.keyed.disk().crowded()
    }

    /// The failure switch: the app stops the process once it is set.
    pub fn fatal(&self) -> &Fatal {
        &self.core.fatal
    }

    pub(super) fn waiters(&self) -> &Waiters {
        &self.core.waiters
    }

    fn tree(&self, i: usize) -> &sled::Tree {
        self.core.tree(i)
    }

    /// Finishes the queued writes, stops the threads and checkpoints.
    pub fn close(&self) -> Result<(), StoreError> {
        self.stop_threads();
        if let Some(why) = self.core.fatal.failed() {
            return Err(StoreError::Unavailable(why));
        }
        self.core.checkpoint()
    }

    /// Lets the writer finish what is queued; later writes get `Closed`.
    fn stop_threads(&self) {
        self.writer.stop();
        {
            let (stop, wake) = &*self.checkpoints;
            *stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
            wake.notify_all();
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Without `close` (a test, an error path): what is acknowledged is in the
/// journal already; only the threads are stopped, no checkpoint taken.
impl Drop for SledStore {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .expect("spawning a store thread")
}

fn checkpoint_loop(core: &Core, stop: &(Mutex<bool>, Condvar)) {
    let (stopped, wake) = stop;
    loop {
        let guard = stopped.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = wake
            .wait_timeout_while(guard, CHECKPOINT_EVERY, |s| !*s)
            .unwrap_or_else(|p| p.into_inner());
        if *guard || core.fatal.failed().is_some() {
            return;
        }
        drop(guard);
        if let Err(e) = core.checkpoint() {
            // A flush, an fsync or a segment's deletion failed: as fatal as
            // any failed fsync (SPEC §6).
            core.fatal.fail(format!("checkpoint failed: {e}"));
            return;
        }
    }
}

/// Bytes free for an unprivileged writer on `dir`'s file system.
fn free_space(dir: &Path) -> Result<u64, StoreError> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))?;
    // SAFETY: `path` is a valid C string and `stat` a plain struct that
    // statvfs fills in; nothing is kept past the call.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(StoreError::Io(std::io::Error::last_os_error()));
    }
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

/// Creates `dir` (and missing parents) and makes each new entry durable by
/// fsyncing the directory that holds it: a power cut must not lose a
/// directory whose files were acknowledged.
pub fn create_dir_durably(dir: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(d) = at.filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        missing.push(d);
        at = d.parent();
    }
    std::fs::create_dir_all(dir)?;
    for d in missing.iter().rev() {
        let parent = d.parent().filter(|p| !p.as_os_str().is_empty());
        File::open(parent.unwrap_or(Path::new(".")))?.sync_all()?;
    }
    Ok(())
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
    db.flush()?;
    Ok(salt)
}

#[cfg(test)]
mod tests;
