//! The control file's language and the faults it arms.
//!
//! A test writes commands, one per line, to `.lazyfs` at the mount root;
//! the write returns once they ran (EINVAL for a line it cannot parse).
//! Reading the file gives a status report (`status` below).
//!
//! | command | effect |
//! | --- | --- |
//! | `cut` | power cut: drop every byte not fsync'd; files grown only in memory fall back to their durable size; in strict mode, undo directory entries not made durable |
//! | `fail-fsync [SUBSTR]` | the next fsync/fdatasync of a file (or directory) whose path contains SUBSTR fails with EIO |
//! | `enospc [SUBSTR]` | the next write to a file whose path contains SUBSTR fails with ENOSPC |
//! | `clear` | disarm every fault |
//! | `strict on` / `strict off` | directory entries need their directory's fsync too |
//!
//! Paths are relative to the mount root (`data/db`); without SUBSTR any
//! file matches. Each armed fault fires once.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use fuser::{Errno, INodeNo};

use crate::fs::{LazyFs, lock};
use crate::io::FileData;
use crate::nodes::CONTROL;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    FailFsync,
    Enospc,
}

impl FaultKind {
    fn name(self) -> &'static str {
        match self {
            FaultKind::FailFsync => "fail-fsync",
            FaultKind::Enospc => "enospc",
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Cut,
    Arm(FaultKind, String),
    Clear,
    Strict(bool),
}

/// Parses every line first, so a bad line runs nothing.
pub fn parse(text: &str) -> Result<Vec<Command>, String> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (word, arg) = match line.split_once(char::is_whitespace) {
            Some((w, a)) => (w, a.trim()),
            None => (line, ""),
        };
        out.push(match (word, arg) {
            ("cut", "") => Command::Cut,
            ("fail-fsync", a) => Command::Arm(FaultKind::FailFsync, a.to_string()),
            ("enospc", a) => Command::Arm(FaultKind::Enospc, a.to_string()),
            ("clear", "") => Command::Clear,
            ("strict", "on") => Command::Strict(true),
            ("strict", "off") => Command::Strict(false),
            _ => return Err(format!("unknown command: {line:?}")),
        });
    }
    Ok(out)
}

/// Armed faults and counters, behind one lock.
#[derive(Default)]
pub struct Control {
    faults: Vec<(FaultKind, String)>,
    pub cuts: u64,
    pub fired: u64,
}

impl Control {
    pub fn arm(&mut self, kind: FaultKind, pattern: String) {
        self.faults.push((kind, pattern));
    }

    pub fn clear(&mut self) {
        self.faults.clear();
    }

    /// Whether an armed fault of `kind` matches `path`; it is used up.
    pub fn take(&mut self, kind: FaultKind, path: &str) -> bool {
        let hit = self
            .faults
            .iter()
            .position(|(k, p)| *k == kind && path.contains(p.as_str()));
        if let Some(i) = hit {
            self.faults.remove(i);
            self.fired += 1;
            // The gateway's log is the other half of the story: say when.
            eprintln!("lazyfs: injected {} on {path}", kind.name());
        }
        hit.is_some()
    }

    pub fn armed(&self) -> String {
        let all: Vec<String> = self
            .faults
            .iter()
            .map(|(k, p)| format!("{}:{p}", k.name()))
            .collect();
        all.join(",")
    }
}

/// The control file's side of the file system: commands, the cut, the
/// status report.
impl LazyFs {
    /// Runs the commands written to the control file.
    pub(crate) fn command(&self, bytes: &[u8]) -> Result<(), Errno> {
        let text = std::str::from_utf8(bytes).map_err(|_| Errno::EINVAL)?;
        let commands = parse(text).map_err(|e| {
            eprintln!("lazyfs: {e}");
            Errno::EINVAL
        })?;
        for c in commands {
            match c {
                Command::Cut => self.cut(),
                Command::Arm(kind, pattern) => lock(&self.control).arm(kind, pattern),
                Command::Clear => lock(&self.control).clear(),
                Command::Strict(on) => lock(&self.strict).enabled = on,
            }
        }
        Ok(())
    }

    /// The power cut.
    fn cut(&self) {
        let all: Vec<Arc<Mutex<FileData>>> = lock(&self.files).values().cloned().collect();
        let (mut files, mut bytes) = (0, 0);
        for f in all {
            let mut d = lock(&f);
            if d.held() > 0 {
                files += 1;
                bytes += d.held();
            }
            d.cut();
        }
        let undone = self.undo_entries();
        lock(&self.control).cuts += 1;
        eprintln!(
            "lazyfs: cut: dropped {bytes} bytes in {files} files, undid {undone} directory entries"
        );
    }

    /// The report a read of `.lazyfs` gives: counters, then one
    /// `unsynced <bytes> <path>` line per file holding unsynced bytes (a
    /// test can time its cut by them).
    pub(crate) fn status(&self) -> String {
        let all: Vec<(u64, Arc<Mutex<FileData>>)> = lock(&self.files)
            .iter()
            .map(|(ino, d)| (*ino, d.clone()))
            .collect();
        let held: Vec<(u64, u64)> = all
            .iter()
            .map(|(ino, f)| (*ino, lock(f).held()))
            .filter(|(_, b)| *b > 0)
            .collect();
        let mut files = String::new();
        for (ino, bytes) in &held {
            let path = lock(&self.nodes).path(*ino).unwrap_or_default();
            files.push_str(&format!("unsynced {bytes} {}\n", path.display()));
        }
        let c = lock(&self.control);
        let s = lock(&self.strict);
        format!(
            "cuts {}\nfiles_with_unsynced_bytes {}\nunsynced_bytes {}\nfaults_fired {}\narmed {}\nstrict {}\nunsynced_entries {}\n{files}",
            c.cuts,
            held.len(),
            held.iter().map(|(_, b)| b).sum::<u64>(),
            c.fired,
            c.armed(),
            if s.enabled { "on" } else { "off" },
            s.len(),
        )
    }

    pub(crate) fn control_attr(&self) -> fuser::FileAttr {
        let now = SystemTime::now();
        fuser::FileAttr {
            ino: INodeNo(CONTROL),
            size: 0,
            blocks: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind: fuser::FileType::RegularFile,
            perm: 0o600,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_and_faults_fire_once_on_matching_paths() {
        assert_eq!(
            parse("cut\nfail-fsync data/db\n\nenospc\nstrict on\n").unwrap(),
            vec![
                Command::Cut,
                Command::Arm(FaultKind::FailFsync, "data/db".into()),
                Command::Arm(FaultKind::Enospc, String::new()),
                Command::Strict(true),
            ]
        );
        assert!(parse("cut\nexplode").is_err());
        assert!(parse("cut now").is_err());
        let mut c = Control::default();
        c.arm(FaultKind::FailFsync, "bodies/".into());
        assert!(
            !c.take(FaultKind::FailFsync, "data/bodies"),
            "the directory"
        );
        assert!(
            !c.take(FaultKind::Enospc, "data/bodies/0.dat"),
            "another kind"
        );
        assert!(c.take(FaultKind::FailFsync, "data/bodies/0.dat"));
        assert!(
            !c.take(FaultKind::FailFsync, "data/bodies/0.dat"),
            "used up"
        );
        assert_eq!(c.fired, 1);
    }
}
