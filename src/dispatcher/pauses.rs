//! The lanes' pauses as the status view and the metrics show them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::model::{LaneKey, now_ms};
use crate::scheduler::{PauseReason, Scheduler};

/// Which lanes are paused, until when (wall-clock ms) and why: written by
/// the loop as attempts finish, read by the status view (SPEC §10).
#[derive(Clone, Default)]
pub struct Pauses(Arc<std::sync::Mutex<HashMap<LaneKey, (u64, PauseReason)>>>);

impl Pauses {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LaneKey, (u64, PauseReason)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lane's pause, if it lasts beyond now.
    pub fn of(&self, lane: &LaneKey) -> Option<(u64, PauseReason)> {
        self.lock()
            .get(lane)
            .copied()
            .filter(|(until, _)| *until > now_ms())
    }

    /// A pause heard from the lane's shared limits (another node's).
    pub(super) fn set(&self, lane: LaneKey, until: u64, why: PauseReason) {
        self.lock().insert(lane, (until, why));
    }

    pub(super) fn publish(&self, lane: LaneKey, sched: &Scheduler) {
        let now = Instant::now();
        let mut map = self.lock();
        match sched.pause_of(&lane, now) {
            Some((until, why)) => {
                let wall = now_ms().saturating_add((until - now).as_millis() as u64);
                map.insert(lane, (wall, why));
            }
            None => {
                map.remove(&lane);
            }
        }
        // Pauses past their end are dropped now and then, not kept forever.
        if map.len() > 1024 {
            let now = now_ms();
            map.retain(|_, (until, _)| *until > now);
        }
    }

    /// Lanes paused beyond now, by reason (every reason, zeros included):
    /// the metrics' `asyncgate_lanes_paused`.
    pub fn by_reason(&self) -> Vec<(&'static str, u64)> {
        let now = now_ms();
        let map = self.lock();
        PauseReason::ALL
            .iter()
            .map(|&why| {
                let n = map
                    .values()
                    .filter(|(until, r)| *r == why && *until > now)
                    .count();
                (why.as_str(), n as u64)
            })
            .collect()
    }
}
