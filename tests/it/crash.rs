//! SPEC §6: `kill -9` at random moments, under load, over many cycles.
//! The fake upstream records every arrival by the request's own key (an
//! `X-Test-Key` header the gateway forwards), so the checks at the end see
//! what really reached it. Seeded; the seed is printed
//! (`ASYNCGATE_CRASH_SEED=<n>` replays a run's choices). Half the
//! submissions carry an `Idempotency-Key`: sent again after the last
//! start, each must name the request it named before. 12 cycles by
//! default; `ASYNCGATE_CRASH_CYCLES=<n>` runs more (a long mode, outside CI).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::helpers::*;
use crate::process::{Proc, data_and_log};

const DEFAULT_CYCLES: usize = 12;
const SUBMITTERS: usize = 6;
/// Submissions per submitter and cycle (a kill usually comes first).
const PER_CYCLE: usize = 40;
const TOKENS: [&str; 3] = ["Bearer crash-a", "Bearer crash-b", "Bearer crash-c"];

/// xorshift64*: small, seeded, good enough to pick moments and methods.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Debug)]
struct Accepted {
    id: String,
    key: String,
    method: &'static str,
    token: &'static str,
    callback: bool,
    /// Where it was sent, when it carried an `Idempotency-Key` (its key).
    keyed: Option<String>,
}

/// Per key: arrivals let through, arrivals refused with 429.
type Arrivals = Arc<Mutex<HashMap<String, (u32, u32)>>>;

/// The seed in `var`, or one from the clock; never 0 (xorshift's fixed point).
pub fn seed_from(var: &str) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
        | 1
}

