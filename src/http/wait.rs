//! Waiting instead of polling (SPEC §10): a held status answer, bulk status
//! with an optional wait. A held answer registers with the store for its
//! request only (`Store::watch`) and sleeps; the store round that finishes
//! the request wakes it. A gateway shutting down answers at once.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt;
use futures_util::future::{Either, select, select_all};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::prefer::{Prefer, applied_wait};
use super::view::StatusView;
use super::{ApiError, State, single_header};
use crate::crypto::{credential_hash, same_owner};
use crate::model::{LaneKey, RequestId, RequestRecord, Status, now_ms};
use crate::store::Woken;

/// Whether a request's wait is over: it will not change by itself.
pub fn settled(status: Status) -> bool {
    matches!(status, Status::Done | Status::Unknown)
}

/// The record of `id` if `caller` owns it and it has not expired.
pub async fn visible(
    state: &State,
    id: &RequestId,
    caller: &LaneKey,
) -> Result<Option<RequestRecord>, ApiError> {
    Ok(state.store.get(id).await?.filter(|r| seen_by(r, caller)))
}

/// Holds until every one of `ids` visible to `caller` is settled (or gone),
/// `wait` passes, or the gateway stops. Only visible, unsettled requests
/// are watched; a wake-up that brings the record settled and visible ends
/// that request's wait, any other re-reads only the request it was for.
/// Read the records again after it: one may have changed meanwhile.
pub async fn until_settled(state: &State, ids: &[RequestId], caller: &LaneKey, wait: Duration) {
    hold(state, ids, caller, wait, false).await;
}

/// [`until_settled`] for one request, with the record its wake-up brought
/// if that ended the wait (settled, visible to `caller`, read as the store
/// round that settled it left it): answered at once, it needs no second
/// read. `None`: read it again.
pub async fn settled_within(
    state: &State,
    id: RequestId,
    caller: &LaneKey,
    wait: Duration,
) -> Option<Arc<RequestRecord>> {
    hold(state, &[id], caller, wait, true).await.remove(&id)
}

async fn hold(
    state: &State,
    ids: &[RequestId],
    caller: &LaneKey,
    wait: Duration,
    keep: bool,
) -> HashMap<RequestId, Arc<RequestRecord>> {
    let deadline = Instant::now() + wait;
    let mut stopping = state.shutdown.clone();
    let unique: HashSet<RequestId> = ids.iter().copied().collect();
    let mut watched = Vec::new();
    let mut waiting = Vec::new();
    let mut kept = HashMap::new();
    for id in unique {
        if let Some(woken) = arm(state, id, caller).await {
            watched.push(id);
            waiting.push(woken);
        }
    }
    while !waiting.is_empty() && !*stopping.borrow() {
        let timeout = Box::pin(tokio::time::sleep_until(deadline));
        let stop = Box::pin(stopping.wait_for(|s| *s));
        match select(select_all(waiting), select(timeout, stop)).await {
            Either::Left((((id, woken), _, rest), _)) => {
                waiting = rest;
                match woken {
                    Some(Some(rec)) if settled(rec.status) && seen_by(&rec, caller) => {
                        if keep {
                            kept.insert(id, rec);
                        }
                    }
                    _ => {
                        if let Some(again) = arm(state, id, caller).await {
                            waiting.push(again);
                        }
                    }
                }
            }
            Either::Right(_) => break,
        }
    }
    for id in &watched {
        state.store.unwatch(id);
    }
    kept
}

/// Whether `caller` may see `rec` now: its owner's, not expired.
fn seen_by(rec: &RequestRecord, caller: &LaneKey) -> bool {
    same_owner(&rec.lane, caller) && !rec.is_expired(now_ms())
}

type Waiting = std::pin::Pin<Box<dyn std::future::Future<Output = (RequestId, Woken)>>>;

/// Watches `id` if it is visible and not settled: look, watch, look again,
/// so that a change in between is not missed. Resolves to `id` and what
/// its wake-up brought on a change.
async fn arm(state: &State, id: RequestId, caller: &LaneKey) -> Option<Waiting> {
    let unsettled =
        async || matches!(visible(state, &id, caller).await, Ok(Some(r)) if !settled(r.status));
    if !unsettled().await {
        return None;
    }
    let rx = state.store.watch(&id);
    if !unsettled().await {
        drop(rx);
        state.store.unwatch(&id);
        return None;
    }
    Some(Box::pin(async move { (id, rx.await.unwrap_or(None)) }))
}

/// A bulk body. Ids are strings: anything else is a bad body (SPEC §10);
/// a string that is no id is merely not found. Borrowed from the body
/// where it has no escapes.
#[derive(Deserialize)]
struct Bulk<'a> {
    #[serde(borrow)]
    ids: Vec<Cow<'a, str>>,
}

/// A bulk answer, serialized as it is built (no JSON tree in between).
#[derive(Serialize)]
struct BulkAnswer<'a> {
    items: Vec<StatusView>,
    not_found: Vec<&'a str>,
}

/// The largest bulk body: 1,000 ids and room for whitespace.
const BULK_BODY_MAX: usize = 1 << 20;

/// `POST /async_api/v2/requests.json`: up to 1,000 status views at once.
pub async fn bulk(
    req: HttpRequest,
    mut payload: web::Payload,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    // Read by hand: the `Bytes` extractor's limit answers in plain text.
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BodyUnreadable(e.to_string()))?;
        if body.len() + chunk.len() > BULK_BODY_MAX {
            return Err(ApiError::BodyTooLarge(BULK_BODY_MAX as u64));
        }
        body.extend_from_slice(&chunk);
    }
    let bad = || {
        ApiError::bad(
            "invalid_bulk_request",
            "send {\"ids\": [...]} with 1 to 1000 request ids",
        )
    };
    let asked: Bulk = serde_json::from_slice(&body).map_err(|_| bad())?;
    if asked.ids.is_empty() || asked.ids.len() > 1000 {
        return Err(bad());
    }
    // A repeated credential sees nothing (SPEC §2): every id not found.
    let caller = single_header(&req, "authorization")
        .ok()
        .map(|credential| credential_hash(state.store.salt(), credential));
    let parsed: Vec<(&str, Option<RequestId>)> = asked
        .ids
        .iter()
        .map(|raw| (raw.as_ref(), raw.parse().ok()))
        .collect();
    let prefer = Prefer::of(&req, state.max_wait);
    // Another credential's id may not be held for: it is "not found".
    if let (Some(wait), Some(caller)) = (prefer.wait, &caller) {
        let ids: Vec<RequestId> = parsed.iter().filter_map(|(_, id)| *id).collect();
        until_settled(&state, &ids, caller, wait).await;
    }
    let mut answer = BulkAnswer {
        items: Vec::with_capacity(parsed.len()),
        not_found: Vec::new(),
    };
    for (raw, id) in parsed {
        let rec = match (id, &caller) {
            (Some(id), Some(caller)) => visible(&state, &id, caller).await?,
            _ => None,
        };
        match rec {
            Some(rec) => answer.items.push(StatusView::new(&rec, &state).await?),
            None => answer.not_found.push(raw),
        }
    }
    let mut res = HttpResponse::Ok();
    if let Some(wait) = prefer.wait {
        res.insert_header(("preference-applied", applied_wait(wait)));
    }
    Ok(res
        .insert_header(header::CacheControl(vec![header::CacheDirective::NoStore]))
        .json(answer))
}
