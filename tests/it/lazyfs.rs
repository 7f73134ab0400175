//! The harness for power-cut tests: mounts `tools/lazyfs` (a LazyFS-style
//! FUSE file system: writes stay in memory until fsync'd, `cut` drops the
//! rest) over a temporary backing directory, and runs the real gateway with
//! its data dir inside the mount.
//!
//! They need root, /dev/fuse and `fusermount3` (Debian: `fuse3`). With
//! `CI=true` a missing prerequisite fails the test; elsewhere the test
//! prints a SKIPPED line and passes.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::helpers::SECS;
use crate::process::{Proc, free_port};

fn prerequisites() -> Result<(), String> {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    if euid != "0" {
        return Err(format!("not root (euid {euid})"));
    }
    if !Path::new("/dev/fuse").exists() {
        return Err("/dev/fuse is missing".into());
    }
    let helper = Command::new("fusermount3").arg("-V").output();
    if !helper.is_ok_and(|o| o.status.success()) {
        return Err("fusermount3 is missing (apt-get install fuse3)".into());
    }
    Ok(())
}

/// Builds lazyfs next to the test binary (once per run) and returns it.
/// Cargo builds only the tested package's own binaries for its tests.
fn lazyfs_bin() -> Result<PathBuf, String> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        // <target>/<profile>/deps/it-<hash>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .ok_or("no profile dir")?;
        let target_dir = profile_dir.parent().ok_or("no target dir")?;
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--quiet", "-p", "lazyfs", "--manifest-path"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .arg("--target-dir")
            .arg(target_dir);
        match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => {}
            Some("release") => {
                cmd.arg("--release");
            }
            Some(other) => {
                cmd.args(["--profile", other]);
            }
            None => return Err("no profile name".into()),
        }
        let out = cmd.output().map_err(|e| format!("cargo: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cargo build -p lazyfs failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(profile_dir.join("lazyfs"))
    })
    .clone()
}

/// A mounted lazyfs; dropping it unmounts and stops it, also when a test
/// fails half way.
pub struct Mount {
    child: Child,
    pub mnt: PathBuf,
    pub dir: tempfile::TempDir,
}

/// Mounts lazyfs, or says why not: `None` means skip (outside CI).
pub fn mount_or_skip(test: &str, strict: bool) -> Option<Mount> {
    if crate::backend::embedded_only(&format!("{test}: the embedded store's files on lazyfs")) {
        return None;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let ready = prerequisites().and_then(|()| lazyfs_bin());
    match ready {
        Ok(bin) => Some(Mount::start(&bin, strict).unwrap_or_else(|e| panic!("{test}: {e}"))),
        Err(why) if ci => panic!("{test}: power-cut tests are required in CI: {why}"),
        Err(why) => {
            // Straight to the stream: libtest would capture eprintln! of a
            // passing test, and a skip must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: {why} (needs root, /dev/fuse and fusermount3)"
            );
            None
        }
    }
}

