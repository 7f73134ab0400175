//! SPEC §2–§3: execution, status views, and the stored response replayed.

use std::time::Duration;

use crate::helpers::*;

const AUTH: Option<&str> = Some("Bearer owner");

#[actix_web::test]
async fn done_is_303_with_the_contracts_fields_and_the_response_is_replayed() {
    let up = Fake::start_with(|_, _| {
        Reply::status(201)
            .header("Set-Cookie", b"a=1")
            .header("X-Thing", b"first")
            .header("Set-Cookie", b"b=2")
            .header("Content-Type", b"application/json")
            .body(b"{\"id\":42}")
            .delay(Duration::from_millis(30))
    })
    .await;
    let app = TestApp::start(&up.url(), &[]).await;
    let id = app
        .submit(
            "POST",
            "/async_api/v2/campaigns.json",
            &[("Authorization", "Bearer owner")],
            b"{}",
        )
        .await;
    let s = app.wait_for_status(&id, AUTH, "done", SECS(10)).await;
    assert_eq!(s.status, 303);
    let url = format!("/async_api/v2/responses/{id}.json");
    assert_eq!(s.header("location"), Some(url.as_str()));
    let v = s.json();
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["response_http_code"], 201);
    assert_eq!(v["response_url"], url.as_str());
    assert!(v["exec_time"].as_u64().unwrap() >= 30, "{v}");
    for f in ["started", "created"] {
        assert_eq!(v[f].as_str().unwrap().len(), 19, "{f}: {v}");
    }
    let mut keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "attempts",
            "created",
            "exec_time",
            "id",
            "response_http_code",
            "response_url",
            "started",
            "status"
        ]
    );

    let r = app.response(&id, AUTH).await;
    assert_eq!(r.status, 201);
    assert_eq!(r.body, b"{\"id\":42}");
    assert_eq!(r.header_values("set-cookie"), [b"a=1".as_slice(), b"b=2"]);
    assert_eq!(r.header("x-thing"), Some("first"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("content-length"), Some("9"));
    app.stop().await;
}

#[actix_web::test]
async fn bodies_stay_encoded_and_redirects_are_results() {
    // Not valid gzip on purpose: any attempt to decode it would fail.
    let gz: Vec<u8> = [0x1f, 0x8b, 0x08, 0x00]
        .iter()
        .copied()
        .chain((0..5000u32).map(|i| (i % 251) as u8))
        .collect();
    let body = gz.clone();
    let up = Fake::start_with(move |req, _| {
        if req.uri.contains("redirect") {
            Reply::status(302).header("Location", b"http://elsewhere.example/")
        } else {
            Reply::status(200)
                .header("Content-Encoding", b"gzip")
                .body(&body)
        }
    })
    .await;
    let app = TestApp::start(&up.url(), &[]).await;
    let id = app
        .submit_as("GET", "/async_api/v2/file", "Bearer owner")
        .await;
    app.wait_for_status(&id, AUTH, "done", SECS(10)).await;
    let r = app.response(&id, AUTH).await;
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert_eq!(r.body, gz, "byte for byte");

    let id = app
        .submit_as("POST", "/async_api/v2/redirect", "Bearer owner")
        .await;
    let s = app.wait_for_status(&id, AUTH, "done", SECS(10)).await;
    assert_eq!(s.json()["response_http_code"], 302);
    let r = app.response(&id, AUTH).await;
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("http://elsewhere.example/"));
    assert_eq!(up.seen().len(), 2, "the redirect was not followed");
    app.stop().await;
}

#[actix_web::test]
async fn upstream_errors_are_results() {
    let up = Fake::start_with(|_, _| Reply::status(500).body(b"boom")).await;
    let app = TestApp::start(&up.url(), &[]).await;
    let id = app
        .submit_as("POST", "/async_api/v2/x.json", "Bearer owner")
        .await;
    let s = app.wait_for_status(&id, AUTH, "done", SECS(10)).await;
    assert_eq!(s.json()["response_http_code"], 500);
    let r = app.response(&id, AUTH).await;
    assert_eq!((r.status, r.body.as_slice()), (500, b"boom".as_slice()));
    assert_eq!(up.seen().len(), 1, "a 500 is not retried");
    app.stop().await;
}

