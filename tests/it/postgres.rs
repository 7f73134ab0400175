//! What only the PostgreSQL store has (SPEC §12): its schema, one process
//! per node, its commits, its connections' ends. They run
//! in the suite's PostgreSQL pass (`tools/test`); without a cluster they
//! skip, saying so, except in that pass, where a missing one fails them.

use std::io::Write;
use std::process::Command;

use crate::backend::{self, psql};
use crate::helpers::*;

/// The data dir's database URL, or `None` (said loudly) without a cluster.
fn database(dir: &std::path::Path, test: &str) -> Option<String> {
    if backend::postgres().is_none() {
        let required = std::env::var("ASYNCGATE_TEST_PASS").is_ok_and(|p| p == "postgres");
        assert!(!required, "{test}: the PostgreSQL pass has no cluster");
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: needs PostgreSQL (tools/test runs it)"
        );
        return None;
    }
    backend::store_flags(dir).pop()
}

/// `asyncgate serve` on `url` until it exits (or 30 s pass).
fn serve_to_exit(dir: &std::path::Path, url: &str) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_asyncgate"))
        .args(["serve", "--upstream", "http://127.0.0.1:9"])
        .args(["--listen", "127.0.0.1:0", "--store", url])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + SECS(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[actix_web::test]
async fn a_submission_is_committed_before_its_202() {
    let dir = tempfile::tempdir().unwrap();
    let Some(url) = database(
        &dir.path().join("data"),
        "a_submission_is_committed_before_its_202",
    ) else {
        return;
    };
    let app = TestApp::start_in("http://127.0.0.1:9", &[], dir).await;
    let id = app
        .submit("POST", "/async_api/v2/x.json", &[], b"{\"a\": 1}")
        .await;
    // Read by another connection the moment the 202 is in: committed
    // (queued, or in a try against the closed port).
    let hex = ulid_hex(&id);
    let row = psql(
        &url,
        &format!(
            "SELECT status IN (0, 1), convert_from(body, 'UTF8') FROM requests WHERE id = '\\x{hex}'"
        ),
    );
    assert_eq!(row, "t|{\"a\": 1}");
    assert_eq!(psql(&url, "SHOW synchronous_commit"), "on");
    app.stop().await;
}

#[actix_web::test]
async fn a_second_process_of_one_node_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let Some(url) = database(
        &dir.path().join("data"),
        "a_second_process_of_one_node_is_refused",
    ) else {
        return;
    };
    // A node is its data dir (its name is kept there): a second process on
    // it would be a second life of a node still alive.
    let same = dir.path().to_path_buf();
    let app = TestApp::start_in("http://127.0.0.1:9", &[], dir).await;
    let (ok, stderr) = serve_to_exit(&same, &url);
    assert!(!ok, "a second process of the node ran: {stderr}");
    assert!(
        stderr.contains("in use by another running gateway"),
        "{stderr}"
    );
    app.stop().await;
}

#[actix_web::test]
async fn a_node_whose_key_file_is_not_the_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let Some(url) = database(
        &dir.path().join("data"),
        "a_node_whose_key_file_is_not_the_others_is_refused",
    ) else {
        return;
    };
    let app = TestApp::start_in("http://127.0.0.1:9", &[], dir).await;
    // Another node (its own data dir) with no key file: it does not make
    // one, the first node's canary says a key exists...
    let other = tempfile::tempdir().unwrap();
    let (ok, stderr) = serve_to_exit(other.path(), &url);
    assert!(!ok, "a node without the key ran: {stderr}");
    assert!(stderr.contains("is missing"), "{stderr}");
    // ...and with a key of its own, it would seal credentials the first
    // could not open.
    std::fs::write(other.path().join("data.key"), [7u8; 32]).unwrap();
    let (ok, stderr) = serve_to_exit(other.path(), &url);
    assert!(!ok, "a node with another key ran: {stderr}");
    assert!(
        stderr.contains("not the key of the other nodes"),
        "{stderr}"
    );
    app.stop().await;
}

#[actix_web::test]
async fn a_database_of_a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let Some(url) = database(
        &dir.path().join("data"),
        "a_database_of_a_newer_schema_is_refused",
    ) else {
        return;
    };
    // Made and migrated by a first start.
    let app = TestApp::start_in("http://127.0.0.1:9", &[], dir).await;
    let dir = {
        let mut app = app;
        app.running.take().unwrap().stop().await.unwrap();
        app.data_dir
    };
    psql(&url, "INSERT INTO asyncgate_schema (version) VALUES (999)");
    let (ok, stderr) = serve_to_exit(dir.path(), &url);
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("schema version 999"), "{stderr}");
}

