//! Which store the suite runs on: the embedded one, or, when
//! `ASYNCGATE_TEST_POSTGRES` names a PostgreSQL cluster (a URL of a
//! database there; `tools/pg-test-cluster` starts a throwaway one), a
//! database of its own for each test's data dir, made on first use. One
//! test body, two backends: `tools/test` runs the suite both ways.

use std::io::Write;
use std::path::Path;
use std::process::Command;

const ENV: &str = "ASYNCGATE_TEST_POSTGRES";

/// The cluster's URL, when this run is on PostgreSQL.
pub fn postgres() -> Option<String> {
    std::env::var(ENV).ok().filter(|s| !s.is_empty())
}

/// The flags that put a gateway of `data_dir` on this run's store: none
/// for the embedded one, `--store` with the data dir's own database
/// otherwise (the same one on every start of that data dir).
pub fn store_flags(data_dir: &Path) -> Vec<String> {
    match postgres() {
        Some(cluster) => vec!["--store".into(), database_for(&cluster, data_dir)],
        None => Vec::new(),
    }
}

/// A test about the embedded store itself (its files, its lock, the
/// disk under it): on a PostgreSQL run it says so and passes, having run
/// in the embedded pass.
pub fn embedded_only(why: &str) -> bool {
    if postgres().is_some() {
        // Straight to the stream: libtest captures eprintln! of a passing
        // test, and a skip must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED on PostgreSQL (runs in the embedded pass): {why}"
        );
        return true;
    }
    false
}

/// On a PostgreSQL run, a fresh database on the cluster for several
/// gateways to share (the multi-node tests, SPEC §12): its URL. `name`
/// says whose it is; each call makes a new one.
pub fn shared_database(name: &str) -> Option<String> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static MADE: AtomicUsize = AtomicUsize::new(0);
    let cluster = postgres()?;
    let tag: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(32)
        .collect::<String>()
        .to_ascii_lowercase();
    let name = format!(
        "shared_{tag}_{}_{}",
        std::process::id(),
        MADE.fetch_add(1, Ordering::Relaxed)
    );
    psql(&cluster, &format!("DROP DATABASE IF EXISTS {name}"));
    psql(&cluster, &format!("CREATE DATABASE {name}"));
    let (base, _) = cluster.rsplit_once('/').expect("a database URL");
    Some(format!("{base}/{name}"))
}

/// On a PostgreSQL run, the data dir's database as `pg_dump` writes it
/// (bytea in hex): what an attacker with the database's files would read.
pub fn database_dump(data_dir: &Path) -> Option<String> {
    let cluster = postgres()?;
    let out = Command::new("pg_dump")
        .args(["--data-only", &database_for(&cluster, data_dir)])
        .output()
        .expect("pg_dump runs (PostgreSQL's client)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn database_for(cluster: &str, data_dir: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data_dir.hash(&mut h);
    let name = format!("t{:016x}", h.finish());
    let exists = psql(
        cluster,
        &format!("SELECT 1 FROM pg_database WHERE datname = '{name}'"),
    );
    if exists.trim() != "1" {
        psql(cluster, &format!("CREATE DATABASE {name}"));
    }
    let (base, _) = cluster.rsplit_once('/').expect("a database URL");
    format!("{base}/{name}")
}

/// One query's rows, `|`-separated, through `psql`.
pub fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([url, "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("psql runs (PostgreSQL's client)");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// In CI the PostgreSQL pass is required: `tools/test` starts the cluster
/// and sets the variable. Elsewhere its absence is said, loudly.
#[test]
fn the_postgres_pass_has_its_cluster() {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let pass = std::env::var("ASYNCGATE_TEST_PASS").unwrap_or_default();
    match postgres() {
        Some(url) => {
            let v = psql(&url, "SHOW synchronous_commit");
            assert_eq!(v.trim(), "on", "the 202 must wait for a durable commit");
        }
        None if ci && pass == "postgres" => {
            panic!("the PostgreSQL pass needs {ENV} (tools/test starts a cluster)")
        }
        None => eprintln!(
            "the suite runs on the embedded store; for the PostgreSQL pass run tools/test \
             (or set {ENV})"
        ),
    }
}
