//! SPEC §5 end to end: lanes, fairness and pacing against an upstream that
//! enforces a per-credential sliding-window limit and sends the myTarget
//! headers. Timing is asserted only with generous bounds; the figures are
//! printed (`cargo test pacing -- --nocapture`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::helpers::*;

/// An upstream allowing `limit` requests per sliding second per
/// credential, answering 429 beyond it, with the myTarget headers.
async fn limited_upstream(limit: usize) -> Fake {
    let windows: Arc<Mutex<HashMap<String, VecDeque<Instant>>>> = Arc::default();
    Fake::start_with(move |req, _| {
        let who = req.header("authorization").unwrap_or_default().to_string();
        let mut all = windows.lock().unwrap();
        let w = all.entry(who).or_default();
        while w.front().is_some_and(|t| t.elapsed() >= SECS(1)) {
            w.pop_front();
        }
        let limit_header = limit.to_string();
        if w.len() >= limit {
            return Reply::status(429).header("X-RateLimit-RPS-Limit", limit_header.as_bytes());
        }
        w.push_back(Instant::now());
        let remaining = (limit - w.len()).to_string();
        Reply::ok("{}")
            .header("X-RateLimit-RPS-Limit", limit_header.as_bytes())
            .header("X-RateLimit-RPS-Remaining", remaining.as_bytes())
            .delay(Duration::from_millis(5))
    })
    .await
}

/// (requests let through per second, share of arrivals refused with 429)
fn rate_and_refusals(up: &Fake, who: &str) -> (f64, f64) {
    let arrivals: Vec<Instant> = up
        .seen()
        .into_iter()
        .filter(|s| s.header("authorization") == Some(who))
        .map(|s| s.at)
        .collect();
    let through = up.through(who);
    let span = *arrivals.last().unwrap() - arrivals[0];
    let rate = (through as f64 - 1.0) / span.as_secs_f64();
    let refused = (arrivals.len() - through) as f64 / arrivals.len() as f64;
    (rate, refused)
}

#[actix_web::test]
async fn three_credentials_settle_near_the_upstreams_limit_with_few_429s() {
    const LIMIT: usize = 10;
    const EACH: usize = 100;
    let up = limited_upstream(LIMIT).await;
    let app = TestApp::start(&up.url(), &[]).await;
    let tokens = ["Bearer p1", "Bearer p2", "Bearer p3"];
    let mut ids = Vec::new();
    for i in 0..EACH {
        for t in tokens {
            ids.push((
                t,
                app.submit_as("POST", &format!("/async_api/v2/{i}"), t)
                    .await,
            ));
        }
    }
    for (t, id) in &ids {
        let s = app.wait_for_status(id, Some(t), "done", SECS(90)).await;
        assert_eq!(s.json()["response_http_code"], 200);
    }
    for t in tokens {
        let (rate, refused) = rate_and_refusals(&up, t);
        println!(
            "pacing: {t}: {rate:.2} requests/s let through at a limit of {LIMIT}/s, {:.1}% refused",
            refused * 100.0
        );
        assert!(rate >= 0.7 * LIMIT as f64, "{t}: {rate:.2}/s");
        assert!(refused <= 0.05, "{t}: {:.1}% 429s", refused * 100.0);
    }
    let m = String::from_utf8(app.call("GET", "/metrics", &[], b"").await.body).unwrap();
    assert!(
        m.contains(&format!(
            "asyncgate_executed_total{{code=\"200\"}} {}\n",
            EACH * 3
        )),
        "{m}"
    );
    app.stop().await;
}