/// A request id (ULID text) as the hex of its 16 bytes.
fn ulid_hex(id: &str) -> String {
    let n = ulid::Ulid::from_string(id).expect("an id").0;
    format!("{n:032x}")
}

#[actix_web::test]
async fn the_database_ending_every_connection_loses_nothing_and_the_gateway_carries_on() {
    let (_dir, data, log) = crate::process::data_and_log();
    let test = "the_database_ending_every_connection_loses_nothing_and_the_gateway_carries_on";
    let Some(url) = database(&data, test) else {
        return;
    };
    let up = Fake::start_with(|_, _| Reply::status(429).header("Retry-After", b"3600")).await;
    let p = crate::process::Proc::start(&up.url(), &data, &log, &[]).await;
    let client = awc::Client::default();
    let submit = |n: u32| {
        let req = client
            .post(format!("{}/async_api/v2/kept.json", p.base))
            .insert_header(("Authorization", "Bearer kept"));
        async move {
            let mut res = req.send_body(format!("{{\"n\": {n}}}")).await.unwrap();
            (res.status().as_u16(), res.json::<serde_json::Value>().await)
        }
    };
    let (code, first) = submit(1).await;
    assert_eq!(code, 202);
    let id = first.unwrap()["id"].as_str().unwrap().to_string();
    // Every connection of the gateway's, its listening one too, is ended
    // by the server (a restart, a failover would do the same).
    let (_, name) = url.rsplit_once('/').unwrap();
    psql(
        &url.replace(name, "postgres"),
        &format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = '{name}' AND pid <> pg_backend_pid()"
        ),
    );
    // The gateway connects again and carries on: the next submission is
    // accepted (a 503 meanwhile at most), the first is still there.
    let deadline = std::time::Instant::now() + SECS(20);
    loop {
        let (code, _) = submit(2).await;
        if code == 202 {
            break;
        }
        assert_eq!(code, 503, "only a 503 while reconnecting");
        assert!(std::time::Instant::now() < deadline, "never reconnected");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let mut res = client
        .get(format!("{}/async_api/v2/requests/{id}.json", p.base))
        .insert_header(("Authorization", "Bearer kept"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let s = res.json::<serde_json::Value>().await.unwrap();
    assert!(s["status"] == "enqueued" || s["status"] == "started", "{s}");
    p.kill9();
}

/// A claim whose commit landed but whose answer was lost (a connection
/// dropped at the commit) left its request `started` by this life with no
/// attempt holding it: the life's own check puts it back in its lane, once
/// it is older than any attempt's claim round, and it runs once. A request
/// an attempt still holds (in flight past the same age) is left alone.
#[actix_web::test]
async fn a_claim_whose_answer_was_lost_runs_once_and_one_in_flight_is_left_alone() {
    let (_dir, data, log) = crate::process::data_and_log();
    let test = "a_claim_whose_answer_was_lost_runs_once_and_one_in_flight_is_left_alone";
    let Some(url) = database(&data, test) else {
        return;
    };
    // The first POST is held past the orphan age (10 s) while in flight.
    let up = Fake::start_with(|seen, _| match seen.uri.as_str() {
        "/api/v2/held.json" => Reply::ok("held").delay(SECS(13)),
        _ => Reply::ok("lost"),
    })
    .await;
    let flags = ["--node-heartbeat-timeout", "3s"];
    let flags = [&flags[..], &["--per-credential-concurrency", "1"]].concat();
    let p = crate::process::Proc::start(&up.url(), &data, &log, &flags).await;
    let client = awc::Client::builder()
        .timeout(SECS(60))
        .disable_redirects()
        .finish();
    let submit = |path: &str| {
        let req = client
            .post(format!("{}/async_api/v2/{path}", p.base))
            .insert_header(("Authorization", "Bearer orphan"));
        async move {
            let mut res = req.send_body("{}").await.unwrap();
            assert_eq!(res.status().as_u16(), 202);
            let v = res.json::<serde_json::Value>().await.unwrap();
            v["id"].as_str().unwrap().to_string()
        }
    };
    let held = submit("held.json").await;
    up.wait_for(1, SECS(10)).await;
    // Queued behind the held one (one at a time), then made to look like
    // this life's claim whose answer never came: `started` a minute ago.
    let lost = submit("lost.json").await;
    let claimed = psql(
        &url,
        &format!(
            "UPDATE requests SET status = 1, claims = claims + 1, node = (SELECT id FROM nodes), \
             started_ms = (extract(epoch from now()) * 1000)::bigint - 60000 \
             WHERE id = decode('{}', 'hex') AND status = 0 RETURNING 1",
            ulid_hex(&lost)
        ),
    );
    assert_eq!(claimed, "1", "the second request was still queued");
    let done = |id: String| {
        let req = client
            .get(format!("{}/async_api/v2/requests/{id}.json", p.base))
            .insert_header(("Authorization", "Bearer orphan"))
            .insert_header(("Prefer", "wait=30"));
        async move {
            let mut res = req.send().await.unwrap();
            // A finished request's status answers 303 (SPEC §10).
            if res.status().as_u16() == 303 {
                return "done".to_string();
            }
            let v = res.json::<serde_json::Value>().await.unwrap();
            v["status"].as_str().unwrap_or_default().to_string()
        }
    };
    // Requeued within a check round or two, run after the held one.
    let started = std::time::Instant::now();
    assert_eq!(done(lost.clone()).await, "done", "{}", read_log(&log));
    assert!(
        started.elapsed() >= SECS(8),
        "the lost claim ran while the held one was in flight"
    );
    assert_eq!(
        done(held).await,
        "done",
        "the held POST is done, not unknown"
    );
    let paths: Vec<String> = up.seen().into_iter().map(|s| s.uri).collect();
    assert_eq!(
        paths,
        ["/api/v2/held.json", "/api/v2/lost.json"],
        "each once"
    );
    let log = read_log(&log);
    assert!(
        log.contains("1 claims of this node whose commit went unanswered are back"),
        "{log}"
    );
    p.kill9();
}

fn read_log(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A copy of a running node's data dir (a cloned VM, a restored backup)
/// names the same node: started beside it, it is refused, and says what
/// to do, rather than each taking the other for a previous life of its own.
#[actix_web::test]
async fn a_copy_of_a_running_nodes_data_dir_is_refused() {
    let test = "a_copy_of_a_running_nodes_data_dir_is_refused";
    let dir = tempfile::tempdir().unwrap();
    let Some(url) = database(&dir.path().join("data"), test) else {
        return;
    };
    let copy = tempfile::tempdir().unwrap();
    let app = TestApp::start_in("http://127.0.0.1:9", &[], dir).await;
    let data = app.data_dir.path().join("data");
    std::fs::create_dir(copy.path().join("data")).unwrap();
    std::fs::copy(data.join("node"), copy.path().join("data/node")).unwrap();
    let key = data.with_extension("key");
    std::fs::copy(&key, copy.path().join("data.key")).unwrap();
    let (ok, stderr) = serve_to_exit(copy.path(), &url);
    assert!(!ok, "the copy ran beside the node: {stderr}");
    assert!(stderr.contains("a copy of its data dir"), "{stderr}");
    app.stop().await;
}

/// A gateway of schema 1 (one per database, holding its advisory lock)
/// still running: a node of this version refuses to start, before it
/// migrates anything under it.
#[actix_web::test]
async fn a_database_a_schema_1_gateway_still_runs_on_is_refused() {
    let test = "a_database_a_schema_1_gateway_still_runs_on_is_refused";
    let dir = tempfile::tempdir().unwrap();
    let Some(url) = database(&dir.path().join("data"), test) else {
        return;
    };
    // The old gateway's lock, held by a session of its own.
    let lock = "SELECT pg_advisory_lock(x'6173796e63670002'::bigint)";
    let mut old = Command::new("psql")
        .args([&url, "-XAtq", "-c", lock, "-c", "SELECT pg_sleep(60)"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("psql runs");
    let held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";
    let deadline = std::time::Instant::now() + SECS(10);
    while psql(&url, held) == "0" {
        assert!(
            std::time::Instant::now() < deadline,
            "the lock was never taken"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (ok, stderr) = serve_to_exit(dir.path(), &url);
    let _ = old.kill();
    let _ = old.wait();
    assert!(!ok, "a node ran beside a schema-1 gateway: {stderr}");
    assert!(
        stderr.contains("in use by a gateway of an older version"),
        "{stderr}"
    );
    let tables = "SELECT count(*) FROM information_schema.tables WHERE table_name = 'nodes'";
    assert_eq!(psql(&url, tables), "0", "migrated under the old gateway");
}
