//! Nodes on one database (SPEC §12). Each start of a gateway is a row in
//! `nodes` (its *life*), named by the node's data dir (kept there, the dir
//! locked while it runs), and every request it claims carries the life's
//! id. A life heartbeats every quarter of `--node-heartbeat-timeout`; one
//! silent for longer is presumed dead by the others, who settle what it
//! had `started` as a restart would (SPEC §6: `unknown`, or requeued for a
//! safe method).
//!
//! Fencing: a dead life's claims are settled under the claim counts they
//! carry, so its late settles change nothing; it can claim nothing more
//! (a claim checks its life), its heartbeat finds it dead and stops the
//! process, and it sends nothing once its own view of its lease (the last
//! heartbeat that committed, plus the timeout, on its own clock) has run
//! out. A node coming back under its name settles its previous lives'
//! `started` requests at once: the data dir's lock says they are over.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;

use super::notify::{Note, Notes};
use super::pace::NOW_MS;
use super::row::{self, COLS, big};
use super::tx::settle_in;
use super::{PgStore, StoreError};
use crate::store::Fatal;
use crate::store::{Recovered, Settle, create_dir_durably};

/// Held by the node that settles dead lives' requests this round.
const TAKEOVER_LOCK: i64 = 0x6173_796e_6367_0003;

/// This process's life.
pub struct Node {
    id: i64,
    name: String,
    /// It may send upstream until then: past it, the others may have
    /// presumed it dead.
    lease: Mutex<Instant>,
    timeout: Duration,
    /// Set by a clean stop: the life is over, its heartbeat ends.
    left: AtomicBool,
    /// The data dir's lock, held for the process's life.
    _dir: File,
}

impl Node {
    pub fn id(&self) -> i64 {
        self.id
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn lease(&self) -> std::sync::MutexGuard<'_, Instant> {
        self.lease.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this life may still send: the others cannot have presumed
    /// it dead yet.
    pub fn may_send(&self) -> bool {
        Instant::now() < *self.lease()
    }

    /// Registers a new life of the node whose data dir is `dir`.
    pub async fn join(pool: &Pool, dir: &Path, timeout: Duration) -> Result<Node, StoreError> {
        let (name, lock) = name_of(dir)?;
        let c = pool.get().await?;
        let asked = Instant::now();
        let sql = format!(
            "INSERT INTO nodes (name, started_ms, heartbeat_ms) VALUES ($1, {NOW_MS}, {NOW_MS})
             RETURNING id"
        );
        let id: i64 = c.query_one(&sql, &[&name]).await?.get(0);
        log::info!("node {name} joined the cluster (life {id})");
        Ok(Node {
            id,
            name,
            lease: Mutex::new(asked + timeout),
            timeout,
            left: AtomicBool::new(false),
            _dir: lock,
        })
    }
}

/// The node's name, kept in `dir/node` (made on first start), and the
/// lock that keeps a second process of the same node out.
fn name_of(dir: &Path) -> Result<(String, File), StoreError> {
    create_dir_durably(dir)?;
    let path = dir.join("node");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    // SAFETY: flock on a descriptor we own; it has no other preconditions.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(StoreError::Locked(dir.to_path_buf()));
    }
    let mut name = String::new();
    file.read_to_string(&mut name)?;
    let name = name.trim().to_string();
    if !name.is_empty() {
        return Ok((name, file));
    }
    let name = crate::model::RequestId::try_generate()
        .map_err(|_| StoreError::Io(std::io::Error::other("no randomness for the node's name")))?
        .to_string();
    file.write_all(name.as_bytes())?;
    file.sync_all()?;
    Ok((name, file))
}

/// What the heartbeat task needs, on the store's runtime.
pub struct Beat {
    pub pool: Pool,
    pub node: Arc<Node>,
    pub fatal: Fatal,
    pub notes: Notes,
    pub unknown_keep_ms: u64,
}

