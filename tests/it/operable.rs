//! SPEC §8 and §11, issue 13: the operations listener, the queue-health
//! metrics, and the rough edges a new user hit (unknown routes, 405s,
//! admin query errors).

use crate::helpers::*;

const ADMIN: (&str, &str) = ("Authorization", "Bearer ops-admin");

fn error_code(a: &Answer) -> String {
    a.json()["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[actix_web::test]
async fn ops_endpoints_move_to_the_ops_listener() {
    let up = Fake::start().await;
    let app = TestApp::start(
        &up.url(),
        &["--ops-listen", "127.0.0.1:0", "--admin-token", "ops-admin"],
    )
    .await;
    let ops_addr = app
        .running
        .as_ref()
        .unwrap()
        .ops_addr
        .expect("an ops address");
    assert_ne!(ops_addr, app.addr);
    // The public listener: the API, and 404 (JSON) for the ops endpoints.
    let id = app.submit("GET", "/async_api/v2/x.json", &[], b"").await;
    app.wait_for_status(&id, None, "done", SECS(10)).await;
    for path in ["/healthz", "/metrics", "/openapi.json", "/admin/requests"] {
        let a = app.call("GET", path, &[ADMIN], b"").await;
        assert_eq!(a.status, 404, "{path} on the public listener: {a:?}");
        assert_eq!(error_code(&a), "not_found");
        let msg = a.json()["error"]["message"].to_string();
        assert!(msg.contains("--ops-listen"), "{msg}");
    }
    // The ops listener: those, and nothing of the API.
    let at = &app;
    let get = |path: String, headers: Vec<(&'static str, &'static str)>| async move {
        at.call_at(ops_addr, "GET", &path, &headers, b"").await
    };
    assert_eq!(get("/healthz".into(), vec![]).await.status, 200);
    let m = String::from_utf8(get("/metrics".into(), vec![]).await.body).unwrap();
    assert!(m.contains("asyncgate_accepted_total 1\n"), "{m}");
    let doc = get("/openapi.json".into(), vec![]).await;
    assert_eq!(doc.status, 200);
    assert_eq!(doc.json()["openapi"], "3.1.0");
    let list = get("/admin/requests?status=done".into(), vec![ADMIN]).await;
    assert_eq!(list.status, 200);
    assert_eq!(list.json()["items"][0]["id"], id.as_str());
    assert_eq!(get("/admin/requests".into(), vec![]).await.status, 401);
    for path in [
        "/async_api/v2/x.json".to_string(),
        format!("/async_api/v2/requests/{id}.json"),
        format!("/async_api/v2/responses/{id}.json"),
    ] {
        let a = get(path.clone(), vec![]).await;
        assert_eq!(a.status, 404, "{path} on the ops listener");
        assert_eq!(error_code(&a), "not_found");
    }
    assert_eq!(
        up.seen().len(),
        1,
        "nothing submitted through the ops listener"
    );
    app.stop().await;
}

#[actix_web::test]
async fn metrics_show_pending_callbacks_the_oldest_queued_request_and_paused_lanes() {
    // One credential is refused for a minute: its lane pauses, and its
    // request waits at the head of its queue.
    let up = Fake::start_with(|req, _| {
        if req.header("authorization") == Some("Bearer refused") {
            Reply::status(429).header("Retry-After", b"60")
        } else {
            Reply::ok("{}")
        }
    })
    .await;
    let app = TestApp::start(&up.url(), &[]).await;
    let text = metrics(&app).await;
    for line in [
        "asyncgate_callbacks_pending 0\n",
        "asyncgate_oldest_queued_age_seconds 0\n",
        "asyncgate_lanes_paused{reason=\"rate_limited\"} 0\n",
        "asyncgate_lanes_paused{reason=\"quota_exhausted\"} 0\n",
        "asyncgate_lanes_paused{reason=\"upstream_unreachable\"} 0\n",
        "asyncgate_lanes_paused{reason=\"backoff\"} 0\n",
    ] {
        assert!(text.contains(line), "{line:?} missing from {text}");
    }
    let refused = app
        .submit_as("GET", "/async_api/v2/wait.json", "Bearer refused")
        .await;
    up.wait_for(1, SECS(10)).await;
    app.wait_for_status(&refused, Some("Bearer refused"), "enqueued", SECS(10))
        .await;
    // A callback to a port nobody listens on: retried, so pending.
    let called = app
        .submit(
            "GET",
            "/async_api/v2/cb.json",
            &[("X-Callback-Location", "http://127.0.0.1:9/cb")],
            b"",
        )
        .await;
    app.wait_for_status(&called, None, "done", SECS(10)).await;
    app.wait_for_metric("asyncgate_callback_failures_total", 1, SECS(10))
        .await;
    actix_web::rt::time::sleep(SECS(1)).await;
    let text = metrics(&app).await;
    assert!(
        text.contains("asyncgate_lanes_paused{reason=\"rate_limited\"} 1\n"),
        "{text}"
    );
    assert!(text.contains("asyncgate_callbacks_pending 1\n"), "{text}");
    let age: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("asyncgate_oldest_queued_age_seconds "))
        .unwrap()
        .parse()
        .unwrap();
    assert!((1.0..30.0).contains(&age), "{age}");
    // No per-credential label anywhere: a million credentials must not
    // make a million series.
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let labels = line.split_once('{').map_or("", |(_, l)| l);
        for pair in labels.split(',').filter(|p| p.contains('=')) {
            let key = pair.split('=').next().unwrap();
            assert!(
                ["status", "code", "reason", "le", "class"].contains(&key),
                "{line}"
            );
        }
    }
    assert!(!text.contains("Bearer"), "{text}");
    // Cancelled: nothing queued any more.
    let a = app
        .call(
            "DELETE",
            &format!("/async_api/v2/requests/{refused}.json"),
            &[("Authorization", "Bearer refused")],
            b"",
        )
        .await;
    assert_eq!(a.status, 204);
    assert_eq!(
        app.metric("asyncgate_oldest_queued_age_seconds").await,
        Some(0)
    );
    app.stop().await;
}

