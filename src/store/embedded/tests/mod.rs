use super::change::RECORDS;
use super::*;
use crate::model::RequestRecord;
use crate::model::{Callback, CallbackMethod, Outcome};
use crate::model::{LaneKey, RequestId, ResponseHead, Status};
use crate::store::Completion;

/// Opens `dir`; a reopen waits (up to 5 s) for sled to release the data
/// dir's lock, which sled 0.34 does some moments after the last handle of
/// the previous open is dropped (spacejam/sled#1234).
fn open(dir: &Path) -> SledStore {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match SledStore::open(&SledConfig {
            path: dir.to_path_buf(),
            cache_capacity: 8 << 20,
        }) {
            Err(StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other.unwrap(),
        }
    }
}

fn new_request(lane: u8, method: &str, body: Vec<u8>, callback: bool) -> NewRequest {
    NewRequest {
        id: RequestId::generate(),
        lane: [lane; 32],
        method: method.into(),
        target: "v2/campaigns.json?x=1".into(),
        headers: vec![
            ("accept".into(), b"a".to_vec()),
            ("accept".into(), b"b".to_vec()),
        ],
        body,
        callback: callback.then(|| Callback {
            url: "http://cb.example/x".into(),
            method: CallbackMethod::Post,
        }),
        sealed_credential: b"sealed".to_vec(),
        now_ms: 1_000,
        max_pending: None,
        idempotency: None,
    }
}

fn completion(code: u16, body: Vec<u8>) -> Completion {
    Completion {
        sent_ms: 2_000,
        outcome: Outcome {
            code,
            exec_ms: 5,
            kept: true,
        },
        head: ResponseHead {
            code,
            headers: vec![("x-a".into(), b"1".to_vec())],
            body: None,
        },
        body,
    }
}

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn enqueue(s: &SledStore, new: NewRequest) -> Result<RequestRecord, StoreError> {
    s.submit_blocking(new)
}

fn claim(s: &SledStore, lane: &LaneKey, now: u64) -> Option<RequestRecord> {
    s.claim_next_blocking(lane, now).unwrap()
}

fn requeue(s: &SledStore, id: &RequestId, claims: u32) -> bool {
    s.settle_blocking(Settle::Requeue {
        id: *id,
        claims,
        sent: true,
    })
    .unwrap()
}

fn complete(
    s: &SledStore,
    id: &RequestId,
    claims: u32,
    done: Completion,
    now_ms: u64,
    retention_ms: u64,
) -> bool {
    s.settle_blocking(Settle::Complete {
        id: *id,
        claims,
        done,
        now_ms,
        retention_ms,
    })
    .unwrap()
}

fn mark_unknown(s: &SledStore, id: &RequestId, claims: u32, now_ms: u64, keep_ms: u64) -> bool {
    s.settle_blocking(Settle::Unknown {
        id: *id,
        claims,
        now_ms,
        keep_ms,
    })
    .unwrap()
}

fn entry(event: u32, attempts: u32) -> CallbackEntry {
    CallbackEntry {
        event,
        status: Status::Done,
        attempts,
    }
}

fn count(s: &SledStore, status: Status) -> u64 {
    s.counts()
        .unwrap()
        .into_iter()
        .find(|(st, _)| *st == status)
        .unwrap()
        .1
}

#[test]
fn lanes_are_fifo_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<RequestId> = {
        let s = open(dir.path());
        let ids = (0..5)
            .map(|_| {
                enqueue(&s, new_request(1, "POST", vec![], false))
                    .unwrap()
                    .id
            })
            .collect();
        let _ = enqueue(&s, new_request(2, "POST", vec![], false)).unwrap();
        s.close().unwrap();
        ids
    };
    let s = open(dir.path());
    assert_eq!(s.pending_lanes().unwrap(), vec![[1; 32], [2; 32]]);
    let claimed: Vec<RequestId> = (0..5).map(|_| claim(&s, &[1; 32], 5).unwrap().id).collect();
    assert_eq!(claimed, ids);
    assert!(claim(&s, &[1; 32], 5).is_none());
    assert_eq!(count(&s, Status::Started), 5);
    assert_eq!(count(&s, Status::Enqueued), 1);
}

