//! Claims under limits that every node shares (SPEC §12): a lane's row
//! holds its pacing (`SharedLane`: the last window's sends, pauses,
//! backoff, learned `X-RateLimit-*` limits, on the database's clock), and
//! a claim locks the rows of the lanes it serves, counts their attempts in
//! flight on every node, takes what the rules allow, and records it, all
//! in the transaction that marks the requests `started`. So one credential
//! gets its limit once, however many nodes serve it.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::future::{try_join_all, try_join3};
use tokio_postgres::Row;

use super::row::{self, COLS, big, small};
use super::{PgStore, StoreError};
use crate::model::{LaneKey, RequestId, RequestRecord};
use crate::scheduler::{Feedback, Hints, PauseReason, SharedLane};
use crate::store::Claim;

/// The database's clock, in milliseconds: every node paces on this one.
pub const NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

/// How soon to look again at a lane whose row another node holds (its
/// claim commits within milliseconds), or whose attempts in flight on all
/// nodes fill its concurrency (one of them ends, on some node).
const ROW_BUSY: Duration = Duration::from_millis(20);
const SLOTS_FULL: Duration = Duration::from_millis(200);

/// How long a lane waits, and the pause that holds it (if one does).
type Wait = (Duration, Option<PauseReason>);

const PACE: &str =
    "paused_until_ms, pause_reason, refusals, outages, learned_rps, probing, sent_ms";

fn shared(r: &Row, at: usize) -> Result<SharedLane, StoreError> {
    let reason: Option<i16> = r.try_get(at + 1)?;
    let count = |v: i32| u32::try_from(v).unwrap_or(0);
    Ok(SharedLane {
        paused_until_ms: r.try_get::<_, Option<i64>>(at)?.map(|v| v.max(0) as u64),
        pause_reason: reason_of(reason),
        refusals: count(r.try_get(at + 2)?),
        outages: count(r.try_get(at + 3)?),
        learned_rps: r.try_get::<_, Option<i32>>(at + 4)?.map(count),
        probing: r.try_get(at + 5)?,
        sent_ms: r
            .try_get::<_, Vec<i64>>(at + 6)?
            .into_iter()
            .map(|v| v.max(0) as u64)
            .collect(),
    })
}

fn reason_of(code: Option<i16>) -> Option<PauseReason> {
    code.and_then(|c| PauseReason::ALL.get(usize::try_from(c).ok()?).copied())
}

/// A lane row read with `NOW_MS, PACE`: its pacing as it is, and as an
/// attempt's end leaves it.
fn learned(r: &Row, feedback: Feedback) -> Result<(SharedLane, SharedLane), StoreError> {
    let now: i64 = r.try_get(0)?;
    let was = shared(r, 1)?;
    let mut pace = was.clone();
    pace.finished(now.max(0) as u64, feedback);
    Ok((was, pace))
}

fn reason_code(r: PauseReason) -> i16 {
    PauseReason::ALL.iter().position(|&x| x == r).unwrap_or(0) as i16
}

async fn write(
    tx: &deadpool_postgres::Transaction<'_>,
    lane: &LaneKey,
    s: &SharedLane,
) -> Result<u64, tokio_postgres::Error> {
    let sql = format!("UPDATE lanes SET ({PACE}) = ($2, $3, $4, $5, $6, $7, $8) WHERE lane = $1");
    let sent: Vec<i64> = s.sent_ms.iter().map(|&v| big(v)).collect();
    tx.execute(
        &tx.prepare_cached(&sql).await?,
        &[
            &&lane[..],
            &s.paused_until_ms.map(big),
            &s.pause_reason.map(reason_code),
            &small(s.refusals),
            &small(s.outages),
            &s.learned_rps.map(small),
            &s.probing,
            &sent,
        ],
    )
    .await
}

