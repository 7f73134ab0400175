//! What the benchmarks measure against: baseline actix-web handlers, a
//! fast fake upstream, and the release gateway binary as a process.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{App, HttpResponse, HttpServer, web};

/// A server on its own thread and actix system; stopped on drop.
pub struct Server {
    pub addr: SocketAddr,
    handle: actix_web::dev::ServerHandle,
}

impl Drop for Server {
    fn drop(&mut self) {
        let h = self.handle.clone();
        std::thread::spawn(move || actix_web::rt::System::new().block_on(h.stop(false)));
    }
}

fn spawn<F, T, B>(workers: usize, app: F) -> Server
where
    F: Fn() -> App<T> + Send + Clone + 'static,
    T: actix_web::dev::ServiceFactory<
            actix_web::dev::ServiceRequest,
            Config = (),
            Response = actix_web::dev::ServiceResponse<B>,
            Error = actix_web::Error,
            InitError = (),
        > + 'static,
    B: actix_web::body::MessageBody + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            let server = HttpServer::new(app)
                .workers(workers)
                .backlog(4096)
                .disable_signals()
                .bind("127.0.0.1:0")
                .expect("bind");
            let addr = server.addrs()[0];
            let server = server.run();
            tx.send((addr, server.handle())).expect("report address");
            let _ = server.await;
        })
    });
    let (addr, handle) = rx.recv().expect("server started");
    Server { addr, handle }
}

/// Baseline for accepting: reads the whole request body and answers 202
/// with a small JSON body, storing nothing.
pub fn plain_accept() -> Server {
    spawn(2, || {
        App::new().app_data(web::PayloadConfig::new(16 << 20)).default_service(web::to(|body: web::Bytes| async move {
            HttpResponse::Accepted()
                .insert_header(("Location", "/async_api/v2/requests/01JDQ8M3Z1X4A6QF0W3N9YB2KD.json"))
                .json(serde_json::json!({"id": "01JDQ8M3Z1X4A6QF0W3N9YB2KD", "status": "enqueued", "bytes": body.len()}))
        }))
    })
}

/// Baseline for status polls: a small JSON answer.
pub fn small_json() -> Server {
    spawn(2, || {
        App::new().default_service(web::to(|| async {
            HttpResponse::Ok().json(serde_json::json!({"id": "01JDQ8M3Z1X4A6QF0W3N9YB2KD", "status": "enqueued", "created": "2026-11-30 01:09:59"}))
        }))
    })
}

/// A fast upstream: counts requests, records arrival times, and while
/// `refuse` is set answers 429 with an hour's `Retry-After` (to keep a
/// queue waiting).
#[derive(Clone, Default)]
pub struct Upstream {
    pub count: Arc<AtomicUsize>,
    pub arrivals: Arc<Mutex<Vec<Instant>>>,
    pub refuse: Arc<AtomicBool>,
    pub record: Arc<AtomicBool>,
    /// While set, requests are held unanswered.
    pub hold: Arc<AtomicBool>,
    /// With `record`: when each path was answered.
    pub answered: Arc<Mutex<std::collections::HashMap<String, Instant>>>,
}

pub fn upstream(state: Upstream) -> Server {
    spawn(1, move || {
        let s = state.clone();
        App::new()
            .app_data(web::PayloadConfig::new(16 << 20))
            .default_service(web::to(
                move |req: actix_web::HttpRequest, _body: web::Bytes| {
                    let s = s.clone();
                    async move {
                        if s.record.load(Ordering::Relaxed) {
                            s.arrivals.lock().expect("arrivals").push(Instant::now());
                        }
                        while s.hold.load(Ordering::Relaxed) {
                            actix_web::rt::time::sleep(Duration::from_millis(5)).await;
                        }
                        if s.record.load(Ordering::Relaxed) {
                            let path = req.path().to_string();
                            s.answered
                                .lock()
                                .expect("answered")
                                .insert(path, Instant::now());
                        }
                        if s.refuse.load(Ordering::Relaxed) {
                            return HttpResponse::TooManyRequests()
                                .insert_header(("Retry-After", "3600"))
                                .finish();
                        }
                        s.count.fetch_add(1, Ordering::Relaxed);
                        HttpResponse::Ok()
                            .content_type("application/json")
                            .body("{\"ok\":true}")
                    }
                },
            ))
    })
}

/// The release gateway binary, as a process.
pub struct Gateway {
    child: Child,
    pub base: String,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port()
}

impl Gateway {
    /// Starts it and returns once `/healthz` answers, with the time that took.
    pub fn start(upstream: &str, data: &Path, extra: &[&str]) -> (Gateway, Duration) {
        let port = free_port();
        let t = Instant::now();
        let child = Command::new(env!("CARGO_BIN_EXE_asyncgate"))
            .args([
                "serve",
                "--upstream",
                upstream,
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .arg("--data-dir")
            .arg(data)
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("BENCH_GATEWAY_LOG").unwrap_or("warn".into()),
            )
            .stdout(Stdio::null())
            .spawn()
            .expect("start the gateway");
        let base = format!("http://127.0.0.1:{port}");
        loop {
            if healthy(port) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "the gateway did not start"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        (Gateway { child, base }, t.elapsed())
    }

    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// SIGTERM and wait: a clean stop.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw `GET /healthz` (no runtime needed).
fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).is_ok() && &buf[9..12] == b"200"
}

/// Bytes of every file under `dir`.
pub fn disk_usage(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                disk_usage(&p)
            } else {
                e.metadata().map_or(0, |m| m.len())
            }
        })
        .sum()
}
