//! SPEC §6 across nodes (§12): `kill -9` of nodes mid-load, with the crash
//! test's invariants checked from every node. A first node is killed and
//! stays dead while the load goes on (the others must settle what it had
//! started, after the heartbeat timeout); a second is killed and restarted
//! at once (its own start settles its previous life's). Each time the node
//! killed is the one sending the most upstream just then (its own
//! `/metrics`), so that the kills catch requests in flight. Seeded like the
//! crash test (`ASYNCGATE_CLUSTER_SEED=<n>` replays a run's submissions).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Cluster, busiest, client, database, finished, outcome, response, submit, views};
use crate::crash::{Rng, seed_from};
use crate::helpers::*;

const TOKENS: [&str; 3] = ["Bearer node-a", "Bearer node-b", "Bearer node-c"];
const PER_CREDENTIAL: usize = 3;
const SUBMITTERS: u64 = 4;
const NAMES: [&str; 3] = ["n0", "n1", "n2"];

#[derive(Clone, Debug)]
struct Accepted {
    id: String,
    key: String,
    method: &'static str,
    token: &'static str,
    callback: bool,
}

/// Per key, what reached the upstream: its method and credential, when
/// each arrival it let through came and how long it was held, how many it
/// refused with 429.
#[derive(Clone, Debug, Default)]
struct Arrivals {
    method: String,
    token: String,
    through: Vec<(Instant, Duration)>,
    refused: u32,
}

type Upstream = Arc<Mutex<HashMap<String, Arrivals>>>;

