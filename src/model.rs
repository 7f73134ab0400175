//! The domain records: what a request is, the states it moves through, and
//! how times are written. Stored records are not API views: `http` renders
//! its own views from these.

use std::fmt;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use ulid::Ulid;

/// A request's public name: a ULID in canonical form. Queue order does not
/// come from it (see `RequestRecord::seq`), so nothing needs ids to sort in
/// creation order, and they do not: knowing one id must not tell anyone
/// another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RequestId(pub [u8; 16]);

/// The OS gave no randomness. An id made without it could be guessed, so
/// none is made: the caller refuses the work instead.
#[derive(Debug, thiserror::Error)]
#[error("the operating system gave no randomness for a request id")]
pub struct NoRandomness;

impl RequestId {
    /// A fresh id: this millisecond and 80 bits drawn from the OS for this
    /// id alone (SPEC §0). Not `ulid::Generator`: within a millisecond it
    /// increments the random part, so one id gives away its neighbours.
    /// Fails rather than fall back to anything predictable.
    pub fn try_generate() -> Result<RequestId, NoRandomness> {
        let mut random = [0u8; 16];
        getrandom::getrandom(&mut random[6..]).map_err(|_| NoRandomness)?;
        let ulid = Ulid::from_parts(now_ms(), u128::from_be_bytes(random));
        Ok(RequestId(ulid.to_bytes()))
    }

    /// `try_generate` for tests, benches and tools, where a machine without
    /// randomness may as well stop. Never on the request path: that uses
    /// `try_generate` and answers an error.
    pub fn generate() -> RequestId {
        Self::try_generate().expect("the OS gives randomness")
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", Ulid::from_bytes(self.0))
    }
}

impl FromStr for RequestId {
    type Err = ();

    /// Accepts the canonical 26-character form, in either case, and only
    /// it: the decoder would wrap a first character above `7` (beyond 128
    /// bits) onto another id, so what it read must print back the same.
    fn from_str(s: &str) -> Result<Self, ()> {
        if s.len() != 26 {
            return Err(());
        }
        let upper = s.to_ascii_uppercase();
        match Ulid::from_string(&upper) {
            Ok(u) if u.to_string() == upper => Ok(RequestId(u.to_bytes())),
            _ => Err(()),
        }
    }
}

/// The salted hash of a credential: names its lane (queue) and proves
/// ownership on status and response checks without keeping the credential.
pub type LaneKey = [u8; 32];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Enqueued,
    Started,
    Done,
    Unknown,
}

impl Status {
    pub const ALL: [Status; 4] = [
        Status::Enqueued,
        Status::Started,
        Status::Done,
        Status::Unknown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Enqueued => "enqueued",
            Status::Started => "started",
            Status::Done => "done",
            Status::Unknown => "unknown",
        }
    }

    pub fn code(self) -> u8 {
        self as u8
    }

    /// The transitions the gateway makes; anything else is a bug or a stale
    /// claim, and the store refuses it.
    pub fn can_become(self, next: Status) -> bool {
        use Status::*;
        matches!(
            (self, next),
            (Enqueued, Started)
                | (Started, Enqueued)
                | (Started, Done)
                | (Started, Unknown)
                | (Unknown, Enqueued)
        )
    }
}

impl FromStr for Status {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallbackMethod {
    Get,
    Post,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Callback {
    pub url: String,
    pub method: CallbackMethod,
}

/// A header as it travels: the name lower-cased, the value's raw bytes.
pub type Header = (String, Vec<u8>);

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Keeps a message's end-to-end headers, in order, with their
/// multiplicity: drops hop-by-hop ones (and those `Connection` names) and
/// any of `also_drop` (lower-case names).
pub fn end_to_end<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    also_drop: &[&str],
) -> Vec<Header> {
    let headers: Vec<(&str, &[u8])> = headers.into_iter().collect();
    let named_by_connection: Vec<String> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .collect();
    headers
        .into_iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v))
        .filter(|(n, _)| {
            !HOP_BY_HOP.contains(&n.as_str())
                && !also_drop.contains(&n.as_str())
                && !named_by_connection.contains(n)
        })
        .map(|(n, v)| (n, v.to_vec()))
        .collect()
}

/// Methods that may be sent again after a failure or a crash.
pub fn is_idempotent(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS")
}

