//! The admin API (SPEC §8), for `unknown` requests that need a person:
//! list by status, requeue an `unknown` one, delete a finished one. It
//! exists only with `--admin-token`; every call needs that bearer token.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use super::{ApiError, State, single_header};
use crate::model::{RequestId, RequestRecord, Status, format_time};

/// Checks the bearer token; `/admin/...` is 404 when the API is off.
fn guard(req: &HttpRequest, state: &State) -> Result<(), ApiError> {
    let Some(token) = &state.admin_token else {
        return Err(ApiError::NotFound);
    };
    let expected = format!("Bearer {token}");
    match single_header(req, "authorization") {
        Ok(Some(given)) if bool::from(given.ct_eq(expected.as_bytes())) => Ok(()),
        _ => Err(ApiError::Unauthorized),
    }
}

#[derive(Deserialize)]
pub struct ListQuery {
    status: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
}

const MAX_PAGE: usize = 1000;

pub async fn list(
    req: HttpRequest,
    query: web::Query<ListQuery>,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    guard(&req, &state)?;
    let status: Status = query
        .status
        .as_deref()
        .unwrap_or("unknown")
        .parse()
        .map_err(|_| {
            ApiError::bad(
                "invalid_status",
                "status must be enqueued, started, done or unknown",
            )
        })?;
    let limit = query.limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let after: Option<RequestId> = match &query.after {
        Some(a) => Some(
            a.parse()
                .map_err(|_| ApiError::bad("invalid_after", "after must be a request id"))?,
        ),
        None => None,
    };
    let records = state.store.list(status, after.as_ref(), limit)?;
    let next = (records.len() == limit)
        .then(|| records.last().map(|r| r.id.to_string()))
        .flatten();
    let items: Vec<Value> = records.iter().map(item).collect();
    Ok(HttpResponse::Ok().json(json!({"items": items, "next": next})))
}

fn item(rec: &RequestRecord) -> Value {
    let path = rec.target.split('?').next().unwrap_or_default();
    json!({
        "id": rec.id.to_string(),
        "status": rec.status.as_str(),
        "method": rec.method,
        "path": format!("/async_api/{path}"),
        "created": format_time(rec.created_ms),
        "started": rec.started_ms.map(format_time),
    })
}

fn parse_id(raw: &str) -> Result<RequestId, ApiError> {
    raw.parse().map_err(|_| ApiError::NotFound)
}

pub async fn requeue(
    req: HttpRequest,
    id: web::Path<String>,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    guard(&req, &state)?;
    let id = parse_id(&id)?;
    match state.store.requeue_unknown(&id).await? {
        Some(rec) => {
            state.dispatch.queued(rec.lane);
            log::info!("request {id} requeued by an operator");
            Ok(HttpResponse::build(StatusCode::ACCEPTED).json(item(&rec)))
        }
        None => Err(conflict_or_missing(
            &state,
            &id,
            "only an unknown request can be requeued",
        )?),
    }
}

pub async fn delete(
    req: HttpRequest,
    id: web::Path<String>,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    guard(&req, &state)?;
    let id = parse_id(&id)?;
    if state.store.delete(&id).await? {
        log::info!("request {id} deleted by an operator");
        return Ok(HttpResponse::NoContent().finish());
    }
    Err(conflict_or_missing(
        &state,
        &id,
        "an enqueued or started request cannot be deleted",
    )?)
}

/// 409 when the request exists (in the wrong status), else 404.
fn conflict_or_missing(state: &State, id: &RequestId, why: &str) -> Result<ApiError, ApiError> {
    Ok(match state.store.get(id)? {
        Some(rec) => ApiError::Conflict(format!("{why}; it is {}", rec.status.as_str())),
        None => ApiError::NotFound,
    })
}
