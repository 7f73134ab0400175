//! The load generator: N concurrent awc connections against one URL (or
//! spread over several, connection k on the k-th modulo their number), with
//! latency percentiles. It runs on its own actix system thread, so the
//! servers it measures never share its event loop.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct Load {
    pub method: &'static str,
    /// `{i}` in the URL is replaced by the request's number.
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub concurrency: usize,
    /// Stop after this many requests...
    pub requests: usize,
    /// ...or this long, whichever comes first.
    pub duration: Duration,
    /// The status every answer must have.
    pub expect: u16,
    /// Requests a second at most, spread evenly (an open-loop load while
    /// the gateway keeps up); `None`: as fast as answers come.
    pub rate: Option<f64>,
}

pub struct Stats {
    pub done: usize,
    pub errors: usize,
    pub elapsed: Duration,
    /// Sorted latencies.
    pub latencies: Vec<Duration>,
}

impl Stats {
    pub fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64()
    }

    pub fn percentile(&self, p: f64) -> Duration {
        percentile(&self.latencies, p)
    }
}

impl Stats {
    /// Runs one after another taken as one: their requests, errors and
    /// time added up, their latencies together.
    pub fn merge(runs: Vec<Stats>) -> Stats {
        let mut all = Stats {
            done: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            latencies: Vec::new(),
        };
        for r in runs {
            all.done += r.done;
            all.errors += r.errors;
            all.elapsed += r.elapsed;
            all.latencies.extend(r.latencies);
        }
        all.latencies.sort();
        all
    }
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// Runs the load to completion on a fresh thread.
pub fn run(load: Load) -> Stats {
    let urls = vec![load.url.clone()];
    run_spread(load, urls)
}

/// Runs the load with its connections spread evenly over `urls` (its own
/// `url` unused): one generator, one event loop, as for one URL.
pub fn run_spread(load: Load, urls: Vec<String>) -> Stats {
    assert!(!urls.is_empty(), "no URL to load");
    std::thread::spawn(move || actix_web::rt::System::new().block_on(drive(load, urls)))
        .join()
        .expect("load generator thread")
}

async fn drive(load: Load, urls: Vec<String>) -> Stats {
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let lat = Arc::new(Mutex::new(Vec::with_capacity(load.requests.min(1 << 22))));
    let start = Instant::now();
    let deadline = start + load.duration;
    let load = Arc::new(load);
    let mut tasks = Vec::new();
    for k in 0..load.concurrency {
        let (load, next, errors, lat) = (load.clone(), next.clone(), errors.clone(), lat.clone());
        let url = urls[k % urls.len()].clone();
        tasks.push(actix_web::rt::spawn(async move {
            let client = awc::Client::builder()
                .disable_redirects()
                .timeout(Duration::from_secs(30))
                .connector(awc::Connector::new().limit(0))
                .finish();
            let mut mine = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= load.requests || Instant::now() >= deadline {
                    break;
                }
                if let Some(rate) = load.rate {
                    let due = start + Duration::from_secs_f64(i as f64 / rate);
                    if due >= deadline {
                        break;
                    }
                    actix_web::rt::time::sleep_until(due.into()).await;
                }
                let url = url.replace("{i}", &i.to_string());
                let mut req = client.request(load.method.parse().expect("method"), url);
                for (n, v) in &load.headers {
                    match v.contains("{i}") {
                        true => {
                            req = req.insert_header((n.as_str(), v.replace("{i}", &i.to_string())))
                        }
                        false => req = req.insert_header((n.as_str(), v.as_str())),
                    }
                }
                let t = Instant::now();
                match req.send_body(load.body.clone()).await {
                    Ok(mut res) if res.status().as_u16() == load.expect => {
                        let _ = res.body().await;
                        mine.push(t.elapsed());
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            lat.lock().expect("latencies").extend(mine);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed();
    let mut latencies = std::mem::take(&mut *lat.lock().expect("latencies"));
    latencies.sort();
    Stats {
        done: latencies.len(),
        errors: errors.load(Ordering::Relaxed),
        elapsed,
        latencies,
    }
}
