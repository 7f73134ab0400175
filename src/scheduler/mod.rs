//! Who runs next: per-credential lanes served round-robin under global and
//! per-lane concurrency, per-lane pacing (a sliding window of send times),
//! pauses learned from the upstream, and backoff. Pure logic: the time is an
//! argument and nothing here touches the network or the disk, so every rule
//! is unit-tested exactly. The queues themselves stay on disk; a lane here
//! is a few counters and the last window's send times, so memory is
//! O(credentials + in flight + sends per second), never O(queue).

pub mod pacing;
mod shared;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::model::LaneKey;
pub use pacing::{Hints, Verdict};
pub use shared::{SharedLane, Taken};

/// The sliding window for requests-per-second limits, a little over a
/// second: sends and arrivals at the upstream are not equally spaced.
pub const WINDOW: Duration = Duration::from_millis(1050);
const REFUSAL_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));
const OUTAGE_BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));
/// While a quota (hourly, daily) is used up, one probe this often.
pub const PROBE_EVERY: Duration = Duration::from_secs(60);
/// Every pause is at least this long, whatever the upstream says
/// (`Retry-After: 0` on every answer would otherwise be a hot loop)...
pub const MIN_PAUSE: Duration = Duration::from_secs(1);
/// ...and at most this long (`Retry-After: 10000000000000000000` would
/// otherwise overflow the clock).
pub const MAX_PAUSE: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub concurrency: usize,
    pub per_lane_concurrency: usize,
    pub per_lane_rps: Option<u32>,
}

/// Why a lane is paused (SPEC §10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PauseReason {
    /// A 429, a 503 with `Retry-After`, `X-RateLimit-RPS-Remaining: 0`.
    RateLimited,
    /// An hourly or daily quota at 0.
    QuotaExhausted,
    /// Nothing could be sent.
    UpstreamUnreachable,
    /// A safe request retried after a failure after sending.
    Backoff,
}

impl PauseReason {
    pub const ALL: [PauseReason; 4] = [
        PauseReason::RateLimited,
        PauseReason::QuotaExhausted,
        PauseReason::UpstreamUnreachable,
        PauseReason::Backoff,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PauseReason::RateLimited => "rate_limited",
            PauseReason::QuotaExhausted => "quota_exhausted",
            PauseReason::UpstreamUnreachable => "upstream_unreachable",
            PauseReason::Backoff => "backoff",
        }
    }
}

/// How an attempt ended, as far as pacing cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feedback {
    /// The upstream answered and the answer is the result.
    Answered(Hints),
    /// 429, or 503 with `Retry-After`; the request is back at the lane head.
    Refused {
        retry_after: Option<Duration>,
        hints: Hints,
    },
    /// Nothing reached the upstream; the request is back at the lane head.
    NotSent,
    /// Failed after sending; an idempotent request is back in its lane.
    FailedAfterSend { requeued: bool },
    /// Failed inside the gateway before sending (an unreadable body, a
    /// credential that cannot be unsealed); the request is back at the
    /// lane head.
    Internal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Claim the head of this lane now (one slot is reserved for it).
    Dispatch(LaneKey),
    /// Nothing may run before this time.
    At(Instant),
    /// Nothing may run until something changes (a submission, a finish).
    Idle,
}

#[derive(Debug, Default)]
struct Lane {
    /// The lane has queued requests on disk, as far as we know.
    queued: bool,
    /// Whether the lane is in the round-robin ring.
    in_ring: bool,
    in_flight: usize,
    /// No sends before this time (refusals, outages, exhausted quotas).
    paused_until: Option<Instant>,
    /// Why, as the status view says it (SPEC §10 `pause_reason`).
    pause_reason: Option<PauseReason>,
    /// Consecutive rate-limit refusals: the backoff exponent.
    refusals: u32,
    /// Consecutive failures to reach the upstream: the backoff exponent.
    outages: u32,
    /// `X-RateLimit-RPS-Limit` as last seen (in memory only).
    learned_rps: Option<u32>,
    /// Send times inside the last window. Kept even before a limit is
    /// known, so a limit learned mid-second counts the sends already made.
    sent: VecDeque<Instant>,
    /// A quota is used up: one request at a time, as a probe.
    probing: bool,
    /// An entry for this lane is in `Scheduler::reap`.
    reaping: bool,
    /// No claims before this time: the lane's shared limits (other nodes'
    /// sends, pauses) said so.
    not_before: Option<Instant>,
}

impl Lane {
    /// No sends for `d`, clamped to [`MIN_PAUSE`, `MAX_PAUSE`]: the upstream's
    /// numbers are input from outside.
    fn pause(&mut self, now: Instant, d: Duration, why: PauseReason) {
        let d = d.clamp(MIN_PAUSE, MAX_PAUSE);
        let until = now.checked_add(d).unwrap_or(now);
        if self.paused_until.is_none_or(|p| until >= p) {
            self.pause_reason = Some(why);
        }
        self.paused_until = Some(self.paused_until.map_or(until, |p| p.max(until)));
    }

