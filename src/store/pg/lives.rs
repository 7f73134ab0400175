//! What keeps the nodes' lives honest (SPEC §12): this life's heartbeat,
//! on a connection of its own, and the cluster's takeover of dead lives'
//! work; a restart settling its previous lives; a clean stop leaving.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use deadpool_postgres::{Pool, Transaction};
use tokio_postgres::NoTls;
use tokio_postgres::types::ToSql;

use super::cluster::Node;
use super::notify::{self, Inbox, Note, Notes};
use super::pace::NOW_MS;
use super::row::{self, COLS, big};
use super::tx::settle_in;
use super::{PgStore, StoreError, describe};
use crate::store::{Fatal, Recovered, Settle};

/// Held by the node that settles dead lives' requests this round.
const TAKEOVER_LOCK: i64 = 0x6173_796e_6367_0003;

/// A claim this old that no attempt of this life holds lost its answer
/// (the connection dropped as it committed): it goes back to its lane.
const ORPHAN_AFTER: Duration = Duration::from_secs(10);

/// The tasks of a life, on the store's runtime.
pub struct Lives {
    pub config: tokio_postgres::Config,
    pub pool: Pool,
    pub node: Arc<Node>,
    pub fatal: Fatal,
    pub notes: Notes,
    /// This node's dispatcher: it ignores its own notes, so what the
    /// takeover or the orphan check puts back in a lane is handed to it.
    pub inbox: Inbox,
    pub unknown_keep_ms: u64,
}

impl Lives {
    /// Tells every node (this one's dispatcher directly) what a round put
    /// back in lanes or finished.
    fn tell(&self, told: Vec<Note>) {
        let lanes = told.iter().filter_map(|n| match n {
            Note::Queued(lane) => Some(*lane),
            Note::Finished(_) => None,
        });
        notify::deliver(&self.inbox, lanes);
        self.notes.send_all(told);
    }

    /// Starts the heartbeat and the takeover rounds.
    pub fn spawn(self, on: &tokio::runtime::Handle) {
        let this = Arc::new(self);
        on.spawn(this.clone().beat());
        on.spawn(this.take_overs());
    }

    fn over(&self) -> bool {
        self.fatal.failed().is_some() || self.node.left.load(Ordering::Relaxed)
    }

    /// Renews this life's lease every quarter timeout, on a connection of
    /// its own (a busy pool never delays it), or finds the life presumed
    /// dead: fatal, so the supervisor starts a new one.
    async fn beat(self: Arc<Self>) {
        let every = self.node.timeout() / 4;
        let sql = format!("UPDATE nodes SET heartbeat_ms = {NOW_MS} WHERE id = $1 AND NOT dead");
        let mut conn: Option<tokio_postgres::Client> = None;
        loop {
            tokio::time::sleep(every).await;
            if self.over() {
                return;
            }
            if conn.as_ref().is_none_or(|c| c.is_closed()) {
                conn = match self.config.connect(NoTls).await {
                    Ok((client, connection)) => {
                        tokio::spawn(connection);
                        Some(client)
                    }
                    Err(e) => {
                        log::warn!("heartbeat: cannot connect ({})", describe(&e));
                        *self.node.beating_since() = None;
                        continue;
                    }
                };
            }
            let Some(c) = conn.as_ref() else { continue };
            let asked = Instant::now();
            match c.execute(&sql, &[&self.node.id()]).await {
                Ok(n) if n > 0 => {
                    // A beat that came back after the lease had run out
                    // (a commit that stalled) starts the streak again.
                    let late = Instant::now() >= *self.node.lease();
                    *self.node.lease() = asked + self.node.timeout();
                    let mut since = self.node.beating_since();
                    if late {
                        *since = Some(Instant::now());
                    } else {
                        since.get_or_insert(asked);
                    }
                }
                Ok(_) if self.over() => return,
                Ok(_) => {
                    *self.node.lease() = asked;
                    self.fatal.fail(format!(
                        "this node was presumed dead by the others (no heartbeat for {:?}); \
                         what it had started is theirs now",
                        self.node.timeout()
                    ));
                    return;
                }
                Err(e) => {
                    log::warn!("heartbeat failed: {}", describe(&e));
                    *self.node.beating_since() = None;
                    conn = None;
                }
            }
        }
    }

