//! SPEC §6, a full disk: below `--min-free-disk` submissions get 507 and
//! nothing is stored; status, responses and execution go on; submissions
//! are accepted again by themselves once space is back. The data dir is a
//! small tmpfs the test mounts, so this needs root: in CI (`CI=true`) a
//! missing prerequisite fails the test, elsewhere it is skipped loudly.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::helpers::*;

/// A tmpfs mounted for the test; unmounted on drop, also when it fails.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(Tmpfs(dir.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(ok.success(), "remount");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Mounts a tmpfs, or says why the test cannot run: a failure in CI, a
/// loud skip elsewhere.
fn tmpfs_or_skip(dir: &Path, size: &str) -> Option<Tmpfs> {
    match Tmpfs::mount(dir, size) {
        Ok(t) => Some(t),
        Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI requires root and tmpfs for the full-disk test: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED disk::*: cannot mount a tmpfs (needs root): {why}");
            None
        }
    }
}

fn free_bytes(dir: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap()
}

#[actix_web::test]
async fn below_the_reserve_submissions_get_507_and_come_back_with_space() {
    if crate::backend::embedded_only("the data dir's free space (PostgreSQL's disk is its own)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = tmpfs_or_skip(dir.path(), "64m") else {
        return;
    };
    let up = Fake::start().await;
    let data = tempfile::TempDir::new_in(dir.path()).unwrap();
    let app = TestApp::start_in(&up.url(), &["--min-free-disk", "16MiB"], data).await;
    let before = app.submit("POST", "/async_api/v2/before", &[], b"{}").await;
    app.wait_for_status(&before, None, "done", SECS(10)).await;
    // Fill the file system to 8 MiB short of the reserve.
    let filler = dir.path().join("filler");
    let fill = free_bytes(dir.path()).saturating_sub(8 << 20);
    std::fs::write(&filler, vec![0u8; fill as usize]).unwrap();
    let refused = app.call("POST", "/async_api/v2/refused", &[], b"{}").await;
    assert_eq!(refused.status, 507, "{refused:?}");
    assert_eq!(refused.json()["error"]["code"], "insufficient_storage");
    // The reserve keeps reads working.
    assert_eq!(app.status(&before, None).await.status, 303);
    assert_eq!(app.response(&before, None).await.status, 200);
    assert_eq!(app.call("GET", "/healthz", &[], b"").await.status, 200);
    assert_eq!(
        up.seen().len(),
        1,
        "the refused submission was never stored nor sent"
    );
    // More room: accepted again, by itself.
    fs.resize("128m");
    let after = app.submit("POST", "/async_api/v2/after", &[], b"{}").await;
    app.wait_for_status(&after, None, "done", SECS(10)).await;
    app.stop().await;
}
