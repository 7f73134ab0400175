//! The operator's endpoints (SPEC §8, §11): health, metrics and the OpenAPI
//! document; served on the public listener, or on `--ops-listen` alone.

use std::sync::Mutex;

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::{ApiError, State};
use crate::metrics::QueueHealth;
use crate::model::{RequestId, Status, now_ms};
use crate::store::{Store, StoreError};

/// The OpenAPI 3.1 description of every endpoint the gateway answers,
/// kept true by `tests/it/openapi.rs` and the fuzzer (`tools/fuzz-api`).
const OPENAPI: &str = include_str!("openapi.json");

pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI)
}

pub async fn healthz(state: web::Data<State>) -> HttpResponse {
    if let Some(why) = state.store.unhealthy().await {
        HttpResponse::ServiceUnavailable().json(json!({"status": "store failed", "reason": why}))
    } else if state.dispatch.is_alive() {
        HttpResponse::Ok().json(json!({"status": "ok"}))
    } else {
        HttpResponse::ServiceUnavailable().json(json!({"status": "dispatcher stopped"}))
    }
}

/// Pending callbacks are counted up to this many per scrape (a walk of
/// their index; past it the gauge shows the cap).
const CALLBACKS_COUNTED: usize = 100_000;

pub async fn metrics(state: web::Data<State>) -> Result<HttpResponse, ApiError> {
    // The scrape walks indexes (pending callbacks, the oldest queued
    // request; sled's reads block): off the HTTP worker, on a runtime of
    // its own for the store's futures.
    let scraping = state.clone();
    let text = web::block(move || {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(|e| ApiError::Store(StoreError::Io(e)))?
            .block_on(scrape(&scraping))
    })
    .await
    .map_err(|e| ApiError::Store(StoreError::Unavailable(e.to_string())))??;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(text))
}

async fn scrape(state: &State) -> Result<String, ApiError> {
    let counts = state.store.counts().await?;
    state.metrics.set_held(state.store.watching());
    let named: Vec<(&str, u64)> = counts.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    let mut text = state.metrics.render(&named);
    let now = now_ms();
    let health = QueueHealth {
        callbacks_pending: state
            .store
            .due_callbacks(u64::MAX, CALLBACKS_COUNTED)
            .await?
            .len() as u64,
        oldest_queued_age_ms: state
            .oldest_queued
            .created_ms(&state.store, now)
            .await?
            .map_or(0, |created| now.saturating_sub(created)),
        paused_by_reason: state.pauses.by_reason(),
    };
    health.render(&mut text);
    Ok(text)
}

/// Finds the oldest `enqueued` request for the metrics scrape without
/// walking every stored record each time.
///
/// Records are keyed by id, and ids begin with their creation time, so the
/// first `enqueued` record in id order is the oldest; but the records
/// before it (a day of `done` ones) would be walked on every scrape. So
/// each scrape starts where the last one found the oldest queued request,
/// or a minute before it began when nothing was queued (a submission whose
/// id was made then may still have been on its way to disk). A request
/// goes back to `enqueued` from `started` (a 429, a retried safe request):
/// the start is moved back to the oldest `started` one (one seek, they are
/// indexed), read before and after the walk; an operator's requeue of an
/// `unknown` one starts the next walk from the beginning (`forget`), as
/// does the first scrape after a start (recovery requeues).
#[derive(Default)]
pub struct OldestQueued {
    from: Mutex<Option<RequestId>>,
}

/// How far before a walk's start the next one begins when nothing was
/// queued: far longer than a submission takes from its id to the disk.
const SLACK_MS: u64 = 60_000;

impl OldestQueued {
    /// When the oldest queued request was created, if any is queued.
    pub async fn created_ms(&self, store: &Store, now: u64) -> Result<Option<u64>, StoreError> {
        let started_before = oldest(store, Status::Started).await?;
        let from = *self.from.lock().unwrap_or_else(|p| p.into_inner());
        let from = min(from, started_before);
        let found = match from {
            None => oldest(store, Status::Enqueued).await?,
            Some(id) => match store.get(&id).await? {
                Some(rec) if rec.status == Status::Enqueued => Some(id),
                _ => store
                    .list(Status::Enqueued, Some(&id), 1)
                    .await?
                    .first()
                    .map(|r| r.id),
            },
        };
        let started_after = oldest(store, Status::Started).await?;
        let mut next = Some(id_at(now.saturating_sub(SLACK_MS)));
        for id in [found, started_before, started_after] {
            next = min(next, id);
        }
        *self.from.lock().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(found.map(|id| created_ms(&id)))
    }

    /// An older id may be queued again (an operator requeued an `unknown`
    /// request): the next scrape walks from the beginning.
    pub fn forget(&self) {
        *self.from.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

async fn oldest(store: &Store, status: Status) -> Result<Option<RequestId>, StoreError> {
    Ok(store.list(status, None, 1).await?.first().map(|r| r.id))
}

fn min(a: Option<RequestId>, b: Option<RequestId>) -> Option<RequestId> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The smallest id made at `ms`: a ULID begins with its 48-bit time.
fn id_at(ms: u64) -> RequestId {
    let mut bytes = [0u8; 16];
    bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    RequestId(bytes)
}

fn created_ms(id: &RequestId) -> u64 {
    let mut ms = [0u8; 8];
    ms[2..].copy_from_slice(&id.as_bytes()[..6]);
    u64::from_be_bytes(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_begin_with_their_time() {
        let id = RequestId::generate();
        let t = created_ms(&id);
        assert!(now_ms().abs_diff(t) < 10_000);
        assert!(id_at(t) <= id && id < id_at(t + 1));
        assert_eq!(created_ms(&id_at(t)), t);
    }
}
