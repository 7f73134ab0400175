//! What the upstream's answers say about pacing: rate-limit refusals,
//! `Retry-After`, the myTarget `X-RateLimit-*` headers, and backoff. Pure
//! functions; the current time is always an argument.

use std::time::{Duration, SystemTime};

use super::{MAX_PAUSE, MIN_PAUSE};
use crate::model::Header;

/// How an upstream answer counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The answer is the request's result.
    Result,
    /// A rate-limit refusal (429, or 503 with `Retry-After`): not a result,
    /// not an attempt; the request goes back to the head of its lane.
    Refused { retry_after: Option<Duration> },
}

pub fn verdict(code: u16, headers: &[Header], now: SystemTime) -> Verdict {
    let retry_after = header(headers, "retry-after").and_then(|v| parse_retry_after(v, now));
    let has_retry_after = header(headers, "retry-after").is_some();
    match code {
        429 => Verdict::Refused { retry_after },
        503 if has_retry_after => Verdict::Refused { retry_after },
        _ => Verdict::Result,
    }
}

/// `Retry-After` as delta-seconds or any of the three HTTP-date forms,
/// clamped to [`MIN_PAUSE`, `MAX_PAUSE`] (`0` and a date in the past are
/// the shortest pause, an absurd number the longest). `None` when
/// unparseable: then it counts as absent.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        // Seconds past what a u64 holds: a very long wait, not garbage.
        Err(_) if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => MAX_PAUSE,
        Err(_) => {
            let at = httpdate::parse_http_date(value).ok()?;
            at.duration_since(now).unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.clamp(MIN_PAUSE, MAX_PAUSE))
}

/// The pacing hints the myTarget API sends on every answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hints {
    /// `X-RateLimit-RPS-Limit`: at most this many requests a second.
    pub rps_limit: Option<u32>,
    /// `X-RateLimit-RPS-Remaining: 0`: this second is used up.
    pub second_exhausted: bool,
    /// `X-RateLimit-Hourly-Remaining: 0` or `-Daily-Remaining: 0`.
    pub quota_exhausted: bool,
}

impl Hints {
    pub fn from_headers(headers: &[Header]) -> Hints {
        let num = |name| header(headers, name).and_then(|v| v.trim().parse::<u64>().ok());
        Hints {
            rps_limit: num("x-ratelimit-rps-limit")
                .filter(|&n| n > 0)
                .map(|n| n.min(u32::MAX as u64) as u32),
            second_exhausted: num("x-ratelimit-rps-remaining") == Some(0),
            quota_exhausted: num("x-ratelimit-hourly-remaining") == Some(0)
                || num("x-ratelimit-daily-remaining") == Some(0),
        }
    }
}

/// `base` doubled per failure after the first, capped.
pub fn doubling(base: Duration, failures: u32, cap: Duration) -> Duration {
    let factor = 1u32
        .checked_shl(failures.saturating_sub(1))
        .unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(cap)
}

fn header<'a>(headers: &'a [Header], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<Header> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn retry_after_in_seconds_and_all_three_date_forms() {
        // 1994-11-06 08:49:37 UTC, written the three ways HTTP allows.
        let now = at(784_111_777 - 30);
        for date in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(
                parse_retry_after(date, now),
                Some(Duration::from_secs(30)),
                "{date}"
            );
        }
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", at(784_111_800)),
            Some(MIN_PAUSE),
            "a date in the past is the shortest pause"
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn retry_after_is_clamped_to_one_second_and_one_day() {
        let now = at(1_000_000);
        assert_eq!(parse_retry_after("0", now), Some(MIN_PAUSE));
        assert_eq!(
            parse_retry_after("10000000000000000000", now),
            Some(MAX_PAUSE)
        );
        assert_eq!(
            parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now),
            Some(MAX_PAUSE)
        );
        assert_eq!(
            parse_retry_after("99999999999999999999999", now),
            Some(MAX_PAUSE)
        );
        for unparseable in ["-5", "1.5", "", "soon", "12abc"] {
            assert_eq!(parse_retry_after(unparseable, now), None, "{unparseable}");
        }
    }

    #[test]
    fn only_429_and_503_with_retry_after_are_refusals() {
        let now = at(0);
        assert_eq!(
            verdict(429, &[], now),
            Verdict::Refused { retry_after: None }
        );
        assert_eq!(
            verdict(503, &h(&[("Retry-After", "5")]), now),
            Verdict::Refused {
                retry_after: Some(Duration::from_secs(5))
            }
        );
        assert_eq!(verdict(503, &[], now), Verdict::Result);
        assert_eq!(
            verdict(500, &h(&[("retry-after", "5")]), now),
            Verdict::Result
        );
        assert_eq!(verdict(200, &[], now), Verdict::Result);
    }

    #[test]
    fn mytarget_headers() {
        let hints = Hints::from_headers(&h(&[
            ("X-RateLimit-RPS-Limit", "10"),
            ("X-RateLimit-RPS-Remaining", "0"),
            ("X-RateLimit-Hourly-Remaining", "5"),
            ("X-RateLimit-Daily-Remaining", "0"),
        ]));
        assert_eq!(
            hints,
            Hints {
                rps_limit: Some(10),
                second_exhausted: true,
                quota_exhausted: true
            }
        );
        assert_eq!(
            Hints::from_headers(&h(&[("x-ratelimit-rps-limit", "0")])),
            Hints::default()
        );
    }

    #[test]
    fn doubling_caps() {
        let s = Duration::from_secs(1);
        let cap = Duration::from_secs(60);
        let seq: Vec<u64> = (1..=9).map(|n| doubling(s, n, cap).as_secs()).collect();
        assert_eq!(seq, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(doubling(s, 1000, cap), cap);
    }
}
