use super::*;
use crate::model::ResponseHead;
use crate::scheduler::{MAX_PAUSE, MIN_PAUSE};

fn answered(code: u16, headers: &[(&str, &str)]) -> Happened {
    Happened::Upstream(Attempt::Answered(Answer {
        head: ResponseHead {
            code,
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect(),
            body: None,
        },
        body: Vec::new(),
        kept: true,
        sent_ms: 0,
        exec_ms: 1,
    }))
}

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn requeued(d: Decision) -> Option<Feedback> {
    match d {
        Decision::Requeue(f) => Some(f),
        _ => None,
    }
}

#[test]
fn nothing_sent_is_requeued_for_every_method() {
    for method in ["GET", "POST", "PATCH", "DELETE"] {
        let d = decide(
            method,
            Happened::Upstream(Attempt::NotSent("refused".into())),
            now(),
        );
        assert_eq!(requeued(d), Some(Feedback::NotSent), "{method}");
    }
}

#[test]
fn maybe_sent_requeues_only_safe_methods() {
    for method in ["GET", "HEAD", "OPTIONS"] {
        let d = decide(
            method,
            Happened::Upstream(Attempt::MaybeSent("closed".into())),
            now(),
        );
        assert_eq!(
            requeued(d),
            Some(Feedback::FailedAfterSend { requeued: true }),
            "{method}"
        );
    }
    for method in ["POST", "PUT", "PATCH", "DELETE", "get"] {
        let d = decide(
            method,
            Happened::Upstream(Attempt::MaybeSent("closed".into())),
            now(),
        );
        assert!(matches!(d, Decision::Unknown), "{method}");
    }
}

#[test]
fn failures_inside_the_gateway_are_requeued_never_unknown() {
    for method in ["GET", "POST"] {
        let d = decide(
            method,
            Happened::Internal(ExecError::Crypto(CryptoError::Unseal)),
            now(),
        );
        assert_eq!(requeued(d), Some(Feedback::Internal), "{method}");
    }
}

#[test]
fn rate_limit_answers_requeue_with_a_clamped_pause() {
    let cases = [
        (
            429,
            vec![("Retry-After", "10000000000000000000")],
            Some(MAX_PAUSE),
        ),
        (429, vec![("Retry-After", "0")], Some(MIN_PAUSE)),
        (
            429,
            vec![("Retry-After", "Sun, 06 Nov 1994 08:49:37 GMT")],
            Some(MIN_PAUSE),
        ),
        (429, vec![("Retry-After", "soon")], None),
        (429, vec![], None),
        (
            503,
            vec![("Retry-After", "7")],
            Some(Duration::from_secs(7)),
        ),
    ];
    for (code, headers, wait) in cases {
        let d = decide("POST", answered(code, &headers), now());
        match requeued(d) {
            Some(Feedback::Refused { retry_after, .. }) => {
                assert_eq!(retry_after, wait, "{code} {headers:?}")
            }
            other => panic!("{code} {headers:?}: {other:?}"),
        }
    }
}

#[test]
fn any_other_answer_is_the_result() {
    for code in [200, 201, 302, 400, 404, 500, 503] {
        let d = decide(
            "POST",
            answered(code, &[("X-RateLimit-RPS-Limit", "5")]),
            now(),
        );
        match d {
            Decision::Complete(a, hints) => {
                assert_eq!(a.head.code, code);
                assert_eq!(hints.rps_limit, Some(5));
            }
            _ => panic!("{code} is a result"),
        }
    }
}

#[test]
fn the_engine_reports_dead_when_its_loop_ends_even_by_a_panic() {
    let (handle, receiver) = channel();
    assert!(handle.is_alive());
    let ended = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let _alive = AliveGuard(receiver.alive.clone());
        panic!("the engine failed");
    }));
    assert!(ended.is_err());
    assert!(!handle.is_alive(), "/healthz must not say 200 from now on");
}
