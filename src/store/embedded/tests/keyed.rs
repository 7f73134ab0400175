//! The idempotency index across a crash: what was applied after the
//! checkpointer last wrote it comes back from the journal, deletes
//! included; memory holds only that; a data dir of format 2 or 3 (the
//! index in sled), or one whose index is gone, gets it from its records.

use super::edges::crash_image;
use super::*;
use crate::model::Idempotency;

fn keyed(lane: u8, key: &str, body: &[u8]) -> NewRequest {
    let mut new = new_request(lane, "POST", body.to_vec(), false);
    let hash = |b: &[u8]| -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(b).into()
    };
    new.idempotency = Some(Idempotency {
        key: hash(key.as_bytes()),
        fingerprint: hash(body),
    });
    new
}

#[test]
fn keys_applied_after_the_last_copy_come_back_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let a = enqueue(&s, keyed(1, "a", b"1")).unwrap();
    let b = enqueue(&s, keyed(1, "b", b"2")).unwrap();
    let gone = enqueue(&s, keyed(1, "gone", b"3")).unwrap();
    // The tree holds a, b and gone, marked at this checkpoint.
    s.core.checkpoint().unwrap();
    let c = enqueue(&s, keyed(1, "c", b"4")).unwrap();
    assert!(block(s.cancel(&b.id)).unwrap());
    let b2 = enqueue(&s, keyed(1, "b", b"5")).unwrap();
    assert!(block(s.cancel(&gone.id)).unwrap());
    let short = enqueue(&s, keyed(2, "short", b"6")).unwrap();
    assert!(block(s.cancel(&short.id)).unwrap());
    assert_eq!(
        s.core.keyed.in_memory(),
        4,
        "keys c, b, gone and short: not yet written"
    );
    // The trees, flushed past the index's mark, as a crash can leave them.
    s.core.db.flush().unwrap();
    let copy = crash_image(dir.path());
    drop(s);

    let r = open(copy.path());
    for (key, body, id) in [("a", "1", a.id), ("c", "4", c.id), ("b", "5", b2.id)] {
        let again = enqueue(&r, keyed(1, key, body.as_bytes())).unwrap();
        assert_eq!(again.id, id, "key {key}");
    }
    assert_ne!(enqueue(&r, keyed(1, "gone", b"3")).unwrap().id, gone.id);
    assert_eq!(count(&r, Status::Enqueued), 4, "a, c, b and the new gone");
    // The checkpoint writes what the catch-up and these found: none of it
    // stays in memory, and a reopen finds the same.
    r.core.checkpoint().unwrap();
    assert_eq!(r.core.keyed.in_memory(), 0);
    r.close().unwrap();
    drop(r);
    let r = open(copy.path());
    for (key, body, id) in [("a", "1", a.id), ("c", "4", c.id), ("b", "5", b2.id)] {
        assert_eq!(enqueue(&r, keyed(1, key, body.as_bytes())).unwrap().id, id);
    }
    assert_eq!(count(&r, Status::Enqueued), 4);
}

#[test]
fn a_data_dir_of_format_2_is_upgraded_with_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let a = enqueue(&s, keyed(1, "a", b"1")).unwrap();
    s.close().unwrap();
    drop(s);
    // As format 2 kept it: the lane and the key's hash as the key, no
    // mark.
    {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let db = loop {
            let config = sled::Config::new()
                .path(dir.path())
                .segment_size(SEGMENT_SIZE)
                .flush_every_ms(None);
            match config.open() {
                Ok(db) => break db,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("{e}");
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        };
        let tree = db.open_tree("idempotency").unwrap();
        tree.clear().unwrap();
        let mut old = [0u8; 64];
        old[..32].copy_from_slice(&a.lane);
        old[32..].copy_from_slice(&a.idempotency.unwrap().key);
        tree.insert(old, a.id.as_bytes()).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("format", &[2])
            .unwrap();
        db.flush().unwrap();
    }
    // Format 2 had no table of its own.
    std::fs::remove_file(dir.path().join("idempotency.idx")).unwrap();
    let r = open(dir.path());
    assert_eq!(enqueue(&r, keyed(1, "a", b"1")).unwrap().id, a.id);
    let meta = r.core.tree(change::META).get("format").unwrap();
    assert_eq!(meta.as_deref(), Some(&[FORMAT][..]));
    assert!(r.core.tree(change::IDEMPOTENCY).is_empty(), "emptied");
    r.close().unwrap();
    drop(r);
    let r = open(dir.path());
    assert_eq!(enqueue(&r, keyed(1, "a", b"1")).unwrap().id, a.id);
}

