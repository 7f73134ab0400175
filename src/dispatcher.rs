//! The execution loop: asks the scheduler which lane goes next, claims that
//! lane's head in the store (`started`, made durable before anything is
//! sent), sends it upstream and records what happened. One task on one
//! thread: awc's client is `!Send`, and a single loop keeps the scheduler's
//! state free of locks. HTTP handlers only store and wake it (`Handle`).

use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use tokio::sync::{Notify, mpsc, watch};

use crate::crypto::{CryptoError, Sealer};
use crate::metrics::Metrics;
use crate::model::{LaneKey, Outcome, RequestId, RequestRecord, is_idempotent, now_ms};
use crate::scheduler::{Feedback, Hints, Limits, Next, Scheduler, pacing};
use crate::store::{Claim, Completion, Settle, Store, StoreError};
use crate::upstream::{Answer, Attempt, Upstream};

#[derive(Debug, thiserror::Error)]
enum ExecError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

mod pauses;
pub use pauses::Pauses;

/// How long one call of `dispatch` goes on claiming before the loop looks
/// at its other inputs.
const ROUNDS_FOR: Duration = Duration::from_millis(20);

enum Event {
    Queued(LaneKey),
    Finished(LaneKey, Feedback),
    /// An attempt's task panicked: the engine cannot account for its slot.
    Panicked(RequestId),
}

/// How HTTP handlers (on other threads) wake the loop after a commit.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Event>,
    /// False once the loop has ended: `/healthz` reports it.
    alive: Arc<AtomicBool>,
}

impl Handle {
    pub fn queued(&self, lane: LaneKey) {
        let _ = self.tx.send(Event::Queued(lane));
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Relaxed)
    }
}

/// Everything an execution needs, shared by the loop's tasks.
pub struct Context {
    pub store: Arc<Store>,
    pub sealer: Sealer,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    /// Woken when a `done` with a callback is on disk.
    pub callbacks: Arc<Notify>,
    pub limits: Limits,
    pub retention: Duration,
    pub unknown_retention: Duration,
    pub shutdown_timeout: Duration,
    /// Published for the status view.
    pub pauses: Pauses,
}

pub fn channel() -> (Handle, Receiver) {
    let (tx, rx) = mpsc::unbounded_channel();
    let alive = Arc::new(AtomicBool::new(true));
    (
        Handle {
            tx: tx.clone(),
            alive: alive.clone(),
        },
        Receiver { tx, rx, alive },
    )
}

/// The loop's end of the channel.
pub struct Receiver {
    tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
    alive: Arc<AtomicBool>,
}

/// Why the loop ended other than by `stop`: the engine cannot go on, and
/// the process should stop (non-zero) so its supervisor restarts it and
/// recovery runs (crash-only: recovery is correct and fast).
#[derive(Debug, thiserror::Error)]
pub enum EngineFailure {
    #[error("reading the queues failed: {0}")]
    Queues(StoreError),
    #[error("the attempt for request {0} panicked")]
    Panicked(RequestId),
}

