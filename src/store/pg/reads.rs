//! The PostgreSQL store's reads: one query each, on an index.

use super::pace::NOW_MS;
use super::row::{self, COLS, big};
use super::{PgStore, StoreError};
use crate::model::{Idempotency, LaneKey, RequestId, RequestRecord, ResponseHead, Status};
use crate::store::{CallbackEntry, codec};

/// A lane's queued requests, counted up to `$2` (the cap): a capped
/// submission costs the cap at most, never the whole backlog.
pub const PENDING_UP_TO: &str = "SELECT count(*) FROM
    (SELECT 1 FROM requests WHERE lane = $1 AND status = 0 LIMIT $2) AS queued";

impl PgStore {
    pub async fn get(&self, id: RequestId) -> Result<Option<RequestRecord>, StoreError> {
        self.with(move |c| async move {
            let sql = format!("SELECT {COLS} FROM requests WHERE id = $1");
            c.query_opt(&c.prepare_cached(&sql).await?, &[&&id.0[..]])
                .await?
                .as_ref()
                .map(row::record)
                .transpose()
        })
        .await
    }

    /// Handed over with its claim (no round trip), else read.
    pub async fn request_body(&self, id: RequestId) -> Result<Vec<u8>, StoreError> {
        if let Some(body) = self.lock_claimed().remove(&id) {
            return Ok(body);
        }
        self.with(move |c| async move {
            let row = c
                .query_opt(
                    &c.prepare_cached("SELECT body FROM requests WHERE id = $1")
                        .await?,
                    &[&&id.0[..]],
                )
                .await?;
            Ok(row
                .map(|r| r.try_get::<_, Option<Vec<u8>>>(0))
                .transpose()?
                .flatten()
                .unwrap_or_default())
        })
        .await
    }

    /// A queued request's sealed credential, else a started or unknown
    /// one's (the done ones have none left).
    pub async fn first_sealed(&self) -> Result<Option<(RequestId, Vec<u8>)>, StoreError> {
        self.with(move |c| async move {
            for status in ["status = 0", "status IN (1, 3)"] {
                let sql = format!(
                    "SELECT id, sealed FROM requests WHERE {status} AND sealed <> ''::bytea LIMIT 1"
                );
                if let Some(r) = c.query_opt(&c.prepare_cached(&sql).await?, &[]).await? {
                    return Ok(Some((row::id(r.try_get(0)?)?, r.try_get(1)?)));
                }
            }
            Ok(None)
        })
        .await
    }

    pub async fn response(
        &self,
        id: RequestId,
    ) -> Result<Option<(ResponseHead, Vec<u8>)>, StoreError> {
        self.with(move |c| async move {
            let sql = "SELECT response_head, response_body FROM requests
                       WHERE id = $1 AND response_head IS NOT NULL";
            let Some(r) = c
                .query_opt(&c.prepare_cached(sql).await?, &[&&id.0[..]])
                .await?
            else {
                return Ok(None);
            };
            let head: ResponseHead = codec::decode(r.try_get::<_, &[u8]>(0)?)?;
            let body: Option<Vec<u8>> = r.try_get(1)?;
            Ok(Some((head, body.unwrap_or_default())))
        })
        .await
    }

