//! File data: writes stay in memory per inode until an fsync writes them
//! to the backing file; a cut drops them.
//!
//! A failed fsync is modelled on Linux since 4.13 (errseq): the data it
//! covered stays readable (the page cache still holds it, marked clean)
//! but is never written, so a later fsync succeeds and the power cut loses
//! it anyway; the error is reported once to every open file description,
//! the one that failed first and each other one at its next fsync. The
//! size the file grew to is metadata and is still written by that later
//! fsync, so a cut leaves zeros where the lost bytes were, as an unwritten
//! extent reads on a real file system.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use fuser::Errno;

use crate::control::FaultKind;
use crate::fs::{LazyFs, errno, lock};
use crate::ranges::Ranges;

/// What memory holds for one inode.
#[derive(Default)]
pub struct FileData {
    /// Written, not yet fsync'd.
    pending: Ranges,
    /// Written, then covered by a failed fsync: readable until a cut,
    /// never made durable.
    lost: Ranges,
    /// The size processes see; `None` while it is the backing file's.
    size: Option<u64>,
    /// Injected fsync errors so far (never reset: handles compare to it).
    err_seq: u64,
}

impl FileData {
    pub fn held(&self) -> u64 {
        self.pending.bytes() + self.lost.bytes()
    }

    /// The power cut, for this file.
    pub fn cut(&mut self) {
        self.pending.clear();
        self.lost.clear();
        self.size = None;
    }

    /// The size processes see, when it is not the backing file's.
    pub fn size(&self) -> Option<u64> {
        self.size
    }
}

/// One open file description (one FUSE `open`).
pub struct Handle {
    pub ino: u64,
    file: File,
    /// Opened with O_SYNC or O_DSYNC: every write is an fsync too.
    sync_writes: bool,
    /// The `err_seq` this description has been told about.
    seen_err: AtomicU64,
}

