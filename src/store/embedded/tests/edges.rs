//! The store's edges: a second open, unreadable records, concurrency,
//! forbidden transitions, the pending cap, sweeps racing requeues, the
//! journal after a kill, an old format, `ahead`, a given-up callback.

use super::*;

#[test]
fn a_second_open_of_the_same_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _s = open(dir.path());
    let second = SledStore::open(&SledConfig {
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
    let bad = enqueue(&s, new_request(1, "POST", vec![], false)).unwrap();
    let good = enqueue(&s, new_request(1, "POST", vec![], false)).unwrap();
    s.tree(RECORDS)
        .insert(bad.id.as_bytes(), &b"\x01garbage"[..])
        .unwrap();
    // The bad record is skipped (and taken off its lane), the good one
    // claimed in the same round.
    let claims = block(s.claim_batch(&[bad.lane, bad.lane], 5)).unwrap();
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
                        let rec = s
                            .submit(new_request(t, "POST", vec![t; 10], false))
                            .await
                            .unwrap();
                        assert!(matches!(rec, Submitted::New(r) if r.status == Status::Enqueued));
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
    let claims = rt.block_on(s.claim_batch(&[lane; 4], 10)).unwrap();
    let ops: Vec<Settle> = claims
        .into_iter()
        .map(|c| match c {
            Claim::Got(r) => Settle::Requeue {
                id: r.id,
                claims: r.claims,
                sent: false,
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
                    n += t.await.unwrap().unwrap() as usize;
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
    let rec = enqueue(&s, new_request(1, "POST", vec![], false)).unwrap();
    // Completing a request that was never claimed: the fence refuses it.
    assert!(!complete(
        &s,
        &rec.id,
        rec.claims,
        completion(200, vec![]),
        7,
        100
    ));
    // An unknown request cannot be requeued as if it were started.
    assert!(!requeue(&s, &rec.id, rec.claims));
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
    // Six at once (one round), five for lane 1: exactly three are
    // stored; lane 2 is not affected.
    let answers: Vec<_> = [1, 1, 2, 1, 1, 1]
        .into_iter()
        .map(|lane| s.writer.send(capped(lane).into_op_for_tests()))
        .collect();
    let stored: Vec<bool> = answers
        .into_iter()
        .map(|a| {
            matches!(
                a.blocking_recv().unwrap().unwrap()[..],
                [change::Applied::Stored(_)]
            )
        })
        .collect();
    assert_eq!(stored, [true, true, true, true, false, false]);
    assert_eq!(s.pending_in_lane(&[1; 32]).unwrap(), 3);
    assert_eq!(s.pending_in_lane(&[2; 32]).unwrap(), 1);
    assert!(matches!(
        enqueue(&s, capped(1)),
        Err(StoreError::LaneFull(3))
    ));
    // Claiming frees a place; requeueing takes it back.
    let c = claim(&s, &[1; 32], 5).unwrap();
    assert_eq!(s.pending_in_lane(&[1; 32]).unwrap(), 2);
    let d = enqueue(&s, capped(1)).unwrap();
    assert!(requeue(&s, &c.id, c.claims));
    assert_eq!(
        s.pending_in_lane(&[1; 32]).unwrap(),
        4,
        "a requeue is never refused"
    );
    // Deleting (cancel) and claiming everything bring the count to nothing.
    let _ = d;
    while claim(&s, &[1; 32], 6).is_some() {}
    assert_eq!(s.pending_in_lane(&[1; 32]).unwrap(), 0);
    assert!(
        s.tree(COUNTERS)
            .get(keys::pending(&[1; 32]))
            .unwrap()
            .is_none()
    );
}

#[test]
fn the_sweep_never_deletes_a_request_requeued_after_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let rec = enqueue(&s, new_request(1, "POST", b"x".to_vec(), false)).unwrap();
    let c = claim(&s, &rec.lane, 5).unwrap();
    mark_unknown(&s, &rec.id, c.claims, 10, 100);
    // The sweep sees it expired...
    let expired = s.expired(200, 10).unwrap();
    assert_eq!(expired, [(110, rec.id)]);
    // ...an operator requeues it meanwhile...
    assert!(block(s.requeue_unknown(&rec.id)).unwrap().is_some());
    // ...and the sweep's delete finds it no longer expired.
    assert_eq!(s.expire_blocking(200, expired).unwrap(), 0);
    assert_eq!(s.get(&rec.id).unwrap().unwrap().status, Status::Enqueued);
    assert_eq!(claim(&s, &rec.lane, 300).unwrap().id, rec.id);
    // A finished and expired one is deleted.
    let c = s.get(&rec.id).unwrap().unwrap();
    mark_unknown(&s, &rec.id, c.claims, 400, 100);
    assert_eq!(
        s.expire_blocking(499, vec![(500, rec.id)]).unwrap(),
        0,
        "not yet expired"
    );
    assert_eq!(s.expire_blocking(500, vec![(500, rec.id)]).unwrap(), 1);
    assert!(s.get(&rec.id).unwrap().is_none());
}

/// A copy of the data dir taken while the store runs, as `kill -9` leaves
/// it: sled has not flushed since the last checkpoint, and the journal
/// holds what came after. Everything acknowledged is there on open.
#[test]
fn the_journal_brings_back_what_sled_had_not_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let early = enqueue(&s, new_request(1, "POST", b"early".to_vec(), false)).unwrap();
    s.core.checkpoint().unwrap();
    let late: Vec<RequestRecord> = (0..20)
        .map(|i| enqueue(&s, new_request(2, "POST", vec![i; 3000], true)).unwrap())
        .collect();
    let claimed = claim(&s, &late[0].lane, 7).unwrap();
    assert!(complete(
        &s,
        &claimed.id,
        claimed.claims,
        completion(201, b"answer".to_vec()),
        9,
        1_000
    ));
    let copy = crash_image(dir.path());
    drop(s);
    let r = open(copy.path());
    assert_eq!(
        r.request_body(&r.get(&early.id).unwrap().unwrap()).unwrap(),
        b"early"
    );
    for (i, rec) in late.iter().enumerate().skip(1) {
        let got = r.get(&rec.id).unwrap().unwrap();
        assert_eq!(got.status, Status::Enqueued);
        assert_eq!(r.request_body(&got).unwrap(), vec![i as u8; 3000]);
    }
    let done = r.get(&claimed.id).unwrap().unwrap();
    assert_eq!(done.status, Status::Done);
    assert_eq!(r.response(&claimed.id).unwrap().unwrap().1, b"answer");
    assert_eq!(r.due_callbacks(9, 10).unwrap().len(), 1);
    assert_eq!(count(&r, Status::Enqueued), 20);
    assert_eq!(r.pending_in_lane(&[2; 32]).unwrap(), 19);
    assert_eq!(
        claim(&r, &[2; 32], 10).unwrap().id,
        late[1].id,
        "queue order kept"
    );
}

/// A copy of `dir` as sled and the journal left it on disk: what a crash
/// would leave (sled's lock file dropped).
pub(super) fn crash_image(dir: &Path) -> tempfile::TempDir {
    let copy = tempfile::tempdir().unwrap();
    for entry in walk(dir) {
        let to = copy.path().join(entry.strip_prefix(dir).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &to).unwrap();
    }
    let _ = std::fs::remove_file(copy.path().join("db.lock"));
    copy
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_data_dir_of_the_old_format_is_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("bodies")).unwrap();
    let err = SledStore::open(&SledConfig {
        path: dir.path().to_path_buf(),
        cache_capacity: 1 << 20,
    })
    .err()
    .unwrap();
    assert!(matches!(err, StoreError::Format(_)), "{err:?}");
    assert!(err.to_string().contains("older asyncgate"), "{err}");
}

/// `ahead` sums per-bucket counts and walks one bucket: exact across
/// buckets, after claims and cancels.
#[test]
fn ahead_is_exact_across_buckets_claims_and_cancels() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let n = 3 * keys::BUCKET_SEQS as usize;
    let answers: Vec<_> = (0..n)
        .map(|_| {
            s.writer
                .send(new_request(1, "POST", vec![], false).into_op_for_tests())
        })
        .collect();
    let recs: Vec<RequestRecord> = answers
        .into_iter()
        .map(|a| match a.blocking_recv().unwrap().unwrap().pop() {
            Some(change::Applied::Stored(r)) => *r,
            other => panic!("{other:?}"),
        })
        .collect();
    let last = recs.last().unwrap();
    assert_eq!(s.ahead(last).unwrap(), n as u64 - 1);
    assert_eq!(s.ahead(&recs[0]).unwrap(), 0);
    claim(&s, &[1; 32], 5).unwrap();
    assert!(block(s.cancel(&recs[n / 2].id)).unwrap());
    assert!(block(s.cancel(&recs[n - 2].id)).unwrap());
    assert_eq!(s.ahead(last).unwrap(), n as u64 - 4);
    assert_eq!(s.ahead(&recs[n / 2 + 1]).unwrap(), (n / 2 - 1) as u64);
}

/// Giving up after a last failed attempt counts that attempt and its code.
#[test]
fn a_callback_given_up_counts_its_last_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let rec = enqueue(&s, new_request(1, "POST", vec![], true)).unwrap();
    let c = claim(&s, &rec.lane, 5).unwrap();
    complete(&s, &rec.id, c.claims, completion(200, vec![]), 10, 100_000);
    block(s.callback_retry(10, &rec.id, 1_010, Some(500))).unwrap();
    block(s.callback_gave_up(1_010, &rec.id, Some(Some(503)))).unwrap();
    let st = s.get(&rec.id).unwrap().unwrap().callback_state.unwrap();
    assert_eq!(
        (st.phase, st.attempts, st.last_http_code, st.next_attempt_ms),
        (crate::model::CallbackPhase::GaveUp, 2, Some(503), None)
    );
    assert_eq!(s.next_callback_due().unwrap(), None);
}
