//! The idempotency index (SPEC §10): a lane and a hashed `Idempotency-Key`
//! → the request they name, in sled's `idempotency` tree.
//!
//! The journal is the truth here as everywhere: a submission's entry holds
//! its key with its record, and a delete's entry removes both. What the
//! applier changes in a round is kept in memory (`Index`, consulted before
//! the tree) and written to the tree by the checkpointer before its flush,
//! off the one serial applier, where a transactional get and insert were
//! most of what a key cost (benches/RESULTS.md). Memory holds only what
//! changed since the last checkpoint (SPEC §9); the tree, every key.
//!
//! The checkpointer writes the changes and then a mark, `upto`: the trees'
//! checkpoint they were taken with. sled's log keeps that order, and the
//! rounds up to the mark were committed before it, so after a crash the
//! mark is never past the trees' checkpoint. `open` reads the journal
//! from the mark to the checkpoint for its keys alone (`CatchUp`), then
//! replays the rest as usual.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use super::change::Change;
use super::journal::Position;
use super::{StoreError, codec, keys};
use crate::model::{Idempotency, LaneKey, RequestId, RequestRecord};

/// `keys::idempotency`: 16 bytes of a hash of lane and key.
pub(super) type Key = [u8; 16];

/// The tree's mark: the trees' checkpoint its entries reflect.
const UPTO: &[u8] = b"upto";

/// Changes not yet in the tree (`None`: removed).
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
    tree: sled::Tree,
}

impl Keyed {
    /// The index over `tree`, and its mark. A tree without one reflects
    /// the trees' `checkpoint` (format 2, written in the rounds'
    /// transactions, or nothing applied yet), and is marked so before
    /// anything is applied. Format 2's keys (lane and hashed key, 64
    /// bytes) are rewritten, each new one before its old one goes.
    pub(super) fn open(
        tree: sled::Tree,
        format: u8,
        checkpoint: Position,
    ) -> Result<(Keyed, Position), StoreError> {
        if format < 3 {
            from_format_2(&tree)?;
        }
        let upto = match tree.get(UPTO)? {
            Some(v) => codec::decode(&v)?,
            None => {
                tree.insert(UPTO, codec::encode(&checkpoint)?)?;
                checkpoint
            }
        };
        let keyed = Keyed {
            index: Mutex::default(),
            tree,
        };
        Ok((keyed, upto))
    }

    /// Held by the applier across a round's transaction and its index
    /// changes, so the checkpointer sees both or neither.
    pub(super) fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The request `key` names, as `index` (locked) and the tree say;
    /// not inside a transaction (`change::Tx` reads the tree through it).
    fn get(&self, index: &Index, key: &Key) -> Result<Option<RequestId>, StoreError> {
        match index.known(key) {
            Some(known) => Ok(known),
            None => Ok(self.tree.get(key)?.and_then(|v| keys::id_from(&v))),
        }
    }

    /// The same, for a reader outside the writer.
    pub(super) fn lookup(&self, key: &Key) -> Result<Option<RequestId>, StoreError> {
        self.get(&self.lock(), key)
    }

    /// The changes to write, taken under the lock together with the trees'
    /// checkpoint; they stay visible until written.
    pub(super) fn take(index: &mut Index) -> Vec<(Key, Option<RequestId>)> {
        index.writing = std::mem::take(&mut index.dirty);
        index.writing.iter().map(|(k, to)| (*k, *to)).collect()
    }

    /// Writes what `take` gave, then the mark `at`. The caller flushes.
    pub(super) fn write(
        &self,
        mut changes: Vec<(Key, Option<RequestId>)>,
        at: Position,
    ) -> Result<(), StoreError> {
        // In key order: consecutive inserts land in the same leaves.
        changes.sort_unstable_by_key(|(key, _)| *key);
        for (key, to) in changes {
            match to {
                Some(id) => self.tree.insert(key, id.as_bytes())?,
                None => self.tree.remove(key)?,
            };
        }
        self.tree.insert(UPTO, codec::encode(&at)?)?;
        self.lock().writing.clear();
        Ok(())
    }

    #[cfg(test)]
    pub(super) fn in_memory(&self) -> usize {
        let index = self.lock();
        index.dirty.len() + index.writing.len()
    }
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

/// Rewrites format 2's keys (lane and hashed key) as `keys::idempotency`.
fn from_format_2(tree: &sled::Tree) -> Result<(), StoreError> {
    for entry in tree.iter() {
        let (k, v) = entry?;
        if k.len() != 64 {
            continue;
        }
        let (lane, key) = k.split_at(32);
        if let (Ok(lane), Ok(key)) = (lane.try_into(), key.try_into()) {
            tree.insert(keys::idempotency(lane, key), v)?;
        }
        tree.remove(&k)?;
    }
    Ok(())
}

/// The journal's entries from the tree's mark to the trees' checkpoint,
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
    /// may still name it in the tree: a stale entry, which a lookup finds
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
                None => {
                    if let Some(key) = key_of.get(&id)
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
