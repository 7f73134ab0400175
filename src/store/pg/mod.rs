//! The PostgreSQL store (`--store postgres://...`, SPEC §12): every piece of
//! state in one database, each operation one transaction, committed
//! (`synchronous_commit` on, the server's default) before it returns.
//!
//! - `requests`: a row per request, its body and response in their own
//!   columns; what never changes (method, target, headers, callback) is one
//!   encoded value, what the store decides on (status, lane, seq, claims,
//!   retention) are columns with partial indexes: the lane queues
//!   (`status = 0`, by `lane, seq`), the open ones (`started`, `unknown`),
//!   retention, and the `Idempotency-Key`s (unique per lane).
//! - `lanes`: a row per credential lane, locked by a capped submission.
//! - `callbacks`: pending callback events, by due time.
//!
//! Claims take a lane's head with `FOR UPDATE SKIP LOCKED` and commit
//! before anything is sent; a settle names its claim (`claims`), so a stale
//! one changes nothing. Its own small runtime drives the connections, so
//! the HTTP workers, the dispatcher and the sweeper's thread all use it
//! alike; a held long-poll holds no connection (waiters are in memory).
//!
//! Any number of nodes share the database (`cluster`: lives, heartbeats,
//! fenced takeover; `pace`: the lanes' shared limits; `notify`: wake-ups
//! across nodes).

mod cluster;
mod lives;
mod notify;
mod ops;
mod pace;
mod reads;
mod row;
mod schema;
mod tx;

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Pool, PoolError, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use super::StoreError;
use super::fatal::Fatal;
use super::waiters::Waiters;
use crate::model::{LaneKey, RequestId};
use crate::scheduler::Limits;
use cluster::Node;
use lives::Lives;
use notify::{Inbox, Notes};

/// Connections to the database. A submission holds one for its
/// transaction only (a few round trips and a commit), so a few serve many
/// HTTP connections; more only queue on the database's own locks.
const POOL_SIZE: usize = 16;

/// The longest wait for a pooled connection (or a new one): past it the
/// operation fails (a 503 to a submission) rather than hang.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest any statement may run, and the longest unacknowledged data
/// may sit on a connection, before the operation fails.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest a transaction may sit idle, or a statement wait for a lock
/// (less with a short heartbeat timeout: a third of it).
const GUARD_MAX: Duration = Duration::from_secs(10);

pub struct PgConfig {
    /// `postgres://user:password@host:port/database` (libpq's URL form).
    pub url: String,
    /// Where the node keeps its name (and its lock).
    pub data_dir: PathBuf,
    /// `--node-heartbeat-timeout`.
    pub heartbeat_timeout: Duration,
    /// The per-credential limits every node shares.
    pub limits: Limits,
    /// How long a request settled `unknown` by a takeover is kept.
    pub unknown_keep_ms: u64,
}

pub struct PgStore {
    pool: Pool,
    handle: tokio::runtime::Handle,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    salt: [u8; 32],
    /// This process's life in the cluster.
    node: Arc<Node>,
    limits: Limits,
    unknown_keep_ms: u64,
    /// To the other nodes, after commits.
    notes: Notes,
    /// Lanes other nodes queued, for the dispatcher.
    inbox: Inbox,
    fatal: Fatal,
    /// Shared with the tasks that commit: they wake the waiters of what
    /// they finished right after the commit, whether or not whoever asked
    /// for the change is still there to hear of it.
    waiters: Arc<Waiters>,
    /// The bodies of claimed requests, read with their claim: taken by
    /// the attempt (`request_body`) or dropped when it settles.
    claimed: Mutex<HashMap<RequestId, Vec<u8>>>,
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> StoreError {
        if e.code() == Some(&SqlState::DISK_FULL) {
            return StoreError::NoSpace;
        }
        StoreError::Postgres(describe(&e))
    }
}

