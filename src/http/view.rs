//! The status view (SPEC §2, with §10's extras), serialized straight into
//! the answer: no `serde_json::Value` tree in between, and its times and id
//! written without an allocation each. A bulk answer renders a thousand of
//! them, so what one costs is what a bulk status costs (benches/RESULTS.md).

use std::fmt;

use serde::{Serialize, Serializer};

use super::{ApiError, State};
use crate::callback::response_url;
use crate::model::{CallbackPhase, RequestId, RequestRecord, Status, now_ms};

/// The status body: the fields each status shows, in order.
#[derive(Serialize)]
pub struct StatusView {
    id: Shown<RequestId>,
    status: &'static str,
    created: Time,
    #[serde(skip_serializing_if = "Option::is_none")]
    started: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_http_code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) response_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exec_time: Option<u64>,
    attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    ahead: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    paused_until: Option<Time>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pause_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    callback: Option<CallbackView>,
}

#[derive(Serialize)]
struct CallbackView {
    state: &'static str,
    attempts: u32,
    last_http_code: Option<u16>,
    next_attempt: Option<Time>,
}

impl StatusView {
    pub async fn new(rec: &RequestRecord, state: &State) -> Result<StatusView, ApiError> {
        let public_url = state.public_url.as_deref();
        let queued = rec.status == Status::Enqueued;
        // Queue position and pauses concern a queued request only (the
        // pause map is behind the dispatcher's lock).
        let (ahead, paused) = if queued {
            // This node's own pauses, or what the upstream taught any node,
            // whichever lasts longer.
            let shared = state.store.lane_pause(&rec.lane, now_ms()).await?;
            let paused = match (state.pauses.of(&rec.lane), shared) {
                (Some(a), Some(b)) => Some(if a.0 >= b.0 { a } else { b }),
                (a, b) => a.or(b),
            };
            (Some(state.store.ahead(rec).await?), paused)
        } else {
            (None, None)
        };
        let done = match (rec.status, &rec.outcome) {
            (Status::Done, Some(o)) => Some(o),
            _ => None,
        };
        Ok(StatusView {
            id: Shown(rec.id),
            status: rec.status.as_str(),
            created: Time(rec.created_ms),
            started: rec
                .started_ms
                .filter(|_| rec.status != Status::Enqueued)
                .map(Time),
            response_http_code: done.map(|o| o.code),
            response_url: done.map(|_| response_url(public_url, &rec.id)),
            exec_time: done.map(|o| o.exec_ms),
            // The attempt under way counts (SPEC §2: `started` is sent,
            // no answer yet); the stored count is of attempts ended.
            attempts: rec.attempts + u32::from(rec.status == Status::Started),
            ahead,
            paused_until: paused.map(|(until, _)| Time(until)),
            pause_reason: paused.map(|(_, why)| why.as_str()),
            // A request with a callback and no event yet (not finished)
            // shows it pending, with no attempt scheduled: it is sent once
            // the request is `done` or `unknown`.
            callback: rec.callback.as_ref().map(|_| match rec.callback_state {
                Some(c) => CallbackView {
                    state: c.phase.as_str(),
                    attempts: c.attempts,
                    last_http_code: c.last_http_code,
                    next_attempt: c.next_attempt_ms.map(Time),
                },
                None => CallbackView {
                    state: CallbackPhase::Pending.as_str(),
                    attempts: 0,
                    last_http_code: None,
                    next_attempt: None,
                },
            }),
        })
    }
}

/// The 202 body of a submission: id, status and creation time.
#[derive(Serialize)]
pub struct Accepted {
    id: Shown<RequestId>,
    status: &'static str,
    created: Time,
}

impl Accepted {
    pub fn new(rec: &RequestRecord) -> Accepted {
        Accepted {
            id: Shown(rec.id),
            status: Status::Enqueued.as_str(),
            created: Time(rec.created_ms),
        }
    }
}

/// A value serialized as its `Display` text (serde_json writes it into the
/// output without a `String` of its own).
pub struct Shown<T>(pub T);

impl<T: fmt::Display> Serialize for Shown<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// A time (Unix ms) as `model::format_time` writes it, `YYYY-MM-DD
/// HH:MM:SS` in UTC, formatted on the stack; empty past year 9999, as
/// there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Time(pub u64);

impl Time {
    fn text(self) -> Option<[u8; 19]> {
        let secs = self.0 / 1000;
        let (days, rest) = (secs / 86_400, secs % 86_400);
        let (year, month, day) = civil_from_days(days);
        if year > 9999 {
            return None;
        }
        let mut out = *b"0000-00-00 00:00:00";
        let mut put = |at: usize, width: usize, mut n: u64| {
            for i in (at..at + width).rev() {
                out[i] = b'0' + (n % 10) as u8;
                n /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, month);
        put(8, 2, day);
        put(11, 2, rest / 3600);
        put(14, 2, rest / 60 % 60);
        put(17, 2, rest % 60);
        Some(out)
    }
}

impl Serialize for Time {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.text() {
            // Only ASCII digits and separators were written.
            Some(text) => s.serialize_str(std::str::from_utf8(&text).unwrap_or_default()),
            None => s.serialize_str(""),
        }
    }
}

/// Year, month, day of a count of days since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, for days ≥ 0).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::format_time;

    fn json(t: Time) -> String {
        serde_json::to_string(&t).unwrap_or_default()
    }

    #[test]
    fn times_read_as_format_time_writes_them() {
        let mut samples = vec![
            0,
            999,
            1000,
            86_399_999,
            86_400_000,
            951_782_400_000,     // 2000-02-29
            1_709_164_800_000,   // 2024-02-29
            4_107_542_399_000,   // 2100-02-28 23:59:59
            4_107_542_400_000,   // 2100-03-01
            253_402_300_799_000, // 9999-12-31 23:59:59
            253_402_300_800_000, // year 10000: empty, as format_time
            u64::MAX,
        ];
        // Every day of four centuries at a varying time of day.
        let mut ms = 0u64;
        while ms < 13_000_000_000_000 {
            samples.push(ms);
            ms += 86_400_000 + 3_661_001;
        }
        for ms in samples {
            assert_eq!(
                json(Time(ms)),
                format!("\"{}\"", format_time(ms)),
                "at {ms} ms"
            );
        }
    }

    #[test]
    fn ids_are_written_as_their_text() {
        let id = RequestId::generate();
        assert_eq!(
            serde_json::to_string(&Shown(id)).unwrap_or_default(),
            format!("\"{id}\"")
        );
    }
}
