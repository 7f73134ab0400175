//! The PostgreSQL store's changes: one transaction each, committed before
//! it returns (what runs inside is `tx`'s); the waiters of what one
//! finished are woken right after its commit.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::error::SqlState;

use super::notify::Note;
use super::row::{self, COLS, Fixed, big};
use super::tx::{insert, insert_row, schedule, settle_in, settled_claims, settled_id};
use super::{PgStore, StoreError};
use crate::model::{CallbackState, RequestId, RequestRecord, Status};
use crate::store::{CallbackEntry, NewRequest, Settle, Submitted, codec};

/// Attempts of a submission that met a concurrent one with its key.
const KEY_RACES: usize = 3;

/// Held by the node sweeping retention this round.
const SWEEP_LOCK: i64 = 0x6173_796e_6367_0004;

impl PgStore {
    /// Stores a new request at its lane's tail. Its `Idempotency-Key` is
    /// unique per lane in the schema: of two concurrent submissions with
    /// one key, the second waits for the first and answers with it.
    pub async fn submit(&self, new: NewRequest) -> Result<Submitted, StoreError> {
        if new.sealed_credential.len() > super::super::MAX_VALUE {
            return Err(StoreError::TooLarge(new.sealed_credential.len()));
        }
        let fixed = codec::encode(&Fixed {
            method: new.method.clone(),
            target: new.target.clone(),
            headers: new.headers.clone(),
            callback: new.callback.clone(),
            idempotency: new.idempotency,
        })?;
        if fixed.len() + new.sealed_credential.len() > super::super::MAX_VALUE {
            return Err(StoreError::TooLarge(
                fixed.len() + new.sealed_credential.len(),
            ));
        }
        let notes = self.notes.clone();
        if new.idempotency.is_none() && new.max_pending.is_none() {
            // Nothing to look up first: the insert alone, committed by
            // itself (autocommit), is the whole submission.
            return self
                .with(move |c| async move {
                    let rec = insert_row(&c, &new, &fixed).await??;
                    notes.send(Note::Queued(rec.lane));
                    Ok(Submitted::New(rec))
                })
                .await;
        }
        self.with(move |mut c| async move {
            for _ in 0..KEY_RACES {
                let tx = c.transaction().await?;
                match insert(&tx, &new, &fixed).await {
                    Ok(Ok(done)) => {
                        tx.commit().await?;
                        if let Submitted::New(rec) = &done {
                            notes.send(Note::Queued(rec.lane));
                        }
                        return Ok(done);
                    }
                    Ok(Err(refused)) => return Err(refused),
                    Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            Err(StoreError::Unavailable(
                "the Idempotency-Key was contended too long".into(),
            ))
        })
        .await
    }

    /// Settles one attempt; false if its claim was stale. A settle is
    /// fenced (status and claim count), so trying one again after an
    /// error whose outcome is unknown (a dropped connection during the
    /// commit) is safe: if the first try committed, the next changes
    /// nothing. So a database that fails for a while leaves no request
    /// `started`: this tries until it commits, backing off up to 5 s, and
    /// gives up only when the store has failed for good.
    pub async fn settle(&self, op: Settle) -> Result<bool, StoreError> {
        // An attempt that ended before it read its body (a credential that
        // would not unseal) leaves nothing behind.
        self.lock_claimed().remove(&settled_id(&op));
        let op = Arc::new(op);
        let mut pause = Duration::from_millis(100);
        let mut retried = false;
        loop {
            let (once, waiters, notes) = (op.clone(), self.waiters.clone(), self.notes.clone());
            let tried = self
                .with(move |mut c| async move {
                    let tx = c.transaction().await?;
                    let changed = settle_in(&tx, &once).await?;
                    tx.commit().await?;
                    if changed {
                        waiters.wake([settled_id(&once)]);
                        if !matches!(*once, Settle::Requeue { .. }) {
                            notes.send(Note::Finished(settled_id(&once)));
                        }
                    }
                    Ok(changed)
                })
                .await;
            match tried {
                Ok(changed) => {
                    let (id, claims) = (settled_id(&op), settled_claims(&op));
                    let mut in_flight = self.node.in_flight();
                    if in_flight.get(&id) == Some(&claims) {
                        in_flight.remove(&id);
                    }
                    // A retry that changed nothing may follow a first try
                    // whose commit landed unanswered: wake as if it did.
                    if retried && !changed {
                        self.waiters.wake([id]);
                        if !matches!(*op, Settle::Requeue { .. }) {
                            self.notes.send(Note::Finished(id));
                        }
                    }
                    return Ok(changed || retried);
                }
                // Only the database's failures may pass (a dropped
                // connection, a failover, a timeout); a row that cannot be
                // read, or a store that failed for good, will not mend.
                Err(
                    e
                    @ (StoreError::Postgres(_) | StoreError::Unavailable(_) | StoreError::NoSpace),
                ) if self.fatal.failed().is_none() => {
                    retried = true;
                    log::warn!(
                        "settling request {} failed ({e}); trying again in {pause:?}",
                        settled_id(&op)
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                // Kept in flight: the life's own orphan check must not
                // requeue what may have been sent.
                Err(e) => return Err(e),
            }
        }
    }

    /// An operator's requeue of an `unknown` request, to its lane's tail.
    pub async fn requeue_unknown(
        &self,
        id: RequestId,
    ) -> Result<Option<RequestRecord>, StoreError> {
        let notes = self.notes.clone();
        self.with(move |c| async move {
            let sql = format!(
                "UPDATE requests SET status = 0, seq = nextval('request_seq'),
                    started_ms = NULL, finished_ms = NULL, expires_ms = NULL
                 WHERE id = $1 AND status = 3 RETURNING {COLS}"
            );
            let rec = c
                .query_opt(&c.prepare_cached(&sql).await?, &[&&id.0[..]])
                .await?
                .as_ref()
                .map(row::record)
                .transpose()?;
            if let Some(rec) = &rec {
                notes.send(Note::Queued(rec.lane));
            }
            Ok(rec)
        })
        .await
    }

    /// Deletes a `done` or `unknown` request.
    pub async fn delete(&self, id: RequestId) -> Result<bool, StoreError> {
        let (waiters, notes) = (self.waiters.clone(), self.notes.clone());
        self.with(move |c| async move {
            let sql = "DELETE FROM requests WHERE id = $1 AND status IN (2, 3)";
            let gone = c
                .execute(&c.prepare_cached(sql).await?, &[&&id.0[..]])
                .await?
                > 0;
            if gone {
                waiters.wake([id]);
                notes.send(Note::Finished(id));
            }
            Ok(gone)
        })
        .await
    }

    /// The owner's cancel. A claim holds the row it takes until it
    /// commits, so a cancel either removes a request no claim has (never
    /// sent then) or finds it `started` (`InFlight`).
    pub async fn cancel(&self, id: RequestId) -> Result<bool, StoreError> {
        let (waiters, notes) = (self.waiters.clone(), self.notes.clone());
        self.with(move |mut c| async move {
            let tx = c.transaction().await?;
            let sql = "SELECT status FROM requests WHERE id = $1 FOR UPDATE";
            let Some(r) = tx
                .query_opt(&tx.prepare_cached(sql).await?, &[&&id.0[..]])
                .await?
            else {
                return Ok(false);
            };
            if row::status(r.try_get(0)?)? == Status::Started {
                return Err(StoreError::InFlight);
            }
            tx.execute(
                &tx.prepare_cached("DELETE FROM requests WHERE id = $1")
                    .await?,
                &[&&id.0[..]],
            )
            .await?;
            tx.commit().await?;
            waiters.wake([id]);
            notes.send(Note::Finished(id));
            Ok(true)
        })
        .await
    }

    /// Deletes up to `limit` requests past retention, oldest first. One
    /// node sweeps at a time (the others find the lock taken and wait for
    /// their next round), and rows being deleted otherwise are skipped.
    pub async fn expire(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let (waiters, notes) = (self.waiters.clone(), self.notes.clone());
        self.with(move |mut c| async move {
            let tx = c.transaction().await?;
            let ours: bool = tx
                .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&SWEEP_LOCK])
                .await?
                .get(0);
            if !ours {
                return Ok(0);
            }
            let sql = "DELETE FROM requests WHERE id IN (
                    SELECT id FROM requests
                    WHERE expires_ms <= $1 AND status IN (2, 3)
                    ORDER BY expires_ms LIMIT $2 FOR UPDATE SKIP LOCKED)
                RETURNING id";
            let ids = tx
                .query(
                    &tx.prepare_cached(sql).await?,
                    &[&big(now_ms), &big(limit as u64)],
                )
                .await?
                .iter()
                .map(|r| row::id(r.try_get(0)?))
                .collect::<Result<Vec<_>, _>>()?;
            tx.commit().await?;
            let n = ids.len();
            notes.send_all(ids.iter().map(|&id| Note::Finished(id)));
            waiters.wake(ids);
            Ok(n)
        })
        .await
    }

    pub async fn callback_finished(
        &self,
        due_ms: u64,
        id: RequestId,
        code: Option<u16>,
    ) -> Result<(), StoreError> {
        self.callback_change(due_ms, id, None, move |_, st| st.finished(code))
            .await
    }

    pub async fn callback_retry(
        &self,
        due_ms: u64,
        id: RequestId,
        next_ms: u64,
        code: Option<u16>,
    ) -> Result<(), StoreError> {
        self.callback_change(due_ms, id, Some(next_ms), move |entry, st| {
            st.retrying(entry.attempts + 1, code, next_ms)
        })
        .await
    }

    pub async fn callback_gave_up(
        &self,
        due_ms: u64,
        id: RequestId,
        last: Option<Option<u16>>,
    ) -> Result<(), StoreError> {
        self.callback_change(due_ms, id, None, move |entry, st| {
            st.gave_up(entry.attempts, last)
        })
        .await
    }

    /// Takes the callback entry `(due_ms, id)` out (or moves it to
    /// `next_ms`, one attempt more), and updates the record's view of its
    /// callback if the entry is its latest event.
    async fn callback_change(
        &self,
        due_ms: u64,
        id: RequestId,
        next_ms: Option<u64>,
        f: impl FnOnce(CallbackEntry, &mut CallbackState) + Send + 'static,
    ) -> Result<(), StoreError> {
        // Only this life's lease: one that ran out (another node delivers
        // the event now) changes nothing.
        let life = self.node.id();
        self.with(move |mut c| async move {
            let tx = c.transaction().await?;
            let taken = tx
                .query_opt(
                    &tx.prepare_cached(
                        "DELETE FROM callbacks WHERE due_ms = $1 AND id = $2 AND leased_by = $3
                     RETURNING event, status, attempts",
                    )
                    .await?,
                    &[&big(due_ms), &&id.0[..], &life],
                )
                .await?;
            let Some(r) = taken else {
                return Ok(());
            };
            let entry = CallbackEntry {
                event: r.try_get::<_, i32>(0)?.max(0) as u32,
                status: row::status(r.try_get(1)?)?,
                attempts: r.try_get::<_, i32>(2)?.max(0) as u32,
            };
            if let Some(next) = next_ms {
                schedule(
                    &tx,
                    next,
                    &id,
                    entry.event,
                    entry.status,
                    entry.attempts + 1,
                )
                .await?;
            }
            // Read, not locked (a requeued request may be queued: a lock
            // would make a claim skip it); written only if unchanged, so a
            // newer event's view, made meanwhile, is never overwritten.
            let state = tx
                .query_opt(
                    &tx.prepare_cached("SELECT callback_state FROM requests WHERE id = $1")
                        .await?,
                    &[&&id.0[..]],
                )
                .await?
                .map(|r| r.try_get::<_, Option<Vec<u8>>>(0))
                .transpose()?
                .flatten();
            if let Some(bytes) = state {
                let mut st: CallbackState = codec::decode(&bytes)?;
                if st.event == entry.event {
                    f(entry, &mut st);
                    tx.execute(
                        &tx.prepare_cached(
                            "UPDATE requests SET callback_state = $2
                         WHERE id = $1 AND callback_state = $3",
                        )
                        .await?,
                        &[&&id.0[..], &codec::encode(&st)?, &bytes],
                    )
                    .await?;
                }
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }
}
