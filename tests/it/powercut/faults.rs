//! SPEC §6, faults below the gateway, injected by lazyfs where failpoints
//! in our own code cannot reach (sled's log file included):
//!
//! - a failed fsync is fatal: no write it covered is acknowledged, writers
//!   waiting on it get 503, the gateway exits non-zero with a clear log
//!   line, and a restart recovers everything acknowledged;
//! - running out of space while writing a body segment refuses only that
//!   submission (507 `insufficient_storage`); inside sled it is fatal like
//!   a failed fsync.
//!
//! Each test collects every way the gateway falls short of the SPEC and
//! fails with the whole list, so a run says exactly what is missing.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use super::checks::{ADMIN, Ledger, settle};
use super::load::{Accepted, Arrivals, TOKENS, body_for, keys, recording_upstream, submit};
use crate::crash::Rng;
use crate::helpers::*;
use crate::lazyfs::{Mount, drained, mount_or_skip, start_gateway, tail};
use crate::process::Proc;

/// A gateway over lazyfs with a recording upstream, warmed up: a few
/// requests acknowledged and run before any fault is armed.
struct Bench {
    /// Before `mount`: fields drop in order, and the gateway goes first.
    p: Proc,
    mount: Mount,
    arrivals: Arrivals,
    up: Fake,
    log: std::path::PathBuf,
    rng: Rng,
    next_key: u64,
    acked: Vec<Accepted>,
}

impl Bench {
    async fn start(test: &str) -> Option<Bench> {
        let mount = mount_or_skip(test, false)?;
        let arrivals = Arrivals::default();
        let up = recording_upstream(arrivals.clone()).await;
        let log = mount.dir.path().join("gateway.log");
        let p = start_gateway(&up.url(), &mount, &log, &["--admin-token", ADMIN])
            .await
            .unwrap_or_else(|e| panic!("{test}: {e}"));
        let mut b = Bench {
            p,
            mount,
            arrivals,
            up,
            log,
            rng: Rng(0x5eed),
            next_key: 0,
            acked: Vec::new(),
        };
        let (acked, refused) = b.load(1, 6, SECS(30)).await;
        assert!(
            acked.len() == 6 && refused.is_empty(),
            "{test}: the gateway must work before the fault: {refused:?}"
        );
        assert!(
            drained(&b.p.base, SECS(30)).await,
            "{test}: warm-up not drained"
        );
        Some(b)
    }

    /// `submitters` × `each` submissions, for at most `within`.
    async fn load(
        &mut self,
        submitters: usize,
        each: usize,
        within: Duration,
    ) -> (Vec<Accepted>, Vec<(String, u16)>) {
        let until = Instant::now() + within;
        let mut tasks = Vec::new();
        for s in 0..submitters {
            let keys = keys(&mut self.rng, &mut self.next_key, each);
            tasks.push(actix_web::rt::spawn(submit(
                self.p.base.clone(),
                s,
                keys,
                None,
                until,
            )));
        }
        let (mut acked, mut refused) = (Vec::new(), Vec::new());
        for t in tasks {
            let (a, r) = t.await.unwrap_or_default();
            acked.extend(a);
            refused.extend(r);
        }
        self.acked.extend(acked.iter().cloned());
        (acked, refused)
    }

    fn fired(&self) -> bool {
        !self.mount.status().contains("faults_fired 0\n")
    }

    async fn exit_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.p.child.try_wait() {
                return Some(s);
            }
            actix_web::rt::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// While the gateway still runs after a fatal fault: it must not claim
    /// to be healthy.
    async fn healthz(&mut self, problems: &mut Vec<String>) {
        if let Ok(None) = self.p.child.try_wait()
            && let Ok(res) = awc::Client::default()
                .get(format!("{}/healthz", self.p.base))
                .send()
                .await
            && res.status().is_success()
        {
            problems.push("and /healthz still answers 200".into());
        }
    }