#[actix_web::test]
async fn three_nodes_kill_9_mid_load_loses_nothing_runs_nothing_twice() {
    let Some(db) = database("three_nodes_kill_9_mid_load") else {
        return;
    };
    let seed = seed_from("ASYNCGATE_CLUSTER_SEED");
    println!("cluster crash test seed: {seed} (ASYNCGATE_CLUSTER_SEED={seed} replays it)");
    let upstream: Upstream = Arc::default();
    let u = upstream.clone();
    let up = Fake::start_with(move |req, i| {
        let key = req.header("x-test-key").unwrap_or_default().to_string();
        let mut all = u.lock().expect("the upstream's record");
        let e = all.entry(key.clone()).or_default();
        e.method = req.method.clone();
        e.token = req.header("authorization").unwrap_or_default().to_string();
        let h = key
            .bytes()
            .fold(i as u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
        // One first arrival in a hundred refused: refusals never count
        // (and each pauses its credential, which would idle the nodes).
        if e.through.is_empty() && e.refused == 0 && h.is_multiple_of(100) {
            e.refused += 1;
            return Reply::status(429);
        }
        let held = Duration::from_millis(100 + h % 200);
        e.through.push((Instant::now(), held));
        Reply::status(200).body(key.as_bytes()).delay(held)
    })
    .await;
    let receiver = Fake::start().await;
    let callback_url = format!("{}/cb", receiver.url());
    let per_credential = PER_CREDENTIAL.to_string();
    let cluster = Cluster::new(
        db,
        &up.url(),
        &["--per-credential-concurrency", &per_credential],
    );
    let mut nodes = Vec::new();
    for name in NAMES {
        nodes.push(Some(cluster.start(name).await));
    }
    let live: Rc<RefCell<Vec<String>>> = Rc::new(RefCell::new(
        nodes.iter().flatten().map(|p| p.base.clone()).collect(),
    ));

    // Submitters spread round-robin over the live nodes until told to stop.
    let accepted: Rc<RefCell<Vec<Accepted>>> = Rc::default();
    let stop = Rc::new(Cell::new(false));
    let mut tasks = Vec::new();
    for s in 0..SUBMITTERS {
        let (live, acc, stop, cb) = (
            live.clone(),
            accepted.clone(),
            stop.clone(),
            callback_url.clone(),
        );
        let mut rng = Rng(seed ^ (s + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        tasks.push(actix_web::rt::spawn(async move {
            let client = awc::Client::builder().timeout(SECS(10)).finish();
            let mut n = 0u64;
            while !stop.get() {
                let c = rng.next();
                n += 1;
                let bases = live.borrow().clone();
                let base = &bases[(s + n) as usize % bases.len()];
                let method = match c % 4 {
                    0 => "GET",
                    1 => "PATCH",
                    _ => "POST",
                };
                let token = TOKENS[(c >> 8) as usize % TOKENS.len()];
                let callback = (c >> 16).is_multiple_of(3);
                let key = format!("s{s}k{n}");
                let more: &[(&str, &str)] = if callback {
                    &[("X-Callback-Location", cb.as_str())]
                } else {
                    &[]
                };
                let path = format!("/async_api/v2/item/{s}.json");
                if let Some(id) = submit(&client, base, method, &path, token, &key, more).await {
                    acc.borrow_mut().push(Accepted {
                        id,
                        key,
                        method,
                        token,
                        callback,
                    });
                }
                actix_web::rt::time::sleep(Duration::from_millis(20 + (c >> 24) % 40)).await;
            }
        }));
    }

    let mut kills = Vec::new();
    actix_web::rt::time::sleep(Duration::from_millis(1500)).await;
    // The busiest node dies and stays dead.
    let dead = busiest(&nodes).await;
    println!("{} killed", NAMES[dead]);
    let p = nodes[dead].take().expect("a running node");
    live.borrow_mut().retain(|b| *b != p.base);
    kills.push(Instant::now());
    p.kill9();
    actix_web::rt::time::sleep(Duration::from_millis(1500)).await;
    // The busiest of the other two dies, and its supervisor starts it again
    // at once.
    let restarted = busiest(&nodes).await;
    println!("{} killed and restarted", NAMES[restarted]);
    let p = nodes[restarted].take().expect("a running node");
    live.borrow_mut().retain(|b| *b != p.base);
    kills.push(Instant::now());
    p.kill9();
    let p = cluster.start(NAMES[restarted]).await;
    live.borrow_mut().push(p.base.clone());
    nodes[restarted] = Some(p);
    actix_web::rt::time::sleep(Duration::from_millis(1500)).await;
    stop.set(true);
    for t in tasks {
        let _ = t.await;
    }
    let accepted = accepted.borrow().clone();
    println!(
        "cluster crash test: {} accepted, {} killed, {} killed and restarted",
        accepted.len(),
        NAMES[dead],
        NAMES[restarted]
    );
    assert!(
        accepted.len() > 100,
        "too little load to prove anything: {}",
        accepted.len()
    );

    // Every accepted request ends done or unknown: the dead node's
    // `started` ones settled by the others after its heartbeat expired.
    let client = client();
    let bases: Vec<String> = live.borrow().clone();
    let by_token = |t: &str| -> Vec<String> {
        accepted
            .iter()
            .filter(|a| a.token == t)
            .map(|a| a.id.clone())
            .collect()
    };
    let drain = Instant::now();
    let deadline = drain + SECS(180);
    let mut round = 0;
    let final_views: HashMap<String, serde_json::Value> = loop {
        round += 1;
        let mut all = HashMap::new();
        for (i, t) in TOKENS.iter().enumerate() {
            let base = &bases[(round + i) % bases.len()];
            all.extend(views(&client, base, t, &by_token(t)).await);
        }
        let pending: Vec<_> = accepted
            .iter()
            .filter(|a| !all.get(&a.id).is_some_and(finished))
            .map(|a| (a, all.get(&a.id).map(|v| v["status"].clone())))
            .collect();
        if pending.is_empty() {
            println!("drained {:?} after the last submission", drain.elapsed());
            break all;
        }
        assert!(
            Instant::now() < deadline,
            "{} never finished, e.g. {:?}",
            pending.len(),
            &pending[..pending.len().min(5)]
        );
        actix_web::rt::time::sleep(Duration::from_millis(300)).await;
    };
    // ... and every node says the same.
    for base in &bases {
        for t in TOKENS {
            let here = views(&client, base, t, &by_token(t)).await;
            for id in by_token(t) {
                assert_eq!(
                    outcome(here.get(&id)),
                    outcome(final_views.get(&id)),
                    "{id} on {base}"
                );
            }
        }
    }

    let arrivals = upstream.lock().expect("the upstream's record").clone();
    let (mut done, mut unknown) = (Vec::new(), Vec::new());
    for a in &accepted {
        let v = &final_views[&a.id];
        let through = arrivals.get(&a.key).map_or(0, |e| e.through.len());
        if v["status"] == "done" {
            assert!(through >= 1, "{a:?} is done but never reached the upstream");
            done.push(a.clone());
        } else {
            assert_ne!(a.method, "GET", "a GET is never unknown: {a:?} {v}");
            // Only a kill makes one unknown here: it was sent (if at all)
            // by a node that died moments later, never by a survivor.
            for (at, _) in arrivals.get(&a.key).map_or(&[][..], |e| &e.through[..]) {
                assert!(
                    kills
                        .iter()
                        .any(|k| *at + SECS(3) >= *k && *at <= *k + SECS(1)),
                    "{a:?} is unknown but was sent nowhere near a kill: {v}"
                );
            }
            unknown.push(a.clone());
        }
    }
    // Anything not a GET reached the upstream at most once, whether its
    // 202 arrived or not.
    for (key, e) in &arrivals {
        if e.method != "GET" {
            assert!(e.through.len() <= 1, "{key} ({}) ran {:?}", e.method, e);
        }
    }
    // The per-credential limit is cluster-wide: at most that many in
    // flight at the upstream (a killed node's calls that the fake still
    // held after the kill left out: the restarted node's start freed their
    // slots at once), so at most that many started per credential on a
    // node that dies.
    for t in TOKENS {
        let most = most_in_flight(&arrivals, t, &kills);
        println!(
            "{t}: at most {most} in flight at the upstream ({} with the killed nodes' orphans)",
            up.max_in_flight(t)
        );
        assert!(most <= PER_CREDENTIAL, "{t}: {most} in flight at once");
    }
    let again = (arrivals.values())
        .filter(|e| e.method == "GET" && e.through.len() > 1)
        .count();
    assert!(
        unknown.len() + again > 0,
        "the kills caught nothing in flight (no unknown, no GET sent again): nothing proven"
    );
    let bound = kills.len() * TOKENS.len() * PER_CREDENTIAL;
    assert!(
        unknown.len() <= bound,
        "{} unknown: {unknown:?}",
        unknown.len()
    );
    for (n, a) in done.iter().enumerate() {
        let base = &bases[n % bases.len()];
        let (code, body) = response(&client, base, &a.id, a.token).await;
        assert_eq!(code, 200, "{a:?} on {base}");
        assert_eq!(body, a.key.as_bytes(), "{a:?}: its own response");
    }

    // Every callback, done and unknown alike, is delivered: those a killed
    // node had taken once its lease on them (90 s) ran out.
    let wanted: HashSet<(String, String)> = accepted
        .iter()
        .filter(|a| a.callback)
        .map(|a| {
            let status = final_views[&a.id]["status"].as_str().unwrap_or_default();
            (a.id.clone(), status.to_string())
        })
        .collect();
    let waited = Instant::now();
    let deadline = waited + SECS(180);
    loop {
        let got: HashSet<(String, String)> = receiver
            .seen()
            .iter()
            .filter_map(|s| {
                let form: HashMap<String, String> = serde_urlencoded::from_bytes(&s.body).ok()?;
                Some((
                    form.get("response_id")?.clone(),
                    form.get("status")?.clone(),
                ))
            })
            .collect();
        let missing: Vec<_> = wanted.difference(&got).collect();
        if missing.is_empty() {
            println!("callbacks: all in {:?} after the drain", waited.elapsed());
            break;
        }
        assert!(Instant::now() < deadline, "no callback for {missing:?}");
        actix_web::rt::time::sleep(Duration::from_millis(300)).await;
    }

    // The dead node comes back: it finds everything settled, changes
    // nothing and sends nothing.
    let sent = up.seen().len();
    let back = cluster.start(NAMES[dead]).await;
    actix_web::rt::time::sleep(SECS(2)).await;
    for t in TOKENS {
        let here = views(&client, &back.base, t, &by_token(t)).await;
        for id in by_token(t) {
            assert_eq!(
                outcome(here.get(&id)),
                outcome(final_views.get(&id)),
                "{id} on {} back",
                NAMES[dead]
            );
        }
    }
    assert_eq!(up.seen().len(), sent, "nothing is sent once all is settled");
    let refused: u32 = arrivals.values().map(|e| e.refused).sum();
    println!(
        "cluster crash test: seed {seed}, {} accepted, {} done, {} unknown, {refused} refused \
         with 429, {again} GETs sent again, {} callbacks checked",
        accepted.len(),
        done.len(),
        unknown.len(),
        wanted.len()
    );
}

/// The most calls of `token` the upstream held at once, leaving out those
/// a kill may have orphaned (begun before a kill, still held after it).
fn most_in_flight(arrivals: &HashMap<String, Arrivals>, token: &str, kills: &[Instant]) -> usize {
    let mut edges: Vec<(Instant, i32)> = Vec::new();
    for e in arrivals.values().filter(|e| e.token == token) {
        for &(at, held) in &e.through {
            if !kills.iter().any(|k| at <= *k && *k <= at + held) {
                // At one instant, an end sorts before a start.
                edges.extend([(at, 1), (at + held, -1)]);
            }
        }
    }
    edges.sort();
    let (mut now, mut most) = (0, 0);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}
