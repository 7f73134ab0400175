//! The idempotency index (SPEC §10): a lane and a hashed `Idempotency-Key`
//! → the request they name.
//!
//! The journal is the truth here as everywhere: a submission's entry holds
//! its key with its record, and a delete's entry removes both. The index
//! itself is kept in memory and looked up and changed by the applier in
//! its round (`change::Tx`), not in sled, whose transactional get and
//! insert on the one serial applier were most of what a key cost
//! (benches/RESULTS.md). Its copy on disk is a log of its own, `keys` in
//! the data dir: at each checkpoint, before sled's flush, one checksummed
//! batch of what changed since the last, with the journal position the
//! index then reflected (`upto`), appended and fsync'd; rewritten whole
//! once it holds more than twice what is live. On open, the log is read
//! (a torn last batch, never acknowledged by a checkpoint, is cut off)
//! and the journal's entries from `upto` to the trees' checkpoint are read
//! for their keys alone (`CatchUp`) before the journal's usual replay.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::change::Change;
use super::journal::Position;
use super::{StoreError, codec, keys};
use crate::model::RequestId;

/// `keys::idempotency`: 16 bytes of a hash of lane and key.
pub(super) type Key = [u8; 16];

/// A batch of the log: where the index then was, and what changed.
type Batch = (Position, Vec<(Key, Option<RequestId>)>);

/// Bytes of a batch's frame: its length and its CRC-32.
const FRAME: usize = 8;

/// A log smaller than this is never rewritten.
const REWRITE_FLOOR: u64 = 1 << 20;

#[derive(Default)]
pub(super) struct Index {
    map: HashMap<Key, RequestId>,
    /// Changed since the log's last batch (`None`: removed).
    dirty: HashMap<Key, Option<RequestId>>,
}

impl Index {
    pub(super) fn get(&self, key: &Key) -> Option<RequestId> {
        self.map.get(key).copied()
    }

    pub(super) fn set(&mut self, key: Key, to: Option<RequestId>) {
        match to {
            Some(id) => self.map.insert(key, id),
            None => self.map.remove(&key),
        };
        self.dirty.insert(key, to);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }
}

struct Log {
    path: PathBuf,
    file: File,
    len: u64,
    /// The last batch's position.
    upto: Position,
    /// Below this size the log is never rewritten (`REWRITE_FLOOR`).
    floor: u64,
}

pub(super) struct Keyed {
    index: Mutex<Index>,
    log: Mutex<Log>,
}

/// What a checkpoint takes from the index, under its lock.
pub(super) struct Taken {
    dirty: HashMap<Key, Option<RequestId>>,
    /// The whole index, when the log is due to be rewritten.
    whole: Option<Vec<(Key, Option<RequestId>)>>,
}

impl Keyed {
    /// Reads the log in `dir` (or, on a data dir without one, the index
    /// that format 2 kept in sled's `tree`, at the trees' `checkpoint`),
    /// and the position it reflects.
    pub(super) fn open(
        dir: &Path,
        tree: &sled::Tree,
        checkpoint: Position,
    ) -> Result<(Keyed, Position), StoreError> {
        let path = dir.join("keys");
        let mut index = Index::default();
        let (upto, len) = match std::fs::read(&path) {
            Ok(bytes) => read_log(&bytes, &mut index),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                from_format_2(tree, &mut index)?;
                // Written whole before anything is applied (and the old
                // index cleared only once it is durable).
                let batch: Batch = (
                    checkpoint,
                    index.map.iter().map(|(k, id)| (*k, Some(*id))).collect(),
                );
                replace(&path, &frame(&batch)?)?;
                tree.clear()?;
                (checkpoint, std::fs::metadata(&path)?.len())
            }
            Err(e) => return Err(e.into()),
        };
        if !tree.is_empty() {
            // Format 2's index, read into the log before a crash cut its
            // clearing short.
            tree.clear()?;
        }
        let file = OpenOptions::new().append(true).open(&path)?;
        // A torn batch at the end is cut off, so the next one is read.
        file.set_len(len)?;
        file.sync_data()?;
        let log = Log {
            path,
            file,
            len,
            upto,
            floor: REWRITE_FLOOR,
        };
        Ok((
            Keyed {
                index: Mutex::new(index),
                log: Mutex::new(log),
            },
            upto,
        ))
    }

    /// Rewrites the log whole at every checkpoint.
    #[cfg(test)]
    pub(super) fn rewrite_always(&self) {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).floor = 0;
    }

    /// Held by the applier across a round's transaction and its index
    /// changes, so the checkpointer sees both or neither.
    pub(super) fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Taken together with the trees' checkpoint, under the index's lock.
    pub(super) fn take(&self, index: &mut Index) -> Taken {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let live = index.map.len() as u64 * 40;
        let whole = (log.len > log.floor.max(2 * live))
            .then(|| index.map.iter().map(|(k, id)| (*k, Some(*id))).collect());
        Taken {
            dirty: std::mem::take(&mut index.dirty),
            whole,
        }
    }

    /// Brings the log up to `at`: one batch appended and fsync'd, or the
    /// whole index written to a new log that replaces it. Nothing when
    /// nothing changed.
    pub(super) fn write(&self, taken: Taken, at: Position) -> Result<(), StoreError> {
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(whole) = taken.whole {
            let bytes = frame(&(at, whole))?;
            replace(&log.path, &bytes)?;
            log.file = OpenOptions::new().append(true).open(&log.path)?;
            log.len = bytes.len() as u64;
        } else if !taken.dirty.is_empty() || at != log.upto {
            let bytes = frame(&(at, taken.dirty.into_iter().collect()))?;
            log.file.write_all(&bytes)?;
            log.file.sync_data()?;
            log.len += bytes.len() as u64;
        }
        log.upto = at;
        Ok(())
    }
}

