//! Opening a data dir: its format is checked (a dir written before the
//! journal is refused with what to do), then the journal entries written
//! after sled's last checkpoint are applied again, in order, exactly as the
//! writer applied them (`change::apply`), so the trees reach the state the
//! last acknowledged change left.

use std::path::Path;

use super::change::{Change, META, RECORDS};
use super::journal::Position;
use super::keyed::CatchUp;
use super::writer::{blob_refs, is_empty_claim};
use super::{Core, FORMAT, StoreError, codec};
use crate::model::BodyRef;

/// Entries applied per transaction while replaying.
const REPLAY_BATCH: usize = 512;

/// A data dir of the first format (before the journal: `bodies/` and a
/// `body_refs` tree) is refused before sled touches it.
pub(super) fn refuse_old_format(path: &Path) -> Result<(), StoreError> {
    if path.join("bodies").is_dir() {
        return Err(StoreError::Format(format!(
            "data dir {} was written by an older asyncgate (store format 1, before the journal); \
             this version reads format {FORMAT} only. Drain it with the version that wrote it \
             (let its queue empty), or move it away and start with a new --data-dir",
            path.display()
        )));
    }
    Ok(())
}

/// Formats 2 and 3 differ only in their idempotency index, which `open`
/// upgrades.
const UPGRADABLE: u8 = 2;

/// Checks (or, for a new data dir, writes) `meta/format`; the format found.
pub(super) fn check_format(db: &sled::Db, path: &Path) -> Result<u8, StoreError> {
    let names = db.tree_names();
    if names.iter().any(|n| n.as_ref() == b"body_refs") {
        return refuse_old_format(path).and(Err(StoreError::Format(format!(
            "data dir {} holds a store of format 1 (before the journal); this version reads format {FORMAT} only",
            path.display()
        ))));
    }
    let meta = db.open_tree("meta")?;
    match meta.get("format")?.as_deref() {
        Some([v]) if (UPGRADABLE..=FORMAT).contains(v) => Ok(*v),
        Some(v) => Err(StoreError::Format(format!(
            "data dir {} holds a store of format {v:?}; this version reads format {FORMAT} only",
            path.display()
        ))),
        None if names.iter().any(|n| n.as_ref() == b"records") => Err(StoreError::Format(format!(
            "data dir {} holds records but no format mark; refusing to guess",
            path.display()
        ))),
        None => {
            meta.insert("format", &[FORMAT])?;
            Ok(FORMAT)
        }
    }
}

/// Applies the journal from the trees' checkpoint on; returns how many
/// entries. The entries from the idempotency index's mark `upto` to the
/// checkpoint are read first, for their keys alone (`keyed::CatchUp`).
/// The checkpoint then moves to the fresh segment the journal opened.
pub(super) fn replay(core: &Core, upto: Position, from: Position) -> Result<u64, StoreError> {
    let mut catch_up = Some(CatchUp::default());
    let caught_up = |catch_up: CatchUp| {
        let records = core.tree(RECORDS);
        catch_up.finish(&core.keyed, |id| Ok(records.contains_key(id.as_bytes())?))
    };
    let mut batch = Vec::new();
    let mut entries = 0;
    // (The mark is never past the checkpoint: see `keyed`.)
    core.journal.replay(upto.min(from), |at, payload| {
        let entry = decode_entry(at, payload)?;
        if at < from {
            if let Some(c) = catch_up.as_mut() {
                c.note(&entry.0);
            }
            return Ok(());
        }
        if let Some(c) = catch_up.take() {
            caught_up(c)?;
        }
        entries += 1;
        batch.push(entry);
        if batch.len() >= REPLAY_BATCH {
            let end = Position {
                segment: at.segment,
                offset: at.offset + 8 + payload.len() as u64,
            };
            write_batch(core, &std::mem::take(&mut batch), end)?;
        }
        Ok(())
    })?;
    if let Some(c) = catch_up.take() {
        caught_up(c)?;
    }
    write_batch(core, &batch, core.journal.end())?;
    Ok(entries)
}

/// One journal entry's change and where its blobs are.
fn decode_entry(at: Position, payload: &[u8]) -> Result<(Change, Vec<BodyRef>), StoreError> {
    let meta_len = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| StoreError::Codec(format!("journal entry at {at:?}: too short")))?;
    let meta = payload
        .get(4..4 + meta_len as usize)
        .ok_or_else(|| StoreError::Codec(format!("journal entry at {at:?}: meta past its end")))?;
    let (change, lens): (Change, Vec<u64>) = codec::decode(meta)
        .map_err(|e| StoreError::Codec(format!("journal entry at {at:?}: {e}")))?;
    let blobs = blob_refs(at, u64::from(meta_len), &lens);
    Ok((change, blobs))
}

/// Applies replayed changes in one transaction, moving the checkpoint to
/// `end`, just past them.
fn write_batch(
    core: &Core,
    batch: &[(Change, Vec<BodyRef>)],
    end: Position,
) -> Result<(), StoreError> {
    let checkpoint = codec::encode(&end)?;
    core.transact(|tx| {
        for (change, blobs) in batch {
            if !is_empty_claim(change) {
                tx.apply(change, blobs)?;
            }
        }
        tx.finish()?;
        tx.t(META).insert("checkpoint", checkpoint.as_slice())?;
        Ok(())
    })
}
