//! The request headers of SPEC §10 a script sends: `Prefer` (RFC 7240:
//! `wait=N`, `respond-async`) and `Idempotency-Key` (the IETF httpapi
//! draft's).

use std::time::Duration;

use actix_web::HttpRequest;
use sha2::{Digest, Sha256};

use super::ApiError;
use crate::model::Idempotency;

/// What the client prefers; a malformed preference is ignored, never an
/// error.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Prefer {
    /// `wait=N`, capped at `--max-wait`.
    pub wait: Option<Duration>,
    pub respond_async: bool,
}

impl Prefer {
    pub fn of(req: &HttpRequest, max_wait: Duration) -> Prefer {
        let values = req
            .headers()
            .get_all("prefer")
            .filter_map(|v| v.to_str().ok());
        Prefer::parse(values, max_wait)
    }

    fn parse<'a>(values: impl Iterator<Item = &'a str>, max_wait: Duration) -> Prefer {
        let mut out = Prefer::default();
        for pref in values.flat_map(|v| v.split(',')) {
            // A preference's own parameters (after `;`) are not ours.
            let token = pref.split(';').next().unwrap_or("").trim();
            let (name, value) = match token.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                None => (token, None),
            };
            if name.eq_ignore_ascii_case("respond-async") && value.is_none() {
                out.respond_async = true;
            } else if name.eq_ignore_ascii_case("wait") && out.wait.is_none() {
                let secs = value
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    // All digits: only an overflow fails, and that is "long".
                    .map(|v| v.parse::<u64>().unwrap_or(u64::MAX));
                if let Some(secs) = secs {
                    out.wait = Some(Duration::from_secs(secs).min(max_wait));
                }
            }
        }
        out
    }
}

/// `Preference-Applied`'s `wait=N`, N after the cap.
pub fn applied_wait(wait: Duration) -> String {
    format!("wait={}", wait.as_secs())
}

/// The `Idempotency-Key` of a submission, hashed, with the fingerprint of
/// what it asks for (method, target, body); `None` without one. Two such
/// headers, or a value that is not 1–255 visible ASCII characters
/// (optionally a quoted string), are a 400.
pub fn idempotency(
    req: &HttpRequest,
    method: &str,
    target: &str,
    body: &[u8],
) -> Result<Option<Idempotency>, ApiError> {
    let key = match super::single_header(req, "idempotency-key") {
        Err(()) => {
            return Err(ApiError::bad(
                "invalid_idempotency_key",
                "send at most one Idempotency-Key header",
            ));
        }
        Ok(None) => return Ok(None),
        Ok(Some(raw)) => key_of(raw).ok_or_else(|| {
            ApiError::bad(
                "invalid_idempotency_key",
                "Idempotency-Key must be 1 to 255 visible ASCII characters, optionally quoted",
            )
        })?,
    };
    let mut fingerprint = Sha256::new();
    for part in [method.as_bytes(), target.as_bytes(), body] {
        fingerprint.update((part.len() as u64).to_be_bytes());
        fingerprint.update(part);
    }
    Ok(Some(Idempotency {
        key: Sha256::digest(key).into(),
        fingerprint: fingerprint.finalize().into(),
    }))
}

/// The key itself: `abc` and `"abc"` are one key.
fn key_of(raw: &[u8]) -> Option<&[u8]> {
    let key = match raw {
        [b'"', inner @ .., b'"'] => inner,
        other => other,
    };
    let visible = key.iter().all(|b| (0x21..=0x7e).contains(b));
    (visible && (1..=255).contains(&key.len()) && !key.contains(&b'"')).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Duration = Duration::from_secs(60);

    fn parse(values: &[&str]) -> Prefer {
        Prefer::parse(values.iter().copied(), CAP)
    }

    #[test]
    fn wait_and_respond_async_in_any_form_rfc_7240_allows() {
        assert_eq!(parse(&["wait=5"]).wait, Some(Duration::from_secs(5)));
        let p = parse(&["respond-async, wait=10"]);
        assert_eq!(
            (p.respond_async, p.wait),
            (true, Some(Duration::from_secs(10)))
        );
        let p = parse(&["Respond-Async", "WAIT = \"7\"; x=y"]);
        assert_eq!(
            (p.respond_async, p.wait),
            (true, Some(Duration::from_secs(7)))
        );
        assert_eq!(parse(&["wait=3600"]).wait, Some(CAP), "capped");
        assert_eq!(parse(&["wait=99999999999999999999999"]).wait, Some(CAP));
    }

    #[test]
    fn malformed_preferences_are_ignored() {
        for bad in [
            "wait",
            "wait=",
            "wait=-1",
            "wait=1.5",
            "wait=abc",
            "handling=lenient",
        ] {
            assert_eq!(parse(&[bad]), Prefer::default(), "{bad}");
        }
        assert_eq!(
            parse(&["wait=x, wait=4"]).wait,
            Some(Duration::from_secs(4))
        );
    }

    #[test]
    fn idempotency_keys_are_visible_ascii_optionally_quoted() {
        assert_eq!(key_of(b"abc"), Some(&b"abc"[..]));
        assert_eq!(key_of(b"\"abc\""), Some(&b"abc"[..]));
        assert_eq!(key_of(&[b'k'; 255]).map(<[u8]>::len), Some(255));
        for bad in [
            &b""[..],
            b"\"\"",
            b"a b",
            b"caf\xc3\xa9",
            &[b'k'; 256],
            b"\"a",
            b"a\"b",
        ] {
            assert_eq!(key_of(bad), None, "{bad:?}");
        }
    }
}