/// What the upstream answered, once it let the request through.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub code: u16,
    /// Milliseconds from sending to having the whole response.
    pub exec_ms: u64,
    /// False when the body exceeded `--max-response-size` and was dropped.
    pub kept: bool,
}

/// One accepted request. Small by design: the body and the response live in
/// the store's journal (`BodyRef`); the record keeps where.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub id: RequestId,
    /// Position in its lane: from the store's persisted sequence.
    pub seq: u64,
    pub lane: LaneKey,
    pub method: String,
    /// Path after `/async_api/`, with `?query` byte for byte when present.
    pub target: String,
    /// Forwardable headers (no hop-by-hop, no `Authorization`: it is sealed).
    pub headers: Vec<Header>,
    /// `None` for an empty body (and once the request is done).
    pub body: Option<BodyRef>,
    pub callback: Option<Callback>,
    pub created_ms: u64,
    pub status: Status,
    /// When the attempt whose answer counts was sent.
    pub started_ms: Option<u64>,
    /// Claims so far: the fencing token that stops a stale claim's write.
    pub claims: u32,
    pub outcome: Option<Outcome>,
    pub finished_ms: Option<u64>,
    /// When retention ends; past it the request answers 404.
    pub expires_ms: Option<u64>,
    /// The credential, sealed (`crypto`); empty once the request is done.
    pub sealed: Vec<u8>,
    /// Where the stored response's head and body are, once done.
    pub response: Option<ResponseRefs>,
    /// Sends to the upstream that may have written bytes, refused (429)
    /// ones included, failed connects not (SPEC §10 `attempts`).
    pub attempts: u32,
    /// The `Idempotency-Key` it was stored under, if any.
    pub idempotency: Option<Idempotency>,
    /// Its latest callback event's progress, once one is due.
    pub callback_state: Option<CallbackState>,
}

/// An `Idempotency-Key`, hashed (keys are per credential: the lane is part
/// of the index key), and what the first submission with it asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Idempotency {
    pub key: [u8; 32],
    /// A hash of method, target and body: a reuse with another request is
    /// refused.
    pub fingerprint: [u8; 32],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallbackPhase {
    Pending,
    Delivered,
    /// Its retention ended before a receiver took it.
    GaveUp,
}

impl CallbackPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            CallbackPhase::Pending => "pending",
            CallbackPhase::Delivered => "delivered",
            CallbackPhase::GaveUp => "gave_up",
        }
    }
}

/// A request's callback event: the n-th (from 1; `webhook-id` is
/// `{id}_{n}`), for the status it announces, and how its delivery goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackState {
    pub event: u32,
    pub status: Status,
    pub phase: CallbackPhase,
    pub attempts: u32,
    pub last_http_code: Option<u16>,
    pub next_attempt_ms: Option<u64>,
}

/// How a callback event's view moves, the same in every store.
impl CallbackState {
    /// A new event, due at once.
    pub fn pending(event: u32, status: Status, now_ms: u64) -> CallbackState {
        CallbackState {
            event,
            status,
            phase: CallbackPhase::Pending,
            attempts: 0,
            last_http_code: None,
            next_attempt_ms: Some(now_ms),
        }
    }

    /// Answered 2xx (`code`), or moot (`None`: its request is gone).
    pub fn finished(&mut self, code: Option<u16>) {
        self.attempts += 1;
        self.last_http_code = code;
        self.next_attempt_ms = None;
        if code.is_some() {
            self.phase = CallbackPhase::Delivered;
        }
    }

    /// `attempts` made, the last answered `code`, the next at `next_ms`.
    pub fn retrying(&mut self, attempts: u32, code: Option<u16>, next_ms: u64) {
        self.attempts = attempts;
        self.last_http_code = code;
        self.next_attempt_ms = Some(next_ms);
    }

    /// Given up after `attempts` tries; `last`: a final try that failed
    /// (with the receiver's code, if it answered), counted.
    pub fn gave_up(&mut self, attempts: u32, last: Option<Option<u16>>) {
        self.phase = CallbackPhase::GaveUp;
        self.next_attempt_ms = None;
        if let Some(code) = last {
            self.attempts = attempts + 1;
            self.last_http_code = code;
        }
    }
}

impl RequestRecord {
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_ms.is_some_and(|e| now_ms >= e)
    }
}

/// The stored head of an upstream response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseHead {
    pub code: u16,
    pub headers: Vec<Header>,
    /// `None` for an empty body, or one too large to keep.
    pub body: Option<BodyRef>,
}

