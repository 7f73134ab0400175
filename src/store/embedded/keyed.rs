//! The idempotency index (SPEC §10): a lane and a hashed `Idempotency-Key`
//! → the request they name, in a table of its own on disk (`keyfile`).
//!
//! The journal is the truth here as everywhere: a submission's entry holds
//! its key with its record, and a delete's entry removes both. What the
//! applier changes in a round is kept in memory (`Index`, consulted before
//! the table) and written to the table by the checkpointer, off the one
//! serial applier. Memory holds only what changed since the last
//! checkpoint (SPEC §9); the table, every key.
//!
//! The checkpointer flushes the trees, then writes the changes (durably),
//! then marks the table with the trees' checkpoint the changes were taken
//! with (`upto`): the table is never ahead of the trees, and after a crash
//! the mark is never past the trees' checkpoint.
//! `open` reads the journal from the mark to the checkpoint for its keys
//! alone (`CatchUp`), then replays the rest as usual. A data dir without
//! the table (older formats kept the index in sled) gets it from the
//! records, each keyed one under its key: what the trees hold is their
//! checkpoint, which becomes the mark.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use super::change::Change;
use super::journal::Position;
pub(super) use super::keyfile::Key;
use super::keyfile::KeyFile;
use super::{StoreError, codec, keys};
use crate::model::{Idempotency, LaneKey, RequestId, RequestRecord};

/// Changes not yet in the table (`None`: removed).
type Changes = HashMap<Key, Option<RequestId>>;

#[derive(Default)]
pub(super) struct Index {
    /// Since the checkpointer last took them.
    dirty: Changes,
    /// Taken by the checkpointer, being written.
    writing: Changes,
}

impl Index {
    pub(super) fn set(&mut self, key: Key, to: Option<RequestId>) {
        self.dirty.insert(key, to);
    }

    /// What memory says of `key`, if it says anything.
    pub(super) fn known(&self, key: &Key) -> Option<Option<RequestId>> {
        self.dirty
            .get(key)
            .or_else(|| self.writing.get(key))
            .copied()
    }
}

pub(super) struct Keyed {
    index: Mutex<Index>,
    disk: KeyFile,
}

impl Keyed {
    /// The index in `dir`, and its mark. Without a table there, or for a
    /// data dir of an older format (`upgrade`: a table there may be from
    /// a start whose new format did not last, and an older asyncgate has
    /// run since), one is made from `records` (the trees at `checkpoint`:
    /// two reads of every record, none kept in memory), and the old index
    /// in sled, `tree`, is emptied.
    pub(super) fn open(
        dir: &std::path::Path,
        records: &sled::Tree,
        tree: &sled::Tree,
        checkpoint: Position,
        upgrade: bool,
    ) -> Result<(Keyed, Position), StoreError> {
        let found = match upgrade {
            true => None,
            false => KeyFile::open(dir)?,
        };
        let (disk, upto) = match found {
            Some(found) => found,
            None => {
                let mut count = 0;
                keyed_records(records, &mut |_, _| {
                    count += 1;
                    Ok(())
                })?;
                let fill = |put: &mut dyn FnMut(&Key, RequestId) -> Result<(), StoreError>| {
                    keyed_records(records, put)
                };
                (KeyFile::create(dir, count, checkpoint, fill)?, checkpoint)
            }
        };
        if !tree.is_empty() {
            tree.clear()?;
        }
        let keyed = Keyed {
            index: Mutex::default(),
            disk,
        };
        Ok((keyed, upto))
    }

    /// Held by the applier across a round's transaction and its index
    /// changes, so the checkpointer sees both or neither.
    pub(super) fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The request `key` names, as `index` (locked) and the table say;
    /// not inside a transaction (`change::Tx` reads the table through it).
    fn get(&self, index: &Index, key: &Key) -> Result<Option<RequestId>, StoreError> {
        match index.known(key) {
            Some(known) => Ok(known),
            None => self.disk.get(key),
        }
    }

    /// The same, for a reader outside the writer: memory under the lock,
    /// the table after it (the applier holds the lock for whole rounds).
    pub(super) fn lookup(&self, key: &Key) -> Result<Option<RequestId>, StoreError> {
        if let Some(known) = self.lock().known(key) {
            return Ok(known);
        }
        self.disk.get(key)
    }

    /// The changes to write, taken under the lock together with the trees'
    /// checkpoint; they stay visible until written.
    pub(super) fn take(index: &mut Index) -> Vec<(Key, Option<RequestId>)> {
        index.writing = std::mem::take(&mut index.dirty);
        index.writing.iter().map(|(k, to)| (*k, *to)).collect()
    }

