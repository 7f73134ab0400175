//! Names and attributes: lookups, stat, mkdir, unlink, rename, readdir,
//! statfs. They reach the backing directory at once (LazyFS keeps no
//! metadata in memory); in strict mode `strict` records how to undo them.

use std::ffi::{OsStr, OsString};
use std::fs::{self, DirBuilder, File, FileTimes, Metadata, Permissions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, DirEntryExt, MetadataExt, PermissionsExt};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, INodeNo, TimeOrNow};

use crate::control::FaultKind;
use crate::fs::{CONTROL_NAME, LazyFs, child, errno, lock};
use crate::nodes::{CONTROL, ROOT};
use crate::strict::GRAVEYARD;

/// The parts of a `setattr` this file system applies.
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
    pub fh: Option<u64>,
}

fn ts(secs: i64, nsec: i64) -> SystemTime {
    match (u64::try_from(secs), u32::try_from(nsec)) {
        (Ok(s), Ok(n)) => UNIX_EPOCH + Duration::new(s, n.min(999_999_999)),
        _ => UNIX_EPOCH,
    }
}

fn when(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl LazyFs {
    /// `.lazyfs` and the graveyard are ours: nothing else may use the names
    /// at the root.
    fn reserved(parent: u64, name: &OsStr) -> bool {
        parent == ROOT && (name == CONTROL_NAME || name == GRAVEYARD)
    }

    pub(crate) fn attr(&self, ino: u64, m: &Metadata) -> FileAttr {
        let held = lock(&self.files).get(&ino).cloned();
        let size = held
            .and_then(|d| lock(&d).size())
            .filter(|_| m.is_file())
            .unwrap_or(m.len());
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: ts(m.atime(), m.atime_nsec()),
            mtime: ts(m.mtime(), m.mtime_nsec()),
            ctime: ts(m.ctime(), m.ctime_nsec()),
            crtime: UNIX_EPOCH,
            kind: FileType::from_std(m.file_type()).unwrap_or(FileType::RegularFile),
            perm: (m.mode() & 0o7777) as u16,
            nlink: u32::try_from(m.nlink()).unwrap_or(u32::MAX),
            uid: m.uid(),
            gid: m.gid(),
            rdev: u32::try_from(m.rdev()).unwrap_or(0),
            blksize: u32::try_from(m.blksize()).unwrap_or(4096),
            flags: 0,
        }
    }

    pub(crate) fn attr_of(&self, ino: u64) -> Result<FileAttr, Errno> {
        if ino == CONTROL {
            return Ok(self.control_attr());
        }
        let m = fs::symlink_metadata(self.real(ino)?).map_err(errno)?;
        Ok(self.attr(ino, &m))
    }

    pub(crate) fn lookup_entry(&self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        if parent == ROOT && name == CONTROL_NAME {
            return Ok(self.control_attr());
        }
        if Self::reserved(parent, name) {
            return Err(Errno::ENOENT);
        }
        let rel = child(&self.rel(parent)?, name);
        let m = fs::symlink_metadata(self.backing.join(&rel)).map_err(errno)?;
        let ino = lock(&self.nodes).intern(&rel, m.ino());
        Ok(self.attr(ino, &m))
    }

    pub(crate) fn set_attr(&self, ino: u64, s: SetAttr) -> Result<FileAttr, Errno> {
        if ino == CONTROL {
            return Ok(self.control_attr());
        }
        let real = self.real(ino)?;
        if let Some(mode) = s.mode {
            fs::set_permissions(&real, Permissions::from_mode(mode & 0o7777)).map_err(errno)?;
        }
        if s.uid.is_some() || s.gid.is_some() {
            std::os::unix::fs::lchown(&real, s.uid, s.gid).map_err(errno)?;
        }
        if let Some(size) = s.size {
            self.truncate(ino, s.fh, size)?;
        }
        if s.atime.is_some() || s.mtime.is_some() {
            let mut times = FileTimes::new();
            if let Some(a) = s.atime {
                times = times.set_accessed(when(a));
            }
            if let Some(m) = s.mtime {
                times = times.set_modified(when(m));
            }
            File::open(&real)
                .and_then(|f| f.set_times(times))
                .map_err(errno)?;
        }
        self.attr_of(ino)
    }

    pub(crate) fn make_dir(&self, parent: u64, name: &OsStr, mode: u32) -> Result<FileAttr, Errno> {
        if Self::reserved(parent, name) {
            return Err(Errno::EEXIST);
        }
        let rel = child(&self.rel(parent)?, name);
        DirBuilder::new()
            .mode(mode)
            .create(self.backing.join(&rel))
            .map_err(errno)?;
        self.note_created(&rel);
        self.lookup_entry(parent, name)
    }

    pub(crate) fn create_file(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Result<(FileAttr, u64), Errno> {
        if Self::reserved(parent, name) {
            return Err(Errno::EEXIST);
        }
        let rel = child(&self.rel(parent)?, name);
        let (file, created) = self.open_file(&self.backing.join(&rel), flags, Some(mode))?;
        if created {
            self.note_created(&rel);
        }
        let backing_ino = file.metadata().map_err(errno)?.ino();
        let ino = lock(&self.nodes).intern(&rel, backing_ino);
        let fh = self.add_handle(ino, file, flags)?;
        Ok((self.attr_of(ino)?, fh))
    }

    pub(crate) fn remove(&self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        if Self::reserved(parent, name) {
            return Err(Errno::EPERM);
        }
        let rel = child(&self.rel(parent)?, name);
        self.remove_entry(&rel, dir)?;
        lock(&self.nodes).removed(&rel);
        Ok(())
    }

    pub(crate) fn move_entry(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
    ) -> Result<(), Errno> {
        if Self::reserved(parent, name) || Self::reserved(newparent, newname) {
            return Err(Errno::EPERM);
        }
        let from = child(&self.rel(parent)?, name);
        let to = child(&self.rel(newparent)?, newname);
        self.rename_entry(&from, &to)?;
        lock(&self.nodes).renamed(&from, &to);
        Ok(())
    }

    /// `.`, `..` and the backing entries, sorted so offsets stay stable
    /// between the calls of one listing.
    pub(crate) fn list(&self, ino: u64) -> Result<Vec<(u64, FileType, OsString)>, Errno> {
        let mut out = vec![
            (ino, FileType::Directory, OsString::from(".")),
            (ino, FileType::Directory, OsString::from("..")),
        ];
        let mut entries = Vec::new();
        for e in fs::read_dir(self.real(ino)?).map_err(errno)? {
            let e = e.map_err(errno)?;
            if ino == ROOT && e.file_name() == GRAVEYARD {
                continue;
            }
            let kind = e
                .file_type()
                .ok()
                .and_then(FileType::from_std)
                .unwrap_or(FileType::RegularFile);
            // Informational only: the kernel looks names up before use.
            entries.push((e.ino(), kind, e.file_name()));
        }
        entries.sort_by(|a, b| a.2.cmp(&b.2));
        out.extend(entries);
        Ok(out)
    }

    pub(crate) fn sync_dir(&self, ino: u64) -> Result<(), Errno> {
        if self.fault(FaultKind::FailFsync, ino) {
            return Err(Errno::EIO);
        }
        let rel = self.rel(ino)?;
        File::open(self.backing.join(&rel))
            .and_then(|d| d.sync_all())
            .map_err(errno)?;
        self.dir_synced(&rel);
        Ok(())
    }

    pub(crate) fn stat_fs(&self) -> Result<libc::statvfs, Errno> {
        let path = std::ffi::CString::new(self.backing.as_os_str().as_bytes())
            .map_err(|_| Errno::EINVAL)?;
        // SAFETY: statvfs only writes into the zeroed struct we own.
        let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `path` is a valid NUL-terminated string for the call.
        if unsafe { libc::statvfs(path.as_ptr(), &mut s) } != 0 {
            return Err(errno(std::io::Error::last_os_error()));
        }
        Ok(s)
    }
}