/// Where a response lives: its encoded `ResponseHead`, and its body
/// (`None` when empty or too large to keep).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseRefs {
    pub head: BodyRef,
    pub body: Option<BodyRef>,
}

/// Where a stored body lives: a range of a journal segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BodyRef {
    pub segment: u64,
    pub offset: u64,
    pub len: u64,
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `YYYY-MM-DD HH:MM:SS` in UTC, the contract's one time format.
pub fn format_time(ms: u64) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_accept_lower_case() {
        let id = RequestId::generate();
        let s = id.to_string();
        assert_eq!(s.len(), 26);
        assert_eq!(s.parse::<RequestId>(), Ok(id));
        assert_eq!(s.to_lowercase().parse::<RequestId>(), Ok(id));
        assert!("nope".parse::<RequestId>().is_err());
        assert!("01JDQ8M3Z1X4A6QF0W3N9YB2K!".parse::<RequestId>().is_err());
    }

    #[test]
    fn only_the_canonical_form_names_an_id() {
        let s = "01M8Q516S9YGK4F7SP4T9R25B8";
        assert!(s.parse::<RequestId>().is_ok());
        // Beyond 128 bits: the decoder would wrap these onto `s`.
        for first in ['8', '9', 'G', 'Z', 'g'] {
            let alias = format!("{first}{}", &s[1..]);
            assert!(alias.parse::<RequestId>().is_err(), "{alias}");
        }
        // Crockford's look-alike letters are not the canonical digits.
        assert!("0IM8Q516S9YGK4F7SP4T9R25B8".parse::<RequestId>().is_err());
        assert!("O1M8Q516S9YGK4F7SP4T9R25B8".parse::<RequestId>().is_err());
    }

    /// Ids made in one millisecond must not give each other away: the old
    /// `ulid::Generator` incremented the random part, so one id named its
    /// neighbours.
    #[test]
    fn ids_made_together_do_not_reveal_their_neighbours() {
        const N: usize = 10_000;
        let ids: Vec<Ulid> = (0..N)
            .map(|_| Ulid::from_bytes(RequestId::try_generate().unwrap().0))
            .collect();
        let mut per_ms = std::collections::HashMap::<u64, usize>::new();
        for id in &ids {
            *per_ms.entry(id.timestamp_ms()).or_default() += 1;
        }
        assert!(
            per_ms.values().any(|&n| n > 1),
            "some ids share a millisecond, or the test proves nothing"
        );
        let mut random: Vec<u128> = ids.iter().map(|id| id.random()).collect();
        random.sort_unstable();
        random.dedup();
        assert_eq!(random.len(), N, "all distinct");
        // Neighbours by value, whatever their millisecond: 10,000 fresh
        // 80-bit values lie about 2^66 apart, so two within 2^20 of each
        // other (chance about 2^-33) or sharing their top 64 bits means an
        // increment, not randomness.
        for pair in random.windows(2) {
            assert!(
                pair[1] - pair[0] > 1 << 20,
                "{:x} and {:x}",
                pair[0],
                pair[1]
            );
            assert_ne!(pair[0] >> 16, pair[1] >> 16, "same top 64 random bits");
        }
    }

    #[test]
    fn end_to_end_drops_hop_by_hop_and_connection_named_headers() {
        let raw: Vec<(&str, &[u8])> = vec![
            ("Connection", b"close, X-Private"),
            ("X-Private", b"1"),
            ("Keep-Alive", b"timeout=5"),
            ("Accept", b"a"),
            ("Host", b"h"),
            ("Accept", b"b"),
            ("Transfer-Encoding", b"chunked"),
        ];
        let kept = end_to_end(raw, &["host"]);
        assert_eq!(
            kept,
            vec![
                ("accept".to_string(), b"a".to_vec()),
                ("accept".to_string(), b"b".to_vec())
            ]
        );
    }

    #[test]
    fn time_format_is_the_contracts() {
        assert_eq!(format_time(1_394_063_438_000), "2014-03-05 23:50:38");
    }

    #[test]
    fn only_the_gateways_transitions_are_allowed() {
        use Status::*;
        assert!(Enqueued.can_become(Started));
        assert!(Started.can_become(Done));
        assert!(!Done.can_become(Started));
        assert!(!Enqueued.can_become(Done));
        assert!(Unknown.can_become(Enqueued));
    }
}
