//! Builds and runs the gateway: opens the store (recovering what a crash
//! left `started`), starts the dispatcher, callback delivery, retention
//! sweep and HTTP server, and stops them in order. The only module that
//! knows all the others.

use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::{App, HttpServer, web};
use tokio::sync::{Notify, watch};

use crate::callback::{Callbacks, SecretError, Signer};
use crate::config::GatewayArgs;
use crate::crypto::{CryptoError, Sealer};
use crate::metrics::Metrics;
use crate::model::{RequestId, now_ms};
use crate::net::{self, AddressPolicy};
use crate::scheduler::Limits;
use crate::store::{PgConfig, SledConfig, Store, StoreConfig, StoreError};
use crate::sweeper::Sweeper;
use crate::upstream::{self, Upstream, UpstreamError};
use crate::{dispatcher, http};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error(transparent)]
    CallbackSecret(#[from] SecretError),
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("{0}")]
    Config(String),
    #[error("the execution engine failed: {0}")]
    Engine(String),
}

/// A started gateway.
pub struct Running {
    pub addr: SocketAddr,
    /// `--ops-listen`'s address, when the operator's endpoints have their
    /// own listener.
    pub ops_addr: Option<SocketAddr>,
    server: actix_web::dev::ServerHandle,
    server_task: tokio::task::JoinHandle<std::io::Result<()>>,
    ops_server: Option<Server>,
    stop: watch::Sender<bool>,
    dispatcher: tokio::task::JoinHandle<Result<(), dispatcher::EngineFailure>>,
    callbacks: tokio::task::JoinHandle<()>,
    sweeper: Sweeper,
    store: Arc<Store>,
}

/// Starts everything; recovery is complete before the first answer.
/// Must run inside an actix system (`#[actix_web::main]` or `::test`).
/// The id the key canary is sealed under (no request has it: request ids
/// carry the time they were made).
const CANARY_ID: RequestId = RequestId([0; 16]);

fn limits(args: &GatewayArgs) -> Limits {
    Limits {
        concurrency: args.concurrency,
        per_lane_concurrency: args.per_credential_concurrency,
        per_lane_rps: args.per_credential_rps,
    }
}

