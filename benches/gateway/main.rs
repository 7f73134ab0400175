//! asyncgate's benchmarks: the release gateway (as a process) against
//! baselines measured in the same run on the same machine, reported as
//! ratios (these machines are noisy; absolute numbers drift).
//!
//!     cargo bench --bench gateway              # full run, writes benches/RESULTS.md
//!     cargo bench --bench gateway -- --quick   # seconds; CI runs it so it cannot rot
//!     cargo bench --bench gateway -- --steady-secs 300   # a shorter steady state (default 1800)
//!     cargo bench --bench gateway -- --only pending   # one scenario: accept, polls, e2e,
//!                                                     # dispatch, pending, sweep, held,
//!                                                     # bulk, keyed, postgres, cluster
//!                                                     # or steady
//!
//! Timings never fail anything: the table says which targets were met.

mod cluster;
mod load;
mod postgres;
mod report;
mod retention;
mod scripts;
mod servers;
mod steady;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use load::{Load, Stats, percentile};
use servers::{Gateway, Upstream};

#[derive(Clone)]
struct Sizes {
    load_secs: u64,
    /// The steady state: how long, and the retention it runs with.
    steady_secs: u64,
    steady_retention_secs: u64,
    /// Long-polls held at once.
    held: usize,
    e2e: usize,
    dispatch_samples: usize,
    pending: usize,
    sweep: usize,
}

pub(crate) struct Row {
    scenario: &'static str,
    figure: String,
    baseline: String,
    ratio: Option<f64>,
    target: &'static str,
    met: bool,
}