impl PgStore {
    /// The heads of `lanes` (a lane named k times: its first k), each
    /// `started` by this node with its claim count raised, as far as the
    /// lanes' shared limits allow now; committed before it returns.
    pub async fn claim_batch(
        &self,
        lanes: &[LaneKey],
        _now_ms: u64,
    ) -> Result<Vec<Claim>, StoreError> {
        let mut wanted: Vec<(LaneKey, usize)> = Vec::new();
        for lane in lanes {
            match wanted.iter_mut().find(|(l, _)| l == lane) {
                Some((_, k)) => *k += 1,
                None => wanted.push((*lane, 1)),
            }
        }
        let (limits, node) = (self.limits, self.node.id());
        let life = self.node.clone();
        let (claimed, verdict) = self
            .with(move |mut c| async move {
                // Sorted: two claims making the same new lanes' rows take
                // them in one order, never each waiting for the other.
                let mut names: Vec<Vec<u8>> = wanted.iter().map(|(l, _)| l.to_vec()).collect();
                names.sort();
                let tx = c.transaction().await?;
                // Only lanes with no row yet: an insert meeting a row that
                // another transaction is changing would wait for it.
                let ensure = tx
                    .prepare_cached(
                        "INSERT INTO lanes (lane) SELECT l FROM unnest($1::bytea[]) AS l
                         WHERE NOT EXISTS (SELECT 1 FROM lanes WHERE lane = l)
                         ORDER BY l ON CONFLICT DO NOTHING",
                    )
                    .await?;
                let lock = tx
                    .prepare_cached(&format!(
                        "SELECT lane, {NOW_MS}, {PACE} FROM lanes WHERE lane = ANY($1)
                         FOR UPDATE SKIP LOCKED"
                    ))
                    .await?;
                // A statement of its own, after the locks: it sees every
                // claim committed before them.
                let count = tx
                    .prepare_cached(
                        "SELECT lane, count(*) FROM requests
                         WHERE lane = ANY($1) AND status = 1 GROUP BY lane",
                    )
                    .await?;
                let (_, locked, counts) = try_join3(
                    tx.execute(&ensure, &[&names]),
                    tx.query(&lock, &[&names]),
                    tx.query(&count, &[&names]),
                )
                .await?;
                let mut running: HashMap<LaneKey, usize> = HashMap::new();
                for r in &counts {
                    let n: i64 = r.try_get(1)?;
                    running.insert(row::lane(r.try_get(0)?)?, n.max(0) as usize);
                }
                // Per lane: how many its limits let go, and what held the
                // rest (a lane whose row another node holds: all of it).
                let mut verdict: HashMap<LaneKey, (usize, Option<Wait>)> = wanted
                    .iter()
                    .map(|(l, _)| (*l, (0, Some((ROW_BUSY, None)))))
                    .collect();
                let mut go: Vec<(LaneKey, SharedLane, SharedLane, usize)> = Vec::new();
                for r in &locked {
                    let lane = row::lane(r.try_get(0)?)?;
                    let now: i64 = r.try_get(1)?;
                    let was = shared(r, 2)?;
                    let mut pace = was.clone();
                    let k = wanted.iter().find(|(l, _)| *l == lane).map_or(0, |w| w.1);
                    let in_flight = running.get(&lane).copied().unwrap_or(0);
                    let taken = pace.take(now.max(0) as u64, in_flight, k, &limits);
                    let held = taken.held.map(|(after, why)| {
                        (
                            after.map_or(SLOTS_FULL, |ms| Duration::from_millis(ms.max(1))),
                            why,
                        )
                    });
                    verdict.insert(lane, (taken.go, held));
                    go.push((lane, was, pace, taken.go));
                }
                let taking: Vec<_> = go.iter().filter(|g| g.3 > 0).collect();
                // `id = ANY(ARRAY(...))`: primary-key lookups, never the
                // hash join over the whole table a join may be planned as.
                let sql = format!(
                    "WITH want AS (SELECT * FROM unnest($1::bytea[], $2::int[]) AS w(lane, k)),
                     picked AS (
                        SELECT q.id FROM want CROSS JOIN LATERAL (
                            SELECT id FROM requests r
                            WHERE r.lane = want.lane AND r.status = 0
                            ORDER BY r.seq LIMIT want.k
                            FOR UPDATE SKIP LOCKED) q
                        WHERE EXISTS (SELECT 1 FROM nodes WHERE id = $4 AND NOT dead FOR SHARE))
                     UPDATE requests SET status = 1, claims = claims + 1, started_ms = $3, node = $4
                     WHERE id = ANY(ARRAY(SELECT id FROM picked))
                     RETURNING {COLS}, body, EXISTS (SELECT 1 FROM requests n
                        WHERE n.lane = requests.lane AND n.status = 0
                        AND n.id <> ALL(ARRAY(SELECT id FROM picked)))"
                );
                let take_names: Vec<Vec<u8>> = taking.iter().map(|g| g.0.to_vec()).collect();
                let take_counts: Vec<i32> = taking.iter().map(|g| g.3 as i32).collect();
                let rows = if taking.is_empty() {
                    Vec::new()
                } else {
                    tx.query(
                        &tx.prepare_cached(&sql).await?,
                        &[
                            &take_names,
                            &take_counts,
                            &big(crate::model::now_ms()),
                            &node,
                        ],
                    )
                    .await?
                };
                let body_at = row::COLS.split(", ").count();
                let mut claimed = Vec::with_capacity(rows.len());
                let mut got: HashMap<LaneKey, usize> = HashMap::new();
                for r in &rows {
                    let body: Option<Vec<u8>> = r.try_get(body_at)?;
                    // Whether the lane holds a queued request this claim did
                    // not take: behind it, or before it and skipped (locked
                    // by a cancel that may yet roll back). The same for each
                    // row of a lane.
                    let more: bool = r.try_get(body_at + 1)?;
                    let rec = row::record(r)?;
                    *got.entry(rec.lane).or_default() += 1;
                    claimed.push((rec, body.unwrap_or_default(), more));
                }
                // Sends counted for requests that were not there are not
                // sends; a row that learned nothing is not written.
                for (lane, _, pace, n) in go.iter_mut() {
                    pace.unsend(n.saturating_sub(got.get(lane).copied().unwrap_or(0)));
                }
                let writes = go
                    .iter()
                    .filter(|(_, was, pace, _)| pace != was)
                    .map(|(lane, _, pace, _)| write(&tx, lane, pace));
                try_join_all(writes).await?;
                // In flight before the commit: this life's orphan check
                // never takes a claim that is about to be sent. If the
                // commit's answer is lost, they are not handed out, and
                // the orphan check finds them if it landed.
                let ours: Vec<(RequestId, u32)> =
                    claimed.iter().map(|(r, ..)| (r.id, r.claims)).collect();
                life.in_flight().extend(ours.iter().copied());
                if let Err(e) = tx.commit().await {
                    let mut in_flight = life.in_flight();
                    for (id, claims) in &ours {
                        if in_flight.get(id) == Some(claims) {
                            in_flight.remove(id);
                        }
                    }
                    return Err(e.into());
                }
                Ok::<_, StoreError>((claimed, verdict))
            })
            .await?;
        let mut by_lane: HashMap<LaneKey, Vec<RequestRecord>> = HashMap::new();
        // Lanes that still hold a queued request this claim did not take.
        let mut more: HashSet<LaneKey> = HashSet::new();
        let mut bodies = self.lock_claimed();
        for (rec, body, left) in claimed {
            bodies.insert(rec.id, body);
            if left {
                more.insert(rec.lane);
            }
            by_lane.entry(rec.lane).or_default().push(rec);
        }
        drop(bodies);
        let mut got: HashMap<LaneKey, usize> = HashMap::new();
        for (lane, recs) in by_lane.iter_mut() {
            recs.sort_by_key(|r| std::cmp::Reverse(r.seq));
            got.insert(*lane, recs.len());
        }
        Ok(lanes
            .iter()
            .map(|lane| {
                if let Some(recs) = by_lane.get_mut(lane)
                    && let Some(rec) = recs.pop()
                {
                    // The lane's last claimed request, and nothing left.
                    let last = recs.is_empty() && !more.contains(lane);
                    return match last {
                        true => Claim::Last(Box::new(rec)),
                        false => Claim::Got(Box::new(rec)),
                    };
                }
                match verdict.get(lane) {
                    // Allowed more than the lane held: it is empty.
                    Some((go, _)) if got.get(lane).copied().unwrap_or(0) < *go => Claim::Empty,
                    Some((_, Some((after, reason)))) => Claim::Later {
                        after: *after,
                        reason: *reason,
                    },
                    _ => Claim::Empty,
                }
            })
            .collect())
    }