#[test]
fn a_requeued_request_goes_back_to_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let a = enqueue(&s, new_request(1, "POST", vec![], false)).unwrap();
    let b = enqueue(&s, new_request(1, "POST", vec![], false)).unwrap();
    let claimed = claim(&s, &a.lane, 5).unwrap();
    assert_eq!(claimed.id, a.id);
    assert!(requeue(&s, &a.id, claimed.claims));
    assert_eq!(claim(&s, &a.lane, 6).unwrap().id, a.id);
    assert_eq!(claim(&s, &a.lane, 6).unwrap().id, b.id);
}

#[test]
fn complete_keeps_big_responses_and_drops_the_credential() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let body: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    let rec = enqueue(&s, new_request(1, "POST", body.clone(), true)).unwrap();
    assert_eq!(s.request_body(&rec).unwrap(), body);
    let claimed = claim(&s, &rec.lane, 5).unwrap();
    let answer: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    assert!(complete(
        &s,
        &rec.id,
        claimed.claims,
        completion(201, answer.clone()),
        10_000,
        60_000
    ));
    let done = s.get(&rec.id).unwrap().unwrap();
    assert_eq!(done.status, Status::Done);
    assert_eq!(done.started_ms, Some(2_000));
    assert_eq!(done.expires_ms, Some(70_000));
    assert_eq!(s.response(&rec.id).unwrap().unwrap().1, answer);
    assert!(s.sealed_credential(&rec.id).unwrap().is_none());
    assert_eq!(
        s.due_callbacks(10_000, 10).unwrap(),
        vec![(10_000, rec.id, entry(1, 0))]
    );
    assert_eq!(count(&s, Status::Done), 1);
    assert_eq!(count(&s, Status::Started), 0);
}

#[test]
fn a_stale_claim_cannot_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let rec = enqueue(&s, new_request(1, "GET", vec![], false)).unwrap();
    let first = claim(&s, &rec.lane, 5).unwrap();
    assert!(requeue(&s, &rec.id, first.claims));
    let second = claim(&s, &rec.lane, 6).unwrap();
    assert!(!complete(
        &s,
        &rec.id,
        first.claims,
        completion(200, vec![]),
        7,
        100
    ));
    assert!(!mark_unknown(&s, &rec.id, first.claims, 7, 100));
    assert!(!requeue(&s, &rec.id, first.claims));
    assert!(complete(
        &s,
        &rec.id,
        second.claims,
        completion(200, vec![]),
        7,
        100
    ));
}

#[test]
fn recovery_requeues_safe_methods_and_marks_the_rest_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let post = enqueue(&s, new_request(1, "POST", vec![], false)).unwrap();
    let get = enqueue(&s, new_request(2, "GET", vec![], false)).unwrap();
    claim(&s, &post.lane, 5).unwrap();
    claim(&s, &get.lane, 5).unwrap();
    assert_eq!(
        block(s.recover(50, 1_000)).unwrap(),
        Recovered {
            requeued: 1,
            unknown: 1
        }
    );
    let p = s.get(&post.id).unwrap().unwrap();
    assert_eq!((p.status, p.expires_ms), (Status::Unknown, Some(1_050)));
    assert!(
        s.sealed_credential(&post.id).unwrap().is_some(),
        "kept for a requeue"
    );
    assert_eq!(s.get(&get.id).unwrap().unwrap().status, Status::Enqueued);
    assert_eq!(s.list(Status::Unknown, None, 10).unwrap()[0].id, post.id);
    // An operator requeues the unknown one: back in its lane, no retention.
    let r = block(s.requeue_unknown(&post.id)).unwrap().unwrap();
    assert_eq!((r.status, r.expires_ms), (Status::Enqueued, None));
    assert!(block(s.requeue_unknown(&post.id)).unwrap().is_none());
    assert_eq!(claim(&s, &post.lane, 60).unwrap().id, post.id);
}

