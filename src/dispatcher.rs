//! The execution loop: asks the scheduler which lane goes next, claims that
//! lane's head in the store (`started`, made durable before anything is
//! sent), sends it upstream and records what happened. One task on one
//! thread: awc's client is `!Send`, and a single loop keeps the scheduler's
//! state free of locks. HTTP handlers only store and wake it (`Handle`).

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, mpsc, watch};

use crate::crypto::{CryptoError, Sealer};
use crate::metrics::Metrics;
use crate::model::{LaneKey, Outcome, RequestRecord, is_idempotent, now_ms};
use crate::scheduler::{Feedback, Hints, Limits, Next, Scheduler, pacing};
use crate::store::{Claim, Completion, Settle, Store, StoreError, Ticket};
use crate::upstream::{Attempt, Upstream};

#[derive(Debug, thiserror::Error)]
enum ExecError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

enum Event {
    Queued(LaneKey),
    Finished(LaneKey, Feedback),
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

/// Runs until `stop` turns true, then lets attempts in flight finish for up
/// to the shutdown timeout (the rest are recovered on the next start).
pub async fn run(ctx: Context, mut chan: Receiver, mut stop: watch::Receiver<bool>) {
    let ctx = Rc::new(ctx);
    let mut sched = Scheduler::new(ctx.limits);
    match ctx.store.pending_lanes() {
        Ok(lanes) => lanes.into_iter().for_each(|l| sched.queued(l)),
        Err(e) => log::error!("reading the queues failed: {e}"),
    }
    let mut wake_at: Option<Instant> = None;
    let mut give_up_at: Option<Instant> = None;
    loop {
        if give_up_at.is_none() {
            wake_at = dispatch(&ctx, &mut sched, &chan.tx);
        } else if sched.in_flight() == 0 {
            break;
        }
        let sleep_until = give_up_at.or(wake_at);
        tokio::select! {
            ev = chan.rx.recv() => match ev {
                Some(Event::Queued(lane)) => sched.queued(lane),
                Some(Event::Finished(lane, fb)) => sched.finished(lane, Instant::now(), fb),
                None => break,
            },
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
    chan.alive.store(false, Ordering::Relaxed);
    log::info!("dispatcher stopped");
}

async fn sleep_opt(until: Option<Instant>) {
    match until {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Starts every attempt the scheduler allows now, claiming them in one
/// transaction per round; returns when to look again.
fn dispatch(
    ctx: &Rc<Context>,
    sched: &mut Scheduler,
    tx: &mpsc::UnboundedSender<Event>,
) -> Option<Instant> {
    loop {
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
            return wake;
        }
        match ctx.store.claim_batch(&lanes, now_ms()) {
            Ok((claims, ticket)) => {
                for (lane, claim) in lanes.into_iter().zip(claims) {
                    match claim {
                        Claim::Got(rec) => start(ctx, tx, *rec, ticket),
                        Claim::Empty => sched.empty(lane),
                        Claim::Skipped => {
                            sched.empty(lane);
                            sched.queued(lane);
                        }
                    }
                }
            }
            Err(e) => {
                log::error!("claiming from the queues failed: {e}");
                for lane in lanes {
                    sched.finished(lane, now, Feedback::NotSent);
                }
            }
        }
    }
}

fn start(ctx: &Rc<Context>, tx: &mpsc::UnboundedSender<Event>, rec: RequestRecord, ticket: Ticket) {
    let (ctx, tx) = (Rc::clone(ctx), tx.clone());
    tokio::task::spawn_local(async move {
        let feedback = execute(&ctx, &rec, ticket).await.unwrap_or_else(|e| {
            log::error!(
                "request {}: {e}; it stays `started` until the next start recovers it",
                rec.id
            );
            Feedback::FailedAfterSend { requeued: false }
        });
        let _ = tx.send(Event::Finished(rec.lane, feedback));
    });
}

/// One attempt, from the durable claim to the stored result.
async fn execute(
    ctx: &Context,
    rec: &RequestRecord,
    claimed: Ticket,
) -> Result<Feedback, ExecError> {
    // `started` must be on disk before anything is sent: that is what makes
    // "never twice" hold after a crash.
    if let Err(e) = ctx.store.durable(claimed).await {
        log::error!(
            "request {}: the claim is not durable ({e}); not sending",
            rec.id
        );
        requeue(ctx, rec).await?;
        return Ok(Feedback::NotSent);
    }
    let sealed = ctx.store.sealed_credential(&rec.id)?;
    let credential = match sealed {
        Some(s) => ctx.sealer.unseal_credential(&rec.id, &s)?,
        None => None,
    };
    let body = ctx.store.request_body(rec)?;
    let attempt = ctx.upstream.send(rec, credential.as_deref(), body).await;
    match attempt {
        Attempt::Answered(a) => {
            let hints = Hints::from_headers(&a.head.headers);
            if let pacing::Verdict::Refused { retry_after } =
                pacing::verdict(a.head.code, &a.head.headers, SystemTime::now())
            {
                ctx.metrics.refused();
                requeue(ctx, rec).await?;
                return Ok(Feedback::Refused { retry_after, hints });
            }
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
                id: rec.id,
                claims: rec.claims,
                done,
                now_ms: now_ms(),
                retention_ms: ctx.retention.as_millis() as u64,
            };
            if let Some(t) = ctx.store.settle(op).await? {
                ctx.store.durable(t).await?;
                if rec.callback.is_some() {
                    ctx.callbacks.notify_one();
                }
            }
            Ok(Feedback::Answered(hints))
        }
        Attempt::NotSent(why) => {
            log::warn!("request {}: upstream not reached: {why}", rec.id);
            ctx.metrics.not_sent();
            requeue(ctx, rec).await?;
            Ok(Feedback::NotSent)
        }
        Attempt::FailedAfterSend(why) if is_idempotent(&rec.method) => {
            log::warn!(
                "request {}: failed after sending ({why}); {} is safe to retry",
                rec.id,
                rec.method
            );
            ctx.metrics.failed_after_send();
            requeue(ctx, rec).await?;
            Ok(Feedback::FailedAfterSend { requeued: true })
        }
        Attempt::FailedAfterSend(why) => {
            log::warn!(
                "request {}: failed after sending ({why}); {} may have run: `unknown`",
                rec.id,
                rec.method
            );
            ctx.metrics.failed_after_send();
            let keep = ctx.unknown_retention.as_millis() as u64;
            let op = Settle::Unknown {
                id: rec.id,
                claims: rec.claims,
                now_ms: now_ms(),
                keep_ms: keep,
            };
            if let Some(t) = ctx.store.settle(op).await? {
                ctx.store.durable(t).await?;
            }
            Ok(Feedback::FailedAfterSend { requeued: false })
        }
    }
}

/// Back to the head of its lane, durably: after a crash it must not look
/// `started` (and so possibly sent) when it was refused or never sent.
async fn requeue(ctx: &Context, rec: &RequestRecord) -> Result<(), ExecError> {
    let op = Settle::Requeue {
        id: rec.id,
        claims: rec.claims,
    };
    if let Some(t) = ctx.store.settle(op).await? {
        ctx.store.durable(t).await?;
    }
    Ok(())
}