    /// The keys of `refused` that reached the upstream anyway.
    fn ran(&self, refused: &[(String, u16)]) -> usize {
        let arrivals = self.arrivals.lock().unwrap();
        refused
            .iter()
            .filter(|(k, _)| arrivals.contains_key(k))
            .count()
    }

    /// kill -9 (if still running), power cut, restart, and the power-cut
    /// checks on everything acknowledged. Returns how many were lost.
    async fn recover(&mut self, problems: &mut Vec<String>) -> usize {
        let _ = self.p.child.kill();
        let _ = self.p.child.wait();
        self.mount.control("cut");
        let p = match start_gateway(
            &self.up.url(),
            &self.mount,
            &self.log,
            &["--admin-token", ADMIN],
        )
        .await
        {
            Ok(p) => p,
            Err(e) => {
                problems.push(format!("no restart after the fault and a cut: {e}"));
                return 0;
            }
        };
        let mut ledger = Ledger::default();
        settle(&p.base, &self.acked, &self.arrivals, &mut ledger).await;
        problems.extend(ledger.problems);
        p.kill9();
        ledger.lost.len()
    }

    /// What lazyfs said (faults fired, bytes a cut dropped).
    fn lazyfs_said(&self) -> String {
        let log = self.mount.log();
        let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("lazyfs: ")).collect();
        lines.join("; ")
    }

    fn fail_with(&self, test: &str, problems: &[String]) {
        assert!(
            problems.is_empty(),
            "{test}:\n{}\nlazyfs: {}\ngateway log tail:\n{}",
            problems.join("\n"),
            self.lazyfs_said(),
            tail(&self.log)
        );
    }
}

fn fatal_exit(exit: Option<ExitStatus>, what: &str, problems: &mut Vec<String>) {
    match exit {
        Some(s) if !s.success() => {}
        Some(s) => problems.push(format!(
            "after {what} the gateway exited with {s}, not non-zero"
        )),
        None => problems.push(format!(
            "after {what} the gateway kept running (SPEC §6: it stops, non-zero, so recovery runs)"
        )),
    }
}

fn error_line(log: &std::path::Path, words: &[&str]) -> bool {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let l = l.to_lowercase();
            l.contains("error") && words.iter().any(|w| l.contains(w))
        })
}

/// `writers_wait`: whether submissions wait on this fsync (the journal's)
/// and must get 503, or not (sled's log, flushed by the checkpointer off
/// the path to a 202).
async fn failed_fsync_is_fatal(test: &str, pattern: &str, writers_wait: bool) {
    let Some(mut b) = Bench::start(test).await else {
        return;
    };
    let before = b.acked.len();
    b.mount.control(&format!("fail-fsync {pattern}"));
    let (acked, refused) = b.load(4, 200, SECS(4)).await;
    assert!(
        b.fired(),
        "{test}: the fault never fired (harness): {}",
        b.mount.status()
    );
    let exit = b.exit_within(SECS(10)).await;
    let mut problems = Vec::new();
    fatal_exit(exit, "a failed fsync", &mut problems);
    b.healthz(&mut problems).await;
    if !error_line(&b.log, &["fsync", "flush", "disk"]) {
        problems.push("no error line in the log names the failed fsync".into());
    }
    let codes: Vec<u16> = refused.iter().map(|(_, c)| *c).collect();
    if writers_wait && !codes.contains(&503) {
        problems.push(format!(
            "no writer waiting on the failed fsync got 503 (other answers: {codes:?})"
        ));
    }
    let lost = b.recover(&mut problems).await;
    println!(
        "{test}: {before} acknowledged before the fault, {} after it; other answers {codes:?}, \
         {} of them ran anyway; exit {exit:?}; lost after a cut {lost}; {}",
        acked.len(),
        b.ran(&refused),
        b.lazyfs_said()
    );
    b.fail_with(test, &problems);
}

