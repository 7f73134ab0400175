//! Callback delivery. Pending callbacks are stored (the `callbacks` tree,
//! keyed by due time), so they survive restarts; this loop sends the due
//! ones, removes each on a 2xx and otherwise moves it to its next due time
//! (1 s doubling, capped at 10 min) until the request's retention ends.
//! Delivery is at least once: a crash between a 2xx and its removal sends
//! it again.

use std::sync::Arc;
use std::time::Duration;

use awc::http::Method;
use futures_util::future::join_all;
use tokio::sync::{Notify, watch};

use crate::metrics::Metrics;
use crate::model::{CallbackMethod, RequestId, now_ms};
use crate::scheduler::pacing::doubling;
use crate::store::{Store, StoreError};

const BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(600));
/// Callbacks sent at once, per round.
const BATCH: usize = 64;
/// One delivery attempt, from connecting to the receiver's whole answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Callbacks {
    pub store: Arc<Store>,
    pub client: awc::Client,
    pub metrics: Arc<Metrics>,
    /// Makes `response_url` absolute when set.
    pub public_url: Option<String>,
    pub wake: Arc<Notify>,
}

/// The `response_url` the contract names.
pub fn response_url(public_url: Option<&str>, id: &RequestId) -> String {
    let path = format!("/async_api/v2/responses/{id}.json");
    match public_url {
        Some(base) => format!("{}{path}", base.trim_end_matches('/')),
        None => path,
    }
}

impl Callbacks {
    /// Runs until `stop` turns true; a round in progress is finished first.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                break;
            }
            let wait = match self.round().await {
                Ok(true) => continue,
                Ok(false) => self.until_next_due(),
                Err(e) => {
                    log::error!("callbacks: {e}");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
        }
        log::info!("callback delivery stopped");
    }

    fn until_next_due(&self) -> Duration {
        match self.store.next_callback_due() {
            Ok(Some(at)) => Duration::from_millis(at.saturating_sub(now_ms())),
            _ => Duration::from_secs(3600),
        }
    }

    /// Sends the callbacks due now; true if there may be more.
    async fn round(&self) -> Result<bool, StoreError> {
        let due = self.store.due_callbacks(now_ms(), BATCH)?;
        if due.is_empty() {
            return Ok(false);
        }
        // Only what is on disk is announced: everything read above is
        // covered by one flush.
        self.store.durable(self.store.ticket()).await?;
        let full = due.len() == BATCH;
        let results = join_all(
            due.into_iter()
                .map(|(at, id, attempts)| self.deliver(at, id, attempts)),
        )
        .await;
        for r in results {
            r?;
        }
        Ok(full)
    }

    async fn deliver(&self, due_ms: u64, id: RequestId, attempts: u32) -> Result<(), StoreError> {
        let now = now_ms();
        let rec = match self.store.get(&id)? {
            Some(rec) if !rec.is_expired(now) => rec,
            _ => {
                let _ = self.store.callback_finished(due_ms, &id)?;
                return Ok(());
            }
        };
        let (Some(cb), Some(outcome)) = (&rec.callback, &rec.outcome) else {
            let _ = self.store.callback_finished(due_ms, &id)?;
            return Ok(());
        };
        let params = [
            ("response_id", id.to_string()),
            (
                "response_url",
                response_url(self.public_url.as_deref(), &id),
            ),
            ("response_http_code", outcome.code.to_string()),
        ];
        let form = serde_urlencoded::to_string(params).unwrap_or_default();
        let sent = match cb.method {
            CallbackMethod::Post => {
                self.client
                    .request(Method::POST, cb.url.as_str())
                    .insert_header(("content-type", "application/x-www-form-urlencoded"))
                    .timeout(ATTEMPT_TIMEOUT)
                    .send_body(form)
                    .await
            }
            CallbackMethod::Get => {
                let sep = if cb.url.contains('?') { '&' } else { '?' };
                self.client
                    .request(Method::GET, format!("{}{sep}{form}", cb.url))
                    .timeout(ATTEMPT_TIMEOUT)
                    .send()
                    .await
            }
        };
        let ok = match sent {
            Ok(res) => res.status().is_success(),
            Err(e) => {
                log::info!("callback for {id} not delivered: {e}");
                false
            }
        };
        self.metrics.callback_attempt(ok);
        if ok {
            let _ = self.store.callback_finished(due_ms, &id)?;
            return Ok(());
        }
        let attempts = attempts + 1;
        let (base, cap) = BACKOFF;
        let next = now + doubling(base, attempts, cap).as_millis() as u64;
        if rec.expires_ms.is_some_and(|e| next >= e) {
            log::warn!("callback for {id} given up after {attempts} attempts: retention ends");
            let _ = self.store.callback_finished(due_ms, &id)?;
        } else {
            self.store.callback_retry(due_ms, &id, next, attempts)?;
        }
        Ok(())
    }
}
