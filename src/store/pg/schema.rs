//! The database's schema, as numbered migrations applied on start, each in
//! the transaction that records it (`asyncgate_schema`), under an advisory
//! lock so that nodes starting together apply each once. A database newer
//! than this binary is refused: its rows may mean something we cannot read.

use tokio_postgres::Client;

use super::super::StoreError;

/// `(version, SQL)`, in order; never edit a released one, add the next.
const MIGRATIONS: &[(i32, &str)] = &[(1, V1), (2, V2)];

/// Statuses are `Status::code()`: 0 enqueued, 1 started, 2 done, 3 unknown.
const V1: &str = "
CREATE TABLE asyncgate_meta (
    key   text PRIMARY KEY,
    value bytea NOT NULL
);

-- One row per credential lane: the unit a capped submission locks.
CREATE TABLE lanes (
    lane bytea PRIMARY KEY
);

-- Position in a lane; a requeued unknown request takes a new one.
CREATE SEQUENCE request_seq;

CREATE TABLE requests (
    id             bytea PRIMARY KEY,
    lane           bytea NOT NULL,
    seq            bigint NOT NULL,
    status         smallint NOT NULL,
    -- The fencing token: a settle names the claim it settles.
    claims         integer NOT NULL DEFAULT 0,
    attempts       integer NOT NULL DEFAULT 0,
    created_ms     bigint NOT NULL,
    started_ms     bigint,
    finished_ms    bigint,
    expires_ms     bigint,
    -- Hashed Idempotency-Key (per lane).
    idem_key       bytea,
    -- The credential sealed with the key file; empty once done.
    sealed         bytea NOT NULL,
    -- What never changes: method, target, headers, callback, key.
    request        bytea NOT NULL,
    body           bytea,
    outcome        bytea,
    callback_state bytea,
    response_head  bytea,
    response_body  bytea
);

-- The per-credential FIFO queues.
CREATE INDEX requests_queue ON requests (lane, seq) WHERE status = 0;
-- The oldest queued request (metrics), the key check at start.
CREATE INDEX requests_queued ON requests (id) WHERE status = 0;
-- Recovery and the operator's list.
CREATE INDEX requests_open ON requests (status, id) WHERE status IN (1, 3);
-- Retention, oldest first.
CREATE INDEX requests_expiry ON requests (expires_ms) WHERE expires_ms IS NOT NULL;
CREATE UNIQUE INDEX requests_idempotency ON requests (lane, idem_key)
    WHERE idem_key IS NOT NULL;

-- Pending callback events.
CREATE TABLE callbacks (
    due_ms   bigint NOT NULL,
    id       bytea NOT NULL,
    event    integer NOT NULL,
    status   smallint NOT NULL,
    attempts integer NOT NULL,
    PRIMARY KEY (due_ms, id)
);
";

/// Several nodes on one database (SPEC §12).
const V2: &str = "
-- A node's life: a row per start, whose id tags what it claims.
CREATE TABLE nodes (
    id           bigserial PRIMARY KEY,
    -- Kept in the node's data dir: the same on every start of that node.
    name         text NOT NULL,
    started_ms   bigint NOT NULL,
    -- The database's clock at the last heartbeat.
    heartbeat_ms bigint NOT NULL,
    -- Its own --node-heartbeat-timeout: silent longer, it is presumed dead.
    timeout_ms   bigint NOT NULL,
    -- Where it runs: a life of the same name on another host, or in
    -- another directory of this one, is a copied data dir, not a previous
    -- life; on this host after a reboot (another boot), it is.
    host         text NOT NULL,
    boot         text NOT NULL,
    dir          text NOT NULL,
    -- Its sessions' application_name: a takeover ends them.
    session      text NOT NULL,
    -- Presumed dead by the others (or stopped): it may change nothing more.
    dead         boolean NOT NULL DEFAULT false
);
CREATE INDEX nodes_name ON nodes (name);

-- Which node's life claimed a `started` request.
ALTER TABLE requests ADD COLUMN node bigint;
-- Attempts in flight per lane, on every node.
CREATE INDEX requests_started ON requests (lane) WHERE status = 1;

-- Which life delivers a callback now, until when (the database's clock).
ALTER TABLE callbacks ADD COLUMN leased_by bigint, ADD COLUMN lease_until bigint;
CREATE INDEX callbacks_leased ON callbacks (leased_by) WHERE leased_by IS NOT NULL;

-- A lane's pacing, shared by the nodes (times on the database's clock).
ALTER TABLE lanes
    ADD COLUMN paused_until_ms bigint,
    ADD COLUMN pause_reason    smallint,
    ADD COLUMN refusals        integer NOT NULL DEFAULT 0,
    ADD COLUMN outages         integer NOT NULL DEFAULT 0,
    ADD COLUMN learned_rps     integer,
    ADD COLUMN probing         boolean NOT NULL DEFAULT false,
    ADD COLUMN sent_ms         bigint[] NOT NULL DEFAULT '{}';
";

/// Serializes nodes migrating at once (any constant of ours).
const MIGRATION_LOCK: i64 = 0x6173_796e_6367_0001;

/// Brings the database to this binary's schema.
pub async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS asyncgate_schema (
            version    integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let row = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM asyncgate_schema",
            &[],
        )
        .await?;
    let at: i32 = row.get(0);
    let newest = MIGRATIONS.last().map_or(0, |m| m.0);
    if at > newest {
        return Err(StoreError::Format(format!(
            "the database is at schema version {at}, newer than this asyncgate's \
             ({newest}): run the newer version"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > at) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO asyncgate_schema (version) VALUES ($1)",
            &[version],
        )
        .await?;
        log::info!("database schema migrated to version {version}");
    }
    tx.commit().await?;
    Ok(())
}

/// The installation's salt (credentials hash differently in each), made
/// by the first node to start.
pub async fn salt(client: &Client) -> Result<[u8; 32], StoreError> {
    let mut fresh = [0u8; 32];
    getrandom::getrandom(&mut fresh)
        .map_err(|e| StoreError::Io(std::io::Error::other(e.to_string())))?;
    client
        .execute(
            "INSERT INTO asyncgate_meta (key, value) VALUES ('salt', $1)
             ON CONFLICT (key) DO NOTHING",
            &[&&fresh[..]],
        )
        .await?;
    let row = client
        .query_one("SELECT value FROM asyncgate_meta WHERE key = 'salt'", &[])
        .await?;
    let v: Vec<u8> = row.get(0);
    <[u8; 32]>::try_from(v.as_slice())
        .map_err(|_| StoreError::Codec("salt has the wrong length".into()))
}