#[actix_web::test]
async fn responses_over_the_limit_are_not_kept() {
    let up = Fake::start_with(|_, _| Reply::ok(&"x".repeat(4096))).await;
    let app = TestApp::start(&up.url(), &["--max-response-size", "1KiB"]).await;
    let id = app
        .submit_as("GET", "/async_api/v2/big", "Bearer owner")
        .await;
    let s = app.wait_for_status(&id, AUTH, "done", SECS(10)).await;
    assert_eq!(s.json()["response_http_code"], 200);
    let r = app.response(&id, AUTH).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["error"]["code"], "response_too_large");
    app.stop().await;
}

#[actix_web::test]
async fn only_the_submitting_credential_sees_a_request() {
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &[]).await;
    let id = app
        .submit_as("GET", "/async_api/v2/x.json", "Bearer owner")
        .await;
    let anon = app.submit("GET", "/async_api/v2/y.json", &[], b"").await;
    app.wait_for_status(&id, AUTH, "done", SECS(10)).await;
    app.wait_for_status(&anon, None, "done", SECS(10)).await;
    assert_eq!(
        app.status(&id.to_lowercase(), AUTH).await.status,
        303,
        "lower-case ids work"
    );

    let not_found = app.status("01JDQ8M3Z1X4A6QF0W3N9YB2KD", AUTH).await;
    assert_eq!(not_found.status, 404);
    for (who, what) in [
        (Some("Bearer other"), id.as_str()),
        (Some("bearer owner"), id.as_str()),
        (None, id.as_str()),
        (Some("Bearer owner"), anon.as_str()),
        (Some("Bearer owner"), "not-an-id"),
    ] {
        for a in [app.status(what, who).await, app.response(what, who).await] {
            assert_eq!(a.status, 404, "{who:?} {what}");
            assert_eq!(a.body, not_found.body, "the same 404 for every reason");
        }
    }
    app.stop().await;
}

#[actix_web::test]
async fn enqueued_and_started_show_their_fields_and_no_response_yet() {
    let up = Fake::start_with(|_, _| Reply::ok("slow").delay(Duration::from_millis(1500))).await;
    let app = TestApp::start(&up.url(), &["--per-credential-concurrency", "1"]).await;
    let auth = [("Authorization", "Bearer owner")];
    let first = app.submit("POST", "/async_api/v2/a", &auth, b"").await;
    let second = app.submit("POST", "/async_api/v2/b", &auth, b"").await;
    let s = app.wait_for_status(&first, AUTH, "started", SECS(10)).await;
    assert_eq!(s.status, 200);
    let mut keys: Vec<String> = s.json().as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["attempts", "created", "id", "started", "status"]);
    // The attempt under way is a send that may have written bytes (§10).
    assert_eq!(s.json()["attempts"], 1, "{}", s.json());
    let q = app.status(&second, AUTH).await;
    assert_eq!(
        (q.status, q.json()["status"].as_str()),
        (200, Some("enqueued"))
    );
    let mut keys: Vec<String> = q.json().as_object().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["ahead", "attempts", "created", "id", "status"]);
    assert_eq!(q.json()["attempts"], 0);
    assert_eq!(app.response(&first, AUTH).await.status, 404, "not done yet");
    let d = app.wait_for_status(&first, AUTH, "done", SECS(10)).await;
    assert_eq!(d.json()["attempts"], 1, "still one when done: {}", d.json());
    app.wait_for_status(&second, AUTH, "done", SECS(10)).await;
    app.stop().await;
}

#[actix_web::test]
async fn requests_survive_a_restart_and_run_once() {
    let up = Fake::start_with(|_, _| Reply::ok("x").delay(Duration::from_millis(200))).await;
    let app = TestApp::start(
        &up.url(),
        &["--per-credential-concurrency", "1", "--concurrency", "1"],
    )
    .await;
    let auth = [("Authorization", "Bearer owner")];
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            app.submit("POST", &format!("/async_api/v2/{i}"), &auth, b"")
                .await,
        );
    }
    let app = app.restart().await;
    for id in &ids {
        app.wait_for_status(id, AUTH, "done", SECS(20)).await;
    }
    let seen = up.seen();
    let mut paths: Vec<&str> = seen.iter().map(|s| s.uri.as_str()).collect();
    assert_eq!(paths.len(), 5, "each ran exactly once: {paths:?}");
    paths.dedup();
    assert_eq!(
        paths,
        [
            "/api/v2/0",
            "/api/v2/1",
            "/api/v2/2",
            "/api/v2/3",
            "/api/v2/4"
        ],
        "in FIFO order"
    );
    app.stop().await;
}
