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

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;

use super::StoreError;
use super::pace::NOW_MS;
use super::row::big;
use crate::model::RequestId;
use crate::store::create_dir_durably;

/// Held, on a connection of its own, by a gateway of schema 1 (one per
/// database): a node finding it held refuses to start beside it.
const SCHEMA_1_LOCK: i64 = 0x6173_796e_6367_0002;

/// This process's life.
pub struct Node {
    id: i64,
    pub(super) name: String,
    /// It may send upstream until then: past it, the others may have
    /// presumed it dead.
    lease: Mutex<Instant>,
    timeout: Duration,
    /// Set by a clean stop: the life is over, its heartbeat ends.
    pub(super) left: AtomicBool,
    /// Since when every heartbeat has committed (`None` after a failed
    /// one): a node judges others' silence only after it has beaten for a
    /// whole timeout itself, so a stall of the database (or of this node)
    /// does not make it presume everyone else dead.
    pub(super) beating_since: Mutex<Option<Instant>>,
    /// The claims this life made and has not settled (request, claim
    /// count), registered before the claim commits.
    pub(super) in_flight: Mutex<HashMap<RequestId, u32>>,
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

    pub(super) fn lease(&self) -> MutexGuard<'_, Instant> {
        self.lease.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn in_flight(&self) -> MutexGuard<'_, HashMap<RequestId, u32>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn beating_since(&self) -> MutexGuard<'_, Option<Instant>> {
        self.beating_since.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this life may still send: the others cannot have presumed
    /// it dead yet.
    pub fn may_send(&self) -> bool {
        Instant::now() < *self.lease()
    }

    /// Registers a new life of the node whose data dir is `dir`, its
    /// sessions named `session`, unless the node's name is alive elsewhere
    /// (a copied data dir: on another host, or in another directory of
    /// this one in this boot).
    pub async fn join(
        pool: &Pool,
        dir: &Path,
        timeout: Duration,
        session: &str,
    ) -> Result<Node, StoreError> {
        let (name, lock) = name_of(dir)?;
        let (host, boot) = host();
        let path = std::fs::canonicalize(dir)?.display().to_string();
        let c = pool.get().await?;
        let sql = format!(
            "SELECT host, dir FROM nodes WHERE name = $1 AND NOT dead
             AND heartbeat_ms >= {NOW_MS} - timeout_ms
             AND (host <> $2 OR (boot = $3 AND dir <> $4))"
        );
        if let Some(r) = c.query_opt(&sql, &[&name, &host, &boot, &path]).await? {
            let (other, at): (String, String) = (r.get(0), r.get(1));
            return Err(StoreError::Format(format!(
                "node {name} is running on {other} in {at}: is {} a copy of its data dir? \
                 Delete the copy's `node` file to make it a node of its own",
                dir.display()
            )));
        }
        let asked = Instant::now();
        let sql = format!(
            "INSERT INTO nodes (name, host, boot, dir, session, timeout_ms, started_ms, heartbeat_ms)
             VALUES ($1, $2, $3, $4, $5, $6, {NOW_MS}, {NOW_MS}) RETURNING id"
        );
        let timeout_ms = big(timeout.as_millis() as u64);
        let id: i64 = c
            .query_one(&sql, &[&name, &host, &boot, &path, &session, &timeout_ms])
            .await?
            .get(0);
        log::info!("node {name} joined the cluster (life {id}, on {host})");
        Ok(Node {
            id,
            name,
            lease: Mutex::new(asked + timeout),
            timeout,
            left: AtomicBool::new(false),
            beating_since: Mutex::new(Some(asked)),
            in_flight: Mutex::default(),
            _dir: lock,
        })
    }
}

/// This host's name, and its boot (another after each reboot).
fn host() -> (String, String) {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    (
        read("/proc/sys/kernel/hostname"),
        read("/proc/sys/kernel/random/boot_id"),
    )
}

/// Refuses a database a gateway of schema 1 (one per database) still
/// runs on, before anything is migrated under it.
pub async fn refuse_schema_1(c: &tokio_postgres::Client) -> Result<(), StoreError> {
    let free: bool = c
        .query_one("SELECT pg_try_advisory_lock_shared($1)", &[&SCHEMA_1_LOCK])
        .await?
        .get(0);
    if !free {
        return Err(StoreError::Format(
            "the database is in use by a gateway of an older version (one gateway per \
             database): stop it before starting this one"
                .into(),
        ));
    }
    c.query_one("SELECT pg_advisory_unlock_shared($1)", &[&SCHEMA_1_LOCK])
        .await?;
    Ok(())
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
