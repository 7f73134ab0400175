//! SPEC §10 (for scripts): `Prefer: wait`, respond-async submissions, bulk
//! status, `Idempotency-Key`, cancel, and why a request waits.

use std::time::{Duration, Instant};

use crate::helpers::*;

const OWNER: &str = "Bearer owner";
const AUTH: Option<&str> = Some(OWNER);
const DOWN: &str = "http://127.0.0.1:9";

fn path(id: &str) -> String {
    format!("/async_api/v2/requests/{id}.json")
}

async fn held(app: &TestApp, id: &str, wait: &str) -> (Answer, Duration) {
    let t = Instant::now();
    let a = app
        .call(
            "GET",
            &path(id),
            &[("Authorization", OWNER), ("Prefer", wait)],
            b"",
        )
        .await;
    (a, t.elapsed())
}

#[actix_web::test]
async fn a_held_status_answers_as_soon_as_the_request_is_done() {
    let up = Fake::start_with(|_, _| Reply::ok("{}").delay(Duration::from_millis(700))).await;
    let app = TestApp::start(&up.url(), &[]).await;
    let id = app
        .submit_as("POST", "/async_api/v2/slow.json", OWNER)
        .await;
    let (a, took) = held(&app, &id, "wait=20").await;
    assert_eq!(a.status, 303, "{a:?}");
    assert_eq!(a.json()["status"], "done");
    assert_eq!(a.header("preference-applied"), Some("wait=20"));
    assert!(took < SECS(5), "held {took:?} past the change");
    // Finished already: at once, still with the preference applied.
    let (a, took) = held(&app, &id, "wait=20").await;
    assert_eq!(
        (a.status, a.header("preference-applied")),
        (303, Some("wait=20"))
    );
    assert!(took < SECS(1), "{took:?}");
}

#[actix_web::test]
async fn a_wait_that_times_out_answers_the_current_status_and_the_cap_applies() {
    let app = TestApp::start(DOWN, &["--max-wait", "1"]).await;
    let id = app
        .submit_as("POST", "/async_api/v2/never.json", OWNER)
        .await;
    let (a, took) = held(&app, &id, "respond-async, wait=30").await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.json()["status"], "enqueued");
    assert_eq!(a.header("preference-applied"), Some("wait=1"), "capped");
    assert!(
        took >= Duration::from_millis(900) && took < SECS(5),
        "{took:?}"
    );
    // A malformed preference is ignored: no wait, no header.
    let (a, took) = held(&app, &id, "wait=soon").await;
    assert_eq!((a.status, a.header("preference-applied")), (200, None));
    assert!(took < SECS(1), "{took:?}");
}

#[actix_web::test]
async fn a_gateway_stopping_answers_held_requests_at_once() {
    let mut app = TestApp::start(DOWN, &[]).await;
    let id = app
        .submit_as("POST", "/async_api/v2/never.json", OWNER)
        .await;
    let running = app.running.take().unwrap();
    let (answer, _) = futures_util::join!(held(&app, &id, "wait=25"), async {
        actix_web::rt::time::sleep(Duration::from_millis(300)).await;
        running.stop().await.unwrap();
    });
    let (a, took) = answer;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(took < SECS(5), "held {took:?} while the gateway stopped");
}

#[actix_web::test]
async fn respond_async_answers_the_stored_response_when_it_is_quick() {
    let up = Fake::start_with(|_, _| Reply::status(201).body(b"made")).await;
    let app = TestApp::start(&up.url(), &[]).await;
    let a = app
        .call(
            "POST",
            "/async_api/v2/make.json",
            &[
                ("Authorization", OWNER),
                ("Prefer", "respond-async, wait=10"),
            ],
            b"{}",
        )
        .await;
    assert_eq!((a.status, a.body.as_slice()), (201, &b"made"[..]), "{a:?}");
    assert_eq!(a.header("preference-applied"), Some("wait=10"));
    let loc = a.header("content-location").unwrap().to_string();
    assert!(loc.starts_with("/async_api/v2/responses/"), "{loc}");
    assert!(
        up.seen()[0].headers.iter().all(|(n, _)| n != "prefer"),
        "Prefer is the gateway's, never forwarded"
    );
}