/// The batches of a log, applied in order; the last one's position and
/// where the readable part ends.
fn read_log(bytes: &[u8], index: &mut Index) -> (Position, u64) {
    let (mut at, mut upto) = (0, Position::default());
    while let Some((batch, next)) = batch_at(bytes, at) {
        upto = batch.0;
        for (key, to) in batch.1 {
            match to {
                Some(id) => index.map.insert(key, id),
                None => index.map.remove(&key),
            };
        }
        at = next;
    }
    if at < bytes.len() {
        log::warn!(
            "the idempotency log's last {} bytes are a torn batch (never checkpointed); cut off",
            bytes.len() - at
        );
    }
    (upto, at as u64)
}

fn batch_at(bytes: &[u8], at: usize) -> Option<(Batch, usize)> {
    let head = bytes.get(at..at + FRAME)?;
    let len = u32::from_le_bytes(head[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(head[4..].try_into().ok()?);
    let payload = bytes.get(at + FRAME..at + FRAME + len)?;
    (crc32fast::hash(payload) == crc)
        .then(|| codec::decode(payload).ok())
        .flatten()
        .map(|b| (b, at + FRAME + len))
}

fn frame(batch: &Batch) -> Result<Vec<u8>, StoreError> {
    let payload = codec::encode(batch)?;
    let len = u32::try_from(payload.len())
        .map_err(|_| StoreError::Codec("an idempotency batch over 4 GiB".into()))?;
    let mut out = Vec::with_capacity(FRAME + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Writes `bytes` as the file at `path`, durably, by a rename.
fn replace(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let new = path.with_extension("new");
    let mut f = File::create(&new)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    std::fs::rename(&new, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The index format 2 kept in sled: lane and hashed key (64 bytes) → id.
fn from_format_2(tree: &sled::Tree, index: &mut Index) -> Result<(), StoreError> {
    for entry in tree.iter() {
        let (k, v) = entry?;
        let (Some(id), Ok((lane, key))) = (
            keys::id_from(&v),
            <&[u8; 64]>::try_from(k.as_ref()).map(|k| k.split_at(32)),
        ) else {
            log::warn!("an idempotency entry of format 2 that is not one; dropped");
            continue;
        };
        if let (Ok(lane), Ok(key)) = (lane.try_into(), key.try_into()) {
            index.map.insert(keys::idempotency(lane, key), id);
        }
    }
    Ok(())
}

/// The journal's entries from the copy's mark to the trees' checkpoint,
/// read for their keys alone: the trees hold their effects already.
#[derive(Default)]
pub(super) struct CatchUp {
    stored: Vec<(Key, RequestId)>,
    removed: HashSet<RequestId>,
}

impl CatchUp {
    pub(super) fn note(&mut self, change: &Change) {
        match change {
            Change::Submit { rec, .. } => {
                if let Some(idem) = rec.idempotency {
                    self.stored
                        .push((keys::idempotency(&rec.lane, &idem.key), rec.id));
                }
            }
            Change::Delete { id } | Change::Cancel { id } => {
                self.removed.insert(*id);
            }
            Change::Expire { due, .. } => self.removed.extend(due.iter().map(|(_, id)| *id)),
            _ => {}
        }
    }

    /// Applies what was noted, given which requests the trees hold: a
    /// submission whose request is there was stored (not a repeat, not
    /// refused, not deleted since), in journal order; a request deleted
    /// since is no longer named by its key.
    pub(super) fn finish(
        self,
        index: &mut Index,
        exists: impl Fn(&RequestId) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        for (key, id) in self.stored {
            if exists(&id)? {
                index.set(key, Some(id));
            }
        }
        if self.removed.is_empty() {
            return Ok(());
        }
        let named: Vec<(Key, RequestId)> = index
            .map
            .iter()
            .filter(|(_, id)| self.removed.contains(id))
            .map(|(k, id)| (*k, *id))
            .collect();
        for (key, id) in named {
            if !exists(&id)? {
                index.set(key, None);
            }
        }
        Ok(())
    }
}