pub async fn start(upstream_base: &str, args: &GatewayArgs) -> Result<Running, AppError> {
    if args.concurrency == 0 || args.per_credential_concurrency == 0 {
        return Err(AppError::Config(
            "--concurrency and --per-credential-concurrency must be at least 1".into(),
        ));
    }
    // A body or a response is one journal entry, whose length is 32 bits.
    if args.max_body_size > 1 << 30 || args.max_response_size > 1 << 30 {
        return Err(AppError::Config(
            "--max-body-size and --max-response-size are at most 1GiB".into(),
        ));
    }
    if args.store.is_some() && args.node_heartbeat_timeout < std::time::Duration::from_secs(1) {
        return Err(AppError::Config(
            "--node-heartbeat-timeout must be at least 1s".into(),
        ));
    }
    if args.per_credential_rps == Some(0) {
        return Err(AppError::Config(
            "--per-credential-rps must be at least 1 (leave it out for no limit)".into(),
        ));
    }
    let base = upstream::normalize_base(upstream_base)?;
    let tls = upstream::tls_config(args.upstream_ca_file.as_deref())?;
    let config = match &args.store {
        Some(url) => StoreConfig::Postgres(PgConfig {
            url: url.clone(),
            data_dir: args.data_dir.clone(),
            heartbeat_timeout: args.node_heartbeat_timeout,
            limits: limits(args),
            unknown_keep_ms: args.unknown_retention.as_millis() as u64,
        }),
        None => StoreConfig::Sled(SledConfig {
            path: args.data_dir.clone(),
            cache_capacity: args.cache_capacity,
        }),
    };
    let store = Arc::new(Store::open(config).await?);
    let first_sealed = store.first_sealed().await?;
    let canary = store.key_canary().await?;
    let sealer =
        Sealer::load_or_create(&args.key_file(), first_sealed.is_some() || canary.is_some())?;
    // A wrong key file stops the start (SPEC §6) before recovery changes
    // anything; one sealed credential is enough to tell, since one key
    // sealed them all.
    if let Some((id, sealed)) = &first_sealed {
        sealer.check(id, sealed)?;
    }
    // Nodes sharing a database share the key (SPEC §12): the first seals
    // a canary, and a node whose key file cannot unseal it stops here,
    // before it seals a credential the others could not read.
    let canary = match canary {
        Some(c) => Some(c),
        None => {
            let mine = sealer.seal_credential(&CANARY_ID, None)?;
            store.set_key_canary(mine).await?
        }
    };
    if let Some(c) = &canary {
        sealer.check_canary(&CANARY_ID, c)?;
    }
    // Read (or made) with the data dir locked: two gateways of one data
    // dir never race to make it. A malformed one stops the start: each
    // callback signed with it would be refused.
    let signer = args
        .callback_secret_file
        .as_deref()
        .map(Signer::load_or_create)
        .transpose()?;
    let recovered = store
        .recover(now_ms(), args.unknown_retention.as_millis() as u64)
        .await?;
    if recovered.requeued + recovered.unknown > 0 {
        log::warn!(
            "recovered from a crash: {} safe requests requeued, {} marked unknown",
            recovered.requeued,
            recovered.unknown
        );
    }
    let metrics = Arc::new(Metrics::default());
    let callback_wake = Arc::new(Notify::new());
    let (stop, stop_rx) = watch::channel(false);
    let pauses = dispatcher::Pauses::default();
    raise_open_files_limit();
    let (handle, receiver) = dispatcher::channel();

    let ctx = dispatcher::Context {
        store: store.clone(),
        sealer: sealer.clone(),
        upstream: Upstream::new(
            net::client(
                tls.clone(),
                args.connect_timeout,
                args.upstream_keep_alive,
                None,
            ),
            base,
            args.upstream_timeout,
            args.max_response_size,
        ),
        metrics: metrics.clone(),
        callbacks: callback_wake.clone(),
        limits: limits(args),
        retention: args.retention,
        unknown_retention: args.unknown_retention,
        shutdown_timeout: args.shutdown_timeout,
        pauses: pauses.clone(),
    };
    let dispatcher = tokio::task::spawn_local(dispatcher::run(ctx, receiver, stop_rx.clone()));
    let callbacks = Callbacks {
        store: store.clone(),
        client: net::client(
            tls,
            args.connect_timeout,
            args.upstream_keep_alive,
            Some(AddressPolicy::callbacks(
                &args.callback_deny,
                &args.callback_allow,
            )),
        ),
        metrics: metrics.clone(),
        public_url: args.public_url.clone(),
        signer,
        wake: callback_wake,
        shutdown_timeout: args.shutdown_timeout,
    };
    let callbacks = tokio::task::spawn_local(callbacks.run(stop_rx));
    let sweeper = Sweeper::start(store.clone());

    let state = web::Data::new(http::State {
        store: store.clone(),
        sealer,
        dispatch: handle,
        metrics,
        max_body_size: args.max_body_size,
        max_pending_per_credential: args.max_pending_per_credential,
        min_free_disk: args.min_free_disk,
        public_url: args.public_url.clone(),
        admin_token: args.admin_token.clone(),
        max_wait: args.max_wait,
        shutdown: stop.subscribe(),
        pauses,
        oldest_queued: Default::default(),
    });
    let public = if args.ops_listen.is_some() {
        http::Face::Public
    } else {
        http::Face::All
    };
    let (addr, server) = serve(&state, public, args.listen, args)?;
    log::info!("asyncgate listening on http://{addr}");
    let (ops_addr, ops_server) = match args.ops_listen {
        Some(at) => {
            let (ops_addr, ops) = serve(&state, http::Face::Ops, at, args)?;
            log::info!(
                "operations endpoints (/healthz, /metrics, /openapi.json, /admin) on http://{ops_addr}"
            );
            (Some(ops_addr), Some(ops))
        }
        None => (None, None),
    };
    Ok(Running {
        addr,
        ops_addr,
        server: server.handle,
        server_task: server.task,
        ops_server,
        stop,
        dispatcher,
        callbacks,
        sweeper,
        store,
    })
}

/// One listener's HTTP server, running.
struct Server {
    handle: actix_web::dev::ServerHandle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn stop(self, graceful: bool) {
        self.handle.stop(graceful).await;
        let _ = self.task.await;
    }
}

