//! Counters and a latency histogram, rendered in the Prometheus text
//! format with the `asyncgate_` prefix. Counts by status come from the
//! store's persisted counters, so they are right across restarts.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Upper bounds (ms) of the upstream latency buckets.
const BUCKETS_MS: [u64; 12] = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000];

/// Status classes of non-2xx callback answers (`other`: outside 100–599).
const REJECTED_CLASSES: [&str; 5] = ["1xx", "3xx", "4xx", "5xx", "other"];

#[derive(Default)]
pub struct Metrics {
    accepted: AtomicU64,
    /// Answers stored as results, by upstream status code.
    executed: Mutex<BTreeMap<u16, u64>>,
    /// 429 / 503+Retry-After answers: requests put back, not results.
    refused: AtomicU64,
    not_sent: AtomicU64,
    failed_after_send: AtomicU64,
    /// Attempts that failed inside the gateway before anything was sent
    /// (an unreadable body, a credential that cannot be unsealed).
    internal_failures: AtomicU64,
    callback_attempts: AtomicU64,
    /// Callbacks refused because their address is in `--callback-deny`.
    callback_refused: AtomicU64,
    held: AtomicU64,
    callback_failures: AtomicU64,
    /// Callback attempts a receiver answered with a non-2xx status, by
    /// class (`REJECTED_CLASSES`): a receiver that is up but refuses.
    callback_rejected: [AtomicU64; REJECTED_CLASSES.len()],
    /// Credentials the scheduler holds state for (bounded by activity).
    lanes: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS_MS.len()],
    latency_sum_ms: AtomicU64,
    latency_count: AtomicU64,
}

impl Metrics {
    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Relaxed);
    }

    pub fn executed(&self, code: u16, exec_ms: u64) {
        *self
            .executed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(code)
            .or_default() += 1;
        for (i, &b) in BUCKETS_MS.iter().enumerate() {
            if exec_ms <= b {
                self.latency_buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.latency_sum_ms.fetch_add(exec_ms, Relaxed);
        self.latency_count.fetch_add(1, Relaxed);
    }

    pub fn refused(&self) {
        self.refused.fetch_add(1, Relaxed);
    }

    pub fn not_sent(&self) {
        self.not_sent.fetch_add(1, Relaxed);
    }

    pub fn failed_after_send(&self) {
        self.failed_after_send.fetch_add(1, Relaxed);
    }

    pub fn internal_failure(&self) {
        self.internal_failures.fetch_add(1, Relaxed);
    }

    pub fn callback_refused(&self) {
        self.callback_refused.fetch_add(1, Relaxed);
    }

    /// Status answers held by `Prefer: wait` right now.
    pub fn set_held(&self, n: usize) {
        self.held.store(n as u64, Relaxed);
    }

    pub fn set_lanes(&self, n: usize) {
        self.lanes.store(n as u64, Relaxed);
    }

    pub fn callback_attempt(&self, ok: bool) {
        self.callback_attempts.fetch_add(1, Relaxed);
        if !ok {
            self.callback_failures.fetch_add(1, Relaxed);
        }
    }

    /// A receiver answered a callback with `code`, not a 2xx.
    pub fn callback_rejected(&self, code: u16) {
        let class = match code {
            100..=199 => 0,
            300..=399 => 1,
            400..=499 => 2,
            500..=599 => 3,
            _ => 4,
        };
        self.callback_rejected[class].fetch_add(1, Relaxed);
    }

    /// The text exposition; `by_status` from the store.
    pub fn render(&self, by_status: &[(&str, u64)]) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP asyncgate_{name} {help}\n# TYPE asyncgate_{name} counter\nasyncgate_{name} {v}"
            );
        };
        let _ = writeln!(
            out,
            "# HELP asyncgate_requests Stored requests by status.\n# TYPE asyncgate_requests gauge"
        );
        for (status, n) in by_status {
            let _ = writeln!(out, "asyncgate_requests{{status=\"{status}\"}} {n}");
        }
        let depth = by_status
            .iter()
            .find(|(s, _)| *s == "enqueued")
            .map_or(0, |(_, n)| *n);
        let _ = writeln!(
            out,
            "# HELP asyncgate_queue_depth Requests waiting to run.\n# TYPE asyncgate_queue_depth gauge\nasyncgate_queue_depth {depth}"
        );
        counter(
            &mut out,
            "accepted_total",
            "Submissions acknowledged with 202.",
            self.accepted.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP asyncgate_executed_total Upstream answers stored as results, by status code.\n# TYPE asyncgate_executed_total counter"
        );
        for (code, n) in self
            .executed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(out, "asyncgate_executed_total{{code=\"{code}\"}} {n}");
        }
        counter(
            &mut out,
            "rate_limit_deferrals_total",
            "Attempts refused with 429 or 503+Retry-After and put back.",
            self.refused.load(Relaxed),
        );
        counter(
            &mut out,
            "upstream_unreachable_total",
            "Attempts that never reached the upstream.",
            self.not_sent.load(Relaxed),
        );
        counter(
            &mut out,
            "upstream_failed_after_send_total",
            "Attempts that failed after sending began.",
            self.failed_after_send.load(Relaxed),
        );
        counter(
            &mut out,
            "internal_failures_total",
            "Attempts that failed inside the gateway before sending (requeued).",
            self.internal_failures.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP asyncgate_lanes Credentials with scheduler state in memory.\n# TYPE asyncgate_lanes gauge\nasyncgate_lanes {}",
            self.lanes.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP asyncgate_held_requests Status answers held by Prefer: wait.\n# TYPE asyncgate_held_requests gauge\nasyncgate_held_requests {}",
            self.held.load(Relaxed)
        );
        counter(
            &mut out,
            "callback_refused_total",
            "Callbacks refused: their address is denied (--callback-deny).",
            self.callback_refused.load(Relaxed),
        );
        counter(
            &mut out,
            "callback_attempts_total",
            "Callback deliveries tried.",
            self.callback_attempts.load(Relaxed),
        );
        counter(
            &mut out,
            "callback_failures_total",
            "Callback deliveries that failed.",
            self.callback_failures.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP asyncgate_callback_rejected_total Callback attempts a receiver answered with a non-2xx status, by status class.\n# TYPE asyncgate_callback_rejected_total counter"
        );
        for (class, n) in REJECTED_CLASSES.iter().zip(&self.callback_rejected) {
            let _ = writeln!(
                out,
                "asyncgate_callback_rejected_total{{class=\"{class}\"}} {}",
                n.load(Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP asyncgate_upstream_latency_seconds Time from sending to the whole answer.\n# TYPE asyncgate_upstream_latency_seconds histogram"
        );
        for (i, b) in BUCKETS_MS.iter().enumerate() {
            let le = *b as f64 / 1000.0;
            let _ = writeln!(
                out,
                "asyncgate_upstream_latency_seconds_bucket{{le=\"{le}\"}} {}",
                self.latency_buckets[i].load(Relaxed)
            );
        }
        let count = self.latency_count.load(Relaxed);
        let sum = self.latency_sum_ms.load(Relaxed) as f64 / 1000.0;
        let _ = writeln!(
            out,
            "asyncgate_upstream_latency_seconds_bucket{{le=\"+Inf\"}} {count}\nasyncgate_upstream_latency_seconds_sum {sum}\nasyncgate_upstream_latency_seconds_count {count}"
        );
        out
    }
}