#[actix_web::test]
async fn a_failed_fsync_of_sleds_log_is_fatal() {
    failed_fsync_is_fatal("a_failed_fsync_of_sleds_log_is_fatal", "data/db", false).await;
}

#[actix_web::test]
async fn a_failed_fsync_of_the_journal_is_fatal() {
    failed_fsync_is_fatal("a_failed_fsync_of_the_journal_is_fatal", "journal/", true).await;
}

/// A submission whose body the upstream checks, never empty.
async fn post(base: &str, key: &str) -> (u16, serde_json::Value) {
    let mut res = awc::Client::builder()
        .timeout(SECS(10))
        .finish()
        .post(format!("{base}/async_api/v2/full.json"))
        .insert_header(("Authorization", TOKENS[0]))
        .insert_header(("X-Test-Key", key))
        .send_body(body_for(key))
        .await
        .expect("the gateway answers");
    let v = res.json().await.unwrap_or_default();
    (res.status().as_u16(), v)
}

fn non_empty_key(prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|k| body_for(k).len() > 100)
        .expect("some key has a body")
}

#[actix_web::test]
async fn no_space_in_the_journal_refuses_only_that_submission_with_507() {
    let test = "no_space_in_the_journal_refuses_only_that_submission_with_507";
    let Some(mut b) = Bench::start(test).await else {
        return;
    };
    b.mount.control("enospc journal/");
    let full = non_empty_key("full");
    let (code, v) = post(&b.p.base, &full).await;
    assert!(
        b.fired(),
        "{test}: the fault never fired (harness): {}",
        b.mount.status()
    );
    let mut problems = Vec::new();
    if code != 507 || v["error"]["code"] != "insufficient_storage" {
        problems.push(format!(
            "the submission that hit ENOSPC got {code} {v}, not 507 insufficient_storage"
        ));
    }
    let next = non_empty_key("after");
    let (code, v) = post(&b.p.base, &next).await;
    if code == 202 {
        b.acked.push(Accepted {
            id: v["id"].as_str().unwrap_or_default().to_string(),
            key: next,
            method: "POST",
            token: TOKENS[0],
            callback: false,
            keyed: None,
        });
    } else {
        problems.push(format!("the next submission got {code} {v}, not 202"));
    }
    if let Ok(Some(s)) = b.p.child.try_wait() {
        problems.push(format!("the gateway stopped ({s}) over one body"));
    }
    drained(&b.p.base, SECS(30)).await;
    if b.arrivals.lock().unwrap().contains_key(&full) {
        problems.push("the refused submission was stored and ran".into());
    }
    b.recover(&mut problems).await;
    b.fail_with(test, &problems);
}

#[actix_web::test]
async fn no_space_inside_sled_is_fatal() {
    let test = "no_space_inside_sled_is_fatal";
    let Some(mut b) = Bench::start(test).await else {
        return;
    };
    b.mount.control("enospc data/db");
    let (acked, refused) = b.load(2, 100, SECS(4)).await;
    assert!(
        b.fired(),
        "{test}: the fault never fired (harness): {}",
        b.mount.status()
    );
    let exit = b.exit_within(SECS(10)).await;
    let mut problems = Vec::new();
    fatal_exit(exit, "ENOSPC inside sled", &mut problems);
    b.healthz(&mut problems).await;
    if !error_line(&b.log, &["space", "enospc", "sled", "store", "flush"]) {
        problems.push("no error line in the log names the failed write".into());
    }
    let codes: Vec<u16> = refused.iter().map(|(_, c)| *c).collect();
    let lost = b.recover(&mut problems).await;
    println!(
        "{test}: {} acknowledged after the fault, {} other answers ({:?}…), exit {exit:?}, lost after a cut {lost}; {}",
        acked.len(),
        codes.len(),
        &codes[..codes.len().min(3)],
        b.lazyfs_said()
    );
    b.fail_with(test, &problems);
}
