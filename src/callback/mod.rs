//! Callback delivery. Each callback event (SPEC §4: a request that became
//! `done` or `unknown`; a requeued one that ends `done` has a second) is
//! stored (the `callbacks` tree, keyed by due time), so it survives
//! restarts; this loop sends the due ones, removes each on a 2xx and
//! otherwise moves it to its next due time (1 s doubling, capped at 10
//! min) until the request's retention ends. Delivery is at least once: a
//! crash between a 2xx and its removal sends it again, with the same
//! `webhook-id` (`{id}_{event}`), by which receivers dedupe.
//!
//! An event announces what its entry says (`status`), whatever the request
//! became since: an `unknown` event still being retried when an operator
//! requeued the request is still an `unknown` event. With
//! `--callback-secret-file` each attempt is signed (`sign`, SPEC §10).
//!
//! The client's connector refuses addresses in `--callback-deny` (SPEC §9);
//! such a refusal is one more failed attempt, logged by id and counted on
//! its own. Callback URLs' query strings may carry the receiver's secrets,
//! so no log line here holds one.

mod sign;
mod target;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use awc::error::SendRequestError;
use awc::http::Method;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{Notify, watch};

pub use sign::{SecretError, Signer};
use target::Target;

use crate::metrics::Metrics;
use crate::model::{CallbackMethod, RequestId, RequestRecord, Status, now_ms};
use crate::net;
use crate::scheduler::pacing::doubling;
use crate::store::{CallbackEntry, Store, StoreError};

const BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(600));
/// Callbacks being delivered at once, at most.
const IN_FLIGHT: usize = 256;
/// The longest sleep between looks at the due index.
const MAX_IDLE: Duration = Duration::from_secs(60);
/// One delivery attempt, from connecting to the receiver's whole answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// On a store several nodes share, a callback being delivered is this
/// node's for this long (past it, the node is presumed gone with it).
const LEASE: Duration = Duration::from_secs(90);

pub struct Callbacks {
    pub store: Arc<Store>,
    pub client: awc::Client,
    pub metrics: Arc<Metrics>,
    /// Makes `response_url` and `status_url` absolute when set.
    pub public_url: Option<String>,
    /// Signs every attempt when `--callback-secret-file` is set.
    pub signer: Option<Signer>,
    pub wake: Arc<Notify>,
    /// On stop, how long deliveries in flight may still finish.
    pub shutdown_timeout: Duration,
}

/// The `response_url` the contract names.
pub fn response_url(public_url: Option<&str>, id: &RequestId) -> String {
    public(public_url, &format!("/async_api/v2/responses/{id}.json"))
}

/// The status path, as an `unknown` callback's `status_url` names it.
pub fn status_url(public_url: Option<&str>, id: &RequestId) -> String {
    public(public_url, &format!("/async_api/v2/requests/{id}.json"))
}

/// `path`, absolute under `--public-url` when it is set.
fn public(public_url: Option<&str>, path: &str) -> String {
    match public_url {
        Some(base) => format!("{}{path}", base.trim_end_matches('/')),
        None => path.to_string(),
    }
}

/// The parameters of a callback event (SPEC §4, §10), form-encoded:
/// `None` for a `done` event of a request that holds no answer, or an
/// event of another status (neither is ever stored).
fn parameters(
    public_url: Option<&str>,
    rec: &RequestRecord,
    entry: &CallbackEntry,
) -> Option<String> {
    let id = rec.id.to_string();
    let params: Vec<(&str, String)> = match entry.status {
        Status::Done => {
            let outcome = rec.outcome.as_ref()?;
            vec![
                ("response_id", id),
                ("response_url", response_url(public_url, &rec.id)),
                ("response_http_code", outcome.code.to_string()),
                ("status", "done".into()),
            ]
        }
        Status::Unknown => vec![
            ("response_id", id),
            ("status_url", status_url(public_url, &rec.id)),
            ("status", "unknown".into()),
        ],
        Status::Enqueued | Status::Started => return None,
    };
    serde_urlencoded::to_string(params).ok()
}