pub(crate) const BODY_1K: usize = 1024;
/// The heading of RESULTS.md's hand-written part, kept across runs.
const FINDINGS: &str = "## What the profiles showed";

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes = if quick {
        Sizes {
            load_secs: 2,
            steady_secs: 60,
            steady_retention_secs: 10,
            held: 1_000,
            e2e: 3_000,
            dispatch_samples: 50,
            pending: 5_000,
            sweep: 5_000,
        }
    } else {
        Sizes {
            load_secs: 10,
            steady_secs: 1800,
            steady_retention_secs: 60,
            held: 10_000,
            e2e: 100_000,
            dispatch_samples: 500,
            pending: 1_000_000,
            sweep: 1_000_000,
        }
    };
    // `--steady-secs N` shortens the steady state of a full run (its
    // table says how long it ran).
    let mut sizes = sizes;
    if let Some(n) = std::env::args()
        .skip_while(|a| a != "--steady-secs")
        .nth(1)
        .and_then(|n| n.parse().ok())
    {
        sizes.steady_secs = n;
    }
    let up_state = Upstream::default();
    let up = servers::upstream(up_state.clone());
    let upstream_url = format!("http://{}", up.addr);
    let mut rows = Vec::new();
    let scratch = tempfile::tempdir().expect("scratch dir");
    let dir = |name: &str| scratch.path().join(name);

    // `--only NAME` runs one scenario (and writes no RESULTS.md).
    let only = std::env::args().skip_while(|a| a != "--only").nth(1);
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    if run("accept") {
        eprintln!("accept ...");
        rows.push(accept(&sizes, &upstream_url, &up_state, &dir("accept")));
    }
    if run("polls") {
        eprintln!("status polls ...");
        rows.push(polls(&sizes, &upstream_url, &up_state, &dir("polls")));
    }
    let mut drain_rate = None;
    if run("e2e") {
        eprintln!("end to end ...");
        let (row, rate) = end_to_end(&sizes, &upstream_url, &up_state, &dir("e2e"));
        rows.push(row);
        drain_rate = Some(rate);
    }
    if run("dispatch") {
        eprintln!("idle dispatch latency ...");
        rows.extend(dispatch_latency(
            &sizes,
            &upstream_url,
            &up_state,
            &dir("dispatch"),
        ));
    }
    if run("pending") {
        eprintln!("{} pending ...", sizes.pending);
        rows.extend(pending(&sizes, &upstream_url, &up_state, &dir("pending")));
    }
    if run("sweep") {
        eprintln!("retention sweep of {} ...", sizes.sweep);
        rows.push(retention::sweep(
            &sizes,
            &upstream_url,
            &up_state,
            &dir("sweep-idle"),
            &dir("sweep"),
        ));
    }

    if run("held") {
        eprintln!("{} held long-polls ...", sizes.held);
        rows.push(scripts::held(
            sizes.held,
            &upstream_url,
            &up_state,
            &dir("held"),
        ));
    }
    if run("bulk") {
        eprintln!("bulk status ...");
        rows.push(scripts::bulk(
            sizes.load_secs,
            &upstream_url,
            &up_state,
            &dir("bulk"),
        ));
    }
    if run("keyed") {
        eprintln!("accept with Idempotency-Key ...");
        rows.push(scripts::keyed_accept(
            sizes.load_secs,
            &upstream_url,
            &up_state,
            &dir("keyed"),
        ));
    }
    if run("postgres") {
        eprintln!("the PostgreSQL store beside the embedded one ...");
        rows.extend(postgres::compare(
            sizes.load_secs,
            sizes.e2e,
            &upstream_url,
            &up_state,
            scratch.path(),
        ));
    }
    if run("cluster") {
        eprintln!("three nodes on one PostgreSQL beside one node ...");
        rows.extend(cluster::compare(
            sizes.load_secs,
            sizes.e2e,
            &upstream_url,
            &up_state,
            scratch.path(),
        ));
    }
    if run("steady") {
        // 70% of the drain rate measured in this run (a small drain first
        // when the end-to-end scenario did not run).
        let rate = drain_rate.unwrap_or_else(|| {
            let small = Sizes {
                e2e: 3_000,
                ..sizes.clone()
            };
            end_to_end(&small, &upstream_url, &up_state, &dir("e2e-small")).1
        });
        eprintln!("steady state for {} s ...", sizes.steady_secs);
        rows.push(steady::steady(
            sizes.steady_secs,
            sizes.steady_retention_secs,
            rate,
            &upstream_url,
            &up_state,
            &dir("steady"),
        ));
    }

    let table = report::render(&rows);
    println!("{table}");
    if !quick && only.is_none() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/RESULTS.md");
        // The findings written by hand below the table are kept.
        let old = std::fs::read_to_string(path).unwrap_or_default();
        let findings = old.find(FINDINGS).map_or("", |at| &old[at..]);
        std::fs::write(path, report::results_md(&table) + findings).expect("write RESULTS.md");
        eprintln!("written to {path}");
    }
}

