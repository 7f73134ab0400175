//! What SPEC §10 costs: thousands of held long-polls, bulk status of a
//! thousand ids, and accept with an `Idempotency-Key` on every submission.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::load::{self, Load, Stats, percentile};
use crate::servers::{Gateway, Upstream};
use crate::{Row, ms, post_load};

/// Submits `n` requests (64 at a time) to `path` (`{i}` replaced); their ids
/// in order.
fn submit_many(base: &str, n: usize, path: &str) -> Vec<String> {
    let (base, path) = (base.to_string(), path.to_string());
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let client = awc::Client::builder()
                .timeout(Duration::from_secs(60))
                .connector(awc::Connector::new().limit(0))
                .finish();
            let mut ids = vec![String::new(); n];
            for chunk in (0..n).collect::<Vec<_>>().chunks(64) {
                let calls = chunk.iter().map(|&i| {
                    let (client, url) = (
                        &client,
                        format!("{base}{}", path.replace("{i}", &i.to_string())),
                    );
                    async move {
                        let mut res = client
                            .post(url)
                            .insert_header(("Authorization", "Bearer scripts"))
                            .send_body(vec![b'x'; 64])
                            .await
                            .expect("submit");
                        let v: serde_json::Value = res.json().await.expect("json");
                        (i, v["id"].as_str().expect("id").to_string())
                    }
                });
                for (i, id) in futures_util::future::join_all(calls).await {
                    ids[i] = id;
                }
            }
            ids
        })
    })
    .join()
    .expect("submitting")
}

