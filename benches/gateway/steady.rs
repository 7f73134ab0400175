//! The steady state: submissions at 70% of the drain rate measured in the
//! same run, drained by a fast upstream, with a short retention, for many
//! retention periods. After the first period, expiries run beside the
//! work: disk use, RSS and the unswept backlog must stay flat, and accept
//! latency must stay near what it was before anything expired.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::load::{self, Load};
use crate::servers::{self, Gateway, Upstream};
use crate::{BODY_1K, Row, ms};

/// One look at the gateway.
struct Sample {
    at: Duration,
    disk: u64,
    rss: u64,
    done: u64,
    queued: u64,
}

pub fn steady(
    secs: u64,
    retention_secs: u64,
    drain_rate: f64,
    upstream: &str,
    up: &Upstream,
    data: &std::path::Path,
) -> Row {
    up.refuse.store(false, Ordering::Relaxed);
    let retention = format!("{retention_secs}s");
    let flags = [
        "--per-credential-concurrency",
        "64",
        "--retention",
        retention.as_str(),
    ];
    let (gw, _) = Gateway::start(upstream, data, &flags);
    let gw = Arc::new(gw);
    let rate = (drain_rate * 0.7).max(1.0);
    let load = |secs: u64| Load {
        method: "POST",
        url: format!("{}/async_api/v2/steady/{{i}}.json", gw.base),
        headers: vec![("Authorization".into(), "Bearer steady".into())],
        body: vec![b'x'; BODY_1K],
        concurrency: 64,
        requests: usize::MAX,
        duration: Duration::from_secs(secs),
        expect: 202,
        rate: Some(rate),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let sampler = {
        let (gw, stop, data) = (gw.clone(), stop.clone(), data.to_path_buf());
        let step = Duration::from_secs((retention_secs / 4).max(1));
        std::thread::spawn(move || {
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                out.push(Sample {
                    at: start.elapsed(),
                    disk: servers::disk_usage(&data),
                    rss: gw.rss_bytes(),
                    done: crate::done_count(&gw.base).parse().unwrap_or(0),
                    queued: crate::metric(&gw.base, "asyncgate_queue_depth")
                        .parse()
                        .unwrap_or(0),
                });
                std::thread::sleep(step);
            }
            out
        })
    };
    // The first retention period: nothing has expired yet.
    let before = load::run(load(retention_secs));
    let during = load::run(load(secs.saturating_sub(retention_secs).max(1)));
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().expect("sampler");
    drop(gw);
    let settled = Duration::from_secs(retention_secs * 2);
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at >= settled).collect();
    let (first, last) = match (after.first(), after.last()) {
        (Some(f), Some(l)) => (*f, *l),
        _ => return failed_row("too short to see a steady state"),
    };
    let max = |f: fn(&Sample) -> u64| after.iter().map(|s| f(s)).max().unwrap_or(0);
    let grew = |f: fn(&Sample) -> u64| max(f) as f64 / f(first).max(1) as f64;
    let flat = grew(|s| s.disk) <= 1.25 && grew(|s| s.rss) <= 1.25 && grew(|s| s.done) <= 1.25;
    let (p_before, p_during) = (before.percentile(0.99), during.percentile(0.99));
    let p_ratio = p_during.as_secs_f64() / p_before.as_secs_f64().max(1e-6);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    Row {
        scenario: "steady state: 70% of the drain rate with a short retention",
        figure: format!(
            "{rate:.0} req/s for {secs} s, --retention {retention_secs}s ({} errors); from 2× retention to the end: \
             disk {:.0}→{:.0} MiB (max {:.0}), RSS {:.0}→{:.0} MiB (max {:.0}), done and unswept {}→{} (max {}); \
             queued {}→{} (max {}); accept p99 {} after the first retention vs {} before",
            before.errors + during.errors,
            mib(first.disk),
            mib(last.disk),
            mib(max(|s| s.disk)),
            mib(first.rss),
            mib(last.rss),
            mib(max(|s| s.rss)),
            first.done,
            last.done,
            max(|s| s.done),
            first.queued,
            last.queued,
            max(|s| s.queued),
            ms(p_during),
            ms(p_before),
        ),
        baseline: format!("drain rate of this run: {drain_rate:.0}/s"),
        ratio: Some(p_ratio),
        target: "flat (≤ 1.25× growth) disk, RSS, backlog; accept p99 ≤ 2× before expiries",
        met: flat && p_ratio <= 2.0,
    }
}

fn failed_row(why: &str) -> Row {
    Row {
        scenario: "steady state: 70% of the drain rate with a short retention",
        figure: why.to_string(),
        baseline: "—".into(),
        ratio: None,
        target: "flat disk, RSS, backlog; accept p99 ≤ 2× before expiries",
        met: false,
    }
}