impl Callbacks {
    /// Runs until `stop` turns true, then lets deliveries in flight end
    /// (each is bounded by its attempt timeout). Each delivery runs on its
    /// own: a receiver that never answers holds one slot for one attempt,
    /// never the callbacks of anyone else.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let this = &self;
        let mut in_flight = FuturesUnordered::new();
        let mut busy: HashSet<RequestId> = HashSet::new();
        loop {
            if *stop.borrow() {
                break;
            }
            let wait = match self.start_due(&mut busy).await {
                Ok(started) => {
                    for (at, id, attempts) in started {
                        in_flight.push(async move { (id, this.deliver(at, id, attempts).await) });
                    }
                    self.until_next_due(&busy).await
                }
                Err(e) => {
                    log::error!("callbacks: {e}");
                    Duration::from_secs(1)
                }
            };
            tokio::select! {
                Some((id, result)) = in_flight.next(), if !in_flight.is_empty() => {
                    busy.remove(&id);
                    if let Err(e) = result {
                        log::error!("callback for {id}: {e}");
                    }
                }
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
        }
        let drained = async { while in_flight.next().await.is_some() {} };
        if tokio::time::timeout(self.shutdown_timeout, drained)
            .await
            .is_err()
        {
            log::warn!(
                "callbacks still in flight at the shutdown deadline are sent again on the next start"
            );
        }
        log::info!("callback delivery stopped");
    }

    /// Until the earliest callback due that is not being delivered:
    /// entries in flight stay in the index at their (past) due time, and
    /// must not make the loop wake every few milliseconds.
    async fn until_next_due(&self, busy: &HashSet<RequestId>) -> Duration {
        let next = self
            .store
            .due_callbacks(u64::MAX, busy.len() + 1)
            .await
            .map(|due| due.into_iter().find(|(_, id, _)| !busy.contains(id)));
        match next {
            Ok(Some((at, _, _))) => Duration::from_millis(at.saturating_sub(now_ms()).max(10)),
            _ => Duration::from_secs(3600),
        }
        .min(MAX_IDLE)
    }

    /// The callbacks due now that are not being delivered already, as many
    /// as there are free slots; they count as busy from here on.
    async fn start_due(
        &self,
        busy: &mut HashSet<RequestId>,
    ) -> Result<Vec<(u64, RequestId, CallbackEntry)>, StoreError> {
        let free = IN_FLIGHT.saturating_sub(busy.len());
        if free == 0 {
            return Ok(Vec::new());
        }
        let due = self
            .store
            .take_due_callbacks(now_ms(), busy, free, LEASE.as_millis() as u64)
            .await?;
        if due.is_empty() {
            return Ok(due);
        }
        // Only what is on disk is announced, and the store shows nothing
        // else: a change is applied only once its journal entry is durable.
        busy.extend(due.iter().map(|(_, id, _)| *id));
        Ok(due)
    }

