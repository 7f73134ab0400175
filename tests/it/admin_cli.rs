//! `asyncgate admin` as an operator meets it (issue 13): the token after
//! the subcommand or from `ASYNCGATE_ADMIN_TOKEN`, an `https://` gateway
//! (behind a TLS proxy of its own), and `delete` saying what it did.

use std::process::{Command, Output};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::helpers::*;

fn cli(args: &[&str], env_token: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_asyncgate"));
    cmd.args(args).env_remove("ASYNCGATE_ADMIN_TOKEN");
    if let Some(t) = env_token {
        cmd.env("ASYNCGATE_ADMIN_TOKEN", t);
    }
    cmd.output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[actix_web::test]
async fn the_token_goes_before_or_after_the_subcommand_or_in_the_environment() {
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &["--admin-token", "cli-secret"]).await;
    let id = app.submit("GET", "/async_api/v2/x.json", &[], b"").await;
    app.wait_for_status(&id, None, "done", SECS(10)).await;
    let url = app.url("");
    for (args, env) in [
        (
            vec![
                "admin",
                "--url",
                &url,
                "--admin-token",
                "cli-secret",
                "list",
                "--status",
                "done",
            ],
            None,
        ),
        (
            vec![
                "admin",
                "--url",
                &url,
                "list",
                "--status",
                "done",
                "--admin-token",
                "cli-secret",
            ],
            None,
        ),
        (
            vec![
                "admin",
                "list",
                "--url",
                &url,
                "--status",
                "done",
                "--admin-token=cli-secret",
            ],
            None,
        ),
        (
            vec!["admin", "--url", &url, "list", "--status", "done"],
            Some("cli-secret"),
        ),
    ] {
        let out = ok(&cli(&args, env));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["items"][0]["id"], id.as_str(), "{args:?}");
    }
    let none = cli(&["admin", "--url", &url, "list"], None);
    assert!(!none.status.success());
    let why = String::from_utf8_lossy(&none.stderr);
    assert!(why.contains("ASYNCGATE_ADMIN_TOKEN"), "{why}");

    // `delete` says what it did: a 204 has no body to print.
    let out = ok(&cli(
        &[
            "admin",
            "--url",
            &url,
            "delete",
            &id,
            "--admin-token",
            "cli-secret",
        ],
        None,
    ));
    assert!(out.contains("deleted") && out.contains(&id), "{out:?}");
    assert_eq!(app.status(&id, None).await.status, 404);
    app.stop().await;
}

#[test]
fn help_names_the_token_variable_on_every_admin_page() {
    for args in [
        vec!["admin", "--help"],
        vec!["admin", "list", "--help"],
        vec!["admin", "requeue", "--help"],
        vec!["admin", "delete", "--help"],
    ] {
        let help = ok(&cli(&args, None));
        assert!(help.contains("--admin-token"), "{args:?}: {help}");
        assert!(help.contains("ASYNCGATE_ADMIN_TOKEN"), "{args:?}: {help}");
        assert!(help.contains("--ca-file"), "{args:?}: {help}");
    }
}

/// A stand-in for a gateway behind TLS: answers the admin list for the
/// right token.
async fn tls_admin_api() -> (u16, String) {
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
        App::new().route(
            "/admin/requests",
            web::get().to(|req: HttpRequest| async move {
                let token = req
                    .headers()
                    .get("authorization")
                    .map(|v| v.as_bytes().to_vec());
                if token.as_deref() == Some(b"Bearer tls-secret".as_slice()) {
                    HttpResponse::Ok().json(serde_json::json!({"items": [], "next": null}))
                } else {
                    HttpResponse::Unauthorized().finish()
                }
            }),
        )
    })
    .workers(1)
    .disable_signals()
    .bind_rustls_0_23("127.0.0.1:0", config)
    .unwrap();
    let port = server.addrs()[0].port();
    actix_web::rt::spawn(server.run());
    (port, cert_pem)
}

#[actix_web::test]
async fn the_cli_reaches_an_https_gateway() {
    let (port, pem) = tls_admin_api().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let url = format!("https://localhost:{port}");
    // Off the test's thread: the server runs on this runtime.
    let (u, c) = (url.clone(), ca.clone());
    let out = actix_web::rt::task::spawn_blocking(move || {
        cli(
            &[
                "admin",
                "--url",
                &u,
                "--ca-file",
                c.to_str().unwrap(),
                "list",
            ],
            Some("tls-secret"),
        )
    })
    .await
    .unwrap();
    let out = ok(&out);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["items"], serde_json::json!([]));
    // Without the CA the certificate is not trusted: refused, non-zero.
    let untrusted = actix_web::rt::task::spawn_blocking(move || {
        cli(&["admin", "--url", &url, "list"], Some("tls-secret"))
    })
    .await
    .unwrap();
    assert!(!untrusted.status.success());
    let why = String::from_utf8_lossy(&untrusted.stderr);
    assert!(why.contains("cannot reach"), "{why}");
}
