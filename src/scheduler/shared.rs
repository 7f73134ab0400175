//! A lane's pacing state as several nodes share it (SPEC §12): the same
//! rules as one node's `Lane` (the sliding window of sends, pauses,
//! backoff, learned limits), kept in the database's lane row in wall-clock
//! milliseconds of the database's clock, and applied by whichever node
//! holds the row's lock. The rules are not written twice: the row is
//! turned into a `Lane` at the database's "now", changed, and turned back.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{Feedback, Lane, Limits, MAX_PAUSE, PauseReason, WINDOW};

/// A lane row's pacing columns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedLane {
    pub paused_until_ms: Option<u64>,
    pub pause_reason: Option<PauseReason>,
    pub refusals: u32,
    pub outages: u32,
    pub learned_rps: Option<u32>,
    pub probing: bool,
    /// Send times (claims) inside the last window, oldest first.
    pub sent_ms: Vec<u64>,
}

/// What a lane may do now, cluster-wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Taken {
    /// This many sends (of those asked for) may go now; they are counted
    /// in the window.
    pub go: usize,
    /// Why the rest may not: in this many milliseconds (`None`: when an
    /// attempt in flight on some node ends), and the pause, if one holds.
    pub held: Option<(Option<u64>, Option<PauseReason>)>,
}

/// Sends kept in a row while no limit is known: enough for any
/// per-second limit an API teaches later, within its first second.
const SENDS_KEPT: usize = 100;
/// Sends kept in a row at most, whatever the limit: a limit above it is
/// enforced by each node alone.
const SENDS_MAX: usize = 10_000;

/// Instants for the database's milliseconds, anchored at one moment.
struct Clock {
    at: Instant,
    now_ms: u64,
}

impl Clock {
    fn instant(&self, ms: u64) -> Instant {
        if ms >= self.now_ms {
            self.at + Duration::from_millis(ms - self.now_ms)
        } else {
            let back = Duration::from_millis(self.now_ms - ms);
            // Before the monotonic clock began (boot): long past either way.
            self.at
                .checked_sub(back)
                .or_else(|| self.at.checked_sub(WINDOW))
                .unwrap_or(self.at)
        }
    }

    fn ms(&self, t: Instant) -> u64 {
        match t.checked_duration_since(self.at) {
            Some(d) => self.now_ms.saturating_add(d.as_millis() as u64),
            None => self.now_ms.saturating_sub((self.at - t).as_millis() as u64),
        }
    }
}

impl SharedLane {
    /// The row as a `Lane` now. Times past now are clamped (a send cannot
    /// be in the future, a pause cannot pass `MAX_PAUSE`): a clock that
    /// stepped back must not hold the lane for the length of the step.
    fn lane(&self, clock: &Clock, in_flight: usize) -> Lane {
        let latest = clock.now_ms.saturating_add(MAX_PAUSE.as_millis() as u64);
        Lane {
            in_flight,
            paused_until: self.paused_until_ms.map(|ms| clock.instant(ms.min(latest))),
            pause_reason: self.pause_reason,
            refusals: self.refusals,
            outages: self.outages,
            learned_rps: self.learned_rps,
            probing: self.probing,
            sent: self
                .sent_ms
                .iter()
                .map(|&ms| clock.instant(ms.min(clock.now_ms)))
                .collect::<VecDeque<_>>(),
            ..Lane::default()
        }
    }

    fn keep(&mut self, lane: &Lane, clock: &Clock) {
        self.paused_until_ms = lane.paused_until.map(|t| clock.ms(t));
        self.pause_reason = lane.paused_until.and(lane.pause_reason);
        self.refusals = lane.refusals;
        self.outages = lane.outages;
        self.learned_rps = lane.learned_rps;
        self.probing = lane.probing;
        self.sent_ms = lane.sent.iter().map(|&t| clock.ms(t)).collect();
    }

    /// Up to `wanted` sends at `now_ms`, with `in_flight` attempts of the
    /// lane running on all nodes.
    pub fn take(&mut self, now_ms: u64, in_flight: usize, wanted: usize, limits: &Limits) -> Taken {
        let clock = Clock {
            at: Instant::now(),
            now_ms,
        };
        let now = clock.at;
        let mut lane = self.lane(&clock, in_flight);
        let mut went = 0;
        let mut held = None;
        while went < wanted {
            match lane.ready(now, limits) {
                Ok(()) => {
                    lane.in_flight += 1;
                    lane.sent.push_back(now);
                    went += 1;
                }
                Err(when) => {
                    let why = lane.paused_at(now).then_some(lane.pause_reason).flatten();
                    held = Some((when.map(|t| clock.ms(t).saturating_sub(now_ms)), why));
                    break;
                }
            }
        }
        lane.forget_sends_before(now);
        let kept = lane.rps(limits).map_or(SENDS_KEPT, |n| n as usize);
        while lane.sent.len() > kept.min(SENDS_MAX) {
            lane.sent.pop_front();
        }
        self.keep(&lane, &clock);
        Taken { go: went, held }
    }