    async fn deliver(
        &self,
        due_ms: u64,
        id: RequestId,
        entry: CallbackEntry,
    ) -> Result<(), StoreError> {
        let now = now_ms();
        let rec = match self.store.get(&id).await? {
            Some(rec) if !rec.is_expired(now) => rec,
            _ => {
                self.store.callback_finished(due_ms, &id, None).await?;
                return Ok(());
            }
        };
        let Some(cb) = &rec.callback else {
            self.store.callback_finished(due_ms, &id, None).await?;
            return Ok(());
        };
        let Some(form) = parameters(self.public_url.as_deref(), &rec, &entry) else {
            log::error!(
                "callback event {} for {id} announces `{}`, which the request cannot call back; dropped",
                entry.event,
                entry.status.as_str()
            );
            self.store.callback_finished(due_ms, &id, None).await?;
            return Ok(());
        };
        let target = match Target::new(&cb.url, cb.method, &form) {
            Ok(t) => t,
            Err(e) => {
                // Submission checks the URL, so this is a URL the `url`
                // crate reads more strictly (a port past 65535): no attempt
                // can ever succeed, so retrying would only repeat this line.
                log::warn!("callback for {id} given up: its URL is unusable ({e})");
                self.metrics.callback_attempt(false);
                self.store.callback_gave_up(due_ms, &id, None).await?;
                return Ok(());
            }
        };
        let webhook_id = format!("{id}_{}", entry.event);
        // A node the others may have presumed dead delivers nothing: its
        // lease is theirs (the entry stays, for whoever holds it next).
        if let Err(e) = self.store.may_send() {
            log::warn!("callback for {id} not delivered by this node: {e}");
            return Ok(());
        }
        let code = match self.send(&target, cb.method, &webhook_id, form).await {
            Ok(code) if (200..300).contains(&code) => {
                self.metrics.callback_attempt(true);
                self.store
                    .callback_finished(due_ms, &id, Some(code))
                    .await?;
                return Ok(());
            }
            Ok(code) => {
                log::warn!(
                    "callback for {id} ({webhook_id}) answered {code}; retried with backoff"
                );
                self.metrics.callback_rejected(code);
                Some(code)
            }
            Err(e) if net::is_refused_address(&e) => {
                log::warn!(
                    "callback for {id} refused: no address of {} may be connected to \
                     (--callback-deny)",
                    target.host
                );
                self.metrics.callback_refused();
                None
            }
            Err(e) => {
                log::warn!(
                    "callback for {id} ({webhook_id}) not delivered: {}",
                    target.scrub(&e.to_string())
                );
                None
            }
        };
        self.metrics.callback_attempt(false);
        let attempts = entry.attempts + 1;
        let (base, cap) = BACKOFF;
        // Counted from the failure, not from the attempt's start: a
        // receiver that took its time to refuse still gets the whole pause.
        let next = now_ms() + doubling(base, attempts, cap).as_millis() as u64;
        if rec.expires_ms.is_some_and(|e| next >= e) {
            log::warn!("callback for {id} given up after {attempts} attempts: retention ends");
            self.store.callback_gave_up(due_ms, &id, Some(code)).await?;
        } else {
            self.store.callback_retry(due_ms, &id, next, code).await?;
        }
        Ok(())
    }

    /// One attempt; the receiver's status code. Every attempt carries the
    /// event's `webhook-id`; signed, also its own `webhook-timestamp` and
    /// the signature over the form body (`POST`) or the whole query string
    /// of the URL called (`GET`).
    async fn send(
        &self,
        target: &Target,
        method: CallbackMethod,
        webhook_id: &str,
        form: String,
    ) -> Result<u16, SendRequestError> {
        let http_method = match method {
            CallbackMethod::Post => Method::POST,
            CallbackMethod::Get => Method::GET,
        };
        let mut req = self
            .client
            .request(http_method, target.url.as_str())
            .timeout(ATTEMPT_TIMEOUT)
            .insert_header(("webhook-id", webhook_id));
        if let Some(signer) = &self.signer {
            let timestamp = now_ms() / 1000;
            let payload = match method {
                CallbackMethod::Post => form.as_str(),
                CallbackMethod::Get => target.query(),
            };
            let signature = signer.sign(webhook_id, timestamp, payload.as_bytes());
            req = req
                .insert_header(("webhook-timestamp", timestamp.to_string()))
                .insert_header(("webhook-signature", signature));
        }
        let res = match method {
            CallbackMethod::Post => {
                req.insert_header(("content-type", "application/x-www-form-urlencoded"))
                    .send_body(form)
                    .await?
            }
            CallbackMethod::Get => req.send().await?,
        };
        Ok(res.status().as_u16())
    }
}
