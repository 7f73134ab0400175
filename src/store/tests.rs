use super::*;
use crate::model::{Callback, CallbackMethod, Outcome};

fn open(dir: &Path) -> Store {
    Store::open(&StoreConfig {
        path: dir.to_path_buf(),
        cache_capacity: 8 << 20,
    })
    .unwrap()
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

fn count(s: &Store, status: Status) -> u64 {
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
                s.enqueue(new_request(1, "POST", vec![], false))
                    .unwrap()
                    .0
                    .id
            })
            .collect();
        let _ = s.enqueue(new_request(2, "POST", vec![], false)).unwrap();
        s.close().unwrap();
        ids
    };
    let s = open(dir.path());
    assert_eq!(s.pending_lanes().unwrap(), vec![[1; 32], [2; 32]]);
    let claimed: Vec<RequestId> = (0..5)
        .map(|_| s.claim_next(&[1; 32], 5).unwrap().unwrap().0.id)
        .collect();
    assert_eq!(claimed, ids);
    assert!(s.claim_next(&[1; 32], 5).unwrap().is_none());
    assert_eq!(count(&s, Status::Started), 5);
    assert_eq!(count(&s, Status::Enqueued), 1);
}

#[test]
fn a_requeued_request_goes_back_to_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let a = s.enqueue(new_request(1, "POST", vec![], false)).unwrap().0;
    let b = s.enqueue(new_request(1, "POST", vec![], false)).unwrap().0;
    let (claimed, _) = s.claim_next(&a.lane, 5).unwrap().unwrap();
    assert_eq!(claimed.id, a.id);
    assert!(s.requeue(&a.id, claimed.claims).unwrap());
    assert_eq!(s.claim_next(&a.lane, 6).unwrap().unwrap().0.id, a.id);
    assert_eq!(s.claim_next(&a.lane, 6).unwrap().unwrap().0.id, b.id);
}

#[test]
fn complete_keeps_big_responses_and_drops_the_credential() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let body: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    let rec = s
        .enqueue(new_request(1, "POST", body.clone(), true))
        .unwrap()
        .0;
    assert_eq!(s.request_body(&rec).unwrap(), body);
    let (claimed, _) = s.claim_next(&rec.lane, 5).unwrap().unwrap();
    let answer: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
    assert!(
        s.complete(
            &rec.id,
            claimed.claims,
            completion(201, answer.clone()),
            10_000,
            60_000
        )
        .unwrap()
        .is_some()
    );
    let done = s.get(&rec.id).unwrap().unwrap();
    assert_eq!(done.status, Status::Done);
    assert_eq!(done.started_ms, Some(2_000));
    assert_eq!(done.expires_ms, Some(70_000));
    assert_eq!(s.response(&rec.id).unwrap().unwrap().1, answer);
    assert!(s.sealed_credential(&rec.id).unwrap().is_none());
    assert_eq!(
        s.due_callbacks(10_000, 10).unwrap(),
        vec![(10_000, rec.id, 0)]
    );
    assert_eq!(count(&s, Status::Done), 1);
    assert_eq!(count(&s, Status::Started), 0);
}

#[test]
fn a_stale_claim_cannot_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let rec = s.enqueue(new_request(1, "GET", vec![], false)).unwrap().0;
    let (first, _) = s.claim_next(&rec.lane, 5).unwrap().unwrap();
    assert!(s.requeue(&rec.id, first.claims).unwrap());
    let (second, _) = s.claim_next(&rec.lane, 6).unwrap().unwrap();
    assert!(
        s.complete(&rec.id, first.claims, completion(200, vec![]), 7, 100)
            .unwrap()
            .is_none()
    );
    assert!(
        s.mark_unknown(&rec.id, first.claims, 7, 100)
            .unwrap()
            .is_none()
    );
    assert!(!s.requeue(&rec.id, first.claims).unwrap());
    assert!(
        s.complete(&rec.id, second.claims, completion(200, vec![]), 7, 100)
            .unwrap()
            .is_some()
    );
}

#[test]
fn recovery_requeues_safe_methods_and_marks_the_rest_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let post = s.enqueue(new_request(1, "POST", vec![], false)).unwrap().0;
    let get = s.enqueue(new_request(2, "GET", vec![], false)).unwrap().0;
    let _ = s.claim_next(&post.lane, 5).unwrap().unwrap();
    let _ = s.claim_next(&get.lane, 5).unwrap().unwrap();
    assert_eq!(
        s.recover(50, 1_000).unwrap(),
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
    let (r, _) = s.requeue_unknown(&post.id).unwrap().unwrap();
    assert_eq!((r.status, r.expires_ms), (Status::Enqueued, None));
    assert!(s.requeue_unknown(&post.id).unwrap().is_none());
    assert_eq!(s.claim_next(&post.lane, 60).unwrap().unwrap().0.id, post.id);
}

