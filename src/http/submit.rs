//! `ANY /async_api/<rest>`: validate, store durably, answer 202, wake the
//! dispatcher. Nothing is stored for a bad submission.

use std::sync::Arc;

use actix_web::http::{Method, StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt;

use super::prefer::{self, Prefer, applied_wait};
use super::query;
use super::view::{Accepted, StatusView};
use super::{ApiError, State, single_header, wait};
use crate::crypto::{CryptoError, credential_hash};
use crate::model::{
    Callback, CallbackMethod, RequestId, RequestRecord, Status, end_to_end, now_ms,
};
use crate::store::{NewRequest, Submitted};

/// Request headers that are not forwarded besides the hop-by-hop ones:
/// the upstream gets its own `Host` and `Content-Length`, the callback
/// and `Prefer` headers are ours, `Authorization` travels sealed, and
/// `Expect` belongs to the client's connection to us. (`Idempotency-Key`
/// is forwarded: an upstream that honours it dedupes too.)
const NOT_FORWARDED: [&str; 7] = [
    "host",
    "prefer",
    "content-length",
    "authorization",
    "x-callback-location",
    "x-callback-method",
    "expect",
];

/// The most bytes of path, query and headers a submission may have (SPEC
/// §1: at least 8 KiB, so a long JWT fits). Everything stored for a
/// request in sled must stay under `store::MAX_VALUE`; this leaves room
/// for the record's own fields.
pub const HEAD_CAP: usize = 10 * 1024;

/// A submission's head as it counts against `HEAD_CAP`: path, query, and
/// every header with 16 bytes each for its encoding (bincode's lengths).
fn head_size(req: &HttpRequest) -> usize {
    req.path().len()
        + req.uri().query().map_or(0, str::len)
        + req
            .headers()
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 16)
            .sum::<usize>()
}

pub async fn submit(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    let rest = req.path().strip_prefix("/async_api/").ok_or_else(|| {
        ApiError::NoRoute(
            "submissions go to /async_api/<rest>, run later as <upstream>/api/<rest>".into(),
        )
    })?;
    if req.method() == Method::CONNECT || req.method() == Method::TRACE {
        return Err(ApiError::MethodNotAllowed(super::SUBMIT_METHODS));
    }
    let credential = single_header(&req, "authorization").map_err(|_| {
        ApiError::bad(
            "multiple_authorization",
            "send at most one Authorization header",
        )
    })?;
    if head_size(&req) > HEAD_CAP {
        return Err(ApiError::HeadersTooLarge(HEAD_CAP));
    }
    let callback = callback(&req)?;
    let lane = credential_hash(state.store.salt(), credential);
    let prefer = Prefer::of(&req, state.max_wait);
    let method = req.method().as_str().to_string();
    let target = match req.uri().query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    };
    // With an Idempotency-Key the body is read first: a repeat stores
    // nothing, so it gets the first answer even where a 429 or 507 would
    // refuse a new request (SPEC §10). The writer decides the common case.
    let mut payload = Some(payload);
    let mut body = None;
    let mut idempotency = None;
    if req.headers().contains_key("idempotency-key")
        && let Some(payload) = payload.take()
    {
        let read = read_body(&req, payload, state.max_body_size).await?;
        idempotency = prefer::idempotency(&req, &method, &target, &read)?;
        body = Some(read);
    }
    if let Err(refused) = admit(&state, &lane, idempotency.is_some()).await {
        let first = match idempotency {
            Some(i) => state.store.idempotent(&lane, &i).await?,
            None => None,
        };
        return match first {
            // Past its retention, the key names nothing (SPEC §10).
            Some(Ok(first)) if first.is_expired(now_ms()) => Err(refused),
            Some(Ok(first)) => answer(&state, first, &prefer).await,
            Some(Err(e)) => Err(e.into()),
            None => Err(refused),
        };
    }
    let body = match (body, payload) {
        (Some(b), _) => b,
        (None, Some(p)) => read_body(&req, p, state.max_body_size).await?,
        (None, None) => Vec::new(),
    };
    let headers = end_to_end(
        req.headers()
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes())),
        &NOT_FORWARDED,
    );
    // Without randomness no unguessable id can be made: refuse the
    // submission (500, logged) rather than store one that could be guessed.
    let id = RequestId::try_generate().map_err(|_| ApiError::Crypto(CryptoError::Random))?;
    let sealed_credential = state.sealer.seal_credential(&id, credential)?;
    // Durable before visible: the store answers once the request is
    // fsync'd, and no 202 goes out before.
    let submitted = state
        .store
        .submit(NewRequest {
            id,
            lane,
            method,
            target,
            headers,
            body,
            callback,
            sealed_credential,
            now_ms: now_ms(),
            max_pending: state.max_pending_per_credential,
            idempotency,
        })
        .await?;
    let rec = match submitted {
        Submitted::New(rec) => {
            state.dispatch.queued(lane);
            state.metrics.accepted();
            rec
        }
        // The same key arrived together with this one, and won (its
        // lane is looked at again: a claim may have skipped it meanwhile).
        Submitted::Again(first) => {
            state.dispatch.queued(first.lane);
            first
        }
    };
    answer(&state, rec, &prefer).await
}

