//! The admin API (SPEC §8), for `unknown` requests that need a person:
//! list by status, requeue an `unknown` one, delete a finished one. It
//! exists only with `--admin-token`; every call needs that bearer token.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
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

/// `/admin/...` paths that are not the API's: 404 as ever, but only
/// after the token (a caller without it learns nothing about the paths).
pub async fn not_found(
    req: HttpRequest,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    guard(&req, &state)?;
    Err(ApiError::NoRoute(
        "the admin API is GET /admin/requests, POST /admin/requests/{id}/requeue and DELETE /admin/requests/{id}".into(),
    ))
}

/// An admin path with the wrong method: 405 with `Allow`, after the token.
pub async fn not_allowed(
    req: HttpRequest,
    state: web::Data<State>,
    allow: &'static str,
) -> Result<HttpResponse, ApiError> {
    guard(&req, &state)?;
    Err(ApiError::MethodNotAllowed(allow))
}

/// The list's query, read by hand so that every mistake in it gets the
/// JSON error shape (an extractor's would be plain text).
#[derive(Default)]
struct ListQuery {
    status: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

impl ListQuery {
    fn parse(query: &str) -> Result<ListQuery, ApiError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
            .map_err(|_| ApiError::bad("invalid_query", "the query string is not form-encoded"))?;
        let mut q = ListQuery::default();
        for (name, value) in pairs {
            let slot = match name.as_str() {
                "status" => &mut q.status,
                "limit" => &mut q.limit,
                "after" => &mut q.after,
                _ => continue,
            };
            if slot.replace(value).is_some() {
                return Err(ApiError::bad(
                    "invalid_query",
                    format!("{name} is given more than once"),
                ));
            }
        }
        Ok(q)
    }
}

const MAX_PAGE: usize = 1000;

/// `limit`: 1 to 1000, default 100 (SPEC §8); anything else is 400.
fn page_size(raw: Option<&str>) -> Result<usize, ApiError> {
    let Some(raw) = raw else { return Ok(100) };
    raw.parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_PAGE).contains(n))
        .ok_or_else(|| {
            ApiError::bad(
                "invalid_limit",
                format!("limit must be a whole number from 1 to {MAX_PAGE}"),
            )
        })
}

pub async fn list(req: HttpRequest, state: web::Data<State>) -> Result<HttpResponse, ApiError> {
    guard(&req, &state)?;
    let query = ListQuery::parse(req.query_string())?;
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
    let limit = page_size(query.limit.as_deref())?;
    let after: Option<RequestId> = match &query.after {
        Some(a) => Some(
            a.parse()
                .map_err(|_| ApiError::bad("invalid_after", "after must be a request id"))?,
        ),
        None => None,
    };
    let records = state.store.list(status, after.as_ref(), limit).await?;
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
            state.oldest_queued.forget();
            log::info!("request {id} requeued by an operator");
            Ok(HttpResponse::build(StatusCode::ACCEPTED).json(item(&rec)))
        }
        None => {
            Err(conflict_or_missing(&state, &id, "only an unknown request can be requeued").await?)
        }
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
    )
    .await?)
}

/// 409 when the request exists (in the wrong status), else 404.
async fn conflict_or_missing(
    state: &State,
    id: &RequestId,
    why: &str,
) -> Result<ApiError, ApiError> {
    Ok(match state.store.get(id).await? {
        Some(rec) => ApiError::Conflict(format!("{why}; it is {}", rec.status.as_str())),
        None => ApiError::NotFound,
    })
}