impl Mount {
    fn start(bin: &Path, strict: bool) -> Result<Mount, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let (backing, mnt) = (dir.path().join("backing"), dir.path().join("mnt"));
        for d in [&backing, &mnt] {
            fs::create_dir(d).map_err(|e| e.to_string())?;
        }
        let log = fs::File::create(dir.path().join("lazyfs.log")).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(bin);
        cmd.arg("--die-with-parent");
        if strict {
            cmd.arg("--strict");
        }
        let child = cmd
            .arg(&backing)
            .arg(&mnt)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting lazyfs: {e}"))?;
        let mut m = Mount { child, mnt, dir };
        let deadline = Instant::now() + SECS(10);
        while !m.mnt.join(".lazyfs").exists() {
            if let Ok(Some(status)) = m.child.try_wait() {
                return Err(format!("lazyfs exited ({status}): {}", m.log()));
            }
            if Instant::now() > deadline {
                return Err(format!("lazyfs did not mount: {}", m.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(m)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("lazyfs.log")).unwrap_or_default()
    }

    /// Runs control commands (see tools/lazyfs/src/control.rs).
    pub fn control(&self, commands: &str) {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(self.mnt.join(".lazyfs"))
            .expect("opening the control file");
        f.write_all(commands.as_bytes())
            .unwrap_or_else(|e| panic!("lazyfs refused {commands:?}: {e}"));
    }

    pub fn status(&self) -> String {
        fs::read_to_string(self.mnt.join(".lazyfs")).unwrap_or_default()
    }

    /// Per file (mount-relative path): bytes written and not fsync'd, which
    /// a cut now would drop.
    pub fn unsynced_files(&self) -> Vec<(u64, String)> {
        self.status()
            .lines()
            .filter_map(|l| l.strip_prefix("unsynced "))
            .filter_map(|l| l.split_once(' '))
            .filter_map(|(n, path)| Some((n.parse().ok()?, path.to_string())))
            .collect()
    }

    /// Writes the cycle's canary pair: one file fsync'd, one not.
    pub fn lay_canaries(&self, n: usize) {
        let dir = self.mnt.join("canary");
        fs::create_dir_all(&dir).unwrap();
        // Durable names first (strict mode loses entries of unsynced dirs).
        fs::File::open(&self.mnt).unwrap().sync_all().unwrap();
        let synced = dir.join(format!("synced-{n}"));
        let mut f = fs::File::create(&synced).unwrap();
        f.write_all(canary_bytes(n, true).as_slice()).unwrap();
        f.sync_all().unwrap();
        fs::File::open(&dir).unwrap().sync_all().unwrap();
        fs::write(dir.join(format!("unsynced-{n}")), canary_bytes(n, false)).unwrap();
    }

    /// After a cut, read by a fresh process: the fsync'd canary is whole,
    /// the other one's bytes are gone. A failure means the harness, not the
    /// gateway, is broken.
    pub fn check_canaries(&self, n: usize) {
        let read = |name: String| {
            Command::new("cat")
                .arg(self.mnt.join("canary").join(name))
                .output()
                .expect("running cat")
                .stdout
        };
        assert_eq!(
            read(format!("synced-{n}")),
            canary_bytes(n, true),
            "harness broken: an fsync'd file did not survive cut {n}"
        );
        assert!(
            read(format!("unsynced-{n}")).is_empty(),
            "harness broken: unsynced bytes survived cut {n}"
        );
    }
}

fn canary_bytes(n: usize, synced: bool) -> Vec<u8> {
    format!("canary {n} {synced}\n").repeat(300).into_bytes()
}

impl Drop for Mount {
    fn drop(&mut self) {
        // Lazily: a gateway still holding files must not keep it mounted.
        let detached = Command::new("fusermount3")
            .args(["-u", "-z"])
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !detached {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Starts the gateway binary over the mount; an error carries its log's
/// tail (a gateway that cannot start after a cut is a finding).
pub async fn start_gateway(
    upstream: &str,
    mount: &Mount,
    log: &Path,
    extra: &[&str],
) -> Result<Proc, String> {
    let port = free_port();
    let log_file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| e.to_string())?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_asyncgate"))
        .args(["serve", "--upstream", upstream])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(mount.mnt.join("data"))
        .arg("--credential-key-file")
        .arg(mount.mnt.join("key"))
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .map_err(|e| e.to_string())?;
    let base = format!("http://127.0.0.1:{port}");
    let client = awc::Client::default();
    let deadline = Instant::now() + SECS(30);
    loop {
        if let Ok(res) = client.get(format!("{base}/healthz")).send().await
            && res.status().is_success()
        {
            return Ok(Proc { child, base });
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the gateway exited ({status}): {}", tail(log)));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!("the gateway did not come up: {}", tail(log)));
        }
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The last lines of a log, for failure messages.
pub fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Stored requests by status, from `/metrics`.
pub async fn depth(base: &str) -> Result<Vec<(String, u64)>, String> {
    let mut res = awc::Client::default()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let body = res.body().await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&body).into_owned();
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("asyncgate_requests{status=\""))
        .filter_map(|l| l.split_once("\"} "))
        .filter_map(|(s, n)| Some((s.to_string(), n.trim().parse().ok()?)))
        .collect())
}

/// Waits until nothing is `enqueued` or `started`; false at the deadline.
pub async fn drained(base: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(d) = depth(base).await
            && d.iter()
                .all(|(s, n)| *n == 0 || (s != "enqueued" && s != "started"))
        {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
}