#[test]
fn expired_requests_are_deleted_with_everything_they_own() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let rec = enqueue(&s, new_request(1, "POST", vec![1; 100_000], true)).unwrap();
    let c = claim(&s, &rec.lane, 5).unwrap();
    complete(
        &s,
        &rec.id,
        c.claims,
        completion(200, vec![2; 100_000]),
        10,
        100,
    );
    assert!(s.expired(109, 10).unwrap().is_empty());
    assert_eq!(s.next_expiry().unwrap(), Some(110));
    // A restart starts a new journal segment: the old one holds the body
    // and the response, and goes once they do.
    s.close().unwrap();
    drop(s);
    let s = open(dir.path());
    let journal = || {
        journal::segments(&dir.path().join("journal"))
            .unwrap()
            .len()
    };
    s.core.checkpoint().unwrap();
    assert_eq!(journal(), 2, "the old segment still holds the response");
    assert_eq!(
        s.expire_blocking(110, s.expired(110, 10).unwrap()).unwrap(),
        1
    );
    assert!(s.get(&rec.id).unwrap().is_none());
    assert!(s.response(&rec.id).unwrap().is_none());
    s.core.checkpoint().unwrap();
    assert_eq!(journal(), 1, "only the current journal segment is left");
    assert_eq!(s.next_expiry().unwrap(), None);
    assert_eq!(count(&s, Status::Done), 0);
}

#[test]
fn only_finished_requests_can_be_deleted_by_an_operator() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let rec = enqueue(&s, new_request(1, "POST", vec![], false)).unwrap();
    assert!(!block(s.delete(&rec.id)).unwrap());
    assert!(s.get(&rec.id).unwrap().is_some());
}

#[test]
fn callbacks_move_to_their_next_due_time() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let rec = enqueue(&s, new_request(1, "POST", vec![], true)).unwrap();
    let c = claim(&s, &rec.lane, 5).unwrap();
    complete(&s, &rec.id, c.claims, completion(200, vec![]), 10, 100_000);
    block(s.callback_retry(10, &rec.id, 1_010, Some(500))).unwrap();
    let st = s.get(&rec.id).unwrap().unwrap().callback_state.unwrap();
    assert_eq!(
        (st.phase, st.attempts, st.last_http_code, st.next_attempt_ms),
        (
            crate::model::CallbackPhase::Pending,
            1,
            Some(500),
            Some(1_010)
        )
    );
    assert!(s.due_callbacks(1_009, 10).unwrap().is_empty());
    assert_eq!(s.next_callback_due().unwrap(), Some(1_010));
    assert_eq!(
        s.due_callbacks(1_010, 10).unwrap(),
        vec![(1_010, rec.id, entry(1, 1))]
    );
    block(s.callback_finished(1_010, &rec.id, Some(204))).unwrap();
    let st = s.get(&rec.id).unwrap().unwrap().callback_state.unwrap();
    assert_eq!(
        (st.phase, st.attempts, st.last_http_code, st.next_attempt_ms),
        (crate::model::CallbackPhase::Delivered, 2, Some(204), None)
    );
    assert_eq!(s.next_callback_due().unwrap(), None);
}

mod edges;
mod keyed;

#[test]
fn a_waiter_is_woken_with_the_record_as_its_round_left_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let rec = enqueue(&s, new_request(1, "GET", vec![], false)).unwrap();
    let gone = enqueue(&s, new_request(2, "GET", vec![], false)).unwrap();
    let mut done = s.waiters().watch(&rec.id);
    let mut cancelled = s.waiters().watch(&gone.id);
    let claimed = claim(&s, &rec.lane, 5).unwrap();
    // A claim finishes nothing: no wake-up.
    assert!(done.try_recv().is_err());
    assert!(complete(
        &s,
        &rec.id,
        claimed.claims,
        completion(200, b"ok".to_vec()),
        10,
        60_000
    ));
    let woken = block(done).unwrap().expect("the record, read");
    let woken = std::sync::Arc::unwrap_or_clone(woken.expect("still there"));
    assert_eq!(woken.status, Status::Done);
    assert_eq!(woken.expires_ms, Some(60_010));
    assert_eq!(Some(woken), s.get(&rec.id).unwrap());
    assert!(cancelled.try_recv().is_err());
    assert!(block(s.cancel(&gone.id)).unwrap());
    assert_eq!(block(cancelled).unwrap(), Some(None), "woken: it is gone");
}