pub(crate) fn post_load(url: String, concurrency: usize, requests: usize, secs: u64) -> Load {
    Load {
        method: "POST",
        url,
        headers: vec![
            ("Authorization".into(), "Bearer bench".into()),
            ("Content-Type".into(), "application/json".into()),
        ],
        body: vec![b'x'; BODY_1K],
        concurrency,
        requests,
        duration: Duration::from_secs(secs),
        expect: 202,
        rate: None,
    }
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn accept(s: &Sizes, upstream: &str, up: &Upstream, data: &std::path::Path) -> Row {
    up.refuse.store(true, Ordering::Relaxed); // nothing runs: accepting only
    let base = servers::plain_accept();
    let baseline = load::run(post_load(
        format!("http://{}/async_api/v2/bench.json", base.addr),
        64,
        usize::MAX,
        s.load_secs,
    ));
    let (gw, _) = Gateway::start(upstream, data, &[]);
    let got = load::run(post_load(
        format!("{}/async_api/v2/bench.json", gw.base),
        64,
        usize::MAX,
        s.load_secs,
    ));
    let ratio = got.rate() / baseline.rate();
    let p99 = got.percentile(0.99);
    Row {
        scenario: "accept: 1 KiB POSTs, 64 connections, durable 202",
        figure: format!(
            "{:.0} req/s, p99 {} ({} errors)",
            got.rate(),
            ms(p99),
            got.errors
        ),
        baseline: format!(
            "plain actix-web handler: {:.0} req/s, p99 {}",
            baseline.rate(),
            ms(baseline.percentile(0.99))
        ),
        ratio: Some(ratio),
        target: "≥ 0.5×, p99 ≤ 10 ms",
        met: ratio >= 0.5 && p99 <= Duration::from_millis(10),
    }
}

pub(crate) fn submit_one(base: &str, path: &str) -> String {
    actix_web::rt::System::new().block_on(async {
        let mut res = awc::Client::default()
            .post(format!("{base}{path}"))
            .insert_header(("Authorization", "Bearer bench"))
            .send_body("{}")
            .await
            .expect("submit");
        let v: serde_json::Value = res.json().await.expect("json");
        v["id"].as_str().expect("id").to_string()
    })
}

fn polls(s: &Sizes, upstream: &str, up: &Upstream, data: &std::path::Path) -> Row {
    up.refuse.store(false, Ordering::Relaxed);
    let (gw, _) = Gateway::start(upstream, data, &[]);
    let id = submit_one(&gw.base, "/async_api/v2/polled.json");
    std::thread::sleep(Duration::from_millis(500));
    let get = |url: String, expect: u16| Load {
        method: "GET",
        url,
        headers: vec![("Authorization".into(), "Bearer bench".into())],
        body: vec![],
        concurrency: 64,
        requests: usize::MAX,
        duration: Duration::from_secs(s.load_secs),
        expect,
        rate: None,
    };
    let base = servers::small_json();
    let baseline = load::run(get(format!("http://{}/status.json", base.addr), 200));
    let got = load::run(get(
        format!("{}/async_api/v2/requests/{id}.json", gw.base),
        303,
    ));
    let ratio = got.rate() / baseline.rate();
    Row {
        scenario: "status polls of a done request (303), 64 connections",
        figure: format!(
            "{:.0} req/s, p99 {} ({} errors)",
            got.rate(),
            ms(got.percentile(0.99)),
            got.errors
        ),
        baseline: format!("actix-web small JSON: {:.0} req/s", baseline.rate()),
        ratio: Some(ratio),
        target: "≥ 0.7×",
        met: ratio >= 0.7,
    }
}

fn end_to_end(s: &Sizes, upstream: &str, up: &Upstream, data: &std::path::Path) -> (Row, f64) {
    // Baseline: the same requests straight to the upstream with awc.
    up.refuse.store(false, Ordering::Relaxed);
    let mut direct = post_load(format!("{upstream}/api/v2/bench.json"), 64, s.e2e, 600);
    direct.expect = 200;
    let baseline = load::run(direct);
    // Queue them while the upstream refuses (the lane pauses for an hour)...
    up.refuse.store(true, Ordering::Relaxed);
    let flags = ["--per-credential-concurrency", "64"];
    let (gw, _) = Gateway::start(upstream, data, &flags);
    let queued = load::run(post_load(
        format!("{}/async_api/v2/bench.json", gw.base),
        64,
        s.e2e,
        600,
    ));
    gw.stop();
    // ...then drain them through the fast upstream from a fresh start.
    up.refuse.store(false, Ordering::Relaxed);
    up.count.store(0, Ordering::Relaxed);
    let t = Instant::now();
    let (gw, _) = Gateway::start(upstream, data, &flags);
    while up.count.load(Ordering::Relaxed) < queued.done {
        assert!(t.elapsed() < Duration::from_secs(1800), "drain stalled");
        std::thread::sleep(Duration::from_millis(5));
    }
    let rate = queued.done as f64 / t.elapsed().as_secs_f64();
    drop(gw);
    let ratio = rate / baseline.rate();
    let row = Row {
        scenario: "end to end: queued requests drained through a fast upstream",
        figure: format!("{} drained at {rate:.0}/s", queued.done),
        baseline: format!("direct awc to the upstream: {:.0}/s", baseline.rate()),
        ratio: Some(ratio),
        target: "≥ 0.25×",
        met: ratio >= 0.25,
    };
    (row, rate)
}

fn dispatch_latency(s: &Sizes, upstream: &str, up: &Upstream, data: &std::path::Path) -> Vec<Row> {
    up.refuse.store(false, Ordering::Relaxed);
    let (gw, _) = Gateway::start(upstream, data, &[]);
    up.arrivals.lock().expect("arrivals").clear();
    up.record.store(true, Ordering::Relaxed);
    let mut samples = Vec::new();
    actix_web::rt::System::new().block_on(async {
        let client = awc::Client::default();
        for _ in 0..s.dispatch_samples {
            let before = up.arrivals.lock().expect("arrivals").len();
            let t = Instant::now();
            let res = client
                .post(format!("{}/async_api/v2/one.json", gw.base))
                .send_body("{}")
                .await
                .expect("submit");
            assert_eq!(res.status().as_u16(), 202);
            loop {
                if let Some(at) = up.arrivals.lock().expect("arrivals").get(before) {
                    samples.push(*at - t);
                    break;
                }
                assert!(t.elapsed() < Duration::from_secs(5), "never dispatched");
                actix_web::rt::time::sleep(Duration::from_micros(100)).await;
            }
            // Idle between samples: the gateway has nothing else to do.
            actix_web::rt::time::sleep(Duration::from_millis(5)).await;
        }
    });
    up.record.store(false, Ordering::Relaxed);
    samples.sort();
    let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
    vec![Row {
        scenario: "idle dispatch latency: submit → upstream sees it",
        figure: format!("p50 {}, p99 {}", ms(p50), ms(p99)),
        baseline: "—".into(),
        ratio: None,
        target: "p50 ≤ 2 ms, p99 ≤ 10 ms",
        met: p50 <= Duration::from_millis(2) && p99 <= Duration::from_millis(10),
    }]
}

fn pending(s: &Sizes, upstream: &str, up: &Upstream, data: &std::path::Path) -> Vec<Row> {
    up.refuse.store(true, Ordering::Relaxed);
    let (gw, _) = Gateway::start(upstream, data, &[]);
    let path = "/async_api/v2/campaigns/{i}.json";
    let queued: Stats = load::run(post_load(format!("{}{path}", gw.base), 64, s.pending, 3600));
    let rss = gw.rss_bytes();
    gw.stop();
    let disk = servers::disk_usage(data);
    let payload = (queued.done * (BODY_1K + path.len() + 8)) as u64;
    let (gw, restart) = Gateway::start(upstream, data, &[]);
    drop(gw);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let disk_ratio = disk as f64 / payload as f64;
    vec![Row {
        scenario: "pending requests (1 KiB bodies), queued and restarted",
        figure: format!(
            "{} pending: RSS {:.0} MiB; disk {:.0} MiB for {:.0} MiB payload; restart → serving {}",
            queued.done,
            mib(rss),
            mib(disk),
            mib(payload),
            ms(restart)
        ),
        baseline: "—".into(),
        ratio: Some(disk_ratio),
        target: "RSS ≤ 150 MiB; disk ≤ 2.5× payload; restart ≤ 2 s",
        met: rss <= 150 << 20 && disk_ratio <= 2.5 && restart <= Duration::from_secs(2),
    }]
}

pub(crate) fn done_count(base: &str) -> String {
    metric(base, "asyncgate_requests{status=\"done\"}")
}

/// A series' value from the gateway's `/metrics`, as text ("?" if absent).
pub(crate) fn metric(base: &str, name: &str) -> String {
    actix_web::rt::System::new().block_on(async {
        let mut res = awc::Client::default()
            .get(format!("{base}/metrics"))
            .send()
            .await
            .expect("metrics");
        let text = String::from_utf8_lossy(&res.body().await.expect("body")).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or("?")
            .to_string()
    })
}
