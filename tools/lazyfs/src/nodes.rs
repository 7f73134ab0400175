//! Inode numbers for the kernel, and the backing path each one names now.
//!
//! Numbers are our own, not the backing file system's: a backing inode
//! number can be reused after an unlink while the kernel still holds the old
//! one, and a number the kernel knows must never silently change files. A
//! node is found again by path only while the backing file at that path is
//! still the same one (same backing inode), so a path that names a new file
//! gets a new number.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The mount root (FUSE's fixed number for it).
pub const ROOT: u64 = 1;
/// The control file, `.lazyfs` at the mount root.
pub const CONTROL: u64 = 2;
const FIRST_FREE: u64 = 16;

struct Node {
    /// Relative to the backing directory; `None` once unlinked.
    path: Option<PathBuf>,
    backing_ino: u64,
}

pub struct Nodes {
    nodes: HashMap<u64, Node>,
    by_path: HashMap<PathBuf, u64>,
    next: u64,
}

impl Nodes {
    pub fn new(root_backing_ino: u64) -> Nodes {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                path: Some(PathBuf::new()),
                backing_ino: root_backing_ino,
            },
        );
        let by_path = HashMap::from([(PathBuf::new(), ROOT)]);
        Nodes {
            nodes,
            by_path,
            next: FIRST_FREE,
        }
    }

    /// Where `ino` is now, relative to the backing directory.
    pub fn path(&self, ino: u64) -> Option<PathBuf> {
        self.nodes.get(&ino).and_then(|n| n.path.clone())
    }

    /// The number for the file now at `path`, whose backing inode is
    /// `backing_ino`.
    pub fn intern(&mut self, path: &Path, backing_ino: u64) -> u64 {
        if let Some(&ino) = self.by_path.get(path)
            && self.nodes.get(&ino).map(|n| n.backing_ino) == Some(backing_ino)
        {
            return ino;
        }
        self.removed(path);
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(
            ino,
            Node {
                path: Some(path.to_path_buf()),
                backing_ino,
            },
        );
        self.by_path.insert(path.to_path_buf(), ino);
        ino
    }

    /// `path` and everything under it no longer exist.
    pub fn removed(&mut self, path: &Path) {
        let gone: Vec<PathBuf> = self
            .by_path
            .keys()
            .filter(|p| p.starts_with(path))
            .cloned()
            .collect();
        for p in gone {
            if let Some(ino) = self.by_path.remove(&p)
                && let Some(n) = self.nodes.get_mut(&ino)
            {
                n.path = None;
            }
        }
    }

    /// `from` (and everything under it) is now at `to`, replacing `to`.
    pub fn renamed(&mut self, from: &Path, to: &Path) {
        self.removed(to);
        let moved: Vec<(PathBuf, u64)> = self
            .by_path
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (old, ino) in moved {
            self.by_path.remove(&old);
            let rest = old.strip_prefix(from).unwrap_or(Path::new(""));
            let new = if rest.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(rest)
            };
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.path = Some(new.clone());
            }
            self.by_path.insert(new, ino);
        }
    }

    /// After entries were put back behind the kernel's back (a strict cut),
    /// every number but the root's is found again by lookup.
    pub fn forget_paths(&mut self) {
        for (ino, n) in self.nodes.iter_mut() {
            if *ino != ROOT {
                n.path = None;
            }
        }
        self.by_path.retain(|_, ino| *ino == ROOT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_carry_descendants_and_new_files_get_new_numbers() {
        let mut n = Nodes::new(100);
        let d = n.intern(Path::new("d"), 200);
        let f = n.intern(Path::new("d/f"), 201);
        let dd = n.intern(Path::new("dd"), 202);
        assert_eq!(n.intern(Path::new("d/f"), 201), f, "same file, same number");
        n.renamed(Path::new("d"), Path::new("e"));
        assert_eq!(n.path(d), Some(PathBuf::from("e")));
        assert_eq!(n.path(f), Some(PathBuf::from("e/f")));
        assert_eq!(
            n.path(dd),
            Some(PathBuf::from("dd")),
            "a prefix by name only"
        );
        n.removed(Path::new("e/f"));
        assert_eq!(n.path(f), None);
        let again = n.intern(Path::new("e/f"), 201);
        assert_ne!(again, f, "an unlinked number is never reused");
        let other = n.intern(Path::new("e/f"), 999);
        assert_ne!(other, again, "another backing file at the path");
        assert_eq!(n.path(ROOT), Some(PathBuf::new()));
    }
}
