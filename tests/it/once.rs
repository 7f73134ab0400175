//! Sent once, whatever the upstream does (SPEC §5): hang-ups after
//! reading, cut answers, stale keep-alive connections, hostile
//! `Retry-After` values, failures inside the gateway before sending.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use actix_web::{App, HttpResponse, HttpServer, web};

use crate::helpers::*;

/// A server that reads each connection's whole request (head and
/// `Content-Length` body), writes `answer` (maybe nothing, maybe a cut
/// answer) and closes. Counts the requests it read.
fn read_then_answer(answer: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
    read_answer_and_hold(answer, Duration::ZERO)
}

/// As `read_then_answer`, keeping each connection open for `hold` after
/// the answer.
fn read_answer_and_hold(answer: &'static [u8], hold: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let c = c.clone();
            std::thread::spawn(move || {
                if read_request(&mut conn).is_some() {
                    c.fetch_add(1, Ordering::SeqCst);
                    let _ = conn.write_all(answer);
                    std::thread::sleep(hold);
                }
            });
        }
    });
    (addr, count)
}

/// Reads one request's head and its `Content-Length` body.
fn read_request(conn: &mut std::net::TcpStream) -> Option<Vec<u8>> {
    conn.set_read_timeout(Some(SECS(10))).ok()?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut byte).ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&byte[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = conn.read(&mut byte).ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&byte[..n]);
    }
    Some(buf)
}

