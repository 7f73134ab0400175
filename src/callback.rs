//! Callback delivery. Pending callbacks are stored (the `callbacks` tree,
//! keyed by due time), so they survive restarts; this loop sends the due
//! ones, removes each on a 2xx and otherwise moves it to its next due time
//! (1 s doubling, capped at 10 min) until the request's retention ends.
//! Delivery is at least once: a crash between a 2xx and its removal sends
//! it again.
//!
//! The client's connector refuses addresses in `--callback-deny` (SPEC §9);
//! such a refusal is one more failed attempt, logged by id and counted on
//! its own. Callback URLs' query strings may carry the receiver's secrets,
//! so no log line here holds one.

use std::sync::Arc;
use std::time::Duration;

use awc::http::Method;
use std::collections::HashSet;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{Notify, watch};
use url::{Position, Url};

use crate::metrics::Metrics;
use crate::model::{CallbackMethod, RequestId, now_ms};
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

pub struct Callbacks {
    pub store: Arc<Store>,
    pub client: awc::Client,
    pub metrics: Arc<Metrics>,
    /// Makes `response_url` absolute when set.
    pub public_url: Option<String>,
    pub wake: Arc<Notify>,
    /// On stop, how long deliveries in flight may still finish.
    pub shutdown_timeout: Duration,
}

/// The `response_url` the contract names.
pub fn response_url(public_url: Option<&str>, id: &RequestId) -> String {
    let path = format!("/async_api/v2/responses/{id}.json");
    match public_url {
        Some(base) => format!("{}{path}", base.trim_end_matches('/')),
        None => path,
    }
}

/// Where one attempt goes. The `url` crate reads the callback URL; the
/// fragment is dropped, since a fragment is never sent to a server (left
/// in, a GET's parameters would land after it and never arrive); the URL's
/// own query is kept byte for byte (the `url` crate would re-encode some
/// bytes, such as `'`), and a GET's parameters join it after a `&`.
struct Target {
    url: String,
    /// For logs: the host, never the query (SPEC §9).
    host: String,
    /// The raw query and fragment, cut out of any error text we log.
    secrets: Vec<String>,
}

impl Target {
    fn new(raw: &str, method: CallbackMethod, form: &str) -> Result<Target, url::ParseError> {
        let parsed = Url::parse(raw)?;
        // The first `#` ends the URL proper and the first `?` before it
        // starts the query, for the `url` crate and `http::Uri` alike: a
        // host or user name cannot hold either unencoded.
        let (before_fragment, fragment) = match raw.split_once('#') {
            Some((b, f)) => (b, Some(f)),
            None => (raw, None),
        };
        let own_query = before_fragment.split_once('?').map(|(_, q)| q);
        let mut url = parsed[..Position::AfterPath].to_string();
        match (own_query, method) {
            (Some(q), CallbackMethod::Get) if !q.is_empty() => {
                url.extend(["?", q, "&", form]);
            }
            (_, CallbackMethod::Get) => url.extend(["?", form]),
            (Some(q), CallbackMethod::Post) => url.extend(["?", q]),
            (None, CallbackMethod::Post) => {}
        }
        Ok(Target {
            url,
            host: parsed.host_str().unwrap_or_default().to_string(),
            secrets: own_query
                .into_iter()
                .chain(fragment)
                .chain(parsed.query())
                .chain(parsed.fragment())
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        })
    }

    /// `text` without the URL's query or fragment. No error type promises
    /// to leave the URL out of its message, and the query may carry the
    /// receiver's secrets.
    fn scrub(&self, text: &str) -> String {
        self.secrets
            .iter()
            .fold(text.to_string(), |t, s| t.replace(s.as_str(), "[redacted]"))
    }
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
                    self.until_next_due()
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

