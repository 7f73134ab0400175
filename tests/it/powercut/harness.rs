//! The harness's own checks: lazyfs models what the power-cut tests rely
//! on (docs/POWERCUT.md), seen by plain processes through the mount.

use std::fs::{self, File, OpenOptions};
use std::io::Write;

use crate::lazyfs::mount_or_skip;

const EIO: i32 = 5;
const ENOSPC: i32 = 28;

fn os_error(r: std::io::Result<()>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

#[test]
fn lazyfs_drops_what_was_not_fsynced_and_injects_faults() {
    let Some(m) = mount_or_skip(
        "lazyfs_drops_what_was_not_fsynced_and_injects_faults",
        false,
    ) else {
        return;
    };
    let p = |name: &str| m.mnt.join(name);

    let mut f = File::create(p("log")).unwrap();
    f.write_all(b"durable").unwrap();
    f.sync_data().unwrap();
    f.write_all(b" and not").unwrap();
    drop(f);
    File::create(p("grown")).unwrap().set_len(4096).unwrap();
    assert_eq!(
        fs::read(p("log")).unwrap(),
        b"durable and not",
        "reads see writes"
    );
    m.control("cut");
    assert_eq!(
        fs::read(p("log")).unwrap(),
        b"durable",
        "only the fsync'd bytes"
    );
    assert_eq!(
        fs::metadata(p("grown")).unwrap().len(),
        0,
        "back to its durable size"
    );

    // A failed fsync: each open description hears of it once; the bytes it
    // covered stay readable but never become durable (fsyncgate).
    let mut w = File::create(p("flaky")).unwrap();
    let r = File::open(p("flaky")).unwrap();
    w.write_all(b"covered").unwrap();
    m.control("fail-fsync flaky");
    assert_eq!(os_error(w.sync_all()), Some(EIO));
    assert_eq!(
        os_error(r.sync_all()),
        Some(EIO),
        "the other description too"
    );
    assert_eq!(os_error(w.sync_all()), None, "then success is reported");
    assert_eq!(fs::read(p("flaky")).unwrap(), b"covered");
    m.control("cut");
    // The later fsync wrote the size but not the lost bytes: zeros, as a
    // real file system leaves an unwritten extent.
    assert_eq!(
        fs::read(p("flaky")).unwrap(),
        [0u8; 7],
        "yet the bytes were lost"
    );

    m.control("enospc full");
    assert_eq!(os_error(fs::write(p("full"), b"x")), Some(ENOSPC));
    assert_eq!(
        os_error(fs::write(p("full"), b"y")),
        None,
        "a fault fires once"
    );
    assert_eq!(os_error(fs::write(p("other"), b"z")), None);

    let bad = OpenOptions::new()
        .write(true)
        .open(p(".lazyfs"))
        .unwrap()
        .write_all(b"explode\n");
    assert!(bad.is_err(), "unknown commands are refused");
    assert!(m.status().contains("cuts 2\n"), "{}", m.status());
}

#[test]
fn strict_lazyfs_undoes_entries_whose_directory_was_not_fsynced() {
    let Some(m) = mount_or_skip(
        "strict_lazyfs_undoes_entries_whose_directory_was_not_fsynced",
        true,
    ) else {
        return;
    };
    let p = |name: &str| m.mnt.join(name);
    let sync_dir = |name: &str| File::open(p(name)).unwrap().sync_all().unwrap();
    let write_synced = |name: &str, bytes: &[u8]| {
        let mut f = File::create(p(name)).unwrap();
        f.write_all(bytes).unwrap();
        f.sync_all().unwrap();
    };

    fs::create_dir(p("d")).unwrap();
    sync_dir("");
    write_synced("d/kept", b"kept");
    sync_dir("d");
    write_synced("d/unnamed", b"its name was never made durable");
    fs::create_dir(p("lost-dir")).unwrap();
    m.control("cut");
    assert_eq!(fs::read(p("d/kept")).unwrap(), b"kept");
    assert!(
        !p("d/unnamed").exists(),
        "a new name needs its directory's fsync"
    );
    assert!(!p("lost-dir").exists());

    write_synced("d/replaced", b"old");
    sync_dir("d");
    fs::rename(p("d/kept"), p("d/moved")).unwrap();
    fs::write(p("d/new"), b"new").unwrap();
    fs::rename(p("d/new"), p("d/replaced")).unwrap();
    m.control("cut");
    assert_eq!(
        fs::read(p("d/kept")).unwrap(),
        b"kept",
        "a rename was undone"
    );
    assert_eq!(
        fs::read(p("d/replaced")).unwrap(),
        b"old",
        "a replaced file came back"
    );

    fs::remove_file(p("d/kept")).unwrap();
    m.control("cut");
    assert_eq!(
        fs::read(p("d/kept")).unwrap(),
        b"kept",
        "an unlink was undone"
    );
    fs::remove_file(p("d/kept")).unwrap();
    sync_dir("d");
    m.control("cut");
    assert!(!p("d/kept").exists(), "a durable unlink stays");
}
