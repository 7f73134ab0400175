//! Callbacks cannot be aimed inward (SPEC §9): `--callback-deny` and
//! `--callback-allow`, checked on the address actually connected to.
//! Also where a callback goes when its URL has a fragment (SPEC §4).
//!
//! Refused callbacks are retried with the usual backoff (1 s doubling), so
//! these tests look at the counters right after the first attempts instead
//! of waiting for retention. Refusals are aimed at a listener that counts
//! connections: "refused" must mean "never connected", not "connected and
//! failed". Nothing here sends traffic off the loopback interface.

use std::sync::atomic::Ordering::SeqCst;

use crate::helpers::*;

const AUTH: Option<&str> = Some("Bearer owner");
const REFUSED: &str = "asyncgate_callback_refused_total";
const FAILURES: &str = "asyncgate_callback_failures_total";

/// Submits a request that calls back to `cb` with `method` and waits until
/// it is `done` (the callback is due from then on); returns its id.
async fn submit_calling_back(app: &TestApp, cb: &str, method: &str) -> String {
    let id = app
        .submit(
            "POST",
            "/async_api/v2/x.json",
            &[
                ("Authorization", "Bearer owner"),
                ("X-Callback-Location", cb),
                ("X-Callback-Method", method),
            ],
            b"",
        )
        .await;
    app.wait_for_status(&id, AUTH, "done", SECS(10)).await;
    id
}

/// A receiver that only counts TCP connections (see `half_answer_server`).
fn counting_receiver() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let (addr, connections) = half_answer_server(b"HTTP/1.1 500 Internal");
    (addr.port(), connections)
}

#[actix_web::test]
async fn denied_loopback_literal_is_refused_counted_and_retried() {
    let up = Fake::start().await;
    let (port, connections) = counting_receiver();
    let app = TestApp::start(&up.url(), &["--callback-deny", "127.0.0.0/8,::1/128"]).await;
    submit_calling_back(
        &app,
        &format!("http://127.0.0.1:{port}/cb?token=s3cret"),
        "POST",
    )
    .await;
    // The first attempt at once, the second about 1 s later: a refusal is a
    // failed attempt like any other, retried with the usual backoff.
    let refused = app.wait_for_metric(REFUSED, 2, SECS(5)).await;
    assert!(
        app.metric(FAILURES).await >= Some(refused),
        "every refusal is a failed attempt"
    );
    assert_eq!(connections.load(SeqCst), 0, "never connected");
    app.stop().await;
}

#[actix_web::test]
async fn host_names_are_judged_by_what_they_resolve_to() {
    let up = Fake::start().await;
    let (port, connections) = counting_receiver();
    // Repeated flags add up like a comma-separated list.
    let deny = [
        "--callback-deny",
        "127.0.0.0/8",
        "--callback-deny",
        "::1/128",
    ];
    let app = TestApp::start(&up.url(), &deny).await;
    submit_calling_back(&app, &format!("http://localhost:{port}/cb"), "GET").await;
    app.wait_for_metric(REFUSED, 1, SECS(3)).await;
    assert_eq!(connections.load(SeqCst), 0, "never connected");
    app.stop().await;
}

#[actix_web::test]
async fn ipv4_mapped_ipv6_literals_are_judged_as_ipv4() {
    let up = Fake::start().await;
    let (port, connections) = counting_receiver();
    let app = TestApp::start(&up.url(), &["--callback-deny", "127.0.0.0/8"]).await;
    submit_calling_back(
        &app,
        &format!("http://[::ffff:127.0.0.1]:{port}/cb"),
        "POST",
    )
    .await;
    app.wait_for_metric(REFUSED, 1, SECS(3)).await;
    assert_eq!(connections.load(SeqCst), 0, "never connected");
    app.stop().await;
}

#[actix_web::test]
async fn link_local_is_refused_by_default_before_any_connect() {
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &[]).await;
    // The policy refuses an address literal before connecting, so the
    // refusal is counted at once; a connect to this address (unroutable
    // here) would instead fail later and count no refusal.
    submit_calling_back(
        &app,
        "http://169.254.169.254/latest/meta-data/?token=s3cret#frag",
        "GET",
    )
    .await;
    app.wait_for_metric(REFUSED, 1, SECS(3)).await;
    assert!(app.metric(FAILURES).await >= Some(1));
    app.stop().await;
}

#[actix_web::test]
async fn allow_wins_over_deny() {
    let up = Fake::start().await;
    let receiver = Fake::start().await;
    let flags = [
        "--callback-deny",
        "127.0.0.0/8",
        "--callback-allow",
        "127.0.0.1/32",
    ];
    let app = TestApp::start(&up.url(), &flags).await;
    let port = receiver.addr.port();
    submit_calling_back(&app, &format!("http://127.0.0.1:{port}/cb"), "POST").await;
    let got = receiver.wait_for(1, SECS(5)).await;
    assert_eq!(got[0].uri, "/cb");
    assert_eq!(app.metric(REFUSED).await, Some(0));
    app.stop().await;
}

#[actix_web::test]
async fn loopback_is_open_by_default() {
    let up = Fake::start().await;
    let receiver = Fake::start().await;
    let app = TestApp::start(&up.url(), &[]).await;
    let port = receiver.addr.port();
    submit_calling_back(&app, &format!("http://127.0.0.1:{port}/by-address"), "POST").await;
    submit_calling_back(&app, &format!("http://localhost:{port}/by-name"), "POST").await;
    let got = receiver.wait_for(2, SECS(5)).await;
    let mut paths: Vec<&str> = got.iter().map(|s| s.uri.as_str()).collect();
    paths.sort();
    assert_eq!(paths, ["/by-address", "/by-name"]);
    assert_eq!(app.metric(REFUSED).await, Some(0));
    app.stop().await;
}

#[actix_web::test]
async fn fragments_are_dropped_and_get_parameters_join_the_own_query() {
    let up = Fake::start().await;
    let receiver = Fake::start().await;
    let app = TestApp::start(&up.url(), &[]).await;
    let base = receiver.url();
    // The own query has bytes a URL library would re-encode (`'`) or
    // decode (`%2F`, `+`): they must arrive as they were given.
    let get_id = submit_calling_back(
        &app,
        &format!("{base}/get?own=1&tok=a%2Fb+c'd#frag?lost=1"),
        "GET",
    )
    .await;
    submit_calling_back(&app, &format!("{base}/post?own=1#frag"), "POST").await;
    let got = receiver.wait_for(2, SECS(5)).await;
    let get = got.iter().find(|s| s.method == "GET").unwrap();
    assert_eq!(
        get.uri,
        format!(
            "/get?own=1&tok=a%2Fb+c'd&response_id={get_id}\
             &response_url=%2Fasync_api%2Fv2%2Fresponses%2F{get_id}.json\
             &response_http_code=200&status=done"
        )
    );
    let post = got.iter().find(|s| s.method == "POST").unwrap();
    assert_eq!(post.uri, "/post?own=1");
    assert!(
        String::from_utf8_lossy(&post.body).starts_with("response_id="),
        "{post:?}"
    );
    app.stop().await;
}
