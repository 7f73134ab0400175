//! SPEC §12: a node presumed dead (stopped with SIGSTOP past the heartbeat
//! timeout) while it has requests in flight. The others settle them; when
//! it resumes, with the upstream's answers waiting in its sockets, it must
//! find itself fenced: it exits non-zero, sends nothing it had claimed, and
//! its late settles change nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Cluster, HEARTBEAT_TIMEOUT, client, database, outcome, response, submit, views};
use crate::helpers::*;

const POSTS: usize = 4; // the default --per-credential-concurrency: all in flight
const GETS: usize = 2;
const POSTER: &str = "Bearer fence-post";
const GETTER: &str = "Bearer fence-get";
const OTHER: &str = "Bearer fence-other";
/// How long the upstream holds the first arrival of each key.
const HELD: Duration = Duration::from_secs(10);

#[actix_web::test]
async fn a_node_stopped_past_the_heartbeat_timeout_is_fenced() {
    let Some(db) = database("a_node_stopped_past_the_heartbeat_timeout") else {
        return;
    };
    // Per key, its arrivals; the first is held HELD, later ones answer at
    // once; the body names the arrival ("g0#2": g0's second).
    let arrivals: Arc<Mutex<HashMap<String, Vec<Instant>>>> = Arc::default();
    let a = arrivals.clone();
    let up = Fake::start_with(move |req, _| {
        let key = req.header("x-test-key").unwrap_or_default().to_string();
        let mut all = a.lock().expect("the upstream's record");
        let times = all.entry(key.clone()).or_default();
        times.push(Instant::now());
        let reply = Reply::ok(&format!("{key}#{}", times.len()));
        if times.len() == 1 && key != "fresh" {
            reply.delay(HELD)
        } else {
            reply
        }
    })
    .await;
    let cluster = Cluster::new(db, &up.url(), &[]);
    let client = client();

    // C alone first, so that what it sends is its own.
    let c = cluster.start("c").await;
    // C's sessions name its life (the only one yet).
    let c_session = crate::backend::psql(&cluster.db, "SELECT session FROM nodes");
    let c_sessions = || {
        let sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = ";
        crate::backend::psql(&cluster.db, &format!("{sql}'{c_session}'"))
    };
    assert_ne!(c_sessions(), "0", "C is connected");
    let mut posts = Vec::new();
    for i in 0..POSTS {
        let path = format!("/async_api/v2/pay/{i}.json");
        let key = format!("p{i}");
        posts.push(submit(&client, &c.base, "POST", &path, POSTER, &key, &[]).await);
    }
    let mut gets = Vec::new();
    for i in 0..GETS {
        let path = format!("/async_api/v2/read/{i}.json");
        let key = format!("g{i}");
        gets.push(submit(&client, &c.base, "GET", &path, GETTER, &key, &[]).await);
    }
    let posts: Vec<String> = posts.into_iter().map(|i| i.expect("202")).collect();
    let gets: Vec<String> = gets.into_iter().map(|i| i.expect("202")).collect();
    let seen = up.wait_for(POSTS + GETS, SECS(30)).await;
    let first_answer = seen[0].at + HELD;
    let last_answer = seen[POSTS + GETS - 1].at + HELD;
    let node_a = cluster.start("a").await;
    let node_b = cluster.start("b").await;
    // Nodes that start leave a live node's requests alone.
    let v = views(&client, &node_a.base, POSTER, &posts).await;
    for id in &posts {
        assert_eq!(v[id]["status"], "started", "{id} before the stop: {v:?}");
    }
    assert!(
        Instant::now() + SECS(2) < first_answer,
        "the machine is too slow for this test: C's answers would come before it is stopped"
    );
    c.signal("-STOP");
    let stopped = Instant::now();

    // The cluster goes on without C, and settles what C had started: its
    // POSTs unknown, its GETs run again ("#2") and done.
    let fresh = submit(
        &client,
        &node_b.base,
        "POST",
        "/async_api/v2/fresh.json",
        OTHER,
        "fresh",
        &[],
    )
    .await
    .expect("202 from b while c is stopped");
    let mut settled_after: HashMap<String, Duration> = HashMap::new();
    let deadline = Instant::now() + SECS(60);
    let settled: HashMap<String, Value> = loop {
        let mut all = views(&client, &node_a.base, POSTER, &posts).await;
        all.extend(views(&client, &node_b.base, GETTER, &gets).await);
        all.extend(views(&client, &node_a.base, OTHER, std::slice::from_ref(&fresh)).await);
        for id in &posts {
            if all[id]["status"] == "unknown" {
                settled_after.entry(id.clone()).or_insert(stopped.elapsed());
            }
        }
        let done = |ids: &[String]| ids.iter().all(|id| all[id]["status"] == "done");
        if settled_after.len() == POSTS && done(&gets) && done(std::slice::from_ref(&fresh)) {
            break all;
        }
        assert!(
            Instant::now() < deadline,
            "C's requests were never settled: {all:?}\nbusy sessions (pid|state|wait|event|in transaction for|query):\n{}",
            super::sessions(&cluster.db)
        );
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    };
    println!("fencing: C's POSTs settled {settled_after:?} after it stopped");
    // The takeover ended the stopped node's sessions: one stopped inside a
    // transaction would hold its locks until then.
    assert_eq!(c_sessions(), "0", "C's sessions outlive its takeover");
    for (id, after) in &settled_after {
        // C's last heartbeat was at most a quarter of the timeout old.
        assert!(
            *after >= HEARTBEAT_TIMEOUT - HEARTBEAT_TIMEOUT / 4 - Duration::from_millis(250),
            "{id} settled {after:?} after C stopped: before its heartbeat expired"
        );
    }
    for (n, id) in gets.iter().enumerate() {
        let (code, body) = response(&client, &node_a.base, id, GETTER).await;
        assert_eq!((code, body), (200, format!("g{n}#2").into_bytes()), "{id}");
    }

    // C's answers are in its sockets now; it wakes up to them.
    while Instant::now() < last_answer + Duration::from_millis(500) {
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
    let sent = up.seen().len();
    let mut c = c;
    c.signal("-CONT");
    let resumed = Instant::now();
    let mut exited = None;
    // Until 3 s after C's exit, nothing settled changes, on A or on B.
    while exited.is_none_or(|t: Instant| t.elapsed() < SECS(3)) {
        if exited.is_none()
            && let Some(status) = c.child.try_wait().expect("C's status")
        {
            assert!(!status.success(), "C, presumed dead, exited {status}");
            println!(
                "fencing: C exited ({status}) {:?} after SIGCONT",
                resumed.elapsed()
            );
            exited = Some(Instant::now());
        }
        assert!(
            resumed.elapsed() < SECS(30),
            "C still runs {:?} after SIGCONT though presumed dead",
            resumed.elapsed()
        );
        for node in [&node_a, &node_b] {
            let mut now = views(&client, &node.base, POSTER, &posts).await;
            now.extend(views(&client, &node.base, GETTER, &gets).await);
            for id in posts.iter().chain(&gets) {
                assert_eq!(
                    outcome(now.get(id)),
                    outcome(settled.get(id)),
                    "{id} on {} changed after C resumed",
                    node.base
                );
            }
        }
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
    for (n, id) in gets.iter().enumerate() {
        let (code, body) = response(&client, &node_b.base, id, GETTER).await;
        assert_eq!(
            (code, body),
            (200, format!("g{n}#2").into_bytes()),
            "{id}: C's late answer is not stored"
        );
    }
    assert_eq!(up.seen().len(), sent, "C sent something after it resumed");
    let arrivals = arrivals.lock().expect("the upstream's record").clone();
    for i in 0..POSTS {
        assert_eq!(arrivals[&format!("p{i}")].len(), 1, "p{i} ran once");
    }
    for i in 0..GETS {
        assert_eq!(
            arrivals[&format!("g{i}")].len(),
            2,
            "g{i}: C's, then one more"
        );
    }

    // C comes back (the same data dir): it changes nothing, sends nothing.
    let c = cluster.start("c").await;
    actix_web::rt::time::sleep(SECS(2)).await;
    let mut now = views(&client, &c.base, POSTER, &posts).await;
    now.extend(views(&client, &c.base, GETTER, &gets).await);
    for id in posts.iter().chain(&gets) {
        assert_eq!(outcome(now.get(id)), outcome(settled.get(id)), "{id} on C");
    }
    assert_eq!(up.seen().len(), sent, "C sent something after its restart");
}
