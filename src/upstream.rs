//! Sends one stored request upstream with awc and reads the whole answer,
//! classifying failures by what they prove: nothing sent, maybe sent, or
//! answered. awc's defaults would break the contract, so each is set:
//! no decompression and no `Accept-Encoding` of its own, no redirects, no
//! default headers, the whole exchange under one timeout, the body read
//! by hand against `--max-response-size`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::{Method, header};
use awc::error::{ConnectError, SendRequestError};
use futures_util::StreamExt;
use futures_util::future::poll_fn;
use rustls::ClientConfig;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::model::{Header, RequestRecord, ResponseHead, end_to_end, now_ms};
use crate::net::AttemptWatch;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream CA file {0}: {1}")]
    CaFile(String, String),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("--upstream {0}: {1}")]
    BadBase(String, &'static str),
}

/// TLS settings: the public web roots plus, optionally, a private CA.
pub fn tls_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, UpstreamError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let shown = path.display().to_string();
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| UpstreamError::CaFile(shown.clone(), e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| UpstreamError::CaFile(shown.clone(), e.to_string()))?;
        if certs.is_empty() {
            return Err(UpstreamError::CaFile(shown, "no certificate in it".into()));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| UpstreamError::CaFile(shown.clone(), e.to_string()))?;
        }
    }
    // The provider is named, not inferred: a second one enabled anywhere in
    // the build would make inference fail at run time.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Checks `--upstream` and drops a trailing slash.
