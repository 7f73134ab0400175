//! Reads: status, the stored response, health and metrics. Every lookup
//! answers the same 404 for an unknown, malformed, expired or foreign id.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Serialize;
use serde_json::json;

use super::{ApiError, State, reserved_file, single_header};
use crate::callback::response_url;
use crate::crypto::{credential_hash, same_owner};
use crate::model::{RequestId, RequestRecord, Status, format_time, now_ms};

/// The record behind `{id}.json`, if the caller's credential submitted it.
fn find_owned(req: &HttpRequest, state: &State, file: &str) -> Result<RequestRecord, ApiError> {
    let id: RequestId = file
        .strip_suffix(".json")
        .and_then(|s| s.parse().ok())
        .ok_or(ApiError::NotFound)?;
    let credential = single_header(req, "authorization").map_err(|_| ApiError::NotFound)?;
    let rec = state.store.get(&id)?.ok_or(ApiError::NotFound)?;
    let caller = credential_hash(state.store.salt(), credential);
    if !same_owner(&rec.lane, &caller) || rec.is_expired(now_ms()) {
        return Err(ApiError::NotFound);
    }
    Ok(rec)
}

pub async fn status(req: HttpRequest, state: web::Data<State>) -> Result<HttpResponse, ApiError> {
    let file = reserved_file(&req, "/async_api/v2/requests/")?;
    let rec = find_owned(&req, &state, file)?;
    let view = StatusView::new(&rec, state.public_url.as_deref());
    match &view.response_url {
        Some(url) => Ok(HttpResponse::build(StatusCode::SEE_OTHER)
            .insert_header((header::LOCATION, url.as_str()))
            .json(&view)),
        None => Ok(HttpResponse::Ok().json(&view)),
    }
}

/// The status body (SPEC §2): the fields each status shows, in order.
#[derive(Serialize)]
struct StatusView {
    id: String,
    status: &'static str,
    created: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    started: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_http_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exec_time: Option<u64>,
}

impl StatusView {
    fn new(rec: &RequestRecord, public_url: Option<&str>) -> StatusView {
        let done = match (rec.status, &rec.outcome) {
            (Status::Done, Some(o)) => Some(o),
            _ => None,
        };
        StatusView {
            id: rec.id.to_string(),
            status: rec.status.as_str(),
            created: format_time(rec.created_ms),
            started: rec
                .started_ms
                .filter(|_| rec.status != Status::Enqueued)
                .map(format_time),
            response_http_code: done.map(|o| o.code),
            response_url: done.map(|_| response_url(public_url, &rec.id)),
            exec_time: done.map(|o| o.exec_ms),
        }
    }
}

pub async fn response(req: HttpRequest, state: web::Data<State>) -> Result<HttpResponse, ApiError> {
    let file = reserved_file(&req, "/async_api/v2/responses/")?;
    let rec = find_owned(&req, &state, file)?;
    let outcome = match (&rec.status, &rec.outcome) {
        (Status::Done, Some(o)) => o,
        _ => return Err(ApiError::NotFound),
    };
    if !outcome.kept {
        return Err(ApiError::ResponseTooLarge);
    }
    let (head, body) = state.store.response(&rec.id)?.ok_or(ApiError::NotFound)?;
    let code = StatusCode::from_u16(head.code).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut res = HttpResponse::build(code);
    for (name, value) in &head.headers {
        // Content-Length is recomputed from the body (a 304 keeps the
        // upstream's: actix-web writes a set one only for 304).
        if name == "content-length" && code != StatusCode::NOT_MODIFIED {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            res.append_header((n, v));
        }
    }
    Ok(res.body(body))
}

pub async fn healthz(state: web::Data<State>) -> HttpResponse {
    if let Some(why) = state.store.fatal().failed() {
        HttpResponse::ServiceUnavailable().json(json!({"status": "store failed", "reason": why}))
    } else if state.dispatch.is_alive() {
        HttpResponse::Ok().json(json!({"status": "ok"}))
    } else {
        HttpResponse::ServiceUnavailable().json(json!({"status": "dispatcher stopped"}))
    }
}

pub async fn metrics(state: web::Data<State>) -> Result<HttpResponse, ApiError> {
    let counts = state.store.counts()?;
    let named: Vec<(&str, u64)> = counts.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render(&named)))
}
