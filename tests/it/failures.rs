//! SPEC §5: failure classes. Nothing sent → stays queued and is retried;
//! maybe sent → safe methods retried, the rest `unknown`; answers are
//! results.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::helpers::*;

#[actix_web::test]
async fn a_post_that_hangs_past_the_timeout_is_unknown_and_a_get_is_retried() {
    // The first arrival on each path hangs past the timeout; later ones answer.
    let up = Fake::start().await;
    let seen_before = {
        let up2 = up.clone();
        move |uri: &str| up2.seen().iter().filter(|s| s.uri == uri).count()
    };
    let counter = seen_before.clone();
    up.set(move |req, _| {
        if counter(&req.uri) <= 1 {
            Reply::ok("too late").delay(SECS(3))
        } else {
            Reply::ok("in time")
        }
    });
    let app = TestApp::start(&up.url(), &["--upstream-timeout", "1s"]).await;
    let post = app.submit("POST", "/async_api/v2/p", &[], b"").await;
    let get = app.submit("GET", "/async_api/v2/g", &[], b"").await;
    let s = app.wait_for_status(&post, None, "unknown", SECS(10)).await;
    assert_eq!(s.status, 200);
    assert!(s.json()["started"].is_string(), "{s:?}");
    let g = app.wait_for_status(&get, None, "done", SECS(15)).await;
    assert_eq!(g.json()["response_http_code"], 200);
    assert_eq!(app.response(&get, None).await.body, b"in time");
    actix_web::rt::time::sleep(SECS(3)).await;
    assert_eq!(
        seen_before("/api/v2/p"),
        1,
        "a POST that may have run is never sent again"
    );
    assert_eq!(seen_before("/api/v2/g"), 2, "a GET is retried");
    assert_eq!(app.status(&post, None).await.json()["status"], "unknown");
    app.stop().await;
}

#[actix_web::test]
async fn a_connection_cut_mid_answer_is_a_failure_after_sending() {
    cut_mid_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial").await;
}

async fn cut_mid_answer(partial: &'static [u8]) {
    let (addr, connections) = half_answer_server(partial);
    let app = TestApp::start(&format!("http://{addr}"), &[]).await;
    let post = app.submit_as("POST", "/async_api/v2/p", "Bearer a").await;
    app.wait_for_status(&post, Some("Bearer a"), "unknown", SECS(10))
        .await;
    assert_eq!(connections.load(Ordering::SeqCst), 1);
    let get = app.submit_as("GET", "/async_api/v2/g", "Bearer b").await;
    let deadline = std::time::Instant::now() + SECS(10);
    while connections.load(Ordering::SeqCst) < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the GET was not retried"
        );
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    let s = app.status(&get, Some("Bearer b")).await;
    assert_ne!(
        s.json()["status"],
        "unknown",
        "a GET is never unknown: {s:?}"
    );
    assert_eq!(
        app.status(&post, Some("Bearer a")).await.json()["status"],
        "unknown"
    );
    app.stop().await;
}

#[actix_web::test]
async fn an_upstream_that_is_down_then_up_runs_everything_once() {
    // A port outside the ephemeral range, so no other test's server (bound
    // to port 0) can take it while the upstream is "down".
    let addr = (20_000..30_000)
        .map(|p| std::net::SocketAddr::from(([127, 0, 0, 1], p + std::process::id() as u16 % 1000)))
        .find(|a| std::net::TcpListener::bind(a).is_ok())
        .unwrap();
    let app = TestApp::start(&format!("http://{addr}"), &[]).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            app.submit("POST", &format!("/async_api/v2/{i}"), &[], b"")
                .await,
        );
    }
    actix_web::rt::time::sleep(SECS(10)).await;
    for id in &ids {
        // `started` can show for the moment of a connect attempt.
        let s = app.status(id, None).await.json()["status"].clone();
        assert!(
            s == "enqueued" || s == "started",
            "nothing was sent, so it waits: {s}"
        );
    }
    let m = String::from_utf8(app.call("GET", "/metrics", &[], b"").await.body).unwrap();
    assert!(
        !m.contains("asyncgate_upstream_unreachable_total 0\n"),
        "{m}"
    );
    let up = Fake::start_on(addr, |_, _| Reply::ok("up")).await;
    for id in &ids {
        // Backoff reached 8 s while it was down: the next try comes by then.
        app.wait_for_status(id, None, "done", SECS(30)).await;
    }
    let mut uris: Vec<String> = up.seen().into_iter().map(|s| s.uri).collect();
    uris.sort();
    assert_eq!(
        uris,
        [
            "/api/v2/0",
            "/api/v2/1",
            "/api/v2/2",
            "/api/v2/3",
            "/api/v2/4"
        ]
    );
    app.stop().await;
}