#[test]
fn expired_requests_are_deleted_with_everything_they_own() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let rec = s
        .enqueue(new_request(1, "POST", vec![1; 100_000], true))
        .unwrap()
        .0;
    let (c, _) = s.claim_next(&rec.lane, 5).unwrap().unwrap();
    s.complete(
        &rec.id,
        c.claims,
        completion(200, vec![2; 100_000]),
        10,
        100,
    )
    .unwrap();
    assert!(s.expired(109, 10).unwrap().is_empty());
    assert_eq!(s.next_expiry().unwrap(), Some(110));
    assert_eq!(crate::sweeper::sweep(&s, 110, 10).unwrap(), 1);
    assert!(s.get(&rec.id).unwrap().is_none());
    assert!(s.response(&rec.id).unwrap().is_none());
    assert!(s.tree(tx::BODY_REFS).is_empty());
    let segments = std::fs::read_dir(dir.path().join("bodies"))
        .unwrap()
        .count();
    assert_eq!(segments, 1, "only the current body segment is left");
    assert_eq!(s.next_expiry().unwrap(), None);
    assert_eq!(count(&s, Status::Done), 0);
}

#[test]
fn only_finished_requests_can_be_deleted_by_an_operator() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let rec = s.enqueue(new_request(1, "POST", vec![], false)).unwrap().0;
    assert!(!s.delete(&rec.id).unwrap());
    assert!(s.get(&rec.id).unwrap().is_some());
}

#[test]
fn callbacks_move_to_their_next_due_time() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let rec = s.enqueue(new_request(1, "POST", vec![], true)).unwrap().0;
    let (c, _) = s.claim_next(&rec.lane, 5).unwrap().unwrap();
    s.complete(&rec.id, c.claims, completion(200, vec![]), 10, 100_000)
        .unwrap();
    s.callback_retry(10, &rec.id, 1_010, 1).unwrap();
    assert!(s.due_callbacks(1_009, 10).unwrap().is_empty());
    assert_eq!(s.next_callback_due().unwrap(), Some(1_010));
    assert_eq!(
        s.due_callbacks(1_010, 10).unwrap(),
        vec![(1_010, rec.id, 1)]
    );
    let _ = s.callback_finished(1_010, &rec.id).unwrap();
    assert_eq!(s.next_callback_due().unwrap(), None);
}

#[test]
fn a_second_open_of_the_same_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _s = open(dir.path());
    let second = Store::open(&StoreConfig {
        path: dir.path().to_path_buf(),
        cache_capacity: 1 << 20,
    });
    assert!(
        matches!(second, Err(StoreError::Locked(_))),
        "{:?}",
        second.err()
    );
}

#[test]
fn an_unreadable_record_is_quarantined_and_the_lane_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let bad = s.enqueue(new_request(1, "POST", vec![], false)).unwrap().0;
    let good = s.enqueue(new_request(1, "POST", vec![], false)).unwrap().0;
    s.tree(tx::RECORDS)
        .insert(bad.id.as_bytes(), &b"\x01garbage"[..])
        .unwrap();
    // A batch claim falls back to one by one, which skips the bad record.
    let (claims, _) = s.claim_batch(&[bad.lane, bad.lane], 5).unwrap();
    assert!(matches!(claims[0], Claim::Skipped), "{claims:?}");
    assert!(
        matches!(&claims[1], Claim::Got(r) if r.id == good.id),
        "{claims:?}"
    );
    assert!(
        s.pending_lanes().unwrap().is_empty(),
        "the bad one is off its lane"
    );
    assert!(
        matches!(s.get(&bad.id), Err(StoreError::Codec(_))),
        "reads say so, no panic"
    );
}

#[test]
fn concurrent_submissions_are_combined_and_all_answered() {
    let dir = tempfile::tempdir().unwrap();
    let s = std::sync::Arc::new(open(dir.path()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    for _ in 0..50 {
                        let (rec, ticket) = s
                            .submit(new_request(t, "POST", vec![t; 10], false))
                            .await
                            .unwrap();
                        s.durable(ticket).await.unwrap();
                        assert_eq!(rec.status, Status::Enqueued);
                    }
                })
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(count(&s, Status::Enqueued), 200);
    // Settling through the combiner from one thread's tasks.
    let lane = [0u8; 32];
    let (claims, _) = s.claim_batch(&[lane; 4], 10).unwrap();
    let ops: Vec<Settle> = claims
        .into_iter()
        .map(|c| match c {
            Claim::Got(r) => Settle::Requeue {
                id: r.id,
                claims: r.claims,
            },
            other => panic!("{other:?}"),
        })
        .collect();
    let settled = rt.block_on(async {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let tasks: Vec<_> = ops
                    .into_iter()
                    .map(|op| {
                        let s = s.clone();
                        tokio::task::spawn_local(async move { s.settle(op).await })
                    })
                    .collect();
                let mut n = 0;
                for t in tasks {
                    n += t.await.unwrap().unwrap().is_some() as usize;
                }
                n
            })
            .await
    });
    assert_eq!(settled, 4);
    assert_eq!(count(&s, Status::Enqueued), 200);
}

