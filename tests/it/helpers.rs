//! The harness: the real gateway on port 0 with a temporary data dir, in
//! front of a fake upstream each test scripts, and a client with one method
//! per endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use asyncgate::app::{self, Running};
use asyncgate::config::{Cli, Command};
use clap::Parser;
use serde_json::Value;

/// A request as the fake upstream (or callback receiver) saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// Path and raw query, as received.
    pub uri: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub at: Instant,
}

/// Header lookups for anything recorded as (lower-case name, value) pairs.
pub trait Headers {
    fn pairs(&self) -> &[(String, Vec<u8>)];

    /// Every value of `name`, in order.
    fn header_values(&self, name: &str) -> Vec<&[u8]> {
        self.pairs()
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .collect()
    }

    /// The first value of `name`, as text.
    fn header(&self, name: &str) -> Option<&str> {
        self.header_values(name)
            .first()
            .map(|v| std::str::from_utf8(v).unwrap())
    }
}

impl Headers for Seen {
    fn pairs(&self) -> &[(String, Vec<u8>)] {
        &self.headers
    }
}

/// What the fake upstream answers.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub delay: Duration,
}

impl Reply {
    pub fn ok(body: &str) -> Reply {
        Reply::status(200).body(body.as_bytes())
    }

    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: vec![],
            body: vec![],
            delay: Duration::ZERO,
        }
    }

    pub fn header(mut self, name: &str, value: &[u8]) -> Reply {
        self.headers.push((name.into(), value.to_vec()));
        self
    }

    pub fn body(mut self, body: &[u8]) -> Reply {
        self.body = body.to_vec();
        self
    }

    pub fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

type Script = dyn Fn(&Seen, usize) -> Reply + Send + Sync;

/// An HTTP server the test scripts: `script(request, index)` decides each
/// answer; every request is recorded.
#[derive(Clone)]
pub struct Fake {
    pub addr: SocketAddr,
    shared: Shared,
}

/// The fake's state, shared with its handlers.
#[derive(Clone, Default)]
struct Shared {
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<Option<Arc<Script>>>>,
    /// Per `Authorization` value: (in flight now, most ever in flight).
    in_flight: Arc<Mutex<HashMap<String, (usize, usize)>>>,
    /// Per `Authorization` value: answers other than 429.
    through: Arc<Mutex<HashMap<String, usize>>>,
}

impl Fake {
    pub async fn start() -> Fake {
        Fake::start_with(|_, _| Reply::ok("{\"ok\":true}")).await
    }

    pub async fn start_with(
        script: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static,
    ) -> Fake {
        Fake::start_on("127.0.0.1:0".parse().unwrap(), script).await
    }