/// The error with what caused it: tokio-postgres says only "db error" or
/// "error connecting to server" and keeps the server's message (or the
/// I/O error) as its source.
fn describe(e: &tokio_postgres::Error) -> String {
    use std::error::Error;
    match e.source() {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

impl From<PoolError> for StoreError {
    fn from(e: PoolError) -> StoreError {
        match e {
            PoolError::Backend(e) => e.into(),
            other => StoreError::Unavailable(format!("no database connection: {other}")),
        }
    }
}

impl PgStore {
    pub async fn open(config: PgConfig) -> Result<PgStore, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("asyncgate-db")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let PgConfig {
            url,
            data_dir,
            heartbeat_timeout,
            limits,
            unknown_keep_ms,
        } = config;
        let fatal = Fatal::default();
        let opened = handle.spawn(async move {
            let mut pg: tokio_postgres::Config = url
                .parse()
                .map_err(|e| StoreError::Format(format!("--store: {e}")))?;
            // A 202 waits for a durable commit, whatever the server's or
            // the role's default says; no statement runs unbounded.
            // A node that stops mid-transaction (killed, stopped, cut off)
            // must not hold its locks (on its life's row, on lane rows)
            // past a fraction of the heartbeat timeout, nor may anyone
            // wait on a lock longer; the server notices a silent client
            // by its own keepalives.
            let guard = (heartbeat_timeout / 3).clamp(Duration::from_secs(1), GUARD_MAX);
            let ours = format!(
                "-c synchronous_commit=on -c statement_timeout={} \
                 -c idle_in_transaction_session_timeout={} -c lock_timeout={} \
                 -c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3 \
                 -c tcp_user_timeout={}",
                STATEMENT_TIMEOUT.as_millis(),
                guard.as_millis(),
                guard.as_millis(),
                guard.as_millis(),
            );
            let options = match pg.get_options() {
                Some(o) => format!("{o} {ours}"),
                None => ours,
            };
            pg.options(&options);
            // A database host that stops answering (no reset, no FIN) is
            // noticed in seconds, not after TCP's quarter of an hour.
            if pg.get_connect_timeout().is_none() {
                pg.connect_timeout(CONNECT_TIMEOUT);
            }
            pg.keepalives(true)
                .keepalives_idle(Duration::from_secs(10))
                .keepalives_interval(Duration::from_secs(5))
                .keepalives_retries(3)
                .tcp_user_timeout(STATEMENT_TIMEOUT);
            // Every session of this life carries its name: a takeover ends
            // the sessions of a life found dead.
            let session = format!(
                "asyncgate {}",
                crate::model::RequestId::try_generate().map_err(|_| {
                    StoreError::Io(std::io::Error::other("no randomness for a session name"))
                })?
            );
            pg.application_name(&session);
            let listener = pg.clone();
            let manager = deadpool_postgres::Manager::from_config(
                pg,
                NoTls,
                deadpool_postgres::ManagerConfig {
                    recycling_method: deadpool_postgres::RecyclingMethod::Fast,
                },
            );
            let pool = Pool::builder(manager)
                .max_size(POOL_SIZE)
                .wait_timeout(Some(CONNECT_TIMEOUT))
                .create_timeout(Some(CONNECT_TIMEOUT))
                .recycle_timeout(Some(CONNECT_TIMEOUT))
                .runtime(Runtime::Tokio1)
                .build()
                .map_err(|e| StoreError::Format(format!("--store: {e}")))?;
            let mut client = pool.get().await.map_err(|e| match e {
                PoolError::Backend(e) => StoreError::Unavailable(format!(
                    "cannot connect to the database: {}",
                    describe(&e)
                )),
                other => other.into(),
            })?;
            cluster::refuse_schema_1(&client).await?;
            schema::migrate(&mut client).await?;
            let salt = schema::salt(&client).await?;
            let node = Node::join(&pool, &data_dir, heartbeat_timeout, &session).await?;
            Ok::<_, StoreError>((listener, pool, salt, node))
        });
        let opened = match opened.await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Unavailable(e.to_string())),
        };
        let (listener, pool, salt, node) = match opened {
            Ok(o) => o,
            Err(e) => {
                // Not dropped: that blocks, and this is an async context.
                runtime.shutdown_background();
                return Err(e);
            }
        };
        let node = Arc::new(node);
        let waiters: Arc<Waiters> = Arc::default();
        let inbox: Inbox = Arc::default();
        let (notes, noted) = notify::channel();
        handle.spawn(notify::send(pool.clone(), node.id(), noted));
        handle.spawn(notify::listen(
            listener.clone(),
            node.id(),
            waiters.clone(),
            inbox.clone(),
        ));
        handle.spawn(notify::safety_net(pool.clone(), waiters.clone()));
        Lives {
            config: listener,
            pool: pool.clone(),
            node: node.clone(),
            fatal: fatal.clone(),
            notes: notes.clone(),
            inbox: inbox.clone(),
            unknown_keep_ms,
        }
        .spawn(&handle);
        Ok(PgStore {
            pool,
            handle,
            runtime: Mutex::new(Some(runtime)),
            salt,
            fatal,
            node,
            limits,
            unknown_keep_ms,
            notes,
            inbox,
            waiters,
            claimed: Mutex::default(),
        })
    }

    pub fn salt(&self) -> &[u8; 32] {
        &self.salt
    }

    /// Set only when this gateway lost its hold on the database; every
    /// other failure is the database's answer to one transaction, and the
    /// next may succeed (a 503 meanwhile).
    pub fn fatal(&self) -> &Fatal {
        &self.fatal
    }

    /// Whether the database answers now (`/healthz`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.with(|c| async move {
            c.simple_query("SELECT 1").await?;
            Ok(())
        })
        .await
    }

    pub fn may_send(&self) -> Result<(), StoreError> {
        if self.node.may_send() {
            Ok(())
        } else {
            Err(StoreError::Unavailable(format!(
                "this node's heartbeat is overdue: the others may presume it dead after {:?}, \
                 so it sends nothing",
                self.node.timeout()
            )))
        }
    }

    /// A new channel for the lanes other nodes queued requests in.
    pub fn remote_queued(&self) -> tokio::sync::mpsc::UnboundedReceiver<LaneKey> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *self.inbox.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    fn lock_claimed(&self) -> std::sync::MutexGuard<'_, HashMap<RequestId, Vec<u8>>> {
        self.claimed.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn waiters(&self) -> &Waiters {
        &self.waiters
    }

    /// Every change is committed when it returns: closing only lets the
    /// connections go.
    pub fn close(&self) -> Result<(), StoreError> {
        self.pool.close();
        Ok(())
    }

    /// Runs `f` with a pooled connection on the store's runtime.
    async fn with<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(deadpool_postgres::Object) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send,
    {
        let pool = self.pool.clone();
        let task = self.handle.spawn(async move { f(pool.get().await?).await });
        match task.await {
            Ok(r) => r,
            Err(e) => Err(StoreError::Unavailable(format!(
                "a database task failed: {e}"
            ))),
        }
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        let runtime = self
            .runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // Not `drop`: that blocks, and the store may go inside a runtime.
        if let Some(rt) = runtime {
            rt.shutdown_background();
        }
    }
}
