//! Callbacks cannot be aimed inward (SPEC §9): `--callback-deny` and
//! `--callback-allow`, checked on the address actually connected to.
//! Also where a callback goes when its URL has a fragment (SPEC §4).

use crate::helpers::*;

const AUTH: Option<&str> = Some("Bearer owner");

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
             &response_http_code=200"
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
