//! SPEC §12: what the nodes share through the database: one credential's
//! pacing and concurrency, and the wake-up of a long-poll.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Cluster, client, database, finished, submit, views};
use crate::helpers::*;

const LIMIT: usize = 10;
const PACED: &str = "Bearer paced";
const PACED_REQUESTS: usize = 100;
/// A second credential whose slow answers show the per-credential
/// concurrency (the default, 4) is cluster-wide.
const WIDE: &str = "Bearer wide";
const WIDE_REQUESTS: usize = 24;
const PER_CREDENTIAL: usize = 4;

#[actix_web::test]
async fn one_credential_is_paced_cluster_wide() {
    let Some(db) = database("one_credential_is_paced_cluster_wide") else {
        return;
    };
    // The upstream allows LIMIT arrivals per sliding second per
    // credential, counting every arrival (itself and refused ones
    // included), and says so on every answer.
    let window: Arc<Mutex<VecDeque<Instant>>> = Arc::default();
    let up = Fake::start_with(move |req, _| {
        if req.header("authorization") == Some(WIDE) {
            return Reply::ok("wide").delay(Duration::from_millis(300));
        }
        let mut w = window.lock().expect("the upstream's window");
        let now = Instant::now();
        while w.front().is_some_and(|t| now - *t >= SECS(1)) {
            w.pop_front();
        }
        w.push_back(now);
        let reply = if w.len() > LIMIT {
            Reply::status(429)
        } else {
            Reply::ok("{}")
        };
        reply
            .header("X-RateLimit-RPS-Limit", LIMIT.to_string().as_bytes())
            .delay(Duration::from_millis(5))
    })
    .await;
    let cluster = Cluster::new(db, &up.url(), &[]);
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(cluster.start(name).await);
    }
    let client = client();
    let (mut paced, mut wide) = (Vec::new(), Vec::new());
    for i in 0..PACED_REQUESTS.max(WIDE_REQUESTS) {
        let base = &nodes[i % nodes.len()].base;
        if i < PACED_REQUESTS {
            let path = format!("/async_api/v2/paced/{i}.json");
            let key = format!("p{i}");
            let id = submit(&client, base, "POST", &path, PACED, &key, &[]).await;
            paced.push(id.expect("202"));
        }
        if i < WIDE_REQUESTS {
            let path = format!("/async_api/v2/wide/{i}.json");
            let key = format!("w{i}");
            let id = submit(&client, base, "POST", &path, WIDE, &key, &[]).await;
            wide.push(id.expect("202"));
        }
    }
    let deadline = Instant::now() + SECS(120);
    for (n, (token, ids)) in [(PACED, &paced), (WIDE, &wide)].into_iter().enumerate() {
        loop {
            let v = views(&client, &nodes[n % nodes.len()].base, token, ids).await;
            if ids.iter().all(|id| v.get(id).is_some_and(finished)) {
                for id in ids {
                    assert_eq!(v[id]["status"], "done", "{token}: {}", v[id]);
                    assert_eq!(v[id]["response_http_code"], 200, "{token}: {}", v[id]);
                }
                break;
            }
            assert!(Instant::now() < deadline, "{token}: not all done");
            actix_web::rt::time::sleep(Duration::from_millis(300)).await;
        }
    }

    let mut arrivals: Vec<Instant> = up
        .seen()
        .iter()
        .filter(|s| s.header("authorization") == Some(PACED))
        .map(|s| s.at)
        .collect();
    arrivals.sort();
    let most_in_a_second = |at: &[Instant]| {
        (0..at.len())
            .map(|i| at[i..].iter().take_while(|t| **t - at[i] < SECS(1)).count())
            .max()
            .unwrap_or(0)
    };
    let refused = arrivals.len() - up.through(PACED);
    let span = *arrivals.last().expect("arrivals") - arrivals[0];
    println!(
        "cluster pacing: {} arrivals over {span:?} from 3 nodes, {refused} refused with 429, \
         at most {} in a sliding second ({} without the first {PER_CREDENTIAL}); {WIDE}: at most \
         {} in flight",
        arrivals.len(),
        most_in_a_second(&arrivals),
        most_in_a_second(&arrivals[PER_CREDENTIAL..]),
        up.max_in_flight(WIDE)
    );
    // SPEC §5: the learned limit holds "from then on", i.e. from the first
    // answer carrying it. Before any answer, only the per-credential
    // concurrency (4, cluster-wide) bounds the sends, so at most the first
    // 4 arrivals may have been sent before the limit was known; they are
    // left out of the window count. Every other sliding second holds at
    // most LIMIT. The 429 budget has no such allowance: 2% of arrivals.
    let offsets: Vec<u128> = (arrivals.iter())
        .map(|t| (*t - arrivals[0]).as_millis())
        .collect();
    assert!(
        most_in_a_second(&arrivals[PER_CREDENTIAL..]) <= LIMIT,
        "more than {LIMIT} arrivals in a sliding second; arrivals at (ms): {offsets:?}"
    );
    assert!(
        refused * 50 <= arrivals.len(),
        "{refused} of {} arrivals refused with 429",
        arrivals.len()
    );
    let most = up.max_in_flight(WIDE);
    assert!(most <= PER_CREDENTIAL, "{WIDE}: {most} in flight at once");
}