#[actix_web::test]
async fn respond_async_falls_back_to_202_with_the_status_when_slow() {
    let up = Fake::start_with(|_, _| Reply::ok("{}").delay(SECS(3))).await;
    let app = TestApp::start(&up.url(), &[]).await;
    let a = app
        .call(
            "POST",
            "/async_api/v2/slow.json",
            &[("Authorization", OWNER), ("Prefer", "wait=1")],
            b"{}",
        )
        .await;
    assert_eq!(a.status, 202, "{a:?}");
    assert_eq!(
        a.header("preference-applied"),
        Some("respond-async, wait=1")
    );
    let v = a.json();
    let id = v["id"].as_str().unwrap();
    assert_eq!(a.header("location"), Some(path(id).as_str()));
    assert!(
        ["enqueued", "started"].contains(&v["status"].as_str().unwrap()),
        "{v}"
    );
}

async fn bulk(app: &TestApp, auth: &str, body: &str, prefer: Option<&str>) -> Answer {
    let mut headers = vec![
        ("Authorization", auth),
        ("Content-Type", "application/json"),
    ];
    if let Some(p) = prefer {
        headers.push(("Prefer", p));
    }
    app.call(
        "POST",
        "/async_api/v2/requests.json",
        &headers,
        body.as_bytes(),
    )
    .await
}

