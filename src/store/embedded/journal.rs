//! The journal: append-only segment files (`<data-dir>/journal/<n>.log`)
//! holding every change to the store, bodies and responses inline. It is
//! the store's source of truth; sled is the index behind it (see `mod`).
//!
//! An entry is `[len u32][crc32 u32][payload]` (little-endian). A power cut
//! can leave a torn or missing tail; replay stops at the first entry whose
//! length or checksum does not hold, which is never one that was
//! acknowledged: an entry is acknowledged only after the `sync` that
//! covered it. Each open starts a fresh segment, so a torn tail is never
//! written after.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::model::BodyRef;

/// A new segment is started once the current one passes this size.
const SEGMENT_MAX: u64 = 64 << 20;
const HEADER: u64 = 8;
/// No entry is larger: a length field past it is a torn tail, not a
/// reason to allocate.
const ENTRY_MAX: u64 = 1 << 31;

/// A place in the journal: a segment and a byte offset in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    pub segment: u64,
    pub offset: u64,
}

pub struct Journal {
    dir: PathBuf,
    writer: Mutex<Writer>,
}

struct Writer {
    segment: u64,
    file: File,
    len: u64,
    /// Segments finished since the last sync: synced before the current.
    unsynced: Vec<File>,
    dir_changed: bool,
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:016x}.log"))
}

/// The segment numbers in `dir`, in order.
pub fn segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(hex) = name.strip_suffix(".log")
            && let Ok(n) = u64::from_str_radix(hex, 16)
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Frames `payload` as one entry at the end of `buf`.
pub fn frame(buf: &mut Vec<u8>, payload: &[u8]) {
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    buf.extend_from_slice(payload);
}

/// Where the payload of an entry framed at `at` begins.
pub fn payload_at(at: Position) -> Position {
    Position {
        segment: at.segment,
        offset: at.offset + HEADER,
    }
}

