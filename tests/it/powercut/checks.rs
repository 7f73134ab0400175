//! The checks after each restart (SPEC §6 and docs/POWERCUT.md): nothing
//! acknowledged lost, nothing run twice, bytes intact, nothing stuck.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::load::{Accepted, Arrivals, body_for, response_for};
use crate::helpers::*;
use crate::lazyfs::drained;

pub const ADMIN: &str = "powercut-admin";

/// What the checks found, each finding once per id.
#[derive(Default)]
pub struct Ledger {
    requeued: HashMap<String, u32>,
    pub unknown: HashSet<String>,
    pub doubled: HashSet<String>,
    pub stuck: HashSet<String>,
    pub broken: HashSet<String>,
    pub problems: Vec<String>,
    pub lost: HashSet<String>,
}

impl Ledger {
    fn found(&mut self, kind: fn(&mut Ledger) -> &mut HashSet<String>, id: &str, what: String) {
        if kind(self).insert(id.to_string()) {
            self.problems.push(what);
        }
    }
}

fn client() -> awc::Client {
    awc::Client::builder()
        .disable_redirects()
        .timeout(SECS(10))
        .finish()
}

pub async fn status_of(base: &str, a: &Accepted) -> (u16, String) {
    let Ok(mut res) = client()
        .get(format!("{base}/async_api/v2/requests/{}.json", a.id))
        .insert_header(("Authorization", a.token))
        .send()
        .await
    else {
        return (0, "unreachable".into());
    };
    let v: serde_json::Value = res.json().await.unwrap_or_default();
    let s = v["status"].as_str().unwrap_or("none").to_string();
    (res.status().as_u16(), s)
}

/// The stored response, if it is the one the upstream gave.
async fn response_ok(base: &str, a: &Accepted) -> Result<(), String> {
    let mut res = client()
        .get(format!("{base}/async_api/v2/responses/{}.json", a.id))
        .insert_header(("Authorization", a.token))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let code = res.status().as_u16();
    let body = res.body().limit(1 << 20).await.map_err(|e| e.to_string())?;
    if code != 200 {
        return Err(format!("{code} {}", String::from_utf8_lossy(&body)));
    }
    if body != response_for(&a.key) {
        return Err(format!("other bytes ({} long)", body.len()));
    }
    Ok(())
}

/// Every acknowledged submission that carried an `Idempotency-Key`, sent
/// again: its key must still name its request (202, the same id), and
/// store nothing. How many were sent again.
pub async fn keys_still_name_their_requests(base: &str, all: &[Accepted], l: &mut Ledger) -> usize {
    let mut sent = 0;
    for a in all {
        let Some(path) = &a.keyed else { continue };
        let answer = client()
            .request(a.method.parse().unwrap(), format!("{base}{path}"))
            .insert_header(("Authorization", a.token))
            .insert_header(("X-Test-Key", a.key.as_str()))
            .insert_header(("Idempotency-Key", a.key.as_str()))
            .send_body(body_for(&a.key))
            .await;
        let (code, v) = match answer {
            Ok(mut res) => (
                res.status().as_u16(),
                res.json::<serde_json::Value>().await.unwrap_or_default(),
            ),
            Err(e) => (0, serde_json::json!(e.to_string())),
        };
        sent += 1;
        if code != 202 || v["id"] != a.id.as_str() {
            l.problems.push(format!(
                "{a:?}: its Idempotency-Key sent again got {code} {v}, not its request"
            ));
        }
    }
    sent
}

pub async fn requeue(base: &str, id: &str) -> u16 {
    client()
        .post(format!("{base}/admin/requests/{id}/requeue"))
        .insert_header(("Authorization", format!("Bearer {ADMIN}")))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

/// After a restart: drain, then check every request ever acknowledged.
pub async fn settle(base: &str, all: &[Accepted], arrivals: &Arrivals, l: &mut Ledger) {
    drained(base, SECS(60)).await;
    let mut requeued_now = Vec::new();
    for a in all {
        match status_of(base, a).await {
            (404, _) => l.found(
                |l| &mut l.lost,
                &a.id,
                format!("{a:?} was acknowledged and is gone (404)"),
            ),
            (_, s) if s == "done" => {
                if let Err(e) = response_ok(base, a).await {
                    l.found(
                        |l| &mut l.broken,
                        &a.id,
                        format!("{a:?} is done but its response is broken: {e}"),
                    );
                }
            }
            (_, s) if s == "unknown" => {
                if a.method == "GET" {
                    l.problems
                        .push(format!("{a:?}: an idempotent request is never unknown"));
                }
                l.unknown.insert(a.id.clone());
                match requeue(base, &a.id).await {
                    202 => {
                        *l.requeued.entry(a.key.clone()).or_default() += 1;
                        requeued_now.push(a.clone());
                    }
                    code => l.problems.push(format!("{a:?}: requeue answered {code}")),
                }
            }
            (code, s) => l.found(
                |l| &mut l.stuck,
                &a.id,
                format!("{a:?} is {s} ({code}) after draining"),
            ),
        }
    }
    if !requeued_now.is_empty() {
        drained(base, SECS(60)).await;
        for a in &requeued_now {
            match status_of(base, a).await {
                (_, s) if s == "done" => {
                    if let Err(e) = response_ok(base, a).await {
                        l.found(
                            |l| &mut l.broken,
                            &a.id,
                            format!("{a:?} requeued, done, response broken: {e}"),
                        );
                    }
                }
                (code, s) => l.found(
                    |l| &mut l.stuck,
                    &a.id,
                    format!("{a:?} requeued and then {s} ({code})"),
                ),
            }
        }
    }
    let arrivals = arrivals.lock().unwrap().clone();
    for a in all {
        let got = arrivals.get(&a.key).copied().unwrap_or_default();
        let allowed = 1 + l.requeued.get(&a.key).copied().unwrap_or(0);
        if a.method != "GET" && got.through > allowed {
            l.found(
                |l| &mut l.doubled,
                &a.id,
                format!(
                    "{a:?} reached the upstream {} times ({allowed} allowed)",
                    got.through
                ),
            );
        }
    }
    // Every arrival, acknowledged or not (a 202 cut off by the kill, a
    // write answered 503 that stayed stored): its body is the one sent.
    for (key, got) in &arrivals {
        if got.wrong_body > 0 {
            l.found(
                |l| &mut l.broken,
                key,
                format!("{key} reached the upstream with other bytes than sent"),
            );
        }
    }
}

/// Every `done` request with a callback was called back.
pub async fn callbacks_missing(receiver: &Fake, all: &[Accepted]) -> Vec<String> {
    let wanted: HashSet<&str> = all
        .iter()
        .filter(|a| a.callback)
        .map(|a| a.id.as_str())
        .collect();
    let deadline = Instant::now() + SECS(30);
    loop {
        let got: HashSet<String> = receiver
            .seen()
            .iter()
            .filter_map(|s| {
                serde_urlencoded::from_bytes::<Vec<(String, String)>>(&s.body)
                    .ok()?
                    .into_iter()
                    .find(|(k, _)| k == "response_id")
                    .map(|(_, v)| v)
            })
            .collect();
        let missing: Vec<String> = wanted
            .iter()
            .filter(|id| !got.contains(**id))
            .map(|s| s.to_string())
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            return missing;
        }
        actix_web::rt::time::sleep(Duration::from_millis(200)).await;
    }
}
