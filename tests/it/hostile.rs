//! Bad input and hostile clients: clear errors, never a panic or a hang,
//! and the gateway keeps serving everyone else.

use std::time::{Duration, Instant};

use crate::helpers::*;

#[actix_web::test]
async fn oversized_headers_and_malformed_requests_get_4xx() {
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &[]).await;
    let huge = format!(
        "POST /async_api/v2/x HTTP/1.1\r\nHost: gw\r\nX-Big: {}\r\nContent-Length: 0\r\n\r\n",
        "a".repeat(200_000)
    );
    let answer = raw_request(app.addr, huge.into_bytes()).await;
    assert!(
        answer.starts_with("HTTP/1.1 4"),
        "{}",
        &answer[..answer.len().min(200)]
    );
    let answer = raw_request(app.addr, b"NOT HTTP AT ALL\r\n\r\n".to_vec()).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
        "{answer}"
    );
    let answer = raw_request(
        app.addr,
        b"POST /async_api/v2/x HTTP/1.1\r\nHost: gw\r\nContent-Length: nope\r\n\r\n".to_vec(),
    )
    .await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
        "{answer}"
    );
    // Nothing was stored or sent, and the gateway still serves.
    let id = app.submit("GET", "/async_api/v2/after", &[], b"").await;
    app.wait_for_status(&id, None, "done", SECS(10)).await;
    assert_eq!(up.seen().len(), 1);
    app.stop().await;
}

#[actix_web::test]
async fn a_slow_client_is_cut_off_without_holding_up_others() {
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &[]).await;
    let addr = app.addr;
    let slow = actix_web::rt::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"POST /async_api/v2/slow HTTP/1.1\r\nHost: gw\r\nX-Half")
            .unwrap();
        let start = Instant::now();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        (start.elapsed(), String::from_utf8_lossy(&out).into_owned())
    });
    // Others are served meanwhile.
    let id = app.submit("GET", "/async_api/v2/fast", &[], b"").await;
    app.wait_for_status(&id, None, "done", SECS(5)).await;
    let (took, answer) = slow.await.unwrap();
    assert!(
        took < SECS(20),
        "the slow client was cut off after {took:?}"
    );
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    assert_eq!(
        up.seen().len(),
        1,
        "the half request was never stored or sent"
    );
    app.stop().await;
}