    /// A skip scan of the queue index: one probe per lane, not a walk of
    /// every queued request.
    pub async fn pending_lanes(&self) -> Result<Vec<LaneKey>, StoreError> {
        self.with(move |c| async move {
            let sql = "WITH RECURSIVE l(lane) AS (
                    (SELECT lane FROM requests WHERE status = 0 ORDER BY lane, seq LIMIT 1)
                    UNION ALL
                    SELECT (SELECT r.lane FROM requests r
                            WHERE r.status = 0 AND r.lane > l.lane
                            ORDER BY r.lane, r.seq LIMIT 1)
                    FROM l WHERE l.lane IS NOT NULL)
                SELECT lane FROM l WHERE lane IS NOT NULL";
            c.query(&c.prepare_cached(sql).await?, &[])
                .await?
                .iter()
                .map(|r| row::lane(r.try_get(0)?))
                .collect()
        })
        .await
    }

    /// Counted on the queue index up to `n` at most.
    pub async fn pending_at_least(&self, lane: LaneKey, n: u64) -> Result<bool, StoreError> {
        self.with(move |c| async move {
            let held = c
                .query_one(
                    &c.prepare_cached(PENDING_UP_TO).await?,
                    &[&&lane[..], &big(n)],
                )
                .await?;
            Ok(held.try_get::<_, i64>(0)?.max(0) as u64 >= n)
        })
        .await
    }

    /// By id (creation order), after `after`.
    pub async fn list(
        &self,
        status: Status,
        after: Option<RequestId>,
        limit: usize,
    ) -> Result<Vec<RequestRecord>, StoreError> {
        self.with(move |c| async move {
            let sql = format!(
                "SELECT {COLS} FROM requests WHERE status = $1 AND id > $2 ORDER BY id LIMIT $3"
            );
            let after = after.map_or(Vec::new(), |id| id.0.to_vec());
            let limit = big(limit as u64);
            c.query(
                &c.prepare_cached(&sql).await?,
                &[&row::code(status), &after, &limit],
            )
            .await?
            .iter()
            .map(row::record)
            .collect()
        })
        .await
    }

    pub async fn counts(&self) -> Result<Vec<(Status, u64)>, StoreError> {
        let rows = self
            .with(move |c| async move {
                let sql = "SELECT status, count(*) FROM requests GROUP BY status";
                let mut out = Vec::new();
                for r in c.query(&c.prepare_cached(sql).await?, &[]).await? {
                    out.push((row::status(r.try_get(0)?)?, r.try_get::<_, i64>(1)?));
                }
                Ok(out)
            })
            .await?;
        Ok(Status::ALL
            .iter()
            .map(|&s| {
                let n = rows.iter().find(|(r, _)| *r == s).map_or(0, |(_, n)| *n);
                (s, n.max(0) as u64)
            })
            .collect())
    }

    pub async fn next_expiry(&self) -> Result<Option<u64>, StoreError> {
        self.first("SELECT min(expires_ms) FROM requests WHERE expires_ms IS NOT NULL")
            .await
    }

    async fn first(&self, sql: &'static str) -> Result<Option<u64>, StoreError> {
        self.with(move |c| async move {
            let at: Option<i64> = c
                .query_one(&c.prepare_cached(sql).await?, &[])
                .await?
                .try_get(0)?;
            Ok(at.map(|v| v.max(0) as u64))
        })
        .await
    }

    /// Callback events due by `now_ms`, by when they are due: a leased one
    /// (another node delivering it) not before its lease ends.
    pub async fn due_callbacks(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<(u64, RequestId, CallbackEntry)>, StoreError> {
        self.with(move |c| async move {
            let sql = "SELECT greatest(due_ms, coalesce(lease_until, 0)) AS at,
                        id, event, status, attempts FROM callbacks
                       WHERE greatest(due_ms, coalesce(lease_until, 0)) <= $1
                       ORDER BY at, id LIMIT $2";
            let rows = c
                .query(
                    &c.prepare_cached(sql).await?,
                    &[&big(now_ms), &big(limit as u64)],
                )
                .await?;
            rows.iter().map(due).collect()
        })
        .await
    }

    /// A value of `asyncgate_meta`.
    pub async fn meta(&self, key: &'static str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(move |c| async move {
            let sql = "SELECT value FROM asyncgate_meta WHERE key = $1";
            Ok(c.query_opt(sql, &[&key]).await?.map(|r| r.get(0)))
        })
        .await
    }

    /// Sets a value of `asyncgate_meta` unless it is set; the value kept.
    pub async fn set_meta(
        &self,
        key: &'static str,
        value: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(move |c| async move {
            let sql = "INSERT INTO asyncgate_meta (key, value) VALUES ($1, $2)
                       ON CONFLICT (key) DO NOTHING";
            c.execute(sql, &[&key, &value]).await?;
            let sql = "SELECT value FROM asyncgate_meta WHERE key = $1";
            Ok(c.query_opt(sql, &[&key]).await?.map(|r| r.get(0)))
        })
        .await
    }

    /// Up to `limit` callbacks due now that no node is delivering, each
    /// leased to this life for `lease_ms` (on the database's clock: one
    /// that dies mid-delivery leaves it to the others when the lease ends,
    /// or at once when its life is found dead).
    pub async fn lease_callbacks(
        &self,
        now_ms: u64,
        limit: usize,
        lease_ms: u64,
        busy: Vec<Vec<u8>>,
    ) -> Result<Vec<(u64, RequestId, CallbackEntry)>, StoreError> {
        let node = self.node.id();
        self.with(move |c| async move {
            // Not for a life presumed dead, nor for a request whose other
            // event this node is delivering.
            let sql = format!(
                "UPDATE callbacks c SET leased_by = $3, lease_until = {NOW_MS} + $4 FROM (
                    SELECT due_ms, id FROM callbacks
                    WHERE due_ms <= $1 AND (lease_until IS NULL OR lease_until <= {NOW_MS})
                    AND NOT (id = ANY($5))
                    AND EXISTS (SELECT 1 FROM nodes WHERE id = $3 AND NOT dead)
                    ORDER BY due_ms, id LIMIT $2 FOR UPDATE SKIP LOCKED) p
                 WHERE c.due_ms = p.due_ms AND c.id = p.id
                 RETURNING c.due_ms, c.id, c.event, c.status, c.attempts"
            );
            let rows = c
                .query(
                    &c.prepare_cached(&sql).await?,
                    &[
                        &big(now_ms),
                        &big(limit as u64),
                        &node,
                        &big(lease_ms),
                        &busy,
                    ],
                )
                .await?;
            rows.iter().map(due).collect()
        })
        .await
    }

    /// A look before the submission's own check (which decides).
    pub async fn idempotent(
        &self,
        lane: LaneKey,
        idem: Idempotency,
    ) -> Result<Option<Result<RequestRecord, StoreError>>, StoreError> {
        self.with(move |c| async move {
            let sql = format!("SELECT {COLS} FROM requests WHERE lane = $1 AND idem_key = $2");
            let Some(r) = c
                .query_opt(
                    &c.prepare_cached(&sql).await?,
                    &[&&lane[..], &&idem.key[..]],
                )
                .await?
            else {
                return Ok(None);
            };
            let rec = row::record(&r)?;
            Ok(Some(match rec.idempotency {
                Some(i) if i.fingerprint == idem.fingerprint => Ok(rec),
                _ => Err(StoreError::IdempotencyReused),
            }))
        })
        .await
    }

    /// Counted on the queue index: a walk of the requests ahead.
    pub async fn ahead(&self, lane: LaneKey, seq: u64) -> Result<u64, StoreError> {
        self.with(move |c| async move {
            let sql = "SELECT count(*) FROM requests WHERE lane = $1 AND status = 0 AND seq < $2";
            let n: i64 = c
                .query_one(&c.prepare_cached(sql).await?, &[&&lane[..], &big(seq)])
                .await?
                .try_get(0)?;
            Ok(n.max(0) as u64)
        })
        .await
    }
}

/// A `callbacks` row: its due time, request and entry.
fn due(r: &tokio_postgres::Row) -> Result<(u64, RequestId, CallbackEntry), StoreError> {
    let entry = CallbackEntry {
        event: r.try_get::<_, i32>(2)?.max(0) as u32,
        status: row::status(r.try_get(3)?)?,
        attempts: r.try_get::<_, i32>(4)?.max(0) as u32,
    };
    let at: i64 = r.try_get(0)?;
    Ok((at.max(0) as u64, row::id(r.try_get(1)?)?, entry))
}