    /// Every quarter timeout: settles what dead lives left (once this node
    /// has itself beaten for a whole timeout) and this life's own claims
    /// whose answer was lost.
    async fn take_overs(self: Arc<Self>) {
        let every = self.node.timeout() / 4;
        loop {
            tokio::time::sleep(every).await;
            if self.over() {
                return;
            }
            let steady = self.node.may_send()
                && self
                    .node
                    .beating_since()
                    .is_some_and(|t| t.elapsed() >= self.node.timeout());
            if steady {
                match self.take_over().await {
                    Ok(r) if r.requeued + r.unknown > 0 => log::warn!(
                        "took over from dead nodes: {} safe requests requeued, {} marked unknown",
                        r.requeued,
                        r.unknown
                    ),
                    Ok(_) => {}
                    Err(e) => log::warn!("settling dead nodes' requests failed: {e}"),
                }
            }
            match self.requeue_orphans().await {
                Ok(0) => {}
                Ok(n) => log::warn!(
                    "{n} claims of this node whose commit went unanswered are back in their lanes"
                ),
                Err(e) => log::warn!("looking for this node's lost claims failed: {e}"),
            }
        }
    }

    /// Marks lives silent past their own timeout dead and settles their
    /// `started` requests (one node at a time does it).
    async fn take_over(&self) -> Result<Recovered, StoreError> {
        let mut c = self.pool.get().await?;
        // Not inside the transaction: ending a session of another role may
        // be refused, and the takeover goes on without it.
        let stale = |n: &str| format!("NOT {n}dead AND {n}heartbeat_ms < {NOW_MS} - {n}timeout_ms");
        let fresh = format!(
            "EXISTS (SELECT 1 FROM nodes me WHERE me.id = $1 AND NOT me.dead
             AND me.heartbeat_ms >= {NOW_MS} - me.timeout_ms / 2)"
        );
        let sql = format!(
            "SELECT count(pg_terminate_backend(a.pid)) FROM pg_stat_activity a
             JOIN nodes n ON a.application_name = n.session
             WHERE {} AND {fresh} AND a.pid <> pg_backend_pid()",
            stale("n.")
        );
        if let Err(e) = c.query_one(&sql, &[&self.node.id()]).await {
            log::warn!("ending a silent node's sessions failed: {}", describe(&e));
        }
        let tx = c.transaction().await?;
        let mine: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&TAKEOVER_LOCK])
            .await?
            .get(0);
        if !mine {
            return Ok(Recovered::default());
        }
        // Only while this life's own heartbeat is fresh on the database's
        // clock (after a stall, its own is as old as everyone's). A stale
        // life's sessions were ended above: one stopped mid-claim holds its
        // row and lane rows, and may be past any timeout's reach (a write
        // to it blocked).
        let sql = format!(
            "UPDATE nodes SET dead = true WHERE {} AND {fresh}
             RETURNING name, id, timeout_ms",
            stale("")
        );
        for r in tx.query(&sql, &[&self.node.id()]).await? {
            let (name, id, ms): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
            log::warn!("node {name} (life {id}) is presumed dead: no heartbeat for {ms} ms");
        }
        // What no live life holds: the dead ones', and those of lives
        // already deleted (a claim that committed as its life was dying).
        // Never a request claimed by a gateway of schema 1 (no life).
        let orphaned = |col: &str| {
            format!(
                "{col} IS NOT NULL AND NOT EXISTS \
                 (SELECT 1 FROM nodes n WHERE n.id = {col} AND NOT n.dead)"
            )
        };
        let (report, told) = settle_lives(
            &tx,
            &orphaned("requests.node"),
            &orphaned("callbacks.leased_by"),
            &[],
            self.unknown_keep_ms,
        )
        .await?;
        tx.execute(
            "DELETE FROM nodes WHERE dead AND NOT EXISTS
                (SELECT 1 FROM requests WHERE status = 1 AND node = nodes.id)",
            &[],
        )
        .await?;
        tx.commit().await?;
        self.tell(told);
        Ok(report)
    }

    /// This life's claims that no attempt holds: claimed by a commit whose
    /// answer was lost, so never sent. Back to their lanes' heads.
    async fn requeue_orphans(&self) -> Result<usize, StoreError> {
        let before = big(crate::model::now_ms().saturating_sub(ORPHAN_AFTER.as_millis() as u64));
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await?;
        let sql = format!(
            "SELECT {COLS} FROM requests WHERE status = 1 AND node = $1 AND started_ms < $2
             FOR UPDATE SKIP LOCKED"
        );
        let rows = tx.query(&sql, &[&self.node.id(), &before]).await?;
        let mut told = Vec::new();
        for r in &rows {
            let rec = row::record(r)?;
            if self.node.in_flight().get(&rec.id) == Some(&rec.claims) {
                continue;
            }
            let op = Settle::Requeue {
                id: rec.id,
                claims: rec.claims,
                sent: false,
            };
            if settle_in(&tx, &op).await? {
                told.push(Note::Queued(rec.lane));
            }
        }
        tx.commit().await?;
        let n = told.len();
        self.tell(told);
        Ok(n)
    }
}