/// The disk's reserve (507) and the credential's queue cap (429), checked
/// before the body is read (the cap again, exactly, where the request is
/// stored).
async fn admit(state: &State, lane: &crate::model::LaneKey, keyed: bool) -> Result<(), ApiError> {
    if state.store.free_space()? < state.min_free_disk || (keyed && state.store.keys_crowded()) {
        return Err(ApiError::InsufficientStorage);
    }
    if let Some(cap) = state.max_pending_per_credential
        && state.store.pending_at_least(lane, cap).await?
    {
        return Err(ApiError::TooManyPending(cap));
    }
    Ok(())
}

/// The answer to a submission (or its repeat under the same
/// Idempotency-Key): 202 with its `Location`; with `Prefer: wait=N`, the
/// stored response itself if it is `done` within N seconds.
async fn answer(
    state: &State,
    rec: RequestRecord,
    prefer: &Prefer,
) -> Result<HttpResponse, ApiError> {
    let location = format!("/async_api/v2/requests/{}.json", rec.id);
    let Some(wait) = prefer.wait else {
        return Ok(HttpResponse::build(StatusCode::ACCEPTED)
            .insert_header((header::LOCATION, location))
            .json(Accepted::new(&rec)));
    };
    let now = match wait::settled_within(state, rec.id, &rec.lane, wait).await {
        Some(settled) => Some(Arc::unwrap_or_clone(settled)),
        None => wait::visible(state, &rec.id, &rec.lane).await?,
    };
    if let Some(done) = now.as_ref().filter(|r| r.status == Status::Done) {
        // Too large to keep: the 502 still says where the request is.
        let mut res = query::stored_response(done, state)
            .await
            .unwrap_or_else(|e| actix_web::ResponseError::error_response(&e));
        let content = format!("/async_api/v2/responses/{}.json", rec.id);
        let h = res.headers_mut();
        h.insert(header::CONTENT_LOCATION, header_value(&content)?);
        h.insert(
            header::HeaderName::from_static("preference-applied"),
            header_value(&applied_wait(wait))?,
        );
        return Ok(res);
    }
    let mut res = HttpResponse::build(StatusCode::ACCEPTED);
    res.insert_header((header::LOCATION, location))
        .insert_header((
            "preference-applied",
            format!("respond-async, {}", applied_wait(wait)),
        ));
    Ok(match &now {
        Some(r) => res.json(StatusView::new(r, state).await?),
        None => res.json(Accepted::new(&rec)),
    })
}

fn header_value(v: &str) -> Result<header::HeaderValue, ApiError> {
    header::HeaderValue::from_str(v).map_err(|_| ApiError::NotFound)
}

fn callback(req: &HttpRequest) -> Result<Option<Callback>, ApiError> {
    let location = single_header(req, "x-callback-location").map_err(|_| {
        ApiError::bad(
            "multiple_callback_location",
            "send at most one X-Callback-Location header",
        )
    })?;
    let Some(location) = location else {
        return Ok(None); // X-Callback-Method alone is ignored
    };
    let url =
        callback_url(location).map_err(|why| ApiError::bad("invalid_callback_location", why))?;
    let bad_method = || {
        ApiError::bad(
            "invalid_callback_method",
            "X-Callback-Method must be GET or POST",
        )
    };
    let method = match single_header(req, "x-callback-method").map_err(|_| bad_method())? {
        None => CallbackMethod::Post,
        Some(m) if m.eq_ignore_ascii_case(b"post") => CallbackMethod::Post,
        Some(m) if m.eq_ignore_ascii_case(b"get") => CallbackMethod::Get,
        Some(_) => return Err(bad_method()),
    };
    Ok(Some(Callback { url, method }))
}

const NOT_ABSOLUTE_HTTP: &str = "X-Callback-Location must be an absolute http:// or https:// URL \
     with a host and a port from 1 to 65535, written in printable ASCII without spaces";