    /// The lane's pause, if it lasts beyond `now_ms`.
    pub async fn lane_pause(
        &self,
        lane: LaneKey,
        now_ms: u64,
    ) -> Result<Option<(u64, PauseReason)>, StoreError> {
        self.with(move |c| async move {
            // Until when, on this node's clock.
            let sql = format!(
                "SELECT $2 + (paused_until_ms - {NOW_MS}), pause_reason FROM lanes
                 WHERE lane = $1 AND paused_until_ms > {NOW_MS}"
            );
            let Some(r) = c
                .query_opt(&c.prepare_cached(&sql).await?, &[&&lane[..], &big(now_ms)])
                .await?
            else {
                return Ok(None);
            };
            let until: i64 = r.try_get(0)?;
            let why: Option<i16> = r.try_get(1)?;
            Ok(why
                .and_then(|c| reason_of(Some(c)))
                .map(|why| (until.max(0) as u64, why)))
        })
        .await
    }

    /// What an attempt's end teaches its lane, on every node: what the
    /// upstream said of its limits (refusals, `Retry-After`, the
    /// `X-RateLimit-*` headers). Failing to reach it is this node's
    /// business (its own backoff): another node's network may be fine. The
    /// common case (an answer with no pacing headers, in a lane with no
    /// backoff) changes nothing and writes nothing.
    pub async fn paced(&self, lane: LaneKey, feedback: Feedback) -> Result<(), StoreError> {
        match feedback {
            Feedback::NotSent | Feedback::Internal | Feedback::FailedAfterSend { .. } => {
                return Ok(());
            }
            Feedback::Answered(h) if h == Hints::default() => {
                return self
                    .with(move |c| async move {
                        let sql = "UPDATE lanes SET refusals = 0, outages = 0, probing = false
                                   WHERE lane = $1 AND (refusals <> 0 OR outages <> 0 OR probing)";
                        c.execute(&c.prepare_cached(sql).await?, &[&&lane[..]])
                            .await?;
                        Ok(())
                    })
                    .await;
            }
            _ => {}
        }
        self.with(move |mut c| async move {
            // A look without a lock first: most answers repeat what the
            // lane knows (the same limit), and a lock would make claims
            // skip the lane meanwhile.
            let look = format!("SELECT {NOW_MS}, {PACE} FROM lanes WHERE lane = $1");
            let Some(r) = c
                .query_opt(&c.prepare_cached(&look).await?, &[&&lane[..]])
                .await?
            else {
                return Ok(());
            };
            let (was, pace) = learned(&r, feedback)?;
            if pace == was {
                return Ok(());
            }
            let tx = c.transaction().await?;
            let sql = format!("{look} FOR UPDATE");
            let Some(r) = tx
                .query_opt(&tx.prepare_cached(&sql).await?, &[&&lane[..]])
                .await?
            else {
                return Ok(());
            };
            let (_, pace) = learned(&r, feedback)?;
            write(&tx, &lane, &pace).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }
}
