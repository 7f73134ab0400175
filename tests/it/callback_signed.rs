//! SPEC §10 "Signed callbacks": with `--callback-secret-file` every
//! callback verifies the way a Standard Webhooks library verifies it.
//!
//! `verify` below is written from the published Standard Webhooks 1.0
//! specification ("Verifying webhook signatures"), not from the gateway's
//! code: strip `whsec_`, base64-decode the rest as the key, HMAC-SHA256
//! over `{webhook-id}.{webhook-timestamp}.{body}`, base64 it, and accept
//! when any of the space-separated `v1,<signature>` entries of
//! `webhook-signature` equals it, with the timestamp within 5 minutes of
//! now.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::helpers::*;

/// The Standard Webhooks specification's own example secret.
pub const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// The specification's timestamp tolerance.
const TOLERANCE_SECS: i64 = 300;

/// Checks one callback as a receiver would: `secret` is the secret file's
/// text, `payload` the form body (POST) or the raw query string (GET).
pub fn verify(secret: &str, seen: &Seen, payload: &[u8]) -> Result<(), String> {
    let key = secret
        .trim()
        .strip_prefix("whsec_")
        .ok_or("no whsec_ prefix")?;
    let key = STANDARD.decode(key).map_err(|e| format!("secret: {e}"))?;
    let msg_id = seen.header("webhook-id").ok_or("no webhook-id")?;
    let timestamp = seen
        .header("webhook-timestamp")
        .ok_or("no webhook-timestamp")?;
    let signatures = seen
        .header("webhook-signature")
        .ok_or("no webhook-signature")?;
    let ts: i64 = timestamp
        .parse()
        .map_err(|_| format!("timestamp {timestamp:?}"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    if (now - ts).abs() > TOLERANCE_SECS {
        return Err(format!("timestamp {ts} is too far from now ({now})"));
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{msg_id}.{timestamp}.").as_bytes());
    mac.update(payload);
    let expected = STANDARD.encode(mac.finalize().into_bytes());
    let ok = signatures
        .split(' ')
        .filter_map(|s| s.split_once(','))
        .any(|(version, sig)| version == "v1" && sig == expected);
    if ok {
        Ok(())
    } else {
        Err(format!("no signature in {signatures:?} matches"))
    }
}

/// The raw query string a receiver got (without `?`).
pub fn query_of(seen: &Seen) -> &str {
    seen.uri.split_once('?').map_or("", |(_, q)| q)
}

fn params(raw: &[u8]) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes(raw).unwrap()
}

#[actix_web::test]
async fn signed_post_callbacks_verify_as_standard_webhooks_on_every_attempt() {
    let up = Fake::start().await;
    let receiver = Fake::start_with(|_, i| Reply::status(if i == 0 { 502 } else { 200 })).await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("callback.secret");
    // A secret given by the operator is used as it is.
    std::fs::write(&secret_file, SPEC_SECRET).unwrap();
    let app = TestApp::start(
        &up.url(),
        &["--callback-secret-file", secret_file.to_str().unwrap()],
    )
    .await;
    let cb = format!("{}/hook?token=abc", receiver.url());
    let id = app
        .submit(
            "POST",
            "/async_api/v2/x.json",
            &[
                ("Authorization", "Bearer owner"),
                ("X-Callback-Location", &cb),
            ],
            b"{}",
        )
        .await;
    let got = receiver.wait_for(2, SECS(15)).await;
    for c in &got {
        assert_eq!(c.method, "POST");
        assert_eq!(c.header("webhook-id"), Some(format!("{id}_1").as_str()));
        verify(SPEC_SECRET, c, &c.body).unwrap_or_else(|e| panic!("{e}: {c:#?}"));
        // The URL's own query is not part of a POST's payload.
        assert!(verify(SPEC_SECRET, c, query_of(c).as_bytes()).is_err());
        let p = params(&c.body);
        assert!(p.contains(&("status".into(), "done".into())), "{p:?}");
    }
    let ts = |c: &Seen| -> u64 { c.header("webhook-timestamp").unwrap().parse().unwrap() };
    assert!(ts(&got[1]) >= ts(&got[0]), "each attempt is stamped anew");
    // The verifier refuses what it should: another body, another secret.
    assert!(verify(SPEC_SECRET, &got[1], b"response_http_code=200").is_err());
    assert!(
        verify(
            "whsec_dGVzdHNlY3JldHRlc3RzZWNyZXR0ZXN0",
            &got[1],
            &got[1].body
        )
        .is_err()
    );
    app.stop().await;
}

#[actix_web::test]
async fn signed_get_callbacks_cover_the_whole_query_with_and_without_the_urls_own() {
    let up = Fake::start().await;
    let receiver = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("made.secret");
    let app = TestApp::start(
        &up.url(),
        &["--callback-secret-file", secret_file.to_str().unwrap()],
    )
    .await;
    // Missing, so the gateway made it: 0600, `whsec_` + base64.
    let secret = std::fs::read_to_string(&secret_file).unwrap();
    assert!(secret.starts_with("whsec_"), "{secret}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&secret_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let bare = format!("{}/bare", receiver.url());
    let own = format!("{}/own?token=a%20b&x=1&empty=", receiver.url());
    for (n, cb) in [&bare, &own].into_iter().enumerate() {
        let id = app
            .submit(
                "GET",
                &format!("/async_api/v2/g{n}"),
                &[
                    ("Authorization", "Bearer owner"),
                    ("X-Callback-Location", cb),
                    ("X-Callback-Method", "GET"),
                ],
                b"",
            )
            .await;
        let got = receiver.wait_for(n + 1, SECS(10)).await;
        let c = &got[n];
        assert_eq!(c.method, "GET");
        assert!(c.body.is_empty());
        assert_eq!(c.header("webhook-id"), Some(format!("{id}_1").as_str()));
        let query = query_of(c);
        verify(&secret, c, query.as_bytes()).unwrap_or_else(|e| panic!("{e}: {c:#?}"));
        let p = params(query.as_bytes());
        assert!(p.contains(&("response_id".into(), id.clone())), "{p:?}");
        assert!(p.contains(&("status".into(), "done".into())), "{p:?}");
        if n == 1 {
            assert!(query.starts_with("token=a%20b&x=1&empty=&"), "{query}");
            // The gateway's parameters alone are not what was signed.
            let (_, ours) = query.split_once("empty=&").unwrap();
            assert!(verify(&secret, c, ours.as_bytes()).is_err());
        }
    }
    // The secret made at the first start is kept by the next.
    let app = app.restart().await;
    assert_eq!(std::fs::read_to_string(&secret_file).unwrap(), secret);
    app.stop().await;
}

#[actix_web::test]
async fn a_malformed_secret_file_stops_the_start_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("bad.secret");
    for bad in ["hunter2", "whsec_not base64!", "whsec_"] {
        std::fs::write(&secret_file, bad).unwrap();
        let data = tempfile::tempdir().unwrap();
        let args = parse_args(
            "http://127.0.0.1:9",
            data.path(),
            &["--callback-secret-file", secret_file.to_str().unwrap()],
        );
        let e = match asyncgate::app::start(&args.upstream, &args.gateway).await {
            Ok(_) => panic!("started with a secret file holding {bad:?}"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(secret_file.to_str().unwrap()), "{e}");
        assert!(e.contains("whsec_"), "says what it must hold: {e}");
    }
}
