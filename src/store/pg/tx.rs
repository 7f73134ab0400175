//! The PostgreSQL store's changes inside their transactions: a
//! submission, a settle (fenced on its claim), a callback event. `ops`
//! opens, commits and answers.

use deadpool_postgres::{GenericClient, Transaction};

use super::StoreError;
use super::row::{self, COLS, big, small};
use crate::model::{CallbackState, RequestId, RequestRecord, ResponseHead, Status};
use crate::store::{NewRequest, Settle, Submitted, codec};

/// The two-key advisory lock of a lane (a key space of its own, apart
/// from the one-key locks of migrations, sweeps and takeovers).
fn lane_lock(lane: &crate::model::LaneKey) -> (i32, i32) {
    let word = |i: usize| i32::from_be_bytes([lane[i], lane[i + 1], lane[i + 2], lane[i + 3]]);
    (word(0), word(4))
}

pub fn settled_claims(op: &Settle) -> u32 {
    match op {
        Settle::Requeue { claims, .. }
        | Settle::Complete { claims, .. }
        | Settle::Unknown { claims, .. } => *claims,
    }
}

pub fn settled_id(op: &Settle) -> RequestId {
    match op {
        Settle::Requeue { id, .. } | Settle::Complete { id, .. } | Settle::Unknown { id, .. } => {
            *id
        }
    }
}

/// The submission inside its transaction: `Ok(Err(_))` for a refusal
/// (nothing written), `Err(_)` for the database's error (a unique
/// violation: a concurrent submission with the same key won; retry).
pub async fn insert(
    tx: &Transaction<'_>,
    new: &NewRequest,
    fixed: &[u8],
) -> Result<Result<Submitted, StoreError>, tokio_postgres::Error> {
    let lane = &new.lane[..];
    if let Some(idem) = new.idempotency {
        // Read, not locked: a lock on a queued request would make a claim
        // skip it (SKIP LOCKED). The unique index decides races.
        let sql = format!("SELECT {COLS} FROM requests WHERE lane = $1 AND idem_key = $2");
        if let Some(r) = tx
            .query_opt(&tx.prepare_cached(&sql).await?, &[&lane, &&idem.key[..]])
            .await?
        {
            let first = match row::record(&r) {
                Ok(rec) => rec,
                Err(e) => return Ok(Err(e)),
            };
            if !first.is_expired(new.now_ms) {
                return Ok(
                    if first.idempotency.map(|i| i.fingerprint) == Some(idem.fingerprint) {
                        Ok(Submitted::Again(first))
                    } else {
                        Err(StoreError::IdempotencyReused)
                    },
                );
            }
            // Past its retention (so finished: never a claim's row): the
            // key is free again.
            tx.execute(
                &tx.prepare_cached(
                    "UPDATE requests SET idem_key = NULL WHERE id = $1 AND expires_ms <= $2",
                )
                .await?,
                &[&&first.id.0[..], &big(new.now_ms)],
            )
            .await?;
        }
    }
    if let Some(cap) = new.max_pending {
        // A lock of the lane's own serializes capped submissions to it (not
        // the lane's row, which claims take: a busy submitter would make
        // them skip its lane).
        let (hi, lo) = lane_lock(&new.lane);
        tx.execute(
            &tx.prepare_cached("SELECT pg_advisory_xact_lock($1, $2)")
                .await?,
            &[&hi, &lo],
        )
        .await?;
        let n: i64 = tx
            .query_one(
                &tx.prepare_cached(super::reads::PENDING_UP_TO).await?,
                &[&lane, &big(cap)],
            )
            .await?
            .get(0);
        if n.max(0) as u64 >= cap {
            return Ok(Err(StoreError::LaneFull(cap)));
        }
    }
    Ok(insert_row(tx, new, fixed).await?.map(Submitted::New))
}

/// The request's row, at its lane's tail. Alone (no key, no cap) it is a
/// whole submission: one statement, committed by itself, one round trip.
pub async fn insert_row<C: GenericClient>(
    c: &C,
    new: &NewRequest,
    fixed: &[u8],
) -> Result<Result<RequestRecord, StoreError>, tokio_postgres::Error> {
    let idem_key = new.idempotency.map(|i| i.key.to_vec());
    let body = (!new.body.is_empty()).then_some(new.body.as_slice());
    let sql = format!(
        "INSERT INTO requests (id, lane, seq, status, created_ms, idem_key, sealed, request, body)
         VALUES ($1, $2, nextval('request_seq'), 0, $3, $4, $5, $6, $7)
         RETURNING {COLS}"
    );
    let r = c
        .query_one(
            &c.prepare_cached(&sql).await?,
            &[
                &&new.id.0[..],
                &&new.lane[..],
                &big(new.now_ms),
                &idem_key,
                &new.sealed_credential,
                &fixed,
                &body,
            ],
        )
        .await?;
    Ok(row::record(&r))
}