const WAKER: &str = "Bearer waker";
const ROUNDS: usize = 7;
/// How long the upstream holds each woken request's answer.
const HOLD: Duration = Duration::from_secs(1);

/// Node A runs with `--concurrency 1` (per node, SPEC §12) and its one
/// slot is taken by a request the upstream holds for two minutes, sent
/// while A ran alone: A's dispatcher can take nothing else. So every
/// other request is run and finished by B, and a long-poll held on A can
/// only learn of the finish from B, through the database. Only the wake
/// (LISTEN/NOTIFY) answers within milliseconds: a periodic re-read (every
/// 2 s, say) would answer a random 0-2 s after the finish, so over seven
/// rounds the median delay after the upstream's answer must stay under
/// 400 ms (a 2 s poll alone passes that about 3% of the time). Every
/// round's delay is printed.
#[actix_web::test]
async fn a_long_poll_on_one_node_wakes_when_another_finishes() {
    let Some(db) = database("a_long_poll_on_one_node_wakes_when_another_finishes") else {
        return;
    };
    let up = Fake::start_with(|req, _| {
        if req.uri.contains("blocker") {
            Reply::ok("blocker").delay(SECS(120))
        } else {
            Reply::ok("woken").delay(HOLD)
        }
    })
    .await;
    let cluster = Cluster::new(db, &up.url(), &[]);
    let client = client();
    let a = cluster.start_with("a", &["--concurrency", "1"]).await;
    let path = "/async_api/v2/blocker.json";
    submit(
        &client,
        &a.base,
        "POST",
        path,
        "Bearer blocker",
        "blocker",
        &[],
    )
    .await
    .expect("202");
    up.wait_for(1, SECS(30)).await;
    let b = cluster.start("b").await;

    let mut lags = Vec::new();
    for round in 0..ROUNDS {
        let path = format!("/async_api/v2/wake/{round}.json");
        let key = format!("w{round}");
        let id = submit(&client, &b.base, "POST", &path, WAKER, &key, &[])
            .await
            .expect("202");
        let asked = Instant::now();
        let mut res = client
            .get(format!("{}/async_api/v2/requests/{id}.json", a.base))
            .insert_header(("Authorization", WAKER))
            .insert_header(("Prefer", "wait=30"))
            .send()
            .await
            .expect("A answers");
        let answered = Instant::now();
        let applied = res.headers().get("preference-applied").cloned();
        let v: serde_json::Value = res.json().await.expect("a status view");
        assert_eq!(res.status().as_u16(), 303, "round {round}: {v}");
        assert_eq!(v["status"], "done", "round {round}: {v}");
        assert_eq!(
            applied.as_ref().map(|h| h.as_bytes()),
            Some(&b"wait=30"[..])
        );
        let upstream_path = format!("/api/v2/wake/{round}.json");
        let sent: Vec<Seen> = (up.seen().into_iter())
            .filter(|s| s.uri == upstream_path)
            .collect();
        assert_eq!(sent.len(), 1, "round {round}: sent once");
        let upstream_answered = sent[0].at + HOLD;
        assert!(
            upstream_answered > asked,
            "round {round}: the long-poll was not held"
        );
        assert!(
            answered - asked < SECS(20),
            "round {round}: held to the end"
        );
        lags.push(answered.saturating_duration_since(upstream_answered));
    }
    println!("cross-node wake-ups, after the upstream's answer: {lags:?}");
    lags.sort();
    let median = lags[ROUNDS / 2];
    assert!(
        median < Duration::from_millis(400),
        "A's long-poll answered {median:?} (median) after B's finish: {lags:?}"
    );
    assert_eq!(
        up.seen().len(),
        ROUNDS + 1,
        "A took nothing but its blocker"
    );
}