#[test]
fn a_status_change_the_model_forbids_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let rec = s.enqueue(new_request(1, "POST", vec![], false)).unwrap().0;
    let skipped = s.transact(|tx| {
        let mut r = rec.clone();
        tx.set_status(&mut r, Status::Done)
    });
    assert!(
        matches!(skipped, Err(StoreError::Transition(_))),
        "{skipped:?}"
    );
    assert_eq!(s.get(&rec.id).unwrap().unwrap().status, Status::Enqueued);
    assert_eq!(count(&s, Status::Enqueued), 1);
    assert_eq!(count(&s, Status::Done), 0);
}

#[test]
fn the_pending_cap_is_exact_and_counts_follow_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let capped = |lane| NewRequest {
        max_pending: Some(3),
        ..new_request(lane, "POST", b"x".to_vec(), false)
    };
    // Five in one batch for lane 1 (as concurrent submissions combine):
    // exactly three are stored; lane 2 is not affected.
    let out = s
        .enqueue_batch(vec![
            capped(1),
            capped(1),
            capped(2),
            capped(1),
            capped(1),
            capped(1),
        ])
        .unwrap();
    let stored: Vec<bool> = out.iter().map(Result::is_ok).collect();
    assert_eq!(stored, [true, true, true, true, false, false]);
    assert_eq!(s.pending_in_lane(&[1; 32]).unwrap(), 3);
    assert_eq!(s.pending_in_lane(&[2; 32]).unwrap(), 1);
    assert!(matches!(s.enqueue(capped(1)), Err(StoreError::LaneFull(3))));
    // Claiming frees a place; requeueing takes it back.
    let (c, _) = s.claim_next(&[1; 32], 5).unwrap().unwrap();
    assert_eq!(s.pending_in_lane(&[1; 32]).unwrap(), 2);
    let (d, _) = s.enqueue(capped(1)).unwrap();
    assert!(s.requeue(&c.id, c.claims).unwrap());
    assert_eq!(
        s.pending_in_lane(&[1; 32]).unwrap(),
        4,
        "a requeue is never refused"
    );
    // Deleting (cancel) and claiming everything bring the count to nothing.
    let _ = d;
    while s.claim_next(&[1; 32], 6).unwrap().is_some() {}
    assert_eq!(s.pending_in_lane(&[1; 32]).unwrap(), 0);
    assert!(
        s.tree(tx::COUNTERS)
            .get(keys::pending(&[1; 32]))
            .unwrap()
            .is_none()
    );
}

#[test]
fn the_sweep_never_deletes_a_request_requeued_after_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let (rec, _) = s
        .enqueue(new_request(1, "POST", b"x".to_vec(), false))
        .unwrap();
    let (c, _) = s.claim_next(&rec.lane, 5).unwrap().unwrap();
    let _ = s.mark_unknown(&rec.id, c.claims, 10, 100).unwrap();
    // The sweep sees it expired...
    let expired = s.expired(200, 10).unwrap();
    assert_eq!(expired, [(110, rec.id)]);
    // ...an operator requeues it meanwhile...
    assert!(s.requeue_unknown(&rec.id).unwrap().is_some());
    // ...and the sweep's delete finds it no longer expired.
    assert!(!s.delete_expired(&rec.id, 200).unwrap());
    assert_eq!(s.get(&rec.id).unwrap().unwrap().status, Status::Enqueued);
    assert_eq!(s.claim_next(&rec.lane, 300).unwrap().unwrap().0.id, rec.id);
    // A finished and expired one is deleted.
    let (c, _) = (s.get(&rec.id).unwrap().unwrap(), ());
    let _ = s.mark_unknown(&rec.id, c.claims, 400, 100).unwrap();
    assert!(!s.delete_expired(&rec.id, 499).unwrap(), "not yet expired");
    assert!(s.delete_expired(&rec.id, 500).unwrap());
    assert!(s.get(&rec.id).unwrap().is_none());
}