/// One settle inside a transaction, fenced on `started` under its claim.
pub async fn settle_in(tx: &Transaction<'_>, op: &Settle) -> Result<bool, StoreError> {
    let id = settled_id(op);
    let fenced = |claims: u32| {
        let sql = format!(
            "SELECT {COLS} FROM requests WHERE id = $1 AND status = 1 AND claims = $2 FOR UPDATE"
        );
        async move {
            tx.query_opt(
                &tx.prepare_cached(&sql).await?,
                &[&&id.0[..], &small(claims)],
            )
            .await
        }
    };
    match *op {
        Settle::Requeue { claims, sent, .. } => {
            // Its `seq` is kept: back to its place at the head.
            let sql = "UPDATE requests SET status = 0, started_ms = NULL, attempts = attempts + $3
                       WHERE id = $1 AND status = 1 AND claims = $2";
            let n = tx
                .execute(
                    &tx.prepare_cached(sql).await?,
                    &[&&id.0[..], &small(claims), &i32::from(sent)],
                )
                .await?;
            Ok(n > 0)
        }
        Settle::Complete {
            claims,
            ref done,
            now_ms,
            retention_ms,
            ..
        } => {
            let Some(r) = fenced(claims).await? else {
                return Ok(false);
            };
            let rec = row::record(&r)?;
            let head = codec::encode(&ResponseHead {
                body: None,
                ..done.head.clone()
            })?;
            let body = (!done.body.is_empty()).then_some(done.body.as_slice());
            let state = call_back(tx, &rec, Status::Done, now_ms).await?;
            let sql = "UPDATE requests SET status = 2, started_ms = $2, finished_ms = $3,
                    expires_ms = $4, sealed = ''::bytea, body = NULL, attempts = attempts + 1,
                    outcome = $5, response_head = $6, response_body = $7, callback_state = $8
                 WHERE id = $1";
            tx.execute(
                &tx.prepare_cached(sql).await?,
                &[
                    &&id.0[..],
                    &big(done.sent_ms),
                    &big(now_ms),
                    &big(now_ms.saturating_add(retention_ms)),
                    &codec::encode(&done.outcome)?,
                    &head,
                    &body,
                    &state,
                ],
            )
            .await?;
            Ok(true)
        }
        Settle::Unknown {
            claims,
            now_ms,
            keep_ms,
            ..
        } => {
            let Some(r) = fenced(claims).await? else {
                return Ok(false);
            };
            let rec = row::record(&r)?;
            let state = call_back(tx, &rec, Status::Unknown, now_ms).await?;
            let sql = "UPDATE requests SET status = 3, finished_ms = $2, expires_ms = $3,
                    attempts = attempts + 1, callback_state = $4
                 WHERE id = $1";
            tx.execute(
                &tx.prepare_cached(sql).await?,
                &[
                    &&id.0[..],
                    &big(now_ms),
                    &big(now_ms.saturating_add(keep_ms)),
                    &state,
                ],
            )
            .await?;
            Ok(true)
        }
    }
}

/// A new callback event for `rec` (if it has a callback URL), due now;
/// returns the record's new view of its callback (encoded), or the old.
async fn call_back(
    tx: &Transaction<'_>,
    rec: &RequestRecord,
    status: Status,
    now_ms: u64,
) -> Result<Option<Vec<u8>>, StoreError> {
    if rec.callback.is_none() {
        return rec.callback_state.map(|s| codec::encode(&s)).transpose();
    }
    let event = rec.callback_state.map_or(0, |s| s.event) + 1;
    schedule(tx, now_ms, &rec.id, event, status, 0).await?;
    let state = CallbackState::pending(event, status, now_ms);
    Ok(Some(codec::encode(&state)?))
}

pub async fn schedule(
    tx: &Transaction<'_>,
    due_ms: u64,
    id: &RequestId,
    event: u32,
    status: Status,
    attempts: u32,
) -> Result<(), StoreError> {
    tx.execute(
        &tx.prepare_cached("INSERT INTO callbacks (due_ms, id, event, status, attempts) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (due_ms, id) DO UPDATE
         SET event = excluded.event, status = excluded.status, attempts = excluded.attempts").await?,
        &[
            &big(due_ms),
            &&id.0[..],
            &small(event),
            &row::code(status),
            &small(attempts),
        ],
    )
    .await?;
    Ok(())
}
