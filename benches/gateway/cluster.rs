//! Several gateway nodes on one PostgreSQL database (SPEC §12, issue 16):
//! three nodes, each with its own data dir (its node identity) and the same
//! `--store` and credential key, beside one node on the embedded store and
//! one node on the same PostgreSQL, in the same run with the same load. The
//! load generator spreads its connections evenly over the nodes (one
//! generator, one event loop, as against one node). The database is
//! `tools/pg-test-cluster`'s (`fsync` and `synchronous_commit` on) on this
//! same machine, sharing its cores with the nodes, the load generator and
//! the fake upstream.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::load::{self, Stats};
use crate::postgres::Cluster;
use crate::servers::{Gateway, Upstream, free_port};
use crate::{Row, ms, post_load};

const NODES: usize = 3;
const CONNECTIONS: usize = 64;
const TARGET: f64 = 5_000.0;

/// Starts one node per data dir, all at once; each returns once `/healthz`
/// answers.
fn start(upstream: &str, dirs: &[PathBuf], flags: &[&str]) -> Vec<Gateway> {
    std::thread::scope(|s| {
        let starting: Vec<_> = dirs
            .iter()
            .map(|d| s.spawn(move || Gateway::start(upstream, d, flags).0))
            .collect();
        starting
            .into_iter()
            .map(|h| h.join().expect("a node started"))
            .collect()
    })
}

/// `CONNECTIONS` connections posting 1 KiB bodies, spread over `nodes`.
fn post(nodes: &[Gateway], requests: usize, secs: u64) -> Stats {
    let urls = nodes
        .iter()
        .map(|g| format!("{}/async_api/v2/bench.json", g.base))
        .collect();
    load::run_spread(post_load(String::new(), CONNECTIONS, requests, secs), urls)
}