/// Sets `alive` false when the loop ends, by return or by panic, so
/// `/healthz` never reports a dead engine as healthy.
struct AliveGuard(Arc<AtomicBool>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Runs until `stop` turns true, then lets attempts in flight finish for up
/// to the shutdown timeout (the rest are recovered on the next start).
pub async fn run(
    ctx: Context,
    mut chan: Receiver,
    mut stop: watch::Receiver<bool>,
) -> Result<(), EngineFailure> {
    let _alive = AliveGuard(chan.alive.clone());
    let ctx = Rc::new(ctx);
    let mut sched = Scheduler::new(ctx.limits);
    let pending = ctx.store.pending_lanes().await;
    for lane in pending.map_err(EngineFailure::Queues)? {
        sched.queued(lane);
    }
    let mut wake_at: Option<Instant> = None;
    let mut give_up_at: Option<Instant> = None;
    let rescan_every = ctx.store.rescan_every();
    let mut rescan_at = rescan_every.map(|every| Instant::now() + every);
    // What other nodes queued (a store several nodes share).
    let mut remote = ctx.store.remote_queued();
    loop {
        if let (Some(at), Some(every)) = (rescan_at, rescan_every)
            && at <= Instant::now()
        {
            rescan(&ctx, &mut sched).await;
            rescan_at = Some(Instant::now() + every);
        }
        if give_up_at.is_none() {
            wake_at = dispatch(&ctx, &mut sched, &mut chan, &stop).await?;
        } else if sched.in_flight() == 0 {
            break;
        }
        ctx.metrics.set_lanes(sched.lanes());
        if sched.take_shrunk() {
            release_freed_memory();
        }
        let sleep_until = give_up_at.or([wake_at, sched.housekeeping_at(), rescan_at]
            .into_iter()
            .flatten()
            .min());
        tokio::select! {
            ev = chan.rx.recv() => {
                let Some(ev) = ev else { break };
                // Everything that arrived meanwhile too: the next dispatch
                // then claims every freed slot in one store round, instead
                // of one round per finished attempt.
                apply_event(&mut sched, &ctx.pauses, ev)?;
                apply_pending(&mut sched, &ctx.pauses, &mut chan.rx)?;
            }
            Some(lane) = recv_opt(&mut remote) => {
                sched.queued(lane);
                while let Some(lane) = remote.as_mut().and_then(|r| r.try_recv().ok()) {
                    sched.queued(lane);
                }
            }
            _ = sleep_opt(sleep_until) => {
                if give_up_at.is_some_and(|t| t <= Instant::now()) {
                    log::warn!("{} upstream calls still running at the shutdown deadline; they stay `started` and are recovered on the next start", sched.in_flight());
                    break;
                }
            }
            changed = stop.changed(), if give_up_at.is_none() => {
                if changed.is_err() || *stop.borrow() {
                    log::info!("dispatch stopped; waiting for {} upstream calls", sched.in_flight());
                    give_up_at = Some(Instant::now() + ctx.shutdown_timeout);
                }
            }
        }
    }
    log::info!("dispatcher stopped");
    Ok(())
}

/// Marks every lane the store holds queued requests for: on a store whose
/// claims may skip a row another transaction holds (PostgreSQL's `SKIP
/// LOCKED`), a lane found empty for a moment is found again here.
async fn rescan(ctx: &Context, sched: &mut Scheduler) {
    match ctx.store.pending_lanes().await {
        Ok(lanes) => lanes.into_iter().for_each(|lane| sched.queued(lane)),
        Err(e) => log::warn!("looking for queued requests failed: {e}"),
    }
}

fn apply_event(sched: &mut Scheduler, pauses: &Pauses, ev: Event) -> Result<(), EngineFailure> {
    match ev {
        Event::Queued(lane) => sched.queued(lane),
        Event::Finished(lane, fb) => {
            sched.finished(lane, Instant::now(), fb);
            pauses.publish(lane, sched);
        }
        Event::Panicked(id) => {
            log::error!(
                "the attempt for request {id} panicked; the engine stops (it stays `started` and is recovered on the next start)"
            );
            return Err(EngineFailure::Panicked(id));
        }
    }
    Ok(())
}

/// Applies every event already waiting, without waiting for more.
fn apply_pending(
    sched: &mut Scheduler,
    pauses: &Pauses,
    rx: &mut mpsc::UnboundedReceiver<Event>,
) -> Result<(), EngineFailure> {
    while let Ok(ev) = rx.try_recv() {
        apply_event(sched, pauses, ev)?;
    }
    Ok(())
}

/// After a flood of credentials has drained, glibc keeps the freed pages
/// of the scheduler's tables in its arenas: give them back to the system,
/// so that memory follows what is active (SPEC §9).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system; it has no
    // preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn recv_opt(rx: &mut Option<mpsc::UnboundedReceiver<LaneKey>>) -> Option<LaneKey> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_opt(until: Option<Instant>) {
    match until {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Starts every attempt the scheduler allows now, claiming them in one
/// durable store round each; returns when to look again. The claims are
/// awaited here, not in a task: events (a requeue's `Finished`) are then
/// always applied to the scheduler after the claim that may have missed
/// them, never before. The rounds end when no slot is free, or after
/// `ROUNDS_FOR` or a stop, so that the loop hears its other inputs (the
/// attempts that finished meanwhile, the stop itself, other nodes' lanes,
/// the rescan) during a long drain. Finished attempts are not applied
/// between rounds: their slots then go in one larger claim round (the
/// embedded store's drain ran 13% slower with a round per few slots).
async fn dispatch(
    ctx: &Rc<Context>,
    sched: &mut Scheduler,
    chan: &mut Receiver,
    stop: &watch::Receiver<bool>,
) -> Result<Option<Instant>, EngineFailure> {
    let began = Instant::now();
    let tx = &chan.tx;
    loop {
        // A node whose heartbeat is overdue claims nothing: it could not send.
        if ctx.store.may_send().is_err() {
            return Ok(Some(Instant::now() + Duration::from_millis(250)));
        }
        if *stop.borrow() || began.elapsed() >= ROUNDS_FOR {
            return Ok(Some(Instant::now()));
        }
        let now = Instant::now();
        let mut lanes = Vec::new();
        let wake = loop {
            match sched.next(now) {
                Next::Dispatch(lane) => lanes.push(lane),
                Next::At(t) => break Some(t),
                Next::Idle => break None,
            }
        };
        if lanes.is_empty() {
            return Ok(wake);
        }
        match ctx.store.claim_batch(&lanes, now_ms()).await {
            Ok(claims) => {
                for (lane, claim) in lanes.into_iter().zip(claims) {
                    match claim {
                        Claim::Got(rec) => start(ctx, tx, *rec),
                        Claim::Last(rec) => {
                            sched.drained(lane);
                            start(ctx, tx, *rec);
                        }
                        Claim::Empty => sched.empty(lane),
                        Claim::Skipped => {
                            sched.empty(lane);
                            sched.queued(lane);
                        }
                        Claim::Later { after, reason } => {
                            sched.defer(lane, now + after);
                            if let Some(why) = reason {
                                let until = now_ms().saturating_add(after.as_millis() as u64);
                                ctx.pauses.set(lane, until, why);
                            }
                        }
                    }
                }
            }
            Err(e) => {
                log::error!("claiming from the queues failed: {e}");
                for lane in lanes {
                    sched.finished(lane, now, Feedback::Internal);
                }
            }
        }
    }
}

fn start(ctx: &Rc<Context>, tx: &mpsc::UnboundedSender<Event>, rec: RequestRecord) {
    let (ctx, tx) = (Rc::clone(ctx), tx.clone());
    tokio::task::spawn_local(async move {
        let lane = rec.lane;
        // A panic here must not leave a slot taken forever behind a
        // healthy-looking gateway: the loop hears of it and stops.
        let event = match AssertUnwindSafe(execute(&ctx, &rec)).catch_unwind().await {
            Ok(feedback) => Event::Finished(lane, feedback),
            Err(_) => Event::Panicked(rec.id),
        };
        let _ = tx.send(event);
    });
}

/// What one attempt came to, before deciding how to settle it.
enum Happened {
    /// From the upstream: answered, not sent, or maybe sent.
    Upstream(Attempt),
    /// Failed inside the gateway before anything could be sent.
    Internal(ExecError),
}

/// How an attempt is settled, and what the scheduler learns from it.
enum Decision {
    /// The answer is the result: `done`.
    Complete(Box<Answer>, Hints),
    /// Back to the head of its lane, never sent or safe to send again.
    Requeue(Feedback),
    /// A non-idempotent request that may have run: `unknown`.
    Unknown,
}

/// The one classifier: what happened (nothing sent / maybe sent /
/// answered, and with what) to how it settles. Pure, so every branch is
/// unit-tested.
fn decide(method: &str, happened: Happened, now: SystemTime) -> Decision {
    match happened {
        Happened::Internal(_) => Decision::Requeue(Feedback::Internal),
        Happened::Upstream(Attempt::NotSent(_)) => Decision::Requeue(Feedback::NotSent),
        Happened::Upstream(Attempt::MaybeSent(_)) if is_idempotent(method) => {
            Decision::Requeue(Feedback::FailedAfterSend { requeued: true })
        }
        Happened::Upstream(Attempt::MaybeSent(_)) => Decision::Unknown,
        Happened::Upstream(Attempt::Answered(a)) => {
            let hints = Hints::from_headers(&a.head.headers);
            match pacing::verdict(a.head.code, &a.head.headers, now) {
                pacing::Verdict::Refused { retry_after } => {
                    Decision::Requeue(Feedback::Refused { retry_after, hints })
                }
                pacing::Verdict::Result => Decision::Complete(Box::new(a), hints),
            }
        }
    }
}

/// One attempt, from the durable claim to the durably settled result.
async fn execute(ctx: &Context, rec: &RequestRecord) -> Feedback {
    let happened = attempt(ctx, rec).await;
    report(ctx, rec, &happened);
    let (id, claims) = (rec.id, rec.claims);
    let (op, feedback) = match decide(&rec.method, happened, SystemTime::now()) {
        Decision::Complete(a, hints) => {
            let a = *a;
            ctx.metrics.executed(a.head.code, a.exec_ms);
            let done = Completion {
                sent_ms: a.sent_ms,
                outcome: Outcome {
                    code: a.head.code,
                    exec_ms: a.exec_ms,
                    kept: a.kept,
                },
                head: a.head,
                body: a.body,
            };
            let op = Settle::Complete {
                id,
                claims,
                done,
                now_ms: now_ms(),
                retention_ms: ctx.retention.as_millis() as u64,
            };
            (op, Feedback::Answered(hints))
        }
        Decision::Requeue(feedback) => {
            // Whether bytes may have reached the upstream: it counts as an
            // attempt (SPEC §10 `attempts`).
            let sent = matches!(
                feedback,
                Feedback::Refused { .. } | Feedback::FailedAfterSend { .. }
            );
            (Settle::Requeue { id, claims, sent }, feedback)
        }
        Decision::Unknown => {
            log::warn!(
                "request {id}: {} may have run: `unknown`, for an operator",
                rec.method
            );
            let op = Settle::Unknown {
                id,
                claims,
                now_ms: now_ms(),
                keep_ms: ctx.unknown_retention.as_millis() as u64,
            };
            (op, Feedback::FailedAfterSend { requeued: false })
        }
    };
    // What the answer teaches the lane reaches every node before the slot
    // frees: no claim in between goes out under a limit not yet learned.
    if let Err(e) = ctx.store.paced(rec.lane, feedback).await {
        log::warn!("request {id}: recording what the attempt teaches its lane failed ({e})");
    }
    let done_with_callback =
        matches!(op, Settle::Complete { .. } | Settle::Unknown { .. }) && rec.callback.is_some();
    match settle(ctx, op).await {
        Ok(true) if done_with_callback => ctx.callbacks.notify_one(),
        Ok(_) => {}
        Err(e) => log::error!(
            "request {id}: recording the attempt failed ({e}); it stays `started` until the next start recovers it"
        ),
    }
    feedback
}

/// Everything up to and including the upstream exchange. The claim
/// (`started`) is durable before the store hands it out: that is what
/// makes "never twice" hold after a crash.
async fn attempt(ctx: &Context, rec: &RequestRecord) -> Happened {
    let prepared = async {
        let credential = match rec.sealed.as_slice() {
            [] => None,
            sealed => ctx.sealer.unseal_credential(&rec.id, sealed)?,
        };
        let body = ctx.store.request_body(rec).await?;
        // Last, right before sending: a node the others may have presumed
        // dead sends nothing (they settled or will settle this claim).
        ctx.store.may_send()?;
        Ok::<_, ExecError>((credential, body))
    };
    match prepared.await {
        Ok((credential, body)) => {
            Happened::Upstream(ctx.upstream.send(rec, credential.as_deref(), body).await)
        }
        Err(e) => Happened::Internal(e),
    }
}

/// Logs and counts what happened (by id; never credentials or bodies).
fn report(ctx: &Context, rec: &RequestRecord, happened: &Happened) {
    let id = rec.id;
    match happened {
        Happened::Internal(e) => {
            ctx.metrics.internal_failure();
            log::error!(
                "request {id}: not sent, failed inside the gateway ({e}); it stays `enqueued` and is retried"
            );
        }
        Happened::Upstream(Attempt::NotSent(why)) => {
            ctx.metrics.not_sent();
            log::warn!("request {id}: upstream not reached ({why}); retried");
        }
        Happened::Upstream(Attempt::MaybeSent(why)) => {
            ctx.metrics.failed_after_send();
            log::warn!("request {id}: failed after sending began ({why})");
        }
        Happened::Upstream(Attempt::Answered(a)) => {
            if matches!(
                pacing::verdict(a.head.code, &a.head.headers, SystemTime::now()),
                pacing::Verdict::Refused { .. }
            ) {
                ctx.metrics.refused();
            }
        }
    }
}

/// Settles durably. False if the claim was stale (nothing changed).
async fn settle(ctx: &Context, op: Settle) -> Result<bool, StoreError> {
    ctx.store.settle(op).await
}

#[cfg(test)]
mod tests;
