//! SPEC §1: submissions, what is forwarded, what is refused.

use crate::helpers::*;

#[actix_web::test]
async fn submit_answers_202_with_location_and_body() {
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &[]).await;
    let a = app
        .call(
            "POST",
            "/async_api/v2/campaigns.json",
            &[("Authorization", "Bearer t")],
            b"{}",
        )
        .await;
    assert_eq!(a.status, 202);
    let body = a.json();
    let id = body["id"].as_str().unwrap();
    assert_eq!(id.len(), 26);
    assert_eq!(
        a.header("location").unwrap(),
        format!("/async_api/v2/requests/{id}.json")
    );
    assert_eq!(a.header("content-type").unwrap(), "application/json");
    assert_eq!(body["status"], "enqueued");
    let created = body["created"].as_str().unwrap();
    assert_eq!(created.len(), 19, "{created}");
    assert_eq!(&created[4..5], "-");
    assert_eq!(&created[10..11], " ");
    app.stop().await;
}

#[actix_web::test]
async fn the_request_is_forwarded_as_received() {
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &[]).await;
    let body: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let id = app
        .submit(
            "PATCH",
            "/async_api/v2/campaigns/7.json?fields=id,name&q=%20a+b&q=2",
            &[
                ("Authorization", "Bearer secret-token"),
                ("X-Multi", "one"),
                ("X-Multi", "two"),
                ("Content-Type", "application/octet-stream"),
                ("Accept-Encoding", "gzip"),
                ("X-Callback-Location", "http://127.0.0.1:9/cb"),
                ("X-Callback-Method", "GET"),
            ],
            &body,
        )
        .await;
    let seen = up.wait_for(1, SECS(10)).await;
    let r = &seen[0];
    assert_eq!(r.method, "PATCH");
    assert_eq!(
        r.uri,
        "/api/v2/campaigns/7.json?fields=id,name&q=%20a+b&q=2"
    );
    assert_eq!(r.body, body, "body bytes unchanged");
    assert_eq!(r.header_values("x-multi"), [b"one".as_slice(), b"two"]);
    assert_eq!(r.header("authorization"), Some("Bearer secret-token"));
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(
        r.header("accept-encoding"),
        Some("gzip"),
        "the client's own, not awc's"
    );
    assert_eq!(r.header("content-length"), Some("300000"));
    assert_eq!(r.header("host"), Some(up.addr.to_string().as_str()));
    // No header of awc's own; only `Date`, which actix-http's HTTP/1 encoder
    // writes into every message that lacks one (see README).
    for gone in ["x-callback-location", "x-callback-method", "user-agent"] {
        assert!(
            r.header(gone).is_none(),
            "{gone} must not be forwarded: {:?}",
            r.headers
        );
    }
    app.wait_for_status(&id, Some("Bearer secret-token"), "done", SECS(10))
        .await;
    app.stop().await;
}

#[actix_web::test]
async fn hop_by_hop_headers_and_those_connection_names_are_not_forwarded() {
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &[]).await;
    let raw = "POST /async_api/v2/x.json HTTP/1.1\r\nHost: gw\r\nConnection: close, X-Hop\r\n\
               X-Hop: dropped\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: h2c\r\n\
               Proxy-Connection: keep-alive\r\nX-Kept: yes\r\nTransfer-Encoding: chunked\r\n\r\n\
               5\r\nhello\r\n0\r\n\r\n";
    let answer = raw_request(app.addr, raw.as_bytes().to_vec()).await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    let seen = up.wait_for(1, SECS(10)).await;
    let r = &seen[0];
    assert_eq!(r.body, b"hello");
    assert_eq!(r.header("x-kept"), Some("yes"));
    assert_eq!(r.header("content-length"), Some("5"), "recomputed");
    for gone in [
        "x-hop",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-connection",
        "transfer-encoding",
    ] {
        assert!(
            r.header(gone).is_none(),
            "{gone} must not be forwarded: {:?}",
            r.headers
        );
    }
    app.stop().await;
}

#[actix_web::test]
async fn every_method_but_connect_and_trace_is_accepted() {
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &[]).await;
    for m in ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"] {
        let a = app.call(m, "/async_api/v1/x.json", &[], b"").await;
        assert_eq!(a.status, 202, "{m}");
        assert!(
            a.header("location")
                .unwrap()
                .starts_with("/async_api/v2/requests/")
        );
    }
    let a = app.call("TRACE", "/async_api/v1/x.json", &[], b"").await;
    assert_eq!(a.status, 405);
    assert_eq!(a.json()["error"]["code"], "method_not_allowed");
    let seen = up.wait_for(7, SECS(10)).await;
    let mut methods: Vec<&str> = seen.iter().map(|s| s.method.as_str()).collect();
    methods.sort();
    assert_eq!(
        methods,
        ["DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"]
    );
    app.stop().await;
}