#[actix_web::test]
async fn bulk_status_answers_in_order_and_hides_other_credentials_ids() {
    let app = TestApp::start(DOWN, &[]).await;
    let a = app.submit_as("POST", "/async_api/v2/a.json", OWNER).await;
    let b = app.submit_as("GET", "/async_api/v2/b.json", OWNER).await;
    let theirs = app
        .submit_as("POST", "/async_api/v2/c.json", "Bearer other")
        .await;
    let body = format!(r#"{{"ids": ["{a}", "{b}", "{theirs}", "nope", "{a}"]}}"#);
    let r = bulk(&app, OWNER, &body, None).await;
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    let items: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(items, [a.as_str(), b.as_str(), a.as_str()]);
    assert_eq!(v["not_found"], serde_json::json!([theirs, "nope"]));
    let first = v["items"][0]["status"].as_str().unwrap();
    assert!(["enqueued", "started"].contains(&first), "{v}");
    for bad in [
        r#"{"ids": []}"#,
        "not json",
        r#"{"id": ["x"]}"#,
        r#"{"ids": ["x", 123]}"#,
        r#"{"ids": [{}]}"#,
    ] {
        assert_eq!(bulk(&app, OWNER, bad, None).await.status, 400, "{bad}");
    }
    let many: Vec<String> = (0..1001).map(|_| format!("\"{a}\"")).collect();
    let r = bulk(
        &app,
        OWNER,
        &format!("{{\"ids\": [{}]}}", many.join(",")),
        None,
    )
    .await;
    assert_eq!(r.status, 400);
    let r = app
        .call(
            "GET",
            "/async_api/v2/requests.json",
            &[("Authorization", OWNER)],
            b"",
        )
        .await;
    assert_eq!(r.status, 405);
}

/// Two requests of the owner's: `early` done in 10 ms, `late` in
/// `late_ms` (the fake upstream is returned to keep it running).
async fn early_and_late(late_ms: u64) -> (Fake, TestApp, String, String) {
    let up = Fake::start_with(move |s, _| {
        let ms = if s.uri.contains("late") { late_ms } else { 10 };
        Reply::ok("{}").delay(Duration::from_millis(ms))
    })
    .await;
    let app = TestApp::start(&up.url(), &[]).await;
    let early = app
        .submit_as("POST", "/async_api/v2/early.json", OWNER)
        .await;
    let late = app
        .submit_as("POST", "/async_api/v2/late.json", OWNER)
        .await;
    (up, app, early, late)
}

#[actix_web::test]
async fn bulk_wait_holds_until_every_visible_request_is_done() {
    let (_up, app, early, late) = early_and_late(800).await;
    let t = Instant::now();
    let body = format!(r#"{{"ids": ["{early}", "{late}", "01ARZ3NDEKTSV4RRFFQ69G5FAV"]}}"#);
    let r = bulk(&app, OWNER, &body, Some("wait=20")).await;
    assert!(t.elapsed() < SECS(5), "{:?}", t.elapsed());
    assert_eq!(r.header("preference-applied"), Some("wait=20"));
    let v = r.json();
    assert_eq!(v["items"][0]["status"], "done", "{v}");
    assert_eq!(v["items"][1]["status"], "done", "{v}");
    assert_eq!(v["not_found"].as_array().unwrap().len(), 1);
    // Ids nobody waits on, or that are done, leave no waiter behind.
    let ghosts: Vec<String> = (0..200)
        .map(|i| format!("\"01ARZ3NDEKTSV4RRFFQ69G5{i:03}\""))
        .collect();
    let body = format!("{{\"ids\": [{}, \"{late}\"]}}", ghosts.join(","));
    let r = bulk(&app, OWNER, &body, Some("wait=1")).await;
    assert_eq!(r.status, 200);
    assert_eq!(app.metric("asyncgate_held_requests").await, Some(0));
    // A repeated credential sees nothing.
    let twice = app
        .call(
            "POST",
            "/async_api/v2/requests.json",
            &[("Authorization", OWNER), ("Authorization", OWNER)],
            format!("{{\"ids\": [\"{early}\"]}}").as_bytes(),
        )
        .await;
    assert_eq!(twice.json()["items"], serde_json::json!([]));
}

#[actix_web::test]
async fn a_bulk_wait_answers_each_request_as_it_is_when_the_wait_ends() {
    let (_up, app, early, late) = early_and_late(1500).await;
    let body = format!(r#"{{"ids": ["{early}", "{late}"]}}"#);
    // The first finishes while the bulk waits for the second, and its
    // owner deletes it: the answer, at the end, does not list it.
    let deleting = async {
        app.wait_for_status(&early, AUTH, "done", SECS(5)).await;
        let gone = app
            .call("DELETE", &path(&early), &[("Authorization", OWNER)], b"")
            .await;
        assert_eq!(gone.status, 204, "{gone:?}");
    };
    let (r, ()) =
        futures_util::future::join(bulk(&app, OWNER, &body, Some("wait=20")), deleting).await;
    let v = r.json();
    assert_eq!(v["items"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["items"][0]["id"], late.as_str(), "{v}");
    assert_eq!(v["items"][0]["status"], "done", "{v}");
    assert_eq!(v["not_found"], serde_json::json!([early]), "{v}");
}

async fn keyed(app: &TestApp, key: &str, body: &[u8]) -> Answer {
    app.call(
        "POST",
        "/async_api/v2/pay.json",
        &[("Authorization", OWNER), ("Idempotency-Key", key)],
        body,
    )
    .await
}

#[actix_web::test]
async fn an_idempotency_key_gives_the_first_answer_again_and_stores_once() {
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &[]).await;
    let first = keyed(&app, "order-1", b"{\"n\":1}").await;
    assert_eq!(first.status, 202);
    let again = keyed(&app, "\"order-1\"", b"{\"n\":1}").await;
    assert_eq!(again.status, 202);
    assert_eq!(again.json(), first.json(), "the same answer, quoted or not");
    assert_eq!(again.header("location"), first.header("location"));
    // Another credential's key space is its own.
    let theirs = app
        .call(
            "POST",
            "/async_api/v2/pay.json",
            &[
                ("Authorization", "Bearer other"),
                ("Idempotency-Key", "order-1"),
            ],
            b"{\"n\":1}",
        )
        .await;
    assert_ne!(theirs.json()["id"], first.json()["id"]);
    // The same key for a different request: 422, nothing stored.
    let other = keyed(&app, "order-1", b"{\"n\":2}").await;
    assert_eq!(other.status, 422, "{other:?}");
    assert_eq!(other.json()["error"]["code"], "idempotency_key_reused");
    up.wait_for(2, SECS(10)).await;
    actix_web::rt::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(up.through(OWNER), 1, "sent once");
    let seen = up.seen();
    assert!(
        seen.iter().any(|s| s
            .headers
            .iter()
            .any(|(n, v)| n == "idempotency-key" && v == b"order-1")),
        "Idempotency-Key is forwarded"
    );
    // After a restart the key still answers with the first request.
    let app = app.restart().await;
    let after = keyed(&app, "order-1", b"{\"n\":1}").await;
    assert_eq!(after.json()["id"], first.json()["id"]);
}

#[actix_web::test]
async fn a_key_goes_with_its_request_at_the_end_of_its_retention() {
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &["--retention", "1s"]).await;
    let first = keyed(&app, "short-lived", b"x").await.json()["id"].clone();
    app.wait_for_status(first.as_str().unwrap(), AUTH, "done", SECS(10))
        .await;
    actix_web::rt::time::sleep(Duration::from_millis(1300)).await;
    let again = keyed(&app, "short-lived", b"x").await;
    assert_eq!(again.status, 202);
    assert_ne!(
        again.json()["id"],
        first,
        "past retention the key names nothing"
    );
}

#[actix_web::test]
async fn two_submissions_with_one_key_arriving_together_store_one_request() {
    let app = TestApp::start(DOWN, &[]).await;
    let (a, b) = futures_util::join!(keyed(&app, "k-2", b"x"), keyed(&app, "k-2", b"x"));
    assert_eq!((a.status, b.status), (202, 202));
    assert_eq!(a.json()["id"], b.json()["id"]);
    // Counted as stored (202 for a new request), not from the status
    // gauges: against a down upstream the request moves between enqueued
    // and started, and two reads could see it once in each.
    assert_eq!(
        app.metric("asyncgate_accepted_total").await,
        Some(1),
        "one request stored"
    );
}

#[actix_web::test]
async fn bad_idempotency_keys_are_400() {
    let app = TestApp::start(DOWN, &[]).await;
    for bad in ["", "\"\"", "a b", &"k".repeat(256)] {
        let a = keyed(&app, bad, b"").await;
        assert_eq!(a.status, 400, "{bad:?}: {a:?}");
    }
    let two = app
        .call(
            "POST",
            "/async_api/v2/pay.json",
            &[
                ("Authorization", OWNER),
                ("Idempotency-Key", "a"),
                ("Idempotency-Key", "b"),
            ],
            b"",
        )
        .await;
    assert_eq!(two.status, 400);
}

#[actix_web::test]
async fn cancel_removes_a_queued_request_for_good_and_ahead_follows() {
    let up = Fake::start().await;
    // The first one pauses the lane (a 429): from then on the queue holds
    // still, with no try in flight to move it. The pause is short enough
    // to end after the restart below, where it lives in the lane's row
    // (PostgreSQL) rather than in memory.
    let refusing = Fake::start_with(|_, _| Reply::status(429).header("Retry-After", b"8")).await;
    let app = TestApp::start(&refusing.url(), &[]).await;
    let mut ids = vec![app.submit_as("POST", "/async_api/v2/q0.json", OWNER).await];
    let deadline = Instant::now() + SECS(5);
    while app.status(&ids[0], AUTH).await.json()["pause_reason"] != "rate_limited" {
        assert!(Instant::now() < deadline, "never paused");
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 1..5 {
        ids.push(
            app.submit_as("POST", &format!("/async_api/v2/q{i}.json"), OWNER)
                .await,
        );
    }
    let ahead = |a: &Answer| a.json()["ahead"].as_u64();
    let mut order: Vec<(u64, String)> = Vec::new();
    for id in &ids {
        order.push((ahead(&app.status(id, AUTH).await).unwrap(), id.clone()));
    }
    order.sort();
    assert_eq!(
        order.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    let (last, second) = (order[4].1.clone(), order[1].1.clone());
    // Someone else's DELETE is the same 404 as an unknown id.
    let theirs = app
        .call(
            "DELETE",
            &path(&second),
            &[("Authorization", "Bearer other")],
            b"",
        )
        .await;
    assert_eq!(theirs.status, 404);
    let gone = app
        .call("DELETE", &path(&second), &[("Authorization", OWNER)], b"")
        .await;
    assert_eq!(gone.status, 204, "{gone:?}");
    assert_eq!(app.status(&second, AUTH).await.status, 404);
    assert_eq!(
        ahead(&app.status(&last, AUTH).await),
        Some(3),
        "after a cancel"
    );
    let again = app
        .call("DELETE", &path(&second), &[("Authorization", OWNER)], b"")
        .await;
    assert_eq!(again.status, 404);
    // Started against a live upstream: the cancelled one never runs.
    let app = TestApp::start_in(&up.url(), &[], {
        let mut app = app;
        app.running.take().unwrap().stop().await.unwrap();
        app.data_dir
    })
    .await;
    up.wait_for(4, SECS(30)).await;
    actix_web::rt::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(up.through(OWNER), 4);
    let i = ids.iter().position(|id| *id == second).unwrap();
    let cancelled = format!("/api/v2/q{i}.json");
    assert!(
        up.seen().iter().all(|s| s.uri != cancelled),
        "{cancelled} ran"
    );
    drop(app);
}

#[actix_web::test]
async fn a_started_request_cannot_be_cancelled_and_a_done_one_is_deleted() {
    let up = Fake::start_with(|_, _| Reply::ok("{}").delay(Duration::from_millis(1500))).await;
    let app = TestApp::start(&up.url(), &[]).await;
    let id = app
        .submit_as("POST", "/async_api/v2/slow.json", OWNER)
        .await;
    app.wait_for_status(&id, AUTH, "started", SECS(5)).await;
    let busy = app
        .call("DELETE", &path(&id), &[("Authorization", OWNER)], b"")
        .await;
    assert_eq!(busy.status, 409, "{busy:?}");
    assert_eq!(busy.json()["error"]["code"], "in_flight");
    app.wait_for_status(&id, AUTH, "done", SECS(10)).await;
    let gone = app
        .call("DELETE", &path(&id), &[("Authorization", OWNER)], b"")
        .await;
    assert_eq!(gone.status, 204);
    assert_eq!(app.response(&id, AUTH).await.status, 404);
}

#[actix_web::test]
async fn a_cancel_racing_the_dispatcher_is_never_sent_after_its_204() {
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &[]).await;
    let mut cancelled = Vec::new();
    for i in 0..40 {
        let p = format!("/async_api/v2/race/{i}.json");
        let id = app.submit_as("POST", &p, OWNER).await;
        let d = app
            .call("DELETE", &path(&id), &[("Authorization", OWNER)], b"")
            .await;
        assert!([204, 409].contains(&d.status), "{d:?}");
        // A 204 is a cancel (enqueued) or a delete (already done, sent
        // before): either way nothing may arrive after it.
        if d.status == 204 {
            cancelled.push((format!("/api/v2/race/{i}.json"), Instant::now()));
        }
    }
    assert!(!cancelled.is_empty(), "no DELETE won: the race was not run");
    actix_web::rt::time::sleep(Duration::from_millis(800)).await;
    let seen = up.seen();
    for (c, at) in &cancelled {
        assert!(
            !seen.iter().any(|s| &s.uri == c && s.at > *at),
            "{c} was sent after its 204"
        );
    }
}

#[actix_web::test]
async fn attempts_and_the_pause_say_why_a_request_waits() {
    let up = Fake::start_with(|_, _| Reply::status(429).header("Retry-After", b"60")).await;
    let app = TestApp::start(&up.url(), &[]).await;
    let first = app
        .submit_as("GET", "/async_api/v2/limited.json", OWNER)
        .await;
    up.wait_for(1, SECS(5)).await;
    let deadline = Instant::now() + SECS(5);
    let v = loop {
        let v = app.status(&first, AUTH).await.json();
        if v["pause_reason"] == "rate_limited" {
            break v;
        }
        assert!(Instant::now() < deadline, "never shown paused: {v}");
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    };
    // Behind it in the paused lane: never sent.
    let second = app
        .submit_as("GET", "/async_api/v2/behind.json", OWNER)
        .await;
    assert_eq!(v["status"], "enqueued");
    assert_eq!(v["attempts"], 1, "the refused send counts: {v}");
    assert_eq!(v["paused_until"].as_str().unwrap().len(), 19, "{v}");
    let w = app.status(&second, AUTH).await.json();
    assert_eq!(
        (w["attempts"].as_u64(), w["ahead"].as_u64()),
        (Some(0), Some(1)),
        "{w}"
    );
}
