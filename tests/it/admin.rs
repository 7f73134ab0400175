//! SPEC §8 admin API and §9 credentials at rest.

use std::process::Command;
use std::time::Duration;

use crate::helpers::*;

const ADMIN: &str = "Bearer admin-secret";

/// `asyncgate admin --url <app> --admin-token <token> <args>`.
fn admin_cli(app: &TestApp, token: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_asyncgate"))
        .args(["admin", "--url", &app.url(""), "--admin-token", token])
        .args(args)
        .output()
        .unwrap()
}

/// One admin call with the right token.
async fn admin(app: &TestApp, method: &str, path: &str) -> Answer {
    app.call(method, path, &[("Authorization", ADMIN)], b"")
        .await
}

#[actix_web::test]
async fn the_admin_api_is_absent_without_a_token() {
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &[]).await;
    let a = admin(&app, "GET", "/admin/requests?status=unknown").await;
    assert_eq!(a.status, 404);
    app.stop().await;
}

#[actix_web::test]
async fn operators_list_requeue_and_delete_unknown_requests() {
    // /hang hangs past the timeout once; /refuse is always rate-limited.
    let up = Fake::start().await;
    let probe = up.clone();
    up.set(move |req, _| {
        let earlier = probe.seen().iter().filter(|s| s.uri == req.uri).count();
        if req.uri.contains("refuse") {
            Reply::status(429).header("Retry-After", b"60")
        } else if earlier <= 1 {
            Reply::ok("late").delay(SECS(3))
        } else {
            Reply::ok("second run")
        }
    });
    let app = TestApp::start(
        &up.url(),
        &["--admin-token", "admin-secret", "--upstream-timeout", "1s"],
    )
    .await;
    let owner = [("Authorization", "Bearer owner")];
    let lost = app
        .submit("POST", "/async_api/v2/hang?x=1", &owner, b"")
        .await;
    app.wait_for_status(&lost, Some("Bearer owner"), "unknown", SECS(10))
        .await;
    let waiting = app
        .submit_as("POST", "/async_api/v2/refuse", "Bearer other")
        .await;
    up.wait_for(2, SECS(10)).await;
    // Refused (429): back in its queue once the refusal is recorded.
    app.wait_for_status(&waiting, Some("Bearer other"), "enqueued", SECS(10))
        .await;

    for bad in [
        vec![],
        vec![("Authorization", "Bearer wrong")],
        vec![("Authorization", "admin-secret")],
    ] {
        let a = app.call("GET", "/admin/requests", &bad, b"").await;
        assert_eq!(a.status, 401, "{bad:?}");
        assert_eq!(a.json()["error"]["code"], "unauthorized");
    }
    let list = admin(&app, "GET", "/admin/requests?status=unknown&limit=10").await;
    assert_eq!(list.status, 200);
    let v = list.json();
    assert_eq!(v["next"], serde_json::Value::Null);
    let item = &v["items"][0];
    assert_eq!(item["id"], lost.as_str());
    assert_eq!(item["method"], "POST");
    assert_eq!(item["path"], "/async_api/v2/hang");
    assert!(
        item["started"].is_string() && item["created"].is_string(),
        "{item}"
    );
    let bad = admin(&app, "GET", "/admin/requests?status=lost").await;
    assert_eq!(bad.status, 400);

    // Paging: one at a time over the enqueued and unknown ones.
    let page = admin(&app, "GET", "/admin/requests?status=enqueued&limit=1").await;
    assert_eq!(page.json()["items"][0]["id"], waiting.as_str());
    let next = page.json()["next"].as_str().unwrap().to_string();
    let after = admin(
        &app,
        "GET",
        &format!("/admin/requests?status=enqueued&limit=1&after={next}"),
    )
    .await;
    assert_eq!(after.json()["items"].as_array().unwrap().len(), 0);

    // Conflicts: a waiting request can be neither deleted nor requeued.
    let del = admin(&app, "DELETE", &format!("/admin/requests/{waiting}")).await;
    assert_eq!(del.status, 409);
    let rq = admin(&app, "POST", &format!("/admin/requests/{waiting}/requeue")).await;
    assert_eq!(rq.status, 409);
    let none = admin(
        &app,
        "POST",
        "/admin/requests/01JDQ8M3Z1X4A6QF0W3N9YB2KD/requeue",
    )
    .await;
    assert_eq!(none.status, 404);

    // Requeue: it runs once more, with its original credential.
    let rq = admin(&app, "POST", &format!("/admin/requests/{lost}/requeue")).await;
    assert_eq!(rq.status, 202);
    app.wait_for_status(&lost, Some("Bearer owner"), "done", SECS(10))
        .await;
    assert_eq!(
        app.response(&lost, Some("Bearer owner")).await.body,
        b"second run"
    );
    let runs: Vec<_> = up
        .seen()
        .into_iter()
        .filter(|s| s.uri == "/api/v2/hang?x=1")
        .collect();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1].header("authorization"), Some("Bearer owner"));
    let again = admin(&app, "POST", &format!("/admin/requests/{lost}/requeue")).await;
    assert_eq!(again.status, 409, "only unknown requests are requeued");

    // The CLI drives the same API.
    let cli = admin_cli(&app, "admin-secret", &["list", "--status", "done"]);
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&cli.stdout).unwrap();
    assert_eq!(listed["items"][0]["id"], lost.as_str());
    let cli = admin_cli(&app, "admin-secret", &["delete", &lost]);
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    assert_eq!(app.status(&lost, Some("Bearer owner")).await.status, 404);
    assert_eq!(app.response(&lost, Some("Bearer owner")).await.status, 404);
    let cli = admin_cli(&app, "wrong", &["list"]);
    assert!(!cli.status.success(), "a refused call exits non-zero");
    app.stop().await;
}