impl Beat {
    /// Beats until the process ends: each beat renews this life's lease,
    /// or finds it presumed dead (fatal: the supervisor starts a new
    /// life), then settles what dead lives left.
    pub async fn run(self) {
        let every = self.node.timeout() / 4;
        loop {
            tokio::time::sleep(every).await;
            if self.fatal.failed().is_some() || self.node.left.load(Ordering::Relaxed) {
                return;
            }
            let asked = Instant::now();
            match self.beat().await {
                Ok(true) => *self.node.lease() = asked + self.node.timeout(),
                Ok(false) => {
                    *self.node.lease() = asked;
                    self.fatal.fail(format!(
                        "this node was presumed dead by the others (no heartbeat for {:?}); \
                         what it had started is theirs now",
                        self.node.timeout()
                    ));
                    return;
                }
                Err(e) => log::warn!("heartbeat failed: {e}"),
            }
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
    }

    async fn beat(&self) -> Result<bool, StoreError> {
        let c = self.pool.get().await?;
        let sql = format!("UPDATE nodes SET heartbeat_ms = {NOW_MS} WHERE id = $1 AND NOT dead");
        Ok(c.execute(&sql, &[&self.node.id()]).await? > 0)
    }

    /// Marks lives silent past the timeout dead and settles their
    /// `started` requests (one node at a time does it).
    async fn take_over(&self) -> Result<Recovered, StoreError> {
        let timeout = big(self.node.timeout().as_millis() as u64);
        let mut c = self.pool.get().await?;
        let tx = c.transaction().await?;
        let mine: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&TAKEOVER_LOCK])
            .await?
            .get(0);
        if !mine {
            return Ok(Recovered::default());
        }
        let sql = format!(
            "UPDATE nodes SET dead = true WHERE NOT dead AND heartbeat_ms < {NOW_MS} - $1
             RETURNING name, id"
        );
        for r in tx.query(&sql, &[&timeout]).await? {
            let (name, id): (String, i64) = (r.get(0), r.get(1));
            log::warn!("node {name} (life {id}) is presumed dead: no heartbeat for {timeout} ms");
        }
        // Whatever no live life holds: the dead ones', and those of lives
        // already deleted (a claim that committed as its life was dying).
        let orphaned = |col: &str| {
            format!("NOT EXISTS (SELECT 1 FROM nodes n WHERE n.id = {col} AND NOT n.dead)")
        };
        let (report, told) = settle_lives(
            &tx,
            &orphaned("requests.node"),
            &format!(
                "leased_by IS NOT NULL AND {}",
                orphaned("callbacks.leased_by")
            ),
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
        self.notes.send_all(told);
        Ok(report)
    }
}

impl PgStore {
    /// Start-up recovery on PostgreSQL: the `started` requests of this
    /// node's previous lives (and of a gateway from before lives were
    /// kept), never another running node's.
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
            // Requests claimed before lives were kept (schema 1) count as
            // this node's: one gateway held the database then.
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
    /// the shutdown timeout) is settled as a restart would.
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
/// their `node`), as a restart would, and frees the callbacks' leases
/// `callbacks` selects (on their `leased_by`); returns what to tell every node once it is committed (the
/// lanes requeued, the requests finished).
async fn settle_lives(
    tx: &deadpool_postgres::Transaction<'_>,
    requests: &str,
    callbacks: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    keep_ms: u64,
) -> Result<(Recovered, Vec<Note>), StoreError> {
    let now = crate::model::now_ms();
    // Their callbacks in delivery are due again now, for whoever is alive.
    let mut with_now = params.to_vec();
    let at = big(now);
    with_now.push(&at);
    let sql = format!(
        "UPDATE callbacks SET due_ms = ${}, leased_by = NULL WHERE {callbacks}",
        params.len() + 1
    );
    tx.execute(&sql, &with_now).await?;
    let sql = format!("SELECT {COLS} FROM requests WHERE status = 1 AND {requests} FOR UPDATE");
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