/// Binds `at` and serves `face`'s routes there. The operations listener
/// gets one worker: its traffic is a scrape and an operator.
fn serve(
    state: &web::Data<http::State>,
    face: http::Face,
    at: SocketAddr,
    args: &GatewayArgs,
) -> Result<(SocketAddr, Server), AppError> {
    let state = state.clone();
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .configure(|cfg| http::routes(cfg, face))
    })
    .disable_signals()
    .shutdown_timeout(args.shutdown_timeout.as_secs().max(1));
    if face == http::Face::Ops {
        server = server.workers(1);
    } else if let Some(n) = args.workers {
        server = server.workers(n.max(1));
    }
    let server = server.bind(at).map_err(|e| AppError::Listen(at, e))?;
    let addr = server.addrs().first().copied().unwrap_or(at);
    let server = server.run();
    let handle = server.handle();
    let task = tokio::task::spawn_local(server);
    Ok((addr, Server { handle, task }))
}

impl Running {
    /// Graceful stop: dispatching stops at once (HTTP may still be draining
    /// submissions, which stay queued for the next start), calls in flight
    /// may finish (the dispatcher bounds that by the shutdown timeout), then
    /// everything is flushed.
    pub async fn stop(self) -> Result<(), AppError> {
        let _ = self.stop.send(true);
        self.server.stop(true).await;
        let _ = self.server_task.await;
        if let Some(ops) = self.ops_server {
            ops.stop(true).await;
        }
        let engine = self.dispatcher.await;
        let _ = self.callbacks.await;
        self.sweeper.stop();
        match self.store.leave().await {
            Ok(r) if r.requeued + r.unknown > 0 => log::warn!(
                "left the cluster: {} safe requests still running requeued, {} marked unknown",
                r.requeued,
                r.unknown
            ),
            Ok(_) => {}
            Err(e) => log::warn!(
                "leaving the cluster failed ({e}); the other nodes settle this node's requests when its heartbeat times out"
            ),
        }
        self.store.close()?;
        if let Ok(Err(e)) = engine {
            return Err(AppError::Engine(e.to_string()));
        }
        log::info!("asyncgate stopped");
        Ok(())
    }
}

/// Runs until SIGTERM or SIGINT, then stops gracefully. If the execution
/// engine fails first, the gateway stops with an error: a gateway that
/// answers but runs nothing is worse than a restart, and recovery on the
/// next start is correct (crash-only).
pub async fn run_until_signal(mut running: Running) -> Result<(), AppError> {
    let fatal = running.store.fatal().clone();
    tokio::select! {
        _ = wait_for_signal() => {
            log::info!("signal received: stopping");
            running.stop().await
        }
        why = fatal.wait() => {
            log::error!("stopping: the store cannot make writes durable ({why}); a restart recovers");
            // Writers waiting on the failed flush get their 503s first.
            let _ = running.stop.send(true);
            running.server.stop(true).await;
            if let Some(ops) = running.ops_server.take() {
                ops.stop(true).await;
            }
            let _ = running.callbacks.await;
            running.sweeper.stop();
            let _ = running.store.close();
            Err(AppError::Engine(format!("store failure: {why}")))
        }
        ended = &mut running.dispatcher => {
            let why = match ended {
                Ok(Ok(())) => "the dispatcher stopped by itself".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(e) => format!("the dispatcher task failed: {e}"),
            };
            log::error!("the execution engine failed ({why}); stopping so that a restart recovers");
            let _ = running.stop.send(true);
            running.server.stop(false).await;
            if let Some(ops) = running.ops_server.take() {
                ops.stop(false).await;
            }
            let _ = running.callbacks.await;
            running.sweeper.stop();
            running.store.close()?;
            Err(AppError::Engine(why))
        }
    }
}

/// Held long-polls each keep a connection: raise the soft limit on open
/// files to the hard one (SPEC §10: at least 10,000 may wait at once).
fn raise_open_files_limit() {
    // SAFETY: getrlimit/setrlimit read and write a plain struct; no
    // memory is kept past the calls.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                log::warn!(
                    "could not raise the open files limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            log::error!("cannot install signal handlers; stop with kill -9 only");
            std::future::pending::<()>().await
        }
    }
}
