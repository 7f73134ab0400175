//! `ANY /async_api/<rest>`: validate, store durably, answer 202, wake the
//! dispatcher. Nothing is stored for a bad submission.

use actix_web::http::{Method, StatusCode, Uri, header};
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt;
use serde_json::json;

use super::{ApiError, State, single_header};
use crate::crypto::{CryptoError, credential_hash};
use crate::model::{Callback, CallbackMethod, RequestId, end_to_end, format_time, now_ms};
use crate::store::{self, NewRequest};

/// Request headers that are not forwarded besides the hop-by-hop ones:
/// the upstream gets its own `Host` and `Content-Length`, the callback
/// headers are ours, `Authorization` travels sealed, and `Expect` belongs
/// to the client's connection to us.
const NOT_FORWARDED: [&str; 6] = [
    "host",
    "content-length",
    "authorization",
    "x-callback-location",
    "x-callback-method",
    "expect",
];

pub async fn submit(
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<State>,
) -> Result<HttpResponse, ApiError> {
    let rest = req
        .path()
        .strip_prefix("/async_api/")
        .ok_or(ApiError::NotFound)?;
    if req.method() == Method::CONNECT || req.method() == Method::TRACE {
        return Err(ApiError::MethodNotAllowed);
    }
    let credential = single_header(&req, "authorization").map_err(|_| {
        ApiError::bad(
            "multiple_authorization",
            "send at most one Authorization header",
        )
    })?;
    let callback = callback(&req)?;
    let body = read_body(&req, payload, state.max_body_size).await?;

    let target = match req.uri().query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    };
    let headers = end_to_end(
        req.headers()
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes())),
        &NOT_FORWARDED,
    );
    if store::record_extras(&target, &headers, callback.as_ref()) > store::MAX_RECORD_EXTRAS {
        return Err(ApiError::HeadersTooLarge(store::MAX_RECORD_EXTRAS));
    }
    // Without randomness no unguessable id can be made: refuse the
    // submission (500, logged) rather than store one that could be guessed.
    let id = RequestId::try_generate().map_err(|_| ApiError::Crypto(CryptoError::Random))?;
    let lane = credential_hash(state.store.salt(), credential);
    let sealed_credential = state.sealer.seal_credential(&id, credential)?;
    let (rec, ticket) = state
        .store
        .submit(NewRequest {
            id,
            lane,
            method: req.method().as_str().to_string(),
            target,
            headers,
            body,
            callback,
            sealed_credential,
            now_ms: now_ms(),
        })
        .await?;
    // Durable before visible: no 202 until the request is fsync'd.
    state.store.durable(ticket).await?;
    state.dispatch.queued(lane);
    state.metrics.accepted();
    let location = format!("/async_api/v2/requests/{id}.json");
    Ok(HttpResponse::build(StatusCode::ACCEPTED)
        .insert_header((header::LOCATION, location))
        .json(json!({"id": id.to_string(), "status": "enqueued", "created": format_time(rec.created_ms)})))
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
    let url = std::str::from_utf8(location)
        .ok()
        .filter(|s| is_absolute_http_url(s))
        .ok_or_else(|| {
            ApiError::bad(
                "invalid_callback_location",
                "X-Callback-Location must be an absolute http:// or https:// URL",
            )
        })?;
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
    Ok(Some(Callback {
        url: url.to_string(),
        method,
    }))
}

fn is_absolute_http_url(s: &str) -> bool {
    s.parse::<Uri>().is_ok_and(|u| {
        matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some_and(|h| !h.is_empty())
    })
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
    use super::is_absolute_http_url;

    #[test]
    fn callback_urls_must_be_absolute_http() {
        assert!(is_absolute_http_url("http://client.example/callback"));
        assert!(is_absolute_http_url("https://client.example:8443/cb?x=1"));
        for bad in [
            "/callback",
            "ftp://x/y",
            "client.example/cb",
            "http://",
            "not a url",
            "",
        ] {
            assert!(!is_absolute_http_url(bad), "{bad}");
        }
    }
}