/// A count from `var` (a long mode), or the default.
pub fn count_from(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[actix_web::test]
async fn kill_9_at_random_moments_loses_nothing_and_runs_nothing_twice() {
    let seed = seed_from("ASYNCGATE_CRASH_SEED");
    let cycles = count_from("ASYNCGATE_CRASH_CYCLES", DEFAULT_CYCLES);
    println!("crash test seed: {seed} (ASYNCGATE_CRASH_SEED={seed} replays it)");
    let mut rng = Rng(seed);

    let arrivals: Arrivals = Arc::default();
    let a = arrivals.clone();
    let up = Fake::start_with(move |req, i| {
        let key = req.header("x-test-key").unwrap_or_default().to_string();
        let mut all = a.lock().unwrap();
        let e = all.entry(key.clone()).or_default();
        // Refuse about one first arrival in thirty: refusals never count
        // (and each pauses its credential, so more would slow the drain).
        let h = key
            .bytes()
            .fold(i as u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        if e.0 + e.1 == 0 && h % 30 == 0 {
            e.1 += 1;
            return Reply::status(429);
        }
        e.0 += 1;
        Reply::status(200)
            .body(key.as_bytes())
            .delay(Duration::from_millis(h % 50))
    })
    .await;
    let receiver = Fake::start().await;
    let callback_url = format!("{}/cb", receiver.url());
    let (_dir, data, log) = data_and_log();

    let accepted: Rc<RefCell<Vec<Accepted>>> = Rc::default();
    let mut next_key = 0u64;
    for cycle in 0..cycles {
        let p = Proc::start(
            &up.url(),
            &data,
            &log,
            &["--per-credential-concurrency", "3"],
        )
        .await;
        let kill_after = Duration::from_millis(150 + rng.below(900));
        let mut tasks = Vec::new();
        for s in 0..SUBMITTERS {
            let (base, acc, cb) = (p.base.clone(), accepted.clone(), callback_url.clone());
            let choices: Vec<u64> = (0..PER_CYCLE).map(|_| rng.next()).collect();
            let first_key = next_key;
            next_key += PER_CYCLE as u64;
            tasks.push(actix_web::rt::spawn(async move {
                let client = awc::Client::builder().timeout(SECS(5)).finish();
                for (n, c) in choices.into_iter().enumerate() {
                    let method = match c % 4 {
                        0 => "GET",
                        1 => "PATCH",
                        _ => "POST",
                    };
                    let token = TOKENS[(c >> 8) as usize % TOKENS.len()];
                    let callback = (c >> 16) % 2 == 0;
                    let key = format!("k{}", first_key + n as u64);
                    let path = format!("/async_api/v2/item/{s}.json");
                    let mut req = client
                        .request(method.parse().unwrap(), format!("{base}{path}"))
                        .insert_header(("Authorization", token))
                        .insert_header(("X-Test-Key", key.as_str()));
                    if callback {
                        req = req.insert_header(("X-Callback-Location", cb.as_str()));
                    }
                    let keyed = ((c >> 20) % 2 == 0).then_some(path);
                    if keyed.is_some() {
                        req = req.insert_header(("Idempotency-Key", key.as_str()));
                    }
                    let Ok(mut res) = req.send_body(key.clone()).await else {
                        return;
                    };
                    if res.status().as_u16() != 202 {
                        return;
                    }
                    let Ok(v) = res.json::<serde_json::Value>().await else {
                        return;
                    };
                    let id = v["id"].as_str().unwrap().to_string();
                    acc.borrow_mut().push(Accepted {
                        id,
                        key,
                        method,
                        token,
                        callback,
                        keyed,
                    });
                    // Spread the submissions over the cycle, so kills land
                    // during submissions as well as during execution.
                    actix_web::rt::time::sleep(Duration::from_millis((c >> 24) % 40)).await;
                }
            }));
        }
        actix_web::rt::time::sleep(kill_after).await;
        p.kill9();
        for t in tasks {
            let _ = t.await;
        }
        println!(
            "cycle {cycle}: killed after {kill_after:?}, {} accepted so far",
            accepted.borrow().len()
        );
    }

    // A last start drains everything.
    let p = Proc::start(&up.url(), &data, &log, &[]).await;
    let client = awc::Client::builder()
        .disable_redirects()
        .timeout(SECS(10))
        .finish();
    let deadline = Instant::now() + SECS(120 + cycles as u64);
    loop {
        let mut res = client
            .get(format!("{}/metrics", p.base))
            .send()
            .await
            .unwrap();
        let m = String::from_utf8(res.body().await.unwrap().to_vec()).unwrap();
        if m.contains("asyncgate_requests{status=\"enqueued\"} 0\n")
            && m.contains("asyncgate_requests{status=\"started\"} 0\n")
        {
            break;
        }
        let depth: Vec<&str> = m
            .lines()
            .filter(|l| l.starts_with("asyncgate_requests"))
            .collect();
        assert!(Instant::now() < deadline, "not drained: {depth:?}");
        actix_web::rt::time::sleep(Duration::from_millis(200)).await;
    }

    let accepted = accepted.borrow().clone();
    assert!(
        accepted.len() > 50,
        "too little load to prove anything: {}",
        accepted.len()
    );
    let arrivals = arrivals.lock().unwrap().clone();
    let (mut done, mut unknown) = (Vec::new(), 0);
    for a in &accepted {
        let mut res = client
            .get(format!("{}/async_api/v2/requests/{}.json", p.base, a.id))
            .insert_header(("Authorization", a.token))
            .send()
            .await
            .unwrap();
        let v: serde_json::Value = res.json().await.unwrap_or_default();
        let status = v["status"].as_str().unwrap_or("404");
        let (through, _) = arrivals.get(&a.key).copied().unwrap_or_default();
        match status {
            "done" => {
                assert!(through >= 1, "{a:?} is done but never reached the upstream");
                done.push(a.clone());
            }
            "unknown" => {
                assert_ne!(
                    a.method, "GET",
                    "an idempotent request is never unknown: {a:?}"
                );
                unknown += 1;
            }
            other => panic!("every accepted request is known and finished; {a:?} is {other}: {v}"),
        }
        if a.method != "GET" {
            assert!(through <= 1, "{a:?} reached the upstream {through} times");
        }
    }
    for a in &done {
        let mut res = client
            .get(format!("{}/async_api/v2/responses/{}.json", p.base, a.id))
            .insert_header(("Authorization", a.token))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 200, "{a:?}");
        assert_eq!(
            res.body().await.unwrap(),
            a.key.as_bytes(),
            "{a:?}: its own response"
        );
    }
    let wanted: HashSet<&str> = done
        .iter()
        .filter(|a| a.callback)
        .map(|a| a.id.as_str())
        .collect();
    let deadline = Instant::now() + SECS(60);
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
        let missing: Vec<&&str> = wanted.iter().filter(|id| !got.contains(**id)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "callbacks never arrived for {missing:?}"
        );
        actix_web::rt::time::sleep(Duration::from_millis(200)).await;
    }
    // Every key still names its request, whatever moment the kills hit
    // (the index's changes wait in memory until a checkpoint).
    let mut keyed = 0;
    for a in &accepted {
        let Some(path) = &a.keyed else { continue };
        let mut res = client
            .request(a.method.parse().unwrap(), format!("{}{path}", p.base))
            .insert_header(("Authorization", a.token))
            .insert_header(("Idempotency-Key", a.key.as_str()))
            .send_body(a.key.clone())
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 202, "{a:?} sent again");
        let v: serde_json::Value = res.json().await.unwrap();
        assert_eq!(v["id"], a.id.as_str(), "{a:?}: its key names it");
        keyed += 1;
    }
    assert!(keyed > 10, "too few keyed submissions: {keyed}");
    let refused: u32 = arrivals.values().map(|(_, r)| r).sum();
    println!(
        "crash test: seed {seed}, {cycles} kill -9 cycles, {} accepted, {} done, {unknown} unknown, \
         {refused} refused with 429, {} callbacks checked, {keyed} keys sent again",
        accepted.len(),
        done.len(),
        wanted.len()
    );
    p.kill9();
}
