//! SPEC §12: several gateway nodes on one PostgreSQL database. Each node is
//! the real binary with a data dir of its own (its identity) and the
//! cluster's one `--store`, `--credential-key-file` and a 3 s
//! `--node-heartbeat-timeout`. These tests only mean something on
//! PostgreSQL: on the embedded store they say so and pass (they run in
//! `tools/test`'s PostgreSQL pass). Timing bounds are generous: 2 cores run
//! three nodes, PostgreSQL and the fake upstream. When a test fails, the
//! tail of every node's log is printed.

mod crash;
mod fence;
mod shared;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::SECS;
use crate::process::{Proc, free_port};

/// `--node-heartbeat-timeout` of every node here (heartbeats every 750 ms).
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);

/// The test's own database on the PostgreSQL pass's cluster; `None`, said
/// on stderr, on the embedded pass (and a failure in the PostgreSQL pass
/// without a cluster).
pub fn database(test: &str) -> Option<String> {
    if crate::backend::postgres().is_none() {
        let required = std::env::var("ASYNCGATE_TEST_PASS").is_ok_and(|p| p == "postgres");
        assert!(!required, "{test}: the PostgreSQL pass has no cluster");
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED on the embedded store (runs in the PostgreSQL pass): {test}: \
             several nodes on one PostgreSQL database"
        );
        return None;
    }
    crate::backend::shared_database(test)
}

/// Nodes of one cluster: one database, one key file, one upstream, a data
/// dir and a log file per node name in a temporary dir.
pub struct Cluster {
    dir: tempfile::TempDir,
    pub db: String,
    upstream: String,
    extra: Vec<String>,
    names: RefCell<Vec<String>>,
}

impl Cluster {
    pub fn new(db: String, upstream: &str, extra: &[&str]) -> Cluster {
        Cluster {
            dir: tempfile::tempdir().expect("a temporary dir"),
            db,
            upstream: upstream.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            names: RefCell::default(),
        }
    }

    /// Starts node `name` (again: the same node coming back) and waits
    /// until its `/healthz` answers 200.
    pub async fn start(&self, name: &str) -> Proc {
        self.start_with(name, &[]).await
    }

    /// `start` with flags of this node's only.
    pub async fn start_with(&self, name: &str, more: &[&str]) -> Proc {
        if !self.names.borrow().iter().any(|n| n == name) {
            self.names.borrow_mut().push(name.to_string());
        }
        let port = free_port();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(name))
            .expect("the node's log file opens");
        let child = Command::new(env!("CARGO_BIN_EXE_asyncgate"))
            .args(["serve", "--upstream", &self.upstream])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(self.dir.path().join(name))
            .args(["--store", &self.db])
            .arg("--credential-key-file")
            .arg(self.dir.path().join("credentials.key"))
            .args(["--node-heartbeat-timeout", "3s"])
            .args(&self.extra)
            .args(more)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the gateway's binary runs");
        let mut p = Proc {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let client = awc::Client::default();
        let deadline = Instant::now() + SECS(60);
        loop {
            if let Ok(res) = client.get(format!("{}/healthz", p.base)).send().await
                && res.status().is_success()
            {
                return p;
            }
            if let Some(status) = p.child.try_wait().expect("the node's status") {
                panic!("node {name} exited at start ({status})");
            }
            assert!(Instant::now() < deadline, "node {name} did not come up");
            actix_web::rt::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// The last `lines` lines of node `name`'s log.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log(name)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// A failed test shows what the nodes said (their logs go with the dir).
impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for name in self.names.borrow().iter() {
                let _ = writeln!(
                    std::io::stderr(),
                    "--- node {name}'s log, last 60 lines ---\n{}",
                    self.log_tail(name, 60)
                );
            }
        }
    }
}

/// What the database's sessions are doing (for a failure's message): a
/// node stopped inside a transaction shows as `idle in transaction`, and
/// whatever waits on its locks as `Lock`.
pub fn sessions(db: &str) -> String {
    let sql = "SELECT pid, state, wait_event_type, wait_event, \
               date_trunc('second', now() - xact_start), left(query, 160) \
               FROM pg_stat_activity WHERE datname = current_database() \
               AND pid <> pg_backend_pid() AND state <> 'idle'";
    match Command::new("psql").args([db, "-XAtq", "-c", sql]).output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
        Err(e) => format!("psql: {e}"),
    }
}