/// Gauges of the queue's health read at scrape time (SPEC §11): what an
/// operator pages on. No per-credential labels: a million credentials must
/// not make a million series.
pub struct QueueHealth {
    /// Callback events waiting to be delivered (due now or retrying later).
    pub callbacks_pending: u64,
    /// How long the oldest `enqueued` request has waited; 0 with none.
    pub oldest_queued_age_ms: u64,
    /// Lanes paused right now, by reason (every reason, zeros included).
    pub paused_by_reason: Vec<(&'static str, u64)>,
}

impl QueueHealth {
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP asyncgate_callbacks_pending Callbacks waiting to be delivered, due now or retrying later.\n# TYPE asyncgate_callbacks_pending gauge\nasyncgate_callbacks_pending {}",
            self.callbacks_pending
        );
        let _ = writeln!(
            out,
            "# HELP asyncgate_oldest_queued_age_seconds How long the oldest queued request has waited (0 when none is queued).\n# TYPE asyncgate_oldest_queued_age_seconds gauge\nasyncgate_oldest_queued_age_seconds {}",
            self.oldest_queued_age_ms as f64 / 1000.0
        );
        let _ = writeln!(
            out,
            "# HELP asyncgate_lanes_paused Credentials whose queue is paused, by reason.\n# TYPE asyncgate_lanes_paused gauge"
        );
        for (reason, n) in &self.paused_by_reason {
            let _ = writeln!(out, "asyncgate_lanes_paused{{reason=\"{reason}\"}} {n}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.accepted();
        m.executed(200, 7);
        m.executed(200, 300);
        m.executed(500, 20);
        m.callback_attempt(false);
        m.callback_rejected(503);
        m.callback_rejected(404);
        m.callback_rejected(500);
        let text = m.render(&[("enqueued", 3), ("done", 2)]);
        assert!(text.contains("asyncgate_accepted_total 1\n"));
        assert!(text.contains("asyncgate_executed_total{code=\"200\"} 2\n"));
        assert!(text.contains("asyncgate_executed_total{code=\"500\"} 1\n"));
        assert!(text.contains("asyncgate_requests{status=\"enqueued\"} 3\n"));
        assert!(text.contains("asyncgate_queue_depth 3\n"));
        assert!(text.contains("asyncgate_upstream_latency_seconds_bucket{le=\"0.01\"} 1\n"));
        assert!(text.contains("asyncgate_upstream_latency_seconds_bucket{le=\"0.025\"} 2\n"));
        assert!(text.contains("asyncgate_upstream_latency_seconds_count 3\n"));
        assert!(text.contains("asyncgate_callback_failures_total 1\n"));
        assert!(text.contains("asyncgate_callback_rejected_total{class=\"5xx\"} 2\n"));
        assert!(text.contains("asyncgate_callback_rejected_total{class=\"4xx\"} 1\n"));
        assert!(text.contains("asyncgate_callback_rejected_total{class=\"3xx\"} 0\n"));
    }
}
