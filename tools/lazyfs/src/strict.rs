//! Strict mode: directory entries are durable only once their directory is
//! fsync'd, as POSIX (and a real ext4 crash) allows. Every create, mkdir,
//! unlink, rmdir and rename since the directories it touched were last
//! fsync'd is logged; a cut undoes the open ones, newest first. Unlinked
//! (and rename-replaced) files wait in a hidden graveyard in the backing
//! directory so an undo can put them back; an fsync that commits the entry
//! deletes them for good.
//!
//! Simplifications: an entry commits once every directory it touched was
//! fsync'd after it (a rename needs both), and a file's own fsync never
//! commits its name (ext4's journal often would). Undo is best effort: a
//! step whose paths are gone is skipped and counted in the cut's message.

use std::fs;
use std::path::{Path, PathBuf};

use fuser::Errno;

use crate::fs::{LazyFs, errno, lock};

/// The graveyard's name at the backing root (hidden from the mount).
pub const GRAVEYARD: &str = ".lazyfs-graveyard";

enum Change {
    Created(PathBuf),
    Removed {
        path: PathBuf,
        grave: PathBuf,
    },
    Renamed {
        from: PathBuf,
        to: PathBuf,
        displaced: Option<PathBuf>,
    },
}

struct Entry {
    change: Change,
    /// Directories (relative) still to be fsync'd before it is durable.
    dirs: Vec<PathBuf>,
}

pub struct Strict {
    pub enabled: bool,
    log: Vec<Entry>,
    graves: u64,
}

fn parent(p: &Path) -> PathBuf {
    p.parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Deletes a file or a whole directory.
fn delete(p: &Path) -> std::io::Result<()> {
    if fs::symlink_metadata(p)?.is_dir() {
        fs::remove_dir_all(p)
    } else {
        fs::remove_file(p)
    }
}

impl Strict {
    pub fn new(enabled: bool) -> Strict {
        Strict {
            enabled,
            log: Vec::new(),
            graves: 0,
        }
    }

    /// Entries not yet durable.
    pub fn len(&self) -> usize {
        self.log.len()
    }

    fn push(&mut self, change: Change) {
        let mut dirs = match &change {
            Change::Created(p) | Change::Removed { path: p, .. } => vec![parent(p)],
            Change::Renamed { from, to, .. } => vec![parent(from), parent(to)],
        };
        dirs.dedup();
        self.log.push(Entry { change, dirs });
    }
}

impl LazyFs {
    fn grave(&self, s: &mut Strict) -> Result<PathBuf, Errno> {
        let dir = self.backing.join(GRAVEYARD);
        fs::create_dir_all(&dir).map_err(errno)?;
        s.graves += 1;
        Ok(dir.join(s.graves.to_string()))
    }

    pub(crate) fn note_created(&self, rel: &Path) {
        let mut s = lock(&self.strict);
        if s.enabled {
            s.push(Change::Created(rel.to_path_buf()));
        }
    }

    /// unlink/rmdir; in strict mode the entry moves to the graveyard.
    pub(crate) fn remove_entry(&self, rel: &Path, dir: bool) -> Result<(), Errno> {
        let real = self.backing.join(rel);
        let mut s = lock(&self.strict);
        if !s.enabled {
            return if dir {
                fs::remove_dir(&real)
            } else {
                fs::remove_file(&real)
            }
            .map_err(errno);
        }
        let m = fs::symlink_metadata(&real).map_err(errno)?;
        match (dir, m.is_dir()) {
            (true, false) => return Err(Errno::ENOTDIR),
            (false, true) => return Err(Errno::EISDIR),
            (true, true) if fs::read_dir(&real).map_err(errno)?.next().is_some() => {
                return Err(Errno::ENOTEMPTY);
            }
            _ => {}
        }
        let grave = self.grave(&mut s)?;
        fs::rename(&real, &grave).map_err(errno)?;
        s.push(Change::Removed {
            path: rel.to_path_buf(),
            grave,
        });
        Ok(())
    }

    /// rename; in strict mode a replaced target moves to the graveyard.
    pub(crate) fn rename_entry(&self, from: &Path, to: &Path) -> Result<(), Errno> {
        let (real_from, real_to) = (self.backing.join(from), self.backing.join(to));
        let mut s = lock(&self.strict);
        if !s.enabled {
            return fs::rename(&real_from, &real_to).map_err(errno);
        }
        fs::symlink_metadata(&real_from).map_err(errno)?;
        let displaced = match fs::symlink_metadata(&real_to) {
            Ok(_) => {
                let grave = self.grave(&mut s)?;
                fs::rename(&real_to, &grave).map_err(errno)?;
                Some(grave)
            }
            Err(_) => None,
        };
        if let Err(e) = fs::rename(&real_from, &real_to) {
            if let Some(g) = &displaced {
                let _ = fs::rename(g, &real_to);
            }
            return Err(errno(e));
        }
        s.push(Change::Renamed {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            displaced,
        });
        Ok(())
    }

    /// `dir` was fsync'd: entries that waited only for it are durable.
    pub(crate) fn dir_synced(&self, dir: &Path) {
        let mut s = lock(&self.strict);
        for e in s.log.iter_mut() {
            e.dirs.retain(|d| d != dir);
        }
        let (done, open): (Vec<Entry>, Vec<Entry>) =
            s.log.drain(..).partition(|e| e.dirs.is_empty());
        s.log = open;
        for e in done {
            match e.change {
                Change::Removed { grave, .. }
                | Change::Renamed {
                    displaced: Some(grave),
                    ..
                } => {
                    let _ = delete(&grave);
                }
                _ => {}
            }
        }
    }

    /// At a cut: undoes every entry not yet durable, newest first. Returns
    /// how many were undone.
    pub(crate) fn undo_entries(&self) -> usize {
        let mut s = lock(&self.strict);
        let log = std::mem::take(&mut s.log);
        drop(s);
        let n = log.len();
        let b = |p: &Path| self.backing.join(p);
        for e in log.into_iter().rev() {
            let r = match &e.change {
                Change::Created(p) => delete(&b(p)),
                Change::Removed { path, grave } => fs::rename(grave, b(path)),
                Change::Renamed {
                    from,
                    to,
                    displaced,
                } => fs::rename(b(to), b(from)).and_then(|()| match displaced {
                    Some(g) => fs::rename(g, b(to)),
                    None => Ok(()),
                }),
            };
            if let Err(err) = r {
                eprintln!("lazyfs: strict undo step skipped: {err}");
            }
        }
        if n > 0 {
            // Names moved behind the kernel's back: find every one again.
            lock(&self.nodes).forget_paths();
        }
        n
    }
}