#[actix_web::test]
async fn a_fresh_credential_is_served_long_before_another_ones_backlog_ends() {
    let up = limited_upstream(10).await;
    let app = std::rc::Rc::new(TestApp::start(&up.url(), &[]).await);
    let mut tasks = Vec::new();
    for t in 0..8 {
        let app = app.clone();
        tasks.push(actix_web::rt::spawn(async move {
            for i in 0..125 {
                app.submit_as(
                    "POST",
                    &format!("/async_api/v2/backlog/{t}/{i}"),
                    "Bearer big",
                )
                .await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let submitted = Instant::now();
    let id = app
        .submit_as("GET", "/async_api/v2/mine", "Bearer small")
        .await;
    app.wait_for_status(&id, Some("Bearer small"), "done", SECS(10))
        .await;
    let waited = submitted.elapsed();
    let backlog_done = up.through("Bearer big");
    println!(
        "fairness: a fresh credential's request took {waited:?}; the 1,000-request backlog had {backlog_done} through"
    );
    assert!(waited < SECS(5), "{waited:?}");
    assert!(
        backlog_done < 500,
        "the backlog was nearly done anyway: {backlog_done}"
    );
    std::rc::Rc::try_unwrap(app).ok().unwrap().stop().await;
}

#[actix_web::test]
async fn per_credential_concurrency_is_a_cap_at_the_upstream() {
    let up = Fake::start_with(|_, _| Reply::ok("x").delay(Duration::from_millis(200))).await;
    let app = TestApp::start(&up.url(), &["--per-credential-concurrency", "2"]).await;
    let mut ids = Vec::new();
    for i in 0..8 {
        for t in ["Bearer c1", "Bearer c2"] {
            ids.push((
                t,
                app.submit_as("POST", &format!("/async_api/v2/{i}"), t)
                    .await,
            ));
        }
    }
    for (t, id) in &ids {
        app.wait_for_status(id, Some(t), "done", SECS(20)).await;
    }
    assert_eq!(up.max_in_flight("Bearer c1"), 2);
    assert_eq!(up.max_in_flight("Bearer c2"), 2);
    app.stop().await;
}

#[actix_web::test]
async fn per_credential_rps_paces_sends() {
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &["--per-credential-rps", "5"]).await;
    let mut ids = Vec::new();
    for i in 0..15 {
        ids.push(
            app.submit("GET", &format!("/async_api/v2/{i}"), &[], b"")
                .await,
        );
    }
    for id in &ids {
        app.wait_for_status(id, None, "done", SECS(20)).await;
    }
    let seen = up.seen();
    let span = seen.last().unwrap().at - seen.first().unwrap().at;
    println!("pacing: 15 requests at --per-credential-rps 5 took {span:?}");
    // 5 per (slightly more than a) second: the 11th goes two windows in.
    assert!(span >= Duration::from_millis(1900), "{span:?}");
    app.stop().await;
}

#[actix_web::test]
async fn retry_after_pauses_only_the_refused_credential() {
    let up = Fake::start().await;
    let probe = up.clone();
    up.set(move |req, _| {
        let refused_before = probe.seen().iter().filter(|s| s.uri == req.uri).count() > 1;
        if req.header("authorization") == Some("Bearer slow") && !refused_before {
            Reply::status(429).header("Retry-After", b"2")
        } else {
            Reply::ok("ok")
        }
    });
    let app = TestApp::start(&up.url(), &[]).await;
    let slow = app
        .submit_as("POST", "/async_api/v2/first", "Bearer slow")
        .await;
    up.wait_for(1, SECS(10)).await;
    let other = app
        .submit_as("POST", "/async_api/v2/other", "Bearer fast")
        .await;
    app.wait_for_status(&other, Some("Bearer fast"), "done", SECS(1))
        .await;
    app.wait_for_status(&slow, Some("Bearer slow"), "done", SECS(10))
        .await;
    let tries: Vec<Instant> = up
        .seen()
        .iter()
        .filter(|s| s.uri.ends_with("first"))
        .map(|s| s.at)
        .collect();
    assert_eq!(tries.len(), 2);
    assert!(
        tries[1] - tries[0] >= Duration::from_millis(1900),
        "{:?}",
        tries[1] - tries[0]
    );
    let m = String::from_utf8(app.call("GET", "/metrics", &[], b"").await.body).unwrap();
    assert!(
        m.contains("asyncgate_rate_limit_deferrals_total 1\n"),
        "{m}"
    );
    assert_eq!(
        app.response(&slow, Some("Bearer slow")).await.status,
        200,
        "the 429 was not stored"
    );
    app.stop().await;
}
