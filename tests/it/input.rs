//! Input that must be refused (SPEC §1, §8), ids that cannot be guessed
//! (§0), and the credential key check at start (§6).

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use asyncgate::model::RequestId;

use crate::helpers::*;
use crate::process::{Proc, data_and_log, free_port};

/// Runs the binary with `args` (and `env`), which must exit by itself
/// within 30 s: a start that wrongly succeeds fails the test instead of
/// hanging it. Returns the exit status and what it wrote to stderr.
async fn run_to_exit(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
    let err_path = dir.join("stderr");
    let err = std::fs::File::create(&err_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_asyncgate"))
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + SECS(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "still running after 30 s: {}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        actix_web::rt::time::sleep(Duration::from_millis(20)).await;
    };
    (status, std::fs::read_to_string(&err_path).unwrap())
}

/// The random part of an id: its low 80 bits.
fn random_part(id: &str) -> u128 {
    let id: RequestId = id.parse().unwrap();
    u128::from_be_bytes(id.0) & ((1 << 80) - 1)
}

#[actix_web::test]
async fn ids_handed_out_together_are_not_neighbours() {
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &[]).await;
    let submissions = (0..50).map(|_| app.submit_as("POST", "/async_api/v2/x.json", "Bearer a"));
    let ids = futures_util::future::join_all(submissions).await;
    let mut random: Vec<u128> = ids.iter().map(|id| random_part(id)).collect();
    random.sort_unstable();
    for pair in random.windows(2) {
        // Fresh 80-bit values: two within 2^20 of each other would be an
        // increment (the old generator's +1), not chance.
        assert!(
            pair[1] - pair[0] > 1 << 20,
            "{:x} and {:x}",
            pair[0],
            pair[1]
        );
    }
    app.stop().await;
}

#[actix_web::test]
async fn callback_locations_the_url_parser_refuses_get_400_and_nothing_is_stored_or_sent() {
    let up = Fake::start().await;
    let receiver = Fake::start().await;
    let port = receiver.addr.port();
    let app = TestApp::start(&up.url(), &[]).await;
    let refused = [
        // http::Uri took this one, and the callback went to port 80
        "http://127.0.0.1:99999/cb".to_string(),
        "http://127.0.0.1:0/cb".to_string(),
        "http:/127.0.0.1/cb".to_string(),
        format!("http:///127.0.0.1:{port}/cb"),
        format!("http://127.0.0.1:{port}/a b"),
        format!("http://user:secret@127.0.0.1:{port}/cb"),
        "gateway.example.com/cb".to_string(),
    ];
    for location in &refused {
        let a = app
            .call(
                "POST",
                "/async_api/v2/x.json",
                &[("X-Callback-Location", location)],
                b"{}",
            )
            .await;
        assert_eq!(a.status, 400, "{location}: {a:?}");
        assert_eq!(a.header("content-type"), Some("application/json"));
        let e = a.json();
        assert_eq!(
            e["error"]["code"], "invalid_callback_location",
            "{location}"
        );
        let message = e["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("X-Callback-Location"), "{message}");
    }
    // An IPv6 literal is a URL like any other: stored, run, called back.
    let ipv6 = Fake::start_on("[::1]:0".parse().unwrap(), |_, _| Reply::ok("")).await;
    let good = format!("http://[::1]:{}/cb?k=1", ipv6.addr.port());
    let id = app
        .submit(
            "POST",
            "/async_api/v2/x.json",
            &[("X-Callback-Location", &good)],
            b"{}",
        )
        .await;
    let got = ipv6.wait_for(1, SECS(10)).await;
    assert_eq!(got[0].uri, "/cb?k=1");
    assert!(String::from_utf8_lossy(&got[0].body).contains(&id));
    actix_web::rt::time::sleep(SECS(1)).await;
    assert_eq!(up.seen().len(), 1, "only the good submission ran");
    assert_eq!(receiver.seen().len(), 0, "no refused callback was called");
    let metrics = app.call("GET", "/metrics", &[], b"").await;
    let text = String::from_utf8(metrics.body).unwrap();
    assert!(text.contains("asyncgate_accepted_total 1\n"), "{text}");
    app.stop().await;
}

#[actix_web::test]
async fn a_wrong_credential_key_file_stops_the_start_and_names_the_file() {
    // Nothing listens upstream: the request stays enqueued, its credential
    // sealed.
    let upstream = format!("http://127.0.0.1:{}", free_port());
    let (dir, data, log) = data_and_log();
    let p = Proc::start(&upstream, &data, &log, &[]).await;
    let res = awc::Client::default()
        .post(format!("{}/async_api/v2/x.json", p.base))
        .insert_header(("Authorization", "Bearer secret"))
        .send_body("{}")
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 202);
    let location = res.headers().get("location").unwrap().to_str().unwrap();
    let location = location.to_string();
    p.signal("-TERM");
    assert!(p.wait_exit(SECS(20)).await.0, "a clean stop");

    let key_file = dir.path().join("data.key");
    let right_key = std::fs::read(&key_file).expect("the key beside the data dir");
    let mut other_key = [0u8; 32];
    getrandom::getrandom(&mut other_key).unwrap();
    std::fs::write(&key_file, other_key).unwrap();
    let data_arg = data.display().to_string();
    let store = crate::backend::store_flags(&data);
    let args: Vec<&str> = [
        "serve",
        "--upstream",
        &upstream,
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data_arg,
    ]
    .into_iter()
    .chain(store.iter().map(String::as_str))
    .collect();
    let (status, stderr) = run_to_exit(dir.path(), &args, &[]).await;
    assert!(!status.success(), "{status}: {stderr}");
    assert!(
        stderr.contains(&key_file.display().to_string()) && stderr.contains("not the key"),
        "names the key file: {stderr}"
    );
    assert!(!stderr.contains("Bearer secret"), "{stderr}");

    // The right key starts again, and the refused start changed nothing.
    std::fs::write(&key_file, right_key).unwrap();
    let p = Proc::start(&upstream, &data, &log, &[]).await;
    let mut res = awc::Client::default()
        .get(format!("{}{location}", p.base))
        .insert_header(("Authorization", "Bearer secret"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    let body: serde_json::Value = res.json().await.unwrap();
    // Queued, or in one of its tries against the closed port.
    assert!(
        body["status"] == "enqueued" || body["status"] == "started",
        "{body}"
    );
    p.kill9();
}

#[actix_web::test]
async fn a_public_url_that_is_not_an_absolute_url_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data").display().to_string();
    let serve = [
        "serve",
        "--upstream",
        "http://127.0.0.1:9",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data,
    ];
    let flag: Vec<&str> = serve
        .iter()
        .copied()
        .chain(["--public-url", "gateway.example.com"])
        .collect();
    let env = [("ASYNCGATE_PUBLIC_URL", "gateway.example.com")];
    for (args, env) in [(&flag[..], &[][..]), (&serve[..], &env[..])] {
        let (status, stderr) = run_to_exit(dir.path(), args, env).await;
        assert!(!status.success(), "{status}: {stderr}");
        assert!(
            stderr.contains("--public-url") && stderr.contains("gateway.example.com"),
            "a clear message: {stderr}"
        );
        assert!(stderr.contains("absolute"), "{stderr}");
        assert!(
            !Path::new(&data).exists(),
            "stopped before opening the store"
        );
    }
}