impl PgStore {
    /// Start-up recovery on PostgreSQL: the `started` requests of this
    /// node's previous lives on this host and boot (the data dir's lock
    /// says they are over), and of a gateway from before lives were kept;
    /// never another running node's.
    pub async fn recover(&self, _now_ms: u64, keep_ms: u64) -> Result<Recovered, StoreError> {
        let (id, name) = (self.node.id(), self.node.name.clone());
        let notes = self.notes.clone();
        self.with(move |mut c| async move {
            let tx = c.transaction().await?;
            tx.execute(
                "UPDATE nodes SET dead = true WHERE name = $1 AND id <> $2",
                &[&name, &id],
            )
            .await?;
            let mine = "IN (SELECT id FROM nodes WHERE name = $1 AND id <> $2)";
            let (report, told) = settle_lives(
                &tx,
                &format!("(node IS NULL OR node {mine})"),
                &format!("leased_by {mine}"),
                &[&name, &id],
                keep_ms,
            )
            .await?;
            tx.commit().await?;
            notes.send_all(told);
            Ok(report)
        })
        .await
    }

    /// A clean stop: this life ends now, so nothing waits for its
    /// heartbeat to time out; what it still had started (attempts past
    /// the shutdown timeout: a `GET` may still be running) is settled as a
    /// restart would.
    pub async fn leave(&self) -> Result<Recovered, StoreError> {
        let id = self.node.id();
        let keep = self.unknown_keep_ms;
        let notes = self.notes.clone();
        *self.node.lease() = Instant::now();
        self.node.left.store(true, Ordering::Relaxed);
        self.with(move |mut c| async move {
            let tx = c.transaction().await?;
            tx.execute("UPDATE nodes SET dead = true WHERE id = $1", &[&id])
                .await?;
            let (report, told) =
                settle_lives(&tx, "node = $1", "leased_by = $1", &[&id], keep).await?;
            tx.execute("DELETE FROM nodes WHERE id = $1", &[&id])
                .await?;
            tx.commit().await?;
            notes.send_all(told);
            Ok(report)
        })
        .await
    }
}

/// Settles the `started` requests that `requests` selects (a condition on
/// their `node`), as a restart would, and ends the callback leases that
/// `callbacks` selects (on their `leased_by`); returns what to tell every
/// node once it is committed (the lanes requeued, the requests finished).
async fn settle_lives(
    tx: &Transaction<'_>,
    requests: &str,
    callbacks: &str,
    params: &[&(dyn ToSql + Sync)],
    keep_ms: u64,
) -> Result<(Recovered, Vec<Note>), StoreError> {
    let sql =
        format!("UPDATE callbacks SET leased_by = NULL, lease_until = NULL WHERE {callbacks}");
    tx.execute(&sql, params).await?;
    let sql = format!("SELECT {COLS} FROM requests WHERE status = 1 AND {requests} FOR UPDATE");
    let now = crate::model::now_ms();
    let mut report = Recovered::default();
    let mut told: Vec<Note> = Vec::new();
    for r in tx.query(&sql, params).await? {
        let rec = row::record(&r)?;
        let op = report.settle(&rec, now, keep_ms);
        told.push(match op {
            Settle::Requeue { .. } => Note::Queued(rec.lane),
            _ => Note::Finished(rec.id),
        });
        settle_in(tx, &op).await?;
    }
    Ok((report, told))
}