#[test]
fn the_catch_up_keeps_the_journal_order_of_a_key_taken_over_and_freed() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    // `a` is done and past its retention (at 2,001), not yet swept.
    let a = enqueue(&s, keyed(1, "k", b"1")).unwrap();
    let claimed = claim(&s, &a.lane, 1_500).unwrap();
    assert!(complete(
        &s,
        &a.id,
        claimed.claims,
        completion(200, vec![]),
        2_000,
        1
    ));
    s.core.checkpoint().unwrap();
    // After the mark: the key taken over by `b`, then `b` cancelled, which
    // frees the key (it does not fall back to `a`).
    let mut later = keyed(1, "k", b"1");
    later.now_ms = 5_000;
    let b = enqueue(&s, later).unwrap();
    assert_ne!(b.id, a.id);
    assert!(block(s.cancel(&b.id)).unwrap());
    let key = keys::idempotency(&a.lane, &a.idempotency.unwrap().key);
    assert_eq!(s.core.keyed.lookup(&key).unwrap(), None);
    s.core.db.flush().unwrap();
    let copy = crash_image(dir.path());
    drop(s);
    let r = open(copy.path());
    assert_eq!(
        r.core.keyed.lookup(&key).unwrap(),
        None,
        "as before the crash"
    );
}

#[test]
fn an_index_lost_or_damaged_is_made_again_from_the_records() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    let a = enqueue(&s, keyed(1, "a", b"1")).unwrap();
    let b = enqueue(&s, keyed(1, "b", b"2")).unwrap();
    assert!(block(s.cancel(&b.id)).unwrap());
    s.close().unwrap();
    drop(s);
    let table = dir.path().join("idempotency.idx");
    for damage in ["header", "gone"] {
        match damage {
            "header" => {
                use std::os::unix::fs::FileExt;
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&table)
                    .unwrap();
                f.write_all_at(b"garbage!", 0).unwrap();
            }
            _ => std::fs::remove_file(&table).unwrap(),
        }
        let r = open(dir.path());
        assert_eq!(
            enqueue(&r, keyed(1, "a", b"1")).unwrap().id,
            a.id,
            "{damage}"
        );
        let b2 = enqueue(&r, keyed(1, "b", b"2")).unwrap();
        assert_ne!(b2.id, b.id, "{damage}: b was cancelled");
        assert!(block(r.cancel(&b2.id)).unwrap());
        r.close().unwrap();
    }
}

#[test]
fn a_refused_cancel_in_the_catch_up_leaves_the_key_naming_its_request() {
    let dir = tempfile::tempdir().unwrap();
    let s = open(dir.path());
    s.core.checkpoint().unwrap();
    // After the mark: stored, claimed, then a cancel refused (in flight).
    let a = enqueue(&s, keyed(1, "k", b"1")).unwrap();
    let claimed = claim(&s, &a.lane, 5).unwrap();
    assert_eq!(claimed.claims, 1);
    assert!(matches!(block(s.cancel(&a.id)), Err(StoreError::InFlight)));
    // The trees flushed past the index's mark, as a crash can leave them.
    s.core.db.flush().unwrap();
    let copy = crash_image(dir.path());
    drop(s);
    let r = open(copy.path());
    let key = keys::idempotency(&a.lane, &a.idempotency.unwrap().key);
    assert_eq!(r.core.keyed.lookup(&key).unwrap(), Some(a.id));
}
