//! https upstreams: a local TLS server with a certificate made here.

use std::time::Duration;

use actix_web::{App, HttpResponse, HttpServer, web};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::helpers::*;

async fn start_tls_upstream() -> (String, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_pem = ck.cert.pem();
    let cert = CertificateDer::from(ck.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let server = HttpServer::new(|| {
        App::new().default_service(web::to(|| async { HttpResponse::Ok().body("over tls") }))
    })
    .workers(1)
    .disable_signals()
    .bind_rustls_0_23("127.0.0.1:0", config)
    .unwrap();
    let port = server.addrs()[0].port();
    actix_web::rt::spawn(server.run());
    (format!("https://localhost:{port}"), cert_pem)
}

#[actix_web::test]
async fn https_upstreams_work_with_a_private_ca() {
    let (url, pem) = start_tls_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let app = TestApp::start(&url, &["--upstream-ca-file", ca.to_str().unwrap()]).await;
    let id = app
        .submit("GET", "/async_api/v2/secure.json", &[], b"")
        .await;
    app.wait_for_status(&id, None, "done", SECS(10)).await;
    let r = app.response(&id, None).await;
    assert_eq!((r.status, r.body.as_slice()), (200, b"over tls".as_slice()));
    app.stop().await;
}

#[actix_web::test]
async fn an_untrusted_certificate_is_never_sent_to_and_the_request_waits() {
    let (url, _) = start_tls_upstream().await;
    let app = TestApp::start(&url, &[]).await;
    let id = app
        .submit("POST", "/async_api/v2/secure.json", &[], b"")
        .await;
    actix_web::rt::time::sleep(Duration::from_millis(2500)).await;
    let s = app.status(&id, None).await;
    // `started` can show for the moment of a retried handshake.
    let status = s.json()["status"].clone();
    assert!(
        status == "enqueued" || status == "started",
        "a failed handshake sent nothing, so it waits: {s:?}"
    );
    let m = String::from_utf8(app.call("GET", "/metrics", &[], b"").await.body).unwrap();
    assert!(
        !m.contains("asyncgate_upstream_unreachable_total 0\n"),
        "{m}"
    );
    app.stop().await;
}

#[actix_web::test]
async fn a_bad_ca_file_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate").unwrap();
    let args = parse_args(
        "https://localhost:1",
        dir.path(),
        &["--upstream-ca-file", ca.to_str().unwrap()],
    );
    let e = asyncgate::app::start(&args.upstream, &args.gateway)
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("ca.pem"), "{e}");
}
