//! The HTTP face: routes, handlers, and the views they render from stored
//! records. Handlers only store and wake the dispatcher; they never call
//! the upstream.

mod admin;
mod error;
mod prefer;
mod query;
mod submit;
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
}

/// The routes. The hot ones (submit, status, response) are static-prefix
/// scopes whose handlers read the rest of the path themselves: actix's
/// dynamic segments run a regex per request, which took a sixth of the CPU
/// of status polls (benches/RESULTS.md).
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(query::healthz))
        .route("/metrics", web::get().to(query::metrics))
        // Bulk status (SPEC §10); never forwarded.
        .service(
            web::resource("/async_api/v2/requests.json")
                .route(web::post().to(wait::bulk))
                .default_service(web::to(method_not_allowed)),
        )
        .service(web::scope("/async_api/v2/requests").default_service(web::to(query::status)))
        .service(web::scope("/async_api/v2/responses").default_service(web::to(query::response)))
        .service(
            web::scope("/admin")
                .route("/requests", web::get().to(admin::list))
                .route("/requests/{id}/requeue", web::post().to(admin::requeue))
                .route("/requests/{id}", web::delete().to(admin::delete))
                .default_service(web::to(not_found)),
        )
        .service(web::scope("/async_api").default_service(web::to(submit::submit)))
        .default_service(web::to(not_found));
}

/// The `{file}` of a status or response path, for GET and HEAD only: one
/// path segment after `prefix`; anything deeper is 404, other methods 405.
fn reserved_file<'a>(req: &'a HttpRequest, prefix: &str) -> Result<&'a str, ApiError> {
    let file = req
        .path()
        .strip_prefix(prefix)
        .filter(|f| !f.is_empty() && !f.contains('/'))
        .ok_or(ApiError::NotFound)?;
    if req.method() != actix_web::http::Method::GET && req.method() != actix_web::http::Method::HEAD
    {
        return Err(ApiError::MethodNotAllowed);
    }
    Ok(file)
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
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
