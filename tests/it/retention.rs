//! SPEC §7: retention.

use std::time::{Duration, Instant};

use crate::helpers::*;

const AUTH: Option<&str> = Some("Bearer owner");

#[actix_web::test]
async fn done_requests_are_gone_after_retention_and_the_sweep_reclaims_them() {
    let up = Fake::start_with(|_, _| Reply::ok(&"r".repeat(100_000))).await;
    let app = TestApp::start(&up.url(), &["--retention", "2s"]).await;
    let id = app
        .submit_as("POST", "/async_api/v2/x.json", "Bearer owner")
        .await;
    app.wait_for_status(&id, AUTH, "done", SECS(10)).await;
    let done_at = Instant::now();
    assert_eq!(app.response(&id, AUTH).await.status, 200);
    loop {
        if app.status(&id, AUTH).await.status == 404 {
            break;
        }
        assert!(done_at.elapsed() < SECS(10), "still there after 10 s");
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        done_at.elapsed() >= Duration::from_millis(1500),
        "gone too early: {:?}",
        done_at.elapsed()
    );
    assert_eq!(app.response(&id, AUTH).await.status, 404);
    // The sweep deletes the record itself shortly after.
    let deadline = Instant::now() + SECS(10);
    loop {
        let m = String::from_utf8(app.call("GET", "/metrics", &[], b"").await.body).unwrap();
        if m.contains("asyncgate_requests{status=\"done\"} 0\n") {
            break;
        }
        assert!(Instant::now() < deadline, "not swept: {m}");
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
}

#[actix_web::test]
async fn waiting_requests_never_expire() {
    let up = Fake::start_with(|_, _| Reply::status(429).header("Retry-After", b"1")).await;
    let app = TestApp::start(&up.url(), &["--retention", "1s"]).await;
    let id = app
        .submit_as("POST", "/async_api/v2/x.json", "Bearer owner")
        .await;
    up.wait_for(2, SECS(10)).await;
    actix_web::rt::time::sleep(SECS(2)).await;
    assert_eq!(
        app.status(&id, AUTH).await.status,
        200,
        "refused, still waiting, not expired"
    );
    up.set(|_, _| Reply::ok("finally"));
    app.wait_for_status(&id, AUTH, "done", SECS(10)).await;
    assert_eq!(app.response(&id, AUTH).await.body, b"finally");
    app.stop().await;
}
