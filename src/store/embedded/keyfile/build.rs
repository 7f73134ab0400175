//! Making a table: in memory a window of slots at a time, each window
//! written once, in order. A table of one window takes one read of its
//! source; a larger one spills the source's keys into a file a window
//! (`idempotency.spill.N`, not synced: a crash leaves only garbage that
//! `open` removes), then reads each window's back: one read of the
//! source, whatever the table's size.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{HEADER, KeyFile, NEW, SLOT, StoreError, Table, header, home, size_for, stored};
use crate::model::RequestId;

use super::super::journal::Position;
use super::Key;

/// The spill files' names, before their window's number.
pub(super) const SPILL: &str = "idempotency.spill.";

/// What gives a table its keys: each key and its id, in order.
pub(super) type Source<'a> = &'a mut dyn FnMut(
    &mut dyn FnMut(&Key, RequestId) -> Result<(), StoreError>,
) -> Result<(), StoreError>;

impl Table {
    /// A table for `keys` keys in `NEW`, filled from `source` (a key given
    /// twice keeps the later id), made durable and renamed to `NAME`; made
    /// in memory `in_memory` bytes of slots at a time. With the number of
    /// slots it took.
    pub(super) fn build(
        dir: &Path,
        keys: u64,
        mark: Position,
        in_memory: u64,
        source: Source<'_>,
    ) -> Result<(Table, u64), StoreError> {
        let slots = size_for(keys);
        let mut used = 0;
        let path = dir.join(NEW);
        let table = Table {
            file: fresh(&path)?,
            slots,
        };
        let mut head = vec![0u8; HEADER as usize];
        head[..36].copy_from_slice(&header(slots, mark));
        table.file.write_all_at(&head, 0)?;
        // Every slot is written (zeros too, not a sparse file: a slot's
        // write is then an overwrite, not a block allocated by the file
        // system).
        let window = (in_memory / SLOT as u64).next_power_of_two().min(slots);
        let mut image = vec![0u8; window as usize * SLOT];
        let carried = if window == slots {
            let mut past = Vec::new();
            source(&mut |key, id| {
                used += place(&mut image, home(&stored(key), slots), key, id, &mut past);
                Ok(())
            })?;
            table.file.write_all_at(&image, HEADER)?;
            past
        } else {
            let spills =
                Spills::fill(dir, slots / window, |key| home(key, slots) / window, source)?;
            let mut carried = Vec::new();
            for (w, spill) in spills.files.iter().enumerate() {
                let first = w as u64 * window;
                image.fill(0);
                let mut past = Vec::new();
                for (key, id) in std::mem::take(&mut carried) {
                    used += place(&mut image, 0, &key, id, &mut past);
                }
                each_spilled(spill, |key, id| {
                    used += place(&mut image, home(key, slots) - first, key, id, &mut past);
                })?;
                table
                    .file
                    .write_all_at(&image, HEADER + first * SLOT as u64)?;
                carried = past;
            }
            spills.remove();
            carried
        };
        // Past the last slot: on to the first ones, now on disk.
        for (key, id) in carried {
            used += table.put(&key, Some(id))?;
        }
        table.file.sync_all()?;
        std::fs::rename(&path, KeyFile::path(dir))?;
        File::open(dir)?.sync_all()?;
        Ok((table, used))
    }
}

/// Sets `key` in a window of slots in memory, probing from its slot
/// `from`; past the window's end, into `past`. 1 if it took an empty
/// slot.
fn place(
    image: &mut [u8],
    from: u64,
    key: &Key,
    id: RequestId,
    past: &mut Vec<(Key, RequestId)>,
) -> u64 {
    let key = stored(key);
    for slot in image[from as usize * SLOT..].chunks_exact_mut(SLOT) {
        let empty = slot[..16] == [0; 16];
        if empty || slot[..16] == key {
            slot[..16].copy_from_slice(&key);
            slot[16..].copy_from_slice(id.as_bytes());
            return u64::from(empty);
        }
    }
    past.push((key, id));
    0
}

/// A source's keys, a file a window, each in the source's order.
struct Spills {
    paths: Vec<PathBuf>,
    files: Vec<File>,
}

impl Spills {
    fn fill(
        dir: &Path,
        windows: u64,
        window_of: impl Fn(&Key) -> u64,
        source: Source<'_>,
    ) -> Result<Spills, StoreError> {
        let mut spills = Spills {
            paths: Vec::new(),
            files: Vec::new(),
        };
        let mut out = Vec::new();
        for w in 0..windows {
            let path = dir.join(format!("{SPILL}{w}"));
            let file = fresh(&path)?;
            spills.paths.push(path);
            out.push(BufWriter::with_capacity(16 << 10, file.try_clone()?));
            spills.files.push(file);
        }
        source(&mut |key, id| {
            let key = stored(key);
            let w = &mut out[window_of(&key) as usize];
            w.write_all(&key)?;
            w.write_all(id.as_bytes())?;
            Ok(())
        })?;
        for mut w in out {
            w.flush()?;
        }
        Ok(spills)
    }

    fn remove(self) {
        for path in self.paths {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Every key and id spilled into `file`, in order.
fn each_spilled(file: &File, mut f: impl FnMut(&Key, RequestId)) -> Result<(), StoreError> {
    let mut file = file;
    file.rewind()?;
    let mut buf = vec![0u8; SLOT << 15];
    let mut held = 0;
    loop {
        let n = file.read(&mut buf[held..])?;
        if n == 0 {
            break;
        }
        held += n;
        let whole = held - held % SLOT;
        for raw in buf[..whole].chunks_exact(SLOT) {
            let mut key = [0u8; 16];
            key.copy_from_slice(&raw[..16]);
            let mut id = [0u8; 16];
            id.copy_from_slice(&raw[16..]);
            f(&key, RequestId(id));
        }
        buf.copy_within(whole..held, 0);
        held -= whole;
    }
    Ok(())
}

/// An empty file at `path`, for reading and writing.
fn fresh(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

/// Removes what an interrupted build left in `dir`.
pub(super) fn clean(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(NEW));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(SPILL) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
