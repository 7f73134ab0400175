//! SPEC §11: `--log-format json` writes one JSON object per line, `ts`
//! (RFC 3339, UTC, milliseconds), `level`, `target`, `msg`, and `id` where
//! the line is about one request. Every line of a real run must parse.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;
use crate::process::{Proc, data_and_log};

#[actix_web::test]
async fn json_logs_are_one_object_per_line_with_the_request_id() {
    // An upstream that reads each request, starts an answer and hangs up:
    // a failure after sending, logged as a warning about the request.
    let (upstream, _) = half_answer_server(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab");
    let (_dir, data, log) = data_and_log();
    let gw = Proc::start(
        &format!("http://{upstream}"),
        &data,
        &log,
        &["--log-format", "json", "--admin-token", "logs-admin"],
    )
    .await;
    let client = awc::Client::default();
    let mut ids = Vec::new();
    for method in ["POST", "GET"] {
        let mut res = client
            .request(
                method.parse().unwrap(),
                format!("{}/async_api/v2/fail.json", gw.base),
            )
            .insert_header(("Authorization", "Bearer logs"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 202);
        let v: Value = res.json().await.unwrap();
        ids.push(v["id"].as_str().unwrap().to_string());
    }
    // An operator's action is logged by id too.
    let deadline = std::time::Instant::now() + SECS(15);
    loop {
        let res = client
            .delete(format!("{}/admin/requests/{}", gw.base, ids[0]))
            .insert_header(("Authorization", "Bearer logs-admin"))
            .send()
            .await
            .unwrap();
        if res.status().as_u16() == 204 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never unknown");
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    actix_web::rt::time::sleep(SECS(1)).await;
    gw.signal("-TERM");
    let (ok, _) = gw.wait_exit(SECS(20)).await;
    assert!(ok, "a graceful stop exits 0");

    let text = std::fs::read_to_string(&log).unwrap();
    let ts = regex::Regex::new(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$").unwrap();
    let mut lines = Vec::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line:?}\n{text}"));
        let obj = v
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {line}"));
        assert!(ts.is_match(obj["ts"].as_str().unwrap()), "{line}");
        assert!(
            ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"].contains(&obj["level"].as_str().unwrap()),
            "{line}"
        );
        assert!(
            obj["target"].is_string() && obj["msg"].is_string(),
            "{line}"
        );
        for key in obj.keys() {
            assert!(
                ["ts", "level", "target", "msg", "id"].contains(&key.as_str()),
                "{line}"
            );
        }
        if let Some(id) = obj.get("id") {
            assert!(
                obj["msg"].as_str().unwrap().contains(id.as_str().unwrap()),
                "{line}"
            );
        }
        lines.push(v);
    }
    assert!(
        lines
            .iter()
            .any(|v| v["msg"].as_str().unwrap().contains("asyncgate listening")),
        "{text}"
    );
    for id in &ids {
        assert!(
            lines
                .iter()
                .any(|v| v["level"] == "WARN" && v["id"] == id.as_str()),
            "no warning about {id}:\n{text}"
        );
    }
    assert!(
        lines.iter().any(|v| v["level"] == "INFO"
            && v["id"] == ids[0].as_str()
            && v["msg"]
                .as_str()
                .unwrap()
                .contains("deleted by an operator")),
        "{text}"
    );
}

#[test]
fn the_default_log_format_is_text() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_asyncgate"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("--log-format"), "{help}");
    assert!(help.contains("ASYNCGATE_LOG_FORMAT"), "{help}");
    assert!(help.contains("[default: text]"), "{help}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_asyncgate"))
        .args(["serve", "--upstream", "http://x", "--log-format", "xml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