    /// When the lane's state stops mattering if nothing new comes: its
    /// pause is over and its last send has left the rate window. `None`
    /// while it has work queued or in flight.
    fn idle_from(&self, now: Instant) -> Option<Instant> {
        if self.queued || self.in_flight > 0 {
            return None;
        }
        let window_ends = self.sent.back().map(|&t| t + WINDOW);
        Some(match (self.paused_until, window_ends) {
            (Some(a), Some(b)) => a.max(b),
            (a, b) => a.or(b).unwrap_or(now),
        })
    }

    fn paused_at(&self, now: Instant) -> bool {
        self.paused_until.is_some_and(|p| p > now)
    }

    fn rps(&self, limits: &Limits) -> Option<u32> {
        match (limits.per_lane_rps, self.learned_rps) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn forget_sends_before(&mut self, now: Instant) {
        while self.sent.front().is_some_and(|&t| t + WINDOW <= now) {
            self.sent.pop_front();
        }
    }

    /// `Ok` if a request may go now, else when it may (`None`: when a slot
    /// frees up).
    fn ready(&mut self, now: Instant, limits: &Limits) -> Result<(), Option<Instant>> {
        let cap = if self.probing {
            1
        } else {
            limits.per_lane_concurrency
        };
        if self.in_flight >= cap {
            return Err(None);
        }
        if let Some(t) = self.not_before {
            if t > now {
                return Err(Some(t));
            }
            self.not_before = None;
        }
        if let Some(p) = self.paused_until {
            if p > now {
                return Err(Some(p));
            }
            self.paused_until = None;
        }
        self.forget_sends_before(now);
        if let Some(n) = self.rps(limits) {
            let n = n as usize;
            if self.sent.len() >= n {
                return Err(Some(self.sent[self.sent.len() - n] + WINDOW));
            }
        }
        Ok(())
    }
}

pub struct Scheduler {
    limits: Limits,
    lanes: HashMap<LaneKey, Lane>,
    /// Lanes with queued work, in round-robin order.
    ring: VecDeque<LaneKey>,
    in_flight: usize,
    /// Lanes that went idle, by when their state may go (SPEC §9: memory
    /// is bounded by what is active, not by every credential ever seen).
    /// Checked again when due: a lane that got busy meanwhile stays.
    reap: BinaryHeap<Reverse<(Instant, LaneKey)>>,
    /// The tables were shrunk since `take_shrunk` last asked: the caller
    /// may hand freed memory back to the system.
    shrunk: bool,
}

impl Scheduler {
    pub fn new(limits: Limits) -> Scheduler {
        Scheduler {
            limits,
            lanes: HashMap::new(),
            ring: VecDeque::new(),
            in_flight: 0,
            reap: BinaryHeap::new(),
            shrunk: false,
        }
    }

