//! The HTTP face: routes, handlers, and the views they render from stored
//! records. Handlers only store and wake the dispatcher; they never call
//! the upstream.

mod admin;
mod error;
mod query;
mod submit;

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
    /// Makes `response_url` absolute when set.
    pub public_url: Option<String>,
    /// `--admin-token`: the admin API exists only when it is set.
    pub admin_token: Option<String>,
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(query::healthz))
        .route("/metrics", web::get().to(query::metrics))
        .service(
            web::resource("/async_api/v2/requests/{file}")
                .route(web::get().to(query::status))
                .route(web::head().to(query::status))
                .default_service(web::to(method_not_allowed)),
        )
        .service(
            web::resource("/async_api/v2/responses/{file}")
                .route(web::get().to(query::response))
                .route(web::head().to(query::response))
                .default_service(web::to(method_not_allowed)),
        )
        .route("/admin/requests", web::get().to(admin::list))
        .route(
            "/admin/requests/{id}/requeue",
            web::post().to(admin::requeue),
        )
        .route("/admin/requests/{id}", web::delete().to(admin::delete))
        // Reserved: never forwarded (a listing endpoint comes later).
        .service(
            web::resource([
                "/async_api/v2/requests.json",
                "/async_api/v2/requests/{tail:.*}",
                "/async_api/v2/responses/{tail:.*}",
                "/admin",
                "/admin/{tail:.*}",
                "/healthz",
                "/metrics",
            ])
            .to(not_found),
        )
        .service(web::resource("/async_api/{tail:.*}").to(submit::submit))
        .default_service(web::to(not_found));
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
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