    /// Writes what `take` gave, durably; it is then read from the table.
    pub(super) fn write(&self, changes: Vec<(Key, Option<RequestId>)>) -> Result<(), StoreError> {
        self.disk.write(&changes)?;
        self.lock().writing.clear();
        Ok(())
    }

    /// Marks the table as reflecting the trees' checkpoint `at`: only once
    /// the trees are flushed to it.
    pub(super) fn mark(&self, at: Position) -> Result<(), StoreError> {
        self.disk.mark(at)
    }

    /// The table, for a round's transaction to read.
    pub(super) fn disk(&self) -> &KeyFile {
        &self.disk
    }

    #[cfg(test)]
    pub(super) fn in_memory(&self) -> usize {
        let index = self.lock();
        index.dirty.len() + index.writing.len()
    }
}

/// Every record with a key, under its key, in id order (a key taken over
/// from a request past its retention names the later one), but unreadable
/// ones (logged). Records past their retention are in: a round replayed
/// after this judges them by its own time, as it did when it ran.
fn keyed_records(
    records: &sled::Tree,
    f: &mut dyn FnMut(&Key, RequestId) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    for v in records.iter().values() {
        let rec: RequestRecord = match codec::decode(&v?) {
            Ok(rec) => rec,
            Err(e) => {
                log::warn!("a record unreadable while the idempotency index is made: {e}");
                continue;
            }
        };
        if let Some(idem) = rec.idempotency {
            f(&keys::idempotency(&rec.lane, &idem.key), rec.id)?;
        }
    }
    Ok(())
}

/// What the request a key led to says of a submission with `lane` and
/// `idem`: nothing if it is another key's (16 bytes of hash can be shared),
/// the same request, or the key reused for another.
pub(super) fn judge(
    first: RequestRecord,
    lane: &LaneKey,
    idem: &Idempotency,
) -> Option<Result<RequestRecord, StoreError>> {
    match first.idempotency {
        Some(i) if first.lane == *lane && i.key == idem.key => Some(match i.fingerprint {
            f if f == idem.fingerprint => Ok(first),
            _ => Err(StoreError::IdempotencyReused),
        }),
        _ => None,
    }
}

/// The journal's entries from the table's mark to the trees' checkpoint,
/// read for their keys alone: the trees hold their effects already.
#[derive(Default)]
pub(super) struct CatchUp {
    /// Submissions with a key and removals, in journal order.
    events: Vec<(Option<Key>, RequestId)>,
    removed: HashSet<RequestId>,
}

impl CatchUp {
    pub(super) fn note(&mut self, change: &Change) {
        match change {
            Change::Submit { rec, .. } => {
                if let Some(idem) = rec.idempotency {
                    let key = keys::idempotency(&rec.lane, &idem.key);
                    self.events.push((Some(key), rec.id));
                }
            }
            Change::Delete { id } | Change::Cancel { id } => self.removed(*id),
            Change::Expire { due, .. } => due.iter().for_each(|(_, id)| self.removed(*id)),
            _ => {}
        }
    }

    fn removed(&mut self, id: RequestId) {
        self.events.push((None, id));
        self.removed.insert(id);
    }

    /// Makes the index's changes again, in journal order. A submission
    /// stored its request if the trees hold it, or if a later change
    /// removed it (no one can name the id of one that was not stored: a
    /// repeat or a refusal answers with another id or none); a removal
    /// frees the key its request was stored under, if it still names it.
    /// A key whose request was stored before the mark and deleted since
    /// may still name it in the table: a stale entry, which a lookup finds
    /// no record behind (and the next submission with that key takes
    /// over).
    pub(super) fn finish(
        self,
        keyed: &Keyed,
        exists: impl Fn(&RequestId) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let mut index = keyed.lock();
        let mut key_of = HashMap::new();
        for (key, id) in self.events {
            match key {
                Some(key) if self.removed.contains(&id) || exists(&id)? => {
                    index.set(key, Some(id));
                    key_of.insert(id, key);
                }
                Some(_) => {}
                // A removal that happened (a refused cancel or delete is in
                // the journal too): its request is not in the trees.
                None => {
                    if let Some(key) = key_of.get(&id)
                        && !exists(&id)?
                        && keyed.get(&index, key)? == Some(id)
                    {
                        index.set(*key, None);
                    }
                }
            }
        }
        Ok(())
    }
}