/// Checks an `X-Callback-Location` value with the same parser (`url`, the
/// WHATWG rules) that the callback sender uses, and returns the URL to
/// store: the parser's normalized form, fragment dropped. Storing that form
/// means what was checked here is byte for byte what will be called (and
/// what the callback guard resolves): no second reading of the client's
/// text can differ, and re-parsing a serialized URL gives it back
/// unchanged.
///
/// Stricter than the parser where it would otherwise guess: the value must
/// be printable ASCII without spaces or backslashes (WHATWG drops tabs and
/// newlines, percent-encodes spaces and reads `\` as `/`), and must start
/// `http://` or `https://` followed by a host (the parser turns `http:/x`
/// and `http:///x` into host `x`). Port 0 can never be connected to.
///
/// Userinfo (`user:password@`) is refused: awc, the callback client, does
/// not turn it into credentials, so a receiver that wants them would answer
/// 401 until the retention ends, while the password sat in the store and
/// risked the logs. A secret belongs in the query string, kept out of logs.
fn callback_url(raw: &[u8]) -> Result<String, &'static str> {
    if !raw.iter().all(|b| b.is_ascii_graphic() && *b != b'\\') {
        return Err(NOT_ABSOLUTE_HTTP);
    }
    let text = std::str::from_utf8(raw).map_err(|_| NOT_ABSOLUTE_HTTP)?;
    let lower = text.to_ascii_lowercase();
    let authority = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"))
        .ok_or(NOT_ABSOLUTE_HTTP)?;
    if authority.starts_with('/') {
        return Err(NOT_ABSOLUTE_HTTP);
    }
    let mut url = url::Url::parse(text).map_err(|_| NOT_ABSOLUTE_HTTP)?;
    let has_host = url.host_str().is_some_and(|h| !h.is_empty());
    if !matches!(url.scheme(), "http" | "https") || !has_host || url.port() == Some(0) {
        return Err(NOT_ABSOLUTE_HTTP);
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "X-Callback-Location must not carry user:password@; put a token in its query string",
        );
    }
    // Never sent on the wire (RFC 9110 §4.2.5), so not kept.
    url.set_fragment(None);
    // Scheme, host, port and path as the parser reads them (what the
    // callback guard resolves); the query byte for byte as sent, since a
    // receiver may check it (the parser would re-encode `'`, for one).
    let raw_query = text
        .split('#')
        .next()
        .and_then(|t| t.split_once('?'))
        .map(|(_, q)| q);
    let mut stored = url[..url::Position::AfterPath].to_string();
    if let Some(q) = raw_query {
        stored.push('?');
        stored.push_str(q);
    }
    // What the callback client will put on a request line: a query with
    // `"`, `<` or `>` parses as a URL but no request can carry it, so it
    // could never be delivered.
    if awc::http::Uri::try_from(stored.as_str()).is_err() {
        return Err(
            "X-Callback-Location has characters a request line cannot carry (percent-encode them)",
        );
    }
    Ok(stored)
}

/// Reads the whole body, refusing it as soon as it passes `max`.
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    max: u64,
) -> Result<Vec<u8>, ApiError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(ApiError::BodyTooLarge(max));
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0) as usize);
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::BodyUnreadable(e.to_string()))?;
        if (body.len() + chunk.len()) as u64 > max {
            return Err(ApiError::BodyTooLarge(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::callback_url;

    fn ok(raw: &str) -> String {
        callback_url(raw.as_bytes()).unwrap_or_else(|e| panic!("{raw}: {e}"))
    }

    #[test]
    fn callback_urls_are_stored_as_the_parser_reads_them() {
        for same in [
            "http://client.example/callback",
            "https://client.example:8443/cb?x=1",
            "http://127.0.0.1:9/cb",
            "http://[::1]:8080/cb",
            "http://client.example/cb?a=1&b=%2F&c",
            "http://client.example/cb?tok=a%2Fb+c'd&e=",
        ] {
            assert_eq!(ok(same), same);
        }
        // Normalized: what is stored is what will be called (and what the
        // callback guard resolves); the fragment is never sent anyway.
        assert_eq!(
            ok("HTTP://Client.Example:80/cb"),
            "http://client.example/cb"
        );
        assert_eq!(ok("http://client.example"), "http://client.example/");
        assert_eq!(ok("http://x.example/a/../cb#frag"), "http://x.example/cb");
        assert_eq!(ok("http://0x7f.1:8080/cb"), "http://127.0.0.1:8080/cb");
        assert_eq!(ok("https://[0:0::1]/cb"), "https://[::1]/cb");
    }

    #[test]
    fn callback_urls_must_be_absolute_http_with_a_host_and_a_real_port() {
        for bad in [
            // the port http::Uri took and the callback sent to port 80
            "http://127.0.0.1:99999/cb",
            "http://client.example:0/cb",
            "http://client.example:8o/cb",
            "http://client.example:-1/cb",
            // a query no request line can carry
            "http://client.example/cb?q=\"a\"",
            "http://client.example/cb?q=<a>",
            // no host, or one the WHATWG parser would invent from the path
            "http://",
            "https://",
            "http:///cb",
            "http://:80/cb",
            "http://?x=1",
            "http:/x",
            "http:x",
            "//client.example/cb",
            "/callback",
            "client.example/cb",
            // not http
            "ftp://x/y",
            "javascript:alert(1)",
            "file:///etc/passwd",
            // what the parser would silently rewrite or refuse
            "http://exa mple.com/cb",
            "http://client.example/a b",
            "http://client.example/\tcb",
            "http:\\\\client.example\\cb",
            "http://client.example\\cb",
            "http://exämple.com/cb",
            "http://[::1/cb",
            "http://[fe80::1%25eth0]/cb",
            "not a url",
            "",
            // credentials in the URL: see `callback_url`
            "http://user:secret@client.example/cb",
            "http://user@client.example/cb",
        ] {
            assert!(callback_url(bad.as_bytes()).is_err(), "{bad} was accepted");
        }
        assert!(callback_url(b"http://client.example/\xff").is_err());
    }
}
