//! SPEC §4: callbacks.

use std::time::Duration;

use crate::helpers::*;

const AUTH: Option<&str> = Some("Bearer owner");

fn params(raw: &str) -> Vec<(String, String)> {
    serde_urlencoded::from_str(raw).unwrap()
}

#[actix_web::test]
async fn post_callbacks_carry_form_parameters() {
    let up = Fake::start_with(|_, _| Reply::status(207)).await;
    let receiver = Fake::start().await;
    let app = TestApp::start(&up.url(), &[]).await;
    let cb = format!("{}/hook?token=abc", receiver.url());
    let id = app
        .submit(
            "POST",
            "/async_api/v2/x.json",
            &[
                ("Authorization", "Bearer owner"),
                ("X-Callback-Location", &cb),
            ],
            b"",
        )
        .await;
    let got = receiver.wait_for(1, SECS(10)).await;
    let c = &got[0];
    assert_eq!(c.method, "POST");
    assert_eq!(c.uri, "/hook?token=abc");
    assert_eq!(
        c.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    let p = params(std::str::from_utf8(&c.body).unwrap());
    assert_eq!(
        p,
        [
            ("response_id".to_string(), id.clone()),
            (
                "response_url".to_string(),
                format!("/async_api/v2/responses/{id}.json")
            ),
            ("response_http_code".to_string(), "207".to_string()),
            ("status".to_string(), "done".to_string()),
        ]
    );
    assert_eq!(c.header("webhook-id"), Some(format!("{id}_1").as_str()));
    assert_eq!(
        c.header("webhook-signature"),
        None,
        "unsigned without a secret"
    );
    // Sent only once the request is done (on disk).
    assert_eq!(app.status(&id, AUTH).await.json()["status"], "done");
    actix_web::rt::time::sleep(SECS(2)).await;
    assert_eq!(receiver.seen().len(), 1, "never again after a 2xx");
    app.stop().await;
}

#[actix_web::test]
async fn get_callbacks_append_query_parameters_and_public_url_makes_it_absolute() {
    let up = Fake::start().await;
    let receiver = Fake::start().await;
    let app = TestApp::start(&up.url(), &["--public-url", "https://gw.example/"]).await;
    let cb = format!("{}/hook?a=1", receiver.url());
    let id = app
        .submit(
            "GET",
            "/async_api/v2/x.json",
            &[
                ("Authorization", "Bearer owner"),
                ("X-Callback-Location", &cb),
                ("X-Callback-Method", "get"),
            ],
            b"",
        )
        .await;
    let got = receiver.wait_for(1, SECS(10)).await;
    assert_eq!(got[0].method, "GET");
    let (path, query) = got[0].uri.split_once('?').unwrap();
    assert_eq!(path, "/hook");
    let url = format!("https://gw.example/async_api/v2/responses/{id}.json");
    assert_eq!(
        params(query),
        [
            ("a".to_string(), "1".to_string()),
            ("response_id".to_string(), id.clone()),
            ("response_url".to_string(), url.clone()),
            ("response_http_code".to_string(), "200".to_string()),
            ("status".to_string(), "done".to_string()),
        ]
    );
    assert_eq!(
        got[0].header("webhook-id"),
        Some(format!("{id}_1").as_str())
    );
    let s = app.status(&id, AUTH).await;
    assert_eq!(s.json()["response_url"], url.as_str());
    assert_eq!(s.header("location"), Some(url.as_str()));
    app.stop().await;
}

#[actix_web::test]
async fn failed_callbacks_are_retried_with_doubling_backoff_until_a_2xx() {
    let up = Fake::start().await;
    let receiver = Fake::start_with(|_, i| {
        if i < 2 {
            Reply::status(500)
        } else {
            Reply::status(204)
        }
    })
    .await;
    let app = TestApp::start(&up.url(), &[]).await;
    let cb = format!("{}/hook", receiver.url());
    let id = app
        .submit(
            "POST",
            "/async_api/v2/x.json",
            &[("X-Callback-Location", &cb)],
            b"",
        )
        .await;
    let got = receiver.wait_for(3, SECS(20)).await;
    for c in &got {
        assert_eq!(
            c.header("webhook-id"),
            Some(format!("{id}_1").as_str()),
            "every retry of one event keeps its webhook-id"
        );
    }
    let first_gap = got[1].at - got[0].at;
    let second_gap = got[2].at - got[1].at;
    assert!(first_gap >= Duration::from_millis(900), "{first_gap:?}");
    assert!(second_gap >= Duration::from_millis(1900), "{second_gap:?}");
    assert!(second_gap < Duration::from_secs(10), "{second_gap:?}");
    actix_web::rt::time::sleep(SECS(3)).await;
    assert_eq!(receiver.seen().len(), 3, "nothing after the 2xx");
    let metrics = String::from_utf8(app.call("GET", "/metrics", &[], b"").await.body).unwrap();
    assert!(
        metrics.contains("asyncgate_callback_attempts_total 3\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("asyncgate_callback_failures_total 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("asyncgate_callback_rejected_total{class=\"5xx\"} 2\n"),
        "non-2xx answers are counted by class: {metrics}"
    );
    app.stop().await;
}

#[actix_web::test]
async fn pending_callbacks_survive_a_restart() {
    let up = Fake::start().await;
    let receiver = Fake::start_with(|_, _| Reply::status(503)).await;
    let app = TestApp::start(&up.url(), &[]).await;
    let cb = format!("{}/hook", receiver.url());
    let id = app
        .submit(
            "POST",
            "/async_api/v2/x.json",
            &[("X-Callback-Location", &cb)],
            b"",
        )
        .await;
    receiver.wait_for(1, SECS(10)).await;
    let app = app.restart().await;
    receiver.set(|_, _| Reply::status(200));
    let got = receiver.wait_for(2, SECS(15)).await;
    let body = String::from_utf8(got.last().unwrap().body.clone()).unwrap();
    assert!(body.contains(&format!("response_id={id}")), "{body}");
    app.stop().await;
}

#[actix_web::test]
async fn a_receiver_that_never_answers_holds_up_no_one_elses_callbacks() {
    // Accepts connections and never answers: each callback to it waits
    // out its whole attempt timeout.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn);
        }
    });
    let up = Fake::start().await;
    let receiver = Fake::start().await;
    let app = TestApp::start(&up.url(), &[]).await;
    let hole = format!("http://{silent}/cb");
    for i in 0..100 {
        app.submit(
            "POST",
            &format!("/async_api/v2/h{i}"),
            &[
                ("Authorization", "Bearer hostile"),
                ("X-Callback-Location", &hole),
            ],
            b"",
        )
        .await;
    }
    up.wait_for(100, SECS(20)).await;
    actix_web::rt::time::sleep(SECS(1)).await;
    let started = std::time::Instant::now();
    let cb = format!("{}/hook", receiver.url());
    app.submit(
        "POST",
        "/async_api/v2/mine",
        &[
            ("Authorization", "Bearer owner"),
            ("X-Callback-Location", &cb),
        ],
        b"",
    )
    .await;
    receiver.wait_for(1, SECS(10)).await;
    assert!(
        started.elapsed() < SECS(5),
        "the callback took {:?}",
        started.elapsed()
    );
    app.stop().await;
}