pub fn client() -> awc::Client {
    awc::Client::builder()
        .disable_redirects()
        .timeout(SECS(30))
        .finish()
}

/// Submits `method path` as `token` with `X-Test-Key: key` (the key is the
/// body too) and more headers; the id if the answer was 202.
pub async fn submit(
    client: &awc::Client,
    base: &str,
    method: &str,
    path: &str,
    token: &str,
    key: &str,
    more: &[(&str, &str)],
) -> Option<String> {
    let mut req = client
        .request(method.parse().expect("a method"), format!("{base}{path}"))
        .insert_header(("Authorization", token))
        .insert_header(("X-Test-Key", key));
    for h in more {
        req = req.insert_header(*h);
    }
    let mut res = req.send_body(key.to_string()).await.ok()?;
    if res.status().as_u16() != 202 {
        return None;
    }
    let v: Value = res.json().await.ok()?;
    Some(v["id"].as_str()?.to_string())
}

/// The status views of `ids` on node `base` as `token` sees them (bulk
/// status, SPEC §10), by id; ids it does not find are absent.
pub async fn views(
    client: &awc::Client,
    base: &str,
    token: &str,
    ids: &[String],
) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    for chunk in ids.chunks(1000) {
        let body = serde_json::json!({ "ids": chunk }).to_string();
        let mut res = client
            .post(format!("{base}/async_api/v2/requests.json"))
            .insert_header(("Authorization", token))
            .insert_header(("Content-Type", "application/json"))
            .send_body(body)
            .await
            .expect("bulk status answers");
        assert_eq!(res.status().as_u16(), 200, "bulk status on {base}");
        let v: Value = res.json().limit(64 << 20).await.expect("bulk JSON");
        for item in v["items"].as_array().expect("items") {
            let id = item["id"].as_str().expect("an id").to_string();
            out.insert(id, item.clone());
        }
    }
    out
}

/// The stored response of `id` on `base`: (HTTP code, body).
pub async fn response(client: &awc::Client, base: &str, id: &str, token: &str) -> (u16, Vec<u8>) {
    let mut res = client
        .get(format!("{base}/async_api/v2/responses/{id}.json"))
        .insert_header(("Authorization", token))
        .send()
        .await
        .expect("the response endpoint answers");
    let body = res.body().await.expect("a body").to_vec();
    (res.status().as_u16(), body)
}

pub fn finished(view: &Value) -> bool {
    view["status"] == "done" || view["status"] == "unknown"
}

/// A status view less its callback's progress (which goes on after the
/// request is settled): what must never change once settled.
pub fn outcome(view: Option<&Value>) -> Option<Value> {
    let mut v = view?.clone();
    v.as_object_mut()?.remove("callback");
    Some(v)
}

/// The running node that sent the most upstream in 300 ms, by its own
/// count of upstream exchanges: the first that sent 3 or more (it has
/// some in flight, most likely), or the busiest of 10 looks.
pub async fn busiest(nodes: &[Option<Proc>]) -> usize {
    let client = client();
    let sent = |base: String| {
        let client = client.clone();
        async move {
            let mut res =
                (client.get(format!("{base}/metrics")).send().await).expect("the node's metrics");
            let text = String::from_utf8_lossy(&res.body().await.expect("metrics")).into_owned();
            text.lines()
                .find_map(|l| l.strip_prefix("asyncgate_upstream_latency_seconds_count "))
                .and_then(|n| n.trim().parse::<u64>().ok())
                .expect("asyncgate_upstream_latency_seconds_count")
        }
    };
    let running: Vec<(usize, &Proc)> = (nodes.iter().enumerate())
        .filter_map(|(i, p)| Some((i, p.as_ref()?)))
        .collect();
    let mut best = (running[0].0, 0);
    for _ in 0..10 {
        let mut before = Vec::new();
        for (_, p) in &running {
            before.push(sent(p.base.clone()).await);
        }
        actix_web::rt::time::sleep(Duration::from_millis(300)).await;
        for ((i, p), was) in running.iter().zip(before) {
            let delta = sent(p.base.clone()).await - was;
            if delta > best.1 {
                best = (*i, delta);
            }
        }
        if best.1 >= 3 {
            break;
        }
    }
    println!("the busiest node sent {} upstream in 300 ms", best.1);
    best.0
}