    /// Whether the tables shrank since the last call.
    pub fn take_shrunk(&mut self) -> bool {
        std::mem::take(&mut self.shrunk)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Credentials with state in memory.
    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// Schedules `key`'s state to be dropped once it is idle.
    fn went_idle(&mut self, key: LaneKey, now: Instant) {
        if let Some(lane) = self.lanes.get_mut(&key)
            && !lane.reaping
            && let Some(at) = lane.idle_from(now)
        {
            lane.reaping = true;
            self.reap.push(Reverse((at, key)));
        }
    }

    /// When idle lanes' state is next due to be dropped (by a call to
    /// `next`): the caller's loop should look again by then.
    pub fn housekeeping_at(&self) -> Option<Instant> {
        self.reap.peek().map(|Reverse((at, _))| *at)
    }

    /// Drops the state of lanes idle by `now`.
    fn reap(&mut self, now: Instant) {
        while let Some(&Reverse((at, key))) = self.reap.peek() {
            if at > now {
                return;
            }
            self.reap.pop();
            let Some(lane) = self.lanes.get_mut(&key) else {
                continue;
            };
            lane.reaping = false;
            match lane.idle_from(now) {
                Some(t) if t <= now && !lane.in_ring => {
                    self.lanes.remove(&key);
                }
                Some(t) if t > now => self.went_idle(key, now),
                // Busy again, or still in the ring: scheduled again when
                // it next goes idle.
                _ => {}
            }
        }
        // A flood's tables keep their size after it: give the memory back
        // once they are mostly empty.
        if self.lanes.capacity() > 1024 && self.lanes.len() < self.lanes.capacity() / 4 {
            self.lanes.shrink_to(self.lanes.len() * 2);
            self.ring.shrink_to(self.ring.len() * 2);
            self.reap.shrink_to(self.reap.len() * 2);
            self.shrunk = true;
        }
    }

    /// The lane has (new) queued requests. A lane that was idle joins at
    /// the front: it has not been served in this round, so a fresh
    /// credential's single request does not wait behind a backlog's turn.
    pub fn queued(&mut self, key: LaneKey) {
        let lane = self.lanes.entry(key).or_default();
        lane.queued = true;
        if !lane.in_ring {
            lane.in_ring = true;
            self.ring.push_front(key);
        }
    }

    /// Picks the next lane to serve, round-robin, and reserves a slot.
    pub fn next(&mut self, now: Instant) -> Next {
        self.reap(now);
        if self.in_flight >= self.limits.concurrency {
            return Next::Idle;
        }
        let mut earliest: Option<Instant> = None;
        for _ in 0..self.ring.len() {
            let Some(key) = self.ring.pop_front() else {
                break;
            };
            let Some(lane) = self.lanes.get_mut(&key) else {
                continue;
            };
            if !lane.queued {
                lane.in_ring = false;
                self.went_idle(key, now);
                continue;
            }
            self.ring.push_back(key);
            match lane.ready(now, &self.limits) {
                Ok(()) => {
                    lane.in_flight += 1;
                    lane.sent.push_back(now);
                    self.in_flight += 1;
                    return Next::Dispatch(key);
                }
                Err(Some(t)) => earliest = Some(earliest.map_or(t, |e| e.min(t))),
                Err(None) => {}
            }
        }
        earliest.map_or(Next::Idle, Next::At)
    }

    /// The claim after `Dispatch` found the lane empty: the slot is returned.
    pub fn empty(&mut self, key: LaneKey) {
        if let Some(lane) = self.lanes.get_mut(&key) {
            lane.queued = false;
            lane.in_flight = lane.in_flight.saturating_sub(1);
            lane.sent.pop_back();
            self.in_flight = self.in_flight.saturating_sub(1);
        }
    }

    /// The claim after `Dispatch` took the last request the lane held: it
    /// is not queued any more (its slot stays taken until it finishes).
    /// A submission after the claim calls `queued` again.
    pub fn drained(&mut self, key: LaneKey) {
        if let Some(lane) = self.lanes.get_mut(&key) {
            lane.queued = false;
        }
    }

    /// Until when `key` is paused, and why; `None` when it is not.
    pub fn pause_of(&self, key: &LaneKey, now: Instant) -> Option<(Instant, PauseReason)> {
        let lane = self.lanes.get(key)?;
        let until = lane.paused_until.filter(|p| *p > now)?;
        Some((until, lane.pause_reason?))
    }

    /// An attempt from `key` ended.
    pub fn finished(&mut self, key: LaneKey, now: Instant, feedback: Feedback) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let lane = self.lanes.entry(key).or_default();
        lane.in_flight = lane.in_flight.saturating_sub(1);
        if lane.finished(now, feedback) {
            self.queued(key);
        } else {
            self.went_idle(key, now);
        }
    }

    /// The claim after `Dispatch` found that the lane may not send before
    /// `until` (its limits as other nodes share them): the slot is
    /// returned, and the lane waits.
    pub fn defer(&mut self, key: LaneKey, until: Instant) {
        self.empty(key);
        if let Some(lane) = self.lanes.get_mut(&key) {
            lane.not_before = Some(until);
        }
        self.queued(key);
    }
}

impl Lane {
    /// Learns from an attempt's end: backoff, pauses, learned limits.
    /// True if the request is back in the lane's queue.
    fn finished(&mut self, now: Instant, feedback: Feedback) -> bool {
        let hints = match feedback {
            Feedback::Answered(h) => {
                self.refusals = 0;
                self.outages = 0;
                self.probing = h.quota_exhausted;
                h
            }
            Feedback::Refused { retry_after, hints } => {
                // Attempts in flight together fail together: one step each.
                if !self.paused_at(now) {
                    self.refusals += 1;
                }
                let (base, cap) = REFUSAL_BACKOFF;
                let wait =
                    retry_after.unwrap_or_else(|| pacing::doubling(base, self.refusals, cap));
                self.pause(now, wait, PauseReason::RateLimited);
                if self.probing {
                    self.pause(now, PROBE_EVERY, PauseReason::QuotaExhausted);
                }
                hints
            }
            Feedback::NotSent
            | Feedback::FailedAfterSend { requeued: true }
            | Feedback::Internal => {
                if !self.paused_at(now) {
                    self.outages += 1;
                }
                let (base, cap) = OUTAGE_BACKOFF;
                let why = match feedback {
                    Feedback::FailedAfterSend { .. } => PauseReason::Backoff,
                    _ => PauseReason::UpstreamUnreachable,
                };
                self.pause(now, pacing::doubling(base, self.outages, cap), why);
                Hints::default()
            }
            Feedback::FailedAfterSend { requeued: false } => Hints::default(),
        };
        if let Some(n) = hints.rps_limit {
            self.learned_rps = Some(n);
        }
        if hints.second_exhausted {
            self.pause(now, Duration::from_secs(1), PauseReason::RateLimited);
        }
        if hints.quota_exhausted {
            self.probing = true;
            self.pause(now, PROBE_EVERY, PauseReason::QuotaExhausted);
        }
        match feedback {
            Feedback::Refused { .. } | Feedback::NotSent | Feedback::Internal => true,
            Feedback::FailedAfterSend { requeued } => requeued,
            Feedback::Answered(_) => false,
        }
    }
}

#[cfg(test)]
mod tests;