/// Every byte of every file under `dir`.
fn all_bytes(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(all_bytes(&p));
        } else if let Ok(bytes) = std::fs::read(&p) {
            // (sled replaces snapshot files as it goes: one may vanish)
            out.push((p.display().to_string(), bytes));
        }
    }
    out
}

fn assert_absent(dir: &std::path::Path, secret: &[u8], when: &str) {
    for (file, bytes) in all_bytes(dir) {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret),
            "{when}: the credential is in {file} in plain text"
        );
    }
}

#[actix_web::test]
async fn credentials_never_reach_the_disk_in_plain_text() {
    let secret = "Bearer SUPERSECRETTOKEN-7f3a9";
    let up = Fake::start_with(|_, _| Reply::ok("ok").delay(Duration::from_millis(1500))).await;
    let app = TestApp::start(&up.url(), &[]).await;
    let id = app
        .submit(
            "POST",
            "/async_api/v2/x.json",
            &[("Authorization", secret)],
            b"payload",
        )
        .await;
    app.wait_for_status(&id, Some(secret), "started", SECS(10))
        .await;
    assert_absent(app.data_dir.path(), secret.as_bytes(), "while started");
    assert_not_in_database(&app, secret, "while started");
    app.wait_for_status(&id, Some(secret), "done", SECS(10))
        .await;
    assert_eq!(
        up.seen()[0].header("authorization"),
        Some(secret),
        "unsealed for the upstream"
    );
    assert_not_in_database(&app, secret, "once done");
    let dir = app.data_dir.path().to_path_buf();
    app.stop().await;
    assert_absent(&dir, secret.as_bytes(), "after done and a clean stop");
}

/// On PostgreSQL: neither the secret nor its hex (bytea's text form) is in
/// the database.
fn assert_not_in_database(app: &TestApp, secret: &str, when: &str) {
    let Some(dump) = crate::backend::database_dump(&app.data_dir.path().join("data")) else {
        return;
    };
    let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
    assert!(dump.contains("COPY public.requests"), "a dump of the store");
    assert!(
        !dump.contains(secret),
        "the credential in the database {when}"
    );
    assert!(
        !dump.contains(&hex),
        "the credential (hex) in the database {when}"
    );
}

#[test]
fn a_missing_key_file_with_sealed_credentials_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let args = parse_args("http://127.0.0.1:9", dir.path(), &[]);
    actix_web::rt::System::new().block_on(async {
        let app = asyncgate::app::start(&args.upstream, &args.gateway)
            .await
            .unwrap();
        let client = awc::Client::default();
        let res = client
            .post(format!("http://{}/async_api/v2/x", app.addr))
            .insert_header(("Authorization", "Bearer t"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 202);
        app.stop().await.unwrap();
    });
    std::fs::remove_file(args.gateway.key_file()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_asyncgate"))
        .args([
            "serve",
            "--upstream",
            "http://127.0.0.1:9",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&args.gateway.data_dir)
        .args(crate::backend::store_flags(&args.gateway.data_dir))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("key file") && err.contains("missing"), "{err}");
}
