//! The PostgreSQL store (`--store`) beside the embedded one, in the same
//! run with the same load: accept, drain and status polls. The cluster is a
//! throwaway one (`tools/pg-test-cluster`, the distribution's PostgreSQL on
//! a free loopback port, durable commits as in production) on this same
//! machine, sharing its cores with everything else.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::load::{self, Load, Stats};
use crate::servers::{Gateway, Upstream, free_port};
use crate::{Row, ms, post_load};

pub(crate) struct Cluster {
    dir: std::path::PathBuf,
    url: String,
}

impl Cluster {
    pub(crate) fn start(dir: &Path) -> Result<Cluster, String> {
        let out = Command::new(tool())
            .args([
                "start",
                &dir.display().to_string(),
                &free_port().to_string(),
            ])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(Cluster {
            dir: dir.to_path_buf(),
            url,
        })
    }

    /// A fresh database's URL.
    pub(crate) fn database(&self, name: &str) -> String {
        let ok = Command::new("psql")
            .args([&self.url, "-XAtq", "-c", &format!("CREATE DATABASE {name}")])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "CREATE DATABASE {name}");
        let (base, _) = self.url.rsplit_once('/').expect("a database URL");
        format!("{base}/{name}")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(tool())
            .args(["stop", &self.dir.display().to_string()])
            .status();
    }
}

fn tool() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tools/pg-test-cluster").to_string()
}

/// Which store a gateway runs on.
#[derive(Clone, Copy)]
enum On<'a> {
    Sled,
    Pg(&'a str),
}

impl On<'_> {
    fn flags(&self) -> Vec<&str> {
        match self {
            On::Sled => vec![],
            On::Pg(url) => vec!["--store", url],
        }
    }
}

fn start(upstream: &str, data: &Path, on: On, extra: &[&str]) -> Gateway {
    let mut flags = on.flags();
    flags.extend_from_slice(extra);
    Gateway::start(upstream, data, &flags).0
}

/// Accept, drain and polls on both stores; nothing (said so) without a
/// PostgreSQL server.
pub fn compare(
    load_secs: u64,
    drain_n: usize,
    upstream: &str,
    up: &Upstream,
    scratch: &Path,
) -> Vec<Row> {
    let cluster = match Cluster::start(&scratch.join("pg")) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("SKIPPED the PostgreSQL scenarios: no cluster ({e})");
            return Vec::new();
        }
    };
    let dir = |n: &str| scratch.join(n);
    let accept = |on: On, data: &Path| {
        up.refuse.store(true, Ordering::Relaxed);
        let gw = start(upstream, data, on, &[]);
        let url = format!("{}/async_api/v2/bench.json", gw.base);
        load::run(post_load(url, 64, usize::MAX, load_secs))
    };
    let sled = accept(On::Sled, &dir("pg-accept-sled"));
    let pg = accept(On::Pg(&cluster.database("accept")), &dir("pg-accept"));
    let mut rows = vec![pair(
        "PostgreSQL store: accept, 1 KiB POSTs, 64 connections (202 after COMMIT)",
        &pg,
        &sled,
    )];

    let drain = |on: On, data: &Path| {
        let flags = ["--per-credential-concurrency", "64"];
        // Queued while connections are refused, not with 429s: a 429's
        // pause is the lane's, kept in PostgreSQL across restarts (SPEC
        // §12), and would hold the drain for its hour.
        let nobody = format!("http://127.0.0.1:{}", free_port());
        let gw = start(&nobody, data, on, &flags);
        let url = format!("{}/async_api/v2/bench.json", gw.base);
        let queued = load::run(post_load(url, 64, drain_n, 600));
        gw.stop();
        up.refuse.store(false, Ordering::Relaxed);
        up.count.store(0, Ordering::Relaxed);
        let t = Instant::now();
        let gw = start(upstream, data, on, &flags);
        while up.count.load(Ordering::Relaxed) < queued.done {
            assert!(t.elapsed() < Duration::from_secs(1800), "drain stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
        let rate = queued.done as f64 / t.elapsed().as_secs_f64();
        drop(gw);
        (queued.done, rate)
    };
    let (n, sled_rate) = drain(On::Sled, &dir("pg-drain-sled"));
    let (_, pg_rate) = drain(On::Pg(&cluster.database("drain")), &dir("pg-drain"));
    rows.push(Row {
        scenario: "PostgreSQL store: queued requests drained through a fast upstream",
        figure: format!("{n} drained at {pg_rate:.0}/s"),
        baseline: format!("embedded store, same run: {sled_rate:.0}/s"),
        ratio: Some(pg_rate / sled_rate),
        target: "measured (issue 15)",
        met: true,
    });

    let polls = |on: On, data: &Path| {
        up.refuse.store(false, Ordering::Relaxed);
        let gw = start(upstream, data, on, &[]);
        let id = crate::submit_one(&gw.base, "/async_api/v2/polled.json");
        std::thread::sleep(Duration::from_millis(500));
        load::run(Load {
            method: "GET",
            url: format!("{}/async_api/v2/requests/{id}.json", gw.base),
            headers: vec![("Authorization".into(), "Bearer bench".into())],
            body: vec![],
            concurrency: 64,
            requests: usize::MAX,
            duration: Duration::from_secs(load_secs),
            expect: 303,
            rate: None,
        })
    };
    let sled = polls(On::Sled, &dir("pg-polls-sled"));
    let pg = polls(On::Pg(&cluster.database("polls")), &dir("pg-polls"));
    rows.push(pair(
        "PostgreSQL store: status polls of a done request (303), 64 connections",
        &pg,
        &sled,
    ));
    rows
}

fn pair(scenario: &'static str, pg: &Stats, sled: &Stats) -> Row {
    Row {
        scenario,
        figure: format!(
            "{:.0} req/s, p99 {} ({} errors)",
            pg.rate(),
            ms(pg.percentile(0.99)),
            pg.errors
        ),
        baseline: format!(
            "embedded store, same run: {:.0} req/s, p99 {}",
            sled.rate(),
            ms(sled.percentile(0.99))
        ),
        ratio: Some(pg.rate() / sled.rate()),
        target: "measured (issue 15)",
        met: true,
    }
}
