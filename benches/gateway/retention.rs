//! Retention under load: a data dir filled with a million requests past
//! their retention, swept while submissions go on.

use std::sync::atomic::Ordering;

use asyncgate::model::{Outcome, RequestId, ResponseHead, now_ms};
use asyncgate::store::{Claim, Completion, NewRequest, Settle, SledConfig, Store, StoreConfig};

use crate::load;
use crate::servers::{Gateway, Upstream};
use crate::{BODY_1K, Row, Sizes, done_count, ms, post_load};

/// Fills a data dir with `n` requests done long ago, already past retention
/// (through the store's operations, as the gateway itself writes: each
/// step of a batch concurrently, so that the writer takes it in one round).
fn populate_expired(data: &std::path::Path, n: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let store = rt
        .block_on(Store::open(StoreConfig::Sled(SledConfig {
            path: data.to_path_buf(),
            cache_capacity: 64 << 20,
        })))
        .expect("open");
    let lane = asyncgate::crypto::credential_hash(store.salt(), Some(b"Bearer old"));
    let long_ago = now_ms() - 3 * 86_400_000;
    let mut made = 0;
    while made < n {
        let k = (n - made).min(256);
        rt.block_on(async {
            let submits = (0..k).map(|i| {
                store.submit(NewRequest {
                    id: RequestId::generate(),
                    lane,
                    method: "POST".into(),
                    target: format!("v2/old/{}.json", made + i),
                    headers: vec![("content-type".into(), b"application/json".to_vec())],
                    body: vec![b'x'; BODY_1K],
                    callback: None,
                    sealed_credential: vec![0; 40],
                    now_ms: long_ago,
                    max_pending: None,
                    idempotency: None,
                })
            });
            for r in futures_util::future::join_all(submits).await {
                r.expect("submit");
            }
            let claims = store
                .claim_batch(&vec![lane; k], long_ago)
                .await
                .expect("claim");
            let settles = claims.into_iter().filter_map(|c| match c {
                Claim::Got(rec) | Claim::Last(rec) => Some(store.settle(Settle::Complete {
                    id: rec.id,
                    claims: rec.claims,
                    done: Completion {
                        sent_ms: long_ago,
                        outcome: Outcome {
                            code: 200,
                            exec_ms: 3,
                            kept: true,
                        },
                        head: ResponseHead {
                            code: 200,
                            headers: vec![],
                            body: None,
                        },
                        body: vec![b'r'; 100],
                    },
                    now_ms: long_ago,
                    retention_ms: 86_400_000,
                })),
                _ => None,
            });
            for r in futures_util::future::join_all(settles).await {
                r.expect("complete");
            }
        });
        made += k;
    }
    store.close().expect("close");
}

pub fn sweep(
    s: &Sizes,
    upstream: &str,
    up: &Upstream,
    idle_dir: &std::path::Path,
    data: &std::path::Path,
) -> Row {
    up.refuse.store(true, Ordering::Relaxed);
    populate_expired(data, s.sweep);
    let steady = |base: &str| {
        load::run(post_load(
            format!("{base}/async_api/v2/during.json"),
            8,
            usize::MAX,
            s.load_secs,
        ))
    };
    let (gw, _) = Gateway::start(upstream, idle_dir, &[]);
    let idle = steady(&gw.base);
    drop(gw);
    let (gw, _) = Gateway::start(upstream, data, &[]);
    let busy = steady(&gw.base);
    let left = done_count(&gw.base);
    drop(gw);
    let (i99, b99) = (idle.percentile(0.99), busy.percentile(0.99));
    let ratio = b99.as_secs_f64() / i99.as_secs_f64();
    Row {
        scenario: "accept p99 while sweeping expired requests (8 connections)",
        figure: format!(
            "p99 {} with {} expired ({} still unswept at the end)",
            ms(b99),
            s.sweep,
            left
        ),
        baseline: format!("idle p99 {}", ms(i99)),
        ratio: Some(ratio),
        target: "p99 ≤ 2× idle",
        met: ratio <= 2.0,
    }
}