fn read_full_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => break, // the rest stays zero: a hole past the end
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl LazyFs {
    pub(crate) fn data(&self, ino: u64) -> Arc<Mutex<FileData>> {
        lock(&self.files).entry(ino).or_default().clone()
    }

    fn handle(&self, fh: u64) -> Result<Arc<Handle>, Errno> {
        lock(&self.handles).get(&fh).cloned().ok_or(Errno::EBADF)
    }

    /// Opens the backing file read-write whatever the caller asked for (the
    /// kernel enforces the caller's mode), so any description can fsync.
    /// With `create`, makes it (mode given) unless it exists; says whether
    /// it made it.
    pub(crate) fn open_file(
        &self,
        path: &Path,
        flags: i32,
        create: Option<u32>,
    ) -> Result<(File, bool), Errno> {
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        let Some(mode) = create else {
            return Ok((o.open(path).map_err(errno)?, false));
        };
        match o.clone().create_new(true).mode(mode).open(path) {
            Ok(f) => Ok((f, true)),
            Err(e)
                if e.kind() == std::io::ErrorKind::AlreadyExists && flags & libc::O_EXCL == 0 =>
            {
                Ok((o.open(path).map_err(errno)?, false))
            }
            Err(e) => Err(errno(e)),
        }
    }

    /// Registers an open description of `ino`; applies O_TRUNC.
    pub(crate) fn add_handle(&self, ino: u64, file: File, flags: i32) -> Result<u64, Errno> {
        let seen = lock(&self.data(ino)).err_seq;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let handle = Handle {
            ino,
            file,
            sync_writes: flags & (libc::O_SYNC | libc::O_DSYNC) != 0,
            seen_err: AtomicU64::new(seen),
        };
        lock(&self.handles).insert(fh, Arc::new(handle));
        if flags & libc::O_TRUNC != 0 {
            self.truncate(ino, Some(fh), 0)?;
        }
        Ok(fh)
    }

    pub(crate) fn release(&self, fh: u64) {
        lock(&self.handles).remove(&fh);
    }

    pub(crate) fn read(&self, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let h = self.handle(fh)?;
        let data = self.data(ino);
        let d = lock(&data);
        let backing_len = h.file.metadata().map_err(errno)?.len();
        let len = d.size.unwrap_or(backing_len);
        if offset >= len {
            return Ok(Vec::new());
        }
        let end = len.min(offset.saturating_add(u64::from(size)));
        let mut buf = vec![0u8; (end - offset) as usize];
        let durable_end = backing_len.min(end);
        if durable_end > offset {
            read_full_at(&h.file, &mut buf[..(durable_end - offset) as usize], offset)
                .map_err(errno)?;
        }
        d.lost.overlay(offset, &mut buf);
        d.pending.overlay(offset, &mut buf);
        Ok(buf)
    }

    pub(crate) fn write(&self, ino: u64, fh: u64, offset: u64, bytes: &[u8]) -> Result<u32, Errno> {
        let h = self.handle(fh)?;
        if self.fault(FaultKind::Enospc, ino) {
            return Err(Errno::ENOSPC);
        }
        let data = self.data(ino);
        let mut d = lock(&data);
        let len = match d.size {
            Some(s) => s,
            None => h.file.metadata().map_err(errno)?.len(),
        };
        d.pending.insert(offset, bytes);
        d.size = Some(len.max(offset + bytes.len() as u64));
        if h.sync_writes {
            self.sync_locked(&h, &mut d, true)?;
        }
        u32::try_from(bytes.len()).map_err(|_| Errno::EINVAL)
    }

    pub(crate) fn fsync(&self, ino: u64, fh: u64, datasync: bool) -> Result<(), Errno> {
        let h = self.handle(fh)?;
        let data = self.data(ino);
        let mut d = lock(&data);
        self.sync_locked(&h, &mut d, datasync)
    }

    fn sync_locked(
        &self,
        h: &Handle,
        d: &mut MutexGuard<FileData>,
        datasync: bool,
    ) -> Result<(), Errno> {
        if self.fault(FaultKind::FailFsync, h.ino) {
            d.err_seq += 1;
            h.seen_err.store(d.err_seq, Ordering::Relaxed);
            let covered = std::mem::take(&mut d.pending);
            d.lost.absorb(covered);
            return Err(Errno::EIO);
        }
        if h.seen_err.swap(d.err_seq, Ordering::Relaxed) < d.err_seq {
            return Err(Errno::EIO);
        }
        for (offset, bytes) in d.pending.iter() {
            h.file.write_all_at(bytes, offset).map_err(errno)?;
        }
        if let Some(size) = d.size
            && h.file.metadata().map_err(errno)?.len() < size
        {
            h.file.set_len(size).map_err(errno)?;
        }
        if datasync {
            h.file.sync_data().map_err(errno)?;
        } else {
            h.file.sync_all().map_err(errno)?;
        }
        // Newer bytes now on disk hide what an earlier failure lost there.
        for (s, e) in d.pending.spans() {
            d.lost.punch(s, e);
        }
        d.pending.clear();
        Ok(())
    }

    /// Shrinking passes straight through (durable at once); growing is held
    /// in memory like a write until an fsync.
    pub(crate) fn truncate(&self, ino: u64, fh: Option<u64>, size: u64) -> Result<(), Errno> {
        let file = match fh.and_then(|fh| self.handle(fh).ok()) {
            Some(h) => h.file.try_clone().map_err(errno)?,
            None => OpenOptions::new()
                .write(true)
                .open(self.real(ino)?)
                .map_err(errno)?,
        };
        let data = self.data(ino);
        let mut d = lock(&data);
        if size < file.metadata().map_err(errno)?.len() {
            file.set_len(size).map_err(errno)?;
        }
        d.pending.punch(size, u64::MAX);
        d.lost.punch(size, u64::MAX);
        d.size = Some(size);
        Ok(())
    }
}
