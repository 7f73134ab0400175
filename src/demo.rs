//! `asyncgate demo`: the gateway in front of a small bundled upstream, for
//! trying asyncgate on a fresh machine. Started only on request: `serve`
//! never falls back to it.
//!
//! The demo upstream answers `ANY /api/<rest>` with a JSON echo of what it
//! received (after ~100 ms, like a real API), sends the myTarget rate-limit
//! headers (5 requests a second per credential), and logs callbacks that
//! arrive at `/callback`, so the README walkthrough needs nothing else.

use std::time::Duration;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use serde_json::json;

use crate::app::{self, AppError};
use crate::config::DemoArgs;

async fn echo(req: HttpRequest, body: web::Bytes) -> HttpResponse {
    tokio::time::sleep(Duration::from_millis(100)).await;
    HttpResponse::Ok()
        .insert_header(("X-RateLimit-RPS-Limit", "5"))
        .json(json!({
            "demo": "this is the demo upstream's answer",
            "method": req.method().as_str(),
            "path": req.path(),
            "query": req.query_string(),
            "body_bytes": body.len(),
            "authorized": req.headers().contains_key("authorization"),
        }))
}

async fn callback(req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let params = if body.is_empty() {
        req.query_string().to_string()
    } else {
        String::from_utf8_lossy(&body).into_owned()
    };
    let webhook_id = req
        .headers()
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    log::info!(
        "demo callback receiver got {} {params} (webhook-id {webhook_id})",
        req.method()
    );
    HttpResponse::Ok().finish()
}

pub async fn run(args: &DemoArgs) -> Result<(), AppError> {
    let upstream = HttpServer::new(|| {
        App::new()
            .route("/callback", web::to(callback))
            .route("/api/{tail:.*}", web::to(echo))
    })
    .disable_signals()
    .workers(1)
    .bind(args.demo_listen)
    .map_err(|e| AppError::Listen(args.demo_listen, e))?
    .run();
    let upstream_handle = upstream.handle();
    tokio::task::spawn_local(upstream);
    let base = format!("http://{}", args.demo_listen);
    log::info!("demo upstream on {base}; callbacks to {base}/callback are logged");
    let running = app::start(&base, &args.gateway).await?;
    let result = app::run_until_signal(running).await;
    upstream_handle.stop(true).await;
    result
}