impl Journal {
    /// Opens `dir`, starting a fresh segment after the existing ones.
    pub fn open(dir: &Path) -> std::io::Result<Journal> {
        super::create_dir_durably(dir)?;
        let segment = segments(dir)?.last().map_or(0, |n| n + 1);
        let file = new_segment(dir, segment)?;
        Ok(Journal {
            dir: dir.to_path_buf(),
            writer: Mutex::new(Writer {
                segment,
                file,
                len: 0,
                unsynced: Vec::new(),
                dir_changed: true,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the next entry will go.
    pub fn end(&self) -> Position {
        let w = self.lock();
        Position {
            segment: w.segment,
            offset: w.len,
        }
    }

    /// The segment being written (never deleted).
    pub fn current(&self) -> u64 {
        self.lock().segment
    }

    /// Moves to a fresh segment if the current one is full; call before
    /// framing entries against `end()`.
    pub fn roll_if_full(&self) -> std::io::Result<()> {
        let mut w = self.lock();
        if w.len < SEGMENT_MAX {
            return Ok(());
        }
        let next = w.segment + 1;
        let file = new_segment(&self.dir, next)?;
        let old = std::mem::replace(&mut w.file, file);
        w.unsynced.push(old);
        w.segment = next;
        w.len = 0;
        w.dir_changed = true;
        Ok(())
    }

    /// Writes framed entries at `end()`. On failure nothing of them
    /// counts: the segment is cut back to where they began.
    #[cfg(test)]
    pub fn write(&self, framed: &[u8]) -> std::io::Result<Position> {
        self.write_parts(&[framed])
    }

    /// `write` of several buffers, one after another, without copying
    /// them together.
    pub fn write_parts(&self, parts: &[&[u8]]) -> std::io::Result<Position> {
        let mut w = self.lock();
        let at = Position {
            segment: w.segment,
            offset: w.len,
        };
        let mut offset = at.offset;
        for part in parts {
            if let Err(e) = w.file.write_all_at(part, offset) {
                // Cut back, durably: refused entries must not come back
                // whole after a power cut. If that fails, nothing can be
                // said of the file any more (the caller treats a non-space
                // error as fatal).
                w.file
                    .set_len(at.offset)
                    .and_then(|_| w.file.sync_data())
                    .map_err(|undo| {
                        std::io::Error::other(format!("{e}, and cutting it back failed: {undo}"))
                    })?;
                return Err(e);
            }
            offset += part.len() as u64;
        }
        w.len = offset;
        Ok(at)
    }

    /// fsyncs everything written so far (and the directory, after a new
    /// segment). A failure is final: the store stops.
    pub fn sync(&self) -> std::io::Result<()> {
        let (old, current, dir_changed) = {
            let mut w = self.lock();
            let old = std::mem::take(&mut w.unsynced);
            (old, w.file.try_clone()?, std::mem::take(&mut w.dir_changed))
        };
        for f in &old {
            f.sync_data()?;
        }
        current.sync_data()?;
        if dir_changed {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    pub fn read(&self, r: &BodyRef) -> std::io::Result<Vec<u8>> {
        let file = File::open(segment_path(&self.dir, r.segment))?;
        let mut buf = vec![0u8; r.len as usize];
        file.read_exact_at(&mut buf, r.offset)?;
        Ok(buf)
    }

    /// Calls `f` with every whole entry from `from` on, in order, with the
    /// position of its frame; stops each segment at its first torn entry.
    ///
    /// Each segment is fsync'd before it is read: what a killed process
    /// wrote but never synced may still be in the page cache, and must not
    /// be applied (and named by records) unless it is on disk.
    pub fn replay(
        &self,
        from: Position,
        mut f: impl FnMut(Position, &[u8]) -> Result<(), super::StoreError>,
    ) -> Result<u64, super::StoreError> {
        let current = self.current();
        let mut entries = 0;
        for segment in segments(&self.dir)? {
            if segment < from.segment || segment >= current {
                continue;
            }
            let path = segment_path(&self.dir, segment);
            File::open(&path)?.sync_all()?;
            let data = fs::read(&path)?;
            let mut offset = if segment == from.segment {
                from.offset
            } else {
                0
            };
            while let Some(payload) = entry_at(&data, offset) {
                f(Position { segment, offset }, payload)?;
                offset += HEADER + payload.len() as u64;
                entries += 1;
            }
            if offset < data.len() as u64 {
                log::warn!(
                    "journal segment {segment:x}: {} bytes after offset {offset} are a torn tail (never acknowledged)",
                    data.len() as u64 - offset
                );
            }
        }
        Ok(entries)
    }

    /// Deletes whole segments (never the current one).
    pub fn remove(&self, segments: &[u64]) -> std::io::Result<()> {
        let current = self.current();
        for &s in segments.iter().filter(|&&s| s != current) {
            match fs::remove_file(segment_path(&self.dir, s)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        File::open(&self.dir)?.sync_all()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The payload of the entry at `offset`, if it is whole and its checksum
/// holds.
fn entry_at(data: &[u8], offset: u64) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    let head = data.get(start..start.checked_add(HEADER as usize)?)?;
    let len = u32::from_le_bytes(head[..4].try_into().ok()?) as u64;
    let crc = u32::from_le_bytes(head[4..].try_into().ok()?);
    if len == 0 || len > ENTRY_MAX {
        return None;
    }
    let body_start = start + HEADER as usize;
    let payload = data.get(body_start..body_start.checked_add(len as usize)?)?;
    (crc32fast::hash(payload) == crc).then_some(payload)
}

fn new_segment(dir: &Path, segment: u64) -> std::io::Result<File> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(segment_path(dir, segment))?;
    f.flush()?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(payloads: &[&[u8]]) -> Vec<u8> {
        let mut buf = Vec::new();
        for p in payloads {
            frame(&mut buf, p);
        }
        buf
    }

    fn replayed(j: &Journal, from: Position) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        j.replay(from, |_, p| {
            out.push(p.to_vec());
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn entries_replay_in_order_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let at = j.write(&framed(&[b"one", b"two"])).unwrap();
        j.write(&framed(&[b"three"])).unwrap();
        j.sync().unwrap();
        let r = BodyRef {
            segment: at.segment,
            offset: payload_at(at).offset,
            len: 3,
        };
        assert_eq!(j.read(&r).unwrap(), b"one");
        // A torn tail: half an entry, then garbage that looks like one.
        let seg = j.current();
        let end = j.end().offset;
        let mut torn = framed(&[b"four"]);
        torn.truncate(6);
        j.write(&torn).unwrap();
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_ne!(
            j.current(),
            seg,
            "a reopened journal never appends to an old segment"
        );
        assert_eq!(
            replayed(&j, Position::default()),
            [b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
        let after_two = Position {
            segment: seg,
            offset: HEADER * 2 + 6,
        };
        assert_eq!(replayed(&j, after_two), [b"three".to_vec()]);
        assert!(end > 0);
    }

    #[test]
    fn a_flipped_byte_ends_replay_there() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        j.write(&framed(&[b"good", b"bad!", b"after"])).unwrap();
        let seg = j.current();
        drop(j);
        let path = segment_path(dir.path(), seg);
        let mut data = fs::read(&path).unwrap();
        data[HEADER as usize * 2 + 4 + 1] ^= 0xff;
        fs::write(&path, data).unwrap();
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(replayed(&j, Position::default()), [b"good".to_vec()]);
    }

    #[test]
    fn full_segments_roll_and_old_ones_can_be_removed() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let first = j.current();
        j.write(&framed(&[&vec![1u8; SEGMENT_MAX as usize]]))
            .unwrap();
        j.roll_if_full().unwrap();
        assert_eq!(j.current(), first + 1);
        j.write(&framed(&[b"x"])).unwrap();
        j.sync().unwrap();
        j.remove(&[first, j.current()]).unwrap();
        assert_eq!(segments(dir.path()).unwrap(), [first + 1]);
    }
}
