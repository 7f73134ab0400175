//! Request and response bodies, kept out of sled. sled 0.34 copies a whole
//! leaf (up to 16 entries) on every insert and rewrites it in its log, so a
//! kibibyte body costs ~12 µs and several times its size on disk there
//! (measured: benches/RESULTS.md). Bodies are instead appended once to
//! segment files (`<data-dir>/bodies/<segment>.dat`); sled keeps a small
//! `BodyRef` to them.
//!
//! Bytes are durable before any record naming them can be: the store
//! appends a batch's bodies, `sync`s them (the segments written since the
//! last sync, and the directory after a new segment), and only then writes
//! the sled records that reference them. sled's log may reach the disk at
//! any moment (its own flusher, the kernel's writeback), so ordering the
//! flush rounds alone would not do. A crash can leave unreferenced bytes
//! behind (appended, never committed); whole segments are deleted once no
//! record references them, and only after that is durable.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock, RwLockReadGuard};

use crate::model::BodyRef;

/// A new segment is started past this size.
const SEGMENT_MAX: u64 = 64 << 20;

pub struct Bodies {
    dir: PathBuf,
    writer: Mutex<Writer>,
    /// Held (shared) from an append until the sled write referencing it
    /// commits, and (exclusive) while finding unused segments: a body
    /// appended but not yet referenced is never taken for garbage.
    commit_gate: RwLock<()>,
    /// One sync at a time: a caller whose appends another caller's sync
    /// took must not return before that sync has finished. Holds whether
    /// a sync has failed: then every later one fails too (the bytes it
    /// took may be lost, and a later caller's appends may have been among
    /// them).
    syncing: Mutex<bool>,
}

struct Writer {
    segment: u64,
    file: File,
    len: u64,
    /// Files written since the last sync (the current one included once
    /// written to), and whether the directory gained an entry.
    unsynced: Vec<File>,
    dir_changed: bool,
    written: bool,
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:016x}.dat"))
}

fn segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(hex) = name.strip_suffix(".dat")
            && let Ok(n) = u64::from_str_radix(hex, 16)
        {
            out.push(n);
        }
    }
    Ok(out)
}

impl Bodies {
    /// Opens `dir`, always starting a fresh segment: a segment a crash may
    /// have cut short is never appended to again.
    pub fn open(dir: &Path) -> std::io::Result<Bodies> {
        create_dir_durably(dir)?;
        let segment = segments(dir)?.into_iter().max().map_or(0, |n| n + 1);
        let file = new_segment(dir, segment)?;
        Ok(Bodies {
            dir: dir.to_path_buf(),
            writer: Mutex::new(Writer {
                segment,
                file,
                len: 0,
                unsynced: Vec::new(),
                dir_changed: true,
                written: false,
            }),
            commit_gate: RwLock::new(()),
            syncing: Mutex::new(false),
        })
    }

    /// Hold this from `append` until the reference to the body is written.
    pub fn gate(&self) -> RwLockReadGuard<'_, ()> {
        self.commit_gate.read().unwrap_or_else(|p| p.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends a body; durable with the next flush round.
    pub fn append(&self, bytes: &[u8]) -> std::io::Result<BodyRef> {
        let mut w = self.lock();
        if w.len > 0 && w.len + bytes.len() as u64 > SEGMENT_MAX {
            let next = w.segment + 1;
            let file = new_segment(&self.dir, next)?;
            let old = std::mem::replace(&mut w.file, file);
            if w.written {
                w.unsynced.push(old);
            }
            w.segment = next;
            w.len = 0;
            w.written = false;
            w.dir_changed = true;
        }
        let offset = w.len;
        w.file.write_all_at(bytes, offset)?;
        w.len += bytes.len() as u64;
        w.written = true;
        Ok(BodyRef {
            segment: w.segment,
            offset,
            len: bytes.len() as u64,
        })
    }

    pub fn read(&self, r: &BodyRef) -> std::io::Result<Vec<u8>> {
        let file = File::open(segment_path(&self.dir, r.segment))?;
        let mut buf = vec![0u8; r.len as usize];
        file.read_exact_at(&mut buf, r.offset)?;
        Ok(buf)
    }

    /// fsyncs everything appended before this call. A failure is final
    /// for the caller (the store treats it as fatal): the files it took
    /// are not given back, as after a failed fsync the kernel may have
    /// dropped their dirty pages anyway.
    pub fn sync(&self) -> std::io::Result<()> {
        let mut failed = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        if *failed {
            return Err(std::io::Error::other(
                "an earlier fsync of the body files failed",
            ));
        }
        let synced = self.sync_taken();
        *failed = synced.is_err();
        synced
    }

    /// Takes what was written since the last sync and fsyncs it; called
    /// with `syncing` held.
    fn sync_taken(&self) -> std::io::Result<()> {
        let (files, dir_changed) = {
            let mut w = self.lock();
            let mut files = std::mem::take(&mut w.unsynced);
            if w.written {
                files.push(w.file.try_clone()?);
                w.written = false;
            }
            (files, std::mem::take(&mut w.dir_changed))
        };
        for f in &files {
            f.sync_data()?;
        }
        if dir_changed {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Segments but the current one that `in_use` says no record
    /// references. Delete them (`remove`) only once those records' last
    /// changes are durable.
    pub fn unused(&self, in_use: impl Fn(u64) -> bool) -> std::io::Result<Vec<u64>> {
        let _no_commits = self.commit_gate.write().unwrap_or_else(|p| p.into_inner());
        let current = self.lock().segment;
        Ok(segments(&self.dir)?
            .into_iter()
            .filter(|&s| s != current && !in_use(s))
            .collect())
    }

    /// Deletes segments `unused` named. A segment never gains references
    /// once it is not the current one, so they are still unused.
    pub fn remove(&self, unused: &[u64]) -> std::io::Result<usize> {
        for &s in unused {
            match fs::remove_file(segment_path(&self.dir, s)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(unused.len())
    }
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
    fs::create_dir_all(dir)?;
    for d in missing.iter().rev() {
        let parent = d.parent().filter(|p| !p.as_os_str().is_empty());
        File::open(parent.unwrap_or(Path::new(".")))?.sync_all()?;
    }
    Ok(())
}

fn new_segment(dir: &Path, segment: u64) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(segment_path(dir, segment))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_round_trip_across_segments_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let b = Bodies::open(dir.path()).unwrap();
        let small = b.append(b"hello").unwrap();
        let big = vec![7u8; (SEGMENT_MAX - 2) as usize];
        let r = b.append(&big).unwrap();
        assert_eq!(r.segment, small.segment + 1, "a full segment rotates");
        b.sync().unwrap();
        assert_eq!(b.read(&small).unwrap(), b"hello");
        assert_eq!(b.read(&r).unwrap().len(), big.len());
        drop(b);
        let b = Bodies::open(dir.path()).unwrap();
        let after = b.append(b"x").unwrap();
        assert_eq!(
            after.segment,
            r.segment + 1,
            "never appends to an old segment"
        );
        assert_eq!(b.read(&small).unwrap(), b"hello");
        let unused = b.unused(|s| s == r.segment).unwrap();
        assert_eq!(unused, [small.segment]);
        assert_eq!(b.remove(&unused).unwrap(), 1);
        assert!(b.read(&small).is_err());
        assert_eq!(b.read(&r).unwrap().len(), big.len());
    }
}
