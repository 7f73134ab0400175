//! The load of the power-cut tests: keyed requests whose bodies (and the
//! upstream's answers) are derived from the key, so bytes can be compared
//! wherever they turn up, and an upstream that records every arrival.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::crash::Rng;
use crate::helpers::*;

pub const TOKENS: [&str; 2] = ["Bearer cut-a", "Bearer cut-b"];

/// FNV-1a: the seed of everything derived from a key.
pub fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn stream(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng(seed | 1);
    (0..len).map(|_| rng.next() as u8).collect()
}

/// The body submitted under `key`: most small, some up to ~100 KiB.
pub fn body_for(key: &str) -> Vec<u8> {
    let h = hash(key);
    let cap = match h % 4 {
        0 => 100 << 10,
        1 => 16 << 10,
        _ => 1 << 10,
    };
    stream(h, ((h >> 8) % cap) as usize)
}

/// What the upstream answers for `key`: its own bytes, up to ~32 KiB.
pub fn response_for(key: &str) -> Vec<u8> {
    let h = hash(key) ^ 0x5bd1_e995;
    let mut out = key.as_bytes().to_vec();
    out.extend(stream(h, ((h >> 8) % (32 << 10)) as usize));
    out
}

#[derive(Clone, Debug)]
pub struct Accepted {
    pub id: String,
    pub key: String,
    pub method: &'static str,
    pub token: &'static str,
    pub callback: bool,
    /// Where it was sent, when it carried an `Idempotency-Key` (its key).
    pub keyed: Option<String>,
}

/// Per key, what reached the upstream.
#[derive(Clone, Copy, Default, Debug)]
pub struct Arrival {
    pub through: u32,
    pub refused: u32,
    pub wrong_body: u32,
}

pub type Arrivals = Arc<Mutex<HashMap<String, Arrival>>>;

/// Keys `p{from}…` with a random choice each (method, credential, callback).
pub fn keys(rng: &mut Rng, from: &mut u64, n: usize) -> Vec<(String, u64)> {
    let out = (0..n as u64)
        .map(|i| (format!("p{}", *from + i), rng.next()))
        .collect();
    *from += n as u64;
    out
}

/// One submitter's share: submits each key in turn until `until`, or until
/// the gateway stops answering (the kill). Returns what was acknowledged
/// and every other answer's key and code.
pub async fn submit(
    base: String,
    s: usize,
    keys: Vec<(String, u64)>,
    cb: Option<String>,
    until: Instant,
) -> (Vec<Accepted>, Vec<(String, u16)>) {
    let client = awc::Client::builder().timeout(SECS(10)).finish();
    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    for (key, c) in keys {
        if Instant::now() > until {
            break;
        }
        let method = match c % 4 {
            0 => "GET",
            1 => "PATCH",
            _ => "POST",
        };
        let token = TOKENS[(c >> 8) as usize % TOKENS.len()];
        let callback = cb.is_some() && (c >> 16) % 3 == 0;
        let path = format!("/async_api/v2/item/{s}.json");
        let keyed = (c >> 32).is_multiple_of(2).then(|| path.clone());
        let mut req = client
            .request(method.parse().unwrap(), format!("{base}{path}"))
            .insert_header(("Authorization", token))
            .insert_header(("X-Test-Key", key.as_str()));
        if keyed.is_some() {
            req = req.insert_header(("Idempotency-Key", key.as_str()));
        }
        if let Some(cb) = cb.as_deref().filter(|_| callback) {
            req = req.insert_header(("X-Callback-Location", cb));
        }
        let Ok(mut res) = req.send_body(body_for(&key)).await else {
            break;
        };
        let code = res.status().as_u16();
        if code == 202
            && let Ok(v) = res.json::<serde_json::Value>().await
            && let Some(id) = v["id"].as_str()
        {
            acked.push(Accepted {
                id: id.to_string(),
                key,
                method,
                token,
                callback,
                keyed,
            });
        } else if code != 202 {
            refused.push((key, code));
        }
        actix_web::rt::time::sleep(Duration::from_millis((c >> 24) % 30)).await;
    }
    (acked, refused)
}

/// The upstream: records each arrival by key, checks its body, refuses
/// about one first arrival in thirty with a 429.
pub async fn recording_upstream(arrivals: Arrivals) -> Fake {
    Fake::start_with(move |req, i| {
        let key = req.header("x-test-key").unwrap_or_default().to_string();
        let mut all = arrivals.lock().unwrap();
        let e = all.entry(key.clone()).or_default();
        let h = hash(&key) ^ i as u64;
        if e.through + e.refused == 0 && h.is_multiple_of(30) {
            e.refused += 1;
            return Reply::status(429);
        }
        e.through += 1;
        if req.body != body_for(&key) {
            e.wrong_body += 1;
        }
        Reply::status(200)
            .body(&response_for(&key))
            // One answer in four is slow, so kills land mid-call and
            // leave `unknown`s to requeue.
            .delay(Duration::from_millis(if h.is_multiple_of(4) {
                100 + h % 200
            } else {
                h % 30
            }))
    })
    .await
}