/// Transactions committed in the whole server (read-only ones too: a
/// listening connection reads each batch of notes in one) and WAL flushes
/// (`pg_stat_database`, `pg_stat_wal`).
fn wal_counts(url: &str) -> Option<(i64, i64)> {
    let out = Command::new("psql")
        .args([
            url,
            "-XAtq",
            "-c",
            "SELECT (SELECT sum(xact_commit) FROM pg_stat_database), wal_sync FROM pg_stat_wal",
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (c, s) = text.lines().last()?.split_once('|')?;
    Some((c.trim().parse().ok()?, s.trim().parse().ok()?))
}

/// Accept and drain: three nodes on PostgreSQL against one on the embedded
/// store; nothing (said so) without a PostgreSQL server.
pub fn compare(
    load_secs: u64,
    drain_n: usize,
    upstream: &str,
    up: &Upstream,
    scratch: &Path,
) -> Vec<Row> {
    let pg = match Cluster::start(&scratch.join("cluster-pg")) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("SKIPPED the cluster scenarios: no PostgreSQL cluster ({e})");
            return Vec::new();
        }
    };
    let key = scratch.join("cluster.key").display().to_string();
    let dirs = |name: &str, n: usize| -> Vec<PathBuf> {
        (0..n)
            .map(|i| scratch.join(format!("{name}-{i}")))
            .collect()
    };

    // Accept: the upstream refuses (429, an hour's Retry-After), so every
    // request stays queued and only accepting is measured.
    let accept = |dirs: &[PathBuf], store: Option<&str>| {
        up.refuse.store(true, Ordering::Relaxed);
        let mut flags = vec!["--credential-key-file", key.as_str()];
        flags.extend(store.map(|url| ["--store", url]).into_iter().flatten());
        let nodes = start(upstream, dirs, &flags);
        let before = store.and_then(wal_counts);
        let got = post(&nodes, usize::MAX, load_secs);
        let n = nodes.len();
        // Their connections' backends report their counts as they end.
        drop(nodes);
        std::thread::sleep(Duration::from_millis(500));
        if let (Some((c0, s0)), Some((c1, s1))) = (before, store.and_then(wal_counts)) {
            eprintln!(
                "  {n} node(s) on PostgreSQL: {} accepted, {} transactions committed, {} WAL flushes",
                got.done,
                c1 - c0,
                s1 - s0
            );
        }
        got
    };
    let sled = accept(&dirs("cluster-accept-sled", 1), None);
    let single = accept(&dirs("cluster-accept-pg1", 1), Some(&pg.database("single")));
    let cluster = accept(
        &dirs("cluster-accept", NODES),
        Some(&pg.database("cluster")),
    );
    let rate = cluster.rate();
    let mut rows = vec![Row {
        scenario: "cluster: 3 nodes on one PostgreSQL accept 1 KiB POSTs, 64 connections spread over them (202 after COMMIT)",
        figure: format!(
            "{rate:.0} req/s cluster-wide, p99 {} ({} errors); one node on the same PostgreSQL: {:.0} req/s, p99 {} ({} errors)",
            ms(cluster.percentile(0.99)),
            cluster.errors,
            single.rate(),
            ms(single.percentile(0.99)),
            single.errors
        ),
        baseline: format!(
            "one node, embedded store: {:.0} req/s, p99 {}",
            sled.rate(),
            ms(sled.percentile(0.99))
        ),
        ratio: Some(rate / sled.rate()),
        target: "≥ 5k durable accepts/s cluster-wide (issue 16)",
        met: rate >= TARGET && cluster.errors == 0,
    }];

    // Drain: requests queued while the upstream refuses, then drained by
    // the same nodes restarted against the fast upstream (the start
    // included, as in the end-to-end scenario).
    let drain = |dirs: &[PathBuf], store: Option<&str>| {
        let mut flags = vec![
            "--credential-key-file",
            key.as_str(),
            "--per-credential-concurrency",
            "64",
        ];
        flags.extend(store.map(|url| ["--store", url]).into_iter().flatten());
        // Refused connections, not 429s: a 429's pause is the lane's, kept
        // in PostgreSQL across restarts (SPEC §12), and would hold the
        // drain for its hour; a connection refused is each node's own
        // backoff, forgotten by a restart, on either store.
        let nobody = format!("http://127.0.0.1:{}", free_port());
        let nodes = start(&nobody, dirs, &flags);
        let queued = post(&nodes, drain_n, 600);
        assert_eq!(queued.errors, 0, "queueing the drain's requests");
        nodes.into_iter().for_each(Gateway::stop);
        up.refuse.store(false, Ordering::Relaxed);
        up.count.store(0, Ordering::Relaxed);
        let t = Instant::now();
        let nodes = start(upstream, dirs, &flags);
        while up.count.load(Ordering::Relaxed) < queued.done {
            assert!(t.elapsed() < Duration::from_secs(1800), "drain stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
        let rate = queued.done as f64 / t.elapsed().as_secs_f64();
        // Anything sent twice would arrive after the last one.
        std::thread::sleep(Duration::from_millis(500));
        let sent = up.count.load(Ordering::Relaxed);
        drop(nodes);
        (queued.done, rate, sent)
    };
    let (n, sled, _) = drain(&dirs("cluster-drain-sled", 1), None);
    let (_, single, _) = drain(&dirs("cluster-drain-pg1", 1), Some(&pg.database("drain1")));
    let (_, rate, sent) = drain(&dirs("cluster-drain", NODES), Some(&pg.database("drain")));
    rows.push(Row {
        scenario: "cluster: 3 nodes on one PostgreSQL drain queued requests through a fast upstream",
        figure: format!(
            "{n} drained at {rate:.0}/s ({sent} reached the upstream); one node on the same PostgreSQL: {single:.0}/s"
        ),
        baseline: format!("one node, embedded store: {sled:.0}/s"),
        ratio: Some(rate / sled),
        target: "measured (issue 16)",
        met: true,
    });
    rows
}