pub fn normalize_base(base: &str) -> Result<String, UpstreamError> {
    let bad = |why| UpstreamError::BadBase(base.to_string(), why);
    let url = url::Url::parse(base).map_err(|_| bad("not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(bad("must be an absolute http:// or https:// URL"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("must not have a query string or fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("must not carry a user name or password"));
    }
    // The parser's form: what it accepted is what every request is built
    // from (`http://h/a b` becomes `http://h/a%20b`).
    Ok(url.as_str().trim_end_matches('/').to_string())
}

pub struct Upstream {
    client: awc::Client,
    base: String,
    timeout: Duration,
    max_response: u64,
}

/// The upstream's whole answer.
pub struct Answer {
    pub head: ResponseHead,
    /// Empty when the body was over the limit and dropped.
    pub body: Vec<u8>,
    pub kept: bool,
    pub sent_ms: u64,
    pub exec_ms: u64,
}

/// What one attempt proved about the request's fate upstream.
pub enum Attempt {
    /// The whole answer arrived.
    Answered(Answer),
    /// Nothing can have reached the upstream: no connection was made
    /// (refused, DNS, connect timeout, TLS handshake).
    NotSent(String),
    /// Bytes may have reached the upstream, then the exchange failed: the
    /// upstream may have acted on it.
    MaybeSent(String),
}

impl Upstream {
    pub fn new(client: awc::Client, base: String, timeout: Duration, max_response: u64) -> Self {
        Upstream {
            client,
            base,
            timeout,
            max_response,
        }
    }

    pub async fn send(
        &self,
        rec: &RequestRecord,
        credential: Option<&[u8]>,
        body: Vec<u8>,
    ) -> Attempt {
        let method = match Method::from_bytes(rec.method.as_bytes()) {
            Ok(m) => m,
            Err(_) => return Attempt::NotSent(format!("invalid method {:?}", rec.method)),
        };
        let url = format!("{}/api/{}", self.base, rec.target);
        let mut req = self.client.request(method, url).no_decompress();
        let headers = req.headers_mut();
        for (name, value) in &rec.headers {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_bytes(value),
            ) {
                headers.append(n, v);
            }
        }
        if let Some(c) = credential {
            match HeaderValue::from_bytes(c) {
                Ok(v) => {
                    headers.insert(header::AUTHORIZATION, v);
                }
                Err(_) => {
                    return Attempt::NotSent("stored credential is not a header value".into());
                }
            }
        }
        let sent_ms = now_ms();
        let started = Instant::now();
        let watch = AttemptWatch::default();
        let exchange = async {
            let mut res = req.send_body(body).await.map_err(|e| {
                // Nothing was sent when no request byte reached the kernel
                // (a refused connect, a pooled connection found closed on
                // the first write), or when the connection was never made:
                // awc ends its connect phase (TCP, TLS handshake, whose
                // alerts the watch cannot tell from requests) with a
                // `Connect` error; only `Disconnected` comes later, after
                // the whole request was written.
                let never_connected = matches!(
                    &e,
                    SendRequestError::Connect(c) if !matches!(c, ConnectError::Disconnected)
                );
                if watch.wrote_request() && !never_connected {
                    Attempt::MaybeSent(e.to_string())
                } else {
                    Attempt::NotSent(format!("nothing sent: {e}"))
                }
            })?;
            let code = res.status().as_u16();
            // An interim answer (`102`, `103`) is not the result, and awc
            // reads no further: the connector drops them on plain
            // connections; over TLS one can reach here.
            if (100..200).contains(&code) && code != 101 {
                return Err(Attempt::MaybeSent(format!(
                    "an interim {code} answer came where the answer was due (over TLS the gateway cannot read past it)"
                )));
            }
            let framed = framed_by_length_or_chunks(res.headers());
            let headers = stored_headers(res.headers());
            let mut body = Vec::new();
            let mut len = 0u64;
            // 1xx, 204 and 304 answers end at their head, whatever their
            // `Content-Length` says (RFC 9112 §6.3); awc would wait for the
            // body such a length announces. Dropping the unread answer
            // closes its connection rather than pool it.
            if code < 200 || code == 204 || code == 304 {
                return Ok((code, headers, body, true));
            }
            watch.reading_body();
            while let Some(chunk) = res.next().await {
                let chunk =
                    chunk.map_err(|e| Attempt::MaybeSent(format!("reading the body: {e}")))?;
                len += chunk.len() as u64;
                if len <= self.max_response {
                    body.extend_from_slice(&chunk);
                } else {
                    body = Vec::new(); // read on, so the exchange completes
                }
            }
            // awc ends a body quietly when the connection closes early. A
            // body framed by its length or by chunks never needs the end
            // of the connection to end, so reaching it means a cut.
            if framed && watch.saw_eof() {
                return Err(Attempt::MaybeSent(format!(
                    "the connection closed after {len} body bytes, before the answer ended"
                )));
            }
            if let Some(declared) = declared_length(&rec.method, code, &headers)
                && declared != len
            {
                return Err(Attempt::MaybeSent(format!(
                    "the connection closed after {len} of {declared} body bytes"
                )));
            }
            let kept = len <= self.max_response;
            Ok::<_, Attempt>((code, headers, body, kept))
        };
        // Every poll of the exchange (connect, write, read) runs with the
        // watch current, so the connection reports what it did.
        let mut exchange = std::pin::pin!(exchange);
        let watched = poll_fn(|cx| watch.poll(|| exchange.as_mut().poll(cx)));
        match tokio::time::timeout(self.timeout, watched).await {
            Err(_) if !watch.wrote_request() => Attempt::NotSent(format!(
                "no connection ready within {:?}; nothing was sent",
                self.timeout
            )),
            Err(_) => Attempt::MaybeSent(format!("no whole answer within {:?}", self.timeout)),
            Ok(Err(attempt)) => attempt,
            Ok(Ok((code, headers, body, kept))) => Attempt::Answered(Answer {
                head: ResponseHead {
                    code,
                    headers,
                    body: None, // the store fills it in
                },
                body,
                kept,
                sent_ms,
                exec_ms: started.elapsed().as_millis() as u64,
            }),
        }
    }
}

/// Whether the answer's body ends by its own framing (`Content-Length`, or
/// `Transfer-Encoding` ending in `chunked`) rather than by the connection
/// closing.
fn framed_by_length_or_chunks(headers: &awc::http::header::HeaderMap) -> bool {
    let chunked = headers
        .get_all(header::TRANSFER_ENCODING)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .next_back()
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
    chunked || headers.contains_key(header::CONTENT_LENGTH)
}

/// The body length a response announced, where it must match what came:
/// not for HEAD requests, 1xx, 204 or 304 (no body follows those).
fn declared_length(method: &str, code: u16, headers: &[Header]) -> Option<u64> {
    if method == "HEAD" || code < 200 || code == 204 || code == 304 {
        return None;
    }
    headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.trim().parse().ok())
}

/// Response headers as stored: end to end, in order, every value.
fn stored_headers(res_headers: &awc::http::header::HeaderMap) -> Vec<Header> {
    end_to_end(
        res_headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())),
        &[],
    )
}