async fn metric(app: &TestApp, name: &str) -> u64 {
    let m = String::from_utf8(app.call("GET", "/metrics", &[], b"").await.body).unwrap();
    m.lines()
        .find_map(|l| l.strip_prefix(&format!("asyncgate_{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {m}"))
}

#[actix_web::test]
async fn a_post_whose_connection_closes_after_reading_is_sent_once_and_unknown() {
    let (addr, read) = read_then_answer(b"");
    let app = TestApp::start(&format!("http://{addr}"), &[]).await;
    let post = app
        .submit(
            "POST",
            "/async_api/v2/p",
            &[("Authorization", "Bearer a")],
            &[b'x'; 20_000],
        )
        .await;
    app.wait_for_status(&post, Some("Bearer a"), "unknown", SECS(10))
        .await;
    actix_web::rt::time::sleep(SECS(3)).await;
    assert_eq!(read.load(Ordering::SeqCst), 1, "never sent again");
    // A GET that met the same fate is safe to send again.
    let get = app.submit_as("GET", "/async_api/v2/g", "Bearer b").await;
    let deadline = Instant::now() + SECS(10);
    while read.load(Ordering::SeqCst) < 3 {
        assert!(Instant::now() < deadline, "the GET was not retried");
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(
        app.status(&get, Some("Bearer b")).await.json()["status"],
        "unknown"
    );
    app.stop().await;
}

#[actix_web::test]
async fn a_chunked_answer_cut_between_chunks_is_not_a_result() {
    let (addr, read) =
        read_then_answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n");
    let app = TestApp::start(&format!("http://{addr}"), &[]).await;
    let post = app.submit_as("POST", "/async_api/v2/p", "Bearer a").await;
    let s = app
        .wait_for_status(&post, Some("Bearer a"), "unknown", SECS(10))
        .await;
    assert!(s.json().get("response_http_code").is_none(), "{s:?}");
    actix_web::rt::time::sleep(SECS(2)).await;
    assert_eq!(read.load(Ordering::SeqCst), 1);
    assert_eq!(
        app.status(&post, Some("Bearer a")).await.json()["status"],
        "unknown"
    );
    app.stop().await;
}

#[actix_web::test]
async fn whole_chunked_and_close_delimited_answers_are_results() {
    for (answer, body) in [
        (
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"[..],
            &b"hello world"[..],
        ),
        // No length, no chunks: the body ends with the connection (RFC
        // 9112 §6.3), HTTP/1.0 or 1.1 (awc reads the 1.1 ones as empty:
        // the connector hands their heads on as 1.0).
        (
            &b"HTTP/1.0 200 OK\r\n\r\nuntil the end"[..],
            &b"until the end"[..],
        ),
        (
            &b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbody-until-eof"[..],
            &b"body-until-eof"[..],
        ),
        (
            &b"HTTP/1.1 201 Created\r\nX-A: b\r\n\r\nno connection header either"[..],
            &b"no connection header either"[..],
        ),
        // Interim answers are not the result.
        (
            &b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"[..],
            &b"final"[..],
        ),
    ] {
        let answer: &'static [u8] = Box::leak(answer.to_vec().into_boxed_slice());
        let (addr, read) = read_then_answer(answer);
        let app = TestApp::start(&format!("http://{addr}"), &[]).await;
        let post = app.submit_as("POST", "/async_api/v2/p", "Bearer a").await;
        app.wait_for_status(&post, Some("Bearer a"), "done", SECS(10))
            .await;
        assert_eq!(app.response(&post, Some("Bearer a")).await.body, body);
        assert_eq!(read.load(Ordering::SeqCst), 1);
        app.stop().await;
    }
}

/// A 304 or 204 ends at its head, whatever `Content-Length` it announces (RFC
/// 9112 §6.3): a result at once, its length kept (SPEC §3), never a POST
/// left waiting for a body until the timeout makes it `unknown`.
#[actix_web::test]
async fn a_304_announcing_a_length_is_a_result_at_once() {
    let answers: [(u16, &'static [u8]); 2] = [
        (
            304,
            b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 75\r\n\r\n",
        ),
        (
            204,
            b"HTTP/1.1 204 No Content\r\nContent-Length: 75\r\n\r\n",
        ),
    ];
    for (code, answer) in answers {
        let (addr, read) = read_answer_and_hold(answer, SECS(30));
        let app = TestApp::start(&format!("http://{addr}"), &["--upstream-timeout", "20s"]).await;
        let post = app.submit_as("POST", "/async_api/v2/p", "Bearer a").await;
        let started = Instant::now();
        app.wait_for_status(&post, Some("Bearer a"), "done", SECS(10))
            .await;
        assert!(started.elapsed() < SECS(10), "{:?}", started.elapsed());
        let r = app.response(&post, Some("Bearer a")).await;
        assert_eq!(r.status, code);
        if code == 304 {
            let length = r.headers.iter().find(|(n, _)| n == "content-length");
            assert_eq!(
                length.map(|(_, v)| &v[..]),
                Some(&b"75"[..]),
                "{:?}",
                r.headers
            );
        }
        assert!(r.body.is_empty());
        assert_eq!(read.load(Ordering::SeqCst), 1);
        app.stop().await;
    }
}

#[actix_web::test]
async fn posts_across_an_upstreams_short_keep_alive_are_each_sent_once() {
    // An upstream that closes idle keep-alive connections after 1 s.
    let hits = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let h = hits.clone();
    let server = HttpServer::new(move || {
        let h = h.clone();
        App::new().default_service(web::to(move |req: actix_web::HttpRequest| {
            let h = h.clone();
            async move {
                h.lock().unwrap().push(req.path().to_string());
                HttpResponse::Ok().body("ok")
            }
        }))
    })
    .keep_alive(SECS(1))
    .workers(1)
    .disable_signals()
    .bind("127.0.0.1:0")
    .unwrap();
    let addr = server.addrs()[0];
    actix_web::rt::spawn(server.run());
    let app = TestApp::start(&format!("http://{addr}"), &[]).await;
    let gaps_ms = [1000, 1050, 1100, 1200, 1350, 1500, 1600, 1000];
    let mut ids = Vec::new();
    for (i, gap) in gaps_ms.iter().enumerate() {
        let id = app
            .submit_as("POST", &format!("/async_api/v2/p{i}"), "Bearer a")
            .await;
        app.wait_for_status(&id, Some("Bearer a"), "done", SECS(10))
            .await;
        ids.push(id);
        actix_web::rt::time::sleep(Duration::from_millis(*gap)).await;
    }
    let mut seen = hits.lock().unwrap().clone();
    seen.sort();
    let want: Vec<String> = (0..gaps_ms.len())
        .map(|i| format!("/api/v2/p{i}"))
        .collect();
    assert_eq!(seen, want, "each POST sent exactly once");
    assert_eq!(metric(&app, "upstream_failed_after_send_total").await, 0);
    app.stop().await;
}

/// How many requests the fake saw from one credential.
fn from(up: &Fake, authorization: &str) -> usize {
    up.seen()
        .iter()
        .filter(|s| s.header("authorization") == Some(authorization))
        .count()
}

#[actix_web::test]
async fn an_absurd_retry_after_pauses_only_its_own_credential_also_after_a_restart() {
    let up = Fake::start_with(|req, _| match req.header("authorization") {
        Some("Bearer hostile") => Reply::status(429).header("Retry-After", b"10000000000000000000"),
        _ => Reply::ok("fine"),
    })
    .await;
    let mut app = TestApp::start(&up.url(), &[]).await;
    let hostile = app
        .submit_as("POST", "/async_api/v2/h", "Bearer hostile")
        .await;
    // The embedded store keeps pauses in memory: each start tries the held
    // request once. On PostgreSQL they live in the lane's row, shared by
    // every node and every start (SPEC §12): only the first start tries.
    let shared = crate::backend::postgres().is_some();
    for round in 1..=2 {
        // Then its credential waits a day; every other one runs on.
        let tries = if shared { 1 } else { round };
        let deadline = Instant::now() + SECS(10);
        while from(&up, "Bearer hostile") < tries {
            assert!(Instant::now() < deadline, "the held request was not tried");
            actix_web::rt::time::sleep(Duration::from_millis(20)).await;
        }
        let other = app
            .submit_as("POST", "/async_api/v2/o", "Bearer other")
            .await;
        app.wait_for_status(&other, Some("Bearer other"), "done", SECS(10))
            .await;
        assert_eq!(app.call("GET", "/healthz", &[], b"").await.status, 200);
        actix_web::rt::time::sleep(SECS(2)).await;
        assert_eq!(from(&up, "Bearer hostile"), tries, "one try per pause");
        assert_eq!(
            app.status(&hostile, Some("Bearer hostile")).await.json()["status"],
            "enqueued"
        );
        app = app.restart().await;
    }
    app.stop().await;
}

#[actix_web::test]
async fn zero_past_and_unparseable_retry_after_never_make_a_hot_loop() {
    for value in [&b"0"[..], b"Sun, 06 Nov 1994 08:49:37 GMT", b"soon", b"-3"] {
        let value: &'static [u8] = Box::leak(value.to_vec().into_boxed_slice());
        let up =
            Fake::start_with(move |_, _| Reply::status(429).header("Retry-After", value)).await;
        let app = TestApp::start(&up.url(), &[]).await;
        let id = app.submit_as("POST", "/async_api/v2/x", "Bearer a").await;
        up.wait_for(1, SECS(5)).await;
        actix_web::rt::time::sleep(SECS(4)).await;
        // At least a second between tries: at most 5 in ~4 s.
        let tries = up.seen().len();
        assert!(
            (2..=5).contains(&tries),
            "{}: {tries} tries",
            String::from_utf8_lossy(value)
        );
        // Waiting, or in its next try (never done, never unknown).
        let s = app.status(&id, Some("Bearer a")).await.json();
        assert!(s["status"] == "enqueued" || s["status"] == "started", "{s}");
        app.stop().await;
    }
}

#[actix_web::test]
async fn a_body_that_cannot_be_read_keeps_the_request_enqueued_never_unknown() {
    if crate::backend::embedded_only("empties the journal's files under a stopped gateway") {
        return;
    }
    let up = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Queued while the gateway runs against nothing...
    let app = TestApp::start_in("http://127.0.0.1:9", &[], dir).await;
    let id = app
        .submit("POST", "/async_api/v2/p", &[], &[b'x'; 4096])
        .await;
    let TestApp { data_dir, .. } = {
        let mut app = app;
        app.running.take().unwrap().stop().await.unwrap();
        app
    };
    // ...its body lost from under it...
    for entry in std::fs::read_dir(data_dir.path().join("data/journal")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::write(&path, b"").unwrap();
    }
    // ...and started against a live upstream.
    let app = TestApp::start_in(&up.url(), &[], data_dir).await;
    let deadline = Instant::now() + SECS(10);
    while metric(&app, "internal_failures_total").await < 2 {
        assert!(Instant::now() < deadline, "no failed tries counted");
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
    let s = app.status(&id, None).await.json();
    assert!(s["status"] == "enqueued" || s["status"] == "started", "{s}");
    assert!(up.seen().is_empty(), "nothing was sent");
    // The next start finds it still queued, not `unknown` (it may show
    // `started` for the moment of its next, failing, try).
    let app = app.restart().await;
    let s = app.status(&id, None).await.json();
    assert!(s["status"] == "enqueued" || s["status"] == "started", "{s}");
    actix_web::rt::time::sleep(SECS(2)).await;
    let s = app.status(&id, None).await.json();
    assert!(s["status"] == "enqueued" || s["status"] == "started", "{s}");
    assert!(up.seen().is_empty(), "nothing was sent");
    app.stop().await;
}

#[actix_web::test]
async fn the_pending_cap_is_exact_under_concurrent_submissions() {
    // The first request holds the upstream; the queue behind it fills up.
    let up = Fake::start_with(|_, _| Reply::ok("slow").delay(SECS(20))).await;
    let app = TestApp::start(
        &up.url(),
        &[
            "--max-pending-per-credential",
            "5",
            "--per-credential-concurrency",
            "1",
        ],
    )
    .await;
    let first = app
        .submit_as("POST", "/async_api/v2/first", "Bearer a")
        .await;
    app.wait_for_status(&first, Some("Bearer a"), "started", SECS(10))
        .await;
    let answers = futures_util::future::join_all((0..30).map(|i| {
        let app = &app;
        async move {
            app.call(
                "POST",
                &format!("/async_api/v2/{i}"),
                &[("Authorization", "Bearer a")],
                b"{}",
            )
            .await
        }
    }))
    .await;
    let accepted = answers.iter().filter(|a| a.status == 202).count();
    assert_eq!(accepted, 5, "exactly the cap");
    for a in answers.iter().filter(|a| a.status != 202) {
        assert_eq!(a.status, 429, "{a:?}");
        assert_eq!(a.header("retry-after"), Some("1"));
        assert_eq!(a.json()["error"]["code"], "too_many_pending");
    }
    // Another credential has a queue of its own.
    app.submit_as("POST", "/async_api/v2/b", "Bearer b").await;
    app.stop().await;
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib << 10
}

/// An upstream that answers 204 and only counts (it keeps nothing, so it
/// adds nothing to the memory being measured).
fn counting_upstream() -> (String, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let server = HttpServer::new(move || {
        let c = c.clone();
        App::new().default_service(web::to(move || {
            c.fetch_add(1, Ordering::SeqCst);
            async { HttpResponse::NoContent().finish() }
        }))
    })
    .workers(1)
    .disable_signals()
    .bind("127.0.0.1:0")
    .unwrap();
    let url = format!("http://{}", server.addrs()[0]);
    actix_web::rt::spawn(server.run());
    (url, count)
}

/// SPEC §9: memory is bounded by what is active. The real binary, so its
/// RSS is the gateway's alone. `ASYNCGATE_FLOOD` sets the number of
/// credentials (default 20,000 in CI's debug build; the long mode runs
/// 100,000), `ASYNCGATE_FLOOD_ONE_CREDENTIAL=1` sends the same load from
/// one credential for comparison.
#[actix_web::test]
async fn a_flood_of_distinct_credentials_leaves_no_state_behind() {
    use futures_util::StreamExt;
    let n: usize = std::env::var("ASYNCGATE_FLOOD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let one_credential = std::env::var("ASYNCGATE_FLOOD_ONE_CREDENTIAL").is_ok();
    let (upstream, sent) = counting_upstream();
    let dir = tempfile::tempdir().unwrap();
    let gw = crate::process::Proc::start(
        &upstream,
        &dir.path().join("data"),
        &dir.path().join("log"),
        // Responses expire at once: what is measured is what the
        // credentials cost, not a day of stored results.
        &["--workers", "2", "--retention", "1s"],
    )
    .await;
    let client = awc::Client::builder().timeout(SECS(30)).finish();
    let submit = |who: String| {
        let req = client
            .get(format!("{}/async_api/v2/flood", gw.base))
            .insert_header(("Authorization", who));
        async move {
            let res = req.send().await.expect("the gateway answers");
            assert_eq!(res.status().as_u16(), 202);
        }
    };
    // One series of the gateway's /metrics, e.g. `asyncgate_lanes`.
    let series = |name: &'static str| {
        let req = client.get(format!("{}/metrics", gw.base));
        async move {
            let mut res = req.send().await.unwrap();
            let body = res.body().await.unwrap();
            String::from_utf8_lossy(&body)
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap()
        }
    };
    let lanes = || series("asyncgate_lanes");
    let stored = || series("asyncgate_requests{status=\"done\"}");
    let swept = || async {
        let deadline = Instant::now() + SECS(600);
        while stored().await > 0 {
            assert!(Instant::now() < deadline, "the sweep fell behind");
            actix_web::rt::time::sleep(Duration::from_millis(500)).await;
        }
    };
    let drained = |want: usize| {
        let sent = sent.clone();
        async move {
            let deadline = Instant::now() + SECS(900);
            while sent.load(Ordering::SeqCst) < want {
                assert!(
                    Instant::now() < deadline,
                    "drained {}",
                    sent.load(Ordering::SeqCst)
                );
                actix_web::rt::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    // Warm up until sled's page cache (16 MiB) is full and the allocator's
    // arenas exist, then measure: what grows from then on is what the
    // credentials cost.
    // Warm rounds repeat (up to four) until one adds less than 4 MiB: the
    // store's page cache and the writer's and applier's arenas fill at a
    // pace that differs from machine to machine.
    let round = 20_000;
    let mut warm = 0;
    let mut before = 0;
    for _ in 0..4 {
        futures_util::stream::iter(warm..warm + round)
            .map(|i| submit(format!("Bearer warm-{}", i % 100)))
            .buffer_unordered(32)
            .collect::<Vec<()>>()
            .await;
        warm += round;
        drained(warm).await;
        swept().await;
        let now = rss(gw.child.id());
        let settled = before > 0 && now < before + (4 << 20);
        before = now;
        if settled {
            break;
        }
    }
    let started = Instant::now();
    futures_util::stream::iter(0..n)
        .map(|i| match one_credential {
            // The same load from one credential: the baseline that tells
            // what the store's own growth is.
            true => submit("Bearer flood".to_string()),
            false => submit(format!("Bearer flood-{i}")),
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    drained(warm + n).await;
    // Every lane's state goes once its last send leaves the rate window.
    let deadline = Instant::now() + SECS(10);
    loop {
        let left = lanes().await;
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} lanes left");
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
    swept().await;
    let after = rss(gw.child.id());
    eprintln!(
        "flood of {n} credentials: {:?}, gateway RSS {} -> {} MiB",
        started.elapsed(),
        before >> 20,
        after >> 20
    );
    assert!(
        after <= before + (32 << 20),
        "RSS grew from {} to {} MiB",
        before >> 20,
        after >> 20
    );
    gw.signal("-TERM");
    let (clean, _) = gw.wait_exit(SECS(30)).await;
    assert!(clean, "a clean exit after the flood");
}

#[actix_web::test]
async fn an_upstream_timeout_before_any_request_byte_is_nothing_sent() {
    // Accepts connections and never answers: a TLS handshake that never
    // ends, under an upstream timeout shorter than the connect timeout.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.push(conn);
        }
    });
    let app = TestApp::start(
        &format!("https://{addr}"),
        &["--upstream-timeout", "2s", "--connect-timeout", "5s"],
    )
    .await;
    let post = app.submit_as("POST", "/async_api/v2/p", "Bearer a").await;
    let deadline = Instant::now() + SECS(15);
    while metric(&app, "upstream_unreachable_total").await < 1 {
        assert!(Instant::now() < deadline, "the attempt never ended");
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
    let s = app.status(&post, Some("Bearer a")).await.json();
    assert!(s["status"] == "enqueued" || s["status"] == "started", "{s}");
    assert_eq!(metric(&app, "upstream_failed_after_send_total").await, 0);
    app.stop().await;
}

#[actix_web::test]
async fn a_stop_ends_dispatching_at_once_even_while_http_drains() {
    let up = Fake::start_with(|_, _| Reply::ok("slow").delay(SECS(1))).await;
    let app = TestApp::start(&up.url(), &["--per-credential-concurrency", "1"]).await;
    for i in 0..5 {
        app.submit_as("POST", &format!("/async_api/v2/{i}"), "Bearer a")
            .await;
    }
    up.wait_for(1, SECS(10)).await;
    // A submission whose body is still arriving keeps HTTP draining.
    let addr = app.addr;
    let slow = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(
            b"POST /async_api/v2/late HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\nhalf",
        )
        .unwrap();
        std::thread::sleep(SECS(8));
    });
    actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    let mut app = app;
    app.running.take().unwrap().stop().await.unwrap();
    assert_eq!(
        up.seen().len(),
        1,
        "only the call in flight at the stop went out"
    );
    slow.join().unwrap();
}
