//! SPEC §4 and §10: callback events. Each has its own `webhook-id`
//! (`{id}_{n}`, the same across retries), `unknown` calls back too (after a
//! timeout, a connection dropped after sending, a crash), and the status
//! view shows how delivery goes.

use crate::callback_signed::{SPEC_SECRET, verify};
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;
use crate::process::{Proc, data_and_log};

const AUTH: Option<&str> = Some("Bearer owner");

fn params(raw: &[u8]) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes(raw).unwrap()
}

fn param<'a>(p: &'a [(String, String)], name: &str) -> Option<&'a str> {
    p.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// An `unknown` event's parameters: `response_id`, `status=unknown`,
/// `status_url`, and no `response_http_code`.
fn assert_unknown_event(p: &[(String, String)], id: &str, status_url: &str) {
    assert_eq!(param(p, "response_id"), Some(id), "{p:?}");
    assert_eq!(param(p, "status"), Some("unknown"), "{p:?}");
    assert_eq!(param(p, "status_url"), Some(status_url), "{p:?}");
    assert_eq!(param(p, "response_http_code"), None, "{p:?}");
    assert_eq!(param(p, "response_url"), None, "{p:?}");
}

#[actix_web::test]
async fn retries_keep_the_webhook_id_and_a_requeued_request_calls_back_as_a_new_event() {
    // The first run outlives --upstream-timeout (`unknown`); the second,
    // after the operator's requeue, answers.
    let up = Fake::start_with(|_, i| {
        if i == 0 {
            Reply::ok("late").delay(SECS(3))
        } else {
            Reply::status(201)
        }
    })
    .await;
    // The first callback attempt is refused, then all are taken.
    let receiver = Fake::start_with(|_, i| Reply::status(if i == 0 { 500 } else { 200 })).await;
    let app = TestApp::start(
        &up.url(),
        &[
            "--admin-token",
            "admin-secret",
            "--upstream-timeout",
            "1s",
            "--public-url",
            "https://gw.example/base/",
        ],
    )
    .await;
    let cb = format!("{}/hook", receiver.url());
    let id = app
        .submit(
            "POST",
            "/async_api/v2/hang",
            &[
                ("Authorization", "Bearer owner"),
                ("X-Callback-Location", &cb),
            ],
            b"",
        )
        .await;
    app.wait_for_status(&id, AUTH, "unknown", SECS(10)).await;
    let first = receiver.wait_for(1, SECS(10)).await.remove(0);
    assert_eq!(first.header("webhook-id"), Some(format!("{id}_1").as_str()));
    let status_url = format!("https://gw.example/base/async_api/v2/requests/{id}.json");
    assert_unknown_event(&params(&first.body), &id, &status_url);

    // Requeued while its `unknown` event waits for its retry.
    let rq = app
        .call(
            "POST",
            &format!("/admin/requests/{id}/requeue"),
            &[("Authorization", "Bearer admin-secret")],
            b"",
        )
        .await;
    assert_eq!(rq.status, 202, "{rq:?}");
    app.wait_for_status(&id, AUTH, "done", SECS(10)).await;
    let got = receiver.wait_for(3, SECS(15)).await;
    actix_web::rt::time::sleep(SECS(2)).await;
    let got_all = receiver.seen();
    assert_eq!(got_all.len(), 3, "nothing more after the 2xx: {got_all:#?}");

    let of = |event: &str| -> Vec<&Seen> {
        got.iter()
            .filter(|c| c.header("webhook-id") == Some(format!("{id}_{event}").as_str()))
            .collect()
    };
    let unknown = of("1");
    assert_eq!(unknown.len(), 2, "the unknown event, retried: {got:#?}");
    for c in &unknown {
        // Delivered as what it announced, though the request moved on.
        assert_unknown_event(&params(&c.body), &id, &status_url);
    }
    let done = of("2");
    assert_eq!(done.len(), 1, "the requeue's event: {got:#?}");
    let p = params(&done[0].body);
    assert_eq!(param(&p, "status"), Some("done"));
    assert_eq!(param(&p, "response_http_code"), Some("201"));
    assert_eq!(
        param(&p, "response_url"),
        Some(format!("https://gw.example/base/async_api/v2/responses/{id}.json").as_str())
    );
    app.stop().await;
}

#[actix_web::test]
async fn a_post_whose_connection_drops_after_sending_calls_back_unknown() {
    // Reads the request, then closes without a word.
    let (addr, _) = half_answer_server(b"");
    let receiver = Fake::start().await;
    let app = TestApp::start(&format!("http://{addr}"), &[]).await;
    let cb = format!("{}/hook?k=v", receiver.url());
    let id = app
        .submit(
            "POST",
            "/async_api/v2/dropped",
            &[
                ("Authorization", "Bearer owner"),
                ("X-Callback-Location", &cb),
                ("X-Callback-Method", "GET"),
            ],
            b"payload",
        )
        .await;
    app.wait_for_status(&id, AUTH, "unknown", SECS(10)).await;
    let c = receiver.wait_for(1, SECS(10)).await.remove(0);
    assert_eq!(c.method, "GET");
    assert_eq!(c.header("webhook-id"), Some(format!("{id}_1").as_str()));
    let (path, query) = c.uri.split_once('?').unwrap();
    assert_eq!(path, "/hook");
    let p = params(query.as_bytes());
    assert_eq!(p[0], ("k".to_string(), "v".to_string()), "own query first");
    assert_unknown_event(&p, &id, &format!("/async_api/v2/requests/{id}.json"));
    app.stop().await;
}