/// `n` requests held by `Prefer: wait` at once while the upstream holds
/// them, then released: the gateway's RSS with them waiting, and the time
/// from the upstream's answer to each waiter's.
pub fn held(n: usize, upstream: &str, up: &Upstream, data: &std::path::Path) -> Row {
    let flags = ["--per-credential-concurrency", "64", "--max-wait", "600s"];
    // Queued while the upstream refuses (the lane pauses for an hour)...
    up.refuse.store(true, Ordering::Relaxed);
    let (gw, _) = Gateway::start(upstream, data, &flags);
    let ids = submit_many(&gw.base, n, "/async_api/v2/held/{i}.json");
    gw.stop();
    // ...then started again against an upstream that holds what it gets.
    up.refuse.store(false, Ordering::Relaxed);
    up.hold.store(true, Ordering::Relaxed);
    up.answered.lock().expect("answered").clear();
    up.record.store(true, Ordering::Relaxed);
    let (gw, _) = Gateway::start(upstream, data, &flags);
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = gw.rss_bytes();
    let base = gw.base.clone();
    let waiters = std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let client = awc::Client::builder()
                .disable_redirects()
                .timeout(Duration::from_secs(900))
                .connector(
                    awc::Connector::new()
                        .limit(0)
                        .timeout(Duration::from_secs(30)),
                )
                .finish();
            let calls = ids.iter().enumerate().map(|(i, id)| {
                let (client, url) = (&client, format!("{base}/async_api/v2/requests/{id}.json"));
                async move {
                    let mut res = client
                        .get(url)
                        .insert_header(("Authorization", "Bearer scripts"))
                        .insert_header(("Prefer", "wait=600"))
                        .send()
                        .await
                        .expect("held status");
                    let _ = res.body().await;
                    (i, res.status().as_u16(), Instant::now())
                }
            });
            futures_util::future::join_all(calls).await
        })
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    while held_now(&gw.base) < n as u64 {
        assert!(
            Instant::now() < deadline,
            "never {n} held: {}",
            held_now(&gw.base)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let rss_held = gw.rss_bytes();
    up.hold.store(false, Ordering::Relaxed);
    let answers = waiters.join().expect("waiters");
    up.record.store(false, Ordering::Relaxed);
    drop(gw);
    let answered = up.answered.lock().expect("answered").clone();
    let mut lags: Vec<Duration> = answers
        .iter()
        .filter(|(_, code, _)| *code == 303)
        .filter_map(|(i, _, at)| {
            let upstream_at = answered.get(&format!("/api/v2/held/{i}.json"))?;
            Some(at.saturating_duration_since(*upstream_at))
        })
        .collect();
    lags.sort();
    let not_done = n - lags.len();
    let (p50, p99) = (percentile(&lags, 0.5), percentile(&lags, 0.99));
    let grew = rss_held.saturating_sub(rss_before);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    Row {
        scenario: "held long-polls (Prefer: wait), released together",
        figure: format!(
            "{n} held: RSS {:.0} → {:.0} MiB (+{:.0}); upstream answer → waiter's answer p50 {}, p99 {} ({not_done} not answered done)",
            mib(rss_before),
            mib(rss_held),
            mib(grew),
            ms(p50),
            ms(p99)
        ),
        baseline: "—".into(),
        ratio: None,
        target: "RSS growth ≤ 100 MiB, p99 ≤ 10 ms",
        met: grew <= 100 << 20 && p99 <= Duration::from_millis(10) && not_done == 0,
    }
}

fn held_now(base: &str) -> u64 {
    crate::metric(base, "asyncgate_held_requests")
        .parse()
        .unwrap_or(0)
}

/// Bulk status of 1,000 done requests, 4 connections.
pub fn bulk(secs: u64, upstream: &str, up: &Upstream, data: &std::path::Path) -> Row {
    up.refuse.store(false, Ordering::Relaxed);
    up.hold.store(false, Ordering::Relaxed);
    let (gw, _) = Gateway::start(upstream, data, &["--per-credential-concurrency", "64"]);
    let ids = submit_many(&gw.base, 1000, "/async_api/v2/bulk/{i}.json");
    let deadline = Instant::now() + Duration::from_secs(60);
    while crate::metric(&gw.base, "asyncgate_requests{status=\"done\"}") != "1000" {
        assert!(Instant::now() < deadline, "the 1,000 never finished");
        std::thread::sleep(Duration::from_millis(50));
    }
    let body = serde_json::to_vec(&serde_json::json!({ "ids": ids })).expect("json");
    let got = load::run(Load {
        method: "POST",
        url: format!("{}/async_api/v2/requests.json", gw.base),
        headers: vec![
            ("Authorization".into(), "Bearer scripts".into()),
            ("Content-Type".into(), "application/json".into()),
        ],
        body,
        concurrency: 4,
        requests: usize::MAX,
        duration: Duration::from_secs(secs),
        expect: 200,
        rate: None,
    });
    let p99 = got.percentile(0.99);
    Row {
        scenario: "bulk status of 1,000 ids, 4 connections",
        figure: format!(
            "{:.0} answers/s, p50 {}, p99 {} ({} errors)",
            got.rate(),
            ms(got.percentile(0.5)),
            ms(p99),
            got.errors
        ),
        baseline: "—".into(),
        ratio: None,
        target: "p99 ≤ 20 ms",
        met: p99 <= Duration::from_millis(20) && got.errors == 0,
    }
}

/// Accept with a distinct `Idempotency-Key` on every submission against
/// accept without: two gateways side by side, loaded in turn, five turns
/// each, so that a change in the machine's load meets both alike.
pub fn keyed_accept(secs: u64, upstream: &str, up: &Upstream, data: &std::path::Path) -> Row {
    const TURNS: u32 = 5;
    up.refuse.store(true, Ordering::Relaxed); // nothing runs: accepting only
    let (plain_gw, _) = Gateway::start(upstream, &data.join("plain"), &[]);
    let (keyed_gw, _) = Gateway::start(upstream, &data.join("keyed"), &[]);
    let turn = Duration::from_secs(secs) / TURNS;
    let load = |gw: &Gateway, key: Option<String>| {
        let mut l = post_load(
            format!("{}/async_api/v2/bench.json", gw.base),
            64,
            usize::MAX,
            0,
        );
        l.duration = turn;
        l.headers.extend(key.map(|k| ("Idempotency-Key".into(), k)));
        load::run(l)
    };
    let (mut plain, mut keyed) = (Vec::new(), Vec::new());
    for t in 0..TURNS {
        plain.push(load(&plain_gw, None));
        keyed.push(load(&keyed_gw, Some(format!("bench-{t}-{{i}}"))));
    }
    let (plain, keyed) = (Stats::merge(plain), Stats::merge(keyed));
    let ratio = keyed.rate() / plain.rate();
    Row {
        scenario: "accept with an Idempotency-Key on every submission",
        figure: format!(
            "{:.0} req/s, p99 {} ({} errors)",
            keyed.rate(),
            ms(keyed.percentile(0.99)),
            keyed.errors
        ),
        baseline: format!(
            "without keys: {:.0} req/s, p99 {}",
            plain.rate(),
            ms(plain.percentile(0.99))
        ),
        ratio: Some(ratio),
        target: "≥ 0.9×",
        met: ratio >= 0.9,
    }
}
