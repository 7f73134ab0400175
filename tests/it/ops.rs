//! SPEC §8: flags, health, metrics, logging.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::*;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_asyncgate"))
}

#[actix_web::test]
async fn healthz_and_metrics() {
    let up = Fake::start_with(|_, _| Reply::status(404)).await;
    let app = TestApp::start(&up.url(), &[]).await;
    let h = app.call("GET", "/healthz", &[], b"").await;
    assert_eq!(h.status, 200);
    let id = app.submit("GET", "/async_api/v2/x.json", &[], b"").await;
    app.wait_for_status(&id, None, "done", SECS(10)).await;
    let m = app.call("GET", "/metrics", &[], b"").await;
    assert_eq!(m.status, 200);
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    let text = String::from_utf8(m.body).unwrap();
    for line in [
        "asyncgate_accepted_total 1\n",
        "asyncgate_executed_total{code=\"404\"} 1\n",
        "asyncgate_requests{status=\"done\"} 1\n",
        "asyncgate_requests{status=\"enqueued\"} 0\n",
        "asyncgate_queue_depth 0\n",
        "asyncgate_callback_attempts_total 0\n",
        "asyncgate_rate_limit_deferrals_total 0\n",
        "asyncgate_upstream_latency_seconds_count 1\n",
    ] {
        assert!(text.contains(line), "{line:?} missing from {text}");
    }
    app.stop().await;
}

#[test]
fn help_documents_every_flag_with_its_environment_variable() {
    let out = bin().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "upstream",
        "listen",
        "data-dir",
        "store",
        "credential-key-file",
        "retention",
        "unknown-retention",
        "max-body-size",
        "max-response-size",
        "concurrency",
        "per-credential-concurrency",
        "per-credential-rps",
        "upstream-timeout",
        "connect-timeout",
        "upstream-ca-file",
        "shutdown-timeout",
        "public-url",
        "cache-capacity",
    ] {
        assert!(
            help.contains(&format!("--{flag}")),
            "--{flag} missing:\n{help}"
        );
        let var = format!("ASYNCGATE_{}", flag.to_uppercase().replace('-', "_"));
        assert!(help.contains(&var), "{var} missing:\n{help}");
    }
}

#[test]
fn help_never_shows_the_store_url_or_admin_token_from_the_environment() {
    let out = bin()
        .args(["serve", "--help"])
        .env(
            "ASYNCGATE_STORE",
            "postgres://gw:S3CRETPASSWORD@db/asyncgate",
        )
        .env("ASYNCGATE_ADMIN_TOKEN", "ADMINS3CRET")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("ASYNCGATE_STORE"), "{help}");
    assert!(!help.contains("S3CRETPASSWORD"), "{help}");
    assert!(!help.contains("ADMINS3CRET"), "{help}");
}

#[test]
fn serve_without_an_upstream_refuses_to_start() {
    let out = bin()
        .arg("serve")
        .env_remove("ASYNCGATE_UPSTREAM")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--upstream"));
}

/// Runs the real binary with debug logging, submits a request with a
/// secret credential, query and body, and reads everything it logged.
#[actix_web::test]
async fn logs_never_show_credentials_bodies_or_query_strings() {
    let up = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("log");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut child = KillOnDrop(
        bin()
            .args([
                "serve",
                "--upstream",
                &up.url(),
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap(),
    );
    let client = awc::Client::builder().disable_redirects().finish();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + SECS(20);
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "gateway did not start");
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    let mut res = client
        .post(format!("{base}/async_api/v2/x.json?secret_query=QSECRET"))
        .insert_header(("Authorization", "Bearer TOKENSECRET"))
        .insert_header((
            "X-Callback-Location",
            "http://127.0.0.1:9/cb?cbsecret=CSECRET",
        ))
        .send_body("BODYSECRET")
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 202);
    let v: serde_json::Value = res.json().await.unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    up.wait_for(1, SECS(10)).await;
    let deadline = Instant::now() + SECS(10);
    loop {
        let res = client
            .get(format!("{base}/async_api/v2/requests/{id}.json"))
            .insert_header(("Authorization", "Bearer TOKENSECRET"))
            .send()
            .await
            .unwrap();
        if res.status().as_u16() == 303 {
            break;
        }
        assert!(Instant::now() < deadline);
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    actix_web::rt::time::sleep(SECS(2)).await; // a callback attempt or two
    send_sigterm(child.0.id());
    let status = child.0.wait().unwrap();
    assert!(status.success(), "SIGTERM exits 0: {status:?}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("asyncgate listening"), "{log}");
    for secret in ["TOKENSECRET", "QSECRET", "BODYSECRET", "CSECRET"] {
        assert!(
            !log.contains(secret),
            "{secret} leaked into the log:\n{log}"
        );
    }
}

/// Kills the child if the test fails before it stops it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn send_sigterm(pid: u32) {
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}