    /// Takes back the last `n` sends `take` counted (the lane held fewer
    /// requests than it allowed).
    pub fn unsend(&mut self, n: usize) {
        let keep = self.sent_ms.len().saturating_sub(n);
        self.sent_ms.truncate(keep);
    }

    /// Learns from an attempt's end, as `Scheduler::finished` does.
    pub fn finished(&mut self, now_ms: u64, feedback: Feedback) {
        let clock = Clock {
            at: Instant::now(),
            now_ms,
        };
        let mut lane = self.lane(&clock, 1);
        lane.finished(clock.at, feedback);
        lane.forget_sends_before(clock.at);
        self.keep(&lane, &clock);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::Hints;

    const LIMITS: Limits = Limits {
        concurrency: 64,
        per_lane_concurrency: 4,
        per_lane_rps: None,
    };

    fn go(n: usize) -> Taken {
        Taken { go: n, held: None }
    }

    fn held(after: Option<u64>, why: Option<PauseReason>) -> Taken {
        Taken {
            go: 0,
            held: Some((after, why)),
        }
    }

    fn answered(rps: u32) -> Feedback {
        Feedback::Answered(Hints {
            rps_limit: Some(rps),
            ..Hints::default()
        })
    }

    #[test]
    fn a_learned_limit_holds_whoever_sends() {
        let mut lane = SharedLane::default();
        lane.finished(10_000, answered(3));
        assert_eq!(lane.learned_rps, Some(3));
        let window = WINDOW.as_millis() as u64;
        // Two nodes ask in turn, with nothing in flight: three in the window.
        assert_eq!(lane.take(10_000, 0, 2, &LIMITS), go(2));
        assert_eq!(
            lane.take(10_010, 0, 2, &LIMITS),
            Taken {
                go: 1,
                held: Some((Some(window - 10), None))
            }
        );
        assert_eq!(lane.sent_ms, [10_000, 10_000, 10_010]);
        // The window opens again when the first send leaves it.
        assert_eq!(
            lane.take(10_500, 0, 1, &LIMITS),
            held(Some(window - 500), None)
        );
        assert_eq!(
            lane.take(10_000 + window, 0, 5, &LIMITS),
            Taken {
                go: 2,
                held: Some((Some(10), None))
            }
        );
        assert_eq!(lane.sent_ms, [10_010, 10_000 + window, 10_000 + window]);
    }

    #[test]
    fn concurrency_counts_every_node() {
        let mut lane = SharedLane::default();
        let full = Some((None, None));
        assert_eq!(lane.take(1_000, 3, 4, &LIMITS), Taken { go: 1, held: full });
        assert_eq!(lane.take(1_000, 4, 1, &LIMITS), Taken { go: 0, held: full });
    }

    #[test]
    fn a_pause_learned_by_one_node_holds_the_others() {
        let mut lane = SharedLane::default();
        let refused = Feedback::Refused {
            retry_after: Some(Duration::from_secs(5)),
            hints: Hints::default(),
        };
        lane.finished(50_000, refused);
        assert_eq!(lane.paused_until_ms, Some(55_000));
        assert_eq!(lane.pause_reason, Some(PauseReason::RateLimited));
        assert_eq!(lane.refusals, 1);
        assert_eq!(
            lane.take(52_000, 0, 1, &LIMITS),
            held(Some(3_000), Some(PauseReason::RateLimited))
        );
        assert_eq!(lane.take(55_000, 0, 1, &LIMITS), go(1));
        assert_eq!(lane.paused_until_ms, None);
        lane.finished(55_100, answered(10));
        assert_eq!((lane.refusals, lane.outages), (0, 0));
    }

    #[test]
    fn limits_above_a_hundred_keep_their_whole_window() {
        let mut lane = SharedLane {
            learned_rps: Some(150),
            ..SharedLane::default()
        };
        assert_eq!(
            lane.take(
                5_000,
                0,
                120,
                &Limits {
                    per_lane_concurrency: 1_000,
                    ..LIMITS
                }
            )
            .go,
            120
        );
        assert_eq!(lane.sent_ms.len(), 120);
    }

    #[test]
    fn a_clock_stepped_back_holds_no_lane() {
        let mut lane = SharedLane {
            learned_rps: Some(1),
            sent_ms: vec![90_000],
            paused_until_ms: Some(u64::MAX / 2),
            pause_reason: Some(PauseReason::RateLimited),
            ..SharedLane::default()
        };
        // The database's clock went back to 10 s: the send "at 90 s" counts
        // as now, the absurd pause as a day.
        let t = lane.take(10_000, 0, 1, &LIMITS);
        assert_eq!(t.go, 0);
        let day = MAX_PAUSE.as_millis() as u64;
        assert_eq!(t.held, Some((Some(day), Some(PauseReason::RateLimited))));
    }

    #[test]
    fn old_sends_leave_the_row() {
        let mut lane = SharedLane {
            sent_ms: vec![1, 2, 3],
            ..SharedLane::default()
        };
        assert_eq!(lane.take(1_000_000, 0, 1, &LIMITS), go(1));
        assert_eq!(lane.sent_ms, [1_000_000]);
    }
}
