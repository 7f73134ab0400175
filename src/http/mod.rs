//! The HTTP face: routes, handlers, and the views they render from stored
//! records. Handlers only store and wake the dispatcher; they never call
//! the upstream.

mod admin;
mod error;
mod ops;
mod prefer;
mod query;
mod submit;
mod view;
mod wait;

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};

pub use error::ApiError;

use crate::crypto::Sealer;
use crate::dispatcher;
use crate::metrics::Metrics;
use crate::store::Store;

/// What every handler shares.
pub struct State {
    pub store: Arc<Store>,
    pub sealer: Sealer,
    pub dispatch: dispatcher::Handle,
    pub metrics: Arc<Metrics>,
    pub max_body_size: u64,
    /// `--min-free-disk`: submissions get 507 below it.
    pub min_free_disk: u64,
    /// `--max-pending-per-credential`.
    pub max_pending_per_credential: Option<u64>,
    /// Makes `response_url` absolute when set.
    pub public_url: Option<String>,
    /// `--admin-token`: the admin API exists only when it is set.
    pub admin_token: Option<String>,
    /// `--max-wait`: the longest `Prefer: wait`.
    pub max_wait: std::time::Duration,
    /// True once the gateway stops: held answers are given at once.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Which credentials' lanes are paused, and why (the dispatcher's).
    pub pauses: dispatcher::Pauses,
    /// Where the metrics scrape looks for the oldest queued request.
    pub oldest_queued: ops::OldestQueued,
}

/// Which of the gateway's endpoints a listener serves (SPEC §11): all of
/// them on the one listener, or the API on the public one and the
/// operator's endpoints (health, metrics, the OpenAPI document, admin) on
/// `--ops-listen`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Face {
    All,
    Public,
    Ops,
}

/// The methods each reserved path takes (SPEC §0), for 405's `Allow`.
pub const STATUS_METHODS: &str = "GET, HEAD, DELETE";
pub const READ_METHODS: &str = "GET, HEAD";
pub const BULK_METHODS: &str = "POST";
/// A submission takes any method but `CONNECT` and `TRACE`.
pub const SUBMIT_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

/// The routes of one listener. The hot ones (submit, status, response)
/// are static-prefix scopes whose handlers read the rest of the path
/// themselves: actix's dynamic segments run a regex per request, which took
/// a sixth of the CPU of status polls (benches/RESULTS.md).
pub fn routes(cfg: &mut web::ServiceConfig, face: Face) {
    if face != Face::Public {
        ops_routes(cfg);
    }
    if face == Face::Ops {
        cfg.default_service(web::to(|req: HttpRequest| async move {
            Err::<HttpResponse, _>(ApiError::NoRoute(no_route(&req, Face::Ops)))
        }));
        return;
    }
    // Bulk status (SPEC §10); never forwarded.
    cfg.service(
        web::resource("/async_api/v2/requests.json")
            .route(web::post().to(wait::bulk))
            .default_service(web::to(|| method_not_allowed(BULK_METHODS))),
    )
    .service(web::scope("/async_api/v2/requests").default_service(web::to(query::status)))
    .service(web::scope("/async_api/v2/responses").default_service(web::to(query::response)))
    .service(web::scope("/async_api").default_service(web::to(submit::submit)))
    .default_service(web::to(move |req: HttpRequest| async move {
        Err::<HttpResponse, _>(ApiError::NoRoute(no_route(&req, face)))
    }));
}

/// `/healthz`, `/metrics`, `/openapi.json` and the admin API.
fn ops_routes(cfg: &mut web::ServiceConfig) {
    cfg.service(read("/healthz", ops::healthz))
        .service(read("/metrics", ops::metrics))
        .service(read("/openapi.json", ops::openapi))
        .service(
            web::scope("/admin")
                .service(
                    web::resource("/requests")
                        .route(web::get().to(admin::list))
                        .default_service(web::to(|r, s| admin::not_allowed(r, s, "GET"))),
                )
                .service(
                    web::resource("/requests/{id}/requeue")
                        .route(web::post().to(admin::requeue))
                        .default_service(web::to(|r, s| admin::not_allowed(r, s, "POST"))),
                )
                .service(
                    web::resource("/requests/{id}")
                        .route(web::delete().to(admin::delete))
                        .default_service(web::to(|r, s| admin::not_allowed(r, s, "DELETE"))),
                )
                .default_service(web::to(admin::not_found)),
        );
}

/// A `GET` and `HEAD` resource; other methods 405.
fn read<F, Args>(path: &str, handler: F) -> actix_web::Resource
where
    F: actix_web::Handler<Args> + Clone,
    Args: actix_web::FromRequest + 'static,
    F::Output: actix_web::Responder + 'static,
{
    web::resource(path.to_string())
        .route(web::get().to(handler.clone()))
        .route(web::head().to(handler))
        .default_service(web::to(|| method_not_allowed(READ_METHODS)))
}

/// What a path the gateway does not serve gets told: what it does serve,
/// and the submission path a client most likely meant (`/api/...` when the
/// prefix was not swapped).
fn no_route(req: &HttpRequest, face: Face) -> String {
    let path = req.path();
    let ops =
        matches!(path, "/healthz" | "/metrics" | "/openapi.json") || path.starts_with("/admin/");
    if face == Face::Ops {
        return format!(
            "this is the operations listener: it serves /healthz, /metrics, /openapi.json and /admin/...; submissions, status and responses are on the public listener, not {path}"
        );
    }
    if face == Face::Public && ops {
        return format!("{path} is served on the operations listener (--ops-listen), not here");
    }
    let served = "asyncgate serves submissions at /async_api/<rest> (run later as <upstream>/api/<rest>), status at /async_api/v2/requests/{id}.json, responses at /async_api/v2/responses/{id}.json and bulk status at POST /async_api/v2/requests.json (see /openapi.json)";
    match path
        .strip_prefix("/api/")
        .map(|rest| format!("/async_api/{rest}"))
    {
        Some(g) => format!("no route {path}: {served}; did you mean {g}?"),
        None => format!("no route {path}: {served}"),
    }
}

/// The `{file}` of a status or response path: one path segment after
/// `prefix` (anything deeper is 404), for `GET` and `HEAD` only (other
/// methods: 405 with `allow`).
fn reserved_file<'a>(
    req: &'a HttpRequest,
    prefix: &str,
    allow: &'static str,
) -> Result<&'a str, ApiError> {
    let file = req
        .path()
        .strip_prefix(prefix)
        .filter(|f| !f.is_empty() && !f.contains('/'))
        .ok_or(ApiError::NotFound)?;
    if req.method() != actix_web::http::Method::GET && req.method() != actix_web::http::Method::HEAD
    {
        return Err(ApiError::MethodNotAllowed(allow));
    }
    Ok(file)
}

async fn method_not_allowed(allow: &'static str) -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed(allow))
}

/// The single value of a header; `Err` when it is repeated.
fn single_header<'a>(req: &'a HttpRequest, name: &str) -> Result<Option<&'a [u8]>, ()> {
    let mut values = req.headers().get_all(name);
    let first = values.next();
    if values.next().is_some() {
        return Err(());
    }
    Ok(first.map(|v| v.as_bytes()))
}