#[actix_web::test]
async fn bad_submissions_get_a_json_4xx_and_nothing_is_stored_or_sent() {
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &["--max-body-size", "1KiB"]).await;
    type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<u8>, u16, &'a str);
    let big_header = "h".repeat(10 * 1024);
    let cases: Vec<Case> = vec![
        (
            vec![("X-Callback-Location", "/relative")],
            vec![],
            400,
            "invalid_callback_location",
        ),
        (
            vec![("X-Callback-Location", "ftp://x.example/cb")],
            vec![],
            400,
            "invalid_callback_location",
        ),
        (
            vec![
                ("X-Callback-Location", "http://x.example/cb"),
                ("X-Callback-Method", "PUT"),
            ],
            vec![],
            400,
            "invalid_callback_method",
        ),
        (
            vec![
                ("X-Callback-Location", "http://a.example/"),
                ("X-Callback-Location", "http://b.example/"),
            ],
            vec![],
            400,
            "multiple_callback_location",
        ),
        (
            vec![("Authorization", "Bearer a"), ("Authorization", "Bearer b")],
            vec![],
            400,
            "multiple_authorization",
        ),
        (vec![], vec![b'x'; 1025], 413, "body_too_large"),
        (
            vec![("X-Big", big_header.as_str())],
            vec![],
            431,
            "headers_too_large",
        ),
    ];
    for (headers, body, status, code) in cases {
        let a = app
            .call("POST", "/async_api/v2/x.json", &headers, &body)
            .await;
        assert_eq!(a.status, status, "{headers:?}: {a:?}");
        assert_eq!(a.json()["error"]["code"], code, "{headers:?}");
        assert!(a.json()["error"]["message"].as_str().unwrap().len() > 10);
    }
    // Exactly at the limit is fine; a method header without a location is ignored.
    let ok = app
        .call(
            "POST",
            "/async_api/v2/x.json",
            &[("X-Callback-Method", "DELETE")],
            &[b'x'; 1024],
        )
        .await;
    assert_eq!(ok.status, 202);
    up.wait_for(1, SECS(10)).await;
    actix_web::rt::time::sleep(SECS(1)).await;
    assert_eq!(
        up.seen().len(),
        1,
        "only the good submission reached the upstream"
    );
    let metrics = app.call("GET", "/metrics", &[], b"").await;
    let text = String::from_utf8(metrics.body).unwrap();
    assert!(text.contains("asyncgate_accepted_total 1\n"), "{text}");
    app.stop().await;
}

#[actix_web::test]
async fn reserved_paths_are_never_forwarded() {
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &[]).await;
    for (method, path, status) in [
        // Bulk status (SPEC §10): POST only, and an empty body is a 400.
        ("GET", "/async_api/v2/requests.json", 405),
        ("POST", "/async_api/v2/requests.json", 400),
        ("GET", "/async_api/v2/requests/nope.json", 404),
        (
            "POST",
            "/async_api/v2/requests/01JDQ8M3Z1X4A6QF0W3N9YB2KD.json",
            405,
        ),
        (
            "DELETE",
            "/async_api/v2/responses/01JDQ8M3Z1X4A6QF0W3N9YB2KD.json",
            405,
        ),
        ("GET", "/async_api/v2/requests/a/b", 404),
        ("POST", "/async_api/v2/responses/a/b", 404),
        ("GET", "/admin/requests", 404),
        ("POST", "/healthz", 405),
        ("GET", "/api/v2/x.json", 404),
        ("POST", "/async_api", 404),
        ("POST", "/async_apix/v2", 404),
        ("GET", "/async_api/v2/requests", 404),
        ("DELETE", "/async_api/v2/requests.json", 405),
        ("GET", "/async_api/v2/responses/", 404),
        ("POST", "/admin", 404),
    ] {
        let a = app.call(method, path, &[], b"").await;
        assert_eq!(a.status, status, "{method} {path}");
        assert!(
            a.json()["error"]["code"].is_string(),
            "{method} {path}: JSON error body"
        );
    }
    actix_web::rt::time::sleep(SECS(1)).await;
    assert!(up.seen().is_empty());
    app.stop().await;
}
