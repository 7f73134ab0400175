//! The real binary: graceful stops (SIGTERM/SIGINT) and the helper the
//! crash test uses to run and `kill -9` it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::*;

/// A running `asyncgate serve` process.
pub struct Proc {
    pub child: Child,
    pub base: String,
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

impl Proc {
    /// Starts the binary on a free port and waits until `/healthz` answers.
    pub async fn start(upstream: &str, data: &Path, log: &Path, extra: &[&str]) -> Proc {
        let port = free_port();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_asyncgate"))
            .args([
                "serve",
                "--upstream",
                upstream,
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .arg("--data-dir")
            .arg(data)
            .args(crate::backend::store_flags(data))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let client = awc::Client::default();
        let deadline = Instant::now() + SECS(30);
        loop {
            if let Ok(res) = client.get(format!("{base}/healthz")).send().await
                && res.status().is_success()
            {
                break;
            }
            assert!(Instant::now() < deadline, "the gateway did not come up");
            actix_web::rt::time::sleep(Duration::from_millis(20)).await;
        }
        Proc { child, base }
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Waits for the exit; returns whether it was 0 and how long it took.
    pub async fn wait_exit(mut self, within: Duration) -> (bool, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.success(), start.elapsed());
            }
            if start.elapsed() > within {
                let _ = self.child.kill();
                panic!("did not exit within {within:?}");
            }
            actix_web::rt::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A test that fails half way must not leave a gateway running.
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn data_and_log() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let log = dir.path().join("log");
    (dir, data, log)
}

async fn get_status(base: &str, id: &str) -> serde_json::Value {
    let client = awc::Client::builder().disable_redirects().finish();
    let mut res = client
        .get(format!("{base}/async_api/v2/requests/{id}.json"))
        .send()
        .await
        .unwrap();
    res.json().await.unwrap()
}

async fn post(base: &str, path: &str) -> String {
    let client = awc::Client::default();
    let mut res = client
        .post(format!("{base}{path}"))
        .send_body("x")
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 202);
    let v: serde_json::Value = res.json().await.unwrap();
    v["id"].as_str().unwrap().to_string()
}

#[actix_web::test]
async fn sigterm_lets_calls_in_flight_finish_then_exits_0() {
    let up = Fake::start_with(|_, _| Reply::ok("finished").delay(SECS(2))).await;
    let (_dir, data, log) = data_and_log();
    let p = Proc::start(&up.url(), &data, &log, &[]).await;
    let id = post(&p.base, "/async_api/v2/slow").await;
    up.wait_for(1, SECS(10)).await;
    p.signal("-TERM");
    let base = p.base.clone();
    let (ok, took) = p.wait_exit(SECS(20)).await;
    assert!(ok, "exit 0");
    assert!(
        took >= Duration::from_millis(1000),
        "it waited for the call: {took:?}"
    );
    assert!(
        awc::Client::default()
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_err(),
        "no longer listening"
    );
    let p = Proc::start(&up.url(), &data, &log, &[]).await;
    assert_eq!(
        get_status(&p.base, &id).await["status"],
        "done",
        "finished before the exit"
    );
    actix_web::rt::time::sleep(SECS(1)).await;
    assert_eq!(up.seen().len(), 1);
    p.kill9();
}

#[actix_web::test]
async fn calls_still_running_at_the_shutdown_deadline_are_recovered_on_start() {
    let up = Fake::start_with(|_, _| Reply::ok("too slow").delay(SECS(8))).await;
    let (_dir, data, log) = data_and_log();
    let p = Proc::start(&up.url(), &data, &log, &["--shutdown-timeout", "1s"]).await;
    let post_id = post(&p.base, "/async_api/v2/slow-post").await;
    up.wait_for(1, SECS(10)).await;
    p.signal("-INT");
    let (ok, took) = p.wait_exit(SECS(10)).await;
    assert!(ok, "SIGINT exits 0 too");
    assert!(took < SECS(6), "the deadline bounds the wait: {took:?}");
    up.set(|_, _| Reply::ok("fast"));
    let p = Proc::start(&up.url(), &data, &log, &[]).await;
    let s = get_status(&p.base, &post_id).await;
    assert_eq!(
        s["status"], "unknown",
        "a POST abandoned mid-flight may have run: {s}"
    );
    actix_web::rt::time::sleep(SECS(1)).await;
    assert_eq!(up.seen().len(), 1, "and is not sent again");
    p.kill9();
}

#[actix_web::test]
async fn a_data_dir_in_use_stops_a_second_gateway() {
    // PostgreSQL's counterpart: postgres::a_second_gateway_on_one_database_is_refused.
    if crate::backend::embedded_only("the data dir's lock") {
        return;
    }
    let up = Fake::start().await;
    let (_dir, data, log) = data_and_log();
    let p = Proc::start(&up.url(), &data, &log, &[]).await;
    let out = Command::new(env!("CARGO_BIN_EXE_asyncgate"))
        .args(["serve", "--upstream", &up.url(), "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another running gateway"), "{err}");
    p.kill9();
}
