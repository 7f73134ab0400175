//! Reads: status and the stored response. Every lookup
//! answers the same 404 for an unknown, malformed, expired or foreign id.

use std::sync::Arc;

use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{HttpRequest, HttpResponse, web};

use super::prefer::{Prefer, applied_wait};
use super::view::StatusView;
use super::{ApiError, State, reserved_file, single_header, wait};
use crate::crypto::{credential_hash, same_owner};
use crate::model::{RequestId, RequestRecord, Status, now_ms};
use crate::store::StoreError;

/// The record behind `{id}.json`, if the caller's credential submitted it.
async fn find_owned(
    req: &HttpRequest,
    state: &State,
    file: &str,
) -> Result<RequestRecord, ApiError> {
    let id: RequestId = file
        .strip_suffix(".json")
        .and_then(|s| s.parse().ok())
        .ok_or(ApiError::NotFound)?;
    let credential = single_header(req, "authorization").map_err(|_| ApiError::NotFound)?;
    let rec = state.store.get(&id).await?.ok_or(ApiError::NotFound)?;
    let caller = credential_hash(state.store.salt(), credential);
    if !same_owner(&rec.lane, &caller) || rec.is_expired(now_ms()) {
        return Err(ApiError::NotFound);
    }
    Ok(rec)
}

const STATUS_PATH: &str = "/async_api/v2/requests/";

/// `GET` (held with `Prefer: wait=N`) and `DELETE` (cancel) of a request.
pub async fn status(req: HttpRequest, state: web::Data<State>) -> Result<HttpResponse, ApiError> {
    if req.method() == Method::DELETE {
        return cancel(&req, &state).await;
    }
    let file = reserved_file(&req, STATUS_PATH, super::STATUS_METHODS)?;
    let mut rec = find_owned(&req, &state, file).await?;
    let prefer = Prefer::of(&req, state.max_wait);
    if let Some(wait) = prefer.wait
        && !wait::settled(rec.status)
    {
        // Held, it keeps only what it waits with (a held request's memory).
        let (id, lane) = (rec.id, rec.lane);
        drop(rec);
        rec = match wait::settled_within(&state, id, &lane, wait).await {
            Some(settled) => Arc::unwrap_or_clone(settled),
            None => find_owned(&req, &state, file).await?,
        };
    }
    let mut res = status_answer(&rec, &state).await?;
    if let Some(wait) = prefer.wait {
        res.headers_mut().insert(
            HeaderName::from_static("preference-applied"),
            HeaderValue::from_str(&applied_wait(wait)).map_err(|_| ApiError::NotFound)?,
        );
    }
    Ok(res)
}

/// A status view as the status path answers it: 303 to the response once
/// `done`, 200 otherwise.
pub async fn status_answer(rec: &RequestRecord, state: &State) -> Result<HttpResponse, ApiError> {
    let view = StatusView::new(rec, state).await?;
    Ok(match &view.response_url {
        Some(url) => HttpResponse::build(StatusCode::SEE_OTHER)
            .insert_header((header::LOCATION, url.as_str()))
            .json(&view),
        None => HttpResponse::Ok().json(&view),
    })
}

/// `DELETE`: the owner cancels an `enqueued` request (never sent then) or
/// deletes a finished one; a `started` one is 409 `in_flight`.
async fn cancel(req: &HttpRequest, state: &State) -> Result<HttpResponse, ApiError> {
    let file = req
        .path()
        .strip_prefix(STATUS_PATH)
        .filter(|f| !f.is_empty() && !f.contains('/'))
        .ok_or(ApiError::NotFound)?;
    let rec = find_owned(req, state, file).await?;
    match state.store.cancel(&rec.id).await {
        Ok(true) => {
            log::info!("request {} cancelled by its owner", rec.id);
            Ok(HttpResponse::NoContent().finish())
        }
        Ok(false) => Err(ApiError::NotFound),
        Err(StoreError::InFlight) => Err(ApiError::InFlight),
        Err(e) => Err(e.into()),
    }
}

pub async fn response(req: HttpRequest, state: web::Data<State>) -> Result<HttpResponse, ApiError> {
    let file = reserved_file(&req, "/async_api/v2/responses/", super::READ_METHODS)?;
    let rec = find_owned(&req, &state, file).await?;
    stored_response(&rec, &state).await
}

/// The stored response of a `done` request, as it was received (SPEC §3).
pub async fn stored_response(rec: &RequestRecord, state: &State) -> Result<HttpResponse, ApiError> {
    let outcome = match (&rec.status, &rec.outcome) {
        (Status::Done, Some(o)) => o,
        _ => return Err(ApiError::NotFound),
    };
    if !outcome.kept {
        return Err(ApiError::ResponseTooLarge);
    }
    let (head, body) = state
        .store
        .response(&rec.id)
        .await?
        .ok_or(ApiError::NotFound)?;
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
