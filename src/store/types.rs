//! What the store's operations take and give, the same for every backend.

use serde::{Deserialize, Serialize};

use crate::model::{
    Callback, Header, Idempotency, LaneKey, Outcome, RequestId, RequestRecord, ResponseHead, Status,
};

/// A pending callback event (the `callbacks` tree's value).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallbackEntry {
    /// Which event of the request (`webhook-id` `{id}_{event}`).
    pub event: u32,
    /// What it announces: `done` or `unknown`.
    pub status: Status,
    /// Deliveries tried so far.
    pub attempts: u32,
}

/// What the HTTP layer hands over for a new request.
pub struct NewRequest {
    pub id: RequestId,
    pub lane: LaneKey,
    pub method: String,
    pub target: String,
    pub headers: Vec<Header>,
    pub body: Vec<u8>,
    pub callback: Option<Callback>,
    pub sealed_credential: Vec<u8>,
    pub now_ms: u64,
    /// `--max-pending-per-credential`: refuse it if its lane already holds
    /// this many `enqueued` requests.
    pub max_pending: Option<u64>,
    /// Its `Idempotency-Key`, hashed, with what it asks for.
    pub idempotency: Option<Idempotency>,
}

/// What a submission came to.
#[derive(Debug)]
pub enum Submitted {
    /// Stored, durably.
    New(RequestRecord),
    /// Its `Idempotency-Key` named this request already: nothing stored.
    Again(RequestRecord),
}

/// An upstream answer to store.
pub struct Completion {
    pub sent_ms: u64,
    pub outcome: Outcome,
    pub head: ResponseHead,
    /// Empty when the body was too large to keep.
    pub body: Vec<u8>,
}

/// One attempt's end.
pub enum Settle {
    /// Refused (429) or never sent: back to its place in its lane.
    /// `sent`: the attempt may have written bytes (counted in `attempts`).
    Requeue {
        id: RequestId,
        claims: u32,
        sent: bool,
    },
    /// Answered: `done`, the response kept, the credential deleted, the
    /// callback scheduled.
    Complete {
        id: RequestId,
        claims: u32,
        done: Completion,
        now_ms: u64,
        retention_ms: u64,
    },
    /// A non-idempotent request that may have run waits for an operator.
    Unknown {
        id: RequestId,
        claims: u32,
        now_ms: u64,
        keep_ms: u64,
    },
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    pub requeued: usize,
    pub unknown: usize,
}

impl Recovered {
    /// How start-up recovery settles a request found `started` (SPEC §6),
    /// counted: a safe method back to its place in its lane (it may have
    /// been sent: that counts as an attempt), anything else `unknown`.
    pub fn settle(&mut self, rec: &RequestRecord, now_ms: u64, keep_ms: u64) -> Settle {
        let (id, claims) = (rec.id, rec.claims);
        if crate::model::is_idempotent(&rec.method) {
            self.requeued += 1;
            Settle::Requeue {
                id,
                claims,
                sent: true,
            }
        } else {
            self.unknown += 1;
            Settle::Unknown {
                id,
                claims,
                now_ms,
                keep_ms,
            }
        }
    }
}