async fn metrics(app: &TestApp) -> String {
    String::from_utf8(app.call("GET", "/metrics", &[], b"").await.body).unwrap()
}

#[actix_web::test]
async fn unknown_routes_say_what_the_gateway_serves() {
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &[]).await;
    for (path, hint) in [
        ("/", None),
        ("/favicon.ico", None),
        (
            "/api/v2/campaigns.json?x=1",
            Some("did you mean /async_api/v2/campaigns.json?"),
        ),
        ("/async_api", None),
    ] {
        let a = app.call("GET", path, &[], b"").await;
        assert_eq!(a.status, 404, "{path}");
        assert_eq!(error_code(&a), "not_found", "{path}");
        let msg = a.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.contains("/async_api/"), "{path}: {msg}");
        assert!(!msg.contains("no such request"), "{path}: {msg}");
        if let Some(hint) = hint {
            assert!(msg.contains(hint), "{path}: {msg}");
        }
    }
    // A lookup of a request that is not there still says just that.
    let a = app
        .call("GET", "/async_api/v2/requests/nope.json", &[], b"")
        .await;
    assert_eq!(a.json()["error"]["message"], "no such request");
    assert!(up.seen().is_empty());
    app.stop().await;
}

#[actix_web::test]
async fn every_405_says_what_the_path_allows() {
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &["--admin-token", "ops-admin"]).await;
    let id = "01JDQ8M3Z1X4A6QF0W3N9YB2KD";
    for (method, path, allow) in [
        (
            "POST",
            format!("/async_api/v2/requests/{id}.json"),
            "GET, HEAD, DELETE",
        ),
        (
            "PUT",
            format!("/async_api/v2/requests/{id}.json"),
            "GET, HEAD, DELETE",
        ),
        (
            "DELETE",
            format!("/async_api/v2/responses/{id}.json"),
            "GET, HEAD",
        ),
        (
            "POST",
            format!("/async_api/v2/responses/{id}.json"),
            "GET, HEAD",
        ),
        ("GET", "/async_api/v2/requests.json".into(), "POST"),
        ("DELETE", "/async_api/v2/requests.json".into(), "POST"),
        ("POST", "/healthz".into(), "GET, HEAD"),
        ("DELETE", "/metrics".into(), "GET, HEAD"),
        ("PUT", "/openapi.json".into(), "GET, HEAD"),
        ("POST", "/admin/requests".into(), "GET"),
        ("GET", format!("/admin/requests/{id}/requeue"), "POST"),
        ("GET", format!("/admin/requests/{id}"), "DELETE"),
    ] {
        let a = app.call(method, &path, &[ADMIN], b"").await;
        assert_eq!(a.status, 405, "{method} {path}: {a:?}");
        assert_eq!(a.header("allow"), Some(allow), "{method} {path}");
        assert_eq!(error_code(&a), "method_not_allowed");
    }
    for method in ["TRACE", "CONNECT"] {
        let raw = raw_request(
            app.addr,
            format!(
                "{method} /async_api/v2/x.json HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .into_bytes(),
        )
        .await;
        assert!(raw.starts_with("HTTP/1.1 405"), "{method}: {raw}");
        assert!(raw.to_ascii_lowercase().contains("\r\nallow: "), "{raw}");
    }
    // Without the token the admin API says nothing about its methods.
    let a = app.call("POST", "/admin/requests", &[], b"").await;
    assert_eq!(a.status, 401);
    assert!(up.seen().is_empty());
    app.stop().await;
}

#[actix_web::test]
async fn admin_query_errors_are_json_and_limits_are_1_to_1000() {
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &["--admin-token", "ops-admin"]).await;
    app.submit("GET", "/async_api/v2/x.json", &[], b"").await;
    for limit in [
        "abc",
        "-1",
        "0",
        "1001",
        "1.5",
        "",
        "99999999999999999999999",
    ] {
        let a = app
            .call(
                "GET",
                &format!("/admin/requests?limit={limit}"),
                &[ADMIN],
                b"",
            )
            .await;
        assert_eq!(a.status, 400, "limit={limit}: {a:?}");
        assert!(
            a.header("content-type")
                .unwrap()
                .starts_with("application/json")
        );
        assert_eq!(error_code(&a), "invalid_limit", "limit={limit}");
    }
    for (query, code) in [
        ("status=lost", "invalid_status"),
        ("after=zzz", "invalid_after"),
        ("limit=1&limit=2", "invalid_query"),
    ] {
        let a = app
            .call("GET", &format!("/admin/requests?{query}"), &[ADMIN], b"")
            .await;
        assert_eq!((a.status, error_code(&a).as_str()), (400, code), "{query}");
    }
    for limit in ["1", "1000"] {
        let a = app
            .call(
                "GET",
                &format!("/admin/requests?status=enqueued&limit={limit}"),
                &[ADMIN],
                b"",
            )
            .await;
        assert_eq!(a.status, 200, "limit={limit}");
    }
    app.stop().await;
}