#[actix_web::test]
async fn a_post_cut_off_by_kill_9_calls_back_unknown_after_the_restart() {
    // An upstream that never answers in time: the gateway dies mid-call.
    let up = Fake::start_with(|_, _| Reply::ok("never").delay(SECS(600))).await;
    let receiver = Fake::start().await;
    let (dir, data, log) = data_and_log();
    let secret_file = dir.path().join("callback.secret");
    std::fs::write(&secret_file, SPEC_SECRET).unwrap();
    let secret_flag = ["--callback-secret-file", secret_file.to_str().unwrap()];
    let p = Proc::start(&up.url(), &data, &log, &secret_flag).await;
    let cb = format!("{}/after-crash", receiver.url());
    let client = awc::Client::default();
    let mut res = client
        .post(format!("{}/async_api/v2/orders", p.base))
        .insert_header(("X-Callback-Location", cb.as_str()))
        .send_body("x")
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 202);
    let v: serde_json::Value = res.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    up.wait_for(1, SECS(10)).await;
    p.kill9();
    assert!(receiver.seen().is_empty(), "nothing to announce before");

    let p = Proc::start(&up.url(), &data, &log, &secret_flag).await;
    let c = receiver.wait_for(1, SECS(15)).await.remove(0);
    assert_eq!(c.header("webhook-id"), Some(format!("{id}_1").as_str()));
    verify(SPEC_SECRET, &c, &c.body).unwrap_or_else(|e| panic!("{e}: {c:#?}"));
    assert_unknown_event(
        &params(&c.body),
        &id,
        &format!("/async_api/v2/requests/{id}.json"),
    );
    actix_web::rt::time::sleep(SECS(1)).await;
    assert_eq!(up.seen().len(), 1, "the POST is not sent again");
    p.kill9();
    // The process wrote no secret of ours into its log.
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        !log.contains(SPEC_SECRET.trim_start_matches("whsec_")),
        "{log}"
    );
}

#[actix_web::test]
async fn the_status_view_follows_the_callback_from_pending_to_delivered() {
    let up = Fake::start_with(|_, _| Reply::ok("{}").delay(Duration::from_millis(800))).await;
    // The first attempt is answered 500 after a second; the next, 204.
    let receiver = Fake::start_with(|_, i| {
        if i == 0 {
            Reply::status(500).delay(SECS(1))
        } else {
            Reply::status(204)
        }
    })
    .await;
    let app = TestApp::start(&up.url(), &[]).await;
    let plain = app
        .submit_as("POST", "/async_api/v2/plain", "Bearer owner")
        .await;
    let cb = format!("{}/hook", receiver.url());
    let id = app
        .submit(
            "POST",
            "/async_api/v2/x",
            &[
                ("Authorization", "Bearer owner"),
                ("X-Callback-Location", &cb),
            ],
            b"",
        )
        .await;
    // Not finished yet: pending, nothing scheduled.
    let s = app.status(&id, AUTH).await.json();
    assert_ne!(s["status"], "done", "{s}");
    assert_eq!(
        s["callback"],
        json!({"state": "pending", "attempts": 0, "last_http_code": null, "next_attempt": null}),
        "{s}"
    );
    let s = app
        .wait_for_status(&id, AUTH, "done", SECS(10))
        .await
        .json();
    let v = &s["callback"];
    assert_eq!(v["state"], "pending", "{s}");
    assert_eq!(v["attempts"], 0, "{s}");
    assert!(v["last_http_code"].is_null(), "{s}");
    assert!(v["next_attempt"].is_string(), "{s}");

    // After the refused attempt: still pending, with what it was told.
    receiver.wait_for(1, SECS(10)).await;
    let s = wait_for_callback(&app, &id, |c| c["attempts"] == 1).await;
    let v = &s["callback"];
    assert_eq!(v["state"], "pending", "{s}");
    assert_eq!(v["last_http_code"], 500, "{s}");
    assert!(v["next_attempt"].is_string(), "{s}");

    let s = wait_for_callback(&app, &id, |c| c["state"] == "delivered").await;
    let v = &s["callback"];
    assert_eq!(v["attempts"], 2, "{s}");
    assert_eq!(v["last_http_code"], 204, "{s}");
    assert!(v["next_attempt"].is_null(), "{s}");

    let s = app
        .wait_for_status(&plain, AUTH, "done", SECS(10))
        .await
        .json();
    assert!(s.get("callback").is_none(), "no callback, no object: {s}");
    app.stop().await;
}

/// Polls the status until its `callback` object satisfies `ok`; fails
/// with the last answer.
async fn wait_for_callback(
    app: &TestApp,
    id: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + SECS(15);
    loop {
        let s = app.status(id, AUTH).await.json();
        if ok(&s["callback"]) {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "last answer: {s}");
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    }
}