    fn until_next_due(&self) -> Duration {
        match self.store.next_callback_due() {
            Ok(Some(at)) => Duration::from_millis(at.saturating_sub(now_ms()).max(10)),
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
        // Entries being delivered stay in the index (at their due time)
        // until they end: read past them.
        let due: Vec<_> = self
            .store
            .due_callbacks(now_ms(), busy.len() + free)?
            .into_iter()
            .filter(|(_, id, _)| !busy.contains(id))
            .take(free)
            .collect();
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
        let rec = match self.store.get(&id)? {
            Some(rec) if !rec.is_expired(now) => rec,
            _ => {
                self.store.callback_finished(due_ms, &id, None).await?;
                return Ok(());
            }
        };
        let (Some(cb), Some(outcome)) = (&rec.callback, &rec.outcome) else {
            self.store.callback_finished(due_ms, &id, None).await?;
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
        let target = match Target::new(&cb.url, cb.method, &form) {
            Ok(t) => t,
            Err(e) => {
                // Submission checks the URL, so this is a URL the `url`
                // crate reads more strictly (a port past 65535): no attempt
                // can ever succeed, so retrying would only repeat this line.
                log::warn!("callback for {id} given up: its URL is unusable ({e})");
                self.metrics.callback_attempt(false);
                self.store.callback_gave_up(due_ms, &id).await?;
                return Ok(());
            }
        };
        let sent = match cb.method {
            CallbackMethod::Post => {
                self.client
                    .request(Method::POST, target.url.as_str())
                    .insert_header(("content-type", "application/x-www-form-urlencoded"))
                    .timeout(ATTEMPT_TIMEOUT)
                    .send_body(form)
                    .await
            }
            CallbackMethod::Get => {
                self.client
                    .request(Method::GET, target.url.as_str())
                    .timeout(ATTEMPT_TIMEOUT)
                    .send()
                    .await
            }
        };
        let mut code = None;
        let ok = match sent {
            Ok(res) if res.status().is_success() => {
                code = Some(res.status().as_u16());
                true
            }
            Ok(res) => {
                code = Some(res.status().as_u16());
                log::warn!("callback for {id} answered {}", res.status().as_u16());
                false
            }
            Err(e) if net::is_refused_address(&e) => {
                log::warn!(
                    "callback for {id} refused: no address of {} may be connected to \
                     (--callback-deny)",
                    target.host
                );
                self.metrics.callback_refused();
                false
            }
            Err(e) => {
                log::info!(
                    "callback for {id} not delivered: {}",
                    target.scrub(&e.to_string())
                );
                false
            }
        };
        self.metrics.callback_attempt(ok);
        if ok {
            self.store.callback_finished(due_ms, &id, code).await?;
            return Ok(());
        }
        let attempts = entry.attempts + 1;
        let (base, cap) = BACKOFF;
        let next = now + doubling(base, attempts, cap).as_millis() as u64;
        if rec.expires_ms.is_some_and(|e| next >= e) {
            log::warn!("callback for {id} given up after {attempts} attempts: retention ends");
            self.store.callback_gave_up(due_ms, &id).await?;
        } else {
            self.store.callback_retry(due_ms, &id, next, code).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORM: &str = "response_id=X&response_http_code=200";

    fn url(raw: &str, method: CallbackMethod) -> String {
        Target::new(raw, method, FORM).unwrap().url
    }

    #[test]
    fn get_parameters_join_the_own_query_before_any_fragment() {
        use CallbackMethod::Get;
        assert_eq!(url("http://h/cb", Get), format!("http://h/cb?{FORM}"));
        assert_eq!(
            url("http://h/cb?own=1#frag", Get),
            format!("http://h/cb?own=1&{FORM}")
        );
        assert_eq!(
            url("http://h/cb#frag?x=1", Get),
            format!("http://h/cb?{FORM}"),
            "a `?` inside the fragment is the fragment's"
        );
        assert_eq!(url("http://h/cb?", Get), format!("http://h/cb?{FORM}"));
        assert_eq!(url("http://h:8080", Get), format!("http://h:8080/?{FORM}"));
    }

    #[test]
    fn the_own_query_is_kept_byte_for_byte() {
        let raw = "https://h/cb?a='x'&b=%2F+%20&c=&d&&";
        let own = "a='x'&b=%2F+%20&c=&d&&";
        assert_eq!(
            url(raw, CallbackMethod::Get),
            format!("https://h/cb?{own}&{FORM}")
        );
        assert_eq!(
            url(raw, CallbackMethod::Post),
            format!("https://h/cb?{own}")
        );
    }

    #[test]
    fn post_urls_lose_only_their_fragment() {
        use CallbackMethod::Post;
        assert_eq!(url("http://h/cb?own=1#frag", Post), "http://h/cb?own=1");
        assert_eq!(url("http://h/cb#frag", Post), "http://h/cb");
        assert_eq!(url("http://h/cb?", Post), "http://h/cb?");
    }

    #[test]
    fn urls_the_url_crate_refuses_are_errors() {
        assert!(Target::new("http://h:99999/cb", CallbackMethod::Post, FORM).is_err());
    }

    #[test]
    fn error_text_loses_the_query_and_fragment() {
        let t = Target::new(
            "http://h.example/cb?token=s3cret#frag-s3cret",
            CallbackMethod::Get,
            FORM,
        )
        .unwrap();
        assert_eq!(t.host, "h.example");
        let text = t.scrub("could not send to http://h.example/cb?token=s3cret#frag-s3cret");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("h.example"), "{text}");
    }
}