    pub async fn start_on(
        addr: SocketAddr,
        script: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static,
    ) -> Fake {
        let shared = Shared::default();
        *shared.script.lock().unwrap() = Some(Arc::new(script));
        let s = shared.clone();
        let server = HttpServer::new(move || {
            let s = s.clone();
            App::new()
                .app_data(web::PayloadConfig::new(64 << 20))
                .default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
                    let s = s.clone();
                    async move { answer(req, body, s).await }
                }))
        })
        .workers(2)
        .disable_signals()
        .bind(addr)
        .unwrap();
        let addr = server.addrs()[0];
        actix_web::rt::spawn(server.run());
        Fake { addr, shared }
    }

    /// Answers other than 429 given to one credential.
    pub fn through(&self, authorization: &str) -> usize {
        self.shared
            .through
            .lock()
            .unwrap()
            .get(authorization)
            .copied()
            .unwrap_or(0)
    }

    /// The most requests ever in flight at once for one credential.
    pub fn max_in_flight(&self, authorization: &str) -> usize {
        self.shared
            .in_flight
            .lock()
            .unwrap()
            .get(authorization)
            .map_or(0, |(_, m)| *m)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, script: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static) {
        *self.shared.script.lock().unwrap() = Some(Arc::new(script));
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// Waits until `n` requests were seen.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<Seen> {
        let deadline = Instant::now() + within;
        loop {
            let seen = self.seen();
            if seen.len() >= n {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "saw {} requests, wanted {n}: {seen:#?}",
                seen.len()
            );
            actix_web::rt::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn answer(req: HttpRequest, body: web::Bytes, shared: Shared) -> HttpResponse {
    let s = Seen {
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        headers: req
            .headers()
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect(),
        body: body.to_vec(),
        at: Instant::now(),
    };
    let index = {
        let mut all = shared.seen.lock().unwrap();
        all.push(s.clone());
        all.len() - 1
    };
    let who = s.header("authorization").unwrap_or_default().to_string();
    {
        let mut f = shared.in_flight.lock().unwrap();
        let e = f.entry(who.clone()).or_default();
        e.0 += 1;
        e.1 = e.1.max(e.0);
    }
    let script = shared.script.lock().unwrap().clone().expect("a script");
    let reply = script(&s, index);
    if !reply.delay.is_zero() {
        actix_web::rt::time::sleep(reply.delay).await;
    }
    if reply.status != 429 {
        *shared
            .through
            .lock()
            .unwrap()
            .entry(who.clone())
            .or_default() += 1;
    }
    shared.in_flight.lock().unwrap().entry(who).or_default().0 -= 1;
    let mut res = HttpResponse::build(StatusCode::from_u16(reply.status).unwrap());
    for (n, v) in reply.headers {
        res.append_header((n, v));
    }
    res.body(reply.body)
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub data_dir: tempfile::TempDir,
    pub running: Option<Running>,
    pub client: awc::Client,
    args: Vec<String>,
    upstream: String,
}

pub fn parse_args(
    upstream: &str,
    data_dir: &std::path::Path,
    extra: &[&str],
) -> asyncgate::config::ServeArgs {
    let mut argv: Vec<String> = [
        "asyncgate",
        "serve",
        "--upstream",
        upstream,
        "--listen",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.push("--data-dir".into());
    argv.push(data_dir.join("data").display().to_string());
    argv.extend(crate::backend::store_flags(&data_dir.join("data")));
    argv.extend(
        ["--workers", "2", "--shutdown-timeout", "5s"]
            .iter()
            .map(|s| s.to_string()),
    );
    argv.extend(extra.iter().map(|s| s.to_string()));
    match Cli::try_parse_from(argv).expect("test flags parse").command {
        Command::Serve(a) => a,
        _ => unreachable!(),
    }
}

impl TestApp {
    pub async fn start(upstream: &str, extra: &[&str]) -> TestApp {
        let data_dir = tempfile::tempdir().unwrap();
        TestApp::start_in(upstream, extra, data_dir).await
    }

    pub async fn start_in(upstream: &str, extra: &[&str], data_dir: tempfile::TempDir) -> TestApp {
        let _ = env_logger::builder().is_test(true).try_init();
        let args = parse_args(upstream, data_dir.path(), extra);
        // sled 0.34 releases its lock on the data dir some moments after
        // the last handle is dropped (spacejam/sled#1234), so an in-process
        // restart can find it still held by the instance just stopped. A
        // real restart is a new process; here, wait the moment out.
        let deadline = Instant::now() + Duration::from_secs(5);
        let running = loop {
            match app::start(&args.upstream, &args.gateway).await {
                Err(app::AppError::Store(asyncgate::store::StoreError::Locked(_)))
                    if Instant::now() < deadline =>
                {
                    actix_web::rt::time::sleep(Duration::from_millis(50)).await;
                }
                started => break started.expect("gateway starts"),
            }
        };
        TestApp {
            addr: running.addr,
            data_dir,
            running: Some(running),
            client: awc::Client::builder()
                .no_default_headers()
                .disable_redirects()
                .timeout(Duration::from_secs(30))
                .finish(),
            args: extra.iter().map(|s| s.to_string()).collect(),
            upstream: upstream.to_string(),
        }
    }

    /// Stops gracefully and starts again on the same data dir.
    pub async fn restart(mut self) -> TestApp {
        self.running.take().unwrap().stop().await.unwrap();
        let extra: Vec<&str> = self.args.iter().map(|s| s.as_str()).collect();
        TestApp::start_in(&self.upstream.clone(), &extra, self.data_dir).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends `method path` with headers and body; returns status, headers
    /// and body.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Answer {
        self.call_at(self.addr, method, path, headers, body).await
    }

    /// `call` to another of the gateway's listeners (`--ops-listen`).
    pub async fn call_at(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Answer {
        let mut req = self
            .client
            .request(method.parse().unwrap(), format!("http://{addr}{path}"))
            .no_decompress();
        for (n, v) in headers {
            req = req.append_header((*n, *v));
        }
        let mut res = req.send_body(body.to_vec()).await.expect("gateway answers");
        let body = res.body().limit(256 << 20).await.unwrap().to_vec();
        Answer {
            status: res.status().as_u16(),
            headers: res
                .headers()
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
            body,
        }
    }

    /// Submits with no body as `authorization` and expects 202; the id.
    pub async fn submit_as(&self, method: &str, path: &str, authorization: &str) -> String {
        self.submit(method, path, &[("Authorization", authorization)], b"")
            .await
    }

    /// Submits and expects 202; returns the id.
    pub async fn submit(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> String {
        let a = self.call(method, path, headers, body).await;
        assert_eq!(a.status, 202, "submit answered {a:?}");
        a.json()["id"].as_str().unwrap().to_string()
    }

    pub async fn status(&self, id: &str, auth: Option<&str>) -> Answer {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        self.call(
            "GET",
            &format!("/async_api/v2/requests/{id}.json"),
            &headers,
            b"",
        )
        .await
    }

    pub async fn response(&self, id: &str, auth: Option<&str>) -> Answer {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        self.call(
            "GET",
            &format!("/async_api/v2/responses/{id}.json"),
            &headers,
            b"",
        )
        .await
    }

    /// Polls the status until it is `want`; fails with the last answer.
    pub async fn wait_for_status(
        &self,
        id: &str,
        auth: Option<&str>,
        want: &str,
        within: Duration,
    ) -> Answer {
        let deadline = Instant::now() + within;
        loop {
            let a = self.status(id, auth).await;
            if a.status != 404 && a.json()["status"] == want {
                return a;
            }
            assert!(
                Instant::now() < deadline,
                "{id} never became {want}; last answer {a:?}"
            );
            actix_web::rt::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The value of an unlabelled counter or gauge in `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<u64> {
        let text = String::from_utf8(self.call("GET", "/metrics", &[], b"").await.body).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// Polls `/metrics` until `name` is at least `n`; fails with the last
    /// value seen.
    pub async fn wait_for_metric(&self, name: &str, n: u64, within: Duration) -> u64 {
        let deadline = Instant::now() + within;
        loop {
            let v = self.metric(name).await;
            if v.is_some_and(|v| v >= n) {
                return v.unwrap_or_default();
            }
            assert!(
                Instant::now() < deadline,
                "{name} never reached {n}; last value {v:?}"
            );
            actix_web::rt::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await.unwrap();
        }
    }
}

#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

impl Headers for Answer {
    fn pairs(&self) -> &[(String, Vec<u8>)] {
        &self.headers
    }
}

/// Sends raw bytes to `addr` (one HTTP/1.1 request with `Connection:
/// close`) and returns the raw answer: for what awc will not send.
pub async fn raw_request(addr: SocketAddr, request: Vec<u8>) -> String {
    actix_web::rt::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&request).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
    .unwrap()
}

/// A server that reads one request per connection, writes `partial` (the
/// start of an answer) and closes the connection: a failure after
/// sending. Counts connections.
pub fn half_answer_server(
    partial: &'static [u8],
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(partial);
        }
    });
    (addr, count)
}

pub const SECS: fn(u64) -> Duration = Duration::from_secs;
